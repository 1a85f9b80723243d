//! What a run leaves behind: its report, its rows in the history, its result event.
//!
//! Owns the shape of the result event (the JSON published to `notify.topic_arn`), the rows
//! written for every run (also for messages that were never worked: rejects and skips), and
//! the outbox: a result event that could not be published waits in the store and goes out
//! with [`Pipeline::republish`]. Deciding the outcome is not this file's business.

use serde::Serialize;
use tracing::{info, warn};

use super::{Job, Pipeline};
use crate::aws::Message;
use crate::clock::{now_ms, rfc3339};
use crate::config::NotifyFormat;
use crate::event::LifecycleEvent;
use crate::outcome::{Completion, HookResult, Outcome, StepOutcome};
use crate::store::{NewRun, RunEnd, StoreError};

/// How long a rejected message's body may be in the history.
const EXCERPT_MAX: usize = 2000;

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
    pub outcome: Outcome,
    /// What completing came to: CONTINUE | ABANDON (accepted) | already-finished |
    /// timed-out (Auto Scaling applied the DefaultResult) | error | null (not completed).
    pub hook_result: Option<Completion>,
    /// The result this run decided on and sent (or tried to): CONTINUE | ABANDON.
    pub decision: Option<HookResult>,
    /// Why that decision: every step succeeded, which step failed, an earlier run's.
    pub cause: Option<String>,
    pub error: Option<String>,
    /// Something worth knowing about a run that went well (its metadata differed, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub steps: Vec<StepReport>,
    pub heartbeats: u32,
    pub started_at: String,
    pub finished_at: String,
    pub host: String,
    /// The account the lifecycle message names (AccountId, or an EventBridge event's
    /// account), when it names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    /// The region of the source the message came from (`[sources.NAME]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub kind: &'static str,
    pub description: String,
    pub outcome: StepOutcome,
    pub detail: String,
    pub duration_ms: u64,
}

impl RunReport {
    pub(super) fn new(ev: &LifecycleEvent, host: &str) -> RunReport {
        RunReport {
            kind: "provision.result",
            run_id: None,
            instance_id: ev.instance_id.to_string(),
            group: ev.group.clone(),
            hook: ev.hook.clone(),
            transition: ev.transition.as_str(),
            layer: None,
            outcome: Outcome::Running,
            hook_result: None,
            decision: None,
            cause: None,
            error: None,
            note: None,
            steps: Vec::new(),
            heartbeats: 0,
            started_at: rfc3339(now_ms()),
            finished_at: String::new(),
            host: host.to_string(),
            account_id: ev.account_id.clone(),
            region: None,
        }
    }

    /// A report of a run of `p`: the account and region are its source's when known (the
    /// message's AccountId is only the message's word).
    pub(super) fn of(p: &Pipeline, ev: &LifecycleEvent) -> RunReport {
        let mut r = RunReport::new(ev, &p.host);
        if let Some(scope) = &p.scope {
            let known = |v: &str| (v != crate::sources::UNKNOWN).then(|| v.to_string());
            r.account_id = known(&scope.account).or(r.account_id);
            r.region = known(&scope.region);
        }
        r
    }

    /// The steps are over with `result`: the run's decision, its cause and its outcome
    /// (failed when a step failed, whatever the layer's failure result).
    pub(super) fn decide(&mut self, result: HookResult) {
        self.decision = Some(result);
        if self.cause.is_none() {
            self.cause = Some(match (&self.error, self.steps.len()) {
                (Some(e), _) => format!("{e} (the layer's on_failure: {result})"),
                (None, 0) => "the layer has no steps for this transition".to_string(),
                (None, n) => format!("every step succeeded ({n})"),
            });
        }
        if self.outcome != Outcome::Failed {
            self.outcome = Outcome::Succeeded;
        }
    }
}

