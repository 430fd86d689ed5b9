//! Joining a dataspace: open a transport, present the sturdy ref to the
//! gatekeeper, and run the caller's code with the dataspace it resolves to.
//!
//! [`join`] returns only once the gatekeeper has answered, so callers learn
//! about unreachable hosts and refused capabilities as errors, before they
//! assert anything. A ref whose oid the host does not know gets no answer at
//! all from a Syndicate gatekeeper; [`join`] turns that silence into
//! [`JoinError::NoAnswer`] after a timeout.
//!
//! Over TCP, a route with a Noise step first opens a Noise session with the host
//! (syndicate-server's initiator, pinning the host's public key from the route) and sends the
//! ref inside it. A host whose key differs fails the handshake and drops the connection
//! without a word; [`join`] reports that as [`JoinError::ServerKey`], which
//! [`stay_joined`] does not retry on a first connection.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use preserves_schema::{Parse, Unparse};
use syndicate::actor::{Activation, Actor, ActorHandle, ActorResult, AnyValue, Cap};
use syndicate::dataspace::Dataspace;
use syndicate::relay;
use syndicate::schemas::{gatekeeper, noise, rpc, sturdy};
use syndicate_macros::during;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use crate::route::{Route, Transport};

/// How long to wait for the gatekeeper's answer.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// No transport in the route could be opened.
    #[error("cannot reach the dataspace: {0}")]
    Unreachable(String),
    /// The gatekeeper rejected the capability.
    #[error("the dataspace refused the capability ({0}); is the route file current? `nixspace up` rewrites it on start")]
    Refused(String),
    /// The gatekeeper never answered.
    #[error("the dataspace did not answer within {0:?}: the capability names an object it does not know (a route file from another host?)")]
    NoAnswer(Duration),
    /// The connection ended before an answer arrived.
    #[error("the connection to the dataspace closed during the handshake")]
    Closed,
    /// The host dropped the connection during the Noise handshake: it does not hold the
    /// key the route pins.
    #[error("{0} closed the connection during the Noise handshake: the host's key is not the one the route file pins (a route file from another host, or the host's noise-key was replaced?)")]
    ServerKey(Transport),
    /// The dataspace stayed unreachable for longer than the caller allows.
    #[error("could not rejoin the dataspace within {0:?}: {1}")]
    GaveUp(Duration, Box<JoinError>),
}

type BoxedRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxedWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Open the first transport of `route` that accepts a connection.
pub async fn open(route: &Route) -> Result<(BoxedRead, BoxedWrite, Transport), JoinError> {
    let mut failures = Vec::new();
    for transport in &route.transports {
        let opened: std::io::Result<(BoxedRead, BoxedWrite)> = match transport {
            Transport::Unix(path) => tokio::net::UnixStream::connect(path).await.map(|s| {
                let (i, o) = s.into_split();
                (Box::new(i) as BoxedRead, Box::new(o) as BoxedWrite)
            }),
            Transport::Tcp(host, port) => tokio::net::TcpStream::connect((host.as_str(), *port))
                .await
                .and_then(|s| {
                    s.set_nodelay(true)?;
                    crate::dead_peer::drop_when_silent(&s)?;
                    let (i, o) = s.into_split();
                    Ok((Box::new(i) as BoxedRead, Box::new(o) as BoxedWrite))
                }),
        };
        match opened {
            Ok((i, o)) => return Ok((i, o, transport.clone())),
            Err(e) => failures.push(format!("{transport}: {e}")),
        }
    }
    if failures.is_empty() {
        failures.push("the route lists no transports".to_owned());
    }
    Err(JoinError::Unreachable(failures.join("; ")))
}

enum Answer {
    Joined,
    Refused(String),
}

