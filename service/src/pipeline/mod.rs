//! One lifecycle action, start to finish.
//!
//! Owns the order of things and the rules that make at-least-once delivery safe: nothing is
//! stored or run for a message before its token is proven; a token that completed is
//! acknowledged without work; the same token arriving twice at once is worked once; the
//! hook is completed on its own, uncancelled path. [`Pipeline`] holds what
//! runs share (clients, caches, the store, the claims); each action is one [`run::Run`], a
//! value that owns its job, lease, cancellation and report, and tells its story in
//! `run.rs`. Every way a run stops early is an [`run::End`], turned into the record in one
//! place. The answer is an [`Outcome`]; what then happens to the message (deleted,
//! released) is the delivery's business ([`crate::delivery`]), and receiving messages is the
//! sources' (daemon, Lambda, manual run). The files, in the order a run meets them:
//!
//! - `run.rs`: the story of one run, and its ends;
//! - `verify.rs`: Auto Scaling's word on the action and the proof of its token (its caches,
//!   retries and junk budget), and the hook's own metadata;
//! - `claim.rs`: one run per instance in this process, the token claimed in the claim
//!   store, the claim's lease kept (and fenced) while the run holds it;
//! - `steps.rs`: the layer's steps in order, with progress for a person watching;
//! - `complete.rs`: completing the action, and what the answer means;
//! - `record.rs`: the run's report, its history rows and its result event.

mod chat;
mod claim;
mod complete;
mod interrupt;
mod meet;
mod record;
mod run;
mod steps;
mod verify;

use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::{field, info, info_span, warn, Instrument};

use crate::aws::{Action, Hooks, Services};
use crate::batch::Batcher;
use crate::claims::{Claim, ClaimError, Claims};
use crate::config::Config;
use crate::delivery::Delivery;
use crate::event::{self, LifecycleEvent, Parsed};
use crate::layer::Layer;
use crate::lease::{Lease, Leases};
use crate::metrics::Stats;
use crate::outcome::Outcome;
use crate::step::Shared;
use crate::store::Store;
use crate::template::Context;

pub use meet::{decommissioned_key, CONFIGURED_TAG};
pub use record::{printable, RunReport, StepReport};
pub use steps::Progress;

use claim::Working;
use run::Run;
use verify::Verifier;

/// Whether Auto Scaling must confirm a job's event before anything runs for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// From a message, which anyone allowed to send to the queue can write: confirmed, and
    /// the hook's metadata replaces the message's.
    Verify,
    /// Read from Auto Scaling just now (a manual run): nothing to confirm.
    FromAutoScaling,
}

/// What a job does with its lifecycle action once the steps are over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Complete it: CONTINUE, or the layer's failure result.
    Complete,
    /// Leave it waiting as it is (`provision <id> --no-complete`).
    Leave,
}

/// One lifecycle event to work, and how to treat its action.
#[derive(Debug, Clone)]
pub struct Job {
    pub event: LifecycleEvent,
    /// The message it came in; None for a manual run.
    pub message_id: Option<String>,
    /// A layer forced by name instead of routing (`provision <id> --layer`).
    pub layer: Option<String>,
    /// The lifecycle action to heartbeat while the steps run; None when no action is
    /// pending (a manual run on an instance that is not waiting).
    pub action: Option<Action>,
    pub finish: Finish,
    /// Step progress, for a person watching.
    pub progress: Option<UnboundedSender<Progress>>,
    pub trust: Trust,
    /// The instance no longer exists (the reconciler found it gone without its terminate
    /// run): only steps that act through AWS without it run ([`crate::step::Step::acts_without_instance`]).
    pub instance_gone: bool,
    /// Run the layer's `interrupt` list (EC2 warned of a Spot interruption) instead of the
    /// event's phase's.
    pub interrupt: bool,
}

impl Job {
    /// What a queued message asks for: its action, by token, heartbeated and completed.
    pub fn from_message(event: LifecycleEvent, message_id: &str) -> Job {
        let action = Action {
            group: event.group.clone(),
            hook: event.hook.clone(),
            instance_id: event.instance_id.clone(),
            token: Some(event.token.clone()),
        };
        Job {
            event,
            message_id: Some(message_id.to_string()),
            layer: None,
            action: Some(action),
            finish: Finish::Complete,
            progress: None,
            trust: Trust::Verify,
            instance_gone: false,
            interrupt: false,
        }
    }

    /// The action this run completes, if it completes one.
    fn completing(&self) -> Option<&Action> {
        self.action
            .as_ref()
            .filter(|_| self.finish == Finish::Complete)
    }
}

