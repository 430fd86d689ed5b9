//! A standalone `syndicate-server` as the dataspace, for scale-out: the
//! server's configuration and the route files that open it, written from one
//! key file.
//!
//! [`write`] produces, in a directory:
//! - `keys`: one secret key per capability (mode 0600, kept across runs);
//! - [`CONFIG_FILE`]: a syndicate-server configuration (`syndicate-server -c
//!   FILE`) that listens where asked, creates a dataspace and binds three
//!   sturdy refs to it: [`PLANNER`] (the whole dataspace, for `nixspace up
//!   --external`), and `worker` and `submit`, each attenuated by the same
//!   caveat as the embedded host's ([`crate::policy`]: the role's records and
//!   its confined observations), written in the server's own
//!   `<* $ds [<or [<accept …> … <rewrite ?v …>]>]>` form;
//! - `planner.route`, `worker.route`, `submit.route`: the matching routes,
//!   so workers and frontends join exactly as they join an embedded host.

use std::path::{Path, PathBuf};

use preserves::{NoEmbeddedDomainCodec, TextWriter};
use preserves_schema::Unparse;
use syndicate::actor::AnyValue;

use crate::host::{create_private_dir, HostError};
use crate::keys::{KeyError, Keys};
use crate::policy::{passing, Form, REFUSED_LABEL};
use crate::route::{transport_value, Role, Route, RouteError, Transport};

/// The name (oid) of the unattenuated capability the planner joins with.
pub const PLANNER: &str = "planner";

/// The configuration file's name inside the directory.
pub const CONFIG_FILE: &str = "syndicate-server.pr";

/// The planner's route file inside `dir`.
pub fn planner_route_file(dir: &Path) -> PathBuf {
    dir.join(format!("{PLANNER}.route"))
}

