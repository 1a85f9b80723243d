//! The `ansible` step: a playbook from `ansible.playbook_dir` run against the instance.
//!
//! ```toml
//! { ansible = "web.yml", vars = { role = "{metadata.role}" }, timeout = "30m" }
//! ```
//!
//! Each instance is first reached over SSH ([`crate::ssh`]: running, address, verified
//! host key, server accepting). Instances that then reach the same playbook with the same
//! rendered `vars` within `ansible.batch_window` share ONE `ansible-playbook` run (up to
//! `ansible.max_batch`) over a generated inventory; each gets its own result from the
//! per-host results of the `provision_json` callback, so one failing host fails only its
//! own instance.
//!
//! What reaches Ansible, and how:
//! - inventory (JSON file): every instance in groups `all` and `<layer>`, with connection
//!   variables that reproduce the verified connection (known_hosts, strict checking);
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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncReadExt as _;
use tracing::{info, warn};

use crate::cache::TtlCache;
use crate::secret::{Secret, SecretFile, Source};
use crate::setting::ConfigError;
use crate::ssh::{Remote, Target};
use crate::template::{Context, Template, Vars};

use super::gather::Gather;
use super::{require_declared, tail, StepContext, StepError, StepOutput};

/// The callback that prints per-host results as one JSON document (ansible-core has none).
pub const CALLBACK_PLUGIN: &str =
    include_str!("../../../playbooks/callback_plugins/provision_json.py");
const EXCERPT: usize = 1500;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// `[ansible]`.
#[derive(Debug, Clone)]
pub struct AnsibleSettings {
    pub playbook_dir: PathBuf,
    pub program: PathBuf,
    pub batch_window: Duration,
    pub max_batch: usize,
    /// Parallel hosts within one run; default: the batch size.
    pub forks: Option<usize>,
    pub vault_password: Option<Source>,
    pub log_max_bytes: u64,
    pub log_keep: usize,
}

impl Default for AnsibleSettings {
    fn default() -> Self {
        AnsibleSettings {
            playbook_dir: PathBuf::from("playbooks"),
            program: PathBuf::from("ansible-playbook"),
            batch_window: Duration::from_secs(2),
            max_batch: 50,
            forks: None,
            vault_password: None,
            log_max_bytes: 1 << 20,
            log_keep: 200,
        }
    }
}

impl AnsibleSettings {
    /// Parses `[ansible]`; relative paths are taken from `base` (the config file's directory).
    pub fn parse(
        t: Option<&toml::Table>,
        base: &Path,
        errs: &mut Vec<ConfigError>,
    ) -> AnsibleSettings {
        let mut s = AnsibleSettings::default();
        if let Some(t) = t {
            for (k, v) in t {
                let key = format!("ansible.{k}");
                let int = |lo: i64, hi: i64, errs: &mut Vec<ConfigError>| match v.as_integer() {
                    Some(n) if (lo..=hi).contains(&n) => Some(n),
                    _ => {
                        errs.push(ConfigError::new(
                            &key,
                            format!("must be a number {lo}..={hi}"),
                        ));
                        None
                    }
                };
                match k.as_str() {
                    "playbook_dir" | "ansible_playbook" => match v.as_str() {
                        Some(p) if !p.is_empty() => {
                            let p = PathBuf::from(p);
                            if k == "playbook_dir" {
                                s.playbook_dir = p;
                            } else {
                                s.program = p;
                            }
                        }
                        _ => errs.push(ConfigError::new(&key, "must be a path")),
                    },
                    "batch_window" => match v.as_str().map(crate::setting::parse_duration) {
                        Some(Ok(d)) => s.batch_window = d,
                        _ => errs.push(ConfigError::new(&key, "must be a duration such as \"2s\"")),
                    },
                    "max_batch" => s.max_batch = int(1, 500, errs).unwrap_or(50) as usize,
                    "forks" => s.forks = int(1, 500, errs).map(|n| n as usize),
                    "log_max_bytes" => {
                        s.log_max_bytes = int(4096, 1 << 30, errs).unwrap_or(1 << 20) as u64
                    }
                    "log_keep" => s.log_keep = int(1, 100_000, errs).unwrap_or(200) as usize,
                    "vault_password" => match Source::parse(v, &key) {
                        Ok(src) => s.vault_password = Some(src),
                        Err(e) => errs.push(e),
                    },
                    _ => errs.push(ConfigError::new(&key, "unknown key in [ansible]")),
                }
            }
        }
        if s.playbook_dir.is_relative() {
            s.playbook_dir = base.join(&s.playbook_dir);
        }
        // A bare program name is looked up in PATH; a relative path is the config's.
        if s.program.is_relative() && s.program.components().count() > 1 {
            s.program = base.join(&s.program);
        }
        s
    }
}

