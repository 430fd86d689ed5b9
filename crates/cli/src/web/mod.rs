//! `up --http ADDR`: a live web view of the farm. One page (no build step, no outside
//! scripts) that follows `/events`, server-sent events carrying what `nixspace status --json`
//! prints each time it changes, and `/log?drv=PATH`, the lines of one step's build log: the
//! recent ones, then each as it comes. `/state` answers the same report once, `/history` the
//! most recent steps of the build history with every attempt (`nixspace history --json`).
//!
//! The view joins the dataspace as any client does, with the submit capability, and reads.
//! It writes one thing: `POST /cancel?job=N` cancels a job, for holders of the submit (or
//! trusted) capability only: the request carries a route file's text, percent-encoded, in
//! the `X-Nixspace-Capability` header (a header a page of another site cannot send without
//! asking first, which this server never allows), and the job is cancelled only if its
//! sturdy ref is one of those. Requests are read within the size and time limits of [`read_request`]; at most
//! [`MAX_CONNECTIONS`] are served at once, and a page that does not take what is sent within
//! [`WRITE_TIMEOUT`] is dropped.

mod logs;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nixspace_planner::history::History;
use nixspace_space::Route;
use syndicate::actor::Activation;
use syndicate::enclose;
use syndicate_macros::on_message;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, Semaphore};

use crate::http_request::{read_request, response_head, Request};
use crate::observe::{observe, Observed};
use logs::{StepLogs, MAX_DRV};

/// The page, served at `/`.
const PAGE: &str = include_str!("page.html");

/// Connections served at once (each page holds two: its events and a step's log).
const MAX_CONNECTIONS: usize = 64;

/// How long a page may take to accept what is sent to it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often an idle event stream sends a comment, so proxies and browsers keep it open.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// The least time between two reports sent on one event stream: changes in between are sent
/// together.
const COALESCE: Duration = Duration::from_millis(200);

/// Steps `/history` answers, newest first.
const HISTORY_STEPS: usize = 50;

/// The header a page sends a capability in.
const CAPABILITY_HEADER: &str = "x-nixspace-capability";

/// What the view shows: the dataspace's state, the steps' recent logs and the build history;
/// and who may cancel jobs.
#[derive(Clone)]
struct View {
    observed: Observed,
    logs: Arc<StepLogs>,
    /// The build history's database file.
    history: Arc<PathBuf>,
    /// The dataspace's route, with the submit capability.
    route: Arc<Route>,
    /// The capabilities whose holders may cancel jobs.
    cancellers: Arc<Vec<Route>>,
}

/// Serve the web view on `listener`, reading the dataspace `route` leads to (rejoining when
/// the connection is lost) and the build history in `history`, until the task is dropped.
/// Holders of the capabilities of `cancellers` may cancel jobs.
pub async fn serve(listener: TcpListener, route: Route, history: PathBuf, cancellers: Vec<Route>) {
    let view = View {
        observed: Observed::default(),
        logs: Arc::default(),
        history: Arc::new(history),
        route: Arc::new(route),
        cancellers: Arc::new(cancellers),
    };
    tokio::spawn(stay_joined(view.clone()));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    tracing::debug!(%peer, "web: too many connections; refusing one");
                    continue;
                };
                let view = view.clone();
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, &view).await {
                        tracing::debug!(%peer, %error, "web: request ended");
                    }
                    drop(slot);
                });
            }
            Err(error) => tracing::warn!(%error, "web: accept failed"),
        }
    }
}

