//! Reconcile: what Auto Scaling says, compared with what messages announced.
//!
//! The queue is a hint; Auto Scaling is the truth. A pass (the daemon's, every
//! `reconcile.interval`, or `provision reconcile`) lists the groups the layers manage (one
//! paginated DescribeAutoScalingGroups, 100 groups a page with their instances; a
//! DescribeWarmPool for a group with a pool) and finds:
//!
//! - **waiting** actions no run of ours works: an instance in a wait state whose action key
//!   ([`crate::action_key`]) nobody holds, seen so for `reconcile.grace`, is worked as the
//!   manual command works it (the same job: verified with Auto Scaling, completed by
//!   instance id), its history and result event saying "reconciled". A late message meets
//!   the run at the action key, so the steps run once.
//! - **unconfigured** instances: in service in a managed group without the mark a
//!   successful launch run writes ([`crate::pipeline::CONFIGURED_TAG`]; EC2 is asked only
//!   about instances not yet seen marked, 200 a call). Reported (a gauge, a result event
//!   once per instance and process, the command's output), configured (`configure`: the
//!   layer's launch steps, nothing to complete) or replaced (`replace`: SetInstanceHealth
//!   Unhealthy, so Auto Scaling replaces it through the launch hook).
//! - **gone** instances (`gone.rs`): launched by a run of this host, no longer in any
//!   group, never decommissioned: the layer's terminate steps that act without the instance
//!   run, the others are reported.
//!
//! Owns no step and no completion: the pipeline does those, as for any job.

mod find;
mod gone;
mod print;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::action_key;
use crate::aws::{AwsError, GroupView, HookInfo, LifecycleState, Membership};
use crate::config::Unconfigured;
use crate::event::{Envelope, Transition};
use crate::instance::job_for;
use crate::metrics::Stats;
use crate::pipeline::{Finish, Pipeline, RunReport};

pub use find::calls_between;
pub use print::run as command;

/// What a pass found an instance to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Waiting in a lifecycle wait state.
    Waiting,
    /// In service, never configured by a launch run of ours.
    Unconfigured,
    /// Left its group without a terminate run of ours.
    Gone,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Waiting => "waiting",
            Kind::Unconfigured => "unconfigured",
            Kind::Gone => "gone",
        }
    }
}

/// What the pass did (or, dry, would do) about a finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Act {
    /// A run of ours (or another owner's) works it: named.
    InProgress(String),
    /// Seen waiting for less than the grace period: left to its message this long yet.
    Grace(Duration),
    /// The group has no single hook of the transition to complete: named, left alone.
    NoHook(String),
    /// Its run was started (dry: would be).
    Work,
    /// Reported only.
    Report,
    /// Its launch steps were started (dry: would be).
    Configure,
    /// Marked unhealthy (dry: would be).
    Replace,
    /// Its terminate steps that need no instance were started (dry: would be); the others
    /// (named) cannot run.
    Decommission(Vec<String>),
    /// None of its terminate steps can run without the instance: named, reported.
    NotRun(Vec<String>),
    /// Acting failed.
    Failed(String),
}

/// One instance a pass found.
#[derive(Debug, Clone)]
pub struct Finding {
    pub kind: Kind,
    pub instance: String,
    pub group: String,
    pub state: LifecycleState,
    pub layer: String,
    pub act: Act,
}

/// A pass's findings, the runs it started (action key, task) and its AWS calls.
pub struct Pass {
    pub findings: Vec<Finding>,
    pub started: Vec<(String, JoinHandle<RunReport>)>,
    pub calls: BTreeMap<String, u64>,
}

/// How a pass acts.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    /// How long an action must be seen waiting before it is worked.
    pub grace: Duration,
    /// Find and print, change nothing.
    pub dry_run: bool,
}

/// The reconciler of one process: what its passes saw, and the runs it started.
pub struct Reconciler {
    pipeline: Arc<Pipeline>,
    hooks: find::HookCache,
    /// Action key -> when a pass first saw it waiting with nobody working it.
    seen: Mutex<HashMap<String, Instant>>,
    /// Instances seen carrying the configured mark.
    configured: Mutex<HashSet<String>>,
    /// Unconfigured instances already reported (or replaced) by this process.
    reported: Mutex<HashSet<String>>,
    /// Action keys of runs this reconciler started that have not ended.
    running: Arc<Mutex<HashSet<String>>>,
    /// Cancels the runs it started (shutdown).
    cancel: CancellationToken,
}

impl Reconciler {
    pub fn new(pipeline: Arc<Pipeline>) -> Reconciler {
        Reconciler {
            pipeline,
            hooks: find::hook_cache(),
            seen: Mutex::default(),
            configured: Mutex::default(),
            reported: Mutex::default(),
            running: Arc::default(),
            cancel: CancellationToken::new(),
        }
    }

