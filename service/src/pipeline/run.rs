//! The story of one run, and every way it ends.
//!
//! A [`Run`] owns one lifecycle action's state: its job, the lease that keeps its message
//! hidden and heartbeats its action, the source's cancellation, and its report. [`Run::go`]
//! reads top to bottom in the order things happen; each stage returns `Result<_, End>`,
//! where an [`End`] names a way the run stops early, and [`Run::end`] is the one place that
//! turns how the run ended into its record. The stages themselves live in the files named
//! beside each call.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::claim::{Lost, WorkingGuard};
use super::{Job, Pipeline, RunReport, Trust};
use crate::aws::AwsError;
use crate::claims::{Claim, ClaimError};
use crate::config::Unmatched;
use crate::lease::{Beat, Lease};
use crate::outcome::{Completion, HookResult, Outcome};

/// A way a run stops before its action is completed for good.
#[derive(Debug)]
pub(super) enum End {
    /// No layer matches the event (`daemon.unmatched` said what became of the hook).
    Unmatched,
    /// The source stopped waiting (shutdown, the Lambda deadline): the message goes back.
    Cancelled,
    /// The claim is no longer this run's: another owner took it over, or its lease could
    /// not be renewed before it would lapse. The steps stopped; nothing is completed.
    ClaimLost(Lost),
    /// The action was completed before: nothing runs.
    Duplicate,
    /// The claim store cannot claim or record the run.
    ClaimStore(ClaimError),
    /// Auto Scaling does not confirm the action: nothing may run for the message.
    Forged(String),
    /// Auto Scaling could not be asked.
    Unverified(AwsError),
    /// Completing still failed for a transient reason when the run had to stop; its
    /// decision is kept for the next delivery.
    CompletionPending(AwsError),
}

impl End {
    /// What the run's outcome is.
    fn outcome(&self) -> Outcome {
        match self {
            End::Unmatched => Outcome::Unmatched,
            End::Cancelled | End::ClaimLost(_) => Outcome::Released,
            End::Duplicate => Outcome::Duplicate,
            End::Forged(_) => Outcome::Rejected,
            End::ClaimStore(_) | End::Unverified(_) | End::CompletionPending(_) => Outcome::Retry,
        }
    }

    /// The error the history keeps.
    fn error(&self) -> Option<String> {
        match self {
            End::Unmatched | End::Cancelled | End::Duplicate => None,
            End::ClaimLost(lost) => Some(format!(
                "{lost}: the steps were stopped, nothing was completed"
            )),
            End::ClaimStore(e) => Some(e.to_string()),
            End::Forged(why) => Some(format!("forged or stale: {why}")),
            End::Unverified(e) => Some(format!("cannot verify the lifecycle action: {e}")),
            End::CompletionPending(e) => Some(e.to_string()),
        }
    }

    /// Whether the claim is forgotten, so the next delivery starts over instead of
    /// trusting a half-run (a decision, once made, is kept). A lost claim is not: it is
    /// another owner's, or its lease (which the steps stopped inside of) is the fence, and
    /// a release could let the next owner start before this host's work is stopped.
    fn forgets_claim(&self) -> bool {
        matches!(self, End::Cancelled | End::Forged(_) | End::Unverified(_))
    }

    fn log(&self) {
        match self {
            End::Unmatched | End::Cancelled | End::ClaimLost(_) => {}
            End::Duplicate => {
                info!("lifecycle action already completed; acknowledging duplicate")
            }
            End::ClaimStore(e) => {
                warn!(error = %e, "cannot record or claim the run; leaving the message for a retry")
            }
            End::Forged(why) => warn!(%why,
                "rejected message: Auto Scaling does not confirm this lifecycle action; nothing runs"),
            End::Unverified(e) => warn!(error = %e,
                "cannot verify the lifecycle action with Auto Scaling; the message will come back"),
            End::CompletionPending(e) => warn!(error = %e,
                "could not complete the lifecycle action; the message will come back"),
        }
    }
}

/// One lifecycle action being worked.
pub(super) struct Run<'a> {
    pub(super) p: &'a Pipeline,
    pub(super) job: Job,
    pub(super) lease: &'a Lease,
    /// The source's: shutdown, the Lambda deadline.
    pub(super) cancel: &'a CancellationToken,
    pub(super) report: RunReport,
    /// When the call that won the claim was sent (the lease runs from then at the latest);
    /// None while the claim store holds no claim of this run's.
    pub(super) claimed_at: Option<tokio::time::Instant>,
    /// Whether Auto Scaling confirmed the action (and its token) for this run.
    confirmed: bool,
    /// Set by the claim's keeper when the claim stops being this run's.
    pub(super) lost: Arc<OnceLock<Lost>>,
    /// This process's turn at the token, held until the run is recorded (and its claim,
    /// if forgotten, released), so a second delivery waiting here finds it settled.
    turn: Option<WorkingGuard<'a>>,
    /// The action key, held from before Auto Scaling is asked until the run ends
    /// (`meet.rs`).
    pub(super) action_hold: Option<crate::action_key::Hold>,
    /// The Spot interruption deadline of a terminate run's instance (`steps.rs`), RFC 3339.
    pub(super) deadline: Option<String>,
}

