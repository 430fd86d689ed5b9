//! The client's side of one connection: its streams (a unix socket, or this process's stdin
//! and stdout), its reader and writer at the negotiated version, how much it is trusted, and
//! the one error type that ends a connection.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nixspace_nix_protocol::framed::{FramedError, FramedSource};
use nixspace_nix_protocol::nar_copy::{copy_nar, NarCopyError};
use nixspace_nix_protocol::stderr::{send_error, send_log};
use nixspace_nix_protocol::{
    DaemonError, HandshakeError, LogEvent, NixReader, NixWriter, Request, WireError,
};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;

use crate::relay::{upload_of, Upload};
use crate::trust::Trust;
use crate::upstream::UpstreamError;
use crate::{BoxRead, BoxWrite};

/// Reads the client's requests.
pub type ClientReader = NixReader<BoxRead>;
/// Writes frames and replies to the client.
pub type ClientWriter = NixWriter<BoxWrite>;

/// The byte streams of one client, before the handshake.
pub struct ClientStreams {
    /// What the client sends.
    pub input: BoxRead,
    /// What the client is sent.
    pub output: BoxWrite,
    /// A second handle on the input, to notice the client leaving during an operation.
    pub watch: InputWatch,
}

impl ClientStreams {
    /// A client connected to a unix socket.
    pub fn socket(stream: UnixStream) -> std::io::Result<ClientStreams> {
        let watch = InputWatch::new(stream.as_fd())?;
        let (input, output) = stream.into_split();
        Ok(ClientStreams {
            input: Box::new(input),
            output: Box::new(output),
            watch,
        })
    }

    /// The client on this process's stdin and stdout (pipes or a socket, as `nix-daemon
    /// --stdio` is run by an ssh server or a parent process). Both are made non-blocking.
    pub fn stdio() -> std::io::Result<ClientStreams> {
        let stdin = std::io::stdin();
        let input = pipe::Receiver::from_owned_fd_unchecked(non_blocking_copy(stdin.as_fd())?)?;
        let output =
            pipe::Sender::from_owned_fd_unchecked(non_blocking_copy(std::io::stdout().as_fd())?)?;
        Ok(ClientStreams {
            input: Box::new(input),
            output: Box::new(output),
            watch: InputWatch::new(stdin.as_fd())?,
        })
    }
}

/// A duplicate of `fd`, whose (shared) file description is set non-blocking, as the async
/// runtime needs it.
fn non_blocking_copy(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let copy = fd.try_clone_to_owned()?;
    rustix::io::ioctl_fionbio(&copy, true)?;
    Ok(copy)
}

/// A second handle on a client's input (a socket or a pipe), read only while an operation
/// runs: then the client must send nothing, so end of file or any byte says it left or broke
/// the protocol. (Tokio's pipe receiver is a plain non-blocking `read(2)` on its descriptor,
/// which serves a socket as well.)
pub struct InputWatch(pipe::Receiver);

impl InputWatch {
    /// Watch the input `fd` refers to, through a non-blocking duplicate of it.
    pub fn new(fd: BorrowedFd<'_>) -> std::io::Result<InputWatch> {
        Ok(InputWatch(pipe::Receiver::from_owned_fd_unchecked(
            non_blocking_copy(fd)?,
        )?))
    }

    /// Wait until the client leaves or sends something: the error says which. Cancel-safe.
    pub(crate) async fn interrupted(&self) -> ConnError {
        let mut probe = [0u8; 1];
        loop {
            if let Err(e) = self.0.readable().await {
                return e.into();
            }
            // A client killed with output unread resets the connection instead of closing
            // it: it left all the same.
            let read = match self.0.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(0),
                read => read,
            };
            match read {
                Ok(0) => return ConnError::ClientLeft,
                Ok(_) => return ConnError::Desync,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return e.into(),
            }
        }
    }
}

