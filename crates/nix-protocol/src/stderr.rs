//! The stderr channel: the frames a daemon sends while it works on an operation, before the
//! operation's reply.
//!
//! Every frame starts with a u64 tag:
//!
//! | frame | tag | payload |
//! |---|---|---|
//! | `NEXT` | `0x6f6c6d67` | string: a log message |
//! | `READ` | `0x64617461` | u64: the most bytes wanted; the client answers with a byte string |
//! | `WRITE` | `0x64617416` | byte string: data for the client's sink |
//! | `LAST` | `0x616c7473` | none: the reply follows |
//! | `ERROR` | `0x63787470` | before 1.26: message string, exit status u64; from 1.26: the string `"Error"`, level u64, name string (always `"Error"`), message string, position u64 (always 0), trace count u64, then per trace a position u64 (0) and a string |
//! | `START_ACTIVITY` | `0x53545254` | id u64, level u64, type u64, text string, fields, parent id u64 |
//! | `STOP_ACTIVITY` | `0x53544f50` | id u64 |
//! | `RESULT` | `0x52534c54` | id u64, type u64, fields |
//!
//! Fields are a u64 count, then per field a u64 type (0 integer, 1 string) and the value.
//! After `ERROR` the operation is over and no reply follows; the connection stays usable.
//! Log text is read lossily (invalid UTF-8 replaced): builders may print arbitrary bytes.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::version::STRUCTURED_ERRORS;
use crate::wire::{NixDeserialize, NixReader, NixSerialize, NixWriter, WireError};

/// `STDERR_NEXT`.
pub const STDERR_NEXT: u64 = 0x6f6c_6d67;
/// `STDERR_READ`.
pub const STDERR_READ: u64 = 0x6461_7461;
/// `STDERR_WRITE`.
pub const STDERR_WRITE: u64 = 0x6461_7416;
/// `STDERR_LAST`.
pub const STDERR_LAST: u64 = 0x616c_7473;
/// `STDERR_ERROR`.
pub const STDERR_ERROR: u64 = 0x6378_7470;
/// `STDERR_START_ACTIVITY`.
pub const STDERR_START_ACTIVITY: u64 = 0x5354_5254;
/// `STDERR_STOP_ACTIVITY`.
pub const STDERR_STOP_ACTIVITY: u64 = 0x5354_4f50;
/// `STDERR_RESULT`.
pub const STDERR_RESULT: u64 = 0x5253_4c54;

/// Activity types (`ActivityType` in Nix).
pub mod activity_type {
    /// Unknown.
    pub const UNKNOWN: u64 = 0;
    /// Copying a path.
    pub const COPY_PATH: u64 = 100;
    /// A file transfer.
    pub const FILE_TRANSFER: u64 = 101;
    /// Realising paths.
    pub const REALISE: u64 = 102;
    /// Copying paths.
    pub const COPY_PATHS: u64 = 103;
    /// A set of builds.
    pub const BUILDS: u64 = 104;
    /// One build; fields: drv path, machine, round, total rounds.
    pub const BUILD: u64 = 105;
    /// Optimising the store.
    pub const OPTIMISE_STORE: u64 = 106;
    /// Verifying paths.
    pub const VERIFY_PATHS: u64 = 107;
    /// Substituting a path.
    pub const SUBSTITUTE: u64 = 108;
    /// Querying path info.
    pub const QUERY_PATH_INFO: u64 = 109;
    /// A post-build hook.
    pub const POST_BUILD_HOOK: u64 = 110;
    /// Waiting for a build slot.
    pub const BUILD_WAITING: u64 = 111;
}

/// Result types (`ResultType` in Nix).
pub mod result_type {
    /// A file was hard-linked.
    pub const FILE_LINKED: u64 = 100;
    /// A line of build output; one string field.
    pub const BUILD_LOG_LINE: u64 = 101;
    /// An untrusted path.
    pub const UNTRUSTED_PATH: u64 = 102;
    /// A corrupted path.
    pub const CORRUPTED_PATH: u64 = 103;
    /// A build phase started; one string field.
    pub const SET_PHASE: u64 = 104;
    /// Progress counters.
    pub const PROGRESS: u64 = 105;
    /// Expected counters.
    pub const SET_EXPECTED: u64 = 106;
    /// A line of post-build-hook output.
    pub const POST_BUILD_LOG_LINE: u64 = 107;
}

/// A field of an activity or result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// Type 0.
    Int(u64),
    /// Type 1.
    String(String),
}

