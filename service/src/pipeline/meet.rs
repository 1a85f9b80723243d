//! Where a run meets every other path to its action: the action key ([`crate::action_key`]).
//!
//! A run that works a waiting action holds its action key from before Auto Scaling is asked
//! until the run ends, whatever delivered it (a message, the reconciler, an operator). A run
//! that had to wait for the key (another path was working the action) looks at the instance
//! afresh once it holds it, and so does every reconciled run: an action that was finished
//! meanwhile ends the run as a duplicate, its steps not run again. A run that completes no
//! pending action holds a key only when the reconciler configures an instance in service.
//! Owns neither the token's claim (`claim.rs`) nor Auto Scaling's confirmation (`verify.rs`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::run::{End, Run};
use crate::action_key::{self, Taken, Taker};
use crate::aws::LifecycleState;
use crate::clock::now_ms;
use crate::event::Envelope;
use crate::event::Transition;
use crate::outcome::{Completion, HookResult};
use crate::retry::{in_flight_rounds, with_backoff, Retry};

impl Run<'_> {
    /// Holds the job's action key, waiting while another owner works the action. `lost`
    /// fires if another owner takes it over later.
    pub(super) async fn hold_action(&mut self, lost: &CancellationToken) -> Result<(), End> {
        let Some(key) = self.action_key() else {
            return Ok(());
        };
        let p = self.p;
        let taker = Taker {
            claims: p.claims.clone(),
            owner: p.owner.clone(),
            lease: p.cfg.state.claim_lease,
            run_id: self.report.run_id.unwrap_or_default(),
        };
        let rounds = in_flight_rounds(p.cfg.aws.retry_for);
        let says = "the claim store fails for a transient reason; trying again";
        // A run of this instance that went first here may have ended the action meanwhile.
        let mut waited = self.turn_waited();
        loop {
            waited |= p.actions.busy(&key);
            let turn = p
                .actions
                .enter(&key, self.cancel)
                .await
                .ok_or(End::Cancelled)?;
            let taken = Retry::new(rounds, says)
                .unless(self.cancel)
                .run(|| taker.take(&key, lost.clone()))
                .await;
            match taken {
                Ok(Taken::Ours(hold)) => {
                    self.action_hold = Some(hold.with_turn(turn));
                    break;
                }
                Ok(Taken::Busy { owner, until_ms }) => {
                    if !waited {
                        info!(holder = %owner, lease_left_ms = until_ms - now_ms(),
                            "another path works this lifecycle action; waiting for it");
                    }
                    waited = true;
                    drop(turn);
                    let every = (p.cfg.state.claim_lease / 6)
                        .clamp(Duration::from_millis(500), Duration::from_secs(5));
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = self.cancel.cancelled() => return Err(End::Cancelled),
                    }
                }
                Err(_) if self.cancel.is_cancelled() => return Err(End::Cancelled),
                Err(e) => return Err(End::ClaimStore(e)),
            }
        }
        let reconciled = self.job.event.envelope == Envelope::Reconcile;
        if waited || reconciled {
            self.still_waiting(reconciled).await?;
        }
        Ok(())
    }

    /// The action key this run holds: its pending action's, or (the reconciler configuring
    /// an instance in service) the instance's launch.
    fn action_key(&self) -> Option<String> {
        let ev = &self.job.event;
        match &self.job.action {
            Some(a) => Some(action_key::key(&a.instance_id, ev.phase())),
            None if ev.envelope == Envelope::Reconcile => {
                Some(action_key::key(&ev.instance_id, ev.phase()) + ":in-service")
            }
            None => None,
        }
    }

    /// Asks Auto Scaling afresh (no cache) whether the instance still waits for the job's
    /// action; a finished one ends the run as a duplicate. A reconciled run's history says
    /// what it found.
    async fn still_waiting(&mut self, reconciled: bool) -> Result<(), End> {
        let ev = &self.job.event;
        let Some(action) = self.job.action.clone() else {
            return Ok(());
        };
        let hooks = self.p.hooks.clone();
        let retry = self.p.cfg.aws.retry_for;
        let member = with_backoff(retry, || hooks.membership(&action.instance_id))
            .await
            .map_err(End::Unverified)?;
        let state = member
            .as_ref()
            .filter(|m| m.group == action.group)
            .map(|m| m.state.clone());
        match state {
            Some(s) if s.waits_for(ev.phase()) => {
                if reconciled {
                    self.report.note = Some(format!(
                        "reconciled: found waiting in {s} with no run of ours working it (no message announced it in time)"
                    ));
                }
                Ok(())
            }
            other => {
                let now = other
                    .as_ref()
                    .map_or("not in the group", LifecycleState::as_str);
                info!(
                    state = now,
                    "the lifecycle action was finished by another path meanwhile; nothing to do"
                );
                self.report.note = Some(format!(
                    "the lifecycle action was finished by another path meanwhile (the instance is now {now})"
                ));
                self.report.hook_result = Some(Completion::AlreadyFinished);
                self.mark_done(Completion::AlreadyFinished).await;
                Err(End::Duplicate)
            }
        }
    }
}