/// A layer of the config a run started under: the run keeps that config (and so its
/// layer) alive until it ends, whatever a reload puts in place meanwhile.
#[derive(Clone)]
pub struct LayerRef {
    cfg: Arc<Config>,
    idx: usize,
}

impl std::ops::Deref for LayerRef {
    type Target = Layer;
    fn deref(&self) -> &Layer {
        &self.cfg.layers[self.idx]
    }
}

/// What every run shares: clients, caches, the store and the claims.
pub struct Pipeline {
    cfg: Arc<Config>,
    /// The config runs start under: `cfg` until a reload (SIGHUP) replaces it. Only its
    /// layers differ from `cfg` (reload.rs refuses any other change).
    live: std::sync::RwLock<Arc<Config>>,
    hooks: Arc<dyn Hooks>,
    services: Services,
    shared: Shared,
    store: Store,
    claims: Arc<dyn Claims>,
    leases: Leases,
    publisher: Option<Batcher<String>>,
    /// Finished runs for the fleet's history table (`state.history_table`).
    fleet_history: Option<Batcher<String>>,
    verifier: Verifier,
    working: Working,
    /// Action keys worked by this process's runs (`action_key`, `meet.rs`).
    actions: Arc<crate::action_key::Local>,
    owner: String,
    host: String,
    /// The account and region of the source whose messages this pipeline works, which its
    /// result events and fleet history name; None (pipelines of unit tests): the message's
    /// own account only.
    scope: Option<crate::sources::Scope>,
    source_name: String,
    pub stats: Arc<Stats>,
}

pub struct Parts {
    pub cfg: Arc<Config>,
    pub hooks: Arc<dyn Hooks>,
    pub services: Services,
    pub store: Store,
    /// Where claims live when not in `store` (a DynamoDB table shared by a fleet).
    pub claims: Option<Arc<dyn Claims>>,
    pub leases: Leases,
    pub publisher: Option<Batcher<String>>,
    pub stats: Arc<Stats>,
    /// SSH reach and the Ansible runner, when the config has SSH steps.
    pub remote: Option<Arc<crate::ssh::Remote>>,
    pub ansible: Option<Arc<crate::step::ansible::Runner>>,
}

impl Pipeline {
    pub fn new(p: Parts) -> Pipeline {
        let host = crate::claims::hostname().to_string();
        let shared = Shared::new(
            &p.services,
            p.cfg.ssm.batch_window,
            p.cfg.aws.retry_for,
            p.remote,
            p.ansible,
        );
        Pipeline {
            verifier: Verifier::new(p.hooks.clone(), p.cfg.aws.retry_for),
            live: std::sync::RwLock::new(p.cfg.clone()),
            cfg: p.cfg,
            hooks: p.hooks,
            shared,
            services: p.services,
            claims: p.claims.unwrap_or_else(|| Arc::new(p.store.clone())),
            store: p.store,
            leases: p.leases,
            publisher: p.publisher,
            fleet_history: None,
            working: Working::default(),
            actions: Arc::default(),
            owner: crate::claims::owner_id(&host),
            host,
            scope: None,
            source_name: crate::sources::DEFAULT_SOURCE.to_string(),
            stats: p.stats,
        }
    }

    /// Finished runs also go to the fleet's history table through `batcher`.
    pub fn with_fleet_history(mut self, batcher: Option<Batcher<String>>) -> Pipeline {
        self.fleet_history = batcher;
        self
    }

    /// Runs of the source `name` name `scope`'s account and region in their result events
    /// and history rows.
    pub fn with_scope(mut self, name: &str, scope: Option<crate::sources::Scope>) -> Pipeline {
        self.source_name = name.to_string();
        self.scope = scope;
        self
    }

    pub fn scope(&self) -> Option<&crate::sources::Scope> {
        self.scope.as_ref()
    }

