//! Route files: where a dataspace listens and which capability opens it.
//!
//! A route file holds one Syndicate `gatekeeper.Route` in Preserves text, e.g.
//! `<route [<unix "/run/user/0/nixspace/nixspace.sock">] <ref {oid: "worker" sig: #[...]}>>`.
//! It is the standard Syndicate form, so other Syndicate tools can use it too.
//! A host listening on TCP pins its Noise public key with a first step,
//! `<route [… <tcp "host" port>] <noise {key: #[...] service: nixspace}> <ref {…}>>`:
//! the ref is then presented inside the encrypted session. nixspace clients take the
//! `noise` step on TCP transports; on the unix socket (local, owner-only) they present the
//! ref directly (the host accepts both there). Route files without the step still parse.
//! This module parses and prints them; it does not check the signature (only
//! the host can).

use std::fmt;
use std::path::{Path, PathBuf};

use preserves::{NoEmbeddedDomainCodec, TextWriter};
use preserves_schema::{Parse, Unparse};
use syndicate::actor::AnyValue;
use syndicate::schemas::gatekeeper;
use syndicate::schemas::noise;
use syndicate::schemas::sturdy::SturdyRef;
use syndicate::schemas::transport_address;

/// The kinds of capability a nixspace host hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Frontends: assert demands, watch progress.
    Submit,
    /// Workers: assert offers, claim and build steps.
    Worker,
    /// Trusted frontends (the translator of `up` and `daemon`): a submitter that may also
    /// vouch for a derivation a trusted Nix client sent inline (`<inline-derivation …>`).
    Trusted,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 3] = [Role::Submit, Role::Worker, Role::Trusted];

    /// The role's name, used as the sturdy ref's oid and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Role::Submit => "submit",
            Role::Worker => "worker",
            Role::Trusted => "trusted",
        }
    }

    /// The route file for this role inside a runtime directory.
    pub fn route_file(self, dir: &Path) -> PathBuf {
        dir.join(format!("{}.route", self.name()))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A way to reach the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp(String, u16),
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Unix(p) => write!(f, "unix:{}", p.display()),
            Transport::Tcp(h, p) => write!(f, "tcp:{h}:{p}"),
        }
    }
}

/// Failures reading or parsing a route.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The file could not be read.
    #[error("cannot read route file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file could not be written.
    #[error("cannot write route file {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file or its directory could have been written by someone else.
    #[error(transparent)]
    Untrusted(#[from] crate::private_file::CheckError),
    /// The text is not a Preserves value.
    #[error("route is not valid Preserves text: {0}")]
    Syntax(String),
    /// The value is not a `<route [transports…] [<noise {…}>] <ref {…}>>`.
    #[error(
        "route does not have the form <route [transports ...] [<noise {{key: ... service: ...}}>] \
         <ref {{oid: ... sig: ...}}>>: {0}"
    )]
    Shape(String),
    /// A transport that nixspace cannot use.
    #[error("unsupported transport {0}: expected <unix \"path\"> or <tcp \"host\" port>")]
    Transport(String),
}

/// Where to connect and which capability to present.
#[derive(Debug, Clone)]
pub struct Route {
    /// Ways to reach the host, tried in order.
    pub transports: Vec<Transport>,
    /// The capability: a sturdy ref checked by the host's gatekeeper.
    pub sturdy_ref: SturdyRef,
    /// The Noise session that TCP connections open first, pinning the host's public key
    /// (`None`: the ref crosses TCP in clear, for hosts started with `--insecure-tcp`).
    pub noise: Option<noise::NoiseSpec>,
}

/// The signing key file of the worker that joins with `route_file`, beside it
/// (`worker.route` → `worker.key`): the worker signs what it builds with it, so it goes to a
/// worker host with its route file.
pub fn signing_key_beside(route_file: &Path) -> PathBuf {
    route_file.with_extension("key")
}