#[derive(Debug, Clone)]
pub struct Ansible {
    /// Relative to `ansible.playbook_dir`.
    pub playbook: String,
    vars: Vec<(String, Template)>,
    pub timeout: Duration,
}

/// Keys of an ansible step table besides `ansible` and `timeout`.
pub const SIBLING_KEYS: &[&str] = &["vars"];

/// Instances share a run when all of this is equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    layer: String,
    transition: &'static str,
    playbook: String,
    vars_json: String,
    timeout: Duration,
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
        if errs.is_empty() {
            Ok(Ansible {
                playbook,
                vars: rendered,
                // The step's `timeout`, when given, is set by `step::parse`.
                timeout: DEFAULT_TIMEOUT,
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
        if vars.is_empty() {
            format!("ansible {}", self.playbook)
        } else {
            format!("ansible {} {}", self.playbook, vars.join(" "))
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

    pub async fn run(&self, ctx: &StepContext<'_>) -> Result<StepOutput, StepError> {
        let vars = self.extra_vars(&ctx.template)?;
        let runner = ctx.shared.ansible.as_ref().ok_or_else(|| {
            StepError::NotReady("Ansible is not available in this mode (no [ssh] setup)".into())
        })?;
        let remote = runner.remote.clone();
        let (target, session) = ctx.reach(&remote).await?;
        // Ansible makes its own connections; this one proved the host and its key.
        if let Err(e) = session.close().await {
            warn!(error = %e, "closing the probe SSH session");
        }
        let key = BatchKey {
            layer: ctx.template.layer.to_string(),
            transition: ctx.template.event.transition.as_str(),
            playbook: self.playbook.clone(),
            vars_json: serde_json::to_string(&vars).unwrap_or_default(),
            timeout: self.timeout,
        };
        ctx.note(format!("joining an ansible-playbook {} run", self.playbook));
        let r = runner.clone();
        let k = key.clone();
        let result = runner
            .batches
            .join(key, target, move |targets| async move {
                r.run_batch(&k, vars, targets).await
            })
            .await
            .unwrap_or_else(|| Err("the ansible-playbook run stopped unexpectedly".into()));
        result
            .map(|detail| StepOutput { detail })
            .map_err(StepError::Remote)
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

/// Runs ansible-playbook for batches of instances; shared by every event in flight.
pub struct Runner {
    pub settings: AnsibleSettings,
    remote: Arc<Remote>,
    batches: Gather<BatchKey, Target, Result<String, String>>,
    secrets: TtlCache<Source, Secret>,
    ssm: Arc<dyn crate::aws::Ssm>,
    retry_for: Duration,
    log_dir: PathBuf,
    callback_dir: PathBuf,
}

impl Runner {
    pub fn new(
        settings: AnsibleSettings,
        remote: Arc<Remote>,
        ssm: Arc<dyn crate::aws::Ssm>,
        retry_for: Duration,
        state_dir: &Path,
    ) -> std::io::Result<Arc<Runner>> {
        let log_dir = state_dir.join("ansible-logs");
        std::fs::create_dir_all(&log_dir)?;
        let callback_dir = remote.runtime_dir().join("callback_plugins");
        std::fs::create_dir_all(&callback_dir)?;
        std::fs::write(callback_dir.join("provision_json.py"), CALLBACK_PLUGIN)?;
        Ok(Arc::new(Runner {
            batches: Gather::new(settings.batch_window, settings.max_batch),
            settings,
            remote,
            // SSM parameters are read at most every 5 minutes; credentials are files anyway.
            secrets: TtlCache::new(Duration::from_secs(300)),
            ssm,
            retry_for,
            log_dir,
            callback_dir,
        }))
    }

    async fn vault_password(&self) -> Result<Option<Secret>, String> {
        let Some(src) = &self.settings.vault_password else {
            return Ok(None);
        };
        let (ssm, retry_for) = (self.ssm.clone(), self.retry_for);
        self.secrets
            .get_or_load(src, || async move {
                match src {
                    Source::Credential(n) => crate::secret::read_credential(n),
                    Source::SsmParameter(n) => {
                        crate::aws::retry::with_backoff(retry_for, || ssm.parameter(n))
                            .await
                            .map_err(|e| format!("vault password from SSM parameter {n}: {e}"))
                    }
                }
            })
            .await
            .map(Some)
    }

    /// `ansible-playbook` with a clean environment and this service's callback.
    pub fn command(&self) -> tokio::process::Command {
        let mut c = command(&self.settings);
        c.env("ANSIBLE_STDOUT_CALLBACK", "provision_json")
            .env("ANSIBLE_CALLBACK_PLUGINS", &self.callback_dir);
        c
    }

    async fn run_batch(
        &self,
        key: &BatchKey,
        vars: BTreeMap<String, String>,
        targets: Vec<Target>,
    ) -> Vec<Result<String, String>> {
        let n = targets.len();
        match self.run_batch_inner(key, vars, &targets).await {
            Ok(results) => results,
            Err(e) => {
                warn!(error = %e, playbook = %key.playbook, "ansible-playbook run failed");
                vec![Err(e); n]
            }
        }
    }

    async fn run_batch_inner(
        &self,
        key: &BatchKey,
        mut vars: BTreeMap<String, String>,
        targets: &[Target],
    ) -> Result<Vec<Result<String, String>>, String> {
        let playbook = self.settings.playbook_dir.join(&key.playbook);
        if !playbook.is_file() {
            return Err(format!(
                "playbook {} does not exist (ansible.playbook_dir)",
                playbook.display()
            ));
        }
        let dir = self
            .remote
            .scratch_dir("ansible-")
            .map_err(|e| format!("cannot create a private run directory: {e}"))?;
        let mut hosts = serde_json::Map::new();
        let mut layer_hosts = serde_json::Map::new();
        for t in targets {
            let mut hv = self.remote.ansible_host_vars(t);
            hv.insert("provision_instance_id".into(), json!(t.id.as_str()));
            hosts.insert(t.id.to_string(), Value::Object(hv));
            layer_hosts.insert(t.id.to_string(), json!({}));
        }
        let inventory = json!({
            "all": {
                "hosts": hosts,
                "children": { group_name(&key.layer): { "hosts": layer_hosts } },
            }
        });
        let inv_path = dir.path().join("inventory.json");
        std::fs::write(&inv_path, inventory.to_string()).map_err(|e| e.to_string())?;
        vars.insert("provision_layer".into(), key.layer.clone());
        vars.insert("provision_transition".into(), key.transition.to_string());
        let vars_path = dir.path().join("extra-vars.json");
        std::fs::write(&vars_path, serde_json::to_string(&vars).unwrap_or_default())
            .map_err(|e| e.to_string())?;
        let vault = match self.vault_password().await? {
            Some(s) => Some(
                SecretFile::write(dir.path(), "vault-password", &s)
                    .map_err(|e| format!("cannot write the vault password file: {e}"))?,
            ),
            None => None,
        };
        let cp = dir.path().join("cp");
        std::fs::create_dir(&cp).map_err(|e| e.to_string())?;
        let forks = self.settings.forks.unwrap_or(targets.len()).clamp(1, 500);
        let mut c = self.command();
        c.env("ANSIBLE_SSH_CONTROL_PATH_DIR", &cp)
            .env("ANSIBLE_FORKS", forks.to_string());
        if std::env::var_os("ANSIBLE_LOCAL_TEMP").is_none() {
            let tmp = dir.path().join("tmp");
            std::fs::create_dir(&tmp).map_err(|e| e.to_string())?;
            c.env("ANSIBLE_LOCAL_TEMP", tmp);
        }
        c.arg("-i")
            .arg(&inv_path)
            .arg("-e")
            .arg(format!("@{}", vars_path.display()));
        if let Some(v) = &vault {
            c.arg("--vault-password-file").arg(v.path());
        }
        c.arg(&playbook);
        c.process_group(0);
        let ids: Vec<&str> = targets.iter().map(|t| t.id.as_str()).collect();
        info!(playbook = %key.playbook, hosts = targets.len(), instances = ?ids, "running ansible-playbook");
        let started = std::time::Instant::now();
        let mut child = c
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.settings.program.display()))?;
        let group = ProcessGroup(child.id());
        let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let io = async {
            let (mut o, mut e) = (Vec::new(), Vec::new());
            let _ = tokio::join!(out.read_to_end(&mut o), err.read_to_end(&mut e));
            let status = child.wait().await;
            (o, e, status)
        };
        let finished = tokio::time::timeout(key.timeout, io).await;
        match finished {
            Ok(_) => group.disarm(),
            // Past the timeout: the whole group goes (ansible-playbook, its forks, their ssh).
            Err(_) => drop(group),
        }
        drop(vault);
        // Ansible's ssh masters (ControlPersist) detach from the run's process group and
        // would outlive it by a minute, holding a session on every instance, with their
        // socket directory about to be removed: closed after every run, timed out or not.
        close_masters(&cp).await;
        let (stdout, stderr, status) = finished.map_err(|_| {
            format!(
                "ansible-playbook {} did not finish within {}; stopped",
                key.playbook,
                humantime::format_duration(key.timeout)
            )
        })?;
        let status = status.map_err(|e| e.to_string())?;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr),
        );
        let log = self.write_log(key, targets, &status, &stdout, &stderr, started.elapsed());
        info!(playbook = %key.playbook, hosts = targets.len(), exit = ?status.code(), elapsed_ms = started.elapsed().as_millis() as u64, log = %log, "ansible-playbook finished");
        let doc = parse_results(&stdout);
        Ok(targets
            .iter()
            .map(|t| host_result(t.id.as_str(), doc.as_ref(), status.code(), &stderr, &log))
            .collect())
    }

    fn write_log(
        &self,
        key: &BatchKey,
        targets: &[Target],
        status: &std::process::ExitStatus,
        stdout: &str,
        stderr: &str,
        elapsed: Duration,
    ) -> String {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let name = format!(
            "{stamp}-{}-{}.log",
            key.layer,
            key.playbook.replace('/', "_")
        );
        let path = self.log_dir.join(&name);
        let ids: Vec<&str> = targets.iter().map(|t| t.id.as_str()).collect();
        let mut text = format!(
            "playbook: {}\nlayer: {}\ntransition: {}\nhosts: {}\nexit: {:?}\nelapsed: {:.1}s\n\n--- stderr ---\n{stderr}\n--- results (provision_json) ---\n{stdout}\n",
            key.playbook,
            key.layer,
            key.transition,
            ids.join(" "),
            status.code(),
            elapsed.as_secs_f64()
        );
        let max = self.settings.log_max_bytes as usize;
        if text.len() > max {
            let mut cut = max.saturating_sub(64);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("\n[log truncated at ansible.log_max_bytes]\n");
        }
        if let Err(e) = std::fs::write(&path, text) {
            warn!(error = %e, path = %path.display(), "cannot write the ansible log");
        }
        self.prune_logs();
        path.display().to_string()
    }

    fn prune_logs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.log_dir) else {
            return;
        };
        let mut names: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        if names.len() <= self.settings.log_keep {
            return;
        }
        // Names start with a millisecond timestamp: sorting them sorts by age.
        names.sort();
        for p in &names[..names.len() - self.settings.log_keep] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `ansible-playbook`, run in the playbook directory, with an environment built from
/// scratch: PATH, HOME, the service's `ANSIBLE_*` settings (minus those this service
/// decides), a UTF-8 locale, host key checking on. Nothing else is inherited.
pub fn command(settings: &AnsibleSettings) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(&settings.program);
    c.env_clear()
        .current_dir(&settings.playbook_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in std::env::vars_os() {
        let name = k.to_string_lossy();
        let keep = matches!(
            name.as_ref(),
            "PATH" | "HOME" | "USER" | "LOGNAME" | "TMPDIR" | "SHELL"
        ) || (name.starts_with("ANSIBLE_")
            && !matches!(
                name.as_ref(),
                "ANSIBLE_STDOUT_CALLBACK"
                    | "ANSIBLE_CALLBACK_PLUGINS"
                    | "ANSIBLE_HOST_KEY_CHECKING"
                    | "ANSIBLE_VAULT_PASSWORD_FILE"
                    | "ANSIBLE_SSH_ARGS"
            ));
        if keep {
            c.env(k, v);
        }
    }
    if std::env::var_os("PATH").is_none() {
        c.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    }
    c.env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8")
        .env("PYTHONUNBUFFERED", "1")
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
        .env("ANSIBLE_NOCOLOR", "1");
    c
}

/// `ansible-playbook --syntax-check` of one playbook (for `provision check`), with the
/// vault password when there is one.
pub async fn syntax_check(
    settings: &AnsibleSettings,
    playbook: &str,
    vault: Option<&Secret>,
) -> Result<(), String> {
    let path = settings.playbook_dir.join(playbook);
    if !path.is_file() {
        return Err(format!("{} does not exist", path.display()));
    }
    let dir = tempfile::Builder::new()
        .prefix("provision-check-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let vault = match vault {
        Some(s) => Some(SecretFile::write(dir.path(), "vault", s).map_err(|e| e.to_string())?),
        None => None,
    };
    let mut c = command(settings);
    c.env("ANSIBLE_LOCAL_TEMP", dir.path())
        .args(["--syntax-check", "-i", "localhost,"]);
    if let Some(v) = &vault {
        c.arg("--vault-password-file").arg(v.path());
    }
    c.arg(&path);
    let out = tokio::time::timeout(Duration::from_secs(120), c.output())
        .await
        .map_err(|_| "ansible-playbook --syntax-check did not finish in 2m".to_string())?
        .map_err(|e| format!("cannot run {}: {e}", settings.program.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
        Err(tail(&text, EXCERPT))
    }
}

/// Asks every ssh ControlMaster with a socket in `dir` to exit (`ssh -O exit`), at once.
async fn close_masters(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut exits = tokio::task::JoinSet::new();
    for e in entries.flatten() {
        let mut c = tokio::process::Command::new("ssh");
        c.arg("-o")
            .arg(format!("ControlPath={}", e.path().display()))
            .args(["-O", "exit", "provision-master"])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        exits.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), c.status()).await;
        });
    }
    while exits.join_next().await.is_some() {}
}

