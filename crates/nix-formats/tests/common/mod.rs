//! Runs the real Nix (Debian's `nix-bin`, 2.8) against a private store in a
//! temporary directory. Tests fail, never skip, when Nix is missing.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nixspace_nix_formats::StoreDir;

/// A private Nix store and configuration in a temporary directory.
pub struct Nix {
    pub tmp: tempfile::TempDir,
    pub store_dir: StoreDir,
    /// When false, commands use the default `/nix/store` in read-only mode.
    private: bool,
}

impl Nix {
    /// A private store under a fresh temporary directory.
    pub fn private() -> Nix {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = tmp.path().join("s/store");
        nixspace_test_support::write_nix_conf(&tmp.path().join("conf")).unwrap();
        let store_dir = StoreDir::new(store.to_str().unwrap()).unwrap();
        Nix {
            tmp,
            store_dir,
            private: true,
        }
    }

    /// The default store (`/nix/store`), for read-only evaluation only.
    pub fn default_store() -> Nix {
        let mut n = Nix::private();
        n.private = false;
        n.store_dir = StoreDir::default();
        n
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("NIX_CONF_DIR", self.dir().join("conf"))
            .env_remove("NIX_REMOTE")
            .env_remove("NIX_STORE_DIR")
            .env_remove("NIX_PATH")
            .env("HOME", self.dir());
        if self.private {
            let s = self.dir().join("s");
            c.env("NIX_STORE_DIR", s.join("store"))
                .env("NIX_STATE_DIR", s.join("var"))
                .env("NIX_LOG_DIR", s.join("log"))
                .env("NIX_REMOTE", "local");
        }
        c
    }

    /// Runs a Nix program, panicking with its stderr if it fails and with a
    /// clear message if it is not installed.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run '{program}' ({e}): these tests need the real Nix \
                 (Debian: apt-get install nix-bin)"
                )
            });
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs and returns trimmed stdout.
    pub fn stdout(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// Writes a file in the temporary directory and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.dir().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// All `.drv` files in the private store, by base name.
    pub fn drv_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.store_dir.as_str())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "drv"))
            .collect();
        v.sort();
        v
    }
}