/// A logging frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// `STDERR_NEXT`: a plain message.
    Message(String),
    /// `STDERR_START_ACTIVITY`.
    StartActivity {
        /// Activity id.
        id: u64,
        /// Verbosity level.
        level: u64,
        /// See [`activity_type`].
        activity_type: u64,
        /// Human-readable text.
        text: String,
        /// Type-specific fields.
        fields: Vec<Field>,
        /// Parent activity id (0 for none).
        parent: u64,
    },
    /// `STDERR_STOP_ACTIVITY`.
    StopActivity {
        /// Activity id.
        id: u64,
    },
    /// `STDERR_RESULT`.
    Result {
        /// Activity id.
        id: u64,
        /// See [`result_type`].
        result_type: u64,
        /// Type-specific fields.
        fields: Vec<Field>,
    },
}

impl LogEvent {
    /// The same event under other activity numbers: its activity `id` (of a start, a result
    /// or a stop) and, for a start, its `parent`. A message has none.
    pub fn renumbered(mut self, new_id: u64, new_parent: u64) -> LogEvent {
        match &mut self {
            LogEvent::StartActivity { id, parent, .. } => {
                *id = new_id;
                *parent = new_parent;
            }
            LogEvent::Result { id, .. } | LogEvent::StopActivity { id } => *id = new_id,
            LogEvent::Message(_) => {}
        }
        self
    }

    /// The line of build output this event carries, if it is a `BuildLogLine` result.
    pub fn build_log_line(&self) -> Option<&str> {
        match self {
            LogEvent::Result {
                result_type: result_type::BUILD_LOG_LINE,
                fields,
                ..
            } => match fields.first() {
                Some(Field::String(s)) => Some(s),
                _ => None,
            },
            _ => None,
        }
    }
}

/// An error reported by the daemon with `STDERR_ERROR`. Before 1.26 only `message` and
/// `exit_status` travel; from 1.26 `level`, `name`, `message` and `traces` do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DaemonError {
    /// Verbosity level (0 = error).
    pub level: u64,
    /// Obsolete name field; Nix always sends `"Error"`.
    pub name: String,
    /// The message.
    pub message: String,
    /// Trace lines (outermost last).
    pub traces: Vec<String>,
    /// The exit status (pre-1.26 layout only; 1 otherwise).
    pub exit_status: u64,
}

impl DaemonError {
    /// An error with the given message and defaults elsewhere.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            level: 0,
            name: "Error".to_owned(),
            message: message.into(),
            traces: Vec::new(),
            exit_status: 1,
        }
    }
}

/// One stderr frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StderrFrame {
    /// A logging frame.
    Log(LogEvent),
    /// `STDERR_READ`: the daemon wants up to this many bytes of the request's data.
    Read(u64),
    /// `STDERR_WRITE`: data for the client's sink.
    Write(Vec<u8>),
    /// `STDERR_LAST`: the reply follows.
    Last,
    /// `STDERR_ERROR`: the operation failed.
    Error(DaemonError),
}

/// Receives logging frames.
pub trait LogSink {
    /// Called once per logging frame, in order.
    fn log(&mut self, event: LogEvent);
}

impl<F: FnMut(LogEvent)> LogSink for F {
    fn log(&mut self, event: LogEvent) {
        self(event)
    }
}

/// A [`LogSink`] that drops everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiscardLogs;

impl LogSink for DiscardLogs {
    fn log(&mut self, _event: LogEvent) {}
}

async fn read_fields<R: AsyncRead + Unpin>(r: &mut NixReader<R>) -> Result<Vec<Field>, WireError> {
    let n = r.read_count("fields").await?;
    let mut out = Vec::with_capacity(n.min(64) as usize);
    for _ in 0..n {
        out.push(match r.read_u64("field type").await? {
            0 => Field::Int(r.read_u64("field").await?),
            1 => Field::String(r.read_string_lossy("field").await?),
            value => {
                return Err(WireError::InvalidValue {
                    what: "field type",
                    value,
                })
            }
        });
    }
    Ok(out)
}

async fn write_fields<W: AsyncWrite + Unpin>(
    w: &mut NixWriter<W>,
    fields: &[Field],
) -> Result<(), WireError> {
    w.write_u64(fields.len() as u64, "fields").await?;
    for f in fields {
        match f {
            Field::Int(v) => {
                w.write_u64(0, "field type").await?;
                w.write_u64(*v, "field").await?;
            }
            Field::String(s) => {
                w.write_u64(1, "field type").await?;
                w.write_str(s, "field").await?;
            }
        }
    }
    Ok(())
}

async fn read_position<R: AsyncRead + Unpin>(r: &mut NixReader<R>) -> Result<(), WireError> {
    match r.read_u64("error position").await? {
        0 => Ok(()),
        value => Err(WireError::InvalidValue {
            what: "error position (only 0, no position, is defined)",
            value,
        }),
    }
}