    /// The name of the source whose messages this pipeline works (`queue` for `[queue]`'s,
    /// and for pipelines built without sources).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// The task writing the configured tags, to await once the pipeline is dropped.
    pub fn take_mark_task(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.shared.mark_task.lock().unwrap().take()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn hooks(&self) -> &Arc<dyn Hooks> {
        &self.hooks
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn leases(&self) -> &Leases {
        &self.leases
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Who works the action `key` names now (`action_key`): a run of this process, or
    /// another owner holding its claim; None when nobody does.
    pub async fn working_on(&self, key: &str) -> Result<Option<String>, ClaimError> {
        if self.actions.busy(key) {
            return Ok(Some(format!("{} (this process)", self.host)));
        }
        Ok(match self.claims.peek(key, &self.owner).await? {
            Claim::Held { owner, .. } => Some(owner),
            _ => None,
        })
    }

    /// What the claim store holds for `key`, without writing.
    pub async fn peek_claim(&self, key: &str) -> Result<Claim, ClaimError> {
        self.claims.peek(key, &self.owner).await
    }

    /// Publishes an event of the process's own (not a run's result) to the result topic,
    /// when one is configured.
    pub async fn publish(&self, body: String) {
        if let Some(publisher) = &self.publisher {
            if let Err(e) = publisher.submit(body).await {
                warn!(error = %e, "could not publish an event to the result topic");
            }
        }
    }

    /// One line per step, templates filled in for this event (`--dry-run`).
    pub fn preview(&self, ev: &LifecycleEvent, layer: &Layer) -> Vec<String> {
        let ctx = Context::new(ev, &layer.name, &layer.vars);
        layer
            .steps(ev.phase())
            .iter()
            .map(|s| s.preview(&ctx))
            .collect()
    }

    /// The config runs start under now (the latest reload's).
    pub fn live_config(&self) -> Arc<Config> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs that start from now on use `cfg`'s layers; runs in flight keep theirs.
    pub fn replace_config(&self, cfg: Arc<Config>) {
        *self.live.write().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    /// The first layer whose matcher accepts the event.
    pub fn route(&self, event: &LifecycleEvent) -> Option<LayerRef> {
        let cfg = self.live_config();
        let idx = crate::layer::route(&cfg.layers, event)?;
        Some(LayerRef { cfg, idx })
    }

    /// The layer named `name` in the config runs start under now.
    pub fn layer_named(&self, name: &str) -> Option<LayerRef> {
        let cfg = self.live_config();
        let idx = cfg.layers.iter().position(|l| l.name == name)?;
        Some(LayerRef { cfg, idx })
    }

    /// Whether some layer could take the job: it names one, or a layer's groups match its
    /// group's name. The cheap check before anything is asked of AWS for a message (the
    /// metadata a layer may also match is the hook's, known only once verified).
    fn could_route(&self, job: &Job) -> bool {
        job.layer.is_some()
            || self
                .live_config()
                .layers
                .iter()
                .any(|l| l.matcher.groups.iter().any(|g| g.matches(&job.event.group)))
    }

    /// The layer a job runs: the one it names, else the one its event routes to.
    fn layer_for(&self, job: &Job) -> Option<LayerRef> {
        match &job.layer {
            Some(name) => self.layer_named(name),
            None => self.route(&job.event),
        }
    }

    /// Handles one received message: parsed, then run when it is a lifecycle event.
    /// `cancel` fires when its source stops waiting (end of the shutdown grace, the Lambda
    /// deadline): unfinished work is then abandoned, and the outcome says the message
    /// should go back.
    pub async fn handle(&self, delivery: &Delivery, cancel: &CancellationToken) -> Outcome {
        Stats::inc(&self.stats.received);
        let msg = &delivery.message;
        match event::parse(&msg.body) {
            Parsed::Reject(reason) => {
                warn!(message_id = %msg.id, receive_count = msg.receive_count, %reason,
                    body = ?record::clip(&msg.body, 200), "rejected message: it can never be handled");
                self.record_unworked(msg, Outcome::Rejected, &reason.to_string())
                    .await
            }
            Parsed::Skip(reason) => {
                info!(message_id = %msg.id, %reason, "skipped message");
                self.record_unworked(msg, Outcome::Skipped, &reason.to_string())
                    .await
            }
            Parsed::Interruption(i) => self.interruption(delivery, i, cancel).await,
            Parsed::Event(ev) => {
                let job = Job::from_message(ev, &msg.id);
                self.run(job, delivery.lease(), cancel).await.outcome
            }
        }
    }

    /// Runs one job: its event through its layer and, as the job says, its action
    /// completed. `lease` keeps the job's message hidden; the action's heartbeat joins it.
    pub async fn run(&self, job: Job, lease: &Lease, cancel: &CancellationToken) -> RunReport {
        let ev = &job.event;
        let span = info_span!("event",
            message_id = job.message_id.as_deref().unwrap_or("-"),
            instance_id = %ev.instance_id, group = %ev.group, hook = %ev.hook,
            transition = %ev.transition, layer = field::Empty);
        Run::new(self, job, lease, cancel)
            .go()
            .instrument(span)
            .await
    }
}

#[cfg(test)]
mod tests;