impl<'a> Run<'a> {
    pub(super) fn new(
        p: &'a Pipeline,
        job: Job,
        lease: &'a Lease,
        cancel: &'a CancellationToken,
    ) -> Run<'a> {
        let report = RunReport::of(p, &job.event);
        Run {
            p,
            job,
            lease,
            cancel,
            report,
            claimed_at: None,
            confirmed: false,
            lost: Arc::default(),
            turn: None,
            action_hold: None,
            deadline: None,
        }
    }

    /// The whole run, recorded.
    pub(super) async fn go(mut self) -> RunReport {
        let ended = self.story().await;
        self.end(ended).await
    }

    /// The story of one run, in the order it happens. Nothing is stored, claimed or run
    /// for a message before Auto Scaling confirmed it and its token proved the action.
    async fn story(&mut self) -> Result<(), End> {
        // The cheap check: some layer takes the group (by name), or nothing is asked of AWS.
        if !self.p.could_route(&self.job) {
            return Err(self.unmatched().await);
        }
        // Auto Scaling's word, the token proven by the first heartbeat (verify.rs). Asking
        // changes nothing, so deliveries for one instance ask at once: junk naming an
        // instance cannot hold up its genuine message.
        self.confirm().await?;
        // One run per instance's lifecycle actions in this process; a second delivery waits
        // (claim.rs). A Spot warning's `interrupt` steps (no action of their own) start at
        // once, beside the terminate run they are there to get ahead of.
        if !self.job.interrupt {
            self.turn = Some(self.wait_turn().await?);
        }
        self.start_heartbeat().await;
        // Routed on the hook's metadata and the phase AWS confirmed, not the message's.
        let Some(layer) = self.p.layer_for(&self.job) else {
            return Err(self.unmatched().await);
        };
        tracing::Span::current().record("layer", layer.name.as_str());
        self.report.layer = Some(layer.name.clone());
        // The history row, then the claim in the claim store (claim.rs).
        let claim = self.claim(&layer).await?;
        // Ours until the run ends: renewed meanwhile; losing it stops the steps.
        let (_keeper, stop) = self.hold_claim();
        // Every path to the action (message, reconciler, operator) meets here (meet.rs).
        self.hold_action(&stop).await?;
        let result = match claim {
            Claim::Decided(result) => {
                info!(%result, "steps already ran for this action; completing their decision");
                self.adopt_decision(result).await;
                result
            }
            _ => self.run_steps(&layer, &stop).await?, // steps.rs
        };
        self.decide(result, &stop).await?;
        self.mark_decommissioned(result).await; // meet.rs
        self.complete(result, &stop).await?; // complete.rs
                                             // After the completion, off the instance's path into service: the tag is batched
                                             // with the burst's (reconcile's grace covers the moment between the two).
        self.mark_configured(); // meet.rs
        Ok(())
    }

    /// How the run ended, into its report, its claim and its history row; the result
    /// event published when the run is final.
    async fn end(mut self, ended: Result<(), End>) -> RunReport {
        if let Some(hold) = self.action_hold.take() {
            hold.release().await;
        }
        if let Err(end) = ended {
            end.log();
            // A run that ended before its row was opened (rejected, a duplicate, AWS not
            // answering) is still recorded: once, finished, after the cheap checks passed.
            if self.report.run_id.is_none() && !matches!(end, End::Cancelled | End::Unmatched) {
                let layer = self.report.layer.clone();
                match self.p.open_run(&self.job, layer.as_deref()).await {
                    Ok(id) => self.report.run_id = Some(id),
                    Err(e) => warn!(error = %e, "could not record the run"),
                }
            }
            if end.forgets_claim() && self.claimed_at.is_some() {
                if let Err(e) = self
                    .p
                    .claims
                    .release(&self.job.event.token, &self.p.owner)
                    .await
                {
                    warn!(error = %e, "could not release the claim");
                }
            }
            self.report.outcome = end.outcome();
            if let Some(error) = end.error() {
                self.report.error = Some(error);
            }
        }
        self.report.heartbeats = self.lease.heartbeats();
        self.p.finish(self.report).await
    }

    /// No layer matches: the event recorded, and the action completed if
    /// `daemon.unmatched` says so.
    async fn unmatched(&mut self) -> End {
        let mut end = End::Unmatched;
        match (self.p.cfg.daemon.unmatched, self.job.completing().cloned()) {
            (Unmatched::Complete(result), Some(action)) => {
                // Only an action Auto Scaling confirmed is completed for nobody's layer.
                if let Err(not) = self.confirm().await {
                    return not;
                }
                self.report.decision = Some(result);
                self.report.cause = Some("no layer matches the group (daemon.unmatched)".into());
                if let Err(pending) = self.complete_unworked(&action, result).await {
                    end = pending;
                }
                warn!(%result, "no layer matches this group; completed the hook per daemon.unmatched");
            }
            _ => warn!(
                "no layer matches this group; leaving the hook alone (daemon.unmatched = \"ignore\")"
            ),
        }
        match self.p.open_run(&self.job, None).await {
            Ok(id) => self.report.run_id = Some(id),
            Err(e) => warn!(error = %e, "could not record the unmatched event"),
        }
        end
    }

    /// Joins the action's heartbeat to the lease, at a third of the hook's timeout. A
    /// proven action was just heartbeated (the proof is a heartbeat); an action read from
    /// Auto Scaling by a manual run is heartbeated at once when it waited longer than that.
    async fn start_heartbeat(&self) {
        let Some(action) = &self.job.action else {
            return;
        };
        let every = self.p.verifier.heartbeat_every(action).await;
        let beat = match self.waited() {
            _ if self.confirmed && self.job.trust == Trust::Verify => Beat::AfterInterval,
            Some(w) if w >= every => {
                info!(waited = ?w, "the action waited long: heartbeating at once");
                Beat::AtOnce
            }
            _ => Beat::AfterInterval,
        };
        self.lease.beat(action.clone(), every, beat);
    }

    /// Auto Scaling's confirmation of a job from a message, its token proven by a
    /// heartbeat (which counts as the action's first); its metadata replaces the
    /// message's. A token AWS does not know is no action of ours unless the claim store
    /// shows we finished it (a crash between completing and recording it): a duplicate.
    async fn confirm(&mut self) -> Result<(), End> {
        if self.confirmed || self.job.trust == Trust::FromAutoScaling {
            return Ok(());
        }
        let Some(action) = self.job.action.clone() else {
            return Ok(());
        };
        let until = self.completable_until().await;
        let asked = self
            .p
            .verifier
            .confirm(&self.job.event, &action, until, self.cancel);
        let verified = match asked.await {
            Err(End::Unverified(_)) if self.cancel.is_cancelled() => return Err(End::Cancelled),
            Err(End::Forged(why)) => return self.forged_or_finished(why).await,
            other => other?,
        };
        self.lease.beaten();
        self.confirmed = true;
        if verified.note.is_some() {
            self.report.note = verified.note;
        }
        self.job.event.metadata = verified.metadata;
        Ok(())
    }

    /// A token Auto Scaling refused: forged, unless the claim store says this fleet
    /// completed the action (a duplicate), or decided it: a run of ours proved the token,
    /// ran the steps and died completing. Then the run goes on without steps, only
    /// completing that decision (which finds the action ended) and reporting it once.
    async fn forged_or_finished(&mut self, why: String) -> Result<(), End> {
        let token = &self.job.event.token;
        match self.p.claims.peek(token, &self.p.owner).await {
            Ok(Claim::Done { result, .. }) => {
                self.report.hook_result = result;
                Err(End::Duplicate)
            }
            // Another host works it (its own copy of the message is the live one).
            Ok(Claim::Held { owner, .. }) => {
                info!(holder = %owner, "the action is no longer active and another owner holds its claim");
                Err(End::Duplicate)
            }
            Ok(Claim::Decided(result)) => {
                info!(%result, "the action is no longer active, but a run of ours decided it: reporting that decision");
                self.confirmed = true;
                Ok(())
            }
            _ => Err(End::Forged(self.stale_hint(why).await)),
        }
    }

    /// A refused token's reason, with a hint when the message is older than its hook's
    /// heartbeat timeout (a genuine message that waited that long found its action timed
    /// out; nothing here can tell it from a forged one, so no result event says so).
    async fn stale_hint(&self, why: String) -> String {
        let ev = &self.job.event;
        let timeout = self.p.verifier.hook(&ev.group, &ev.hook).await;
        match (self.waited(), timeout) {
            (Some(waited), Some(hook)) if waited > hook.heartbeat_timeout => format!(
                "{why}; the message was sent {}s ago, past the hook's {}s heartbeat timeout: if genuine, its action timed out and Auto Scaling applied the hook's DefaultResult",
                waited.as_secs(),
                hook.heartbeat_timeout.as_secs()
            ),
            _ => why,
        }
    }

    /// The steps are over with `result`: the run's decision, remembered (and, in the run's
    /// row, its cause) before completing, so that a crash now only leaves the completion.
    /// Fenced: a claim that is no longer this run's (taken over, or its lease lapsing) is
    /// not decided, and nothing is completed.
    async fn decide(&mut self, result: HookResult, stop: &CancellationToken) -> Result<(), End> {
        self.report.decide(result);
        let token = &self.job.event.token;
        match self.p.claims.decide(token, &self.p.owner, result).await {
            Ok(true) => {}
            Ok(false) => return Err(End::ClaimLost(Lost::TakenOver)),
            // Unknown whether it was written: the lease, renewed in time, still says the
            // claim is ours (the keeper fires `stop` before it could lapse).
            Err(e) => {
                warn!(error = %e, "could not record the decision; completing within the lease")
            }
        }
        if stop.is_cancelled() {
            return Err(self.stopped());
        }
        if let Some(run_id) = self.report.run_id {
            let cause = self.report.cause.as_deref().unwrap_or_default();
            if let Err(e) = self.p.store.note_decision(run_id, result, cause).await {
                warn!(error = %e, "could not record the decision's cause");
            }
        }
        Ok(())
    }

    /// A redelivery of an action whose steps already ran: the run reports the decision
    /// recorded then, and its cause, not steps of its own.
    async fn adopt_decision(&mut self, result: HookResult) {
        let earlier = match self.p.store.decision_of(&self.job.event.token).await {
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
        self.report.cause = Some(match cause {
            Some(c) if !c.is_empty() => format!("{from}: {c}"),
            _ => from,
        });
        if result == HookResult::Abandon {
            self.report.outcome = Outcome::Failed;
        }
    }

    /// Whether this run waited for another run of its instance in this process.
    pub(super) fn turn_waited(&self) -> bool {
        self.turn.as_ref().is_some_and(|t| t.waited)
    }

    /// Why `stop` fired: the source stopped waiting, or the claim is no longer ours.
    pub(super) fn stopped(&self) -> End {
        match self.lost.get() {
            _ if self.cancel.is_cancelled() => End::Cancelled,
            Some(lost) => End::ClaimLost(*lost),
            None => End::Cancelled,
        }
    }

    /// How long ago the event's message was sent (None: it does not say).
    pub(super) fn waited(&self) -> Option<Duration> {
        let sent = humantime::parse_rfc3339_weak(self.job.event.time.as_deref()?).ok()?;
        Some(SystemTime::now().duration_since(sent).unwrap_or_default())
    }

    /// The action is finished for good (completed, found finished, or left as it is):
    /// recorded while the claim is still this run's.
    pub(super) async fn mark_done(&self, completion: Completion) {
        let token = &self.job.event.token;
        match self.p.claims.done(token, &self.p.owner, completion).await {
            Ok(true) => {}
            Ok(false) => warn!("the claim was taken over before the action's end was recorded; its new owner records it"),
            Err(e) => warn!(error = %e, "could not record the action's end (a redelivery would find it finished in AWS)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_has_its_outcome_and_only_unfinished_work_forgets_its_claim() {
        let aws = || AwsError::permanent("Op", "no");
        let table = [
            (End::Unmatched, Outcome::Unmatched, false),
            (End::Cancelled, Outcome::Released, true),
            (End::ClaimLost(Lost::TakenOver), Outcome::Released, false),
            (End::ClaimLost(Lost::Lapsed), Outcome::Released, false),
            (End::Duplicate, Outcome::Duplicate, false),
            (
                End::ClaimStore(ClaimError::new("state store", "gone")),
                Outcome::Retry,
                false,
            ),
            (End::Forged("no".into()), Outcome::Rejected, true),
            (End::Unverified(aws()), Outcome::Retry, true),
            // The decision is kept: the next delivery only completes it.
            (End::CompletionPending(aws()), Outcome::Retry, false),
        ];
        for (end, outcome, forgets) in table {
            assert_eq!(end.outcome(), outcome, "{end:?}");
            assert_eq!(end.forgets_claim(), forgets, "{end:?}");
            // Whatever goes back to the queue says why, except a plain cancellation.
            let returns = matches!(outcome, Outcome::Retry | Outcome::Rejected);
            assert!(!returns || end.error().is_some(), "{end:?}");
        }
        assert!(End::Forged("gone".into())
            .error()
            .unwrap()
            .starts_with("forged or stale"));
    }
}
