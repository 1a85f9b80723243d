//! Raw TOML -> validated [`Config`].
//!
//! Owns the file format: every key, its default, and the checks that make a config usable.
//! Parsing happens in two passes, as ripgrep does with its flags: serde reads the file into
//! `Raw*` structs that mirror it (unknown keys are errors), then `validate` turns them into the
//! typed config, collecting *every* problem with the key it belongs to. The meaning of a step
//! lives with the step (`step::parse`), not here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::aws::HookResult;
use crate::layer::{Glob, Matcher, Pattern, Vars};
use crate::setting::ConfigError;
use crate::step::{self, Step};

pub const DEFAULT_PATH: &str = "/etc/provision/provision.toml";
pub const DEFAULT_STATE_PATH: &str = "/var/lib/provision/state.db";

/// SQS allows at most 12 hours of visibility for one receive.
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, Clone)]
pub struct Config {
    pub queue: QueueConfig,
    pub notify: Option<NotifyConfig>,
    pub state: StateConfig,
    pub daemon: DaemonConfig,
    pub aws: AwsConfig,
    pub ssm: SsmConfig,
    pub ssh: crate::ssh::SshSettings,
    pub ansible: crate::step::ansible::AnsibleSettings,
    /// Where the daemon serves /metrics and /healthz; None to serve nothing.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// In file order: the first layer that matches an event wins.
    pub layers: Vec<Layer>,
}

#[derive(Debug, Clone)]
pub struct SsmConfig {
    /// Instances reaching the same ssm step within this window share one SendCommand.
    pub batch_window: Duration,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub url: String,
    pub max_in_flight: usize,
    /// Long-poll wait of one ReceiveMessage (0..=20 s).
    pub wait_time: Duration,
    /// How long a received message stays hidden; extended while its event is worked on.
    pub visibility_timeout: Duration,
    pub on_reject: OnReject,
}

/// What happens to a message that can never be handled (malformed, unsafe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnReject {
    /// Dead-letter when the queue has a redrive policy, otherwise delete.
    Auto,
    /// Record and delete at once.
    Delete,
    /// Record and release, so the queue's redrive policy moves it to the dead-letter queue
    /// after maxReceiveCount receives.
    DeadLetter,
}

#[derive(Debug, Clone)]
pub struct NotifyConfig {
    pub topic_arn: String,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// After SIGTERM, how long in-flight events may finish before they are released.
    pub shutdown_grace: Duration,
    /// Events whose group no layer matches.
    pub unmatched: Unmatched,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// Delete the message and leave the hook alone (another consumer, or the hook's
    /// DefaultResult, decides). The safe default when hooks are shared.
    Ignore,
    /// Complete the hook with this result.
    Complete(HookResult),
}

#[derive(Debug, Clone)]
pub struct AwsConfig {
    /// Attempts per AWS call inside the SDK (standard retry mode, exponential backoff with jitter).
    pub max_attempts: u32,
    /// After the SDK gives up on a retryable error, keep retrying with backoff this long.
    pub retry_for: Duration,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub name: String,
    pub matcher: Matcher,
    /// Metadata keys the steps may use, with the pattern each value must match.
    pub vars: Vars,
    pub on_failure: HookResult,
    /// Overrides of `[ssh]` for this layer's instances.
    pub ssh: crate::ssh::LayerSsh,
    pub launch: Vec<Step>,
    pub terminate: Vec<Step>,
}

impl Config {
    /// Whether any layer has a step that connects over SSH (ssh, ansible).
    pub fn uses_ssh(&self) -> bool {
        self.layers.iter().any(|l| {
            l.launch
                .iter()
                .chain(&l.terminate)
                .any(|s| matches!(s.kind, step::StepKind::Ssh(_) | step::StepKind::Ansible(_)))
        })
    }

    /// The directory of the state store: known_hosts.d and ansible-logs live there too.
    pub fn state_dir(&self) -> PathBuf {
        match self.state.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }
}

impl Layer {
    pub fn steps(&self, transition: crate::event::Transition) -> &[Step] {
        match transition {
            crate::event::Transition::Launch => &self.launch,
            crate::event::Transition::Terminate => &self.terminate,
        }
    }
}