/// The inventory group named after the layer (Ansible group names: letters, digits, '_').
fn group_name(layer: &str) -> String {
    layer.replace('-', "_")
}

/// Kills the whole process group of a run (ansible-playbook, its workers, their ssh)
/// unless disarmed: on timeout, and when the run is dropped at shutdown.
struct ProcessGroup(Option<u32>);

impl ProcessGroup {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) with a negative pid signals the group this run created.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
    }
}

fn parse_results(stdout: &str) -> Option<Value> {
    let start = stdout.find('{')?;
    serde_json::from_str(&stdout[start..]).ok()
}

/// One host's result from the run's JSON document.
fn host_result(
    host: &str,
    doc: Option<&Value>,
    exit: Option<i32>,
    stderr: &str,
    log: &str,
) -> Result<String, String> {
    let Some(doc) = doc else {
        return Err(format!(
            "ansible-playbook exited with {} and printed no results: {} (log: {log})",
            exit.map(|c| c.to_string())
                .unwrap_or_else(|| "a signal".into()),
            tail(stderr, EXCERPT)
        ));
    };
    let Some(stats) = doc.pointer(&format!(
        "/stats/{}",
        host.replace('~', "~0").replace('/', "~1")
    )) else {
        return Err(format!(
            "the playbook did not run on this host: no play's `hosts:` matched it (it is in groups `all` and its layer's); exit {}: {} (log: {log})",
            exit.map(|c| c.to_string()).unwrap_or_default(),
            tail(stderr, EXCERPT)
        ));
    };
    let n = |k: &str| stats.get(k).and_then(Value::as_i64).unwrap_or(0);
    let summary = format!(
        "ok={} changed={} failed={} unreachable={} skipped={}",
        n("ok"),
        n("changed"),
        n("failures"),
        n("unreachable"),
        n("skipped")
    );
    // The tasks of this host, in order, as `status task: message`.
    let mut lines = Vec::new();
    for play in doc["plays"].as_array().into_iter().flatten() {
        for task in play["tasks"].as_array().into_iter().flatten() {
            if let Some(r) = task["hosts"].get(host) {
                let status = r["status"].as_str().unwrap_or("?");
                let name = task["task"]["name"].as_str().unwrap_or("");
                let mut line = format!("{status}: {name}");
                if matches!(status, "failed" | "unreachable") {
                    for k in ["msg", "stderr", "stdout"] {
                        if let Some(s) = r.get(k).and_then(Value::as_str).filter(|s| !s.is_empty())
                        {
                            line.push_str(&format!(" | {k}: {}", s.trim()));
                        }
                    }
                }
                lines.push(line);
            }
        }
    }
    let detail = format!("{summary}\n{}\n(log: {log})", lines.join("\n"));
    if n("failures") > 0 || n("unreachable") > 0 {
        Err(tail(&detail, EXCERPT))
    } else {
        Ok(tail(&detail, EXCERPT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_host_results_come_from_the_callback_document() {
        let doc = json!({
            "plays": [{"play": {"name": "p"}, "tasks": [
                {"task": {"name": "write marker"}, "hosts": {
                    "i-1": {"status": "changed"},
                    "i-2": {"status": "failed", "msg": "disk full"}}}]}],
            "stats": {
                "i-1": {"ok": 1, "changed": 1, "failures": 0, "unreachable": 0},
                "i-2": {"ok": 0, "changed": 0, "failures": 1, "unreachable": 0}}
        });
        let ok = host_result("i-1", Some(&doc), Some(2), "", "L").unwrap();
        assert!(ok.starts_with("ok=1 changed=1 failed=0"), "{ok}");
        let bad = host_result("i-2", Some(&doc), Some(2), "", "L").unwrap_err();
        assert!(
            bad.contains("failed: write marker | msg: disk full"),
            "{bad}"
        );
        let missing = host_result("i-3", Some(&doc), Some(0), "", "L").unwrap_err();
        assert!(missing.contains("did not run on this host"), "{missing}");
        let none = host_result("i-1", None, Some(4), "ERROR! syntax", "L").unwrap_err();
        assert!(none.contains("ERROR! syntax"), "{none}");
    }

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
