//! What serves a client's operations: the [`DaemonBackend`] trait, one method per operation of
//! the worker protocol.
//!
//! A connection decodes each request and calls the backend's method for it ([`dispatch`]).
//! Each method answers on the wire itself (log frames, `STDERR_LAST` and the reply, or an
//! error frame), so a backend can stream what it relays. Every method's default hands the
//! request to [`DaemonBackend::other`], whose own default answers "operation X is not
//! supported by nixspace" as an error frame: a backend overrides the operations it serves and,
//! if it passes everything else on, `other`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use nixspace_nix_formats::store_path::StorePath;
use nixspace_nix_protocol::{
    BasicDerivation, BuildMode, ClientSettings, DerivedPath, Realisation, Request, ValidPathInfo,
};

use crate::client::{not_supported, Client, ConnError};

/// The result of serving one operation: `Err` ends the connection.
pub type Served = Result<(), ConnError>;

/// Declares the trait's per-operation methods and [`dispatch`] from one table: method name,
/// its arguments, and the request variant they come from (the argument names are the
/// variant's field bindings; a variant without fields is written `Variant {}`).
macro_rules! operations {
    ($( $(#[$doc:meta])* fn $method:ident($($arg:ident: $ty:ty),*) = $variant:ident $fields:tt; )*) => {
        /// Serves a client's operations; see the module's documentation.
        pub trait DaemonBackend: Send {
            /// Every operation whose method is not overridden: by default, an error frame
            /// saying nixspace does not serve it.
            fn other(&mut self, client: &mut Client, req: Request) -> impl Future<Output = Served> + Send {
                async move {
                    let op = req.opcode();
                    client.refuse(&req, &not_supported(&format!("{op:?} ({})", op as u64))).await
                }
            }
            $(
                $(#[$doc])*
                fn $method(&mut self, client: &mut Client, $($arg: $ty),*) -> impl Future<Output = Served> + Send {
                    async move { self.other(client, Request::$variant $fields).await }
                }
            )*
        }

        /// Serve `req` with `backend`'s method for it.
        pub async fn dispatch<B: DaemonBackend>(backend: &mut B, client: &mut Client, req: Request) -> Served {
            match req {
                $( Request::$variant $fields => backend.$method(client, $($arg),*).await, )*
            }
        }
    };
}

operations! {
    /// `SetOptions`: the client's settings for the operations that follow.
    fn set_options(settings: ClientSettings) = SetOptions(settings);
    /// `IsValidPath`.
    fn is_valid_path(path: StorePath) = IsValidPath(path);
    /// `QueryValidPaths`.
    fn query_valid_paths(paths: BTreeSet<StorePath>, substitute: bool) = QueryValidPaths { paths, substitute };
    /// `QueryPathInfo`.
    fn query_path_info(path: StorePath) = QueryPathInfo(path);
    /// `NarFromPath`.
    fn nar_from_path(path: StorePath) = NarFromPath(path);
    /// `AddToStoreNar`: the NAR follows the request.
    fn add_to_store_nar(info: ValidPathInfo, repair: bool, dont_check_sigs: bool) = AddToStoreNar { info, repair, dont_check_sigs };
    /// `AddMultipleToStore`: a framed stream follows the request.
    fn add_multiple_to_store(repair: bool, dont_check_sigs: bool) = AddMultipleToStore { repair, dont_check_sigs };
    /// `BuildDerivation`.
    fn build_derivation(drv_path: StorePath, drv: BasicDerivation, mode: BuildMode) = BuildDerivation { drv_path, drv, mode };
    /// `BuildPaths`.
    fn build_paths(paths: Vec<DerivedPath>, mode: BuildMode) = BuildPaths { paths, mode };
    /// `BuildPathsWithResults`.
    fn build_paths_with_results(paths: Vec<DerivedPath>, mode: BuildMode) = BuildPathsWithResults { paths, mode };
    /// `EnsurePath`.
    fn ensure_path(path: StorePath) = EnsurePath(path);
    /// `AddTempRoot`.
    fn add_temp_root(path: StorePath) = AddTempRoot(path);
    /// `QueryAllValidPaths`.
    fn query_all_valid_paths() = QueryAllValidPaths {};
    /// `AddToStore` (1.25+): the dump follows as a framed stream.
    fn add_to_store(name: String, cam_str: String, references: BTreeSet<StorePath>, repair: bool) = AddToStore { name, cam_str, references, repair };
    /// `AddTextToStore`.
    fn add_text_to_store(suffix: String, text: Vec<u8>, references: BTreeSet<StorePath>) = AddTextToStore { suffix, text, references };
    /// `QueryMissing`.
    fn query_missing(paths: Vec<DerivedPath>) = QueryMissing(paths);
    /// `QueryDerivationOutputMap`.
    fn query_derivation_output_map(path: StorePath) = QueryDerivationOutputMap(path);
    /// `AddIndirectRoot`.
    fn add_indirect_root(link: String) = AddIndirectRoot(link);
    /// `AddPermRoot`.
    fn add_perm_root(path: StorePath, gc_root: String) = AddPermRoot { path, gc_root };
    /// `QueryReferrers`.
    fn query_referrers(path: StorePath) = QueryReferrers(path);
    /// `QueryValidDerivers`.
    fn query_valid_derivers(path: StorePath) = QueryValidDerivers(path);
    /// `QuerySubstitutablePaths`.
    fn query_substitutable_paths(paths: BTreeSet<StorePath>) = QuerySubstitutablePaths(paths);
    /// `QueryPathFromHashPart`.
    fn query_path_from_hash_part(hash_part: String) = QueryPathFromHashPart(hash_part);
    /// `SyncWithGC`.
    fn sync_with_gc() = SyncWithGC {};
    /// `FindRoots`.
    fn find_roots() = FindRoots {};
    /// `OptimiseStore`.
    fn optimise_store() = OptimiseStore {};
    /// `VerifyStore`.
    fn verify_store(check_contents: bool, repair: bool) = VerifyStore { check_contents, repair };
    /// `AddSignatures`.
    fn add_signatures(path: StorePath, sigs: Vec<String>) = AddSignatures { path, sigs };
    /// `QueryRealisation`.
    fn query_realisation(id: String) = QueryRealisation(id);
    /// `RegisterDrvOutput`.
    fn register_drv_output(realisation: Realisation) = RegisterDrvOutput(realisation);
    /// `AddToStore` before 1.25: a NAR follows, unframed.
    fn add_to_store_legacy(name: String, fixed: bool, recursive: bool, hash_algo: String) = AddToStoreLegacy { name, fixed, recursive, hash_algo };
    /// `QuerySubstitutablePathInfo`.
    fn query_substitutable_path_info(path: StorePath) = QuerySubstitutablePathInfo(path);
    /// `QuerySubstitutablePathInfos`.
    fn query_substitutable_path_infos(paths: BTreeMap<StorePath, Option<String>>) = QuerySubstitutablePathInfos(paths);
    /// `CollectGarbage`.
    fn collect_garbage(action: u64, paths_to_delete: BTreeSet<StorePath>, ignore_liveness: bool, max_freed: u64) = CollectGarbage { action, paths_to_delete, ignore_liveness, max_freed };
    /// `AddBuildLog`: the log follows as a framed stream.
    fn add_build_log(drv_path: StorePath) = AddBuildLog(drv_path);
}