/// Every problem found in one config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors {
    pub source_name: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.source_name,
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    queue: Option<RawQueue>,
    notify: Option<RawNotify>,
    state: Option<RawState>,
    daemon: Option<RawDaemon>,
    aws: Option<RawAws>,
    ssm: Option<RawSsm>,
    ssh: Option<toml::Table>,
    ansible: Option<toml::Table>,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    layers: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsm {
    batch_window: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    url: Option<String>,
    max_in_flight: Option<i64>,
    wait_time: Option<String>,
    visibility_timeout: Option<String>,
    on_reject: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    topic_arn: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    shutdown_grace: Option<String>,
    unmatched: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAws {
    max_attempts: Option<i64>,
    retry_for: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLayer {
    groups: Option<Vec<String>>,
    #[serde(default)]
    metadata: toml::Table,
    #[serde(default)]
    vars: toml::Table,
    on_failure: Option<String>,
    ssh: Option<toml::Value>,
    #[serde(default)]
    launch: Vec<toml::Table>,
    #[serde(default)]
    terminate: Vec<toml::Table>,
}

/// Where the config comes from: `--config`, else `$PROVISION_CONFIG`, else the default path.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("PROVISION_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_PATH),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            source_name: name.clone(),
            errors: vec![ConfigError::new("(file)", format!("cannot read: {e}"))],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse_in(&text, &name, base)
    }

    /// Parses a config whose relative paths are relative to the working directory.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigErrors> {
        Self::parse_in(text, source_name, Path::new("."))
    }

    /// Parses a config whose relative paths (`ansible.playbook_dir`) are relative to `base`.
    pub fn parse_in(text: &str, source_name: &str, base: &Path) -> Result<Config, ConfigErrors> {
        let fail = |errors| ConfigErrors {
            source_name: source_name.to_string(),
            errors,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml names the key and shows the line; keep its message, drop trailing blank lines.
            let key = e
                .span()
                .map(|s| {
                    let line = text[..s.start].matches('\n').count() + 1;
                    format!("line {line}")
                })
                .unwrap_or_else(|| "(syntax)".to_string());
            fail(vec![ConfigError::new(key, e.message().trim().to_string())])
        })?;
        let mut errs = Vec::new();
        let cfg = validate(raw, base, &mut errs);
        if errs.is_empty() {
            Ok(cfg)
        } else {
            Err(fail(errs))
        }
    }
}

fn duration(
    key: &str,
    raw: Option<&str>,
    default: Duration,
    errs: &mut Vec<ConfigError>,
) -> Duration {
    match raw {
        None => default,
        Some(s) => humantime::parse_duration(s).unwrap_or_else(|e| {
            errs.push(ConfigError::new(
                key,
                format!("{s:?} is not a duration ({e}); write e.g. \"30s\", \"5m\", \"1h\""),
            ));
            default
        }),
    }
}

fn hook_result(
    key: &str,
    raw: Option<&str>,
    default: HookResult,
    errs: &mut Vec<ConfigError>,
) -> HookResult {
    match raw {
        None => default,
        Some("abandon") => HookResult::Abandon,
        Some("continue") => HookResult::Continue,
        Some(other) => {
            errs.push(ConfigError::new(
                key,
                format!("{other:?} is not a result; expected \"abandon\" or \"continue\""),
            ));
            default
        }
    }
}

