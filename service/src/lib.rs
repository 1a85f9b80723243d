//! provision: configures EC2 instances while an Auto Scaling lifecycle hook holds them, then
//! completes the hook.
//!
//! # Layout
//!
//! One concept a file; data flows top to bottom:
//!
//! - [`event`]: message body -> lifecycle event, skip or reject. Pure.
//! - [`setting`]: config errors with their key, the duration parser, the field reader and
//!   the environment snapshot every section is read with. A leaf.
//! - [`config`]: TOML -> validated [`config::Config`] (layers, steps, queue, ...).
//! - [`layer`]: which layer an event belongs to; `{field}` templates.
//! - [`step`]: the steps a layer runs (`tag`, `ssm`, `opsworks`, `ssh`, `ansible`), one
//!   file each, and the gathering of instances into shared batched calls.
//! - [`ssh`]: reaching an instance over SSH: settings, host keys, known_hosts, reach.
//! - [`poll`]: polling with a growing delay until a deadline.
//! - [`secret`]: the vault password and other secrets; keeping them out of argv, children's
//!   environments and logs.
//! - [`pipeline`]: one event: claim -> steps -> complete hook -> notify.
//! - [`lease`]: heartbeats and message visibility while steps run.
//! - [`daemon`]: the SQS receive loop, in-flight limit, acknowledgement, shutdown.
//! - [`batch`]: micro-batching of delete / release / publish / describe calls.
//! - [`cache`]: single-flight TTL cache for rarely changing AWS descriptions.
//! - [`store`]: SQLite history and the idempotency claim on action tokens.
//! - [`aws`]: narrow traits at the AWS boundary, their SDK impls, retry with backoff.
//! - [`app`]: wiring the real SDK clients into a pipeline for the binary.
//! - [`manual`]: `provision <instance-id>`, the pipeline by hand for one instance.
//! - [`check`]: `provision check`, the config and (with `--aws`) its AWS surroundings.
//! - [`lambda`]: the pipeline as an AWS Lambda function with an SQS trigger.
//! - [`metrics`], [`shutdown`], [`telemetry`], [`notify`]: counters and the metrics
//!   endpoint, signals, logs, systemd readiness and watchdog.

pub mod app;
pub mod aws;
pub mod batch;
pub mod cache;
pub mod check;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod endpoint;
pub mod engine;
pub mod event;
pub mod instance;
pub mod lambda;
pub mod layer;
pub mod lease;
pub mod metrics;
pub mod outcome;
pub mod pipeline;
pub mod poll;
pub mod secret;
pub mod setting;
pub mod shutdown;
pub mod ssh;
pub mod step;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod template;
