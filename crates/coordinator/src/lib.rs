//! The coordinator as a service, started the same way by `nixspace up` and `nixspace daemon`:
//!
//! - [`hosted`]: a dataspace hosted in this process (sockets, gatekeeper, route files) with its
//!   planner: [`HostedCoordinator::start`] returns once the route files are written, and
//!   dropping it stops serving.
//! - [`external`]: the planner as a client of a dataspace hosted elsewhere (a standalone
//!   syndicate-server), rejoining whenever that dataspace restarts.

pub mod external;
pub mod hosted;

pub use external::ExternalPlanner;
pub use hosted::{CoordinatorError, CoordinatorOptions, HostedCoordinator};
