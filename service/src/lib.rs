//! provision: configures EC2 instances while an Auto Scaling lifecycle hook holds them, then
//! completes the hook.
//!
//! # Layout
//!
//! One concept a file; data flows top to bottom:
//!
//! - [`event`]: message body -> lifecycle event, skip or reject. Pure.
//! - [`config`]: TOML -> validated [`config::Config`] (layers, steps, queue, ...).
//! - [`layer`]: which layer an event belongs to; `{field}` templates.
//! - [`step`]: the steps a layer runs (`tag`, `ssm`, `opsworks`, `ssh`, `ansible`), one
//!   file each, and the gathering of instances into shared batched calls.
//! - [`remote`]: reaching an instance over SSH: address, readiness, verified host keys.
//! - [`secret`]: the vault password and other secrets; keeping them out of argv, children's
//!   environments and logs.
//! - [`pipeline`]: one event: claim -> steps -> complete hook -> notify.
//! - [`lease`]: heartbeats and message visibility while steps run.
//! - [`daemon`]: the SQS receive loop, in-flight limit, acknowledgement, shutdown.
//! - [`batch`]: micro-batching of delete / release / publish / describe calls.
//! - [`cache`]: single-flight TTL cache for rarely changing AWS descriptions.
//! - [`store`]: SQLite history and the idempotency claim on action tokens;
//!   [`store_schema`]: its tables and their numbered migrations (`PRAGMA user_version`).
//! - [`aws`]: narrow traits at the AWS boundary, their SDK impls, retry with backoff.
//! - [`app`]: wiring the real SDK clients into a pipeline for the binary.
//! - [`manual`]: `provision <instance-id>`, the pipeline by hand for one instance.
//! - [`check`]: `provision check`, the config and (with `--aws`) its AWS surroundings.
//! - [`lambda`]: the pipeline as an AWS Lambda function with an SQS trigger.
//! - [`metrics`], [`shutdown`], [`telemetry`], [`notify`]: counters and the metrics
//!   endpoint, signals, logs, systemd readiness and watchdog.
//! - [`cli`]: the command line's definitions (clap); [`docs`]: the man page and shell
//!   completions generated from them.

pub mod app;
pub mod aws;
pub mod batch;
pub mod cache;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod docs;
pub mod endpoint;
pub mod event;
pub mod lambda;
pub mod layer;
pub mod lease;
pub mod manual;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod remote;
pub mod secret;
pub mod shutdown;
pub mod step;
pub mod store;
pub mod store_schema;
pub mod telemetry;
