//! The decisions the rest of the code branches on, as types: what a lifecycle action is
//! completed with ([`HookResult`]), what completing it came to ([`Completion`]), and what
//! became of one run ([`Outcome`]).
//!
//! Owns their names in the history and the metrics (`as_str`): existing `state.db` files
//! and dashboards read them, so a value is never renamed. Owns the questions asked of them
//! (does the result go to the topic, did the run succeed). It does not decide what happens to
//! a message: that is the delivery's business ([`crate::delivery`]), asked of an outcome.

use std::fmt;

use serde::{Serialize, Serializer};

/// The result a lifecycle action is completed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum HookResult {
    Continue,
    /// AWS's DefaultResult when a hook names none.
    #[default]
    Abandon,
}

impl HookResult {
    pub fn as_str(self) -> &'static str {
        match self {
            HookResult::Continue => "CONTINUE",
            HookResult::Abandon => "ABANDON",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "CONTINUE" => Some(HookResult::Continue),
            "ABANDON" => Some(HookResult::Abandon),
            _ => None,
        }
    }
}

impl fmt::Display for HookResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What completing (or not completing) a lifecycle action came to: the `hook_result` of a
/// run in the history and in its result event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// CompleteLifecycleAction accepted this result.
    Completed(HookResult),
    /// "No active Lifecycle Action": finished by someone else.
    AlreadyFinished,
    /// "No active Lifecycle Action" after a heartbeat timeout passed unheartbeated: Auto
    /// Scaling applied the hook's DefaultResult, not ours.
    TimedOut,
    /// The steps ran and the action was deliberately left alone (`--no-complete`).
    NotCompleted,
    /// Completing failed permanently.
    Error,
}

impl Completion {
    pub fn as_str(self) -> &'static str {
        match self {
            Completion::Completed(r) => r.as_str(),
            Completion::AlreadyFinished => "already-finished",
            Completion::TimedOut => "timed-out",
            Completion::NotCompleted => "not-completed",
            Completion::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "already-finished" => Completion::AlreadyFinished,
            "timed-out" => Completion::TimedOut,
            "not-completed" => Completion::NotCompleted,
            "error" => Completion::Error,
            other => Completion::Completed(HookResult::parse(other)?),
        })
    }
}

impl fmt::Display for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Completion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What became of one run (one message, or one manual run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Outcome {
    /// In the history only: the run has not ended (or its process died).
    #[default]
    Running,
    /// Every step succeeded and the action was completed (or found finished).
    Succeeded,
    /// A step failed; the action was completed with the layer's failure result.
    Failed,
    /// Completing the action failed permanently.
    HookError,
    /// The action was completed before: nothing ran.
    Duplicate,
    /// No layer matches the event's group.
    Unmatched,
    /// Cancelled unfinished (shutdown, the Lambda deadline): the message goes back at once.
    Released,
    /// A transient failure: the message comes back later.
    Retry,
    /// The message can never be handled (malformed, unsafe).
    Rejected,
    /// Not a lifecycle action (a test notification, another event).
    Skipped,
}

impl Outcome {
    pub const ALL: [Outcome; 10] = [
        Outcome::Running,
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::HookError,
        Outcome::Duplicate,
        Outcome::Unmatched,
        Outcome::Released,
        Outcome::Retry,
        Outcome::Rejected,
        Outcome::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::HookError => "hook-error",
            Outcome::Duplicate => "duplicate",
            Outcome::Unmatched => "unmatched",
            Outcome::Released => "released",
            Outcome::Retry => "retry",
            Outcome::Rejected => "rejected",
            Outcome::Skipped => "skipped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// Whether the run's result event goes to the result topic: only runs that worked an
    /// action to its end do (a retry or a release is not an end; a duplicate was published
    /// the first time).
    pub fn publishes(self) -> bool {
        matches!(
            self,
            Outcome::Succeeded | Outcome::Failed | Outcome::HookError
        )
    }

    pub fn is_success(self) -> bool {
        self == Outcome::Succeeded
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What became of one step of a run (the history's `steps.outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    Running,
    Succeeded,
    Failed,
    /// Stopped unfinished by shutdown or a deadline.
    Cancelled,
}

impl StepOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            StepOutcome::Running => "running",
            StepOutcome::Succeeded => "succeeded",
            StepOutcome::Failed => "failed",
            StepOutcome::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for StepOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for StepOutcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_keep_the_history_values() {
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
        // The values state.db files written by earlier releases hold.
        let stored = [
            "running",
            "succeeded",
            "failed",
            "hook-error",
            "duplicate",
            "unmatched",
            "released",
            "retry",
            "rejected",
            "skipped",
        ];
        for s in stored {
            assert_eq!(Outcome::parse(s).map(Outcome::as_str), Some(s));
        }
        for s in [
            "CONTINUE",
            "ABANDON",
            "already-finished",
            "timed-out",
            "not-completed",
            "error",
        ] {
            assert_eq!(Completion::parse(s).map(Completion::as_str), Some(s));
        }
        assert_eq!(Completion::parse("maybe"), None);
    }

    #[test]
    fn only_ends_of_work_are_published() {
        let published: Vec<_> = Outcome::ALL.into_iter().filter(|o| o.publishes()).collect();
        assert_eq!(
            published,
            [Outcome::Succeeded, Outcome::Failed, Outcome::HookError]
        );
    }
}
