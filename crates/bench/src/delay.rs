//! A TCP proxy that delays each direction of every connection by half a round-trip time, for
//! comparing a remote worker with an ssh-ng builder at a given latency without network
//! namespaces. The delay does not serialise throughput: each chunk read is stamped with the
//! time it is due and queued, and a writer task releases it at that time while the reader
//! goes on reading (the queue is bounded, so a slow receiver slows the sender as TCP would).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// The largest chunk read at once.
const CHUNK: usize = 16 * 1024;
/// Chunks in flight per direction (at most 4 MiB).
const QUEUED_CHUNKS: usize = 256;

/// A running delaying proxy on 127.0.0.1; dropping it closes its listener and every
/// connection through it.
pub struct DelayProxy {
    addr: SocketAddr,
    accepting: JoinHandle<()>,
}

impl DelayProxy {
    /// Proxy to `target`, each byte arriving `rtt / 2` after it was sent, both ways.
    pub async fn start(target: SocketAddr, rtt: Duration) -> std::io::Result<DelayProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let one_way = rtt / 2;
        let accepting = tokio::spawn(async move {
            // Dropped with this task: every connection's tasks end with the proxy.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(async move {
                    match TcpStream::connect(target).await {
                        Ok(upstream) => relay(client, upstream, one_way).await,
                        Err(e) => tracing::warn!(%target, error = %e, "delay proxy: no target"),
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(DelayProxy { addr, accepting })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Pass bytes both ways between `client` and `upstream`, each direction delayed by `one_way`.
async fn relay(client: TcpStream, upstream: TcpStream, one_way: Duration) {
    for socket in [&client, &upstream] {
        let _ = socket.set_nodelay(true);
    }
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    tokio::join!(
        delayed(client_read, upstream_write, one_way),
        delayed(upstream_read, client_write, one_way),
    );
}

/// Copy `from` to `to`, each chunk written `one_way` after it was read; the end of `from`
/// is passed on after the chunks before it.
async fn delayed(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, one_way: Duration) {
    let (queue, mut due) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUED_CHUNKS);
    let reading = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let at = Instant::now() + one_way;
                    if queue.send((at, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writing = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reading, writing);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on 127.0.0.1.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// Send `data` through `addr` and read it back, timing the first byte's round trip.
    async fn round_trip(addr: SocketAddr, data: &[u8]) -> (Duration, Vec<u8>) {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        socket.write_all(&data[..1]).await.unwrap();
        let mut first = [0u8; 1];
        socket.read_exact(&mut first).await.unwrap();
        let took = started.elapsed();
        socket.write_all(&data[1..]).await.unwrap();
        socket.shutdown().await.unwrap();
        let mut back = first.to_vec();
        socket.read_to_end(&mut back).await.unwrap();
        (took, back)
    }

    #[tokio::test]
    async fn each_round_trip_through_the_proxy_takes_at_least_its_rtt_and_bytes_pass_intact() {
        let target = echo().await;
        let data: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
        // Positive control: straight to the echo server, the same bytes come back.
        let (_, direct) = round_trip(target, &data).await;
        assert_eq!(direct, data);
        let rtt = Duration::from_millis(100);
        let proxy = DelayProxy::start(target, rtt).await.unwrap();
        let (took, back) = round_trip(proxy.addr(), &data).await;
        assert!(took >= rtt, "a round trip took {took:?}");
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the bytes came back changed or out of order");
    }
}
