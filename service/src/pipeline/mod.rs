//! One lifecycle action, start to finish: parse -> route -> claim -> steps -> complete ->
//! record and publish.
//!
//! Owns the order of things and the rules that make at-least-once delivery safe: a token
//! that completed is acknowledged without work; the same token arriving twice at once is
//! worked once; the hook is completed on its own, uncancelled path. It answers with an
//! [`Outcome`]; what then happens to the message (deleted, released) is the delivery's
//! business ([`crate::delivery`]), and receiving messages is the sources' (daemon, Lambda,
//! manual run). Each stage has its file:
//!
//! - `claim.rs`: the token, worked once in this process and claimed in the store;
//! - `steps.rs`: the layer's steps in order, with progress for a person watching;
//! - `complete.rs`: completing the action, and what the answer means;
//! - `record.rs`: the run's report, its history rows and its result event.

mod claim;
mod complete;
mod record;
mod steps;
mod verify;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::{field, info, info_span, warn, Instrument};

use crate::aws::retry::with_backoff;
use crate::aws::{Action, AwsError, HookInfo, Hooks, Services};
use crate::batch::Batcher;
use crate::cache::TtlCache;
use crate::claims::{Claim, Claims};
use crate::config::{Config, Unmatched};
use crate::delivery::Delivery;
use crate::event::{self, LifecycleEvent, Parsed, Transition};
use crate::layer::Layer;
use crate::lease::{heartbeat_interval, FirstBeat, Lease, Leases};
use crate::metrics::Stats;
use crate::outcome::{Completion, HookResult, Outcome};
use crate::step::Shared;
use crate::store::Store;
use crate::template::Context;

pub use record::{printable, RunReport, StepReport};
pub use steps::Progress;

use claim::Working;
use complete::Completed;
use verify::{Snapshots, Verdict};

/// How long a group's hook descriptions are trusted before being fetched again.
const HOOK_INFO_TTL: Duration = Duration::from_secs(300);
/// Heartbeat interval when the hook cannot be described: short enough for the 30 s minimum.
const FALLBACK_HEARTBEAT: Duration = Duration::from_secs(10);

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
    /// Complete the action once the steps are done (false: `--no-complete`).
    pub complete: bool,
    /// Step progress, for a person watching.
    pub progress: Option<UnboundedSender<Progress>>,
    /// The event comes from an untrusted message: Auto Scaling must confirm it before any
    /// step runs, and the hook's metadata replaces the message's.
    pub verify: bool,
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
            complete: true,
            progress: None,
            verify: true,
        }
    }

    /// The action this run completes, if it completes one.
    fn completing(&self) -> Option<&Action> {
        self.action.as_ref().filter(|_| self.complete)
    }
}

