//! Instances that left a managed group without a terminate run of ours.
//!
//! Candidates are the instances this host's history shows a successful launch run for and
//! no terminate run (an instance terminated before any of our runs saw it has nothing to
//! decommission, and one another host launched is that host's to find). A candidate that no
//! managed group lists, that Auto Scaling places in no group (DescribeAutoScalingInstances:
//! a warm pool instance is still placed), and whose decommissioning no one recorded
//! ([`crate::pipeline::decommissioned_key`]) is gone: its layer's terminate steps that act
//! without the instance (`opsworks` deregistration) run as a reconciled job, the metadata
//! that of its launch run; the steps that need the instance are reported.

use std::collections::HashSet;

use serde_json::Value;

use super::{Act, Finding, Kind, Mode, Pass, Reconciler};
use crate::aws::{GroupView, LifecycleState};
use crate::claims::Claim;
use crate::event::{Envelope, InstanceId, Metadata, Phase, Transition};
use crate::instance::{job_for, Found};
use crate::pipeline::{decommissioned_key, Finish};
use crate::retry::with_backoff;

/// How many candidates one pass looks at.
const MAX_CANDIDATES: i64 = 500;

/// A launch of ours with no terminate run after it.
struct Candidate {
    instance: InstanceId,
    group: String,
    /// The launch run's metadata (the hook's own), as JSON text.
    metadata: Option<String>,
}

/// The launches in this host's history with no terminate run, latest first: those of the
/// reconciler's source (its account and region; rows from before sources had one belong
/// to the `[queue]` source), since another account's instance is unknown to this one's.
async fn candidates(r: &Reconciler) -> Vec<Candidate> {
    let scope = r.pipeline.scope().cloned();
    let account = scope.as_ref().map(|s| s.account.clone());
    let region = scope.as_ref().map(|s| s.region.clone());
    let legacy = r.pipeline.source_name() == crate::sources::DEFAULT_SOURCE;
    let rows = r
        .pipeline
        .store()
        .call(move |c| {
            let mut stmt = c.prepare(
                "SELECT instance_id, group_name, event FROM runs r
                 WHERE transition = 'launch' AND outcome = 'succeeded' AND instance_id IS NOT NULL
                   AND (?2 IS NULL OR CASE WHEN json_valid(event) AND json_extract(event, '$.source') IS NOT NULL
                        THEN json_extract(event, '$.source.account') = ?2 AND json_extract(event, '$.source.region') = ?3
                        ELSE ?4 END)
                   AND NOT EXISTS (SELECT 1 FROM runs t WHERE t.instance_id = r.instance_id
                                   AND t.transition = 'terminate' AND t.outcome IN ('succeeded', 'failed', 'duplicate'))
                 GROUP BY instance_id ORDER BY MAX(id) DESC LIMIT ?1",
            )?;
            let rows = stmt
                .query_map(rusqlite::params![MAX_CANDIDATES, account, region, legacy], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, Option<String>>(1)?,
                        row.get::<_, Option<String>>(2)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await;
    let rows = rows.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "reconcile: cannot read the history's launches");
        Vec::new()
    });
    rows.into_iter()
        .filter_map(|(id, group, event)| {
            let metadata = event
                .and_then(|e| serde_json::from_str::<Value>(&e).ok())
                .and_then(|e| e.get("metadata").filter(|m| !m.is_null()).cloned())
                .map(|m| match m {
                    Value::String(s) => s,
                    other => other.to_string(),
                });
            Some(Candidate {
                instance: InstanceId::parse(&id).ok()?,
                group: group.unwrap_or_default(),
                metadata,
            })
        })
        .collect()
}

impl Reconciler {
    /// Finds the candidates that are gone, and decommissions or reports each.
    pub(super) async fn gone(&self, groups: &[GroupView], mode: Mode, pass: &mut Pass) {
        let members: HashSet<&str> = groups
            .iter()
            .flat_map(|g| g.members.iter().map(|m| m.instance_id.as_str()))
            .collect();
        for c in candidates(self).await {
            if members.contains(c.instance.as_str())
                || self.reported.lock().unwrap().contains(c.instance.as_str())
            {
                continue;
            }
            match self.is_gone(&c).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(instance_id = %c.instance, error = %e, "reconcile: cannot tell whether the instance is gone");
                    continue;
                }
            }
            if let Some(f) = self.decommission(c, mode, pass).await {
                pass.findings.push(f);
            }
        }
    }

    /// Whether Auto Scaling places the instance in no group, and nobody recorded its
    /// decommissioning.
    async fn is_gone(&self, c: &Candidate) -> Result<bool, String> {
        let p = &self.pipeline;
        let hooks = p.hooks().clone();
        let retry = p.config().aws.retry_for;
        let placed = with_backoff(retry, || hooks.membership(&c.instance))
            .await
            .map_err(|e| e.to_string())?;
        if placed.is_some_and(|m| !matches!(m.state, LifecycleState::Terminated)) {
            return Ok(false);
        }
        let key = decommissioned_key(&c.instance);
        match p.peek_claim(&key).await.map_err(|e| e.to_string())? {
            Claim::Done { .. } => Ok(false),
            _ => Ok(true),
        }
    }

    /// The reconciled job for a gone instance: its layer's steps that act without it.
    async fn decommission(&self, c: Candidate, mode: Mode, pass: &mut Pass) -> Option<Finding> {
        let p = &self.pipeline;
        let hooks = super::find::hooks_of(p, &self.hooks, &c.group)
            .await
            .unwrap_or_default();
        let hook = hooks
            .iter()
            .find(|(_, h)| h.transition == Transition::Terminate)
            .cloned();
        let found = Found {
            id: c.instance.clone(),
            group: c.group.clone(),
            state: None,
            transition: Transition::Terminate,
            phase: Phase::Terminate,
            pending: false,
            hook,
        };
        let mut job = job_for(&found, Envelope::Reconcile, Finish::Leave);
        job.event.metadata = Metadata::parse(c.metadata.as_deref());
        job.instance_gone = true;
        let layer = p.route(&job.event)?;
        let (api, others): (Vec<_>, Vec<_>) = layer
            .steps(Phase::Terminate)
            .iter()
            .partition(|s| s.acts_without_instance());
        let act = match (api.is_empty(), others.is_empty()) {
            (true, true) => return None,
            (true, false) => Act::NotRun(describe(&others)),
            (false, _) if mode.dry_run => Act::Decommission(describe(&others)),
            (false, _) => {
                let key = crate::action_key::key(&c.instance, Phase::Terminate) + ":in-service";
                pass.started.push((key.clone(), self.start(key, job)));
                Act::Decommission(describe(&others))
            }
        };
        if !mode.dry_run {
            self.reported.lock().unwrap().insert(c.instance.to_string());
        }
        Some(Finding {
            kind: Kind::Gone,
            instance: c.instance.to_string(),
            group: c.group,
            state: LifecycleState::Other("gone".into()),
            layer: layer.name.clone(),
            act,
        })
    }
}

fn describe(steps: &[&crate::step::Step]) -> Vec<String> {
    steps.iter().map(|s| s.describe()).collect()
}