fn validate(raw: RawConfig, base: &Path, errs: &mut Vec<ConfigError>) -> Config {
    let q = raw.queue.unwrap_or(RawQueue {
        url: None,
        max_in_flight: None,
        wait_time: None,
        visibility_timeout: None,
        on_reject: None,
    });
    let url = match q.url {
        Some(u) if u.starts_with("https://") || u.starts_with("http://") => u,
        Some(u) => {
            errs.push(ConfigError::new(
                "queue.url",
                format!("{u:?} is not a queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)"),
            ));
            u
        }
        None => {
            errs.push(ConfigError::new(
                "queue.url",
                "missing: the SQS queue the lifecycle hooks notify",
            ));
            String::new()
        }
    };
    let max_in_flight = match q.max_in_flight {
        None => 32,
        Some(n) if (1..=10_000).contains(&n) => n as usize,
        Some(n) => {
            errs.push(ConfigError::new(
                "queue.max_in_flight",
                format!("{n} is out of range 1..=10000"),
            ));
            32
        }
    };
    let wait_time = duration(
        "queue.wait_time",
        q.wait_time.as_deref(),
        Duration::from_secs(20),
        errs,
    );
    if wait_time > Duration::from_secs(20) {
        errs.push(ConfigError::new(
            "queue.wait_time",
            "SQS long polls at most 20s",
        ));
    }
    let visibility_timeout = duration(
        "queue.visibility_timeout",
        q.visibility_timeout.as_deref(),
        Duration::from_secs(120),
        errs,
    );
    if visibility_timeout < Duration::from_secs(2) || visibility_timeout > MAX_VISIBILITY {
        errs.push(ConfigError::new(
            "queue.visibility_timeout",
            "must be between 2s and 12h (it is extended while an event is worked on)",
        ));
    }
    let on_reject = match q.on_reject.as_deref() {
        None | Some("auto") => OnReject::Auto,
        Some("delete") => OnReject::Delete,
        Some("dead-letter") => OnReject::DeadLetter,
        Some(other) => {
            errs.push(ConfigError::new(
                "queue.on_reject",
                format!("{other:?}: expected \"auto\", \"delete\" or \"dead-letter\""),
            ));
            OnReject::Auto
        }
    };

    let notify = match raw.notify {
        None => None,
        Some(RawNotify { topic_arn: None }) => {
            errs.push(ConfigError::new(
                "notify.topic_arn",
                "missing (or remove the [notify] table)",
            ));
            None
        }
        Some(RawNotify {
            topic_arn: Some(arn),
        }) => {
            if !arn.starts_with("arn:") || arn.split(':').nth(2) != Some("sns") {
                errs.push(ConfigError::new(
                    "notify.topic_arn",
                    format!("{arn:?} is not an SNS topic ARN"),
                ));
            }
            Some(NotifyConfig { topic_arn: arn })
        }
    };

    let state = StateConfig {
        path: raw
            .state
            .and_then(|s| s.path)
            .unwrap_or_else(default_state_path),
    };

    let d = raw.daemon.unwrap_or(RawDaemon {
        shutdown_grace: None,
        unmatched: None,
    });
    let daemon = DaemonConfig {
        shutdown_grace: duration(
            "daemon.shutdown_grace",
            d.shutdown_grace.as_deref(),
            Duration::from_secs(30),
            errs,
        ),
        unmatched: match d.unmatched.as_deref() {
            None | Some("ignore") => Unmatched::Ignore,
            Some("continue") => Unmatched::Complete(HookResult::Continue),
            Some("abandon") => Unmatched::Complete(HookResult::Abandon),
            Some(other) => {
                errs.push(ConfigError::new(
                    "daemon.unmatched",
                    format!("{other:?}: expected \"ignore\", \"continue\" or \"abandon\""),
                ));
                Unmatched::Ignore
            }
        },
    };

    let a = raw.aws.unwrap_or(RawAws {
        max_attempts: None,
        retry_for: None,
    });
    let aws = AwsConfig {
        max_attempts: match a.max_attempts {
            None => 5,
            Some(n) if (1..=20).contains(&n) => n as u32,
            Some(n) => {
                errs.push(ConfigError::new(
                    "aws.max_attempts",
                    format!("{n} is out of range 1..=20"),
                ));
                5
            }
        },
        retry_for: duration(
            "aws.retry_for",
            a.retry_for.as_deref(),
            Duration::from_secs(120),
            errs,
        ),
    };

    let ssm = SsmConfig {
        batch_window: duration(
            "ssm.batch_window",
            raw.ssm.and_then(|s| s.batch_window).as_deref(),
            Duration::from_secs(2),
            errs,
        ),
    };

    let ssh = crate::ssh::SshSettings::parse(raw.ssh.as_ref(), errs);
    let ansible = crate::step::ansible::AnsibleSettings::parse(raw.ansible.as_ref(), base, errs);

    let metrics_listen = match raw.metrics.and_then(|m| m.listen) {
        None => Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464))),
        Some(s) if s.is_empty() || s == "off" => None,
        Some(s) => match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                errs.push(ConfigError::new(
                    "metrics.listen",
                    format!("{s:?} is not an address:port (or \"off\")"),
                ));
                None
            }
        },
    };

    let mut layers = Vec::new();
    if raw.layers.is_empty() {
        errs.push(ConfigError::new(
            "layers",
            "no layers: add at least one [layers.NAME] table",
        ));
    }
    for (name, value) in raw.layers {
        let key = format!("layers.{name}");
        if !valid_layer_name(&name) {
            errs.push(ConfigError::new(
                &key,
                "layer names are letters, digits, '-' and '_'",
            ));
        }
        let rl: RawLayer = match value.try_into() {
            Ok(l) => l,
            Err(e) => {
                errs.push(ConfigError::new(&key, e.message().trim().to_string()));
                continue;
            }
        };
        layers.push(validate_layer(name, &key, rl, errs));
    }

    Config {
        queue: QueueConfig {
            url,
            max_in_flight,
            wait_time,
            visibility_timeout,
            on_reject,
        },
        notify,
        state,
        daemon,
        aws,
        ssm,
        ssh,
        ansible,
        metrics_listen,
        layers,
    }
}

