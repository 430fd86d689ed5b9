//! What Nix's daemon does after it builds a derivation, done here for steps built on
//! workers: sign the outputs with the store's `secret-key-files`, then run the
//! `post-build-hook` (Nix 2.8's `runPostBuildHook`).
//!
//! The settings are the local store's configuration (`nix.conf`, `NIX_CONFIG`) with a
//! trusted client's overrides on top ([`PostBuild::from_settings`]). The hook runs in this
//! process's environment with `DRV_PATH` (the step's `.drv`), `OUT_PATHS` (its output paths,
//! space-separated) and `NIX_CONFIG` (the configuration text plus the overrides, as Nix hands
//! the hook its settings); its standard output and error, merged, come back line by line. A
//! hook that fails fails the step, in Nix's words (`program '…' failed with exit code N`).
//!
//! [`AfterBuild`] is what a build session does with each step as it is built when there is
//! something to do: copy its outputs here (not only the roots'), register the realisations of
//! its content-addressed outputs, sign, run the hook.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nixspace_nix_formats::signature::{fingerprint, sign, KeyError, SignatureError};
use nixspace_nix_formats::store_path::StorePath;
use nixspace_nix_formats::SecretKey;
use nixspace_nix_tools::nix_conf::{NixConf, NixConfError};
use nixspace_nix_tools::{DaemonPool, StepError};
use nixspace_transfer::{FetchError, StoreNode};

use crate::resolve::{RegisterError, Resolver};
use crate::session::missing_here;
use crate::store_db::StoreDb;