    /// One pass over the managed groups.
    pub async fn pass(&self, mode: Mode) -> Result<Pass, AwsError> {
        let p = &self.pipeline;
        let before = p.stats.aws_calls();
        let groups = find::managed_groups(p).await?;
        let mut pass = Pass {
            findings: Vec::new(),
            started: Vec::new(),
            calls: BTreeMap::new(),
        };
        let mut waiting_now = HashSet::new();
        for g in &groups {
            let hooks = find::hooks_of(p, &self.hooks, &g.name).await?;
            for m in &g.members {
                let Some(t) = find::waits(&m.state) else {
                    continue;
                };
                let found = self
                    .waiting(m, t, &hooks, mode, &mut pass, &mut waiting_now)
                    .await;
                pass.findings.extend(found);
            }
            if p.config().reconcile.unconfigured.marks() {
                self.unconfigured(g, &hooks, mode, &mut pass).await?;
            }
        }
        self.gone(&groups, mode, &mut pass).await;
        self.seen
            .lock()
            .unwrap()
            .retain(|k, _| waiting_now.contains(k));
        // The queue's calls are the receive loop's, never the pass's.
        pass.calls = calls_between(&before, &p.stats.aws_calls());
        pass.calls.retain(|op, _| !op.starts_with("sqs:"));
        if !mode.dry_run {
            Stats::inc(&p.stats.reconcile_passes);
            p.stats.reconcile_found(counts(&groups, &pass.findings));
        }
        Ok(pass)
    }

    /// A waiting member: what to do about it (None: no layer manages it).
    async fn waiting(
        &self,
        m: &Membership,
        transition: Transition,
        hooks: &[(String, HookInfo)],
        mode: Mode,
        pass: &mut Pass,
        waiting_now: &mut HashSet<String>,
    ) -> Option<Finding> {
        let p = &self.pipeline;
        let found = find::found(m, transition, true, hooks)?;
        let job = job_for(&found, Envelope::Reconcile, Finish::Complete);
        let layer = p.route(&job.event)?.name.clone();
        let key = action_key::key(&found.id, found.phase);
        waiting_now.insert(key.clone());
        let act = match (&job.action, self.who_works(&key).await) {
            (None, _) => Act::NoHook(format!(
                "group {} has no single {transition} hook to complete",
                m.group
            )),
            (_, Err(e)) => Act::Failed(e),
            (_, Ok(Some(owner))) => Act::InProgress(owner),
            (Some(_), Ok(None)) => match self.grace_left(&key, mode.grace) {
                Some(left) => Act::Grace(left),
                None if mode.dry_run => Act::Work,
                None => {
                    pass.started.push((key.clone(), self.start(key, job)));
                    Act::Work
                }
            },
        };
        Some(Finding {
            kind: Kind::Waiting,
            instance: m.instance_id.clone(),
            group: m.group.clone(),
            state: m.state.clone(),
            layer,
            act,
        })
    }

    /// Who works the action `key` names: a run this reconciler started, or any run holding
    /// its action key.
    async fn who_works(&self, key: &str) -> Result<Option<String>, String> {
        if self.running.lock().unwrap().contains(key) {
            return Ok(Some("a reconciled run of this process".into()));
        }
        self.pipeline
            .working_on(key)
            .await
            .map_err(|e| e.to_string())
    }

    /// How much of the grace period is left for an action first seen now or earlier.
    fn grace_left(&self, key: &str, grace: Duration) -> Option<Duration> {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap();
        let first = *seen.entry(key.to_string()).or_insert(now);
        grace.checked_sub(now - first).filter(|d| !d.is_zero())
    }

    /// Starts a run of `job` (its action key `key`) in the background.
    fn start(&self, key: String, job: crate::pipeline::Job) -> JoinHandle<RunReport> {
        let (p, cancel, running) = (
            self.pipeline.clone(),
            self.cancel.clone(),
            self.running.clone(),
        );
        running.lock().unwrap().insert(key.clone());
        info!(instance_id = %job.event.instance_id, group = %job.event.group,
            transition = %job.event.transition, "reconcile: working an action no message announced");
        tokio::spawn(async move {
            let lease = p.leases().hold(None, Instant::now());
            let report = p.run(job, &lease, &cancel).await;
            drop(lease);
            if report.outcome.is_success() {
                Stats::inc(&p.stats.reconciled);
            }
            running.lock().unwrap().remove(&key);
            report
        })
    }

