//! The `ansible` step: a playbook from `ansible.playbook_dir` run against the instance.
//!
//! ```toml
//! { ansible = "web.yml", vars = { role = "{metadata.role}" }, timeout = "30m" }
//! ```
//!
//! Instances that reach the same playbook with the same rendered `vars` at about the same
//! time share ONE `ansible-playbook` run (up to `ansible.max_batch`) over a generated
//! inventory (see `batch` for when a run starts). Each instance is reached over SSH
//! ([`crate::ssh`]: running, address, verified host key, server accepting) while its
//! batch gathers; each gets its own result from the per-host results of the
//! `provision_json` callback, so one failing host fails only its own instance.
//!
//! The runner (`ansible.strategy`, `ansible.pipelining`, or the step's own `strategy` and
//! `pipelining`): Mitogen for Ansible by default (one Python per host for the whole run),
//! or Ansible's `linear`, with pipelining unless turned off. Under every runner the
//! connection is a channel of the login that reached the instance (kept open as a control
//! master, see [`crate::ssh::mux`]), and any new login uses the instance's verified
//! known_hosts file with `StrictHostKeyChecking=yes`.
//!
//! What reaches Ansible, and how:
//! - inventory (JSON file): every instance in `all`, its layer's group and the groups
//!   Ansible's EC2 inventory would give it (`tag_Role_web`, ...), with the EC2 inventory's
//!   host variables (never evaluated as templates) and connection variables that
//!   reproduce the verified connection (known_hosts, strict checking); see `inventory`;
//! - `vars`: an extra-vars JSON file (`-e @file`), never the command line. Values rendered
//!   from metadata must match the layer's declared patterns, and no value may carry Jinja
//!   markers (`{{`, `{%`, `{#`), whatever the pattern says;
//! - the vault password: a 0600 file in a private directory, removed after the run;
//! - the environment: built from scratch (PATH, HOME, locale, `ANSIBLE_*` settings of the
//!   service), so nothing else the service holds is inherited.
//!
//! The run's full output (stderr and the JSON results) goes to
//! `<state dir>/ansible-logs/`, each file at most `ansible.log_max_bytes`, the newest
//! `ansible.log_keep` files kept.
//!
//! This module owns the step itself (its syntax, its extra vars, joining a run); the rest
//! is one concept a file:
//! - `settings`: the `[ansible]` table and the runner choices;
//! - `batch`: which instances share a run, and when it starts;
//! - `runner`: the `ansible-playbook` child process of one batch, its files and its log;
//! - `inventory`: the run's groups and host variables, as `amazon.aws.aws_ec2` gives them;
//! - `mitogen`: finding Mitogen for Ansible's strategy plugins;
//! - `results`: the callback's JSON document -> one result per instance.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::setting::ConfigError;
use crate::template::{Context, Template, Vars};

use super::{require_declared, StepContext, StepError, StepOutput};

mod batch;
mod forks;
mod inventory;
mod mitogen;
mod results;
mod runner;
mod settings;

use crate::ssh::Target;
use results::HostResult;

pub use mitogen::PINNED as MITOGEN_VERSION;
pub use runner::{command, syntax_check, Runner, CALLBACK_PLUGIN};
pub use settings::{AnsibleSettings, RunnerChoice, Strategy, DEFAULT_FORKS};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

#[derive(Debug, Clone)]
pub struct Ansible {
    /// Relative to `ansible.playbook_dir`.
    pub playbook: String,
    vars: Vec<(String, Template)>,
    pub timeout: Duration,
    /// This step's runner, when it differs from `[ansible]`'s (a playbook Mitogen cannot run).
    strategy: Option<Strategy>,
    pipelining: Option<bool>,
}

/// Keys of an ansible step table besides `ansible` and `timeout`.
pub const SIBLING_KEYS: &[&str] = &["vars", "strategy", "pipelining"];

/// Instances share a run when all of this is equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    layer: String,
    transition: &'static str,
    playbook: String,
    vars_json: String,
    timeout: Duration,
    runner: RunnerChoice,
}

