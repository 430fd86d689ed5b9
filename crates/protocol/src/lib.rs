//! The nixspace vocabulary as Rust types.
//!
//! Generated at build time from `schemas/*.prs` (see `build.rs`); each schema
//! file becomes a module of [`schemas`], e.g. `schemas/build.prs` →
//! [`schemas::build`]. Every type parses from and unparses to the Preserves
//! value that travels through the dataspace.

// Generated code: neither documented nor written to the workspace's lints.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod schemas {
    include!(concat!(env!("OUT_DIR"), "/src/schemas/mod.rs"));
}

pub mod expected_outputs;
pub mod ids;
pub mod settings;

pub use ids::{DrvPath, WorkerId};
pub use schemas::{build, store};
pub use settings::{BuildMode, BuildSettings};

use syndicate::actor::{Activation, ActorResult};

/// Inside a `during!` body: run `action` when the matched assertion is
/// retracted.
///
/// A facet with no assertions, children or tasks of its own is *inert* and
/// Syndicate stops it at the end of the turn, which would run `action` at once.
/// This keeps the facet alive until the retraction stops it.
pub fn on_retraction<F>(t: &mut Activation, action: F)
where
    F: 'static + Send + FnOnce(&mut Activation) -> ActorResult,
{
    // The returned disarm function is deliberately dropped unused: the facet
    // stays non-inert until `during!` stops it.
    let _keep_alive = t.prevent_inert_check();
    t.on_stop(action);
}
