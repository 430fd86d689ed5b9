//! The coordinator as a service, started the same way by `nixspace up` and `nixspace daemon`:
//!
//! - [`hosted`]: a dataspace hosted in this process (sockets, gatekeeper, route files) with its
//!   planner: [`HostedCoordinator::start`] returns once the route files are written, and
//!   dropping it stops serving.
//! - [`external`]: the planner as a client of a dataspace hosted elsewhere (a standalone
//!   syndicate-server), rejoining whenever that dataspace restarts.
//! - [`jobs`]: jobs that outlive their client (`nixspace submit`), kept in the build history
//!   and built by the coordinator itself, across its restarts.

pub mod external;
pub mod hosted;
pub mod jobs;

use std::sync::Arc;

use nixspace_protocol::store;
use syndicate::actor::{Activation, Cap};

/// Assert `<trusted-keys keys>` on `ds` (only the coordinator may: no role's caveat passes
/// it): the public keys every store in the dataspace trusts signatures of, besides its own
/// Nix configuration's.
fn announce_trusted_keys(t: &mut Activation, ds: &Arc<Cap>, keys: &[String]) {
    ds.assert(
        t,
        &store::TrustedKeys {
            keys: keys.to_vec(),
        },
    );
}

pub use external::ExternalPlanner;
pub use hosted::{CoordinatorError, CoordinatorOptions, HostedCoordinator};
pub use jobs::{JobsOptions, DEFAULT_MAX_PENDING_JOBS};
