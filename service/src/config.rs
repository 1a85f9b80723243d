//! Raw TOML -> validated [`Config`].
//!
//! Owns the file format: every key, its default, and the checks that make a config usable.
//! Parsing happens in passes, as ripgrep builds its typed arguments from parts: serde reads
//! the top level (an unknown section is an error), then each section's `from_raw` reads its
//! table with the shared [`Fields`] reader (unknown keys are errors there), collecting
//! *every* problem with the key it belongs to. Facts from the environment
//! (`$STATE_DIRECTORY`, ...) come in as one [`Env`] snapshot taken before parsing.
//!
//! Not here: the meaning of a step (`step::parse`), of `[ssh]` (`ssh::settings`) and of
//! `[ansible]` (`step::ansible`); how a key is read and named in errors (`setting`).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::layer::Layer;
use crate::outcome::HookResult;
use crate::setting::{quoted, ConfigError, Env, Fields};
use crate::sources::SourceConfig;
use crate::ssh::SshSettings;
use crate::step;
use crate::step::ansible::AnsibleSettings;

pub const DEFAULT_PATH: &str = "/etc/provision/provision.toml";
pub const DEFAULT_STATE_PATH: &str = "/var/lib/provision/state.db";

/// How often the daemon reconciles unless `reconcile.interval` says otherwise.
const DEFAULT_RECONCILE_EVERY: Duration = Duration::from_secs(120);

/// SQS allows at most 12 hours of visibility for one receive.
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 3600);

#[derive(Debug, Clone)]
pub struct Config {
    pub queue: QueueConfig,
    /// Every queue read: `[queue] url` (named [`crate::sources::DEFAULT_SOURCE`]) first when
    /// set, then `[sources.NAME]` in file order. Never empty in a valid config.
    pub sources: Vec<SourceConfig>,
    pub notify: Option<NotifyConfig>,
    pub state: StateConfig,
    pub daemon: DaemonConfig,
    pub reconcile: ReconcileConfig,
    pub aws: AwsConfig,
    pub ssm: SsmConfig,
    pub ssh: SshSettings,
    pub ansible: AnsibleSettings,
    /// Where the daemon serves /metrics and /healthz; None to serve nothing.
    pub metrics_listen: Option<SocketAddr>,
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
    /// The one-source form's queue; empty when only `[sources.NAME]` name queues.
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
    pub format: NotifyFormat,
}

/// `notify.format`: what a result event looks like on the topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NotifyFormat {
    /// provision's JSON result event (`"type": "provision.result"`).
    #[default]
    Event,
    /// A custom notification of Amazon Q Developer in chat applications (AWS Chatbot).
    Chat,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    pub path: PathBuf,
    /// The DynamoDB table shared by a fleet of ops hosts for claims; None: claims live in
    /// the SQLite store (one host).
    pub claims_table: Option<String>,
    /// The DynamoDB table every host writes its finished runs to, so that `provision
    /// history` shows the fleet's; None: each host's history is its own.
    pub history_table: Option<String>,
    /// How long a claim holds without renewal: another host takes a claim over only once
    /// its lease expired. Renewed every third of it while the steps run.
    pub claim_lease: Duration,
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

/// `[reconcile]`: what Auto Scaling says, compared with what messages announced.
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// How often the daemon reconciles; None: never (`provision reconcile` still does).
    pub interval: Option<Duration>,
    /// How long an action must be seen waiting, with no run of ours working it, before the
    /// daemon works it without its message.
    pub grace: Duration,
    /// What becomes of instances in service that no launch run of ours configured.
    pub unconfigured: Unconfigured,
}

/// `reconcile.unconfigured`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unconfigured {
    /// Not looked for, and launches are not marked (`provision:configured`).
    Off,
    /// Counted, published and printed.
    Report,
    /// Reported, and their layer's launch steps run.
    Configure,
    /// Reported, and marked unhealthy so Auto Scaling replaces them through the launch hook.
    Replace,
}

