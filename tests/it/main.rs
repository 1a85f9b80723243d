//! The integration tests: one binary, one module per suite (see tests/README.md), so the AWS
//! SDK and the rest of the dependency tree are linked once.

// A test reads as one story, setup to assertions: long is allowed here (not in service/src).
#![allow(clippy::too_many_lines)]

mod common;

mod chaos;
mod demo;
mod ecs;
mod emulator;
mod events;
mod fleet;
mod hosts;
mod lambda;
mod monitoring;
mod reconcile;
mod sources;
mod ssh_steps;
mod ssm_opsworks;
mod timeouts;
mod trust;
mod warm_pools;
