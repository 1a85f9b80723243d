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
use tokio::sync::{watch, OnceCell};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{field, info, info_span, warn, Instrument};

use crate::aws::retry::with_backoff;
use crate::aws::{Action, ActionCall, HookInfo, HookResult, Hooks, Message, Services};
use crate::batch::Batcher;
use crate::config::{Config, Layer, Unmatched};
use crate::event::{self, LifecycleEvent, Parsed};
use crate::layer::Context;
use crate::lease::{heartbeat_interval, Leases};
use crate::metrics::Stats;
use crate::step::{StepContext, StepError};
use crate::store::{now_ms, Claim, NewRun, Store};

/// What should happen to the message once the pipeline is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Handled (completed, skipped, rejected, duplicate): delete it.
    Delete,
    /// Not handled: make it visible again after this delay, so it comes back.
    Retry(Duration),
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

type HookCache = HashMap<String, (Instant, Arc<OnceCell<Arc<HashMap<String, HookInfo>>>>)>;

pub struct Pipeline {
    cfg: Arc<Config>,
    hooks: Arc<dyn Hooks>,
    services: Services,
    store: Store,
    leases: Leases,
    publisher: Option<Batcher<String>>,
    reject_policy: RejectPolicy,
    hook_info: Mutex<HookCache>,
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
        Pipeline {
            cfg: p.cfg,
            hooks: p.hooks,
            services: p.services,
            store: p.store,
            leases: p.leases,
            publisher: p.publisher,
            reject_policy: p.reject_policy,
            hook_info: Mutex::new(HashMap::new()),
            working: Mutex::new(HashMap::new()),
            owner: format!("{host}:{}:{:08x}", std::process::id(), fastrand::u32(..)),
            host,
            stats: p.stats,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
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
                    .handle_event(&ev, Some((msg, received)), None, cancel)
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
    ) -> RunReport {
        let span = info_span!("event",
            message_id = msg.map(|(m, _)| m.id.as_str()).unwrap_or("-"),
            instance_id = %ev.instance_id, group = %ev.group, hook = %ev.hook,
            transition = %ev.transition, layer = field::Empty);
        self.handle_event_inner(ev, msg, layer, cancel)
            .instrument(span)
            .await
    }

    async fn handle_event_inner(
        &self,
        ev: &LifecycleEvent,
        msg: Option<(&Message, Instant)>,
        forced: Option<&Layer>,
        cancel: &CancellationToken,
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
            token: ev.token.clone(),
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
                        return self.finish(report, started).await;
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
                return self.finish(report, started).await;
            }
        };
        report.run_id = Some(run_id);

        let claim = match self.store.claim(&ev.token, &self.owner, run_id).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot claim the action; leaving the message for a retry");
                report.error = Some(e.to_string());
                return self.finish(report, started).await;
            }
        };
        let result = match claim {
            Claim::Done { result, .. } => {
                Stats::inc(&self.stats.duplicates);
                info!(previous = ?result, "lifecycle action already completed; acknowledging duplicate");
                report.outcome = "duplicate";
                report.hook_result = result;
                return self.finish(report, started).await;
            }
            Claim::Decided(result) => {
                info!(%result, "steps already ran for this action; completing it");
                result
            }
            Claim::Fresh => {
                if let Some(info) = self.hook_info(&ev.group, &ev.hook).await {
                    lease.beat(action.clone(), heartbeat_interval(info.heartbeat_timeout));
                } else {
                    lease.beat(action.clone(), FALLBACK_HEARTBEAT);
                }
                match self.run_steps(ev, layer, run_id, &mut report, cancel).await {
                    Some(r) => r,
                    None => {
                        // Cancelled by shutdown: forget the half-run, release the message.
                        if let Err(e) = self.store.release(&ev.token).await {
                            warn!(error = %e, "could not release the claim");
                        }
                        report.outcome = "released";
                        report.heartbeats = lease.heartbeats();
                        return self.finish(report, started).await;
                    }
                }
            }
        };
        if let Err(e) = self.store.decide(&ev.token, result).await {
            warn!(error = %e, "could not record the decision; completing anyway");
        }
        if report.outcome != "failed" {
            report.outcome = "succeeded";
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
                return self.finish(report, started).await;
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
        self.finish(report, started).await
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
    ) -> Option<HookResult> {
        let ctx = StepContext {
            template: Context {
                event: ev,
                layer: &layer.name,
            },
            services: &self.services,
            retry_for: self.cfg.aws.retry_for,
        };
        for (idx, step) in layer.steps(ev.transition).iter().enumerate() {
            let description = step.describe();
            let span = info_span!("step", idx, kind = step.kind_name());
            if let Err(e) = self
                .store
                .start_step(run_id, idx, step.kind_name(), &description)
                .await
            {
                warn!(error = %e, "could not record step start");
            }
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
            report.steps.push(StepReport {
                kind: step.kind_name(),
                description,
                outcome,
                detail: detail.clone(),
                duration_ms: t0.elapsed().as_millis() as u64,
            });
            if let Err(e) = r {
                report.outcome = "failed";
                report.error = Some(format!(
                    "step {idx} ({}): {}",
                    step.kind_name(),
                    step_error(&e)
                ));
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
        let started = now_ms();
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
        self.finish(report, started).await
    }

    /// Records the end of a run and publishes its result when it is final.
    async fn finish(&self, mut report: RunReport, _started: i64) -> RunReport {
        report.finished_at = rfc3339(now_ms());
        let publish = matches!(report.outcome, "succeeded" | "failed" | "hook-error");
        let mut notified = true;
        if publish {
            if let Some(publisher) = &self.publisher {
                let body = serde_json::to_string(&report).unwrap_or_default();
                if let Err(e) = publisher.submit(body).await {
                    warn!(error = %e, "could not publish the result event");
                    notified = false;
                }
            }
        }
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
                    report.outcome,
                    report.hook_result.as_deref(),
                    report.heartbeats,
                    report.error.as_deref(),
                    notified,
                )
                .await;
            if let Err(e) = r {
                warn!(error = %e, "could not record the run's end");
            }
        }
        report
    }

    /// The hook's heartbeat timeout, from one DescribeLifecycleHooks per group (cached, and
    /// shared by concurrent callers so a burst of launches makes one call).
    async fn hook_info(&self, group: &str, hook: &str) -> Option<HookInfo> {
        let cell = {
            let mut cache = self.hook_info.lock().unwrap();
            let fresh = cache
                .get(group)
                .filter(|(at, cell)| at.elapsed() < HOOK_INFO_TTL || !cell.initialized())
                .map(|(_, c)| c.clone());
            match fresh {
                Some(c) => c,
                None => {
                    let c = Arc::new(OnceCell::new());
                    cache.insert(group.to_string(), (Instant::now(), c.clone()));
                    c
                }
            }
        };
        let hooks = cell
            .get_or_try_init(|| async {
                with_backoff(self.cfg.aws.retry_for.min(Duration::from_secs(10)), || {
                    self.hooks.describe_hooks(group)
                })
                .await
                .map(|v| Arc::new(v.into_iter().collect::<HashMap<_, _>>()))
            })
            .await;
        match hooks {
            Ok(map) => {
                let info = map.get(hook).copied();
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

fn step_error(e: &StepError) -> String {
    e.to_string()
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