/// Why the configuration could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither a TCP address nor a unix socket was given.
    #[error("give the server an address to listen on (TCP or a unix socket)")]
    NoAddress,
    /// A TCP address with port 0.
    #[error("give {0} a fixed port: route files cannot name a port the server picks")]
    AnyPort(String),
    /// The directory could not be created.
    #[error(transparent)]
    Dir(#[from] HostError),
    /// The key file is unreadable or malformed.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// A route file could not be written.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// The configuration file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A form of the configuration could not be written as text.
    #[error("cannot write the configuration as text")]
    Encode(#[source] std::io::Error),
}

/// What [`write`] wrote.
#[derive(Debug)]
pub struct Written {
    /// The syndicate-server configuration.
    pub config: PathBuf,
    /// The route files: the planner's, then one per [`Role`].
    pub routes: Vec<PathBuf>,
}

/// Write the server configuration, keys and route files for a
/// syndicate-server listening on `listen` into `dir` (created 0700). Keys
/// already in `dir` are kept, so earlier route files stay valid.
pub fn write(dir: &Path, listen: &[Transport]) -> Result<Written, ConfigError> {
    if listen.is_empty() {
        return Err(ConfigError::NoAddress);
    }
    let any_port = listen.iter().find_map(|t| match t {
        Transport::Tcp(host, 0) => Some(host),
        _ => None,
    });
    if let Some(host) = any_port {
        return Err(ConfigError::AnyPort(host.clone()));
    }
    create_private_dir(dir)?;
    let names = [PLANNER, Role::Submit.name(), Role::Worker.name()];
    let keys = Keys::load_with(dir, &names, Role::Trusted.name())?;
    let config = dir.join(CONFIG_FILE);
    write_private(&config, &config_text(listen, &keys)?)?;
    let mut routes = Vec::new();
    let files = [(PLANNER, planner_route_file(dir))]
        .into_iter()
        .chain(Role::ALL.map(|role| (role.name(), role.route_file(dir))));
    for (name, path) in files {
        Route {
            transports: listen.to_vec(),
            sturdy_ref: keys.sturdy_ref(name),
            // The standalone server's Noise binding is not written yet: clear text.
            noise: None,
        }
        .write(&path)?;
        routes.push(path);
    }
    Ok(Written { config, routes })
}

/// The syndicate-server configuration text.
fn config_text(listen: &[Transport], keys: &Keys) -> Result<String, ConfigError> {
    let mut text = String::from(
        "# syndicate-server configuration for nixspace, written by `nixspace server-config`.\n\
         # It holds the capabilities' secret keys: keep it private (mode 0600).\n",
    );
    for transport in listen {
        let listener = record(
            "relay-listener",
            vec![transport_value(transport), sym("$gatekeeper")],
        );
        text += &form(&record("require-service", vec![listener]))?;
    }
    text += "let ?ds = dataspace\n";
    text += "# The planner (`nixspace up --external`): the whole dataspace.\n";
    text += &bind(keys, PLANNER, sym("$ds"))?;
    for role in Role::ALL {
        text += &format!(
            "# The {role} capability: its own records only; the rest becomes \
             <{REFUSED_LABEL} {role} value>.\n"
        );
        text += &bind(keys, role.name(), attenuated_dataspace(role))?;
    }
    Ok(text)
}

/// `<bind <ref {oid key}> target #f>` for `name`.
fn bind(keys: &Keys, name: &str, target: AnyValue) -> Result<String, ConfigError> {
    form(&record(
        "bind",
        vec![
            keys.description(name).unparse(),
            target,
            AnyValue::new(false),
        ],
    ))
}

/// `<* $ds [<or [<accept <label _ …>> … <accept <Observe <group <rec label> _> _>> …
/// <rewrite ?v <nixspace-refused role $v>>]>]>`: the server-side spelling of
/// [`crate::policy::role_caveats`], from the same [`passing`] forms.
fn attenuated_dataspace(role: Role) -> AnyValue {
    let mut alternatives: Vec<AnyValue> = passing(role)
        .iter()
        .map(|form| record("accept", vec![spelled(form)]))
        .collect();
    alternatives.push(record(
        "rewrite",
        vec![
            sym("?v"),
            record(REFUSED_LABEL, vec![sym(role.name()), sym("$v")]),
        ],
    ));
    let or = record("or", vec![AnyValue::new(alternatives)]);
    record("*", vec![sym("$ds"), AnyValue::new(vec![or])])
}

/// A passing form as a pattern of the server's configuration language: `_` for any value,
/// an atom for itself (a symbol such as a record label is a literal there too), records
/// field by field.
fn spelled(form: &Form) -> AnyValue {
    match form {
        Form::Any => sym("_"),
        Form::Literal(value) => value.clone(),
        Form::Record { label, fields } => record(label, fields.iter().map(spelled).collect()),
    }
}

fn sym(s: &str) -> AnyValue {
    AnyValue::symbol(s.to_owned())
}

fn record(label: &str, fields: Vec<AnyValue>) -> AnyValue {
    AnyValue::record(sym(label), fields)
}

/// One top-level form of the configuration, on its own line.
fn form(value: &AnyValue) -> Result<String, ConfigError> {
    let text =
        TextWriter::encode(&mut NoEmbeddedDomainCodec, value).map_err(ConfigError::Encode)?;
    Ok(text + "\n")
}

fn write_private(path: &Path, text: &str) -> Result<(), ConfigError> {
    crate::private_file::write(path, text).map_err(|source| ConfigError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use preserves::{BinarySource, Reader, ValueImpl};
    use preserves_schema::Parse;

    fn written() -> (tempfile::TempDir, Written) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("server");
        let listen = [
            Transport::Tcp("127.0.0.1".into(), 7420),
            Transport::Unix(tmp.path().join("s.sock")),
        ];
        let written = write(&dir, &listen).unwrap();
        (tmp, written)
    }

    #[test]
    fn the_config_is_preserves_text_with_a_listener_per_address_and_a_bind_per_capability() {
        let (_tmp, w) = written();
        let text = std::fs::read_to_string(&w.config).unwrap();
        let forms: Vec<AnyValue> = preserves::BytesBinarySource::new(text.as_bytes())
            .text()
            .read_all(true, &mut NoEmbeddedDomainCodec)
            .expect("the server reads the file as Preserves text");
        let labelled = |label: &str| {
            forms
                .iter()
                .filter(|f| f.is_record() && f.label() == sym(label))
                .count()
        };
        assert_eq!(labelled("require-service"), 2, "{text}");
        assert_eq!(labelled("bind"), 4, "{text}");
        assert!(
            text.contains("<relay-listener <tcp \"127.0.0.1\" 7420> $gatekeeper>"),
            "{text}"
        );
        // Each role's attenuation accepts exactly its vocabulary.
        for role in Role::ALL {
            let line = text
                .lines()
                .find(|l| l.contains(&format!("<{REFUSED_LABEL} {role} $v>")))
                .expect("a bind per role");
            assert_eq!(
                line.matches("<accept ").count(),
                passing(role).len(),
                "{line}"
            );
        }
        assert!(text.contains("<accept <demand _ _ _ _ _ _>>"), "{text}");
        assert!(text.contains("<accept <demands _>>"), "{text}");
        // Observations are confined to record patterns, bound whole or not.
        assert!(
            text.contains("<accept <Observe <group <rec built> _> _>>"),
            "{text}"
        );
        assert!(
            text.contains("<accept <Observe <bind <group <rec built> _>> _>>"),
            "{text}"
        );
        assert!(!text.contains("<accept <Observe _ _>>"), "{text}");
        // The planner gets the whole dataspace: it asserts what no role may (assignments,
        // `demands-refused` for requesters over `up --external --max-demands-per-client`).
        let planner = text
            .lines()
            .find(|l| l.starts_with("<bind") && l.contains(&format!("\"{PLANNER}\"")))
            .expect("the planner's bind");
        assert!(planner.ends_with(" $ds #f>"), "{planner}");
    }

    #[test]
    fn routes_carry_the_keys_and_survive_rewriting() {
        use crate::doorman::check;
        let (tmp, w) = written();
        let dir = tmp.path().join("server");
        assert_eq!(w.routes.len(), 4);
        let keys = Keys::load_or_create(&dir.join("keys"), &[PLANNER, "submit", "worker"])
            .unwrap()
            .ring();
        let before = Route::read(&Role::Worker.route_file(&dir)).unwrap();
        let step =
            syndicate::schemas::gatekeeper::Step::parse(&before.sturdy_ref.unparse()).unwrap();
        assert_eq!(check(&keys, &step).as_deref(), Ok("worker"));
        // Writing again keeps the keys: handed-out routes stay valid.
        write(&dir, &before.transports).unwrap();
        let after = Route::read(&Role::Worker.route_file(&dir)).unwrap();
        assert_eq!(after.sturdy_ref, before.sturdy_ref);
    }

    #[test]
    fn bad_listen_addresses_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let e = write(tmp.path(), &[]).unwrap_err();
        assert!(matches!(e, ConfigError::NoAddress), "{e}");
        let e = write(tmp.path(), &[Transport::Tcp("127.0.0.1".into(), 0)]).unwrap_err();
        assert!(e.to_string().contains("fixed port"), "{e}");
    }
}
