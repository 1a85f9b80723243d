//! Steps: the units of work a layer runs for an instance, in order.
//!
//! Owns the step enum, the keys every step shares (`timeout`), and dispatch. Each step kind
//! lives in its own file and owns its config syntax (`parse`) and its behaviour (`run`).
//! Every step is safe to repeat: at-least-once delivery and crash recovery re-run them.
//! Running steps in order, heartbeating and completing the hook is the pipeline's job.
//! Beside the step kinds: `child.rs` (stopping a child's process group: TERM, a grace,
//! KILL) and `gather.rs` (instances of one burst gathered into one call). A child's output
//! held within a budget is [`crate::output`]'s.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::aws::{AwsError, ErrorClass, InstanceInfo, InstanceState, OwLayer, OwStack, Services};
use crate::batch::Batcher;
use crate::cache::TtlCache;
use crate::event::{InstanceId, Place};
use crate::setting::ConfigError;
use crate::ssh::{Reach, ReachError, Remote, Target};
use crate::template::{Context, Template, Vars};

pub mod ansible;
pub mod child;
pub mod ecs_drain;
pub mod gather;
pub mod opsworks;

pub mod ssh;
pub mod ssm;
pub mod tag;

/// Step kinds this build knows, in the order the docs list them.
pub const KINDS: &[&str] = &["tag", "ssm", "opsworks", "ssh", "ansible", "ecs_drain"];

/// Room above an SSH step's own timeout for reaching the instance (ssh.ready_timeout).
const SSH_REACH_ALLOWANCE: Duration = Duration::from_secs(3600);

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
    Ssm(ssm::Ssm),
    OpsWorks(opsworks::OpsWorks),
    Ssh(ssh::Ssh),
    Ansible(ansible::Ansible),
    EcsDrain(ecs_drain::EcsDrain),
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
    /// The instance never became reachable (SSM agent, OpsWorks registration, SSH).
    #[error("{0}")]
    NotReady(String),
    /// The work ran on the instance and failed there.
    #[error("{0}")]
    Remote(String),
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
    pub shared: &'a Shared,
    pub retry_for: Duration,
    /// The layer's ssh overrides (user, port).
    pub ssh: &'a crate::ssh::LayerSsh,
    /// Tells a watching operator what the step waits for (`provision <instance-id>`).
    pub note: &'a (dyn Fn(String) + Send + Sync),
}

impl StepContext<'_> {
    /// Reports what the step is waiting for; repeated identical notes are the caller's
    /// to de-duplicate.
    pub fn note(&self, what: String) {
        (self.note)(what)
    }

    /// Reaches this event's instance over SSH (running, address, verified host key, server
    /// accepting), bounded by `ssh.ready_timeout`; returns the open session.
    pub async fn reach(&self, remote: &Remote) -> Result<(Target, openssh::Session), StepError> {
        let to = Reach {
            id: &self.template.event.instance_id,
            layer: self.ssh,
            lookup: &self.shared.lookup,
            instances: self.services.instances.as_ref(),
            note: self.note,
        };
        Ok(remote.reach(&to).await?)
    }

    /// [`StepContext::reach`] for a step that makes its own connections: the same checks,
    /// one `ssh` process an attempt, its login kept open for the step's clients until the
    /// [`crate::ssh::Mux`] is dropped.
    pub async fn probe(
        &self,
        remote: &Remote,
    ) -> Result<(Target, Option<crate::ssh::Mux>), StepError> {
        let to = Reach {
            id: &self.template.event.instance_id,
            layer: self.ssh,
            lookup: &self.shared.lookup,
            instances: self.services.instances.as_ref(),
            note: self.note,
        };
        Ok(remote.probe(&to).await?)
    }
}

impl From<ReachError> for StepError {
    fn from(e: ReachError) -> StepError {
        match e {
            ReachError::NotReady(why) => StepError::NotReady(why),
            ReachError::HostKeyRefused(why) => StepError::Remote(why),
            ReachError::Aws(e) => StepError::Aws(e),
        }
    }
}