/// Connect to the dataspace named by `route` and run `body` with it in a new
/// top-level actor. Returns that actor's handle once the gatekeeper accepted
/// the ref; the handle completes when the actor ends (for example because the
/// connection dropped).
pub async fn join<F>(route: &Route, body: F) -> Result<ActorHandle, JoinError>
where
    F: 'static + Send + FnOnce(&mut Activation, Arc<Cap>) -> ActorResult,
{
    let (i, o, transport) = open(route).await?;
    tracing::debug!(%transport, "connected");
    let step = gatekeeper::Step::parse(&route.sturdy_ref.unparse())
        .map_err(|_| JoinError::Refused("malformed sturdy ref".to_owned()))?;
    let (tx, rx) = oneshot::channel();
    // Noise on TCP only: the unix socket is local and owner-only.
    let noise = match transport {
        Transport::Tcp(..) => route.noise.clone(),
        Transport::Unix(_) => None,
    };
    let uses_noise = noise.is_some();
    let secured = Arc::new(AtomicBool::new(false));
    let session_opened = Arc::clone(&secured);
    let handle = Actor::top(None, move |t| {
        let Some(gk) = relay::TunnelRelay::run(
            t,
            relay::Input::Bytes(Box::pin(i)),
            relay::Output::Bytes(Box::pin(crate::peer_gone::PeerGoneWriter::new(o))),
            None,
            Some(sturdy::Oid(0.into())),
            false,
        ) else {
            return Err("relay did not provide the gatekeeper reference".into());
        };
        let state = (Some(tx), Some(body));
        let observer = t.create_cap(syndicate::during::entity(state).on_asserted(
            move |(tx, body), t, answer: rpc::Result| {
                match answer {
                    rpc::Result::Ok(rpc::Ok { value }) => {
                        let Some(ds) = value.as_embedded().map(|d| d.into_owned()) else {
                            return Err("gatekeeper answered without a reference".into());
                        };
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(Answer::Joined);
                        }
                        if let Some(body) = body.take() {
                            body(t, ds)?;
                        }
                    }
                    rpc::Result::Error(rpc::Error { error }) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(Answer::Refused(describe(&error)));
                        }
                        t.stop_root();
                    }
                }
                Ok(None)
            },
        ));
        match noise {
            None => {
                gk.assert(t, &gatekeeper::Resolve { step, observer });
            }
            Some(spec) => resolve_through_noise(t, gk, spec, step, observer, session_opened)?,
        }
        Ok(())
    });
    let mut handle = handle;
    // The actor may end (say, on the host's error packet) without dropping the answer's sender.
    let answered = tokio::time::timeout(RESOLVE_TIMEOUT, async {
        tokio::select! {
            biased;
            answer = rx => answer.ok(),
            _ = &mut handle => None,
        }
    });
    match answered.await {
        Ok(Some(Answer::Joined)) => Ok(handle),
        Ok(Some(Answer::Refused(why))) => Err(JoinError::Refused(why)),
        Ok(None) if uses_noise && !secured.load(Ordering::Acquire) => {
            Err(JoinError::ServerKey(transport))
        }
        Ok(None) => Err(JoinError::Closed),
        Err(_) => {
            handle.abort();
            Err(JoinError::NoAnswer(RESOLVE_TIMEOUT))
        }
    }
}

/// Open a Noise session with the host behind `gatekeeper` as `spec` describes (with
/// syndicate-server's initiator), then assert the `ref` step to the object at the other end of
/// its encrypted channel with `observer`. `opened` is set once the handshake succeeded; an
/// error answer to the `noise` step goes to `observer`.
fn resolve_through_noise(
    t: &mut Activation,
    gatekeeper: Arc<Cap>,
    spec: noise::NoiseSpec,
    step: gatekeeper::Step,
    observer: Arc<Cap>,
    opened: Arc<AtomicBool>,
) -> ActorResult {
    let questions = Dataspace::new(t, Some(AnyValue::symbol("noise-initiator")));
    syndicate_server::resolution::noise::handle_noise_path_steps(t, Arc::clone(&questions))?;
    let question = gatekeeper::ResolvePathStep {
        origin: gatekeeper,
        path_step: gatekeeper::PathStep {
            step_type: "noise".to_owned(),
            detail: noise::NoisePathStepDetail(spec).unparse(),
        },
    }
    .unparse();
    questions.assert(
        t,
        &rpc::Question {
            request: question.clone(),
        },
    );
    during!(t, questions, <a #(&question) $answer>, |t: &mut Activation| {
        let session = match rpc::Result::parse(&answer) {
            Ok(rpc::Result::Ok(rpc::Ok { value })) => value.as_embedded().map(|c| c.into_owned()),
            Ok(error @ rpc::Result::Error(_)) => {
                observer.assert(t, &error);
                return Ok(());
            }
            Err(_) => None,
        };
        let Some(session) = session else {
            return Err("the noise step was answered without a reference".into());
        };
        opened.store(true, Ordering::Release);
        tracing::debug!("noise session open");
        session.assert(t, &gatekeeper::Resolve { step: step.clone(), observer: Arc::clone(&observer) });
        Ok(())
    });
    Ok(())
}