/// Why a client connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The upstream store could not be reached.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The client's handshake failed.
    #[error("client handshake failed")]
    Handshake(#[from] HandshakeError),
    /// Reading or writing a connection failed, or the client sent something malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The client sent an operation that cannot be skipped.
    #[error("unsupported operation {0}; its arguments cannot be skipped")]
    Unsupported(String),
    /// The client sent bytes while an operation was running.
    #[error("the client sent data in the middle of an operation")]
    Desync,
    /// The client went away while an operation was running.
    #[error("the client left during an operation")]
    ClientLeft,
    /// Streaming a NAR failed.
    #[error("relaying a NAR failed")]
    Nar(#[from] NarCopyError),
    /// Relaying a framed stream failed.
    #[error("relaying a framed stream failed")]
    Framed(#[from] FramedError),
    /// Reading or writing a stream (a socket, a pipe, stdin or stdout) failed.
    #[error("I/O error")]
    Io(#[from] std::io::Error),
}

impl ConnError {
    /// Whether the client can still be told about the error: nothing of the operation's
    /// answer has been written and the client's stream is in step.
    pub fn can_answer(&self) -> bool {
        matches!(self, ConnError::Upstream(_))
    }
}

/// One client: its streams, and how much it is trusted.
pub struct Client {
    /// The connection's number, in logs.
    pub id: u64,
    /// How much the client is trusted.
    pub trust: Trust,
    /// The client's requests.
    pub reader: ClientReader,
    /// Frames and replies to the client.
    pub writer: ClientWriter,
    /// A second handle on the client's input, to notice the client leaving during a build.
    watch: InputWatch,
}

impl Client {
    /// A client on `reader`/`writer`, whose input `watch` also watches.
    pub fn new(
        id: u64,
        trust: Trust,
        reader: ClientReader,
        writer: ClientWriter,
        watch: InputWatch,
    ) -> Client {
        Client {
            id,
            trust,
            reader,
            writer,
            watch,
        }
    }

    /// Send an error frame: the operation failed, the connection goes on.
    pub async fn error(&mut self, error: &DaemonError) -> Result<(), ConnError> {
        send_error(&mut self.writer, error).await?;
        Ok(())
    }

    /// Answer `req` with `error`, first reading whatever data follows the request (so the
    /// connection stays in step).
    pub async fn refuse(&mut self, req: &Request, error: &DaemonError) -> Result<(), ConnError> {
        tracing::info!(client = self.id, op = ?req.opcode(), %error, "refused an operation");
        match upload_of(req, self.reader.version()) {
            Some(Upload::Framed) => {
                FramedSource::new(&mut self.reader).drain().await?;
            }
            Some(Upload::Nar) => {
                copy_nar(&mut self.reader, &mut tokio::io::sink()).await?;
            }
            // Nothing is pulled from a client that is refused at once.
            Some(Upload::Pulled) | None => {}
        }
        self.error(error).await
    }

    /// Send a log message (a line the client shows).
    pub async fn log(&mut self, text: String) -> Result<(), ConnError> {
        send_log(&mut self.writer, LogEvent::Message(text)).await?;
        Ok(())
    }

    /// Send a structured log event.
    pub async fn event(&mut self, event: LogEvent) -> Result<(), ConnError> {
        send_log(&mut self.writer, event).await?;
        Ok(())
    }

    /// Wait until the client leaves or sends something in the middle of an operation (it
    /// must not): the error says which. Cancel-safe.
    pub async fn interrupted(&mut self) -> ConnError {
        self.watch.interrupted().await
    }
}

/// The error frame for an operation nixspace does not serve.
pub fn not_supported(what: &str) -> DaemonError {
    DaemonError::new(format!("operation {what} is not supported by nixspace"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_operations_are_named() {
        assert_eq!(
            not_supported("CollectGarbage (20)").message,
            "operation CollectGarbage (20) is not supported by nixspace"
        );
    }
}
