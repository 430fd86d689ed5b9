//! The ssh-ng remote-builder baseline: a private `sshd` on 127.0.0.1 (a free port, a host
//! key and a client key generated for it, root's key authorised) whose `nix-daemon --stdio`
//! builds on this machine's store, and a `nix-build` client on a store of its own (a private
//! mount namespace with its own `/nix`): a client sharing the builder's `/nix/store` hangs
//! on the output lock in Nix 2.8.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::error::BenchError;
use crate::measure::succeeded;
use crate::processes::kill_group;

/// Where Debian's openssh-server puts the daemon (it is not on a normal user's PATH).
const SSHD: &str = "/usr/sbin/sshd";

/// The name the client knows the sshd's host key by, whichever port it reaches it on.
const HOST_ALIAS: &str = "nixspace-bench-sshd";

/// A running private `sshd` and the files a client needs to use it as a Nix builder.
pub struct SshBuilder {
    sshd: Child,
    dir: PathBuf,
    port: u16,
}

impl SshBuilder {
    /// Generate keys and a configuration in `dir`, start `sshd` on a free port of
    /// 127.0.0.1 and wait until it accepts connections.
    pub async fn start(dir: &Path) -> Result<SshBuilder, BenchError> {
        for (tool, package) in [
            (SSHD, "openssh-server"),
            ("/usr/bin/ssh-keygen", "openssh-client"),
            ("/usr/bin/ssh", "openssh-client"),
            ("/usr/bin/unshare", "util-linux"),
        ] {
            if !Path::new(tool).exists() {
                return Err(BenchError::MissingTool { tool, package });
            }
        }
        if !rustix::process::geteuid().is_root() {
            return Err(BenchError::NotRoot);
        }
        std::fs::create_dir_all(dir)?;
        let dir = std::path::absolute(dir)?;
        for key in ["host_key", "client_key"] {
            let _ = std::fs::remove_file(dir.join(key));
            succeeded(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", key, "-f"])
                    .arg(dir.join(key)),
            )
            .await?;
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let host_key = std::fs::read_to_string(dir.join("host_key.pub"))?;
        std::fs::write(
            dir.join("known_hosts"),
            format!("{HOST_ALIAS} {}", host_key.trim()),
        )?;
        std::fs::write(dir.join("sshd_config"), sshd_config(&dir, port))?;
        // sshd refuses to start without its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").map_err(|source| BenchError::Doing {
            what: "cannot create /run/sshd".to_owned(),
            source,
        })?;
        let log = std::fs::File::create(dir.join("sshd.log"))?;
        let sshd = Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| BenchError::Doing {
                what: format!("cannot start {SSHD}"),
                source,
            })?;
        let mut builder = SshBuilder { sshd, dir, port };
        builder.wait_listening(Duration::from_secs(15)).await?;
        tracing::info!(port, "private sshd up");
        Ok(builder)
    }

    /// [`SshBuilder::start`] in `dir`, unless `skip`.
    pub async fn start_unless(skip: bool, dir: &Path) -> Result<Option<SshBuilder>, BenchError> {
        match skip {
            true => Ok(None),
            false => SshBuilder::start(dir).await.map(Some),
        }
    }

    async fn wait_listening(&mut self, limit: Duration) -> Result<(), BenchError> {
        let start = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            let log = || std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default();
            if let Some(status) = self.sshd.try_wait()? {
                return Err(BenchError::Sshd {
                    what: format!("exited ({status})"),
                    log: log(),
                });
            }
            if start.elapsed() > limit {
                return Err(BenchError::Sshd {
                    what: format!("did not listen within {limit:?}"),
                    log: log(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where the sshd listens.
    pub fn address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `nix-build FILE` in a private mount namespace with a store of its own (kept in
    /// `<dir>/client`), building nothing itself (`--max-jobs 0`) and everything on this
    /// sshd as an `ssh-ng://` builder of `jobs` jobs, whose sessions run `remote_program`
    /// (percent-encoded as in a store URI; `None`: Nix's default, `nix-daemon`), ssh
    /// connecting through `proxy` (a port on 127.0.0.1 forwarding to this sshd; `None`:
    /// directly).
    pub fn nix_build(
        &self,
        file: &Path,
        jobs: u32,
        remote_program: Option<&str>,
        proxy: Option<u16>,
    ) -> Result<Command, BenchError> {
        let query = remote_program
            .map(|p| format!("?remote-program={p}"))
            .unwrap_or_default();
        let builders = format!(
            "ssh-ng://root@127.0.0.1{query} {} {} {jobs} 1 - - -",
            nixspace_nix_tools::current_system(),
            self.dir.join("client_key").display()
        );
        let mut cmd = self.client("nix-build", proxy)?;
        cmd.arg(file)
            .args(["--no-out-link", "--quiet", "--max-jobs", "0", "--builders"])
            .arg(builders);
        Ok(cmd)
    }

    /// `nix-store --add FILE` into the client's store (see [`SshBuilder::nix_build`]).
    pub fn add_to_client_store(&self, file: &Path) -> Result<Command, BenchError> {
        let mut cmd = self.client("nix-store", None)?;
        cmd.arg("--add").arg(file);
        Ok(cmd)
    }

    /// `nix copy --to ssh-ng://…` of `path` from the client's store (see
    /// [`SshBuilder::nix_build`]) to this sshd's, through `proxy` as there, signatures not
    /// required (the path was added locally, unsigned).
    pub fn nix_copy_to(&self, path: &str, proxy: Option<u16>) -> Result<Command, BenchError> {
        let mut cmd = self.client("nix", proxy)?;
        cmd.args([
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--no-check-sigs",
            "--to",
        ])
        .arg(format!(
            "ssh-ng://root@127.0.0.1?ssh-key={}",
            self.dir.join("client_key").display()
        ))
        .arg(path);
        Ok(cmd)
    }

    /// `program` run in a private mount namespace with the client's store (`<dir>/client`
    /// mounted on `/nix`), its ssh connections to this sshd going through `proxy` (a port on
    /// 127.0.0.1 forwarding to it; `None`: directly).
    fn client(&self, program: &str, proxy: Option<u16>) -> Result<Command, BenchError> {
        let client = self.dir.join("client/nix");
        for sub in ["store", "var/nix/db"] {
            std::fs::create_dir_all(client.join(sub))?;
        }
        let ssh_opts = format!(
            "-p {} -o HostKeyAlias={HOST_ALIAS} -o UserKnownHostsFile={} \
             -o StrictHostKeyChecking=yes -o BatchMode=yes",
            proxy.unwrap_or(self.port),
            self.dir.join("known_hosts").display()
        );
        let mut cmd = Command::new("/usr/bin/unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
            .arg(r#"mount --bind "$0" /nix && exec "$@""#)
            .arg(&client)
            .arg(program)
            .env("NIX_REMOTE", "local")
            .env("NIX_SSHOPTS", ssh_opts);
        Ok(cmd)
    }
}

impl Drop for SshBuilder {
    fn drop(&mut self) {
        kill_group(&self.sshd);
    }
}

/// An sshd configuration for root logins with the generated key only, on 127.0.0.1:`port`.
/// Sessions get `NIX_REMOTE=local` (the remote `nix-daemon --stdio` opens the store itself)
/// and this process's `NIX_CONF_DIR`, so the builder runs with the same Nix settings.
fn sshd_config(dir: &Path, port: u16) -> String {
    let mut env = String::from("NIX_REMOTE=local");
    if let Some(conf) = std::env::var_os("NIX_CONF_DIR") {
        env.push_str(&format!(" \"NIX_CONF_DIR={}\"", Path::new(&conf).display()));
    }
    format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
         PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n\
         MaxStartups 100\nSetEnv {env}\n",
        dir.join("host_key").display(),
        dir.join("authorized_keys").display(),
    )
}
