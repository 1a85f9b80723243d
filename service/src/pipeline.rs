//! One message, start to finish: parse -> route -> claim -> steps -> complete -> notify.
//!
//! Owns the order of things and the rules that make at-least-once delivery safe: a token
//! that completed is acknowledged without work; the same token arriving twice at once is
//! worked once; the hook is completed on its own, uncancelled path; the message is only
//! deleted (by the caller, per the returned [`Disposition`]) after the hook was completed
//! or the message was judged a skip or a reject. Receiving and deleting messages is the
//! daemon's business; the calls themselves are behind the `aws` traits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::cache::TtlCache;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, field, info, info_span, warn, Instrument};

use crate::aws::retry::with_backoff;
use crate::aws::{Action, ActionCall, HookInfo, HookResult, Hooks, Message, Services};
use crate::batch::Batcher;
use crate::config::{Config, Layer, Unmatched};
use crate::event::{self, LifecycleEvent, Parsed, Transition};
use crate::layer::Context;
use crate::lease::{heartbeat_interval, Leases};
use crate::metrics::Stats;
use crate::step::{Shared, StepContext};
use crate::store::{now_ms, Claim, NewRun, RunEnd, Store};

/// What should happen to the message once the pipeline is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Handled (completed, skipped, rejected, duplicate): delete it.
    Delete,
    /// Not handled: make it visible again after this delay, so it comes back.
    Retry(Duration),
}

/// How a run treats its lifecycle action (the defaults are the daemon's).
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Complete the action when the steps are done.
    pub complete: bool,
    /// Heartbeat the action while the steps run.
    pub heartbeat: bool,
    /// Address the action by instance id instead of its token (manual runs: no message,
    /// so no token).
    pub by_instance_id: bool,
    /// Step progress, for a person watching.
    pub progress: Option<tokio::sync::mpsc::UnboundedSender<Progress>>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            complete: true,
            heartbeat: true,
            by_instance_id: false,
            progress: None,
        }
    }
}

/// A step starting or ending, as `RunOptions::progress` reports it.
#[derive(Debug, Clone)]
pub enum Progress {
    Started {
        idx: usize,
        total: usize,
        description: String,
    },
    Finished {
        idx: usize,
        outcome: &'static str,
        detail: String,
        elapsed: Duration,
    },
    /// What a running step waits for (the instance, its host keys, SSH, a batch).
    Waiting { idx: usize, what: String },
}

/// Where rejected messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectPolicy {
    Delete,
    /// Release them so the queue's redrive policy moves them to its dead-letter queue.
    DeadLetter,
}

/// How long a group's hook descriptions are trusted before being fetched again.
const HOOK_INFO_TTL: Duration = Duration::from_secs(300);
/// Heartbeat interval when the hook cannot be described: short enough for the 30 s minimum.
const FALLBACK_HEARTBEAT: Duration = Duration::from_secs(10);
/// How long a step's output may be in the history.
const DETAIL_MAX: usize = 2000;
/// How long it may be in a result event: ten events share one PublishBatch (256 KiB).
const EVENT_DETAIL_MAX: usize = 500;

pub struct Pipeline {
    cfg: Arc<Config>,
    hooks: Arc<dyn Hooks>,
    services: Services,
    shared: Shared,
    store: Store,
    leases: Leases,
    publisher: Option<Batcher<String>>,
    reject_policy: RejectPolicy,
    hook_info: TtlCache<String, Arc<HashMap<String, HookInfo>>>,
    /// Tokens being worked in this process; a second message for one waits on it.
    working: Mutex<HashMap<String, watch::Receiver<bool>>>,
    owner: String,
    host: String,
    pub stats: Arc<Stats>,
}

/// What happened to one event, for the caller and the result topic.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub run_id: Option<i64>,
    pub instance_id: String,
    pub group: String,
    pub hook: String,
    pub transition: &'static str,
    pub layer: Option<String>,
    /// succeeded | failed | duplicate | unmatched | retry | released | hook-error
    pub outcome: &'static str,
    /// CONTINUE | ABANDON | already-finished | null (hook not completed)
    pub hook_result: Option<String>,
    pub error: Option<String>,
    pub steps: Vec<StepReport>,
    pub heartbeats: u32,
    pub started_at: String,
    pub finished_at: String,
    pub host: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub kind: &'static str,
    pub description: String,
    pub outcome: &'static str,
    pub detail: String,
    pub duration_ms: u64,
}

