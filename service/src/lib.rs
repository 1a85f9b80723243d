//! provision: configures EC2 instances while an Auto Scaling lifecycle hook holds them, then
//! completes the hook.
//!
//! # Layout
//!
//! One concept a file. Read it in the order a message travels:
//!
//! ```text
//! source ──► parse ──► verify ──► route ──► claim ──► steps ──► decide ──► complete ──► record ──► ack
//! daemon     event     pipeline/  layer     pipeline/ pipeline/ pipeline/ pipeline/    pipeline/  delivery
//! lambda               verify               claim     steps     run       complete     record
//! instance             lease: message kept hidden from receive, action heartbeated from its proof
//! ```
//!
//! **Sources** turn their input into work and own its delivery (which queues, in which
//! accounts and regions, is [`sources`]: `[queue]` and `[sources.NAME]`):
//! - [`daemon`]: the SQS receive loop (daemon, and the one-shot worker): listener, one task
//!   per message, drain on shutdown; [`receivers`]: one loop per source, started and
//!   retired by reloads.
//! - [`lambda`]: the same for the records of an SQS-triggered Lambda invocation.
//! - [`instance`]: `provision <instance-id>`: one [`pipeline::Job`] built from what Auto
//!   Scaling says, run by hand.
//! - [`engine`]: the one in-flight engine both message sources use: slots, cancellation at a
//!   deadline, giving up.
//! - [`delivery`]: a received message, holding its lease, and its acknowledgement by outcome
//!   (delete, release, dead-letter).
//!
//! **The message path**, stage by stage. [`pipeline::Pipeline::handle`] parses a message;
//! [`pipeline::Pipeline::run`] works one job as a `Run` whose story (`pipeline/run.rs`)
//! calls the stages in this order, each of which may end it early with an `End`:
//! 1. [`event`]: message body -> lifecycle event, skip or reject. Pure.
//! 2. `pipeline/verify.rs`: Auto Scaling confirms the action (the hook, the phase the
//!    instance waits for) and a heartbeat naming the message's token proves it, before
//!    anything is stored; the hook's own metadata replaces the message's. From here
//!    [`lease`] heartbeats the action and keeps the message hidden.
//! 3. [`layer`]: which layer an event belongs to, and what it runs ([`layer::Layer`]) for
//!    the event's phase ([`event::Phase`]: launch, terminate, and a warm pool's enter,
//!    leave and return).
//! 4. `pipeline/claim.rs`: one run per instance in this process, its history row opened,
//!    and the token claimed under a renewed, fenced lease through [`claims`]: in the
//!    [`store`] for one host (its tables and numbered migrations: [`store_schema`]), in a
//!    DynamoDB table (`aws/dynamo.rs`) for a fleet.
//! 5. `pipeline/steps.rs`: the layer's [`step`]s in order (`tag`, `ssm`, `opsworks`, `ssh`,
//!    `ansible`, `ecs_drain`), each filling its [`template`]s from the event.
//! 6. `pipeline/run.rs`: the decision (CONTINUE, or the layer's failure result) recorded
//!    before completing.
//! 7. `pipeline/complete.rs`: CompleteLifecycleAction, and what its answer means.
//! 8. `pipeline/record.rs`: the history row and the result event (outbox when SNS fails).
//! 9. [`delivery`]: the message deleted or released, as the run's [`outcome`] says.
//!
//! **Beside the path**:
//! - [`outcome`]: the decisions as types (hook result, completion, run and step outcomes).
//! - [`config`] with [`setting`] (config errors with their key, the duration parser, the
//!   field reader, the environment snapshot): TOML -> validated [`config::Config`].
//! - [`ssh`]: reaching an instance: settings, host keys, known_hosts, reach, and the verified
//!   login kept open for the `ansible` step (mux).
//! - [`secret`]: the vault password; keeping secrets out of argv, environments and logs.
//! - [`output`]: a child's output held as head and tail within a budget, the whole of it
//!   streamed to a bounded log ([`output::LogDir`]: `ansible-logs/`, `ssh-logs/`).
//! - [`aws`]: narrow traits at the AWS boundary and their SDK impls.
//! - [`retry`] (the one backoff policy and retry loop), [`batch`] (micro-batched AWS
//!   calls), [`cache`] (single-flight TTL cache), [`poll`] (polling until a deadline),
//!   [`clock`] (wall-clock time for records).
//! - [`app`]: the real SDK clients wired into a pipeline for the binary.
//! - [`check`]: `provision check`, the config and (with `--aws`) its AWS surroundings.
//! - [`cli`]: the command line's definitions (clap); [`docs`]: the man page and shell
//!   completions generated from them.
//! - [`metrics`] and [`endpoint`] (counters, /metrics and /healthz), [`systemd`] (readiness
//!   and watchdog), [`shutdown`] (signals), [`reload`] (SIGHUP: new layers for runs that
//!   start afterwards), [`telemetry`] (logs).
//!
//! No module imports one that imports it back: `scripts/check-modules` (part of
//! `scripts/test`) fails on any import cycle among these modules.

pub(crate) mod action_key;
pub mod app;
pub(crate) mod aws;
pub(crate) mod batch;
pub(crate) mod cache;
pub mod check;
pub(crate) mod claims;
pub mod cli;
pub(crate) mod clock;
pub mod config;
pub mod daemon;
pub(crate) mod delivery;
pub mod docs;
pub mod endpoint;
pub(crate) mod engine;
pub mod event;
pub mod instance;
pub mod lambda;
pub(crate) mod layer;
pub(crate) mod lease;
pub mod metrics;
pub(crate) mod outcome;
pub(crate) mod output;
pub mod pipeline;
pub(crate) mod poll;
pub mod receivers;
pub mod reconcile;
pub mod reload;
pub(crate) mod retry;
pub mod secret;
pub(crate) mod setting;
pub mod shutdown;
pub mod sources;
pub(crate) mod ssh;
pub mod step;
pub mod store;
pub(crate) mod store_schema;
pub mod systemd;
pub mod telemetry;
pub(crate) mod template;