impl Ansible {
    /// Parses the step table (`ansible` and its sibling `vars`).
    pub fn parse(table: &toml::Table, key: &str, vars: &Vars) -> Result<Ansible, Vec<ConfigError>> {
        let mut errs = Vec::new();
        let playbook = match table.get("ansible").and_then(|v| v.as_str()) {
            Some(p) if valid_playbook_name(p) => p.to_string(),
            _ => {
                errs.push(ConfigError::new(
                    format!("{key}.ansible"),
                    "must name a playbook in ansible.playbook_dir, e.g. \"web.yml\" (a relative path without \"..\")",
                ));
                String::new()
            }
        };
        let mut rendered = Vec::new();
        match table.get("vars") {
            None => {}
            Some(toml::Value::Table(t)) => {
                for (name, v) in t {
                    let vk = format!("{key}.vars.{name}");
                    if !valid_var_name(name) {
                        errs.push(ConfigError::new(
                            &vk,
                            "an Ansible variable name: letters, digits and '_', not starting with a digit",
                        ));
                        continue;
                    }
                    match v.as_str().map(Template::parse) {
                        Some(Ok(t)) => {
                            errs.extend(require_declared(&t, &vk, vars));
                            rendered.push((name.clone(), t));
                        }
                        Some(Err(e)) => errs.push(ConfigError::new(&vk, e.to_string())),
                        None => errs.push(ConfigError::new(&vk, "must be a string template")),
                    }
                }
            }
            Some(_) => errs.push(ConfigError::new(
                format!("{key}.vars"),
                "must be a table of variable names to templates",
            )),
        }
        let strategy = table.get("strategy").and_then(|v| {
            match Strategy::parse(v, &format!("{key}.strategy")) {
                Ok(s) => Some(s),
                Err(e) => {
                    errs.push(e);
                    None
                }
            }
        });
        let pipelining = match table.get("pipelining") {
            None => None,
            Some(toml::Value::Boolean(b)) => Some(*b),
            Some(_) => {
                errs.push(ConfigError::new(
                    format!("{key}.pipelining"),
                    "must be true or false",
                ));
                None
            }
        };
        if errs.is_empty() {
            Ok(Ansible {
                playbook,
                vars: rendered,
                // The step's `timeout`, when given, is set by `step::parse`.
                timeout: DEFAULT_TIMEOUT,
                strategy,
                pipelining,
            })
        } else {
            Err(errs)
        }
    }

    pub fn describe(&self) -> String {
        let vars: Vec<String> = self
            .vars
            .iter()
            .map(|(k, t)| format!("{k}={:?}", t.source()))
            .collect();
        let mut text = format!("ansible {}", self.playbook);
        if !vars.is_empty() {
            text = format!("{text} {}", vars.join(" "));
        }
        if let Some(s) = self.strategy {
            text.push_str(&format!(" (strategy {})", s.as_str()));
        }
        if let Some(p) = self.pipelining {
            text.push_str(&format!(" (pipelining {p})"));
        }
        text
    }

    /// The runner of this step's runs: `[ansible]`'s, with the step's own choices on top.
    pub fn runner_choice(&self, settings: &AnsibleSettings) -> RunnerChoice {
        RunnerChoice {
            strategy: self.strategy.unwrap_or(settings.runner.strategy),
            pipelining: self.pipelining.unwrap_or(settings.runner.pipelining),
        }
    }

    /// The extra vars for one event: rendered, validated, free of Jinja markers.
    pub fn extra_vars(&self, ctx: &Context<'_>) -> Result<BTreeMap<String, String>, StepError> {
        let mut out = BTreeMap::new();
        for (name, t) in &self.vars {
            let v = t
                .render(ctx)
                .map_err(|e| StepError::Input(format!("vars.{name}: {e}")))?;
            if ["{{", "{%", "{#"].iter().any(|m| v.contains(m)) {
                return Err(StepError::Input(format!(
                    "vars.{name}: the value contains a Jinja template marker ({{{{, {{% or {{#); refused so that Ansible never evaluates message data"
                )));
            }
            out.insert(name.clone(), v);
        }
        Ok(out)
    }

    pub fn preview(&self, ctx: &Context<'_>) -> Result<String, StepError> {
        let vars = self.extra_vars(ctx)?;
        Ok(format!(
            "ansible-playbook {} with extra vars {}",
            self.playbook,
            serde_json::to_string(&vars).unwrap_or_default()
        ))
    }

