//! Completing a lifecycle action, and what AWS's answer means.
//!
//! "No active Lifecycle Action" means the action ended without us: by its heartbeat timeout
//! (Auto Scaling applied the hook's DefaultResult: `timed-out`) or by someone else
//! (`already-finished`). A transient error never sends the message back to spend its
//! receive count: while the action can still be completed (AWS's global limit, 100
//! heartbeat timeouts or 48 hours from its start), the message stays in flight (its lease
//! keeps it hidden and heartbeats the action) and completion is tried again with growing
//! backoff. Only shutdown stops that early. A permanent error ends the run as a hook error.
//! A completion is one round of `aws.retry_for` (the AWS call backoff) inside the rounds of a
//! message kept in flight ([`in_flight_rounds`]).
//! Owns no decision about the result itself: the steps made it.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::run::{End, Run};
use crate::aws::{Action, ActionCall, AwsError};
use crate::event::Transition;
use crate::outcome::{Completion, HookResult, Outcome};
use crate::retry::{in_flight_rounds, Retry, AWS_CALL};

/// AWS's global timeout of a lifecycle action: 100 heartbeat timeouts, at most 48 hours.
const GLOBAL_TIMEOUT_MAX: Duration = Duration::from_secs(48 * 3600);

/// What completing an action came to.
enum Completed {
    /// The action is finished: by us with a result, or without us.
    Final(Completion),
    /// Still failing for a transient reason when it had to stop (shutdown, or the action is
    /// past its global timeout): the message goes back.
    Transient(AwsError),
    /// Refused for good (the group or hook is gone, access denied).
    Permanent(AwsError),
}

