//! The Nix configuration as Nix 2.8 reads it: `$NIX_CONF_DIR/nix.conf` (default
//! `/etc/nix/nix.conf`) with its `include` and `!include` files, then the `NIX_CONFIG`
//! environment variable, into a map of settings ([`NixConf`]).
//!
//! The syntax is Nix's `applyConfig`: `name = value…` lines (the value's words joined by one
//! space), `#` comments, `include FILE` and `!include FILE` (a missing file is fine) relative
//! to the including file. `extra-NAME = …` appends to `NAME`, on top of whatever value `NAME`
//! has, Nix's default included: so the map keeps appended words apart, and the reader of a
//! setting supplies its default ([`NixConf::value`], [`NixConf::list`]). Old names of the
//! settings nixspace reads are stored under their current names.
//!
//! Settings are not checked against Nix's list (Nix only warns about unknown ones either):
//! this module does not know what a setting means or which values are valid.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How deeply includes may nest before the configuration is taken for a cycle.
const MAX_INCLUDE_DEPTH: usize = 16;

/// Old names of settings, and the names Nix 2.8 stores them under.
const ALIASES: &[(&str, &str)] = &[
    ("binary-caches", "substituters"),
    ("trusted-binary-caches", "trusted-substituters"),
    ("binary-cache-public-keys", "trusted-public-keys"),
];

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NixConfError {
    /// A configuration file exists but cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `name = value` or an include directive.
    #[error("{origin}:{line}: illegal configuration line {text:?}")]
    Syntax {
        /// The file (or `NIX_CONFIG`).
        origin: String,
        /// The line number (from 1).
        line: usize,
        /// The line.
        text: String,
    },
    /// Includes nest too deeply (a cycle, most likely).
    #[error("{0}: includes nest too deeply")]
    TooDeep(String),
}

/// One setting: what `NAME = …` set last (if anything), and what `extra-NAME = …` appended
/// since.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Setting {
    value: Option<String>,
    extra: Vec<String>,
}

/// The settings of a Nix configuration, by (current) name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NixConf {
    settings: BTreeMap<String, Setting>,
}