impl NixDeserialize for DaemonError {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        if r.version() < STRUCTURED_ERRORS {
            let message = r.read_string_lossy("error message").await?;
            let exit_status = r.read_u64("error exit status").await?;
            return Ok(Self {
                exit_status,
                ..Self::new(message)
            });
        }
        let ty = r.read_string("error type").await?;
        if ty != "Error" {
            return Err(WireError::InvalidString {
                what: "error type",
                value: ty,
            });
        }
        let level = r.read_u64("error level").await?;
        let name = r.read_string_lossy("error name").await?;
        let message = r.read_string_lossy("error message").await?;
        read_position(r).await?;
        let n = r.read_count("error traces").await?;
        let mut traces = Vec::with_capacity(n.min(64) as usize);
        for _ in 0..n {
            read_position(r).await?;
            traces.push(r.read_string_lossy("error trace").await?);
        }
        Ok(Self {
            level,
            name,
            message,
            traces,
            exit_status: 1,
        })
    }
}

impl NixSerialize for DaemonError {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        if w.version() < STRUCTURED_ERRORS {
            w.write_str(&self.message, "error message").await?;
            return w.write_u64(self.exit_status, "error exit status").await;
        }
        w.write_str("Error", "error type").await?;
        w.write_u64(self.level, "error level").await?;
        w.write_str(&self.name, "error name").await?;
        w.write_str(&self.message, "error message").await?;
        w.write_u64(0, "error position").await?;
        w.write_u64(self.traces.len() as u64, "error traces")
            .await?;
        for t in &self.traces {
            w.write_u64(0, "error position").await?;
            w.write_str(t, "error trace").await?;
        }
        Ok(())
    }
}

impl NixDeserialize for StderrFrame {
    async fn read_from<R: AsyncRead + Unpin + Send>(
        r: &mut NixReader<R>,
    ) -> Result<Self, WireError> {
        let tag = r.read_u64("stderr frame tag").await?;
        Ok(match tag {
            STDERR_NEXT => {
                StderrFrame::Log(LogEvent::Message(r.read_string_lossy("log message").await?))
            }
            STDERR_READ => StderrFrame::Read(r.read_u64("read length").await?),
            STDERR_WRITE => StderrFrame::Write(r.read_bytes("write data").await?),
            STDERR_LAST => StderrFrame::Last,
            STDERR_ERROR => StderrFrame::Error(DaemonError::read_from(r).await?),
            STDERR_START_ACTIVITY => StderrFrame::Log(LogEvent::StartActivity {
                id: r.read_u64("activity id").await?,
                level: r.read_u64("activity level").await?,
                activity_type: r.read_u64("activity type").await?,
                text: r.read_string_lossy("activity text").await?,
                fields: read_fields(r).await?,
                parent: r.read_u64("activity parent").await?,
            }),
            STDERR_STOP_ACTIVITY => StderrFrame::Log(LogEvent::StopActivity {
                id: r.read_u64("activity id").await?,
            }),
            STDERR_RESULT => StderrFrame::Log(LogEvent::Result {
                id: r.read_u64("activity id").await?,
                result_type: r.read_u64("result type").await?,
                fields: read_fields(r).await?,
            }),
            other => return Err(WireError::UnknownStderrFrame(other)),
        })
    }
}

impl NixSerialize for StderrFrame {
    async fn write_to<W: AsyncWrite + Unpin + Send>(
        &self,
        w: &mut NixWriter<W>,
    ) -> Result<(), WireError> {
        const TAG: &str = "stderr frame tag";
        match self {
            StderrFrame::Log(LogEvent::Message(m)) => {
                w.write_u64(STDERR_NEXT, TAG).await?;
                w.write_str(m, "log message").await
            }
            StderrFrame::Log(LogEvent::StartActivity {
                id,
                level,
                activity_type,
                text,
                fields,
                parent,
            }) => {
                w.write_u64(STDERR_START_ACTIVITY, TAG).await?;
                w.write_u64(*id, "activity id").await?;
                w.write_u64(*level, "activity level").await?;
                w.write_u64(*activity_type, "activity type").await?;
                w.write_str(text, "activity text").await?;
                write_fields(w, fields).await?;
                w.write_u64(*parent, "activity parent").await
            }
            StderrFrame::Log(LogEvent::StopActivity { id }) => {
                w.write_u64(STDERR_STOP_ACTIVITY, TAG).await?;
                w.write_u64(*id, "activity id").await
            }
            StderrFrame::Log(LogEvent::Result {
                id,
                result_type,
                fields,
            }) => {
                w.write_u64(STDERR_RESULT, TAG).await?;
                w.write_u64(*id, "activity id").await?;
                w.write_u64(*result_type, "result type").await?;
                write_fields(w, fields).await
            }
            StderrFrame::Read(n) => {
                w.write_u64(STDERR_READ, TAG).await?;
                w.write_u64(*n, "read length").await
            }
            StderrFrame::Write(data) => {
                w.write_u64(STDERR_WRITE, TAG).await?;
                w.write_bytes(data, "write data").await
            }
            StderrFrame::Last => w.write_u64(STDERR_LAST, TAG).await,
            StderrFrame::Error(e) => {
                w.write_u64(STDERR_ERROR, TAG).await?;
                e.write_to(w).await
            }
        }
    }
}

