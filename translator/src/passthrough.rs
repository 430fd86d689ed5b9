//! The upstream pass-through: a [`DaemonBackend`] that relays every operation to an upstream
//! `nix-daemon`, field by field, granting the client what `nix-daemon` would.
//!
//! The upstream trusts the translator fully (it is a private `nix-daemon` that trusts its user, or a socket
//! the operator chose), so for an untrusted client the pass-through withholds what
//! `nix-daemon` withholds: signature checks are never skipped and nothing is claimed as built
//! locally; restricted `SetOptions` overrides are dropped with `nix-daemon`'s warning; repairs,
//! permanent roots and build logs are refused; the links of runtime GC roots are hidden.

use nixspace_nix_protocol::framed::{self, FramedSource};
use nixspace_nix_protocol::nar_copy::relay_nar;
use nixspace_nix_protocol::{ClientSettings, DaemonError, NixSerialize, Request, StderrFrame};

use crate::backend::{DaemonBackend, Served};
use crate::client::{not_supported, Client, ClientReader, ClientWriter, ConnError};
use crate::relay::{self, copy_reply, relay_logs, Upload};
use crate::trust::{Trust, TrustConfig};
use crate::upstream::Upstream;

/// Relays a client's operations to its upstream store.
pub struct PassThrough {
    /// The upstream connection, at the client's protocol version.
    pub upstream: Upstream,
    /// Which settings an untrusted client may override.
    trust: TrustConfig,
}

impl PassThrough {
    /// Relay to `upstream`; `trust` says what untrusted clients may set.
    pub fn new(upstream: Upstream, trust: TrustConfig) -> PassThrough {
        PassThrough { upstream, trust }
    }

    /// Send `req` upstream and relay its log frames until `LAST` or `ERROR`, which are
    /// returned, not relayed. `STDERR_READ` is answered from the client when `pull` is set.
    /// The outer error ends the connection; the inner one is the upstream's answer.
    pub async fn call(
        &mut self,
        client: &mut Client,
        req: &Request,
        pull: bool,
    ) -> Result<Result<(), DaemonError>, ConnError> {
        req.write(&mut self.upstream.writer).await?;
        self.upstream.writer.flush().await?;
        let pull = if pull {
            Some((&mut client.reader, &mut self.upstream.writer))
        } else {
            None
        };
        relay_logs(&mut self.upstream.reader, &mut client.writer, pull).await
    }

    /// Relay a store operation: request, any data that follows it, log frames, reply.
    pub async fn relay(&mut self, client: &mut Client, req: Request) -> Served {
        let Some(reply) = relay::reply_of(&req) else {
            let op = req.opcode();
            return client
                .error(&not_supported(&format!("{op:?} ({})", op as u64)))
                .await;
        };
        let outcome = match relay::upload_of(&req, client.reader.version()) {
            None => self.call(client, &req, false).await?,
            Some(Upload::Pulled) => self.call(client, &req, true).await?,
            Some(kind) => {
                req.write(&mut self.upstream.writer).await?;
                self.upstream.writer.flush().await?;
                // The daemon may log while it reads: relay both directions at once.
                let (cr, uw) = (&mut client.reader, &mut self.upstream.writer);
                let copy = async move {
                    if kind == Upload::Nar {
                        relay_nar(cr, uw).await.map(|_| ())?;
                    } else {
                        let mut source = FramedSource::new(cr);
                        framed::write_framed(uw, &mut source).await?;
                    }
                    Ok::<(), ConnError>(())
                };
                let logs = relay_logs(
                    &mut self.upstream.reader,
                    &mut client.writer,
                    None::<(&mut ClientReader, &mut ClientWriter)>,
                );
                let (copied, outcome) = tokio::join!(copy, logs);
                copied?;
                outcome?
            }
        };
        if let Err(e) = outcome {
            return client.error(&e).await;
        }
        StderrFrame::Last.write_to(&mut client.writer).await?;
        let censor = client.trust == Trust::Untrusted;
        copy_reply(reply, &mut self.upstream.reader, &mut client.writer, censor).await?;
        client.writer.flush().await?;
        Ok(())
    }
}

