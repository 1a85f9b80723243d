//! The result event as a custom notification of Amazon Q Developer in chat applications
//! (formerly AWS Chatbot): `notify.format = "chat"`. A topic subscribed by a chat channel's
//! configuration then shows each run in the channel (Slack, Microsoft Teams, Amazon Chime)
//! with no function in between.
//!
//! Owns the mapping from a [`RunReport`] to the documented event schema (`version` "1.0",
//! `source` "custom", `content` {textType, title, description, nextSteps, keywords},
//! `metadata` {threadId, summary, eventType, relatedResources, additionalContext}); not
//! what a run is or when it is published (`record.rs`).
//!
//! Everything from a message or an instance (group and hook names, a step's output) is
//! untrusted: it is cut short, stripped of control characters, and has the characters
//! chat markdown acts on (`<`, `>`, `&`: Slack's mentions and links; backticks) escaped, so
//! output printing `<!channel>` pings nobody.

use serde_json::{json, Value};

use super::RunReport;
use crate::outcome::{Outcome, StepOutcome};

/// Room for a title and a description in a chat message (the channel shows the start).
const TITLE_MAX: usize = 250;
const DETAIL_MAX: usize = 1500;
const FIELD_MAX: usize = 255;

impl RunReport {
    /// This run as a custom notification.
    pub(super) fn chat_notification(&self) -> Value {
        let layer = self.layer.as_deref().unwrap_or("-");
        let mark = match self.outcome {
            Outcome::Succeeded => ":white_check_mark:",
            Outcome::Failed => ":x:",
            _ => ":warning:",
        };
        let title = clip_chars(
            &format!(
                "{mark} {} {} {}: {} (layer {})",
                self.instance_id,
                self.transition,
                self.outcome.as_str(),
                self.hook_result
                    .map_or("hook not completed", |c| c.as_str()),
                safe(layer, FIELD_MAX),
            ),
            TITLE_MAX,
        );
        let mut next_steps = Vec::new();
        if !self.outcome.is_success() {
            next_steps.push(format!(
                "On {}: `provision history --instance {}` shows each step's output",
                safe(&self.host, FIELD_MAX),
                self.instance_id
            ));
        }
        let mut keywords = vec![
            self.outcome.as_str().to_string(),
            self.transition.to_string(),
        ];
        keywords.extend(self.layer.as_deref().map(|l| safe(l, 64)));
        let mut n = json!({
            "version": "1.0",
            "source": "custom",
            "content": {
                "textType": "client-markdown",
                "title": title,
                "description": self.chat_description(),
                "nextSteps": next_steps,
                "keywords": keywords,
            },
            "metadata": {
                "threadId": self.instance_id,
                "summary": format!("{} {} {}", self.instance_id, self.transition, self.outcome.as_str()),
                "eventType": "provision.result",
                "relatedResources": [self.instance_id],
                "additionalContext": {
                    "group": safe(&self.group, FIELD_MAX),
                    "hook": safe(&self.hook, FIELD_MAX),
                    "layer": safe(layer, FIELD_MAX),
                    "outcome": self.outcome.as_str(),
                    "hook_result": self.hook_result.map(|c| c.as_str()),
                    "decision": self.decision.map(|d| d.as_str()),
                    "host": safe(&self.host, FIELD_MAX),
                },
            },
        });
        // `id` is optional in the schema: present only when the run has one.
        if let Some(id) = self.run_id {
            n["id"] = json!(format!("provision-{}-{id}", safe(&self.host, 64)));
        }
        n
    }

