//! A minimal HTTP endpoint for Prometheus: `GET /metrics` answers the
//! planner's metrics in the text exposition format; anything else is 404.
//! Requests are read with a size and time limit, one per connection.

use std::sync::Arc;

use nixspace_planner::metrics::Metrics;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::http_request::{read_request, response_head};

/// Serve `metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let metrics = Arc::clone(&metrics);
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &metrics).await {
                        tracing::debug!(%peer, %error, "metrics request failed");
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "metrics: accept failed"),
        }
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let request = read_request(&mut stream).await?;
    let (status, content_type, body) = match (request.method.as_str(), request.path.as_str()) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "nixspace serves only GET /metrics\n".to_owned(),
        ),
    };
    let head = response_head(status, content_type, Some(body.len() as u64), "");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