    /// The group's members in service without the configured mark, each acted on as
    /// `reconcile.unconfigured` says.
    async fn unconfigured(
        &self,
        g: &GroupView,
        hooks: &[(String, HookInfo)],
        mode: Mode,
        pass: &mut Pass,
    ) -> Result<(), AwsError> {
        let p = &self.pipeline;
        let in_service: Vec<&Membership> = g
            .members
            .iter()
            .filter(|m| m.state == LifecycleState::InService)
            .collect();
        let ids = in_service
            .iter()
            .filter_map(|m| crate::event::InstanceId::parse(&m.instance_id).ok())
            .collect();
        let unmarked = find::unmarked(p, ids, &self.configured).await?;
        for m in in_service {
            if !unmarked.contains(&m.instance_id) {
                continue;
            }
            let Some(found) = find::found(m, Transition::Launch, false, hooks) else {
                continue;
            };
            let job = job_for(&found, Envelope::Reconcile, Finish::Leave);
            let Some(layer) = p.route(&job.event).map(|l| l.name.clone()) else {
                continue;
            };
            let act = self.act_unconfigured(job, &layer, mode, pass).await;
            pass.findings.push(Finding {
                kind: Kind::Unconfigured,
                instance: m.instance_id.clone(),
                group: g.name.clone(),
                state: m.state.clone(),
                layer,
                act,
            });
        }
        Ok(())
    }

    /// Reports an unconfigured instance (once per process), and configures or replaces it
    /// as the config says.
    async fn act_unconfigured(
        &self,
        job: crate::pipeline::Job,
        layer: &str,
        mode: Mode,
        pass: &mut Pass,
    ) -> Act {
        let p = &self.pipeline;
        let id = job.event.instance_id.clone();
        let how = p.config().reconcile.unconfigured;
        let key = action_key::key(&id, job.event.phase()) + ":in-service";
        if let Ok(Some(owner)) = self.who_works(&key).await {
            return Act::InProgress(owner);
        }
        let act = match how {
            Unconfigured::Off | Unconfigured::Report => Act::Report,
            Unconfigured::Configure => Act::Configure,
            Unconfigured::Replace => Act::Replace,
        };
        if mode.dry_run {
            return act;
        }
        let first = self.reported.lock().unwrap().insert(id.to_string());
        let act = match act {
            Act::Configure => {
                pass.started
                    .push((key.clone(), self.start(key, job.clone())));
                act
            }
            Act::Replace if first => {
                let hooks = p.hooks().clone();
                let retry = p.config().aws.retry_for;
                match crate::retry::with_backoff(retry, || hooks.set_unhealthy(&id)).await {
                    Ok(()) => act,
                    Err(e) => Act::Failed(e.to_string()),
                }
            }
            other => other,
        };
        if first {
            warn!(instance_id = %id, group = %job.event.group, layer, action = how.as_str(),
                "reconcile: instance in service that no launch run of ours configured");
            let body = json!({
                "type": "provision.reconcile",
                "kind": Kind::Unconfigured.as_str(),
                "instance_id": id.as_str(),
                "group": job.event.group,
                "layer": layer,
                "action": how.as_str(),
                "host": crate::claims::hostname(),
            });
            p.publish(body.to_string()).await;
        }
        act
    }

    /// Every `every` until `stop`: a pass, logged. Runs it started get `grace` to finish
    /// once stopped, then are cancelled (their actions released for the next one to work).
    pub async fn run_every(&self, every: Duration, grace: Duration, stop: CancellationToken) {
        let mode = Mode {
            grace: self.pipeline.config().reconcile.grace,
            dry_run: false,
        };
        loop {
            match self.pass(mode).await {
                Ok(pass) => print::log(&pass),
                Err(e) => {
                    warn!(error = %e, "reconcile: cannot read Auto Scaling's groups; trying again next interval")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => break,
            }
        }
        let until = Instant::now() + grace;
        while !self.running.lock().unwrap().is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.cancel.cancel();
        while !self.running.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Instances by (group, kind) for the gauge; every managed group and kind present, zero
/// included, so an alert sees the count fall back.
fn counts(groups: &[GroupView], findings: &[Finding]) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for g in groups {
        for k in [Kind::Waiting, Kind::Unconfigured, Kind::Gone] {
            out.insert((g.name.clone(), k.as_str().to_string()), 0);
        }
    }
    for f in findings {
        *out.entry((f.group.clone(), f.kind.as_str().to_string()))
            .or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_managed_group_and_kind_is_counted_zero_included() {
        let groups = vec![
            GroupView {
                name: "web-a".into(),
                ..GroupView::default()
            },
            GroupView {
                name: "web-b".into(),
                ..GroupView::default()
            },
        ];
        let finding = |group: &str, kind| Finding {
            kind,
            instance: "i-0123456789abcdef0".into(),
            group: group.into(),
            state: LifecycleState::PendingWait,
            layer: "web".into(),
            act: Act::Work,
        };
        let found = counts(
            &groups,
            &[
                finding("web-a", Kind::Waiting),
                finding("web-a", Kind::Waiting),
                finding("web-b", Kind::Unconfigured),
            ],
        );
        let n = |g: &str, k: &str| found[&(g.to_string(), k.to_string())];
        assert_eq!(found.len(), 6);
        assert_eq!(n("web-a", "waiting"), 2);
        assert_eq!(n("web-a", "unconfigured"), 0);
        assert_eq!(n("web-b", "unconfigured"), 1);
        assert_eq!(n("web-b", "gone"), 0);
    }
}
