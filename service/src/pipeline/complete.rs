//! Completing a lifecycle action, and what AWS's answer means.
//!
//! "No active Lifecycle Action" means someone finished the action (another worker, or its
//! timeout): that is an end, not an error. A transient error that outlasts `aws.retry_for`
//! leaves the message to come back; a permanent one ends the run as a hook error. Owns no
//! decision about the result itself: the steps made it.

use tracing::info;

use super::Pipeline;
use crate::aws::retry::with_backoff;
use crate::aws::{Action, ActionCall, AwsError};
use crate::outcome::{Completion, HookResult};

/// What completing an action came to.
pub(super) enum Completed {
    /// The action is finished: by us with a result, or already by someone else.
    Final(Completion),
    /// Still failing for a transient reason: try again with the message's next delivery.
    Transient(AwsError),
    /// Refused for good (the group or hook is gone, access denied).
    Permanent(AwsError),
}

impl Pipeline {
    /// Completes `action` with `result`, retrying transient errors for `aws.retry_for`. Runs
    /// to its end even during shutdown.
    pub(super) async fn complete(&self, action: &Action, result: HookResult) -> Completed {
        let answer = with_backoff(self.cfg.aws.retry_for, || {
            self.hooks.complete(action, result)
        })
        .await;
        match answer {
            Ok(ActionCall::Done) => {
                info!(%result, "completed lifecycle action");
                Completed::Final(Completion::Completed(result))
            }
            Ok(ActionCall::NotActive(reason)) => {
                info!(%reason, "lifecycle action was already finished (by another worker or its timeout)");
                Completed::Final(Completion::AlreadyFinished)
            }
            Err(e) if e.retryable() => Completed::Transient(e),
            Err(e) => Completed::Permanent(e),
        }
    }
}
