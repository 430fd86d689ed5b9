//! One accepted connection, served in its own actor: a Syndicate relay between the socket and
//! the connection's first capability (its [`Doorman`](crate::doorman::Doorman)).
//!
//! syndicate-server's `run_connection` does the same, but the relay it starts refers to itself
//! and is never freed, and the actor's task waits forever once the connection is gone: each
//! connection ever accepted kept ~6-8 KiB (a fuzz run of 100,000 connections grew `nixspace up`
//! to ~800 MiB). Here the relay is dropped, and the actor told to finish, when it ends.

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

/// The socket's reading half.
pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
/// The socket's writing half.
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// How much the reader asks the socket for at once.
const READ_SIZE: usize = 64 * 1024;

/// The relay as syndicate keeps it.
type Relay = Arc<Mutex<Option<TunnelRelay>>>;

/// Serve a connection from the current actor, with `first` as the capability the peer's oid 0
/// refers to, until the peer or the actor ends it.
pub fn serve(t: &mut Activation, reader: Reader, writer: Writer, first: Arc<Cap>) {
    let (_, relay, outbound) = TunnelRelay::_run(t, Some(first), None, false);
    // Registered after the relay's own exit hook (which may still send an error packet).
    let release = t.create_ref(ReleaseAtExit {
        relay: Some(Arc::clone(&relay)),
    });
    t.add_exit_hook(&release);
    t.linked_task(
        Some(AnyValue::symbol("writer")),
        write_out(writer, outbound),
    );
    let facet = t.facet_ref();
    t.linked_task(
        Some(AnyValue::symbol("reader")),
        read_in(facet, reader, relay),
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
/// (the account's debt), until the peer closes or resets the connection.
async fn read_in(
    facet: FacetRef,
    mut reader: Reader,
    relay: Relay,
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
    }
    Ok(LinkedTaskTermination::Normal)
}

/// Write what the relay sends to the peer, each packet flushed, until the relay is gone.
async fn write_out(
    mut writer: Writer,
    mut outbound: UnboundedReceiver<LoanedItem<Vec<u8>>>,
) -> Result<LinkedTaskTermination, Error> {
    while let Some(packet) = outbound.recv().await {
        writer.write_all(&packet.item).await?;
        writer.flush().await?;
    }
    Ok(LinkedTaskTermination::KeepFacet)
}