impl NixConf {
    /// Read `$NIX_CONF_DIR/nix.conf` (default `/etc/nix/nix.conf`; a missing file means no
    /// settings), then `NIX_CONFIG`.
    pub fn load() -> Result<NixConf, NixConfError> {
        let dir = std::env::var_os("NIX_CONF_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/nix"));
        let mut conf = NixConf::default();
        conf.apply_file(&dir.join("nix.conf"), true, 0)?;
        if let Ok(text) = std::env::var("NIX_CONFIG") {
            conf.apply_text(&text, "NIX_CONFIG", Path::new("."))?;
        }
        Ok(conf)
    }

    /// Apply configuration text in `nix.conf` syntax, from `origin` (named in errors);
    /// included files are found relative to `base`.
    pub fn apply_text(
        &mut self,
        text: &str,
        origin: &str,
        base: &Path,
    ) -> Result<(), NixConfError> {
        self.apply_text_at(text, origin, base, 0)
    }

    fn apply_file(
        &mut self,
        path: &Path,
        optional: bool,
        depth: usize,
    ) -> Result<(), NixConfError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(NixConfError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let base = path.parent().unwrap_or(Path::new("/"));
        self.apply_text_at(&text, &path.display().to_string(), base, depth)
    }

    fn apply_text_at(
        &mut self,
        text: &str,
        origin: &str,
        base: &Path,
        depth: usize,
    ) -> Result<(), NixConfError> {
        if depth > MAX_INCLUDE_DEPTH {
            return Err(NixConfError::TooDeep(origin.to_owned()));
        }
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("");
            let tokens: Vec<&str> = line.split_whitespace().collect();
            match tokens.as_slice() {
                [] => {}
                [kw @ ("include" | "!include"), file] => {
                    self.apply_file(&base.join(file), *kw == "!include", depth + 1)?;
                }
                [name, "=", values @ ..] => self.set(name, values.join(" ")),
                _ => {
                    return Err(NixConfError::Syntax {
                        origin: origin.to_owned(),
                        line: n + 1,
                        text: raw.to_owned(),
                    })
                }
            }
        }
        Ok(())
    }

    /// `name = value`, or with `extra-` in front, `value` appended.
    fn set(&mut self, name: &str, value: String) {
        let (name, append) = match name.strip_prefix("extra-") {
            Some(n) => (n, true),
            None => (name, false),
        };
        let name = ALIASES
            .iter()
            .find(|(old, _)| *old == name)
            .map_or(name, |(_, current)| current);
        let setting = self.settings.entry(name.to_owned()).or_default();
        if append {
            setting.extra.push(value);
        } else {
            *setting = Setting {
                value: Some(value),
                extra: Vec::new(),
            };
        }
    }

    /// The value of setting `name`, `default` if the configuration does not set it, with
    /// what `extra-name` appended (separated by a space).
    pub fn value(&self, name: &str, default: &str) -> String {
        let Some(setting) = self.settings.get(name) else {
            return default.to_owned();
        };
        let base = setting.value.as_deref().unwrap_or(default);
        std::iter::once(base)
            .chain(setting.extra.iter().map(String::as_str))
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The words of list setting `name` (`default` if the configuration does not set it), with
    /// what `extra-name` appended.
    pub fn list(&self, name: &str, default: &[String]) -> Vec<String> {
        match self.settings.get(name) {
            None => default.to_vec(),
            Some(setting) => {
                let base: Vec<&str> = match &setting.value {
                    Some(v) => v.split_whitespace().collect(),
                    None => default.iter().map(String::as_str).collect(),
                };
                base.into_iter()
                    .chain(setting.extra.iter().flat_map(|e| e.split_whitespace()))
                    .map(str::to_owned)
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(text: &str) -> NixConf {
        let mut c = NixConf::default();
        c.apply_text(text, "test", Path::new("/nonexistent"))
            .unwrap();
        c
    }

    fn words(ws: &[&str]) -> Vec<String> {
        ws.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn settings_extras_comments_and_aliases() {
        let c = conf(
            "# comment\nallowed-users = carol @wheel # trailing\n\ntrusted-users = @admins\n\
             extra-trusted-users = dave\nsandbox = false\nbinary-caches = http://a\n\
             extra-substituters = http://b\n",
        );
        assert_eq!(c.list("allowed-users", &words(&["*"])), ["carol", "@wheel"]);
        assert_eq!(
            c.list("trusted-users", &words(&["root"])),
            ["@admins", "dave"]
        );
        assert_eq!(c.value("sandbox", "true"), "false");
        assert_eq!(c.list("substituters", &[]), ["http://a", "http://b"]);
        // Unset: the default.
        assert_eq!(c.value("build-users-group", "nixbld"), "nixbld");
        assert_eq!(
            conf("build-users-group =\n").value("build-users-group", "nixbld"),
            ""
        );
        // A later assignment replaces what was appended before.
        let c = conf("extra-trusted-users = a\ntrusted-users = b\n");
        assert_eq!(c.list("trusted-users", &words(&["root"])), ["b"]);
    }

    #[test]
    fn bad_lines_are_reported_with_their_place() {
        let mut c = NixConf::default();
        let e = c
            .apply_text("a = b\nnonsense here\n", "nix.conf", Path::new("/"))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "nix.conf:2: illegal configuration line \"nonsense here\""
        );
    }

    #[test]
    fn includes_are_followed_and_optional_ones_may_be_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("more.conf"), "trusted-users = zed\n").unwrap();
        let mut c = NixConf::default();
        c.apply_text(
            "include more.conf\n!include missing.conf\nextra-allowed-users = x\n",
            "nix.conf",
            dir.path(),
        )
        .unwrap();
        assert_eq!(c.list("trusted-users", &words(&["root"])), ["zed"]);
        assert_eq!(c.list("allowed-users", &words(&["*"])), ["*", "x"]);
        let e = c
            .apply_text("include missing.conf\n", "nix.conf", dir.path())
            .unwrap_err();
        assert!(matches!(e, NixConfError::Read { .. }), "{e}");
        std::fs::write(dir.path().join("loop.conf"), "include loop.conf\n").unwrap();
        let e = c
            .apply_text("include loop.conf\n", "nix.conf", dir.path())
            .unwrap_err();
        assert!(matches!(e, NixConfError::TooDeep(_)), "{e}");
    }
}
