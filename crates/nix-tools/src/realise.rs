//! Building one derivation with `nix-store --realise`, streaming its log.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

use crate::command::tail;

/// Why a build did not produce its outputs.
#[derive(Debug, thiserror::Error)]
pub enum RealiseError {
    /// `nix-store` could not be started.
    #[error("cannot run nix-store: {0}")]
    Spawn(std::io::Error),
    /// Reading the build's output failed.
    #[error("lost the build's output: {0}")]
    Io(std::io::Error),
    /// The build failed.
    #[error("{message}")]
    Failed {
        /// The last meaningful error line from Nix.
        message: String,
    },
}

/// How long an interrupted `nix-store` gets to stop its builder before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);

/// A running `nix-store` that is interrupted if dropped before it exits.
///
/// Nix runs the builder in its own session, so killing `nix-store` outright
/// would orphan the builder. SIGINT lets Nix kill its builder and release its
/// locks; SIGKILL follows after [`INTERRUPT_GRACE`].
struct Interruptible(Option<tokio::process::Child>);

impl Drop for Interruptible {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        if let Some(pid) = child
            .id()
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if tokio::time::timeout(INTERRUPT_GRACE, child.wait())
                        .await
                        .is_err()
                    {
                        let _ = child.kill().await;
                    }
                });
            }
            Err(_) => {
                let _ = child.start_kill();
            }
        }
    }
}

/// Build `drv` with the local Nix; call `on_line` for each log line as it
/// arrives. Returns the output paths. `features` are system features the
/// caller vouches for (a worker's offer); Nix is told it has them too. If the
/// returned future is dropped (that is how a cancelled step stops) the build
/// is interrupted.
pub async fn realise(
    drv: &str,
    features: &[String],
    mut on_line: impl FnMut(String) + Send,
) -> Result<Vec<String>, RealiseError> {
    let mut guard = Interruptible(None);
    let mut child = tokio::process::Command::new("nix-store")
        .args(["--realise", drv])
        .args(feature_option(features))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RealiseError::Spawn)?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(RealiseError::Spawn(std::io::Error::other("no pipes")));
    };
    let child = guard.0.insert(child);
    let collect_stdout = async {
        let mut lines = BufReader::new(stdout).lines();
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await? {
            out.push(line);
        }
        Ok::<_, std::io::Error>(out)
    };
    let stream_stderr = async {
        let mut lines = BufReader::new(stderr).lines();
        let mut recent = String::new();
        while let Some(line) = lines.next_line().await? {
            recent.push_str(&line);
            recent.push('\n');
            if recent.len() > 16 * 1024 {
                let cut = recent.len() - 8 * 1024;
                recent = recent[recent.ceil_char_boundary(cut)..].to_owned();
            }
            on_line(line);
        }
        Ok::<_, std::io::Error>(recent)
    };
    let (outputs, recent) =
        tokio::try_join!(collect_stdout, stream_stderr).map_err(RealiseError::Io)?;
    let status = child.wait().await.map_err(RealiseError::Io)?;
    guard.0 = None;
    if status.success() {
        return Ok(outputs.into_iter().filter(|l| l.starts_with('/')).collect());
    }
    let errors: Vec<&str> = recent.lines().filter(|l| l.starts_with("error:")).collect();
    let message = match errors.first() {
        Some(first) => first.trim_start_matches("error: ").to_owned(),
        None => format!(
            "nix-store --realise exited with {status}: {}",
            tail(&recent, 3)
        ),
    };
    Err(RealiseError::Failed { message })
}

/// `--option extra-system-features "a b"`, or nothing for no features.
fn feature_option(features: &[String]) -> Vec<String> {
    if features.is_empty() {
        return Vec::new();
    }
    vec![
        "--option".to_owned(),
        "extra-system-features".to_owned(),
        features.join(" "),
    ]
}