impl Route {
    /// Parse a route from Preserves text.
    pub fn parse(text: &str) -> Result<Route, RouteError> {
        let value: AnyValue = preserves::read_text(text.trim(), false, &mut NoEmbeddedDomainCodec)
            .map_err(|e| RouteError::Syntax(e.to_string()))?;
        let route = gatekeeper::Route::<std::sync::Arc<syndicate::actor::Cap>>::parse(&value)
            .map_err(|_| RouteError::Shape(short(text)))?;
        let transports = route
            .transports
            .iter()
            .map(parse_transport)
            .collect::<Result<Vec<_>, _>>()?;
        let (noise, step) = match route.path_steps.as_slice() {
            [step] => (None, step),
            [noise_step, step] if noise_step.step_type == "noise" => {
                let noise::NoisePathStepDetail(spec) =
                    noise::NoisePathStepDetail::parse(&noise_step.detail)
                        .map_err(|_| RouteError::Shape(short(text)))?;
                (Some(spec), step)
            }
            steps => {
                return Err(RouteError::Shape(format!(
                    "expected a ref step, after a noise step or alone; found {} steps",
                    steps.len()
                )))
            }
        };
        let sturdy_ref =
            SturdyRef::parse(&step.unparse()).map_err(|_| RouteError::Shape(short(text)))?;
        Ok(Route {
            transports,
            sturdy_ref,
            noise,
        })
    }

    /// Read a route file, refusing one that it or its directory shows someone other than the
    /// reader (or root) could have written ([`crate::private_file::check_trusted`]).
    pub fn read(path: &Path) -> Result<Route, RouteError> {
        let text = std::fs::read_to_string(path).map_err(|source| RouteError::Read {
            path: path.to_owned(),
            source,
        })?;
        crate::private_file::check_trusted(path)?;
        Route::parse(&text)
    }