impl DaemonBackend for PassThrough {
    /// An untrusted client's restricted settings are withheld from the upstream, with a
    /// warning each, as `nix-daemon` does.
    async fn set_options(&mut self, client: &mut Client, mut settings: ClientSettings) -> Served {
        if client.trust == Trust::Untrusted {
            let (kept, warnings) = self.trust.filter_overrides(&settings.overrides);
            for w in warnings {
                tracing::debug!(client = client.id, "{w}");
                client.log(format!("warning: {w}\n")).await?;
            }
            settings.overrides = kept;
        }
        self.relay(client, Request::SetOptions(settings)).await
    }

    async fn other(&mut self, client: &mut Client, req: Request) -> Served {
        if client.trust == Trust::Trusted {
            return self.relay(client, req).await;
        }
        match refused_when_untrusted(&req) {
            Some(why) => client.refuse(&req, &DaemonError::new(why)).await,
            None => self.relay(client, restricted(req)).await,
        }
    }
}

/// Why `nix-daemon` refuses `req` from an untrusted client, if it does.
fn refused_when_untrusted(req: &Request) -> Option<&'static str> {
    match req {
        Request::VerifyStore { repair: true, .. } => Some("you are not privileged to repair paths"),
        Request::AddPermRoot { .. } => Some("you are not privileged to create perm roots"),
        Request::AddBuildLog(_) => Some("you are not privileged to add logs"),
        _ => None,
    }
}

/// `req` as an untrusted client may send it upstream: signature checks are never skipped and
/// no path is claimed as built locally (`ultimate`).
fn restricted(req: Request) -> Request {
    match req {
        Request::AddToStoreNar {
            mut info, repair, ..
        } => {
            info.info.ultimate = false;
            Request::AddToStoreNar {
                info,
                repair,
                dont_check_sigs: false,
            }
        }
        Request::AddMultipleToStore { repair, .. } => Request::AddMultipleToStore {
            repair,
            dont_check_sigs: false,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixspace_nix_formats::store_path::StorePath;
    use std::collections::BTreeSet;

    #[test]
    fn untrusted_clients_never_skip_signature_checks() {
        assert_eq!(
            restricted(Request::AddMultipleToStore {
                repair: true,
                dont_check_sigs: true,
            }),
            Request::AddMultipleToStore {
                repair: true,
                dont_check_sigs: false,
            }
        );
        let path = StorePath::from_base_name("7rjj86a15146cq4nsd2q3v4n7ks1hkgn-a").unwrap();
        let info = nixspace_nix_protocol::ValidPathInfo {
            path: path.clone(),
            info: nixspace_nix_protocol::PathInfo {
                deriver: None,
                nar_hash: nixspace_nix_formats::hash::Hash::digest(
                    nixspace_nix_formats::hash::HashAlgo::Sha256,
                    b"nar",
                ),
                references: BTreeSet::new(),
                registration_time: 0,
                nar_size: 3,
                ultimate: true,
                sigs: BTreeSet::new(),
                ca: None,
            },
        };
        let Request::AddToStoreNar {
            info,
            dont_check_sigs,
            ..
        } = restricted(Request::AddToStoreNar {
            info,
            repair: false,
            dont_check_sigs: true,
        })
        else {
            panic!("not an AddToStoreNar");
        };
        assert!(!dont_check_sigs);
        assert!(!info.info.ultimate);
        assert_eq!(
            refused_when_untrusted(&Request::AddBuildLog(path.clone())),
            Some("you are not privileged to add logs")
        );
        assert_eq!(
            refused_when_untrusted(&Request::VerifyStore {
                check_contents: true,
                repair: false,
            }),
            None
        );
        assert_eq!(refused_when_untrusted(&Request::IsValidPath(path)), None);
    }
}