fn valid_layer_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn validate_layer(name: String, key: &str, rl: RawLayer, errs: &mut Vec<ConfigError>) -> Layer {
    let groups: Vec<Glob> = match rl.groups {
        Some(g) if !g.is_empty() => g.iter().map(|s| Glob::new(s)).collect(),
        _ => {
            errs.push(ConfigError::new(
                format!("{key}.groups"),
                "missing: a list of Auto Scaling group name globs, e.g. [\"web-*\"]",
            ));
            Vec::new()
        }
    };
    let mut metadata = std::collections::BTreeMap::new();
    for (k, v) in rl.metadata {
        match v.as_str() {
            Some(s) => {
                metadata.insert(k, Glob::new(s));
            }
            None => errs.push(ConfigError::new(
                format!("{key}.metadata.{k}"),
                "must be a string glob",
            )),
        }
    }
    let mut vars = Vars::default();
    for (k, v) in rl.vars {
        let vk = format!("{key}.vars.{k}");
        match v.as_str().map(Pattern::new) {
            Some(Ok(p)) => vars.insert(k, p),
            Some(Err(e)) => errs.push(ConfigError::new(vk, format!("not a valid pattern: {e}"))),
            None => errs.push(ConfigError::new(
                vk,
                "must be a pattern string, e.g. \"[a-z0-9-]{1,32}\"",
            )),
        }
    }
    let on_failure = hook_result(
        &format!("{key}.on_failure"),
        rl.on_failure.as_deref(),
        HookResult::Abandon,
        errs,
    );
    let steps = |list: Vec<toml::Table>, which: &str, errs: &mut Vec<ConfigError>| -> Vec<Step> {
        list.into_iter()
            .enumerate()
            .filter_map(|(i, t)| {
                step::parse(&t, &format!("{key}.{which}[{i}]"), &vars)
                    .map_err(|e| errs.extend(e))
                    .ok()
            })
            .collect()
    };
    let ssh = rl
        .ssh
        .map(|v| crate::ssh::LayerSsh::parse(&v, &format!("{key}.ssh"), errs))
        .unwrap_or_default();
    let launch = steps(rl.launch, "launch", errs);
    let terminate = steps(rl.terminate, "terminate", errs);
    Layer {
        name,
        vars,
        matcher: Matcher { groups, metadata },
        on_failure,
        ssh,
        launch,
        terminate,
    }
}

fn default_state_path() -> PathBuf {
    // systemd's StateDirectory= sets this; prefer it over the compiled-in default.
    match systemd_directory("STATE_DIRECTORY") {
        Some(d) => d.join("state.db"),
        None => PathBuf::from(DEFAULT_STATE_PATH),
    }
}