    /// Runs the playbook on the instance in a shared run. A host that Ansible could not
    /// connect to (or lost) although it was just reached gets one follow-up run, reached
    /// again first, within the step's `timeout` counted from the first reach: on a busy ops
    /// host a connection can time out, and failing the instance for it would have Auto
    /// Scaling replace a healthy one.
    pub async fn run(&self, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        let vars = self.extra_vars(&ctx.template)?;
        let runner = ctx.shared.ansible.as_ref().ok_or_else(|| {
            StepError::NotReady("Ansible is not available in this mode (no [ssh] setup)".into())
        })?;
        let key = BatchKey {
            layer: ctx.template.layer.to_string(),
            transition: ctx.template.event.transition.as_str(),
            playbook: self.playbook.clone(),
            vars_json: serde_json::to_string(&vars).unwrap_or_default(),
            timeout: self.timeout,
            runner: self.runner_choice(&runner.settings),
        };
        let run: batch::Run<_, _> = Arc::new(BatchRun {
            runner: runner.clone(),
            key: key.clone(),
            vars,
        });
        let (first, reached) = self.attempt(ctx, runner, &key, &run).await?;
        let lost = match first {
            HostResult::Done(detail) => return Ok(StepOutput { detail }),
            HostResult::Failed(e) => return Err(StepError::Remote(e)),
            HostResult::Unreachable(e) => e,
        };
        let left = (reached + self.timeout).saturating_duration_since(Instant::now());
        warn!(
            left_s = left.as_secs(),
            "unreachable in the ansible-playbook run; a follow-up run for it"
        );
        ctx.note(format!(
            "unreachable in the ansible-playbook {} run; reaching it again for a follow-up run",
            self.playbook
        ));
        let first_words = lost.lines().next().unwrap_or_default().to_string();
        match tokio::time::timeout(left, self.attempt(ctx, runner, &key, &run)).await {
            Ok(Ok((HostResult::Done(detail), _))) => Ok(StepOutput {
                detail: format!("{detail}\n(in a follow-up run: the first found it unreachable: {first_words})"),
            }),
            Ok(Ok((HostResult::Failed(e) | HostResult::Unreachable(e), _))) => Err(
                StepError::Remote(format!("{e}\n(a follow-up run's result; the first run found it unreachable: {first_words})")),
            ),
            Ok(Err(StepError::NotReady(why))) => Err(StepError::NotReady(format!(
                "unreachable in the ansible-playbook run ({first_words}), and not reachable again for a follow-up run: {why}"
            ))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StepError::Remote(format!(
                "{lost}\n(unreachable in the ansible-playbook run; no follow-up run finished within the step's timeout, {})",
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// Enters a batch, reaches the instance (the batch gathers meanwhile), and waits for the
    /// batch's run: this host's result, and when it was reached.
    async fn attempt(
        &self,
        ctx: &StepContext<'_>,
        runner: &Runner,
        key: &BatchKey,
        run: &batch::Run<Target, HostResult>,
    ) -> Result<(HostResult, Instant), StepError> {
        // In the batch first, then reached: the batch gathers while instances are reached.
        // A failed reach drops the ticket, which leaves the batch.
        ctx.note(format!("joining an ansible-playbook {} run", self.playbook));
        let ticket = runner.batches.enter(key.clone(), run.clone());
        // One login proves the host, its key and cloud-init, and stays open: Ansible's
        // connection to the host is a channel of it. Closed (mux dropped) once the run
        // ended for this host, or this step stopped.
        let (target, mux) = ctx.probe(&runner.remote).await?;
        let reached = Instant::now();
        ctx.note(format!(
            "reached; waiting for the ansible-playbook {} run",
            self.playbook
        ));
        let result = ticket.ready(target).await.unwrap_or_else(|| {
            HostResult::Failed("the ansible-playbook run stopped unexpectedly".into())
        });
        Ok((lost_in_the_run(result, mux.as_ref()), reached))
    }
}

/// The runs of one step's batches: `ansible-playbook` started as a batch opens (when a fork
/// is free), given the batch's inventory once it is complete.
struct BatchRun {
    runner: Arc<Runner>,
    key: BatchKey,
    vars: BTreeMap<String, String>,
}

impl batch::Runs<Target, HostResult> for BatchRun {
    fn open(self: Arc<Self>) -> batch::Start<Target, HostResult> {
        let early = self.runner.start_early(&self.key, &self.vars);
        Box::new(move |targets| {
            Box::pin(async move {
                self.runner
                    .run_batch(&self.key, self.vars.clone(), targets, early)
                    .await
            })
        })
    }
}

/// A host whose verified connection (its control master) was lost during the run is
/// unreachable, whatever its task said: Mitogen can report the loss as a failed task (an
/// error of its own about the vanished stream) rather than as unreachable. Checked after the
/// run; a connection that is still up leaves the result as it is.
fn lost_in_the_run(result: HostResult, mux: Option<&crate::ssh::Mux>) -> HostResult {
    match (result, mux) {
        (HostResult::Failed(e), Some(m)) if !m.is_up() => {
            HostResult::Unreachable(format!("the connection to it was lost during the run: {e}"))
        }
        (r, _) => r,
    }
}

fn valid_playbook_name(p: &str) -> bool {
    !p.is_empty()
        && !p.starts_with('/')
        && !p.starts_with('-')
        && (p.ends_with(".yml") || p.ends_with(".yaml"))
        && p.split('/').all(|c| !c.is_empty() && c != ".." && c != ".")
}

fn valid_var_name(n: &str) -> bool {
    n.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(metadata: &str) -> crate::event::LifecycleEvent {
        let body = json!({
            "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
            "AutoScalingGroupName": "web-prod",
            "EC2InstanceId": "i-0123456789abcdef0",
            "LifecycleHookName": "launch",
            "LifecycleActionToken": "t-1",
            "NotificationMetadata": metadata,
        });
        match crate::event::parse(&body.to_string()) {
            crate::event::Parsed::Event(e) => e,
            other => panic!("{other:?}"),
        }
    }

    fn step(text: &str, vars: &Vars) -> Result<Ansible, Vec<ConfigError>> {
        let t: toml::Table = toml::from_str(text).unwrap();
        Ansible::parse(&t, "layers.web.launch[0]", vars)
    }

    #[test]
    fn a_failed_host_whose_connection_was_lost_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let muxes = crate::ssh::mux::MuxDir::create(dir.path()).unwrap();
        let failed = || HostResult::Failed("AttributeError: 'NoneType'".into());
        let up = muxes.socket("i-1").unwrap();
        let listener = std::os::unix::net::UnixListener::bind(up.path()).unwrap();
        assert_eq!(lost_in_the_run(failed(), Some(&up)), failed());
        drop(listener);
        let lost = muxes.socket("i-1").unwrap();
        assert!(matches!(
            lost_in_the_run(failed(), Some(&lost)),
            HostResult::Unreachable(e) if e.contains("lost during the run") && e.contains("AttributeError")
        ));
        assert_eq!(lost_in_the_run(failed(), None), failed());
        let done = HostResult::Done("ok=3".into());
        assert_eq!(lost_in_the_run(done.clone(), Some(&lost)), done);
    }

    #[test]
    fn vars_render_from_declared_metadata_and_never_carry_jinja() {
        let mut vars = Vars::default();
        vars.insert(
            "role".into(),
            crate::template::Pattern::new("[a-z]+").unwrap(),
        );
        // A careless pattern: the Jinja guard still holds.
        vars.insert("free".into(), crate::template::Pattern::new(".*").unwrap());
        let a = step(
            "ansible = \"web.yml\"\nvars = { role = \"{metadata.role}\", note = \"{metadata.free}\" }",
            &vars,
        )
        .unwrap();
        let ev = event(r#"{"role":"api","free":"plain text"}"#);
        let got = a.extra_vars(&Context::new(&ev, "web", &vars)).unwrap();
        assert_eq!(got["role"], "api");
        let ev = event(r#"{"role":"api","free":"{{ lookup('pipe', 'id') }}"}"#);
        let e = a.extra_vars(&Context::new(&ev, "web", &vars)).unwrap_err();
        assert!(e.to_string().contains("Jinja template marker"), "{e}");
        let ev = event(r#"{"role":"$(id)","free":"x"}"#);
        let e = a.extra_vars(&Context::new(&ev, "web", &vars)).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }

    #[test]
    fn undeclared_metadata_and_bad_names_are_config_errors() {
        let e = step(
            "ansible = \"../x.yml\"\nvars = { role = \"{metadata.role}\", \"bad-name\" = \"x\" }",
            &Vars::default(),
        )
        .unwrap_err();
        let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "layers.web.launch[0].ansible",
                "layers.web.launch[0].vars.role",
                "layers.web.launch[0].vars.bad-name"
            ],
            "{e:?}"
        );
    }

    #[test]
    fn playbook_names_stay_inside_the_playbook_dir() {
        for good in ["web.yml", "roles/app.yaml"] {
            assert!(valid_playbook_name(good), "{good}");
        }
        for bad in ["../etc/x.yml", "/etc/x.yml", "web", "-x.yml", "a//b.yml"] {
            assert!(!valid_playbook_name(bad), "{bad}");
        }
    }
}