/// Step machinery shared by every event in flight: batched lookups, batches being
/// gathered, and caches of rarely changing descriptions.
pub struct Shared {
    /// DescribeInstances for all instances asked about within 50 ms, in one call.
    pub lookup: Batcher<InstanceId, InstanceInfo>,
    /// The same tag on every instance given it within a second, in one CreateTags per value
    /// (the record reconcile reads that a launch was configured: `(instance, (key, value))`).
    pub mark: Marker,
    /// The marking task, awaited at shutdown so the last burst's tags are written.
    pub mark_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    pub ssm_online: ssm::OnlineWatch,
    pub ssm_batches: gather::Gather<ssm::BatchKey, InstanceId, Result<String, String>>,
    pub ow_stacks: TtlCache<String, Vec<OwStack>>,
    pub ow_layers: TtlCache<(String, String), Vec<OwLayer>>,
    /// SSH reach (None where SSH is not set up: Lambda, unit tests).
    pub remote: Option<Arc<crate::ssh::Remote>>,
    pub ansible: Option<Arc<ansible::Runner>>,
}

impl Shared {
    pub fn new(
        services: &Services,
        ssm_window: Duration,
        retry_for: Duration,
        remote: Option<Arc<crate::ssh::Remote>>,
        ansible: Option<Arc<ansible::Runner>>,
    ) -> Shared {
        let instances = services.instances.clone();
        let (lookup, _task) = Batcher::retried(
            100,
            Duration::from_millis(50),
            retry_for,
            move |ids: Vec<InstanceId>| {
                let instances = instances.clone();
                async move {
                    let found = instances.describe(&ids).await?;
                    let mut by_id: HashMap<String, InstanceInfo> =
                        found.into_iter().map(|i| (i.id.clone(), i)).collect();
                    Ok(ids
                        .iter()
                        .map(|id| {
                            by_id.remove(id.as_str()).ok_or_else(|| AwsError {
                                operation: "ec2:DescribeInstances",
                                code: None,
                                message: format!("DescribeInstances does not know {id}"),
                                class: ErrorClass::NotFound,
                            })
                        })
                        .collect())
                }
            },
        );
        let (mark, mark_task) = marker(services.instances.clone(), retry_for);
        Shared {
            lookup,
            mark,
            mark_task: std::sync::Mutex::new(Some(mark_task)),
            ssm_online: ssm::OnlineWatch::new(services.ssm.clone()),
            ssm_batches: gather::Gather::new(ssm_window, ssm::MAX_TARGETS),
            ow_stacks: TtlCache::new(Duration::from_secs(300)),
            ow_layers: TtlCache::new(Duration::from_secs(300)),
            remote,
            ansible,
        }
    }
}

/// Tags instances, batched: `(instance, (key, value))`.
pub type Marker = Batcher<(InstanceId, (String, String))>;

/// Tags many instances with one CreateTags per distinct tag (a burst of launches in a
/// layer shares one call).
fn marker(
    instances: Arc<dyn crate::aws::Instances>,
    retry_for: Duration,
) -> (Marker, tokio::task::JoinHandle<()>) {
    Batcher::retried(
        500,
        Duration::from_secs(1),
        retry_for,
        move |items: Vec<(InstanceId, (String, String))>| {
            let instances = instances.clone();
            async move {
                let mut by_tag: HashMap<(String, String), Vec<InstanceId>> = HashMap::new();
                for (id, tag) in &items {
                    by_tag.entry(tag.clone()).or_default().push(id.clone());
                }
                for (tag, ids) in by_tag {
                    instances.tag_all(&ids, &[tag]).await?;
                }
                Ok(items.iter().map(|_| Ok(())).collect())
            }
        },
    )
}

/// The end of a command's output for the history: trimmed, at most `max` bytes, with `…`
/// where the beginning was cut (the end is where errors are).
pub fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

