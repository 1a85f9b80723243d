//! Completing a lifecycle action, and what AWS's answer means.
//!
//! "No active Lifecycle Action" means the action ended without us: by its heartbeat timeout
//! (Auto Scaling applied the hook's DefaultResult: `timed-out`) or by someone else
//! (`already-finished`). A transient error never sends the message back to spend its
//! receive count: while the action can still be completed (AWS's global limit, 100
//! heartbeat timeouts or 48 hours from its start), the message stays in flight (its lease
//! keeps it hidden and heartbeats the action) and completion is tried again with growing
//! backoff. Only shutdown stops that early. A permanent error ends the run as a hook error.
//! Owns no decision about the result itself: the steps made it.

use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{age, Job, Pipeline};
use crate::aws::retry::{backoff, with_backoff};
use crate::aws::{Action, ActionCall, AwsError};
use crate::lease::Lease;
use crate::outcome::{Completion, HookResult};

/// The longest pause between two rounds of completion once `aws.retry_for` is spent.
const MAX_ROUND_DELAY: Duration = Duration::from_secs(300);
/// AWS's global timeout of a lifecycle action: 100 heartbeat timeouts, at most 48 hours.
const GLOBAL_TIMEOUT_MAX: Duration = Duration::from_secs(48 * 3600);

/// What completing an action came to.
pub(super) enum Completed {
    /// The action is finished: by us with a result, or without us.
    Final(Completion),
    /// Still failing for a transient reason when it had to stop (shutdown, or the action is
    /// past its global timeout): the message goes back.
    Transient(AwsError),
    /// Refused for good (the group or hook is gone, access denied).
    Permanent(AwsError),
}

impl Pipeline {
    /// Completes `action` with `result`. The first round (`aws.retry_for`) runs to its end
    /// even during shutdown; later rounds run while the action can be completed and
    /// `cancel` has not fired.
    pub(super) async fn complete(
        &self,
        job: &Job,
        action: &Action,
        result: HookResult,
        lease: &Lease,
        cancel: &CancellationToken,
    ) -> Completed {
        let until = self.completable_until(job).await;
        let mut round = 0;
        loop {
            let answer = with_backoff(self.cfg.aws.retry_for, || {
                self.hooks.complete(action, result)
            })
            .await;
            let e = match answer {
                Ok(ActionCall::Done) => {
                    info!(%result, "completed lifecycle action");
                    return Completed::Final(Completion::Completed(result));
                }
                Ok(ActionCall::NotActive(reason)) => {
                    return Completed::Final(self.ended_without_us(job, lease, &reason).await)
                }
                Err(e) if !e.retryable() => return Completed::Permanent(e),
                Err(e) => e,
            };
            if cancel.is_cancelled() || SystemTime::now() >= until {
                return Completed::Transient(e);
            }
            round += 1;
            let delay = round_delay(round, self.cfg.aws.retry_for);
            warn!(error = %e, round, next_in = ?delay,
                "completing still fails for a transient reason; the message stays in flight and the action heartbeated");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = cancel.cancelled() => return Completed::Transient(e),
            }
        }
    }

    /// Until when the action can still be completed: its start plus AWS's global timeout.
    pub(super) async fn completable_until(&self, job: &Job) -> SystemTime {
        let now = SystemTime::now();
        let limit = match self.hook_info(&job.event.group, &job.event.hook).await {
            Some(info) => (info.heartbeat_timeout * 100).min(GLOBAL_TIMEOUT_MAX),
            None => GLOBAL_TIMEOUT_MAX,
        };
        let started = job.event.time.as_deref().and_then(age).unwrap_or_default();
        now + limit.saturating_sub(started)
    }

    /// "No active Lifecycle Action": timed out, when nothing (no heartbeat of ours, nor the
    /// action's start) shows it alive within one heartbeat timeout; otherwise finished by
    /// someone else.
    async fn ended_without_us(&self, job: &Job, lease: &Lease, reason: &str) -> Completion {
        let timeout = self
            .hook_info(&job.event.group, &job.event.hook)
            .await
            .map(|i| i.heartbeat_timeout);
        let since_alive = match lease.last_heartbeat() {
            Some(at) => SystemTime::now().duration_since(at).ok(),
            None => job.event.time.as_deref().and_then(age),
        };
        match (timeout, since_alive) {
            (Some(t), Some(quiet)) if quiet > t => {
                warn!(%reason, quiet = ?quiet, heartbeat_timeout = ?t,
                    "the lifecycle action timed out before it was completed: Auto Scaling applied the hook's DefaultResult");
                Completion::TimedOut
            }
            _ => {
                info!(%reason, "lifecycle action was already finished (by another worker or its timeout)");
                Completion::AlreadyFinished
            }
        }
    }
}

/// The pause before round `round` (1, 2, ...): grows from a quarter of `aws.retry_for`
/// up to [`MAX_ROUND_DELAY`], half of it jittered.
pub(super) fn round_delay(round: u32, retry_for: Duration) -> Duration {
    let base = (retry_for / 4).max(Duration::from_millis(250));
    let ceiling = base
        .saturating_mul(1u32 << round.min(16))
        .min(MAX_ROUND_DELAY);
    ceiling / 2 + backoff(0, ceiling / 2, ceiling / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_grow_and_are_capped() {
        let retry_for = Duration::from_secs(120);
        let first = round_delay(1, retry_for);
        assert!(first >= Duration::from_secs(30) && first <= Duration::from_secs(60));
        for round in 1..100 {
            let d = round_delay(round, retry_for);
            assert!(d <= MAX_ROUND_DELAY, "{d:?}");
            assert!(d >= Duration::from_secs(30), "{d:?}");
        }
        assert!(round_delay(20, Duration::ZERO) >= MAX_ROUND_DELAY / 2);
    }
}