/// Reads frames until `LAST` (`Ok(Ok(()))`) or `ERROR` (`Ok(Err(error))`), passing logging
/// frames to `logs`. `READ` and `WRITE` frames are errors here; the client handles them for
/// the operations that use them.
pub async fn read_until_last<R, L>(
    r: &mut NixReader<R>,
    logs: &mut L,
) -> Result<Result<(), DaemonError>, WireError>
where
    R: AsyncRead + Unpin + Send,
    L: LogSink + ?Sized,
{
    loop {
        match StderrFrame::read_from(r).await? {
            StderrFrame::Log(event) => logs.log(event),
            StderrFrame::Last => return Ok(Ok(())),
            StderrFrame::Error(e) => return Ok(Err(e)),
            StderrFrame::Read(_) => {
                return Err(WireError::UnexpectedStderrFrame { tag: "STDERR_READ" })
            }
            StderrFrame::Write(_) => {
                return Err(WireError::UnexpectedStderrFrame {
                    tag: "STDERR_WRITE",
                })
            }
        }
    }
}

/// Server side: sends a logging frame and flushes, so the client sees it at once.
pub async fn send_log<W: AsyncWrite + Unpin + Send>(
    w: &mut NixWriter<W>,
    event: LogEvent,
) -> Result<(), WireError> {
    StderrFrame::Log(event).write_to(w).await?;
    w.flush().await
}

/// Server side: ends the stderr phase with `LAST`; the caller then writes the reply and
/// flushes.
pub async fn write_last<W: AsyncWrite + Unpin + Send>(
    w: &mut NixWriter<W>,
) -> Result<(), WireError> {
    StderrFrame::Last.write_to(w).await
}

/// Server side: fails the current operation with `ERROR` in the layout of the negotiated
/// version, and flushes. The session may continue with the next operation.
pub async fn send_error<W: AsyncWrite + Unpin + Send>(
    w: &mut NixWriter<W>,
    error: &DaemonError,
) -> Result<(), WireError> {
    StderrFrame::Error(error.clone()).write_to(w).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::{MIN_SUPPORTED, NIX_2_8};

    #[tokio::test]
    async fn error_layout_depends_on_version() {
        let e = DaemonError::new("boom");
        let mut w = NixWriter::new(Vec::new(), MIN_SUPPORTED);
        StderrFrame::Error(e.clone())
            .write_to(&mut w)
            .await
            .unwrap();
        w.flush().await.unwrap();
        let old = w.into_inner();
        // tag, "boom" (8 + 8), status
        assert_eq!(old.len(), 8 + 16 + 8);

        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        StderrFrame::Error(e.clone())
            .write_to(&mut w)
            .await
            .unwrap();
        w.flush().await.unwrap();
        let new = w.into_inner();
        // tag, "Error", level, "Error", "boom", pos, traces
        assert_eq!(new.len(), 8 + 16 + 8 + 16 + 16 + 8 + 8);
        let mut r = NixReader::new(std::io::Cursor::new(new), NIX_2_8);
        assert_eq!(
            StderrFrame::read_from(&mut r).await.unwrap(),
            StderrFrame::Error(e)
        );
    }

    #[tokio::test]
    async fn unknown_tag_is_an_error() {
        let mut r = NixReader::new(std::io::Cursor::new(7u64.to_le_bytes().to_vec()), NIX_2_8);
        assert!(matches!(
            StderrFrame::read_from(&mut r).await,
            Err(WireError::UnknownStderrFrame(7))
        ));
    }

    #[tokio::test]
    async fn read_until_last_collects_logs() {
        let mut w = NixWriter::new(Vec::new(), NIX_2_8);
        for f in [
            StderrFrame::Log(LogEvent::Message("hello".into())),
            StderrFrame::Log(LogEvent::Result {
                id: 1,
                result_type: result_type::BUILD_LOG_LINE,
                fields: vec![Field::String("line".into())],
            }),
            StderrFrame::Last,
        ] {
            f.write_to(&mut w).await.unwrap();
        }
        w.flush().await.unwrap();
        let mut r = NixReader::new(std::io::Cursor::new(w.into_inner()), NIX_2_8);
        let mut seen = Vec::new();
        let mut sink = |e: LogEvent| seen.push(e);
        assert_eq!(read_until_last(&mut r, &mut sink).await.unwrap(), Ok(()));
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].build_log_line(), Some("line"));
    }
}
