//! What stops a benchmark: its arguments, the processes it starts, the dataspace, Nix, or a
//! measurement that did not come out.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use nixspace_nix_formats::store_path::StorePathError;
use nixspace_nix_protocol::ClientError;
use nixspace_nix_tools::private_daemon::PrivateDaemonError;
use nixspace_space::{JoinError, RouteError};

use crate::processes::ProcessError;
use crate::rig::Column;

/// Why a benchmark stopped.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The arguments describe no benchmark.
    #[error("{0}")]
    Arguments(&'static str),
    /// A child process or the scratch directory could not be set up.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// The private `nix-daemon` of a compared setup did not start.
    #[error(transparent)]
    PrivateDaemon(#[from] PrivateDaemonError),
    /// What a benchmark sets up did not come about.
    #[error("{0}")]
    Setup(&'static str),
    /// A file, a socket or a process failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Something the benchmark does failed on a file or a process.
    #[error("{what}: {source}")]
    Doing {
        /// What was done.
        what: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The system clock is set before 1970.
    #[error("the system clock is before the epoch: {0}")]
    Clock(#[from] std::time::SystemTimeError),
    /// A benchmarked command exited unsuccessfully.
    #[error("benchmark command failed ({status}): {stderr}")]
    CommandFailed {
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },
    /// One way of building the DAG failed.
    #[error("{column} failed: {source}")]
    Column {
        /// The column's label.
        column: &'static str,
        /// What failed.
        source: Box<BenchError>,
    },
    /// A route file could not be read or written.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The dataspace could not be joined.
    #[error(transparent)]
    Join(#[from] JoinError),
    /// A client actor of the benchmark stopped or never started.
    #[error("the {0}")]
    Client(&'static str),
    /// Something expected did not happen in time.
    #[error("{what} within {limit:?}")]
    Timeout {
        /// What was expected.
        what: String,
        /// How long it was waited for.
        limit: Duration,
    },
    /// A step was reported built that no simulated worker was given.
    #[error("step {0} was built without being assigned")]
    Unassigned(String),
    /// A measuring child printed no measurement for the steps asked for.
    #[error("unexpected measurement {text:?} for {nodes} steps")]
    Measurement {
        /// What it printed.
        text: String,
        /// The steps asked for.
        nodes: usize,
    },
    /// A process's `/proc/PID/status` lacks a field.
    #[error("no {0} in the process's /proc status")]
    ProcStatus(&'static str),
    /// A chart could not be drawn.
    #[error("cannot draw {}: {message}", file.display())]
    Plot {
        /// The SVG file.
        file: PathBuf,
        /// What the drawing library said.
        message: String,
    },
    /// The ssh baseline lacks a program.
    #[error("the ssh baseline needs {tool}: install it with `apt-get install -y {package}`")]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// The ssh baseline runs as root only.
    #[error("the ssh baseline needs root (sshd, and a mount namespace for the client's store)")]
    NotRoot,
    /// The private sshd did not come up.
    #[error("sshd {what}: {log}")]
    Sshd {
        /// What happened to it.
        what: String,
        /// Its log.
        log: String,
    },
    /// A column was asked for whose processes were not started.
    #[error("{0:?} was not started")]
    NotStarted(Column),
    /// The dataspace for a worker over TCP has no TCP listener.
    #[error("the dataspace in {} does not listen on TCP", .0.display())]
    NoTcp(PathBuf),
    /// A daemon socket could not be connected to.
    #[error("cannot connect to {}: {source}", socket.display())]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// What failed.
        source: Box<ClientError>,
    },
    /// A worker-protocol call failed.
    #[error(transparent)]
    Protocol(Box<ClientError>),
    /// A store path did not parse.
    #[error(transparent)]
    StorePath(#[from] StorePathError),
    /// A store query gave the wrong answer.
    #[error("{op} of {path} answered valid = {valid}, expected {}", !valid)]
    WrongAnswer {
        /// The operation.
        op: &'static str,
        /// The path asked about.
        path: String,
        /// The answer.
        valid: bool,
    },
}

impl From<ClientError> for BenchError {
    fn from(e: ClientError) -> BenchError {
        BenchError::Protocol(Box::new(e))
    }
}