/// Why the work after a step's build failed.
#[derive(Debug, thiserror::Error)]
pub enum PostBuildError {
    /// A client's override is not a valid setting.
    #[error("setting '{name}': {source}")]
    Setting {
        /// The setting.
        name: String,
        /// Why it was refused.
        #[source]
        source: NixConfError,
    },
    /// A secret key file could not be read.
    #[error("cannot read secret key file '{path}': {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A secret key file does not hold a key.
    #[error("secret key file '{path}': {source}")]
    Key {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: KeyError,
    },
    /// An output is not valid in the local store, so it cannot be signed.
    #[error("cannot sign '{0}': it is not valid in the local store")]
    NotValid(String),
    /// An output has no fingerprint to sign.
    #[error(transparent)]
    Fingerprint(#[from] SignatureError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StepError),
    /// The hook could not be started or waited for.
    #[error("cannot run program '{program}': {source}")]
    Spawn {
        /// The hook.
        program: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The outputs could not be copied here.
    #[error("cannot copy the outputs to this machine's store: {0}")]
    Copy(#[source] FetchError),
    /// The realisations of the outputs could not be registered here.
    #[error("cannot register the realisations: {0}")]
    Register(#[from] RegisterError),
    /// The hook failed (Nix's `ExecError` words).
    #[error("program '{program}' {status}")]
    Failed {
        /// The hook.
        program: String,
        /// How it ended, as Nix's `statusToString` says it.
        status: String,
    },
}

/// The settings that act after each build: see the module's documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostBuild {
    /// `post-build-hook`: the program run after each built step, if any.
    pub hook: Option<String>,
    /// `secret-key-files`: the keys that sign every built output.
    pub secret_key_files: Vec<PathBuf>,
    /// The configuration text the hook gets as `NIX_CONFIG`.
    pub hook_config: String,
}

impl PostBuild {
    /// The settings of `conf` with `overrides` (a trusted client's `SetOptions` overrides,
    /// by setting name) applied on top.
    pub fn from_settings(
        conf: &NixConf,
        overrides: &BTreeMap<String, String>,
    ) -> Result<PostBuild, PostBuildError> {
        let mut conf = conf.clone();
        let mut hook_config = std::env::var("NIX_CONFIG").unwrap_or_default();
        for (name, value) in overrides {
            let line = format!("{name} = {value}\n");
            conf.apply_text(&line, "the client's settings", Path::new("."))
                .map_err(|source| PostBuildError::Setting {
                    name: name.clone(),
                    source,
                })?;
            if !hook_config.is_empty() && !hook_config.ends_with('\n') {
                hook_config.push('\n');
            }
            hook_config.push_str(&line);
        }
        let hook = conf.value("post-build-hook", "");
        Ok(PostBuild {
            hook: (!hook.is_empty()).then_some(hook),
            secret_key_files: conf
                .list("secret-key-files", &[])
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            hook_config,
        })
    }

    /// Whether there is nothing to do after a build.
    pub fn is_empty(&self) -> bool {
        self.hook.is_none() && self.secret_key_files.is_empty()
    }

    /// Sign `outputs` (valid in the store of `pool`) with every secret key, as Nix signs what
    /// it builds (`AddSignatures`).
    pub(crate) async fn sign(
        &self,
        pool: &DaemonPool,
        outputs: &[StorePath],
    ) -> Result<(), PostBuildError> {
        if self.secret_key_files.is_empty() {
            return Ok(());
        }
        let keys = self
            .secret_key_files
            .iter()
            .map(|path| read_key(path))
            .collect::<Result<Vec<_>, _>>()?;
        let store_dir = pool.store_dir().clone();
        let mut lease = pool.lease().await?;
        for path in outputs {
            let info = match lease.client().query_path_info(path).await {
                Ok(Some(info)) => info,
                Ok(None) => return Err(PostBuildError::NotValid(store_dir.print(path))),
                Err(e) => return Err(lease.failed(e).into()),
            };
            let text = fingerprint(
                &store_dir,
                path,
                &info.nar_hash,
                info.nar_size,
                &info.references,
            )?;
            let sigs: Vec<String> = keys.iter().map(|k| sign(k, &text)).collect();
            if let Err(e) = lease.client().add_signatures(path, &sigs).await {
                return Err(lease.failed(e).into());
            }
        }
        lease.release();
        Ok(())
    }

    /// Run the hook, if there is one, for `drv` built as `outputs` (full paths), handing each
    /// line it prints to `line`.
    pub(crate) async fn run_hook(
        &self,
        drv: &str,
        outputs: &[String],
        line: impl FnMut(String) + Send + 'static,
    ) -> Result<(), PostBuildError> {
        let Some(program) = self.hook.clone() else {
            return Ok(());
        };
        let spawn_error = |source| PostBuildError::Spawn {
            program: program.clone(),
            source,
        };
        let (reader, writer) = std::io::pipe().map_err(spawn_error)?;
        let stderr = writer.try_clone().map_err(spawn_error)?;
        let mut child = tokio::process::Command::new(&program)
            .env("DRV_PATH", drv)
            .env("OUT_PATHS", outputs.join(" ").trim_end())
            .env("NIX_CONFIG", &self.hook_config)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        // The command (and with it our copies of the pipe's writing end) is gone: the reader
        // sees the end once the hook and whatever it started close theirs.
        let lines = tokio::task::spawn_blocking(move || read_lines(reader, line));
        let status = child.wait().await.map_err(spawn_error)?;
        // The reader ends with the pipe; a failed read only loses output.
        let _ = lines.await;
        if status.success() {
            return Ok(());
        }
        Err(PostBuildError::Failed {
            program,
            status: status_words(&status),
        })
    }
}

/// What a build session does after each step is built, when its [`PostBuild`] is not empty.
#[derive(Clone)]
pub(crate) struct AfterBuild {
    /// The settings.
    pub(crate) post_build: std::sync::Arc<PostBuild>,
    /// This machine's store in the dataspace (fetches the outputs).
    pub(crate) store: StoreNode,
    /// Registers content-addressed realisations.
    pub(crate) resolver: Resolver,
    /// The local store.
    pub(crate) pool: DaemonPool,
    /// The local store's database, if readable.
    pub(crate) db: Option<std::sync::Arc<StoreDb>>,
}

impl AfterBuild {
    /// Make `drv`'s `outputs` valid here, with their realisations and signatures, then run the
    /// hook (its lines to `line`).
    pub(crate) async fn run(
        &self,
        drv: &str,
        outputs: &[String],
        line: impl FnMut(String) + Send + 'static,
    ) -> Result<(), PostBuildError> {
        let missing = missing_here(outputs, self.db.as_deref(), &self.pool).await;
        if !missing.is_empty() {
            self.store
                .ensure(&missing)
                .await
                .map_err(PostBuildError::Copy)?;
        }
        self.resolver.register_step(drv).await?;
        let store_dir = self.pool.store_dir();
        let paths: Vec<StorePath> = outputs
            .iter()
            .filter_map(|p| store_dir.parse(p).ok())
            .collect();
        self.post_build.sign(&self.pool, &paths).await?;
        self.post_build.run_hook(drv, outputs, line).await
    }
}

/// Hand each line read from `reader` to `line` (a last line without newline too).
fn read_lines(reader: std::io::PipeReader, mut line: impl FnMut(String)) {
    let mut reader = std::io::BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf);
                line(text.trim_end_matches('\n').to_owned());
            }
        }
    }
}

