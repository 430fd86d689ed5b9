//! Relaying one proxied operation: what follows the request from the client ([`Upload`]), the
//! log frames from the upstream, and the reply, copied field by field ([`Reply`]).

use nixspace_nix_protocol::stderr::DaemonError;
use nixspace_nix_protocol::version::{ADD_TO_STORE_NAR_FRAMED, QUERY_PATH_INFO_VALID_FLAG};
use nixspace_nix_protocol::{
    NixDeserialize, NixReader, NixSerialize, NixWriter, PathInfo, ProtocolVersion, Request,
    StderrFrame, ValidPathInfo, WireError,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::client::ConnError;

/// Data the client sends after a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// A framed stream.
    Framed,
    /// One NAR, unframed.
    Nar,
    /// Pulled by the daemon with `STDERR_READ` frames (`AddToStoreNar` before 1.23).
    Pulled,
}

/// What follows `req` from the client, at protocol `version`.
pub fn upload_of(req: &Request, version: ProtocolVersion) -> Option<Upload> {
    match req {
        Request::AddToStore { .. }
        | Request::AddMultipleToStore { .. }
        | Request::AddBuildLog(_) => Some(Upload::Framed),
        Request::AddToStoreLegacy { .. } => Some(Upload::Nar),
        Request::AddToStoreNar { .. } if version >= ADD_TO_STORE_NAR_FRAMED => Some(Upload::Framed),
        Request::AddToStoreNar { .. } => Some(Upload::Pulled),
        _ => None,
    }
}

/// The shape of an operation's reply after `STDERR_LAST`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Nothing.
    Nothing,
    /// One number (or boolean).
    Number,
    /// One string (a path).
    Text,
    /// A list of strings (paths).
    List,
    /// A list of string pairs (a map).
    Pairs,
    /// `FindRoots`: pairs of a root's link and its target (links of processes are censored for
    /// untrusted clients, as `nix-daemon` does).
    Roots,
    /// `QueryMissing`: three path lists and two sizes.
    Missing,
    /// `QueryPathInfo`: a validity flag (from 1.17) and a path info.
    PathInfo,
    /// A path with its info.
    ValidPathInfo,
    /// A NAR.
    Nar,
    /// `QuerySubstitutablePathInfo`: a flag and, if set, one substitutable info.
    SubstitutableInfo,
    /// `QuerySubstitutablePathInfos`: a list of paths with their substitutable infos.
    SubstitutableInfos,
    /// `CollectGarbage`: the paths deleted, the bytes freed and an obsolete number.
    GcResults,
}

/// The reply shape of a request the translator proxies; `None` for the build operations,
/// which it never proxies.
pub fn reply_of(req: &Request) -> Option<Reply> {
    Some(match req {
        Request::SetOptions(_)
        | Request::AddToStoreNar { .. }
        | Request::AddMultipleToStore { .. }
        | Request::RegisterDrvOutput(_) => Reply::Nothing,
        Request::IsValidPath(_)
        | Request::AddTempRoot(_)
        | Request::AddIndirectRoot(_)
        | Request::EnsurePath(_)
        | Request::SyncWithGC
        | Request::OptimiseStore
        | Request::VerifyStore { .. }
        | Request::AddSignatures { .. }
        | Request::AddBuildLog(_) => Reply::Number,
        Request::AddTextToStore { .. }
        | Request::AddToStoreLegacy { .. }
        | Request::QueryPathFromHashPart(_)
        | Request::AddPermRoot { .. } => Reply::Text,
        Request::QueryValidPaths { .. }
        | Request::QueryReferrers(_)
        | Request::QueryValidDerivers(_)
        | Request::QuerySubstitutablePaths(_)
        | Request::QueryAllValidPaths
        | Request::QueryRealisation(_) => Reply::List,
        Request::QueryDerivationOutputMap(_) => Reply::Pairs,
        Request::FindRoots => Reply::Roots,
        Request::QueryMissing(_) => Reply::Missing,
        Request::QueryPathInfo(_) => Reply::PathInfo,
        Request::AddToStore { .. } => Reply::ValidPathInfo,
        Request::NarFromPath(_) => Reply::Nar,
        Request::QuerySubstitutablePathInfo(_) => Reply::SubstitutableInfo,
        Request::QuerySubstitutablePathInfos(_) => Reply::SubstitutableInfos,
        Request::CollectGarbage { .. } => Reply::GcResults,
        Request::BuildPaths { .. }
        | Request::BuildPathsWithResults { .. }
        | Request::BuildDerivation { .. } => return None,
    })
}