/// The first directory of a systemd `*_DIRECTORY` variable (StateDirectory=,
/// RuntimeDirectory=, ...: colon-separated when the unit names several).
pub fn systemd_directory(var: &str) -> Option<PathBuf> {
    let d = std::env::var_os(var).filter(|d| !d.is_empty())?;
    let first = d.to_string_lossy().split(':').next()?.to_string();
    (!first.is_empty()).then(|| PathBuf::from(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[queue]
url = "https://sqs.us-east-1.amazonaws.com/123456789012/asg-lifecycle"
max_in_flight = 8

[notify]
topic_arn = "arn:aws:sns:us-east-1:123456789012:provision-results"

[state]
path = "/tmp/x.db"

[layers.web]
groups = ["web-*"]
on_failure = "abandon"
launch = [ { tag = { Name = "web-{instance_id}", Environment = "{metadata.environment}" } } ]
terminate = []

[layers.any]
groups = ["*"]
on_failure = "continue"
"#;

    #[test]
    fn parses_the_documented_keys() {
        let c = Config::parse(GOOD, "t").unwrap();
        assert_eq!(c.queue.max_in_flight, 8);
        assert_eq!(c.queue.wait_time, Duration::from_secs(20));
        assert_eq!(c.layers.len(), 2);
        assert_eq!(c.layers[0].name, "web", "file order is kept");
        assert_eq!(c.layers[0].launch.len(), 1);
        assert_eq!(c.layers[1].on_failure, HookResult::Continue);
        assert_eq!(c.daemon.unmatched, Unmatched::Ignore);
        assert_eq!(c.state.path, PathBuf::from("/tmp/x.db"));
    }

    #[test]
    fn collects_every_problem_with_its_key() {
        let bad = r#"
[queue]
url = "sqs-queue"
max_in_flight = 0
wait_time = "forever"

[layers.web]
on_failure = "retry"
launch = [ { tag = { Name = "{nope}" } }, { teleport = {} } ]
"#;
        let e = Config::parse(bad, "bad.toml").unwrap_err();
        let keys: Vec<&str> = e.errors.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "queue.url",
            "queue.max_in_flight",
            "queue.wait_time",
            "layers.web.groups",
            "layers.web.on_failure",
            "layers.web.launch[0].tag.Name",
            "layers.web.launch[1]",
        ] {
            assert!(keys.contains(&k), "no error for {k}: {e}");
        }
    }

    #[test]
    fn message_names_never_reach_a_command() {
        let text = r#"
[queue]
url = "https://x/123456789012/q"
[layers.app]
groups = ["app-*"]
launch = [ { ssm = { document = "AWS-RunShellScript", parameters = { commands = ["echo {group}", "echo {layer} {instance_id}"] } } } ]
"#;
        let e = Config::parse(text, "t").unwrap_err();
        assert_eq!(e.errors.len(), 1, "{e}");
        assert_eq!(
            e.errors[0].key,
            "layers.app.launch[0].ssm.parameters.commands[0]"
        );
        assert!(
            e.errors[0]
                .message
                .contains("{group} and {hook} come from the message"),
            "{e}"
        );
    }

    #[test]
    fn ssh_and_ansible_sections_and_layer_overrides() {
        let text = r#"
[queue]
url = "https://x/123456789012/q"
[ssh]
user = "admin"
host_key_check = "accept-new"
[ansible]
playbook_dir = "books"
max_batch = 10
vault_password = { ssm_parameter = "/provision/vault" }
[layers.app]
groups = ["app-*"]
ssh = { user = "ubuntu", port = 2222 }
launch = [ { ansible = "app.yml" }, { ssh = ["true"] } ]
"#;
        let c = Config::parse_in(text, "t", Path::new("/etc/provision")).unwrap();
        assert_eq!(c.ssh.user, "admin");
        assert_eq!(c.ssh.host_key_check, crate::ssh::HostKeyCheck::AcceptNew);
        assert_eq!(
            c.ansible.playbook_dir,
            PathBuf::from("/etc/provision/books")
        );
        assert_eq!(c.ansible.max_batch, 10);
        assert_eq!(c.layers[0].ssh.user.as_deref(), Some("ubuntu"));
        assert_eq!(c.layers[0].ssh.port, Some(2222));
        assert!(c.uses_ssh());
        let bad = text.replace("port = 2222", "port = 0, shell = \"zsh\"");
        let e = Config::parse(&bad, "t").unwrap_err();
        let keys: Vec<&str> = e.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["layers.app.ssh.port", "layers.app.ssh.shell"], "{e}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Config::parse("[queue]\nurl = \"https://x\"\nmax_inflight = 3\n", "t").unwrap_err();
        assert!(e.to_string().contains("max_inflight"), "{e}");
        let e = Config::parse(
            "[queue]\nurl = \"https://x\"\n[layers.a]\ngroups=[\"*\"]\ngrups = 1\n",
            "t",
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("layers.a") && e.to_string().contains("grups"),
            "{e}"
        );
    }
}
