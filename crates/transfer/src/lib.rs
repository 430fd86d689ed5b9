//! Store paths moving between the Nix stores of a dataspace's participants.
//!
//! Every participant with a store (a worker, a frontend) runs a [`StoreNode`]:
//! - it *serves* its store: for each `<want path store>` of somebody else whose path it has,
//!   it asserts `<available path me info>` while the want lasts, and it streams the NAR of a
//!   path to whoever asserts `<nar-request path me sink>`;
//! - it *fetches* what it lacks ([`StoreNode::ensure`]): it asserts `<want path me>`, picks a
//!   store that answered, collects the path-infos of the path's missing closure first
//!   (iteratively, within [`ClosureLimits`], refusing claimed reference cycles), adds the
//!   paths in dependency order, each NAR streamed into its own store with `AddToStoreNar`,
//!   checking size and hash on the way (the daemon checks the hash again and registers nothing
//!   that does not match). A path is added only if one of its signatures is by a key this store
//!   trusts, or its content address gives its path (then the daemon checks the content against
//!   it), as Nix trusts paths. A path wanted by several steps at once is fetched once.

pub mod binary_cache;
mod closure;
pub mod dataspace_store;
pub mod http_cache;
mod inflight;
pub mod nar_stream;
mod node;
mod path_info;
mod realisations;
pub mod source;
mod trust;
mod vouch;

pub use closure::{ClosureLimits, ClosureTooLarge};
pub use node::{CopyError, FetchError, StoreNode, Timeouts, WANT_PATIENCE};
pub use path_info::PathInfoError;
pub use source::SourceError;
pub use trust::{Untrusted, MAX_ANNOUNCED_KEYS};
pub use vouch::{Vouch, VouchError, MAX_VOUCHED_PATHS};