impl Run<'_> {
    /// Completes the action with `result` (or, as the job says, leaves it), and marks the
    /// claim done with what that came to. `stop` (shutdown, or the claim no longer ours)
    /// ends the completion's later rounds.
    pub(super) async fn complete(
        &mut self,
        result: HookResult,
        stop: &CancellationToken,
    ) -> Result<(), End> {
        let Some(action) = self.job.completing().cloned() else {
            info!(%result, "steps done; the lifecycle action is left as it is (not completing)");
            self.mark_done(Completion::NotCompleted).await;
            return Ok(());
        };
        match self.complete_action(&action, result, stop).await {
            Completed::Final(c) => {
                self.report.hook_result = Some(c);
                if c == Completion::Completed(result) {
                    self.forget_host_keys(result);
                }
            }
            Completed::Transient(_) if self.lost.get().is_some() => return Err(self.stopped()),
            // Stopped by shutdown (or the action's global timeout) while completing still
            // failed: back after the retry delay, its decision kept for the next delivery.
            Completed::Transient(e) => return Err(End::CompletionPending(e)),
            Completed::Permanent(e) => {
                warn!(error = %e, "completing the lifecycle action failed permanently");
                self.report.error = Some(e.to_string());
                self.report.outcome = Outcome::HookError;
            }
        }
        if self.report.hook_result == Some(Completion::TimedOut) {
            self.report.outcome = Outcome::Failed;
            self.report.error.get_or_insert_with(|| {
                "the lifecycle action timed out before it was completed; Auto Scaling applied the hook's DefaultResult".to_string()
            });
        }
        let completion = self.report.hook_result.unwrap_or(Completion::Error);
        self.p.stage(&self.report).await;
        self.mark_done(completion).await;
        Ok(())
    }

    /// Completes an action no steps ran for (no layer matched): its answer, or its error,
    /// in the report; a transient failure at the end ends the run for a retry.
    pub(super) async fn complete_unworked(
        &mut self,
        action: &Action,
        result: HookResult,
    ) -> Result<(), End> {
        match self.complete_action(action, result, self.cancel).await {
            Completed::Final(c) => self.report.hook_result = Some(c),
            Completed::Transient(e) => return Err(End::CompletionPending(e)),
            Completed::Permanent(e) => self.report.error = Some(e.to_string()),
        }
        Ok(())
    }

    /// The action was completed with `result`: when that sends the instance away (its
    /// terminate action, or an ABANDONed launch), its host keys are forgotten. Only after
    /// AWS's answer: until then the instance may still be worked. One returning to the warm
    /// pool comes back with the same keys: they stay.
    fn forget_host_keys(&self, result: HookResult) {
        let phase = self.job.event.phase();
        let leaving = !phase.instance_stays()
            || (result == HookResult::Abandon && phase.transition() == Transition::Launch);
        if let (true, Some(r)) = (leaving, &self.p.shared.remote) {
            r.forget(&self.job.event.instance_id);
        }
    }

    /// Completes `action` with `result`: rounds of `aws.retry_for` while the action can be
    /// completed, until `stop` fires (the attempt under way then still gets its answer).
    async fn complete_action(
        &self,
        action: &Action,
        result: HookResult,
        stop: &CancellationToken,
    ) -> Completed {
        let p = self.p;
        let until = self.completable_until().await;
        let says = "completing still fails for a transient reason; the message stays in flight and the action heartbeated";
        let rounds = Retry::new(in_flight_rounds(p.cfg.aws.retry_for), says)
            .until(until)
            .unless(stop);
        // Each round's own retries stop at `stop` too: at shutdown the run ends within the
        // unit's stop timeout, its decision kept for the next delivery to complete.
        let round = Retry::new(AWS_CALL, "retrying after AWS error")
            .within(p.cfg.aws.retry_for)
            .unless(stop);
        let answer = rounds
            .run(|| round.run(|| p.hooks.complete(action, result)))
            .await;
        match answer {
            Ok(ActionCall::Done) => {
                info!(%result, "completed lifecycle action");
                Completed::Final(Completion::Completed(result))
            }
            Ok(ActionCall::NotActive(reason)) => {
                Completed::Final(self.ended_without_us(&reason).await)
            }
            Err(e) if e.retryable() => Completed::Transient(e),
            Err(e) => Completed::Permanent(e),
        }
    }

    /// Until when the action can still be completed: its start plus AWS's global timeout.
    pub(super) async fn completable_until(&self) -> Instant {
        let ev = &self.job.event;
        let limit = match self.p.verifier.hook(&ev.group, &ev.hook).await {
            Some(info) => (info.heartbeat_timeout * 100).min(GLOBAL_TIMEOUT_MAX),
            None => GLOBAL_TIMEOUT_MAX,
        };
        Instant::now() + limit.saturating_sub(self.waited().unwrap_or_default())
    }

    /// "No active Lifecycle Action": timed out, when nothing (no heartbeat of ours, nor the
    /// action's start) shows it alive within one heartbeat timeout, or when it is past its
    /// global timeout (heartbeats cannot keep an action longer); otherwise finished by
    /// someone else.
    async fn ended_without_us(&self, reason: &str) -> Completion {
        let ev = &self.job.event;
        let timeout = self
            .p
            .verifier
            .hook(&ev.group, &ev.hook)
            .await
            .map(|i| i.heartbeat_timeout);
        let since_alive = match self.lease.last_heartbeat() {
            Some(at) => SystemTime::now().duration_since(at).ok(),
            None => self.waited(),
        };
        let age = self.waited();
        match (timeout, since_alive) {
            (Some(t), Some(quiet)) if quiet > t => {
                warn!(%reason, quiet = ?quiet, heartbeat_timeout = ?t,
                    "the lifecycle action timed out before it was completed: Auto Scaling applied the hook's DefaultResult");
                Completion::TimedOut
            }
            (Some(t), _) if age.is_some_and(|a| a >= (t * 100).min(GLOBAL_TIMEOUT_MAX)) => {
                warn!(%reason, age = ?age, heartbeat_timeout = ?t,
                    "the lifecycle action reached its global timeout (100 heartbeat timeouts, at most 48 h) before it was completed: Auto Scaling applied the hook's DefaultResult");
                Completion::TimedOut
            }
            _ => {
                info!(%reason, "lifecycle action was already finished (by another worker or its timeout)");
                Completion::AlreadyFinished
            }
        }
    }
}
