//! Steps: the units of work a layer runs for an instance, in order.
//!
//! Owns the step enum, the keys every step shares (`timeout`), and dispatch. Each step kind
//! lives in its own file and owns its config syntax (`parse`) and its behaviour (`run`).
//! Every step is safe to repeat: at-least-once delivery and crash recovery re-run them.
//! Running steps in order, heartbeating and completing the hook is the pipeline's job.

use std::time::Duration;

use crate::aws::{AwsError, Services};
use crate::config::ConfigError;
use crate::layer::Context;

pub mod tag;

/// Step kinds this build knows, in the order the docs list them.
pub const KINDS: &[&str] = &["tag"];

/// Default upper bound of one step, retries included.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct Step {
    pub kind: StepKind,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub enum StepKind {
    Tag(tag::Tag),
}

/// Why a step failed; decides nothing about the hook (the layer's `on_failure` does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// The event lacks what the step needs (a metadata key, a valid value).
    #[error("{0}")]
    Input(String),
    /// AWS refused or kept failing after retries.
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

/// What a successful step reports for the history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepOutput {
    pub detail: String,
}

/// What a step sees while it runs.
pub struct StepContext<'a> {
    pub template: Context<'a>,
    pub services: &'a Services,
    pub retry_for: Duration,
}

impl Step {
    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            StepKind::Tag(_) => "tag",
        }
    }

    /// One line for logs, history and `--dry-run`.
    pub fn describe(&self) -> String {
        match &self.kind {
            StepKind::Tag(t) => t.describe(),
        }
    }

    pub async fn run(&self, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        let work = async {
            match &self.kind {
                StepKind::Tag(t) => t.run(ctx).await,
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(StepError::Timeout(self.timeout)))
    }
}

/// Parses one step table, e.g. `{ tag = { Name = "web-{instance_id}" }, timeout = "2m" }`.
/// Errors name the key they belong to (`layers.web.launch[0].tag.Name`).
pub fn parse(table: &toml::Table, key: &str) -> Result<Step, Vec<ConfigError>> {
    let kinds: Vec<&str> = table
        .keys()
        .map(String::as_str)
        .filter(|k| KINDS.contains(k))
        .collect();
    let kind = match kinds.as_slice() {
        [k] => *k,
        [] => {
            let found: Vec<&String> = table.keys().collect();
            return Err(vec![ConfigError::new(
                key,
                format!(
                    "no step kind among keys {found:?}; expected one of: {}",
                    KINDS.join(", ")
                ),
            )]);
        }
        many => {
            return Err(vec![ConfigError::new(
                key,
                format!("one step kind per step, found {}", many.join(" and ")),
            )])
        }
    };
    let mut errs = Vec::new();
    let mut timeout = DEFAULT_TIMEOUT;
    for (k, v) in table {
        match k.as_str() {
            k if k == kind => {}
            "timeout" => match v.as_str().map(humantime::parse_duration) {
                Some(Ok(d)) if !d.is_zero() => timeout = d,
                _ => errs.push(ConfigError::new(
                    format!("{key}.timeout"),
                    "must be a duration such as \"5m\"",
                )),
            },
            other => errs.push(ConfigError::new(
                format!("{key}.{other}"),
                format!("unknown key for a {kind} step"),
            )),
        }
    }
    let kind_key = format!("{key}.{kind}");
    let parsed = match kind {
        "tag" => tag::Tag::parse(&table[kind], &kind_key).map(StepKind::Tag),
        _ => unreachable!("kind comes from KINDS"),
    };
    match parsed {
        Ok(kind) if errs.is_empty() => Ok(Step { kind, timeout }),
        Ok(_) => Err(errs),
        Err(mut e) => {
            e.append(&mut errs);
            Err(e)
        }
    }
}