fn describe(error: &AnyValue) -> String {
    match error.as_symbol() {
        Some(s) => s.to_string(),
        None => format!("{error:?}"),
    }
}

/// How long to wait between reconnection attempts: from `initial`, doubling
/// up to `max`; reset after every successful join. With `give_up_after`,
/// stop trying once the dataspace has been out of reach that long.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// How long to keep trying without a connection (forever when `None`).
    pub give_up_after: Option<Duration>,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(10),
            give_up_after: None,
        }
    }
}

/// What happened to a long-lived session, for logs and progress displays.
#[derive(Debug)]
pub enum SessionEvent<'a> {
    /// Joined (again): the body runs anew in a fresh actor.
    Joined {
        /// 1 for the first connection, 2 after the first reconnection, …
        connection: u32,
    },
    /// The connection ended; a reconnection follows.
    Lost(String),
    /// Joining failed for a reason that may pass; the next try is after `after`.
    Retrying {
        /// The delay before the next try.
        after: Duration,
        /// What went wrong.
        why: &'a JoinError,
    },
}

/// Stay joined to the dataspace named by `route`: run `body` after every
/// (re)connection in a fresh actor (so it re-asserts everything it needs),
/// and reconnect with `backoff` whenever the host is unreachable or the
/// connection drops — for example while `nixspace up` restarts. Returns only
/// when joining can never succeed (the host refused the capability, or never
/// answered the first time) or when the back-off gives up.
pub async fn stay_joined<F>(
    route: &Route,
    backoff: Backoff,
    body: F,
    mut on_event: impl FnMut(SessionEvent<'_>),
) -> JoinError
where
    F: 'static + Send + Clone + FnOnce(&mut Activation, Arc<Cap>) -> ActorResult,
{
    let mut delay = backoff.initial;
    let mut connection = 0;
    let mut out_of_reach_since = Instant::now();
    loop {
        match join(route, body.clone()).await {
            Ok(actor) => {
                connection += 1;
                delay = backoff.initial;
                on_event(SessionEvent::Joined { connection });
                let why = describe_end(actor.await);
                tracing::warn!(%why, "lost the dataspace; reconnecting");
                on_event(SessionEvent::Lost(why));
                out_of_reach_since = Instant::now();
                // A host that is going down may still accept connections it
                // will never answer: give it a moment before knocking again.
                tokio::time::sleep(backoff.initial).await;
            }
            Err(e @ JoinError::Refused(_)) => return e,
            // Silence from a host we never reached is a wrong route file;
            // after we have been joined it is a host restarting.
            Err(e @ JoinError::NoAnswer(_)) if connection == 0 => return e,
            // So is a host with another key; after we have been joined it may be a host
            // going down mid-handshake.
            Err(e @ JoinError::ServerKey(_)) if connection == 0 => return e,
            Err(e) => {
                if let Some(limit) = backoff.give_up_after {
                    if out_of_reach_since.elapsed() >= limit {
                        return JoinError::GaveUp(limit, Box::new(e));
                    }
                }
                tracing::warn!(error = %e, after = ?delay, "cannot join the dataspace; retrying");
                on_event(SessionEvent::Retrying {
                    after: delay,
                    why: &e,
                });
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(backoff.max);
            }
        }
    }
}

/// Why the actor holding a dataspace connection ended, for messages.
pub fn describe_end(end: Result<ActorResult, tokio::task::JoinError>) -> String {
    match end {
        Ok(Ok(())) => "the connection closed".to_owned(),
        Ok(Err(e)) => format!("{e:?}"),
        Err(e) => e.to_string(),
    }
}