/// The tag a launch run writes once its steps succeeded (after it completed CONTINUE), when
/// `reconcile.unconfigured` looks for instances in service that no run configured: the
/// record the whole fleet shares, one CreateTags a burst (batched by layer).
pub const CONFIGURED_TAG: &str = "provision:configured";

impl Run<'_> {
    /// Marks the instance configured when the launch steps succeeded (and reconcile looks
    /// for unconfigured instances). A failure to tag is logged: the instance is then reported
    /// unconfigured, and the steps (safe to repeat) may run again.
    pub(super) fn mark_configured(&self) {
        let ev = &self.job.event;
        let continued = matches!(
            self.report.hook_result,
            Some(Completion::Completed(HookResult::Continue)) | None
        ) && self.report.decision == Some(HookResult::Continue);
        if !continued
            || ev.transition != Transition::Launch
            || !self.p.cfg.reconcile.unconfigured.marks()
        {
            return;
        }
        // The layer's name: the same value for a burst, so one CreateTags tags them all.
        let value = self.report.layer.clone().unwrap_or_else(|| "-".into());
        let tag = (CONFIGURED_TAG.to_string(), value);
        // Not awaited: the run (and its message's slot) does not wait for the burst's
        // batch; the batch is flushed at shutdown (`Pipeline::take_mark_task`).
        let (mark, id) = (self.p.shared.mark.clone(), ev.instance_id.clone());
        tokio::spawn(async move {
            if let Err(e) = mark.submit((id, tag)).await {
                warn!(error = %e, tag = CONFIGURED_TAG,
                    "could not mark the instance configured; reconcile will report it unconfigured");
            }
        });
    }
}

/// The claim-store key that says an instance's terminate steps ran to a CONTINUE (by a
/// message's run, or by the reconciler for an instance gone without one): shared by the
/// fleet, so no reconciler decommissions it again. Two claim-store writes a terminate.
pub fn decommissioned_key(instance: &crate::event::InstanceId) -> String {
    format!("decommissioned:{instance}")
}

impl Run<'_> {
    /// Records that the instance was decommissioned when its terminate steps succeeded.
    pub(super) async fn mark_decommissioned(&self, result: HookResult) {
        let ev = &self.job.event;
        if result != HookResult::Continue
            || ev.transition != Transition::Terminate
            || !self.p.cfg.reconcile.records()
        {
            return;
        }
        let key = decommissioned_key(&ev.instance_id);
        let (claims, owner) = (&self.p.claims, &self.p.owner);
        let run_id = self.report.run_id.unwrap_or_default();
        let lease = self.p.cfg.state.claim_lease;
        let written = match claims.claim(&key, owner, run_id, lease).await {
            Ok(_) => claims
                .done(&key, owner, Completion::Completed(result))
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            warn!(error = %e, "could not record the decommissioning; a reconcile pass may run the terminate steps that need no instance again (they are safe to repeat)");
        }
    }
}