    /// Write the route to `path`, readable by the owner only (mode 0600).
    pub fn write(&self, path: &Path) -> Result<(), RouteError> {
        crate::private_file::write(path, &format!("{self}\n")).map_err(|source| RouteError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// The same route with other transports (say, one TCP address through a relay).
    pub fn with_transports(&self, transports: Vec<Transport>) -> Route {
        Route {
            transports,
            ..self.clone()
        }
    }

    /// The same route with its TCP transports only (how a worker on another host reaches
    /// the host).
    pub fn tcp_only(&self) -> Route {
        self.with_transports(
            self.transports
                .iter()
                .filter(|t| matches!(t, Transport::Tcp(..)))
                .cloned()
                .collect(),
        )
    }

    /// Whether `other` presents the same capability (the same sturdy ref), compared in a time
    /// that does not depend on where the two differ.
    pub fn same_capability(&self, other: &Route) -> bool {
        let text = |r: &Route| {
            TextWriter::encode(&mut NoEmbeddedDomainCodec, &r.sturdy_ref.unparse())
                .unwrap_or_default()
        };
        let (a, b) = (text(self), text(other));
        !a.is_empty()
            && a.len() == b.len()
            && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
    }

    /// The Syndicate value of this route.
    pub fn to_value(&self) -> AnyValue {
        let noise_step = self.noise.iter().map(|spec| gatekeeper::PathStep {
            step_type: "noise".to_owned(),
            detail: noise::NoisePathStepDetail(spec.clone()).unparse(),
        });
        let ref_step = gatekeeper::PathStep::<std::sync::Arc<syndicate::actor::Cap>>::parse(
            &self.sturdy_ref.unparse(),
        );
        gatekeeper::Route {
            transports: self.transports.iter().map(transport_value).collect(),
            path_steps: noise_step.chain(ref_step).collect(),
        }
        .unparse()
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = TextWriter::encode(&mut NoEmbeddedDomainCodec, &self.to_value())
            .map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

fn short(text: &str) -> String {
    let t = text.trim();
    if t.len() > 80 {
        format!("{}…", &t[..t.floor_char_boundary(80)])
    } else {
        t.to_owned()
    }
}

fn parse_transport(v: &AnyValue) -> Result<Transport, RouteError> {
    if let Ok(u) = transport_address::Unix::parse(v) {
        return Ok(Transport::Unix(PathBuf::from(u.path)));
    }
    if let Ok(t) = transport_address::Tcp::parse(v) {
        if let Ok(port) = u16::try_from(&t.port) {
            return Ok(Transport::Tcp(t.host, port));
        }
    }
    Err(RouteError::Transport(format!("{v:?}")))
}

/// The Syndicate transport address of `t` (`<unix "path">`, `<tcp "host" port>`).
pub(crate) fn transport_value(t: &Transport) -> AnyValue {
    match t {
        Transport::Unix(p) => transport_address::Unix {
            path: p.to_string_lossy().into_owned(),
        }
        .unparse(),
        Transport::Tcp(host, port) => transport_address::Tcp {
            host: host.clone(),
            port: (*port as i64).into(),
        }
        .unparse(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Route {
        Route {
            transports: vec![
                Transport::Unix("/tmp/x/nixspace.sock".into()),
                Transport::Tcp("127.0.0.1".into(), 7001),
            ],
            sturdy_ref: SturdyRef::mint(AnyValue::new("worker"), b"secret key"),
            noise: None,
        }
    }

    #[test]
    fn a_noise_step_round_trips_and_an_old_route_still_parses() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::keys::NoiseKey::load_or_create(&dir.path().join("noise-key")).unwrap();
        let pinned = Route {
            noise: Some(key.spec()),
            ..sample()
        };
        let text = pinned.to_string();
        assert!(text.contains("<noise {"), "{text}");
        assert!(
            text.find("<noise").unwrap() < text.find("<ref").unwrap(),
            "{text}"
        );
        let back = Route::parse(&text).expect("parses");
        assert_eq!(back.noise.map(|n| n.key), Some(key.public().to_vec()));
        assert_eq!(back.sturdy_ref, pinned.sturdy_ref);
        // A route file written before the noise step existed.
        let old = Route::parse(&sample().to_string()).expect("parses");
        assert!(old.noise.is_none());
        let e =
            Route::parse("<route [] <ref {oid: 1 sig: #[]}> <ref {oid: 1 sig: #[]}>>").unwrap_err();
        assert!(matches!(e, RouteError::Shape(_)), "{e}");
    }

    #[test]
    fn the_same_capability_is_the_same_sturdy_ref_whatever_the_transports() {
        let r = sample();
        assert!(r.same_capability(&r.tcp_only()));
        let other = Route {
            sturdy_ref: SturdyRef::mint(AnyValue::new("worker"), b"another key"),
            ..sample()
        };
        assert!(!r.same_capability(&other));
    }

    #[test]
    fn tcp_only_keeps_the_tcp_transports_and_the_rest_of_the_route() {
        let r = sample();
        let tcp = r.tcp_only();
        assert!(tcp
            .transports
            .iter()
            .all(|t| matches!(t, Transport::Tcp(..))));
        assert_eq!(
            tcp.transports.len(),
            r.transports
                .iter()
                .filter(|t| matches!(t, Transport::Tcp(..)))
                .count()
        );
        assert!(!tcp.transports.is_empty());
        assert_eq!(tcp.sturdy_ref, r.sturdy_ref);
        assert_eq!(
            signing_key_beside(Path::new("/run/x/worker-w2.route")),
            Path::new("/run/x/worker-w2.key")
        );
    }

    #[test]
    fn round_trips_through_text() {
        let r = sample();
        let text = r.to_string();
        assert!(text.starts_with("<route ["), "{text}");
        let back = Route::parse(&text).expect("parses");
        assert_eq!(back.transports, r.transports);
        assert_eq!(back.sturdy_ref, r.sturdy_ref);
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        let e = Route::parse("<route").unwrap_err();
        assert!(matches!(e, RouteError::Syntax(_)), "{e}");
        let e = Route::parse("<hello 1 2>").unwrap_err();
        assert!(e.to_string().contains("<route"), "{e}");
        let e = Route::parse("<route [<udp 1>] <ref {oid: 1 sig: #[]}>>").unwrap_err();
        assert!(matches!(e, RouteError::Transport(_)), "{e}");
    }

    #[test]
    fn write_makes_an_owner_only_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.route");
        sample().write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Route::read(&path).unwrap().transports, sample().transports);
    }

    #[test]
    fn a_route_file_others_could_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.route");
        sample().write(&path).unwrap();
        // Positive control: the file as written is read.
        Route::read(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = Route::read(&path).unwrap_err();
        assert!(matches!(e, RouteError::Untrusted(_)), "{e}");
        assert!(e.to_string().contains("mode 0666"), "{e}");
    }
}
