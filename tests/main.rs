//! The end-to-end tests of nixspace as one test program: real `nixspace` processes, real
//! sockets, the real Nix. One module per subject; `cargo test --test e2e translator::` runs
//! one of them. The harness is `nixspace-test-support` with its `e2e` feature.

mod activities;
mod adversarial;
mod bench;
mod budgets;
mod build_logs;
mod builder;
mod ca;
mod e2e;
mod faults;
mod flow;
mod fuzz_sockets;
mod http_cache;
mod jobs;
mod multihost;
mod nixbuild;
mod noise;
mod outboard;
mod post_build;
mod resources;
mod scaleout;
mod scheduling;
mod security;
mod serve;
mod settings;
mod stores;
mod translator;
mod web;