/// Copy a reply of shape `reply` from the upstream `r` to the client `w`. `censor` hides the
/// links of runtime GC roots (for untrusted clients).
pub async fn copy_reply<R, W>(
    reply: Reply,
    r: &mut NixReader<R>,
    w: &mut NixWriter<W>,
    censor: bool,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    match reply {
        Reply::Nothing => {}
        Reply::Number => copy_u64(r, w).await?,
        Reply::Text => copy_bytes(r, w).await?,
        Reply::List => copy_list(r, w).await?,
        Reply::Pairs => copy_pairs(r, w, false).await?,
        Reply::Roots => copy_pairs(r, w, censor).await?,
        Reply::Missing => {
            for _ in 0..3 {
                copy_list(r, w).await?;
            }
            copy_u64(r, w).await?;
            copy_u64(r, w).await?;
        }
        Reply::PathInfo => {
            let valid = if r.version() >= QUERY_PATH_INFO_VALID_FLAG {
                let valid = r.read_bool("QueryPathInfo valid").await?;
                w.write_bool(valid, "QueryPathInfo valid").await?;
                valid
            } else {
                true
            };
            if valid {
                let info = PathInfo::read_from(r).await?;
                info.write_to(w).await?;
            }
        }
        Reply::ValidPathInfo => {
            let info = ValidPathInfo::read_from(r).await?;
            info.write_to(w).await?;
        }
        Reply::Nar => {
            nixspace_nix_protocol::nar_copy::relay_nar(r, w).await?;
        }
        Reply::SubstitutableInfo => {
            if r.read_bool("substitutable").await? {
                w.write_bool(true, "substitutable").await?;
                copy_substitutable(r, w).await?;
            } else {
                w.write_bool(false, "substitutable").await?;
            }
        }
        Reply::SubstitutableInfos => {
            let n = r.read_count("substitutable infos").await?;
            w.write_u64(n, "substitutable infos").await?;
            for _ in 0..n {
                copy_bytes(r, w).await?;
                copy_substitutable(r, w).await?;
            }
        }
        Reply::GcResults => {
            copy_list(r, w).await?;
            copy_u64(r, w).await?;
            copy_u64(r, w).await?;
        }
    }
    Ok(())
}

/// One substitutable info: deriver, references, download size, NAR size.
async fn copy_substitutable<R, W>(
    r: &mut NixReader<R>,
    w: &mut NixWriter<W>,
) -> Result<(), WireError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    copy_bytes(r, w).await?;
    copy_list(r, w).await?;
    copy_u64(r, w).await?;
    copy_u64(r, w).await
}

/// Relay log frames from the upstream to the client until `LAST` or `ERROR` (returned, not
/// relayed). `STDERR_READ` is passed to the client and its answer back upstream when `pull`
/// holds the client's reader and the upstream's writer.
pub async fn relay_logs<R, W, CR, UW>(
    up: &mut NixReader<R>,
    client: &mut NixWriter<W>,
    mut pull: Option<(&mut NixReader<CR>, &mut NixWriter<UW>)>,
) -> Result<Result<(), DaemonError>, ConnError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    CR: AsyncRead + Unpin + Send,
    UW: AsyncWrite + Unpin + Send,
{
    loop {
        match StderrFrame::read_from(up).await? {
            StderrFrame::Last => return Ok(Ok(())),
            StderrFrame::Error(e) => return Ok(Err(e)),
            StderrFrame::Read(n) => {
                let Some((cr, uw)) = pull.as_mut() else {
                    return Err(WireError::UnexpectedStderrFrame { tag: "STDERR_READ" }.into());
                };
                StderrFrame::Read(n).write_to(client).await?;
                client.flush().await?;
                let data = cr.read_bytes("STDERR_READ answer").await?;
                uw.write_bytes(&data, "STDERR_READ answer").await?;
                uw.flush().await?;
            }
            frame => {
                frame.write_to(client).await?;
                client.flush().await?;
            }
        }
    }
}

async fn copy_u64<R, W>(r: &mut NixReader<R>, w: &mut NixWriter<W>) -> Result<(), WireError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let v = r.read_u64("reply").await?;
    w.write_u64(v, "reply").await
}

async fn copy_bytes<R, W>(r: &mut NixReader<R>, w: &mut NixWriter<W>) -> Result<(), WireError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let v = r.read_bytes("reply").await?;
    w.write_bytes(&v, "reply").await
}

async fn copy_list<R, W>(r: &mut NixReader<R>, w: &mut NixWriter<W>) -> Result<(), WireError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let n = r.read_count("reply list").await?;
    w.write_u64(n, "reply list").await?;
    for _ in 0..n {
        copy_bytes(r, w).await?;
    }
    Ok(())
}

/// What an untrusted client sees of a GC root's link: the links of running processes and
/// temporary roots are hidden, as `nix-daemon` hides them.
fn censored(link: Vec<u8>) -> Vec<u8> {
    if link.starts_with(b"{") || link.starts_with(b"/proc/") {
        b"{censored}".to_vec()
    } else {
        link
    }
}

async fn copy_pairs<R, W>(
    r: &mut NixReader<R>,
    w: &mut NixWriter<W>,
    censor: bool,
) -> Result<(), WireError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let n = r.read_count("reply map").await?;
    w.write_u64(n, "reply map").await?;
    for _ in 0..n {
        let key = r.read_bytes("reply").await?;
        let key = if censor { censored(key) } else { key };
        w.write_bytes(&key, "reply").await?;
        copy_bytes(r, w).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_roots_are_censored() {
        assert_eq!(censored(b"/proc/12/maps".to_vec()), b"{censored}");
        assert_eq!(censored(b"{temp:12}".to_vec()), b"{censored}");
        assert_eq!(
            censored(b"/nix/var/nix/gcroots/auto/x".to_vec()),
            b"/nix/var/nix/gcroots/auto/x"
        );
    }

    #[test]
    fn build_operations_are_never_proxied() {
        let req = Request::BuildPaths {
            paths: Vec::new(),
            mode: nixspace_nix_protocol::BuildMode::Normal,
        };
        assert_eq!(reply_of(&req), None);
        assert_eq!(reply_of(&Request::FindRoots), Some(Reply::Roots));
    }
}