impl Unconfigured {
    pub fn as_str(self) -> &'static str {
        match self {
            Unconfigured::Off => "off",
            Unconfigured::Report => "report",
            Unconfigured::Configure => "configure",
            Unconfigured::Replace => "replace",
        }
    }

    /// Whether successful launch runs mark their instance configured.
    pub fn marks(self) -> bool {
        self != Unconfigured::Off
    }
}

impl ReconcileConfig {
    /// Whether runs leave the records reconcile reads (the configured tag, the
    /// decommissioned claim): when anything of reconcile is on.
    pub fn records(&self) -> bool {
        self.interval.is_some() || self.unconfigured.marks()
    }
}

#[derive(Debug, Clone)]
pub struct AwsConfig {
    /// Attempts per AWS call inside the SDK (standard retry mode, exponential backoff with jitter).
    pub max_attempts: u32,
    /// After the SDK gives up on a retryable error, keep retrying with backoff this long.
    pub retry_for: Duration,
    /// How long one attempt of a call may go unanswered before the SDK gives up on it (and
    /// retries: "no answer in time" is transient). Longer than `queue.wait_time`, which a
    /// long poll holds.
    pub attempt_timeout: Duration,
}

impl Config {
    /// Whether any layer has a step that connects over SSH (ssh, ansible).
    pub fn uses_ssh(&self) -> bool {
        self.layers.iter().any(|l| {
            l.all_steps()
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

/// The file as serde sees it: the top level only (an unknown section is an error). Each
/// section is then read by its own `from_raw` with the shared [`Fields`] reader.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    queue: Option<toml::Table>,
    sources: Option<toml::Table>,
    notify: Option<toml::Table>,
    state: Option<toml::Table>,
    daemon: Option<toml::Table>,
    reconcile: Option<toml::Table>,
    aws: Option<toml::Table>,
    ssm: Option<toml::Table>,
    ssh: Option<toml::Table>,
    ansible: Option<toml::Table>,
    metrics: Option<toml::Table>,
    #[serde(default)]
    layers: toml::Table,
}

/// Where the config comes from: `--config`, else `$PROVISION_CONFIG`, else the default path.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    resolve_path_in(flag, &Env::from_process())
}

/// [`resolve_path`] with the environment's facts handed in.
pub fn resolve_path_in(flag: Option<&Path>, env: &Env) -> PathBuf {
    flag.map(Path::to_path_buf)
        .or_else(|| env.config_path.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Self::load_with_text(path).map(|(cfg, _)| cfg)
    }

    /// [`Config::load`], with the text it was read from (what a reload compares with).
    pub fn load_with_text(path: &Path) -> Result<(Config, String), ConfigErrors> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            source_name: name.clone(),
            errors: vec![ConfigError::new("(file)", format!("cannot read: {e}"))],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let cfg = Self::parse_with(&text, &name, base, &Env::from_process())?;
        Ok((cfg, text))
    }

    /// Parses a config whose relative paths are relative to the working directory.
    pub fn parse(text: &str, source_name: &str) -> Result<Config, ConfigErrors> {
        Self::parse_in(text, source_name, Path::new("."))
    }

    /// Parses a config whose relative paths (`ansible.playbook_dir`) are relative to `base`.
    pub fn parse_in(text: &str, source_name: &str, base: &Path) -> Result<Config, ConfigErrors> {
        Self::parse_with(text, source_name, base, &Env::from_process())
    }

    /// Parses a config with the environment's facts (`$STATE_DIRECTORY`, ...) handed in:
    /// nothing is read from the process environment while validating.
    pub fn parse_with(
        text: &str,
        source_name: &str,
        base: &Path,
        env: &Env,
    ) -> Result<Config, ConfigErrors> {
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
        let cfg = validate(raw, base, env, &mut errs);
        if errs.is_empty() {
            Ok(cfg)
        } else {
            Err(fail(errs))
        }
    }
}

/// Every section from its table, in file-documentation order; problems are collected, not
/// returned early, so one run names them all.
fn validate(raw: RawConfig, base: &Path, env: &Env, errs: &mut Vec<ConfigError>) -> Config {
    let named = raw.sources.as_ref().is_some_and(|t| !t.is_empty());
    let queue = QueueConfig::from_raw(raw.queue.as_ref(), named, errs);
    let default = (!queue.url.is_empty()).then(|| SourceConfig {
        name: crate::sources::DEFAULT_SOURCE.to_string(),
        url: queue.url.clone(),
        region: None,
        role: None,
    });
    let cfg = Config {
        sources: crate::sources::all_from_raw(default, raw.sources.as_ref(), errs),
        queue,
        notify: NotifyConfig::from_raw(raw.notify.as_ref(), errs),
        state: StateConfig::from_raw(raw.state.as_ref(), env, errs),
        daemon: DaemonConfig::from_raw(raw.daemon.as_ref(), errs),
        reconcile: ReconcileConfig::from_raw(raw.reconcile.as_ref(), errs),
        aws: AwsConfig::from_raw(raw.aws.as_ref(), errs),
        ssm: SsmConfig::from_raw(raw.ssm.as_ref(), errs),
        ssh: SshSettings::parse(raw.ssh.as_ref(), errs),
        ansible: AnsibleSettings::parse(raw.ansible.as_ref(), base, errs),
        metrics_listen: metrics_listen(raw.metrics.as_ref(), errs),
        layers: Layer::all_from_raw(&raw.layers, errs),
    };
    // A long poll holds its call for up to `queue.wait_time`: an attempt must outlast it.
    // (A wait_time over SQS's 20 s is an error of its own.)
    let long_poll = cfg.queue.wait_time.min(Duration::from_secs(20));
    if cfg.aws.attempt_timeout < long_poll + Duration::from_secs(1) {
        errs.push(ConfigError::new(
            "aws.attempt_timeout",
            format!(
                "must be at least 1s longer than queue.wait_time ({}), which a long poll holds",
                humantime::format_duration(long_poll)
            ),
        ));
    }
    cfg
}

impl QueueConfig {
    /// `[queue]`: its `url` is optional when `[sources.NAME]` name queues (`named`); its
    /// other keys apply to every source.
    fn from_raw(t: Option<&toml::Table>, named: bool, errs: &mut Vec<ConfigError>) -> QueueConfig {
        let mut f = Fields::new(t, "queue", errs);
        let url = match named && t.is_none_or(|t| !t.contains_key("url")) {
            true => String::new(),
            false => queue_url(&mut f),
        };
        let max_in_flight = f.int("max_in_flight", 1..=10_000, 64) as usize;
        let wait_time = f.duration("wait_time", Duration::from_secs(20));
        if wait_time > Duration::from_secs(20) {
            f.error("wait_time", "SQS long polls at most 20s");
        }
        let visibility_timeout = f.duration("visibility_timeout", Duration::from_secs(120));
        if visibility_timeout < Duration::from_secs(2) || visibility_timeout > MAX_VISIBILITY {
            f.error(
                "visibility_timeout",
                "must be between 2s and 12h (it is extended while an event is worked on)",
            );
        }
        let on_reject = match f.string("on_reject") {
            None | Some("auto") => OnReject::Auto,
            Some("delete") => OnReject::Delete,
            Some("dead-letter") => OnReject::DeadLetter,
            Some(other) => {
                f.error(
                    "on_reject",
                    format!("{other:?}: expected \"auto\", \"delete\" or \"dead-letter\""),
                );
                OnReject::Auto
            }
        };
        f.finish_section("[queue]");
        QueueConfig {
            url,
            max_in_flight,
            wait_time,
            visibility_timeout,
            on_reject,
        }
    }
}

fn queue_url(f: &mut Fields<'_>) -> String {
    let Some(v) = f.required("url", "missing: the SQS queue the lifecycle hooks notify") else {
        return String::new();
    };
    match v.as_str() {
        Some(u) if u.starts_with("https://") || u.starts_with("http://") => u.to_string(),
        _ => {
            f.error(
                "url",
                format!(
                    "{} is not a queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)",
                    quoted(v)
                ),
            );
            v.as_str().unwrap_or_default().to_string()
        }
    }
}

impl NotifyConfig {
    /// `[notify]`; None when the table is absent.
    fn from_raw(t: Option<&toml::Table>, errs: &mut Vec<ConfigError>) -> Option<NotifyConfig> {
        let mut f = Fields::new(Some(t?), "notify", errs);
        let arn = f
            .required("topic_arn", "missing (or remove the [notify] table)")
            .map(|v| {
                let arn = v.as_str().unwrap_or_default();
                if !arn.starts_with("arn:") || arn.split(':').nth(2) != Some("sns") {
                    f.error(
                        "topic_arn",
                        format!("{} is not an SNS topic ARN", quoted(v)),
                    );
                }
                arn.to_string()
            });
        let format = f.with("format", |v| match v.as_str() {
            Some("event") => Ok(NotifyFormat::Event),
            Some("chat") => Ok(NotifyFormat::Chat),
            _ => Err(format!(
                "{} is not a format; expected \"event\" (provision's JSON) or \"chat\" (Amazon Q Developer in chat applications' custom notification)",
                quoted(v)
            )),
        });
        f.finish_section("[notify]");
        arn.map(|topic_arn| NotifyConfig {
            topic_arn,
            format: format.unwrap_or_default(),
        })
    }
}

impl StateConfig {
    /// `[state]`: the store's path defaults to systemd's StateDirectory= when it is set.
    fn from_raw(t: Option<&toml::Table>, env: &Env, errs: &mut Vec<ConfigError>) -> StateConfig {
        let mut f = Fields::new(t, "state", errs);
        let path = f
            .path("path")
            .unwrap_or_else(|| match &env.state_directory {
                Some(d) => d.join("state.db"),
                None => PathBuf::from(DEFAULT_STATE_PATH),
            });
        let claims_table = f.non_empty("claims_table").and_then(|t| {
            if crate::claims::valid_table_name(t) {
                Some(t.to_string())
            } else {
                f.error(
                    "claims_table",
                    format!("{t:?} is not a DynamoDB table name (3 to 255 of a-z A-Z 0-9 _ - .)"),
                );
                None
            }
        });
        let history_table = f.non_empty("history_table").and_then(|t| {
            if crate::claims::valid_table_name(t) {
                Some(t.to_string())
            } else {
                f.error(
                    "history_table",
                    format!("{t:?} is not a DynamoDB table name (3 to 255 of a-z A-Z 0-9 _ - .)"),
                );
                None
            }
        });
        let claim_lease = f.duration("claim_lease", crate::claims::DEFAULT_LEASE);
        if claim_lease < crate::claims::MIN_LEASE {
            f.error(
                "claim_lease",
                format!(
                    "{} is too short to renew in time; at least {}",
                    humantime::format_duration(claim_lease),
                    humantime::format_duration(crate::claims::MIN_LEASE)
                ),
            );
        }
        f.finish_section("[state]");
        StateConfig {
            path,
            claims_table,
            history_table,
            claim_lease,
        }
    }
}

impl DaemonConfig {
    /// `[daemon]`.
    fn from_raw(t: Option<&toml::Table>, errs: &mut Vec<ConfigError>) -> DaemonConfig {
        let mut f = Fields::new(t, "daemon", errs);
        let shutdown_grace = f.duration("shutdown_grace", Duration::from_secs(30));
        let unmatched = match f.string("unmatched") {
            None | Some("ignore") => Unmatched::Ignore,
            Some("continue") => Unmatched::Complete(HookResult::Continue),
            Some("abandon") => Unmatched::Complete(HookResult::Abandon),
            Some(other) => {
                f.error(
                    "unmatched",
                    format!("{other:?}: expected \"ignore\", \"continue\" or \"abandon\""),
                );
                Unmatched::Ignore
            }
        };
        f.finish_section("[daemon]");
        DaemonConfig {
            shutdown_grace,
            unmatched,
        }
    }
}

impl ReconcileConfig {
    /// `[reconcile]`.
    fn from_raw(t: Option<&toml::Table>, errs: &mut Vec<ConfigError>) -> ReconcileConfig {
        let mut f = Fields::new(t, "reconcile", errs);
        let interval = f
            .with("interval", |v| match v.as_str() {
                Some("off") => Ok(None),
                Some(s) => match crate::setting::parse_duration(s) {
                    Ok(d) if d >= Duration::from_secs(1) => Ok(Some(d)),
                    _ => Err(format!("{s:?}: a duration of at least 1s, or \"off\"")),
                },
                None => Err("must be a duration such as \"2m\", or \"off\"".to_string()),
            })
            .unwrap_or(Some(DEFAULT_RECONCILE_EVERY));
        let grace = f.duration("grace", Duration::from_secs(180));
        let unconfigured = match f.string("unconfigured") {
            None | Some("report") => Unconfigured::Report,
            Some("off") => Unconfigured::Off,
            Some("configure") => Unconfigured::Configure,
            Some("replace") => Unconfigured::Replace,
            Some(other) => {
                f.error(
                    "unconfigured",
                    format!(
                        "{other:?}: expected \"report\", \"configure\", \"replace\" or \"off\""
                    ),
                );
                Unconfigured::Report
            }
        };
        f.finish_section("[reconcile]");
        ReconcileConfig {
            interval,
            grace,
            unconfigured,
        }
    }
}

/// `aws.attempt_timeout`'s default: a 20 s long poll and room above it.
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(40);

impl AwsConfig {
    /// `[aws]`.
    fn from_raw(t: Option<&toml::Table>, errs: &mut Vec<ConfigError>) -> AwsConfig {
        let mut f = Fields::new(t, "aws", errs);
        let max_attempts = f.int("max_attempts", 1..=20, 5) as u32;
        let retry_for = f.duration("retry_for", Duration::from_secs(120));
        let attempt_timeout = f
            .timeout("attempt_timeout", "40s")
            .unwrap_or(DEFAULT_ATTEMPT_TIMEOUT);
        if attempt_timeout > Duration::from_secs(300) {
            f.error("attempt_timeout", "at most 5m");
        }
        f.finish_section("[aws]");
        AwsConfig {
            max_attempts,
            retry_for,
            attempt_timeout,
        }
    }
}

impl SsmConfig {
    /// `[ssm]`.
    fn from_raw(t: Option<&toml::Table>, errs: &mut Vec<ConfigError>) -> SsmConfig {
        let mut f = Fields::new(t, "ssm", errs);
        let batch_window = f.duration("batch_window", Duration::from_secs(2));
        f.finish_section("[ssm]");
        SsmConfig { batch_window }
    }
}

/// `[metrics] listen`: an address, or `"off"` (or empty) for none.
fn metrics_listen(t: Option<&toml::Table>, errs: &mut Vec<ConfigError>) -> Option<SocketAddr> {
    let mut f = Fields::new(t, "metrics", errs);
    let listen = match f.string("listen") {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
        Some("" | "off") => None,
        Some(s) => s
            .parse()
            .map_err(|_| {
                f.error(
                    "listen",
                    format!("{s:?} is not an address:port (or \"off\")"),
                )
            })
            .ok(),
    };
    f.finish_section("[metrics]");
    listen
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
    fn the_attempt_timeout_outlasts_a_long_poll() {
        let c = Config::parse(GOOD, "t").unwrap();
        assert_eq!(c.aws.attempt_timeout, DEFAULT_ATTEMPT_TIMEOUT);
        let with = |aws: &str| GOOD.replace("[notify]", &format!("[aws]\n{aws}\n[notify]"));
        let c = Config::parse(&with("attempt_timeout = \"25s\""), "t").unwrap();
        assert_eq!(c.aws.attempt_timeout, Duration::from_secs(25));
        for bad in ["\"20s\"", "\"0s\"", "\"6m\"", "\"soon\""] {
            let e = Config::parse(&with(&format!("attempt_timeout = {bad}")), "t").unwrap_err();
            let keys: Vec<&str> = e.errors.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(keys, ["aws.attempt_timeout"], "{bad}: {e}");
        }
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
    fn the_state_path_defaults_to_the_state_directory_of_the_snapshot() {
        let text = "[queue]\nurl = \"https://x/123456789012/q\"\n[layers.a]\ngroups = [\"*\"]\n";
        let env = Env {
            state_directory: Some(PathBuf::from("/var/lib/provision-test")),
            ..Env::default()
        };
        let c = Config::parse_with(text, "t", Path::new("."), &env).unwrap();
        assert_eq!(
            c.state.path,
            PathBuf::from("/var/lib/provision-test/state.db")
        );
        let c = Config::parse_with(text, "t", Path::new("."), &Env::default()).unwrap();
        assert_eq!(c.state.path, PathBuf::from(DEFAULT_STATE_PATH));
    }

    #[test]
    fn the_config_path_comes_from_the_flag_then_the_snapshot() {
        let env = Env {
            config_path: Some(PathBuf::from("/srv/p.toml")),
            ..Env::default()
        };
        let flag = Path::new("/etc/other.toml");
        assert_eq!(resolve_path_in(Some(flag), &env), flag);
        assert_eq!(resolve_path_in(None, &env), PathBuf::from("/srv/p.toml"));
        assert_eq!(
            resolve_path_in(None, &Env::default()),
            PathBuf::from(DEFAULT_PATH)
        );
    }

    #[test]
    fn a_wrong_key_in_a_section_is_named_with_its_section_and_the_rest_still_checked() {
        let text = "[queue]\nurl = \"https://x/123456789012/q\"\nnmae = 1\nwait_time = \"1y\"\n[daemon]\nunmatched = \"drop\"\n[layers.a]\ngroups = [\"*\"]\n";
        let e = Config::parse(text, "t").unwrap_err();
        let keys: Vec<&str> = e.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["queue.wait_time", "queue.nmae", "daemon.unmatched"],
            "{e}"
        );
        assert!(
            e.errors[1]
                .message
                .starts_with("unknown key in [queue]; expected one of: url, "),
            "{e}"
        );
    }

    #[test]
    fn sources_name_queues_beside_or_instead_of_the_queue_url() {
        let named = "[queue]\nmax_in_flight = 4\n[sources.eu]\nurl = \"https://sqs.eu-west-1.amazonaws.com/210987654321/q\"\nrole_arn = \"arn:aws:iam::210987654321:role/provision-member\"\n[layers.a]\ngroups = [\"*\"]\n";
        let c = Config::parse(named, "t").unwrap();
        assert_eq!(c.queue.url, "");
        let names: Vec<&str> = c.sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["eu"]);
        assert_eq!(
            c.queue.max_in_flight, 4,
            "[queue]'s settings serve every source"
        );
        let both = named.replace("[queue]\n", "[queue]\nurl = \"https://x/123456789012/q\"\n");
        let c = Config::parse(&both, "t").unwrap();
        let names: Vec<&str> = c.sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["queue", "eu"],
            "[queue] url is the source named queue"
        );
        assert_eq!(c.sources[0].region, None, "the host's region");
        let e = Config::parse("[layers.a]\ngroups = [\"*\"]\n", "t").unwrap_err();
        assert_eq!(e.errors[0].key, "queue.url", "{e}");
        let dup = both.replace(
            "sqs.eu-west-1.amazonaws.com/210987654321/q",
            "x/123456789012/q",
        );
        let e = Config::parse(&dup, "t").unwrap_err();
        assert!(
            e.errors
                .iter()
                .any(|e| e.key == "sources.eu.url"
                    && e.message.contains("the same queue as queue.url")),
            "{e}"
        );
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