    /// Group and hook, the decision and its cause, and the failed step with the end of
    /// what it said.
    fn chat_description(&self) -> String {
        let mut lines = vec![format!(
            "*Group* {}, *hook* {}",
            safe(&self.group, FIELD_MAX),
            safe(&self.hook, FIELD_MAX)
        )];
        if let Some(d) = self.decision {
            let cause = self.cause.as_deref().map(|c| safe(c, DETAIL_MAX));
            lines.push(format!(
                "*Decision* {}: {}",
                d.as_str(),
                cause.unwrap_or_default()
            ));
        }
        if let Some(s) = self.steps.iter().find(|s| s.outcome == StepOutcome::Failed) {
            lines.push(format!("*Failed step* {}", safe(&s.description, FIELD_MAX)));
            let tail = s.detail.lines().rev().take(5).collect::<Vec<_>>();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            if !tail.is_empty() {
                lines.push(format!(
                    "```{}```",
                    safe_block(&tail.join("\n"), DETAIL_MAX)
                ));
            }
        } else if let Some(e) = &self.error {
            lines.push(format!("*Error* {}", safe(e, DETAIL_MAX)));
        }
        lines.push(format!(
            "*Steps* {}, *heartbeats* {}, *host* {}",
            self.steps.len(),
            self.heartbeats,
            safe(&self.host, FIELD_MAX)
        ));
        lines.join("\n")
    }
}

/// One line of untrusted text for chat markdown: no control characters, `&`, `<`, `>`
/// escaped (Slack's mentions and links), backticks made quotes, at most `max` characters.
fn safe(s: &str, max: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    escape(&clip_chars(&one_line, max))
}

/// Untrusted lines for a code block: as [`safe`], newlines kept.
fn safe_block(s: &str, max: usize) -> String {
    let text: String = s
        .chars()
        .map(|c| if c.is_control() && c != '\n' { ' ' } else { c })
        .collect();
    escape(&clip_chars(&text, max))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('`', "'")
}

fn clip_chars(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Completion, HookResult};
    use crate::pipeline::StepReport;

    fn failed_run() -> RunReport {
        RunReport {
            kind: "provision.result",
            run_id: Some(7),
            instance_id: "i-0123456789abcdef0".into(),
            group: "web-prod".into(),
            hook: "provision-launch".into(),
            transition: "launch",
            layer: Some("web".into()),
            outcome: Outcome::Failed,
            hook_result: Some(Completion::Completed(HookResult::Abandon)),
            decision: Some(HookResult::Abandon),
            cause: Some("step 1 failed".into()),
            error: Some("step 1 failed".into()),
            note: None,
            steps: vec![StepReport {
                kind: "ssh",
                description: "ssh [\"deploy\"]".into(),
                outcome: StepOutcome::Failed,
                detail: "line 1\nerror: <!channel> `rm` & co\n".into(),
                duration_ms: 5,
            }],
            heartbeats: 2,
            started_at: String::new(),
            finished_at: String::new(),
            host: "ops-1".into(),
            account_id: None,
            region: None,
        }
    }

    #[test]
    fn a_failed_run_reads_as_a_custom_notification() {
        let n = failed_run().chat_notification();
        assert_eq!(n["version"], "1.0");
        assert_eq!(n["source"], "custom");
        assert_eq!(n["content"]["textType"], "client-markdown");
        let title = n["content"]["title"].as_str().unwrap();
        assert!(
            title.contains("i-0123456789abcdef0 launch failed: ABANDON (layer web)"),
            "{title}"
        );
        let d = n["content"]["description"].as_str().unwrap();
        assert!(d.contains("*Failed step* ssh"), "{d}");
        assert!(
            d.contains("&lt;!channel&gt; 'rm' &amp; co"),
            "untrusted output escaped: {d}"
        );
        assert!(!d.contains("<!channel>"), "{d}");
        assert_eq!(n["metadata"]["threadId"], "i-0123456789abcdef0");
        assert_eq!(n["id"], "provision-ops-1-7");
        let mut unrecorded = failed_run();
        unrecorded.run_id = None;
        assert!(
            unrecorded.chat_notification().get("id").is_none(),
            "no null id"
        );
        assert!(n["content"]["nextSteps"][0]
            .as_str()
            .unwrap()
            .contains("provision history --instance i-0123456789abcdef0"));
    }
}