pub struct Parts {
    pub cfg: Arc<Config>,
    pub hooks: Arc<dyn Hooks>,
    pub services: Services,
    pub store: Store,
    pub leases: Leases,
    pub publisher: Option<Batcher<String>>,
    pub reject_policy: RejectPolicy,
    pub stats: Arc<Stats>,
    /// SSH reach and the Ansible runner, when the config has SSH steps.
    pub remote: Option<Arc<crate::ssh::Remote>>,
    pub ansible: Option<Arc<crate::step::ansible::Runner>>,
}

fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl Pipeline {
    pub fn new(p: Parts) -> Pipeline {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let shared = Shared::new(
            &p.services,
            p.cfg.ssm.batch_window,
            p.cfg.aws.retry_for,
            p.remote,
            p.ansible,
        );
        Pipeline {
            cfg: p.cfg,
            hooks: p.hooks,
            shared,
            services: p.services,
            store: p.store,
            leases: p.leases,
            publisher: p.publisher,
            reject_policy: p.reject_policy,
            hook_info: TtlCache::new(HOOK_INFO_TTL),
            working: Mutex::new(HashMap::new()),
            owner: format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..)),
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

    /// One line per step, templates filled in for this event (`--dry-run`).
    pub fn preview(&self, ev: &LifecycleEvent, layer: &Layer) -> Vec<String> {
        let ctx = Context::new(ev, &layer.name, &layer.vars);
        layer
            .steps(ev.transition)
            .iter()
            .map(|s| s.preview(&ctx))
            .collect()
    }

    /// The first layer whose matcher accepts the event.
    pub fn route(&self, event: &LifecycleEvent) -> Option<&Layer> {
        self.cfg.layers.iter().find(|l| l.matcher.matches(event))
    }

    /// Handles one received message. `cancel` fires when the daemon stops waiting (end of the
    /// shutdown grace): unfinished work is then abandoned and the message released.
    pub async fn handle_message(
        &self,
        msg: &Message,
        received: Instant,
        cancel: &CancellationToken,
    ) -> Disposition {
        Stats::inc(&self.stats.received);
        match event::parse(&msg.body) {
            Parsed::Reject(reason) => {
                Stats::inc(&self.stats.rejected);
                let excerpt = clip(&msg.body, 2000);
                warn!(message_id = %msg.id, receive_count = msg.receive_count, %reason,
                    body = ?clip(&msg.body, 200), "rejected message: it can never be handled");
                let r = self
                    .store
                    .insert_run(NewRun {
                        message_id: Some(&msg.id),
                        outcome: "rejected",
                        error: Some(&reason.to_string()),
                        event: Some(&excerpt),
                        ..Default::default()
                    })
                    .await;
                if let Err(e) = r {
                    warn!(error = %e, "could not record the rejected message");
                }
                match self.reject_policy {
                    RejectPolicy::Delete => Disposition::Delete,
                    RejectPolicy::DeadLetter => Disposition::Retry(Duration::ZERO),
                }
            }
            Parsed::Skip(reason) => {
                Stats::inc(&self.stats.skipped);
                info!(message_id = %msg.id, %reason, "skipped message");
                let r = self
                    .store
                    .insert_run(NewRun {
                        message_id: Some(&msg.id),
                        outcome: "skipped",
                        error: Some(&reason.to_string()),
                        ..Default::default()
                    })
                    .await;
                if let Err(e) = r {
                    warn!(error = %e, "could not record the skipped message");
                }
                Disposition::Delete
            }
            Parsed::Event(ev) => {
                let report = self
                    .handle_event(
                        &ev,
                        Some((msg, received)),
                        None,
                        cancel,
                        &RunOptions::default(),
                    )
                    .await;
                match report.outcome {
                    "retry" => Disposition::Retry(retry_delay(msg.receive_count)),
                    "released" => Disposition::Retry(Duration::ZERO),
                    _ => Disposition::Delete,
                }
            }
        }
    }

    /// Works one lifecycle event through its layer and completes its hook. `msg` is the
    /// message it came in (None for a manual run); `layer` forces a layer by name.
    pub async fn handle_event(
        &self,
        ev: &LifecycleEvent,
        msg: Option<(&Message, Instant)>,
        layer: Option<&Layer>,
        cancel: &CancellationToken,
        opts: &RunOptions,
    ) -> RunReport {
        let span = info_span!("event",
            message_id = msg.map(|(m, _)| m.id.as_str()).unwrap_or("-"),
            instance_id = %ev.instance_id, group = %ev.group, hook = %ev.hook,
            transition = %ev.transition, layer = field::Empty);
        self.handle_event_inner(ev, msg, layer, cancel, opts)
            .instrument(span)
            .await
    }

    async fn handle_event_inner(
        &self,
        ev: &LifecycleEvent,
        msg: Option<(&Message, Instant)>,
        forced: Option<&Layer>,
        cancel: &CancellationToken,
        opts: &RunOptions,
    ) -> RunReport {
        let started = now_ms();
        let mut report = RunReport {
            kind: "provision.result",
            run_id: None,
            instance_id: ev.instance_id.to_string(),
            group: ev.group.clone(),
            hook: ev.hook.clone(),
            transition: ev.transition.as_str(),
            layer: None,
            outcome: "retry",
            hook_result: None,
            error: None,
            steps: Vec::new(),
            heartbeats: 0,
            started_at: rfc3339(started),
            finished_at: String::new(),
            host: self.host.clone(),
        };
        let action = Action {
            group: ev.group.clone(),
            hook: ev.hook.clone(),
            instance_id: ev.instance_id.clone(),
            token: (!opts.by_instance_id).then(|| ev.token.clone()),
        };
        let receipt = msg.map(|(m, _)| m.receipt.clone());
        let received = msg.map(|(_, at)| at).unwrap_or_else(Instant::now);
        // Keeps the message hidden from the moment it arrived, also while waiting below.
        let lease = self.leases.hold(receipt, received);

        let Some(layer) = forced.or_else(|| self.route(ev)) else {
            return self.unmatched(ev, msg, &action, report).await;
        };
        tracing::Span::current().record("layer", layer.name.as_str());
        report.layer = Some(layer.name.clone());

        // The same token twice in this process (SQS duplicate, or both SNS and EventBridge
        // delivering): the second waits for the first and then finds it done.
        let done_tx = loop {
            let waiting = {
                let mut working = self.working.lock().unwrap();
                match working.get(&ev.token) {
                    Some(rx) => Some(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(false);
                        working.insert(ev.token.clone(), rx);
                        break tx;
                    }
                }
            };
            if let Some(mut rx) = waiting {
                info!("same lifecycle action is being worked on here; waiting for it");
                tokio::select! {
                    _ = async { let _ = rx.wait_for(|done| *done).await; } => {}
                    _ = cancel.cancelled() => {
                        report.outcome = "released";
                        return self.finish(report).await;
                    }
                }
            }
        };
        let _unregister = Unregister {
            working: &self.working,
            token: &ev.token,
            tx: done_tx,
        };

        let event_json = serde_json::to_string(ev).unwrap_or_default();
        let run_id = match self
            .store
            .insert_run(NewRun {
                message_id: msg.map(|(m, _)| m.id.as_str()),
                instance_id: Some(ev.instance_id.as_str()),
                group: Some(&ev.group),
                hook: Some(&ev.hook),
                transition: Some(ev.transition.as_str()),
                token: Some(&ev.token),
                layer: Some(&layer.name),
                outcome: "running",
                error: None,
                event: Some(&event_json),
            })
            .await
        {
            Ok(id) => id,
            Err(e) => {
                warn!(error = %e, "cannot record the run; leaving the message for a retry");
                report.error = Some(e.to_string());
                return self.finish(report).await;
            }
        };
        report.run_id = Some(run_id);

        let claim = match self.store.claim(&ev.token, &self.owner, run_id).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot claim the action; leaving the message for a retry");
                report.error = Some(e.to_string());
                return self.finish(report).await;
            }
        };
        let result = match claim {
            Claim::Done { result, .. } => {
                Stats::inc(&self.stats.duplicates);
                info!(previous = ?result, "lifecycle action already completed; acknowledging duplicate");
                report.outcome = "duplicate";
                report.hook_result = result;
                return self.finish(report).await;
            }
            Claim::Decided(result) => {
                info!(%result, "steps already ran for this action; completing it");
                result
            }
            Claim::Fresh => {
                if opts.heartbeat {
                    let every = match self.hook_info(&ev.group, &ev.hook).await {
                        Some(info) => heartbeat_interval(info.heartbeat_timeout),
                        None => FALLBACK_HEARTBEAT,
                    };
                    lease.beat(action.clone(), every);
                }
                match self
                    .run_steps(ev, layer, run_id, &mut report, cancel, opts)
                    .await
                {
                    Some(r) => r,
                    None => {
                        // Cancelled by shutdown: forget the half-run, release the message.
                        if let Err(e) = self.store.release(&ev.token).await {
                            warn!(error = %e, "could not release the claim");
                        }
                        report.outcome = "released";
                        report.heartbeats = lease.heartbeats();
                        return self.finish(report).await;
                    }
                }
            }
        };
        // The instance is going away (its terminate action, or an ABANDONed launch, is about
        // to be completed): forget its host keys. A manual run that completes nothing leaves
        // the instance as it is, and its keys with it.
        if opts.complete
            && (ev.transition == Transition::Terminate || result == HookResult::Abandon)
        {
            if let Some(r) = &self.shared.remote {
                r.forget(&ev.instance_id);
            }
        }
        if let Err(e) = self.store.decide(&ev.token, result).await {
            warn!(error = %e, "could not record the decision; completing anyway");
        }
        if report.outcome != "failed" {
            report.outcome = "succeeded";
        }

        if !opts.complete {
            report.heartbeats = lease.heartbeats();
            info!(%result, "steps done; the lifecycle action is left as it is (not completing)");
            if let Err(e) = self.store.done(&ev.token, "not-completed").await {
                warn!(error = %e, "could not record the run's end");
            }
            return self.finish(report).await;
        }
        // Completion runs to its end even during shutdown: it is bounded by aws.retry_for.
        let completed = with_backoff(self.cfg.aws.retry_for, || {
            self.hooks.complete(&action, result)
        })
        .await;
        report.heartbeats = lease.heartbeats();
        drop(lease);
        match completed {
            Ok(ActionCall::Done) => {
                info!(%result, "completed lifecycle action");
                report.hook_result = Some(result.as_str().to_string());
            }
            Ok(ActionCall::NotActive(reason)) => {
                info!(%reason, "lifecycle action was already finished (by another worker or its timeout)");
                report.hook_result = Some("already-finished".to_string());
            }
            Err(e) if e.retryable => {
                warn!(error = %e, "could not complete the lifecycle action; the message will come back");
                report.outcome = "retry";
                report.error = Some(e.to_string());
                return self.finish(report).await;
            }
            Err(e) => {
                warn!(error = %e, "completing the lifecycle action failed permanently");
                report.outcome = "hook-error";
                report.error = Some(e.to_string());
                report.hook_result = None;
            }
        }
        let final_result = report
            .hook_result
            .clone()
            .unwrap_or_else(|| "error".to_string());
        if let Err(e) = self.store.done(&ev.token, &final_result).await {
            warn!(error = %e, "could not record completion (a redelivery would find the action finished in AWS)");
        }
        match report.outcome {
            "succeeded" => Stats::inc(&self.stats.succeeded),
            _ => Stats::inc(&self.stats.failed),
        }
        self.finish(report).await
    }

    /// Runs the layer's steps in order, stopping at the first failure. Returns the hook
    /// result, or None when cancelled.
    async fn run_steps(
        &self,
        ev: &LifecycleEvent,
        layer: &Layer,
        run_id: i64,
        report: &mut RunReport,
        cancel: &CancellationToken,
        opts: &RunOptions,
    ) -> Option<HookResult> {
        let total = layer.steps(ev.transition).len();
        let tell = |p: Progress| {
            if let Some(tx) = &opts.progress {
                let _ = tx.send(p);
            }
        };
        for (idx, step) in layer.steps(ev.transition).iter().enumerate() {
            let last_note = Mutex::new(String::new());
            let note = |what: String| {
                let mut last = last_note.lock().unwrap();
                if *last != what {
                    debug!(%what, "waiting");
                    *last = what.clone();
                    tell(Progress::Waiting { idx, what });
                }
            };
            let ctx = StepContext {
                template: Context::new(ev, &layer.name, &layer.vars),
                services: &self.services,
                shared: &self.shared,
                retry_for: self.cfg.aws.retry_for,
                ssh: &layer.ssh,
                note: &note,
            };
            let description = step.describe();
            let span = info_span!("step", idx, kind = step.kind_name());
            if let Err(e) = self
                .store
                .start_step(run_id, idx, step.kind_name(), &description)
                .await
            {
                warn!(error = %e, "could not record step start");
            }
            tell(Progress::Started {
                idx,
                total,
                description: description.clone(),
            });
            let t0 = Instant::now();
            let r = tokio::select! {
                r = step.run(&ctx).instrument(span.clone()) => r,
                _ = cancel.cancelled() => {
                    let _ = self.store.finish_step(run_id, idx, "cancelled", "shutdown").await;
                    return None;
                }
            };
            let (outcome, detail) = match &r {
                Ok(out) => ("succeeded", clip(&out.detail, DETAIL_MAX)),
                Err(e) => ("failed", clip(&e.to_string(), DETAIL_MAX)),
            };
            span.in_scope(|| match &r {
                Ok(_) => info!(%detail, "step succeeded"),
                Err(e) => warn!(error = %e, "step failed"),
            });
            if let Err(e) = self.store.finish_step(run_id, idx, outcome, &detail).await {
                warn!(error = %e, "could not record step result");
            }
            self.stats
                .step_finished(step.kind_name(), t0.elapsed().as_secs_f64());
            tell(Progress::Finished {
                idx,
                outcome,
                detail: detail.clone(),
                elapsed: t0.elapsed(),
            });
            report.steps.push(StepReport {
                kind: step.kind_name(),
                description,
                outcome,
                detail: clip(&detail, EVENT_DETAIL_MAX),
                duration_ms: t0.elapsed().as_millis() as u64,
            });
            if let Err(e) = r {
                report.outcome = "failed";
                report.error = Some(format!("step {idx} ({}): {}", step.kind_name(), e));
                return Some(layer.on_failure);
            }
        }
        Some(HookResult::Continue)
    }

    async fn unmatched(
        &self,
        ev: &LifecycleEvent,
        msg: Option<(&Message, Instant)>,
        action: &Action,
        mut report: RunReport,
    ) -> RunReport {
        Stats::inc(&self.stats.unmatched);
        report.outcome = "unmatched";
        match self.cfg.daemon.unmatched {
            Unmatched::Ignore => {
                warn!("no layer matches this group; leaving the hook alone (daemon.unmatched = \"ignore\")");
            }
            Unmatched::Complete(result) => {
                match with_backoff(self.cfg.aws.retry_for, || {
                    self.hooks.complete(action, result)
                })
                .await
                {
                    Ok(ActionCall::Done) => report.hook_result = Some(result.as_str().to_string()),
                    Ok(ActionCall::NotActive(_)) => {
                        report.hook_result = Some("already-finished".into())
                    }
                    Err(e) if e.retryable => {
                        report.outcome = "retry";
                        report.error = Some(e.to_string());
                    }
                    Err(e) => report.error = Some(e.to_string()),
                }
                warn!(%result, "no layer matches this group; completed the hook per daemon.unmatched");
            }
        }
        let event_json = serde_json::to_string(ev).unwrap_or_default();
        match self
            .store
            .insert_run(NewRun {
                message_id: msg.map(|(m, _)| m.id.as_str()),
                instance_id: Some(ev.instance_id.as_str()),
                group: Some(&ev.group),
                hook: Some(&ev.hook),
                transition: Some(ev.transition.as_str()),
                token: Some(&ev.token),
                layer: None,
                outcome: "running",
                error: None,
                event: Some(&event_json),
            })
            .await
        {
            Ok(id) => report.run_id = Some(id),
            Err(e) => warn!(error = %e, "could not record the unmatched event"),
        }
        self.finish(report).await
    }

    /// Records the end of a run and publishes its result when it is final. A result that
    /// cannot be published stays in the store's outbox for [`Pipeline::republish`].
    async fn finish(&self, mut report: RunReport) -> RunReport {
        report.finished_at = rfc3339(now_ms());
        let publish = matches!(report.outcome, "succeeded" | "failed" | "hook-error");
        let mut unpublished = None;
        if publish {
            if let Some(publisher) = &self.publisher {
                let body = serde_json::to_string(&report).unwrap_or_default();
                if let Err(e) = publisher.submit(body.clone()).await {
                    warn!(error = %e, "could not publish the result event; it will be retried");
                    unpublished = Some(body);
                }
            }
        }
        self.stats
            .run_finished(report.layer.as_deref().unwrap_or("-"), report.outcome);
        match report.outcome {
            "retry" => warn!(
                error = report.error.as_deref().unwrap_or(""),
                "event not finished; the message will come back"
            ),
            "released" => Stats::inc(&self.stats.released),
            _ => {}
        }
        if let Some(run_id) = report.run_id {
            let r = self
                .store
                .finish_run(
                    run_id,
                    RunEnd {
                        outcome: report.outcome,
                        hook_result: report.hook_result.as_deref(),
                        heartbeats: report.heartbeats,
                        error: report.error.as_deref(),
                        unpublished: unpublished.as_deref(),
                    },
                )
                .await;
            if let Err(e) = r {
                warn!(error = %e, "could not record the run's end");
            }
        }
        report
    }

    /// Publishes result events that failed to publish earlier (the outbox). Returns how
    /// many went out.
    pub async fn republish(&self) -> usize {
        let Some(publisher) = &self.publisher else {
            return 0;
        };
        let pending = match self.store.unpublished(100).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read unpublished results");
                return 0;
            }
        };
        let mut sent = 0;
        for (run_id, body) in pending {
            match publisher.submit(body).await {
                Ok(()) => {
                    sent += 1;
                    if let Err(e) = self.store.mark_published(run_id).await {
                        warn!(error = %e, run_id, "published, but could not record it (it may be sent twice)");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "result events still cannot be published; will try again later");
                    break;
                }
            }
        }
        if sent > 0 {
            info!(sent, "published result events from the outbox");
        }
        sent
    }

    /// The hook's heartbeat timeout, from one DescribeLifecycleHooks per group (cached, and
    /// shared by concurrent callers so a burst of launches makes one call).
    async fn hook_info(&self, group: &str, hook: &str) -> Option<HookInfo> {
        let hooks = self
            .hook_info
            .get_or_load(&group.to_string(), || async {
                with_backoff(self.cfg.aws.retry_for.min(Duration::from_secs(10)), || {
                    self.hooks.describe_hooks(group)
                })
                .await
                .map(|v| Arc::new(v.into_iter().collect::<HashMap<_, _>>()))
            })
            .await;
        match hooks {
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

/// Delay before a message that failed for a transient reason comes back: grows with the
/// number of receives, capped at 5 minutes, jittered.
fn retry_delay(receive_count: u32) -> Duration {
    let base = Duration::from_secs(5).saturating_mul(1 << receive_count.min(6));
    base.min(Duration::from_secs(300))
        .mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// Removes a token from the in-process map and wakes anyone waiting for it.
struct Unregister<'a> {
    working: &'a Mutex<HashMap<String, watch::Receiver<bool>>>,
    token: &'a str,
    tx: watch::Sender<bool>,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.working.lock().unwrap().remove(self.token);
        let _ = self.tx.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::fake::{FakeHooks, FakeInstances};
    use crate::aws::AwsError;

    const CONFIG: &str = r#"
[queue]
url = "https://sqs.us-east-1.amazonaws.com/123456789012/q"
[state]
path = "unused"
[aws]
retry_for = "1s"
[layers.web]
groups = ["web-*"]
launch = [ { tag = { Name = "web-{instance_id}", Env = "{metadata.environment}" } } ]
[layers.lenient]
groups = ["lenient-*"]
on_failure = "continue"
launch = [ { tag = { Env = "{metadata.environment}" } } ]
"#;

    struct World {
        pipeline: Pipeline,
        hooks: Arc<FakeHooks>,
        instances: Arc<FakeInstances>,
    }

    fn world(hooks: FakeHooks, instances: FakeInstances) -> World {
        let cfg = Arc::new(Config::parse(CONFIG, "test").unwrap());
        let hooks = Arc::new(hooks);
        let instances = Arc::new(instances);
        let stats = Arc::new(Stats::default());
        let leases = Leases::spawn(None, hooks.clone(), Duration::from_secs(30), stats.clone());
        let pipeline = Pipeline::new(Parts {
            cfg,
            hooks: hooks.clone(),
            services: Services {
                instances: instances.clone(),
                ssm: Arc::new(crate::aws::fake::Unused),
                opsworks: Arc::new(crate::aws::fake::Unused),
            },
            store: Store::in_memory().unwrap(),
            leases,
            publisher: None,
            reject_policy: RejectPolicy::Delete,
            stats,
            remote: None,
            ansible: None,
        });
        World {
            pipeline,
            hooks,
            instances,
        }
    }

    fn message(group: &str, token: &str, metadata: &str) -> Message {
        let body = serde_json::json!({
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "AutoScalingGroupName": group, "LifecycleHookName": "launch",
            "EC2InstanceId": "i-0123456789abcdef0", "LifecycleActionToken": token,
            "NotificationMetadata": metadata,
        });
        Message {
            id: format!("m-{}", fastrand::u32(..)),
            receipt: "r".into(),
            body: body.to_string(),
            receive_count: 1,
        }
    }

    async fn handle(w: &World, m: &Message) -> Disposition {
        w.pipeline
            .handle_message(m, Instant::now(), &CancellationToken::new())
            .await
    }

    fn completions(w: &World) -> Vec<HookResult> {
        w.hooks
            .completions
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| *r)
            .collect()
    }

    #[tokio::test]
    async fn a_good_event_is_tagged_completed_and_deleted() {
        let w = world(FakeHooks::default(), FakeInstances::default());
        let d = handle(&w, &message("web-1", "t1", r#"{"environment":"prod"}"#)).await;
        assert_eq!(d, Disposition::Delete);
        assert_eq!(completions(&w), [HookResult::Continue]);
        let tagged = w.instances.tagged.lock().unwrap();
        assert_eq!(
            tagged[0].1,
            [
                ("Name".into(), "web-i-0123456789abcdef0".into()),
                ("Env".into(), "prod".into())
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_step_completes_with_the_layers_failure_result() {
        let w = world(FakeHooks::default(), FakeInstances::default());
        // No "environment" in the metadata: the template cannot be filled.
        assert_eq!(
            handle(&w, &message("web-1", "t1", "{}")).await,
            Disposition::Delete
        );
        assert_eq!(
            handle(&w, &message("lenient-1", "t2", "plain text")).await,
            Disposition::Delete
        );
        assert_eq!(completions(&w), [HookResult::Abandon, HookResult::Continue]);
        assert!(w.instances.tagged.lock().unwrap().is_empty());
        let h = w.pipeline.store().history(None, 10).unwrap();
        assert!(h.iter().all(|r| r.outcome == "failed"), "{h:?}");
        assert!(
            h[1].error.as_deref().unwrap().contains("\"environment\""),
            "{:?}",
            h[1].error
        );
    }

    #[tokio::test]
    async fn an_action_finished_elsewhere_counts_as_done() {
        let hooks = FakeHooks::default();
        hooks
            .complete_script
            .lock()
            .unwrap()
            .push_back(Ok(ActionCall::NotActive(
                "No active Lifecycle Action found".into(),
            )));
        let w = world(hooks, FakeInstances::default());
        assert_eq!(
            handle(&w, &message("web-1", "t1", r#"{"environment":"p"}"#)).await,
            Disposition::Delete
        );
        let h = w.pipeline.store().history(None, 10).unwrap();
        assert_eq!(h[0].hook_result.as_deref(), Some("already-finished"));
        // A redelivery is acknowledged without running steps or completing again.
        assert_eq!(
            handle(&w, &message("web-1", "t1", r#"{"environment":"p"}"#)).await,
            Disposition::Delete
        );
        assert_eq!(w.instances.tagged.lock().unwrap().len(), 1);
        assert_eq!(completions(&w).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_completion_failure_leaves_the_message_and_skips_steps_next_time() {
        let hooks = FakeHooks::default();
        let throttled = AwsError {
            operation: "autoscaling:CompleteLifecycleAction",
            code: Some("Throttling".into()),
            message: "Rate exceeded".into(),
            retryable: true,
        };
        hooks
            .complete_script
            .lock()
            .unwrap()
            .extend(std::iter::repeat_n(Err(throttled), 50));
        let w = world(hooks, FakeInstances::default());
        let m = message("web-1", "t1", r#"{"environment":"p"}"#);
        assert!(matches!(handle(&w, &m).await, Disposition::Retry(d) if d > Duration::ZERO));
        w.hooks.complete_script.lock().unwrap().clear();
        assert_eq!(handle(&w, &m).await, Disposition::Delete);
        assert_eq!(
            w.instances.tagged.lock().unwrap().len(),
            1,
            "steps ran once"
        );
        assert_eq!(completions(&w).last(), Some(&HookResult::Continue));
    }

    #[tokio::test]
    async fn the_same_token_at_once_is_worked_once() {
        let w = world(
            FakeHooks::default(),
            FakeInstances {
                delay: Duration::from_millis(200),
                ..Default::default()
            },
        );
        let m = message("web-1", "t1", r#"{"environment":"p"}"#);
        let (a, b, c) = tokio::join!(handle(&w, &m), handle(&w, &m), handle(&w, &m));
        assert_eq!([a, b, c], [Disposition::Delete; 3]);
        assert_eq!(w.instances.tagged.lock().unwrap().len(), 1);
        assert_eq!(completions(&w).len(), 1);
        assert_eq!(Stats::get(&w.pipeline.stats.duplicates), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn long_steps_are_heartbeated_and_the_hook_described_once() {
        let w = world(
            FakeHooks {
                heartbeat_timeout: Duration::from_secs(30),
                ..Default::default()
            },
            FakeInstances {
                delay: Duration::from_secs(100),
                ..Default::default()
            },
        );
        let (m1, m2) = (
            message("web-1", "t1", r#"{"environment":"p"}"#),
            message("web-2", "t2", r#"{"environment":"p"}"#),
        );
        let (a, b) = tokio::join!(handle(&w, &m1), handle(&w, &m2));
        assert_eq!([a, b], [Disposition::Delete; 2]);
        // Every ~10 s (a third of 30 s, jittered) over 100 s, for each of the two actions.
        let beats = w.hooks.heartbeats.lock().unwrap().len();
        assert!((16..=24).contains(&beats), "heartbeats: {beats}");
        assert_eq!(
            *w.hooks.describes.lock().unwrap(),
            2,
            "one DescribeLifecycleHooks per group"
        );
    }

    #[tokio::test]
    async fn rejects_and_skips_are_recorded_and_deleted() {
        let w = world(FakeHooks::default(), FakeInstances::default());
        let mut m = message("web-1", "t1", "{}");
        m.body = "not json".into();
        assert_eq!(handle(&w, &m).await, Disposition::Delete);
        m.body =
            r#"{"Event":"autoscaling:TEST_NOTIFICATION","AutoScalingGroupName":"web-1"}"#.into();
        assert_eq!(handle(&w, &m).await, Disposition::Delete);
        let outcomes: Vec<String> = w
            .pipeline
            .store()
            .history(None, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.outcome)
            .collect();
        assert_eq!(outcomes, ["skipped", "rejected"]);
        assert!(completions(&w).is_empty());
    }
}