/// How a process ended, in Nix's `statusToString` words.
fn status_words(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("failed with exit code {code}"),
        (None, Some(signal)) => format!("failed due to signal {signal}"),
        (None, None) => "died abnormally".to_owned(),
    }
}

/// The secret key in the file at `path`.
fn read_key(path: &Path) -> Result<SecretKey, PostBuildError> {
    let text = std::fs::read_to_string(path).map_err(|source| PostBuildError::KeyFile {
        path: path.to_owned(),
        source,
    })?;
    SecretKey::parse(&text).map_err(|source| PostBuildError::Key {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn client_overrides_come_on_top_of_the_configuration() {
        let mut conf = NixConf::default();
        conf.apply_text(
            "post-build-hook = /bin/conf-hook\nsecret-key-files = /k1\n",
            "test",
            Path::new("."),
        )
        .unwrap();
        let none = PostBuild::from_settings(&NixConf::default(), &BTreeMap::new()).unwrap();
        assert!(none.is_empty());
        let from_conf = PostBuild::from_settings(&conf, &BTreeMap::new()).unwrap();
        assert_eq!(from_conf.hook.as_deref(), Some("/bin/conf-hook"));
        assert_eq!(from_conf.secret_key_files, vec![PathBuf::from("/k1")]);
        let overrides = BTreeMap::from([
            ("post-build-hook".to_owned(), "/bin/client-hook".to_owned()),
            ("secret-key-files".to_owned(), "/k2 /k3".to_owned()),
        ]);
        let overridden = PostBuild::from_settings(&conf, &overrides).unwrap();
        assert_eq!(overridden.hook.as_deref(), Some("/bin/client-hook"));
        assert_eq!(
            overridden.secret_key_files,
            vec![PathBuf::from("/k2"), PathBuf::from("/k3")]
        );
        assert!(overridden
            .hook_config
            .contains("post-build-hook = /bin/client-hook\n"));
    }

    #[tokio::test]
    async fn the_hook_sees_the_step_and_its_output_lines_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let hook = dir.path().join("hook");
        std::fs::write(
            &hook,
            "#!/bin/sh\necho \"drv $DRV_PATH\"\necho \"outs $OUT_PATHS\" >&2\nprintf last\n",
        )
        .unwrap();
        let executable =
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
        std::fs::set_permissions(&hook, executable).unwrap();
        let post = PostBuild {
            hook: Some(hook.display().to_string()),
            ..PostBuild::default()
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        post.run_hook(
            "/nix/store/a-x.drv",
            &["/nix/store/b-x".to_owned(), "/nix/store/c-x-dev".to_owned()],
            move |l| sink.lock().unwrap().push(l),
        )
        .await
        .unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                "drv /nix/store/a-x.drv",
                "outs /nix/store/b-x /nix/store/c-x-dev",
                "last"
            ]
        );

        std::fs::write(&hook, "#!/bin/sh\nexit 3\n").unwrap();
        let err = post.run_hook("/nix/store/a-x.drv", &[], |_| {}).await;
        assert_eq!(
            err.unwrap_err().to_string(),
            format!("program '{}' failed with exit code 3", hook.display())
        );
    }
}