pub struct Pipeline {
    cfg: Arc<Config>,
    hooks: Arc<dyn Hooks>,
    services: Services,
    shared: Shared,
    store: Store,
    claims: Arc<dyn Claims>,
    leases: Leases,
    publisher: Option<Batcher<String>>,
    hook_info: TtlCache<String, Arc<HashMap<String, HookInfo>>>,
    snapshots: Snapshots,
    working: Working,
    owner: String,
    host: String,
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
            snapshots: TtlCache::new(verify::SNAPSHOT_TTL),
            cfg: p.cfg,
            hooks: p.hooks,
            shared,
            services: p.services,
            claims: p.claims.unwrap_or_else(|| Arc::new(p.store.clone())),
            store: p.store,
            leases: p.leases,
            publisher: p.publisher,
            hook_info: TtlCache::new(HOOK_INFO_TTL),
            working: Working::default(),
            owner: crate::claims::owner_id(&host),
            host,
            stats: p.stats,
        }
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

    /// One line per step, templates filled in for this event (`--dry-run`).
    pub fn preview(&self, ev: &LifecycleEvent, layer: &Layer) -> Vec<String> {
        let ctx = Context::new(ev, &layer.name, &layer.vars);
        layer
            .steps(ev.phase())
            .iter()
            .map(|s| s.preview(&ctx))
            .collect()
    }

    /// The first layer whose matcher accepts the event.
    pub fn route(&self, event: &LifecycleEvent) -> Option<&Layer> {
        crate::layer::route(&self.cfg.layers, event)
    }

    /// The layer a job runs: the one it names, else the one its event routes to.
    fn layer_for(&self, job: &Job) -> Option<&Layer> {
        match &job.layer {
            Some(name) => self.cfg.layers.iter().find(|l| &l.name == name),
            None => self.route(&job.event),
        }
    }

    /// Works one received message. `cancel` fires when its source stops waiting (end of the
    /// shutdown grace, the Lambda deadline): unfinished work is then abandoned, and the
    /// outcome says the message should go back.
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
            Parsed::Event(ev) => {
                let job = Job::from_message(ev, &msg.id);
                self.run(&job, delivery.lease(), cancel).await.outcome
            }
        }
    }

    /// Works one lifecycle event through its layer and, as the job says, completes its
    /// action. `lease` keeps the job's message hidden; the action's heartbeat joins it.
    pub async fn run(&self, job: &Job, lease: &Lease, cancel: &CancellationToken) -> RunReport {
        let ev = &job.event;
        let span = info_span!("event",
            message_id = job.message_id.as_deref().unwrap_or("-"),
            instance_id = %ev.instance_id, group = %ev.group, hook = %ev.hook,
            transition = %ev.transition, layer = field::Empty);
        self.work(job, lease, cancel).instrument(span).await
    }

    /// The story of one run.
    async fn work(&self, job: &Job, lease: &Lease, cancel: &CancellationToken) -> RunReport {
        let mut run = RunReport::new(&job.event, &self.host);
        let Some(layer) = self.layer_for(job) else {
            return self.unmatched(job, lease, cancel, run).await;
        };
        tracing::Span::current().record("layer", layer.name.as_str());
        run.layer = Some(layer.name.clone());

        // The same token twice in this process (SQS duplicate, or both SNS and EventBridge
        // delivering): the second waits for the first and then finds it done.
        let Some(_working) = self.working.enter(&job.event.token, cancel).await else {
            return self.finish(run.ended(Outcome::Released)).await;
        };
        let (run_id, claim) = match self.claim(job, layer, &mut run, cancel).await {
            Ok(Some(claimed)) => claimed,
            Ok(None) => return self.finish(run.ended(Outcome::Released)).await,
            Err(e) => {
                warn!(error = %e, "cannot record or claim the run; leaving the message for a retry");
                run.error = Some(e.to_string());
                return self.finish(run.ended(Outcome::Retry)).await;
            }
        };
        if let Claim::Done { result, .. } = claim {
            info!(previous = ?result, "lifecycle action already completed; acknowledging duplicate");
            run.hook_result = result;
            return self.finish(run.ended(Outcome::Duplicate)).await;
        }
        // Ours until the run ends: renewed meanwhile; a takeover stops the steps.
        let stop = cancel.child_token();
        let _keeper = self.keep(job, stop.clone());
        let result = match claim {
            Claim::Decided(result) => {
                info!(%result, "steps already ran for this action; completing their decision");
                self.heartbeat(job, lease).await;
                self.earlier_decision(job, result, &mut run).await;
                result
            }
            // (Done returned above; Held is never answered once the claim is won.)
            Claim::Fresh { .. } | Claim::Held { .. } | Claim::Done { .. } => {
                match self.fresh(job, layer, run_id, &mut run, lease, &stop).await {
                    Ok(result) => result,
                    Err(outcome) => return self.unclaim(job, lease, run.ended(outcome)).await,
                }
            }
        };
        run.decide(result);
        self.decided(job, &run).await;
        self.end_action(job, result, lease, cancel, run).await
    }

    /// A claim that is new: heartbeat, verify, run the steps. The result to complete with,
    /// or the outcome to end with (forged, unverifiable, cancelled, claim lost).
    async fn fresh(
        &self,
        job: &Job,
        layer: &Layer,
        run_id: i64,
        run: &mut RunReport,
        lease: &Lease,
        stop: &CancellationToken,
    ) -> Result<HookResult, Outcome> {
        // Heartbeats first: a backlogged action may be close to its timeout. (A forged
        // token's heartbeat only earns a "no active action".)
        self.heartbeat(job, lease).await;
        let verified = self.genuine(job, run, stop).await?;
        let job = verified.as_ref().unwrap_or(job);
        self.run_steps(job, layer, run_id, run, lease, stop)
            .await
            .ok_or(Outcome::Released)
    }

    /// For a job from a message: Auto Scaling's confirmation, and the job with the hook's
    /// metadata (None: the job as it is). The outcome to end with when it is not genuine.
    /// A transient failure to ask keeps the message in flight and asks again with growing
    /// backoff (while the action can be completed); shutdown releases it.
    async fn genuine(
        &self,
        job: &Job,
        run: &mut RunReport,
        cancel: &CancellationToken,
    ) -> Result<Option<Job>, Outcome> {
        if !job.verify {
            return Ok(None);
        }
        let until = self.completable_until(job).await;
        let mut round = 0;
        let answer = loop {
            match self.verify(&job.event).await {
                Err(e) if e.retryable() && std::time::SystemTime::now() < until => {
                    round += 1;
                    let delay = complete::round_delay(round, self.cfg.aws.retry_for);
                    warn!(error = %e, round, next_in = ?delay,
                        "cannot verify the lifecycle action yet; the message stays in flight");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = cancel.cancelled() => break Err(e),
                    }
                }
                other => break other,
            }
        };
        match answer {
            Ok(Verdict::Genuine { metadata, note }) => {
                run.note = note.or(run.note.take());
                let mut verified = job.clone();
                verified.event.metadata = metadata;
                Ok(Some(verified))
            }
            Ok(Verdict::Forged(why)) => {
                warn!(%why, "rejected message: Auto Scaling does not confirm this lifecycle action; nothing runs");
                run.error = Some(format!("forged or stale: {why}"));
                Err(Outcome::Rejected)
            }
            Err(e) => {
                warn!(error = %e, "cannot verify the lifecycle action with Auto Scaling; the message will come back");
                run.error = Some(format!("cannot verify the lifecycle action: {e}"));
                Err(if cancel.is_cancelled() {
                    Outcome::Released
                } else {
                    Outcome::Retry
                })
            }
        }
    }

    /// Joins the action's heartbeat to the lease, at a third of the hook's timeout. A
    /// message that waited longer than that since it was sent is heartbeated at once.
    async fn heartbeat(&self, job: &Job, lease: &Lease) {
        let Some(action) = &job.action else { return };
        let every = match self.hook_info(&action.group, &action.hook).await {
            Some(info) => heartbeat_interval(info.heartbeat_timeout),
            None => FALLBACK_HEARTBEAT,
        };
        let waited = job.event.time.as_deref().and_then(age);
        let at_once = waited.is_some_and(|w| w >= every);
        if at_once {
            info!(waited = ?waited.unwrap_or_default(), "the message waited long: heartbeating at once");
        }
        let first = if at_once {
            FirstBeat::Now
        } else {
            FirstBeat::AfterInterval
        };
        lease.beat(action.clone(), every, first);
    }

    /// Not worked to its end (cancelled, forged, unverifiable): forget the claim, so the
    /// next delivery starts over instead of trusting a half-run.
    async fn unclaim(&self, job: &Job, lease: &Lease, mut run: RunReport) -> RunReport {
        if let Err(e) = self.claims.release(&job.event.token, &self.owner).await {
            warn!(error = %e, "could not release the claim");
        }
        run.heartbeats = lease.heartbeats();
        self.finish(run).await
    }

    /// The steps are over with the run's decision: remember it (and, in the run's row, its
    /// cause) before completing, so a crash now only leaves the completion to do.
    async fn decided(&self, job: &Job, run: &RunReport) {
        let Some(result) = run.decision else { return };
        // The instance is going away (its terminate action, or an ABANDONed launch, is about
        // to be completed): forget its host keys. One returning to the warm pool comes back
        // with the same keys: they stay. A run that completes nothing leaves the instance as
        // it is, and its keys with it.
        let phase = job.event.phase();
        let leaving = !phase.instance_stays()
            || (result == HookResult::Abandon && phase.transition() == Transition::Launch);
        if leaving && job.completing().is_some() {
            if let Some(r) = &self.shared.remote {
                r.forget(&job.event.instance_id);
            }
        }
        if let Err(e) = self
            .claims
            .decide(&job.event.token, &self.owner, result)
            .await
        {
            warn!(error = %e, "could not record the decision; completing anyway");
        }
        if let Some(run_id) = run.run_id {
            let cause = run.cause.as_deref().unwrap_or_default();
            if let Err(e) = self.store.note_decision(run_id, result, cause).await {
                warn!(error = %e, "could not record the decision's cause");
            }
        }
    }

    /// A redelivery of an action whose steps already ran: the run reports the decision
    /// recorded then, and its cause, not steps of its own.
    async fn earlier_decision(&self, job: &Job, result: HookResult, run: &mut RunReport) {
        let earlier = match self.store.decision_of(&job.event.token).await {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, "cannot read the earlier run's decision");
                None
            }
        };
        let (run_id, cause) = earlier.unwrap_or_default();
        let from = if run_id > 0 {
            format!("decided by run {run_id}")
        } else {
            "decided by an earlier delivery".to_string()
        };
        run.cause = Some(match cause {
            Some(c) if !c.is_empty() => format!("{from}: {c}"),
            _ => from,
        });
        if result == HookResult::Abandon {
            run.outcome = Outcome::Failed;
        }
    }

    /// Completes the action with `result` (or deliberately does not), records the end.
    async fn end_action(
        &self,
        job: &Job,
        result: HookResult,
        lease: &Lease,
        cancel: &CancellationToken,
        mut run: RunReport,
    ) -> RunReport {
        let Some(action) = job.completing() else {
            run.heartbeats = lease.heartbeats();
            info!(%result, "steps done; the lifecycle action is left as it is (not completing)");
            self.done(&job.event.token, Completion::NotCompleted).await;
            return self.finish(run).await;
        };
        let completed = self.complete(job, action, result, lease, cancel).await;
        run.heartbeats = lease.heartbeats();
        match completed {
            Completed::Final(c) => run.hook_result = Some(c),
            Completed::Transient(e) => {
                // Stopped by shutdown (or the action's global timeout) while completing
                // still failed: back after the retry delay, its decision kept for the next
                // delivery to complete.
                warn!(error = %e, "could not complete the lifecycle action; the message will come back");
                run.error = Some(e.to_string());
                return self.finish(run.ended(Outcome::Retry)).await;
            }
            Completed::Permanent(e) => {
                warn!(error = %e, "completing the lifecycle action failed permanently");
                run.error = Some(e.to_string());
                run.outcome = Outcome::HookError;
            }
        }
        if run.hook_result == Some(Completion::TimedOut) {
            run.outcome = Outcome::Failed;
            run.error.get_or_insert_with(|| {
                "the lifecycle action timed out before it was completed; Auto Scaling applied the hook's DefaultResult".to_string()
            });
        }
        self.done(
            &job.event.token,
            run.hook_result.unwrap_or(Completion::Error),
        )
        .await;
        self.finish(run).await
    }

    /// No layer matches: record it, and complete the action if `daemon.unmatched` says so.
    async fn unmatched(
        &self,
        job: &Job,
        lease: &Lease,
        cancel: &CancellationToken,
        mut run: RunReport,
    ) -> RunReport {
        run.outcome = Outcome::Unmatched;
        match (self.cfg.daemon.unmatched, job.completing()) {
            (Unmatched::Complete(result), Some(action)) => {
                run.decision = Some(result);
                run.cause = Some("no layer matches the group (daemon.unmatched)".to_string());
                match self.complete(job, action, result, lease, cancel).await {
                    Completed::Final(c) => run.hook_result = Some(c),
                    Completed::Transient(e) => {
                        run.error = Some(e.to_string());
                        run.outcome = Outcome::Retry;
                    }
                    Completed::Permanent(e) => run.error = Some(e.to_string()),
                }
                warn!(%result, "no layer matches this group; completed the hook per daemon.unmatched");
            }
            _ => warn!(
                "no layer matches this group; leaving the hook alone (daemon.unmatched = \"ignore\")"
            ),
        }
        match self.open_run(job, None).await {
            Ok(id) => run.run_id = Some(id),
            Err(e) => warn!(error = %e, "could not record the unmatched event"),
        }
        self.finish(run).await
    }

    /// A group's lifecycle hooks, from one DescribeLifecycleHooks per group (cached, and
    /// shared by concurrent callers so a burst of launches makes one call).
    async fn hooks_of(&self, group: &str) -> Result<Arc<HashMap<String, HookInfo>>, AwsError> {
        self.hook_info
            .get_or_load(&group.to_string(), || async {
                with_backoff(self.cfg.aws.retry_for.min(Duration::from_secs(10)), || {
                    self.hooks.describe_hooks(group)
                })
                .await
                .map(|v| Arc::new(v.into_iter().collect::<HashMap<_, _>>()))
            })
            .await
    }

    /// One hook's description, for its heartbeat timeout.
    async fn hook_info(&self, group: &str, hook: &str) -> Option<HookInfo> {
        match self.hooks_of(group).await {
            Ok(map) => {
                let info = map.get(hook).cloned();
                if info.is_none() {
                    warn!(
                        "hook is not among the group's lifecycle hooks; heartbeating every {:?}",
                        FALLBACK_HEARTBEAT
                    );
                }
                info
            }
            Err(e) => {
                warn!(error = %e, "cannot describe the group's lifecycle hooks; heartbeating every {:?}", FALLBACK_HEARTBEAT);
                None
            }
        }
    }
}

/// How long ago an RFC 3339 time was (zero when it is in the future).
fn age(time: &str) -> Option<Duration> {
    let t = humantime::parse_rfc3339_weak(time).ok()?;
    Some(
        std::time::SystemTime::now()
            .duration_since(t)
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests;
