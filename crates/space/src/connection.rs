//! One accepted connection, served in its own actor: a Syndicate relay between the socket and
//! the connection's first capability (its [`Doorman`](crate::doorman::Doorman)).
//!
//! syndicate-server's `run_connection` does the same, but the relay it starts refers to itself
//! and is never freed, and the actor's task waits forever once the connection is gone: each
//! connection ever accepted kept ~6-8 KiB (a fuzz run of 100,000 connections grew `nixspace up`
//! to ~800 MiB). Here the relay is dropped, and the actor told to finish, when it ends.
//!
//! What the connection makes the host buffer is bounded both ways ([`Budgets`]): the packet
//! still arriving is checked against the connection's packet cap after every read (smaller
//! until it resolved a capability; see [`crate::framing`]), and the packets queued for a peer
//! that does not read them against a byte cap. Past either, the connection is closed.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use bytes::BytesMut;
use syndicate::actor::{
    Account, Activation, ActorResult, AnyValue, Cap, Entity, ExitStatus, FacetRef,
    LinkedTaskTermination, LoanedItem,
};
use syndicate::error::Error;
use syndicate::relay::{Mutex, TunnelRelay};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::doorman::Resolved;
use crate::framing::PacketBudget;
use crate::limits::Limits;

/// The socket's reading half.
pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
/// The socket's writing half.
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// How much the reader asks the socket for at once.
const READ_SIZE: usize = 64 * 1024;

/// The relay as syndicate keeps it.
type Relay = Arc<Mutex<Option<TunnelRelay>>>;

/// What one connection may make the host buffer.
#[derive(Debug, Clone)]
pub struct Budgets {
    /// The packet cap before `resolved` is set.
    pub unauthenticated: PacketBudget,
    /// The packet cap once `resolved` is set.
    pub authenticated: PacketBudget,
    /// Whether the connection resolved a capability.
    pub resolved: Resolved,
    /// The most bytes queued for the peer.
    pub max_queued_bytes: usize,
    /// The peer, for logs.
    pub peer: String,
}

impl Budgets {
    /// The budgets `limits` give a connection from `peer`.
    pub fn new(limits: &Limits, resolved: Resolved, peer: String) -> Budgets {
        Budgets {
            unauthenticated: PacketBudget {
                max: limits.max_unauthenticated_packet_bytes,
            },
            authenticated: PacketBudget {
                max: limits.max_packet_bytes,
            },
            resolved,
            max_queued_bytes: limits.max_queued_bytes,
            peer,
        }
    }

    /// The packet cap that applies now.
    fn packet(&self) -> PacketBudget {
        if self.resolved.is_set() {
            self.authenticated
        } else {
            self.unauthenticated
        }
    }
}

/// Serve a connection from the current actor, with `first` as the capability the peer's oid 0
/// refers to, until the peer or the actor ends it or it goes over `budgets`.
pub fn serve(
    t: &mut Activation,
    reader: Reader,
    writer: Writer,
    first: Arc<Cap>,
    budgets: Budgets,
) {
    let (_, relay, outbound) = TunnelRelay::_run(t, Some(first), None, false);
    // Registered after the relay's own exit hook (which may still send an error packet).
    let release = t.create_ref(ReleaseAtExit {
        relay: Some(Arc::clone(&relay)),
    });
    t.add_exit_hook(&release);
    t.linked_task(
        Some(AnyValue::symbol("writer")),
        write_out(writer, outbound, budgets.clone()),
    );
    let facet = t.facet_ref();
    t.linked_task(
        Some(AnyValue::symbol("reader")),
        read_in(facet, reader, relay, budgets),
    );
}

/// Frees the relay and ends the actor's task once the actor terminated.
struct ReleaseAtExit {
    relay: Option<Relay>,
}

impl Entity<()> for ReleaseAtExit {
    fn exit_hook(&mut self, t: &mut Activation, _status: &Arc<ExitStatus>) {
        if let Some(relay) = self.relay.take() {
            // The relay holds a reference to itself: dropping it here breaks the cycle.
            drop(relay.lock().take());
        }
        t.shutdown();
    }
}

/// Feed what the peer sends to the relay, never reading ahead of what the actor has handled
/// (the account's debt), until the peer closes or resets the connection or sends a packet
/// over its cap.
async fn read_in(
    facet: FacetRef,
    mut reader: Reader,
    relay: Relay,
    budgets: Budgets,
) -> Result<LinkedTaskTermination, Error> {
    let account = Account::new(Some(AnyValue::symbol("reader")), None);
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    loop {
        account.ensure_clear_funds().await;
        buf.reserve(READ_SIZE);
        match reader.read_buf(&mut buf).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => Err(e)?,
        }
        let handled = facet.activate(&account, None, |t| -> ActorResult {
            match relay.lock().as_mut() {
                Some(tunnel) => tunnel.handle_inbound_stream(t, &mut buf),
                None => Ok(()),
            }
        });
        if !handled {
            break;
        }
        // What the relay left is the start of a packet still arriving.
        if let Err(refusal) = budgets.packet().check(&buf) {
            tracing::warn!(peer = %budgets.peer, resolved = budgets.resolved.is_set(),
                %refusal, "closing a connection sending an oversize packet");
            break;
        }
    }
    Ok(LinkedTaskTermination::Normal)
}

/// Write what the relay sends to the peer, each packet flushed, until the relay is gone or
/// more than the budget waits for a peer that does not read.
async fn write_out(
    mut writer: Writer,
    mut outbound: UnboundedReceiver<LoanedItem<Vec<u8>>>,
    budgets: Budgets,
) -> Result<LinkedTaskTermination, Error> {
    let mut queue = VecDeque::<LoanedItem<Vec<u8>>>::new();
    // Bytes in the queue not yet written, and how much of its front packet was.
    let (mut queued, mut written) = (0usize, 0usize);
    let mut open = true;
    loop {
        let Some(front) = queue.front() else {
            if !open {
                return Ok(LinkedTaskTermination::KeepFacet);
            }
            match outbound.recv().await {
                Some(packet) => {
                    queued += packet.item.len();
                    queue.push_back(packet);
                }
                None => open = false,
            }
            continue;
        };
        tokio::select! {
            packet = outbound.recv(), if open => match packet {
                Some(packet) => {
                    queued += packet.item.len();
                    queue.push_back(packet);
                }
                None => open = false,
            },
            n = writer.write(&front.item[written..]) => {
                let n = n?;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::WriteZero))?;
                }
                written += n;
                queued -= n;
                if queue.front().is_some_and(|p| written == p.item.len()) {
                    queue.pop_front();
                    written = 0;
                    writer.flush().await?;
                }
            }
        }
        if queued > budgets.max_queued_bytes {
            tracing::warn!(peer = %budgets.peer, queued, max = budgets.max_queued_bytes,
                "closing a connection whose peer does not read what it is sent");
            return Ok(LinkedTaskTermination::Normal);
        }
    }
}