/// Keep `view` joined to its dataspace; while it is not, it shows nothing.
async fn stay_joined(view: View) {
    loop {
        let joined = nixspace_space::join::join(
            &view.route,
            enclose!((view) move |t: &mut Activation, ds| {
                observe(t, &ds, &view.observed);
                let logs = Arc::clone(&view.logs);
                on_message!(t, ds, <log $drv: String _ $line: String>, |_t: &mut Activation| {
                    logs.push(&drv, &line);
                    Ok(())
                });
                Ok(())
            }),
        )
        .await;
        match joined {
            Ok(actor) => {
                let end = actor.await;
                tracing::warn!(
                    "web: lost the dataspace ({}); rejoining",
                    nixspace_space::join::describe_end(end)
                );
            }
            Err(error) => tracing::warn!(%error, "web: cannot join the dataspace; retrying"),
        }
        view.observed.update(|s| *s = Default::default());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn answer(mut stream: TcpStream, view: &View) -> std::io::Result<()> {
    let request = read_request(&mut stream).await?;
    let (path, query) = request
        .path
        .split_once('?')
        .unwrap_or((request.path.as_str(), ""));
    if (request.method.as_str(), path) == ("POST", "/cancel") {
        let (status, body) = cancel(view, &request, query).await;
        return respond(&mut stream, status, "text/plain", &body).await;
    }
    if request.method != "GET" {
        let only = "GET only, but for POST /cancel\n";
        return respond(&mut stream, "405 Method Not Allowed", "text/plain", only).await;
    }
    match path {
        "/" | "/index.html" => respond(&mut stream, "200 OK", "text/html", PAGE).await,
        "/state" => {
            let json = report_json(view);
            respond(&mut stream, "200 OK", "application/json", &json).await
        }
        "/history" => {
            let json = history_json(view).await;
            respond(&mut stream, "200 OK", "application/json", &json).await
        }
        "/events" => events(stream, view).await,
        "/log" => match step_of(query) {
            Some(drv) => step_log(stream, view, &drv).await,
            None => {
                let why = "/log needs ?drv=<a store path ending in .drv>\n";
                respond(&mut stream, "400 Bad Request", "text/plain", why).await
            }
        },
        _ => respond(&mut stream, "404 Not Found", "text/plain", "not found\n").await,
    }
}

/// `POST /cancel?job=N`: cancel job N if the request carries a capability allowed to.
async fn cancel(view: &View, request: &Request, query: &str) -> (&'static str, String) {
    let job = query_value(query, "job").and_then(|v| v.parse::<i64>().ok());
    let Some(job) = job else {
        return (
            "400 Bad Request",
            "/cancel needs ?job=<the job's number>\n".to_owned(),
        );
    };
    let presented = request
        .header(CAPABILITY_HEADER)
        .map(percent_decoded)
        .and_then(|text| Route::parse(&text).ok());
    let allowed = presented.is_some_and(|p| view.cancellers.iter().any(|c| c.same_capability(&p)));
    if !allowed {
        tracing::warn!(job, "web: a cancel without the submit capability refused");
        let why = "cancelling needs the submit capability: paste the text of a submit.route\n";
        return ("403 Forbidden", why.to_owned());
    }
    match crate::ask::cancel_job(&view.route, job).await {
        Ok(outcome) if outcome == "cancelled" => ("200 OK", format!("job {job} cancelled\n")),
        Ok(outcome) => (
            "409 Conflict",
            format!("job {job} not cancelled: {outcome}\n"),
        ),
        Err(error) => (
            "502 Bad Gateway",
            format!("job {job} not cancelled: {error}\n"),
        ),
    }
}

/// The value of the first `name=` in `query`, its percent escapes decoded.
fn query_value(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `text` with its percent escapes decoded (as `encodeURIComponent` writes them).
fn percent_decoded(text: &str) -> String {
    query_value(&format!("v={text}"), "v").unwrap_or_default()
}

/// The step a `/log` query names: `drv=`, a store path ending in `.drv`, of bounded length.
fn step_of(query: &str) -> Option<String> {
    query_value(query, "drv")
        .filter(|drv| drv.starts_with('/') && drv.ends_with(".drv") && drv.len() <= MAX_DRV)
}

/// What `nixspace status --json` prints, now.
fn report_json(view: &View) -> String {
    match view.observed.snapshot.lock() {
        Ok(s) => serde_json::to_string(&s.report()).unwrap_or_else(|_| "{}".to_owned()),
        Err(_) => "{}".to_owned(),
    }
}

/// The most recent steps of the build history with their attempts, as JSON (an error as
/// `{"error": …}`: the page shows it).
async fn history_json(view: &View) -> String {
    let path = Arc::clone(&view.history);
    let read = tokio::task::spawn_blocking(move || {
        let history = History::open_read_only(&path).map_err(|e| e.to_string())?;
        let steps = history.recent(HISTORY_STEPS).map_err(|e| e.to_string())?;
        serde_json::to_string(&steps).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    read.unwrap_or_else(|error| serde_json::json!({ "error": error }).to_string())
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let content_type = format!("{content_type}; charset=utf-8");
    let head = response_head(status, &content_type, Some(body.len() as u64), NO_STORE);
    send(stream, head.as_bytes()).await?;
    send(stream, body.as_bytes()).await?;
    stream.shutdown().await
}

/// The page and its data are never stored by the browser or a proxy: they change all along.
const NO_STORE: &str = "Cache-Control: no-store\r\n";

/// Write `bytes`, or fail if the page does not take them within [`WRITE_TIMEOUT`].
async fn send(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "page too slow"))?
}

/// Start an event stream.
async fn start_events(stream: &mut TcpStream) -> std::io::Result<()> {
    let head = response_head("200 OK", "text/event-stream; charset=utf-8", None, NO_STORE);
    send(stream, head.as_bytes()).await
}

/// One server-sent event of `data` (one line: JSON has no raw newlines).
fn event(data: &str) -> String {
    format!("data: {data}\n\n")
}

/// `/events`: the report now, then again after each change (changes [`COALESCE`]d).
async fn events(mut stream: TcpStream, view: &View) -> std::io::Result<()> {
    let mut changes = view.observed.changed.subscribe();
    start_events(&mut stream).await?;
    loop {
        changes.mark_unchanged();
        send(&mut stream, event(&report_json(view)).as_bytes()).await?;
        tokio::time::sleep(COALESCE).await;
        loop {
            match tokio::time::timeout(KEEPALIVE, changes.changed()).await {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return Ok(()),
                Err(_) => send(&mut stream, b": keepalive\n\n").await?,
            }
        }
    }
}

/// `/log?drv=`: the step's recent lines, then each new one, as events of JSON strings.
async fn step_log(mut stream: TcpStream, view: &View, drv: &str) -> std::io::Result<()> {
    let (kept, mut live) = view.logs.follow(drv);
    start_events(&mut stream).await?;
    for line in kept {
        send(&mut stream, event(&json_string(&line)).as_bytes()).await?;
    }
    loop {
        match tokio::time::timeout(KEEPALIVE, live.recv()).await {
            Ok(Ok(line)) => send(&mut stream, event(&json_string(&line)).as_bytes()).await?,
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                let note = format!("[nixspace: {n} lines skipped: this page fell behind]");
                send(&mut stream, event(&json_string(&note)).as_bytes()).await?
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => return Ok(()),
            Err(_) => send(&mut stream, b": keepalive\n\n").await?,
        }
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_query_names_a_derivation_or_nothing() {
        assert_eq!(
            step_of("drv=%2Fnix%2Fstore%2Fabc-x.drv").as_deref(),
            Some("/nix/store/abc-x.drv")
        );
        assert_eq!(step_of("drv=/etc/passwd"), None);
        assert_eq!(step_of("other=/nix/store/abc-x.drv"), None);
        let long = format!("drv=/{}.drv", "a".repeat(MAX_DRV));
        assert_eq!(step_of(&long), None);
    }
}