/// `s` cut to at most `max` bytes (on a character boundary), marked when cut.
pub(crate) fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Text from an instance (step output, errors quoting it) made safe for a terminal:
/// control characters (ESC and the rest of C0 and C1, newlines included) and bidi
/// overrides are shown escaped (`\u{1b}`, `\n`) instead of acting on the screen.
pub fn printable(s: &str) -> String {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\t')
            || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
    };
    if !s.contains(unsafe_char) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl Pipeline {
    /// The first row of a worked run (outcome `running` until [`Pipeline::finish`]).
    pub(super) async fn open_run(&self, job: &Job, layer: Option<&str>) -> Result<i64, StoreError> {
        let ev = &job.event;
        let event_json = self.event_json(ev);
        let (account, region) = self.source_account_region();
        self.store
            .insert_run(NewRun {
                message_id: job.message_id.as_deref(),
                instance_id: Some(ev.instance_id.as_str()),
                group: Some(&ev.group),
                hook: Some(&ev.hook),
                transition: Some(ev.transition.as_str()),
                token: Some(&ev.token),
                layer,
                outcome: Outcome::Running,
                error: None,
                event: Some(&event_json),
                account: account.or(ev.account_id.as_deref()),
                region,
            })
            .await
    }

    /// The account and region of this pipeline's source, for its history rows (None for
    /// what nobody could tell, and in pipelines built without a source).
    fn source_account_region(&self) -> (Option<&str>, Option<&str>) {
        fn known(v: &str) -> Option<&str> {
            (v != crate::sources::UNKNOWN).then_some(v)
        }
        match &self.scope {
            Some(s) => (known(&s.account), known(&s.region)),
            None => (None, None),
        }
    }

    /// The event as the history keeps it, with the account and region of the source it
    /// came through (`"source"`), which `provision history --account` and reconcile read.
    fn event_json(&self, ev: &LifecycleEvent) -> String {
        let mut v = serde_json::to_value(ev).unwrap_or_default();
        if let (Some(scope), Some(o)) = (&self.scope, v.as_object_mut()) {
            o.insert("source".into(), crate::sources::scope_json(scope));
        }
        v.to_string()
    }

    /// A message that was never worked (rejected, skipped): one finished row, with the
    /// reason, and for a reject an excerpt of the body to look at.
    pub(super) async fn record_unworked(
        &self,
        msg: &Message,
        outcome: Outcome,
        reason: &str,
    ) -> Outcome {
        self.stats.count(outcome);
        let excerpt = (outcome == Outcome::Rejected).then(|| clip(&msg.body, EXCERPT_MAX));
        let (account, region) = self.source_account_region();
        let r = self
            .store
            .insert_run(NewRun {
                message_id: Some(&msg.id),
                outcome,
                error: Some(reason),
                event: excerpt.as_deref(),
                account,
                region,
                ..Default::default()
            })
            .await;
        if let Err(e) = r {
            warn!(error = %e, %outcome, "could not record the message");
        }
        outcome
    }

    /// A final run's result event, put in the outbox before its action is recorded done:
    /// a crash between completing and publishing leaves it for [`Pipeline::republish`]
    /// (the redelivery is a duplicate, which publishes nothing).
    pub(super) async fn stage(&self, run: &RunReport) {
        let (Some(run_id), true, Some(_)) = (run.run_id, run.outcome.publishes(), &self.publisher)
        else {
            return;
        };
        let mut staged = run.clone();
        staged.finished_at = rfc3339(now_ms());
        let body = serde_json::to_string(&staged).unwrap_or_default();
        if let Err(e) = self.store.stage_result(run_id, &body).await {
            warn!(error = %e, "could not put the result event in the outbox before recording the action's end");
        }
    }

    /// Records the end of a run and publishes its result when it is final. A result that
    /// cannot be published stays in the store's outbox for [`Pipeline::republish`].
    pub(super) async fn finish(&self, mut run: RunReport) -> RunReport {
        run.finished_at = rfc3339(now_ms());
        let mut unpublished = None;
        if let (true, Some(publisher)) = (run.outcome.publishes(), &self.publisher) {
            let body = self.result_body(&run);
            if let Err(e) = publisher.submit(body.clone()).await {
                warn!(error = %e, "could not publish the result event; it will be retried");
                unpublished = Some(body);
            }
        }
        self.record_in_fleet_history(&run).await;
        self.stats
            .run_finished(run.layer.as_deref().unwrap_or("-"), run.outcome);
        if run.outcome == Outcome::Retry {
            warn!(
                error = run.error.as_deref().unwrap_or(""),
                "event not finished; the message will come back"
            );
        }
        if let Some(run_id) = run.run_id {
            let end = RunEnd {
                outcome: run.outcome,
                hook_result: run.hook_result,
                decision: run.decision,
                cause: run.cause.as_deref(),
                heartbeats: run.heartbeats,
                error: run.error.as_deref().or(run.note.as_deref()),
                unpublished: unpublished.as_deref(),
            };
            if let Err(e) = self.store.finish_run(run_id, end).await {
                warn!(error = %e, "could not record the run's end");
            }
        }
        run
    }

    /// A final run into the fleet's history table (`state.history_table`), when there is one.
    async fn record_in_fleet_history(&self, run: &RunReport) {
        let (true, Some(fleet)) = (run.outcome.publishes(), &self.fleet_history) else {
            return;
        };
        let record = serde_json::json!({
            "writer": self.owner,
            "account_id": run.account_id,
            "run": run,
        });
        if let Err(e) = fleet.submit(record.to_string()).await {
            warn!(error = %e, "could not write the run to the fleet's history table");
        }
    }

    /// The result event as `notify.format` wants it: provision's own JSON, or a chat
    /// application's custom notification.
    fn result_body(&self, run: &RunReport) -> String {
        let chat = self
            .cfg
            .notify
            .as_ref()
            .is_some_and(|n| n.format == NotifyFormat::Chat);
        if chat {
            serde_json::to_string(&run.chat_notification()).unwrap_or_default()
        } else {
            serde_json::to_string(run).unwrap_or_default()
        }
    }

    /// Publishes result events that failed to publish earlier (the outbox). Returns how
    /// many went out.
    pub async fn republish(&self) -> usize {
        let Some(publisher) = &self.publisher else {
            return 0;
        };
        // Every source's loop comes here, over one store: one at a time, or two would send
        // the same event.
        let Some(_turn) = self.store.outbox_turn() else {
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
            if let Err(e) = publisher.submit(body).await {
                warn!(error = %e, "result events still cannot be published; will try again later");
                break;
            }
            sent += 1;
            if let Err(e) = self.store.mark_published(run_id).await {
                warn!(error = %e, run_id, "published, but could not record it (it may be sent twice)");
            }
        }
        if sent > 0 {
            info!(sent, "published result events from the outbox");
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn terminal_escapes_from_instances_are_shown_not_obeyed() {
        assert_eq!(printable("plain\ttext é"), "plain\ttext é");
        assert_eq!(
            printable("\x1b]0;owned\x07\x1b[2Jok"),
            "\\u{1b}]0;owned\\u{7}\\u{1b}[2Jok"
        );
        assert_eq!(printable("a\nb\r"), "a\\nb\\r");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(printable("abc\u{202E}fed"), "abc\\u{202e}fed");
    }
}