/// Steps that run things on the instance (ssm, ansible, ssh) may read metadata only
/// through variables the layer declares with an allowed pattern.
pub fn require_declared(t: &Template, key: &str, vars: &Vars) -> Vec<ConfigError> {
    let names = t.reads_message_names().then(|| {
        ConfigError::new(
            key,
            "{group} and {hook} come from the message and may not reach a step that runs things; use {layer}, {instance_id} or a declared metadata var",
        )
    });
    names
        .into_iter()
        .chain(t.metadata_keys()
        .filter(|k| !vars.is_declared(k))
        .map(|k| {
            ConfigError::new(
                key,
                format!(
                    "{{metadata.{k}}} is not declared: add it to the layer's vars with the pattern its values must match, e.g. vars = {{ {k} = \"[a-z0-9-]{{1,32}}\" }}"
                ),
            )
        })
        )
        .collect()
}

impl Step {
    /// Whether the step does its work through AWS APIs without the instance (OpsWorks
    /// deregistration), so it can still run for an instance that is gone. A tag on a
    /// terminated instance is pointless, a drain finds nothing, SSH and SSM reach nobody.
    pub fn acts_without_instance(&self) -> bool {
        matches!(self.kind, StepKind::OpsWorks(_))
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            StepKind::Tag(_) => "tag",
            StepKind::Ssm(_) => "ssm",
            StepKind::OpsWorks(_) => "opsworks",
            StepKind::Ssh(_) => "ssh",
            StepKind::Ansible(_) => "ansible",
            StepKind::EcsDrain(_) => "ecs_drain",
        }
    }

    /// One line for logs, history and `--dry-run`.
    pub fn describe(&self) -> String {
        match &self.kind {
            StepKind::Tag(t) => t.describe(),
            StepKind::Ssm(s) => s.describe(),
            StepKind::OpsWorks(o) => o.describe(),
            StepKind::Ssh(s) => s.describe(),
            StepKind::Ansible(a) => a.describe(),
            StepKind::EcsDrain(d) => d.describe(),
        }
    }

    /// What this step would do for an event, templates filled in (or why it cannot).
    pub fn preview(&self, ctx: &Context<'_>) -> String {
        let r = match &self.kind {
            StepKind::Tag(t) => t.render(ctx).map(|tags| {
                let list: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                format!("tag {}", list.join(", "))
            }),
            StepKind::Ssm(s) => s.command(ctx).map(|c| {
                format!(
                    "ssm {} {:?} (timeout {})",
                    c.document,
                    c.parameters,
                    humantime::format_duration(s.timeout)
                )
            }),
            StepKind::OpsWorks(o) => o.preview(ctx),
            StepKind::Ssh(s) => s.preview(ctx),
            StepKind::Ansible(a) => a.preview(ctx),
            StepKind::EcsDrain(d) => d.preview(ctx),
        };
        r.unwrap_or_else(|e| format!("{} (would fail: {e})", self.describe()))
    }

    /// Whether the step runs things on the instance (ssm, ssh, ansible), which must then be
    /// running: a warm-pool instance is stopped outside its launch and return actions.
    pub fn needs_running_instance(&self) -> bool {
        matches!(
            self.kind,
            StepKind::Ssm(_) | StepKind::Ssh(_) | StepKind::Ansible(_)
        )
    }

    pub async fn run(&self, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        if self.needs_running_instance() {
            stopped_instance(self.kind_name(), ctx).await?;
        }
        let work = async {
            match &self.kind {
                StepKind::Tag(t) => t.run(ctx).await,
                StepKind::Ssm(s) => s.run(ctx).await,
                StepKind::OpsWorks(o) => o.run(ctx).await,
                StepKind::Ssh(s) => s.run(ctx).await,
                StepKind::Ansible(a) => a.run(ctx).await,
                StepKind::EcsDrain(d) => d.run(ctx).await,
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(StepError::Timeout(self.timeout)))
    }
}

/// Fails at once, with the reason, when the event's instance is stopped or going away: a
/// step that needs it running would otherwise wait out its readiness timeout (SSM agent,
/// ssh.ready_timeout) for nothing. An instance EC2 does not list yet is left to the step's
/// own waits.
async fn stopped_instance(kind: &str, ctx: &StepContext<'_>) -> Result<(), StepError> {
    let ev = ctx.template.event;
    let Ok(info) = ctx.shared.lookup.submit(ev.instance_id.clone()).await else {
        return Ok(());
    };
    let state = &info.state;
    if !matches!(
        state,
        InstanceState::Stopped
            | InstanceState::Stopping
            | InstanceState::ShuttingDown
            | InstanceState::Terminated
    ) {
        return Ok(());
    }
    let pool = match ev.origin {
        Some(Place::WarmPool) => " (it comes from the warm pool, where instances wait stopped)",
        _ => "",
    };
    Err(StepError::NotReady(format!(
        "{} is {state}{pool}; a {kind} step needs a running instance, so it was not started",
        ev.instance_id
    )))
}

/// Parses one step table, e.g. `{ tag = { Name = "web-{instance_id}" }, timeout = "2m" }`.
/// Errors name the key they belong to (`layers.web.launch[0].tag.Name`).
pub fn parse(table: &toml::Table, key: &str, vars: &Vars) -> Result<Step, Vec<ConfigError>> {
    let kind = kind_of(table, key)?;
    let mut errs = Vec::new();
    let mut timeout = None;
    for (k, v) in table {
        match k.as_str() {
            k if k == kind => {}
            k if kind == "ansible" && ansible::SIBLING_KEYS.contains(&k) => {}
            "timeout" => match v.as_str().map(crate::setting::parse_duration) {
                Some(Ok(d)) if !d.is_zero() => timeout = Some(d),
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
    // An ssm step has one timeout: the command's (cancelled past it). Written inside or
    // beside the step table it means the same; written twice it is ambiguous.
    let inner_timeout = table[kind]
        .as_table()
        .is_some_and(|t| t.contains_key("timeout"));
    if kind == "ssm" && timeout.is_some() && inner_timeout {
        errs.push(ConfigError::new(
            format!("{key}.timeout"),
            "the ssm step's timeout is given twice (here and in ssm.timeout); keep one",
        ));
    }
    let kind_key = format!("{key}.{kind}");
    let parsed = match kind {
        "tag" => tag::Tag::parse(&table[kind], &kind_key).map(StepKind::Tag),
        "ssm" => ssm::Ssm::parse(&table[kind], &kind_key, vars).map(StepKind::Ssm),
        "opsworks" => {
            opsworks::OpsWorks::parse(&table[kind], &kind_key, vars).map(StepKind::OpsWorks)
        }
        "ssh" => ssh::Ssh::parse(&table[kind], &kind_key, vars).map(StepKind::Ssh),
        "ansible" => ansible::Ansible::parse(table, key, vars).map(StepKind::Ansible),
        "ecs_drain" => ecs_drain::EcsDrain::parse(&table[kind], &kind_key).map(StepKind::EcsDrain),
        _ => unreachable!("kind comes from KINDS"),
    };
    match parsed {
        Ok(mut kind) if errs.is_empty() => {
            let timeout = outer_timeout(&mut kind, timeout);
            Ok(Step { kind, timeout })
        }
        Ok(_) => Err(errs),
        Err(mut e) => {
            e.append(&mut errs);
            Err(e)
        }
    }
}

/// The one key of a step table that names its kind.
fn kind_of<'t>(table: &'t toml::Table, key: &str) -> Result<&'t str, Vec<ConfigError>> {
    let kinds: Vec<&str> = table
        .keys()
        .map(String::as_str)
        .filter(|k| KINDS.contains(k))
        .collect();
    match kinds.as_slice() {
        [k] => Ok(*k),
        [] => {
            let found: Vec<&String> = table.keys().collect();
            Err(vec![ConfigError::new(
                key,
                format!(
                    "no step kind among keys {found:?}; expected one of: {}",
                    KINDS.join(", ")
                ),
            )])
        }
        many => Err(vec![ConfigError::new(
            key,
            format!("one step kind per step, found {}", many.join(" and ")),
        )]),
    }
}

/// The step's outer bound, from its `timeout` when given. Steps that wait on their own
/// deadlines get an outer bound above them, so their own (clearer) timeout message wins.
/// For SSH steps `timeout` bounds the work once the instance is reached (ssh.ready_timeout
/// bounds the reaching).
fn outer_timeout(kind: &mut StepKind, timeout: Option<Duration>) -> Duration {
    match kind {
        StepKind::Ssh(s) => {
            s.timeout = timeout.unwrap_or(s.timeout);
            s.timeout + SSH_REACH_ALLOWANCE
        }
        StepKind::Ansible(a) => {
            a.timeout = timeout.unwrap_or(a.timeout);
            a.timeout + SSH_REACH_ALLOWANCE
        }
        // `timeout` is the command's (CancelCommand past it); the outer bound adds the wait
        // for the agent (online_timeout) and a margin, so the command's own timeout wins.
        StepKind::Ssm(s) => {
            s.timeout = timeout.unwrap_or(s.timeout);
            s.online_timeout + s.timeout + Duration::from_secs(60)
        }
        StepKind::OpsWorks(_) => timeout.unwrap_or(Duration::from_secs(3600)),
        // The drain's own deadline says how many tasks were left; the outer bound is above.
        StepKind::EcsDrain(d) => {
            d.timeout = timeout.unwrap_or(d.timeout);
            d.timeout + Duration::from_secs(60)
        }
        StepKind::Tag(_) => timeout.unwrap_or(DEFAULT_TIMEOUT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(text: &str) -> Step {
        let t: toml::Table = toml::from_str(text).unwrap();
        parse(&t, "s", &Vars::default()).unwrap()
    }

    #[test]
    fn an_ssh_steps_timeout_bounds_its_work_and_reaching_comes_on_top() {
        let s = step("ssh = [\"true\"]\ntimeout = \"5m\"");
        let StepKind::Ssh(ssh) = &s.kind else {
            panic!("{s:?}")
        };
        assert_eq!(ssh.timeout, Duration::from_secs(300));
        assert_eq!(s.timeout, Duration::from_secs(300) + SSH_REACH_ALLOWANCE);

        let s = step("ansible = \"web.yml\"\ntimeout = \"45m\"");
        let StepKind::Ansible(a) = &s.kind else {
            panic!("{s:?}")
        };
        assert_eq!(a.timeout, Duration::from_secs(2700));
        assert_eq!(s.timeout, Duration::from_secs(2700) + SSH_REACH_ALLOWANCE);

        let s = step("ansible = \"web.yml\"");
        assert_eq!(s.timeout, Duration::from_secs(1800) + SSH_REACH_ALLOWANCE);
        let s = step("tag = { A = \"b\" }\ntimeout = \"1m\"");
        assert_eq!(s.timeout, Duration::from_secs(60));
    }

    #[test]
    fn an_ssm_steps_timeout_is_the_commands_wherever_it_is_written() {
        let cmd = "document = \"AWS-RunShellScript\", parameters = { commands = [\"true\"] }";
        let beside = step(&format!("ssm = {{ {cmd} }}\ntimeout = \"5m\""));
        let inside = step(&format!("ssm = {{ {cmd}, timeout = \"5m\" }}"));
        for s in [&beside, &inside] {
            let StepKind::Ssm(ssm) = &s.kind else {
                panic!("{s:?}")
            };
            assert_eq!(ssm.timeout, Duration::from_secs(300), "cancelled past 5m");
            // The outer bound: the agent's wait (online_timeout, 10m) + 5m + 1m.
            assert_eq!(s.timeout, Duration::from_secs(960));
        }
        // Unset: 10m + 10m + 1m.
        assert_eq!(
            step(&format!("ssm = {{ {cmd} }}")).timeout,
            Duration::from_secs(1260)
        );
        let t: toml::Table = toml::from_str(&format!(
            "ssm = {{ {cmd}, timeout = \"5m\" }}\ntimeout = \"6m\""
        ))
        .unwrap();
        let errs = parse(&t, "s", &Vars::default()).unwrap_err();
        assert!(
            errs.iter().any(|e| e
                .to_string()
                .contains("s.timeout: the ssm step's timeout is given twice")),
            "{errs:?}"
        );
    }
}
