//! The `ansible-playbook` child process of one batch: its private run directory (inventory,
//! extra vars, vault password file), its environment built from scratch, its process group
//! (killed past the step's timeout), its ssh control masters (closed after the run) and its
//! bounded log in `<state dir>/ansible-logs/`.
//!
//! A run is started *early*, as its batch opens: Python's start, ansible's imports and its
//! plugins' loading (most of a second on a busy ops host) then overlap the reaching of the
//! batch's instances instead of following it. It waits in the `provision_batch` inventory
//! plugin for the run's `inventory.json`, written once the batch is complete. An early run
//! is fixed to the forks it was started with, so it is used only if that many forks (at most
//! one per host) are free in the shared budget when the batch starts; otherwise, or when the
//! budget had no fork free as the batch opened, the run starts then with the forks that are
//! free, as any run did before early starts. A batch that ends without a run (every member
//! left) stops its early run.
//!
//! Owns how a run is started and cleaned up; not which instances share a run (the step's
//! batching) nor how the callback's document becomes per-host results (see `results`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tracing::{info, warn};

use crate::cache::TtlCache;
use crate::output::{drain, HeadTail, LogDir, LogSink};
use crate::secret::{Secret, SecretFile, Source};
use crate::ssh::{Remote, Target};
use crate::step::child::{Group, GRACE};
use crate::step::tail;

use super::batch::{Batches, Timing};
use super::forks::{ForkBudget, Forks};
use super::inventory;
use super::mitogen::{self, Mitogen};
use super::results::{host_result, parse_results, HostResult};
use super::settings::{AnsibleSettings, Strategy, DEFAULT_FORKS};
use super::BatchKey;

/// The callback that prints per-host results as one JSON document (ansible-core has none).
pub const CALLBACK_PLUGIN: &str =
    include_str!("../../../../playbooks/callback_plugins/provision_json.py");
/// The inventory plugin a run waits in for its inventory (see the module's documentation).
pub const INVENTORY_PLUGIN: &str =
    include_str!("../../../../playbooks/inventory_plugins/provision_batch.py");
const EXCERPT: usize = 1500;
/// An early run is not used when its inventory plugin would give up waiting this soon.
const EARLY_MARGIN: Duration = Duration::from_secs(10);
/// How long the reached members of a batch wait without any other being reached.
const STRAGGLE: Duration = Duration::from_secs(2);

/// Runs ansible-playbook for batches of instances; shared by every event in flight.
pub struct Runner {
    pub settings: AnsibleSettings,
    pub(super) remote: Arc<Remote>,
    pub(super) batches: Batches<BatchKey, Target, HostResult>,
    /// Forks shared by every run in flight (see `forks`).
    forks: ForkBudget,
    /// Mitogen for Ansible, looked for once (at start when it is `[ansible]`'s strategy).
    mitogen: Arc<std::sync::OnceLock<Result<Mitogen, String>>>,
    secrets: TtlCache<Source, Secret>,
    ssm: Arc<dyn crate::aws::Ssm>,
    retry_for: Duration,
    logs: LogDir,
    callback_dir: PathBuf,
    inventory_plugin_dir: PathBuf,
}

/// An `ansible-playbook` started as its batch opened, waiting for the batch's inventory.
/// Dropped unused (the batch ended without a run, or the run started without it), it is
/// stopped and its run directory removed.
pub(super) struct Early(Option<tokio::task::JoinHandle<Result<Started, String>>>);

impl Drop for Early {
    fn drop(&mut self) {
        let Some(task) = self.0.take() else { return };
        // Still starting: stopped there (nothing spawned yet). Started: its process group
        // is stopped and waited for, then its directory removed (removing it under a
        // process still exiting, and cleaning up its own temp files, could leave it).
        task.abort();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Ok(Ok(started)) = task.await {
                    started.stop().await;
                }
            });
        }
    }
}

/// A started `ansible-playbook` and what its run owns; dropped, its process group is
/// stopped (see [`Started::stop`] to wait for it) and its directory removed.
pub(super) struct Started {
    child: tokio::process::Child,
    group: Group,
    dir: tempfile::TempDir,
    vault: Option<SecretFile>,
    /// Its `ANSIBLE_FORKS`; Ansible uses at most one per host.
    forks: usize,
    /// When its inventory plugin gives up waiting.
    gives_up: std::time::Instant,
}

impl Started {
    /// Stops its process group (TERM, a grace, KILL), waits for it, then removes its
    /// directory.
    async fn stop(self) {
        let Started {
            mut child,
            group,
            dir,
            ..
        } = self;
        group.stop(&mut child).await;
        drop(dir);
    }
}

impl Runner {
    pub fn new(
        settings: AnsibleSettings,
        remote: Arc<Remote>,
        ssm: Arc<dyn crate::aws::Ssm>,
        retry_for: Duration,
        state_dir: &Path,
    ) -> std::io::Result<Arc<Runner>> {
        let logs = LogDir::create(
            state_dir.join("ansible-logs"),
            settings.log_max_bytes,
            settings.log_keep,
        )?;
        let callback_dir = remote.runtime_dir().join("callback_plugins");
        std::fs::create_dir_all(&callback_dir)?;
        std::fs::write(callback_dir.join("provision_json.py"), CALLBACK_PLUGIN)?;
        let inventory_plugin_dir = remote.runtime_dir().join("inventory_plugins");
        std::fs::create_dir_all(&inventory_plugin_dir)?;
        std::fs::write(
            inventory_plugin_dir.join("provision_batch.py"),
            INVENTORY_PLUGIN,
        )?;
        let found = Arc::new(std::sync::OnceLock::new());
        if settings.runner.strategy == Strategy::Mitogen {
            // Looked for at start, beside it (a Python start is slow on a busy host and the
            // first receive must not wait for it), so the log says it at once; not fatal:
            // layers may have no ansible step, and runs that need it fail with the same words.
            let (found, program) = (found.clone(), settings.program.clone());
            std::thread::spawn(
                move || match found.get_or_init(|| mitogen::find(&program)) {
                    Ok(m) => {
                        info!(version = %m.version, strategy_plugins = %m.strategy_dir.display(), "Mitogen for Ansible found")
                    }
                    Err(e) => {
                        warn!(error = %e, "Mitogen for Ansible not found; ansible steps will fail")
                    }
                },
            );
        }
        Ok(Arc::new(Runner {
            batches: Batches::new(Timing {
                window: settings.batch_window,
                quiet: settings.batch_quiet,
                // No member reached for this long while some still are being reached: the
                // reached ones run without them (they join a later run once reached).
                straggle: settings.batch_window.min(STRAGGLE),
                max: settings.max_batch,
            }),
            mitogen: found,
            forks: ForkBudget::new(settings.forks.unwrap_or(DEFAULT_FORKS)),
            settings,
            remote,
            // SSM parameters are read at most every 5 minutes; credentials are files anyway.
            secrets: TtlCache::new(Duration::from_secs(300)),
            ssm,
            retry_for,
            logs,
            callback_dir,
            inventory_plugin_dir,
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
                        crate::retry::with_backoff(retry_for, || ssm.parameter(n))
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

    /// Starts the run of a batch that just opened, unless no fork is free (then it starts
    /// once the batch is complete, as a busy budget would make it wait anyway).
    pub(super) fn start_early(
        self: &Arc<Self>,
        key: &BatchKey,
        vars: &BTreeMap<String, String>,
    ) -> Option<Early> {
        if self.forks.free() == 0 {
            return None;
        }
        let forks = self.settings.forks(self.settings.max_batch);
        let (r, key, vars) = (self.clone(), key.clone(), vars.clone());
        Some(Early(Some(tokio::spawn(async move {
            r.start(&key, &vars, forks).await
        }))))
    }

    pub(super) async fn run_batch(
        &self,
        key: &BatchKey,
        vars: BTreeMap<String, String>,
        targets: Vec<Target>,
        early: Option<Early>,
    ) -> Vec<HostResult> {
        let n = targets.len();
        match self.run_batch_inner(key, vars, &targets, early).await {
            Ok(results) => results,
            Err(e) => {
                warn!(error = %e, playbook = %key.playbook, "ansible-playbook run failed");
                vec![HostResult::Failed(e); n]
            }
        }
    }

    /// The early run if it still waits and its forks are free now, with them; None otherwise
    /// (it is then dropped, which stops it).
    async fn take_early(&self, early: Option<Early>, hosts: usize) -> Option<(Started, Forks)> {
        let mut started = early?.0.take()?.await.ok()?.ok()?;
        let waiting = matches!(started.child.try_wait(), Ok(None));
        let fresh = std::time::Instant::now() + EARLY_MARGIN < started.gives_up;
        let forks = if waiting && fresh {
            self.forks.try_take_exactly(started.forks.min(hosts))
        } else {
            None
        };
        match forks {
            Some(forks) => Some((started, forks)),
            None => {
                info!(
                    waiting,
                    fresh,
                    forks = started.forks.min(hosts),
                    free = self.forks.free(),
                    "the early ansible-playbook is not used (ended, about to give up, or its forks are not free); the run starts now"
                );
                // Stopped beside the run that starts instead.
                tokio::spawn(started.stop());
                None
            }
        }
    }

    async fn run_batch_inner(
        &self,
        key: &BatchKey,
        vars: BTreeMap<String, String>,
        targets: &[Target],
        early: Option<Early>,
    ) -> Result<Vec<HostResult>, String> {
        // Held until the run ends (its ssh masters closed): the forks of every run in
        // flight stay within the budget.
        let (started, forks, started_early) = match self.take_early(early, targets.len()).await {
            Some((started, forks)) => (started, forks, true),
            None => {
                let forks = self.forks.take(self.settings.forks(targets.len())).await;
                (self.start(key, &vars, forks.count()).await?, forks, false)
            }
        };
        self.write_inventory(started.dir.path(), key, targets)?;
        let ids: Vec<&str> = targets.iter().map(|t| t.id.as_str()).collect();
        info!(playbook = %key.playbook, hosts = targets.len(), instances = ?ids, strategy = key.runner.strategy.as_str(), pipelining = key.runner.pipelining, forks = forks.count(), started_early, "running ansible-playbook");
        let begun = std::time::Instant::now();
        let (log, sink) = self.open_log(key, targets);
        let Started {
            child,
            group,
            dir,
            vault,
            ..
        } = started;
        let finished = self.run_to_end(child, group, key, dir.path(), &sink).await;
        drop(forks);
        drop(vault);
        let run = finished?;
        let elapsed = begun.elapsed();
        self.finish_log(sink, &run, dir.path(), elapsed);
        info!(playbook = %key.playbook, hosts = targets.len(), instances = ?ids, exit = ?run.status.code(), elapsed_ms = elapsed.as_millis() as u64,
            stdout_bytes = run.stdout.total(), stderr_bytes = run.stderr.total(), log = %log, "ansible-playbook finished");
        let stderr = run.stderr.text();
        if run.stdout.omitted() > 0 {
            let e = format!(
                "ansible-playbook's results ({} bytes) exceed ansible.output_max_bytes: see the log {log}",
                run.stdout.total()
            );
            return Ok(targets
                .iter()
                .map(|_| HostResult::Failed(e.clone()))
                .collect());
        }
        let doc = parse_results(&run.stdout.text());
        Ok(targets
            .iter()
            .map(|t| {
                host_result(
                    t.id.as_str(),
                    doc.as_ref(),
                    run.status.code(),
                    &stderr,
                    &log,
                )
            })
            .collect())
    }

    /// Starts `ansible-playbook` for a run of `key` with `forks`, in a private run
    /// directory; it waits in the `provision_batch` inventory plugin until the run's
    /// inventory is written there (at most the step's timeout plus the batch window and two
    /// minutes, or until this process is gone).
    async fn start(
        &self,
        key: &BatchKey,
        vars: &BTreeMap<String, String>,
        forks: usize,
    ) -> Result<Started, String> {
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
        let vars_path = write_vars(dir.path(), key, vars.clone())?;
        let vault = match self.vault_password().await? {
            Some(s) => Some(
                SecretFile::write(dir.path(), "vault-password", &s)
                    .map_err(|e| format!("cannot write the vault password file: {e}"))?,
            ),
            None => None,
        };
        let cp = control_dir(dir.path());
        std::fs::create_dir(&cp).map_err(|e| e.to_string())?;
        let wait = key.timeout + self.settings.batch_window + Duration::from_secs(120);
        let source = dir.path().join("batch.provision");
        std::fs::write(&source, format!("{}\n", wait.as_secs()))
            .map_err(|e| format!("cannot write the run's inventory source: {e}"))?;
        let mut c = self.command_for(key, forks, &cp, dir.path()).await?;
        c.env("ANSIBLE_INVENTORY_PLUGINS", &self.inventory_plugin_dir)
            .env("ANSIBLE_INVENTORY_ENABLED", "provision_batch")
            .arg("-i")
            .arg(&source)
            .arg("-e")
            .arg(format!("@{}", vars_path.display()));
        if let Some(v) = &vault {
            c.arg("--vault-password-file").arg(v.path());
        }
        c.arg(&playbook);
        let child = c
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.settings.program.display()))?;
        Ok(Started {
            group: Group::of(&child, GRACE),
            child,
            dir,
            vault,
            forks,
            gives_up: std::time::Instant::now() + wait,
        })
    }

    /// The run's inventory: each target with its EC2 host variables and its connection
    /// variables, in `all`, its layer's groups and its keyed groups (see `inventory`).
    fn write_inventory(
        &self,
        dir: &Path,
        key: &BatchKey,
        targets: &[Target],
    ) -> Result<PathBuf, String> {
        let mut hosts = serde_json::Map::new();
        let mut groups: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
        for t in targets {
            let mut hv = inventory::ec2_host_vars(&t.described);
            hv.extend(self.remote.ansible_host_vars(t));
            hv.insert("provision_instance_id".into(), json!(t.id.as_str()));
            // Host key checking on, above the environment and the playbook's group_vars:
            // Mitogen puts `UserKnownHostsFile /dev/null` before the verified file when off.
            hv.insert("ansible_host_key_checking".into(), json!(true));
            hv.insert("ansible_ssh_host_key_checking".into(), json!(true));
            hosts.insert(t.id.to_string(), Value::Object(hv));
            for g in self.host_groups(key, t) {
                groups
                    .entry(g)
                    .or_default()
                    .insert(t.id.to_string(), json!({}));
            }
        }
        let children: serde_json::Map<String, Value> = groups
            .into_iter()
            .map(|(g, members)| (g, json!({ "hosts": members })))
            .collect();
        let inventory = json!({ "all": { "hosts": hosts, "children": children } });
        // Renamed into place: the run waiting for it reads it whole or not at all.
        let part = dir.join("inventory.json.part");
        let inv_path = dir.join("inventory.json");
        std::fs::write(&part, inventory.to_string())
            .and_then(|()| std::fs::rename(&part, &inv_path))
            .map_err(|e| format!("cannot write the run's inventory: {e}"))?;
        Ok(inv_path)
    }

    /// The groups of one host besides `all`: its layer's, then its keyed groups.
    fn host_groups(&self, key: &BatchKey, t: &Target) -> Vec<String> {
        inventory::host_groups(&key.layer, &t.described, &self.settings.keyed_groups)
    }

    /// `ansible-playbook` set up for this batch's runner: forks, pipelining, strategy (with
    /// Mitogen's plugin directory), its own ssh control path and local temp directory.
    async fn command_for(
        &self,
        key: &BatchKey,
        forks: usize,
        cp: &Path,
        dir: &Path,
    ) -> Result<tokio::process::Command, String> {
        let mut c = self.command();
        let pipelining = if key.runner.pipelining {
            "True"
        } else {
            "False"
        };
        c.env("ANSIBLE_SSH_CONTROL_PATH_DIR", cp)
            .env("ANSIBLE_FORKS", forks.to_string())
            .env("ANSIBLE_PIPELINING", pipelining)
            .env("ANSIBLE_STRATEGY", key.runner.strategy.plugin());
        if key.runner.strategy == Strategy::Mitogen {
            let (found, program) = (self.mitogen.clone(), self.settings.program.clone());
            let m = tokio::task::spawn_blocking(move || {
                found.get_or_init(|| mitogen::find(&program)).clone()
            })
            .await
            .map_err(|e| format!("looking for Mitogen for Ansible: {e}"))??;
            // The environment wins over any ansible.cfg: nobody edits one for this.
            c.env("ANSIBLE_STRATEGY_PLUGINS", &m.strategy_dir);
        }
        if std::env::var_os("ANSIBLE_LOCAL_TEMP").is_none() {
            let tmp = dir.join("tmp");
            std::fs::create_dir(&tmp).map_err(|e| e.to_string())?;
            c.env("ANSIBLE_LOCAL_TEMP", tmp);
        }
        Ok(c)
    }

    /// Runs the started child to its end or the step's timeout (then its whole process group is
    /// stopped: SIGTERM, a grace, SIGKILL), and closes the ssh masters it left. Its output
    /// is read as it comes: stderr streamed to the log, stdout to a file in the run's
    /// directory (for the log's results section), each kept in memory as head and tail
    /// within `ansible.output_max_bytes`.
    async fn run_to_end(
        &self,
        mut child: tokio::process::Child,
        group: Group,
        key: &BatchKey,
        dir: &Path,
        log: &Mutex<LogSink>,
    ) -> Result<Finished, String> {
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let budget = self.settings.output_max_bytes;
        let (mut stdout, mut stderr) = (HeadTail::new(budget), HeadTail::new(budget));
        let results = crate::secret::create_private_file(&dir.join("stdout"))
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(dir.join("stdout"))
            })
            .map(|f| Mutex::new(LogSink::new(f, self.settings.log_max_bytes)))
            .ok();
        let io = async {
            let _ = tokio::join!(
                drain(out, &mut stdout, results.as_ref()),
                drain(err, &mut stderr, Some(log))
            );
            child.wait().await
        };
        let finished = tokio::time::timeout(key.timeout, io).await;
        let status = match finished {
            Ok(status) => {
                group.disarm();
                status.map_err(|e| e.to_string())
            }
            Err(_) => {
                group.stop(&mut child).await;
                Err(format!(
                    "ansible-playbook {} did not finish within {}; stopped",
                    key.playbook,
                    humantime::format_duration(key.timeout)
                ))
            }
        };
        // Ansible's ssh masters (ControlPersist) detach from the run's process group and
        // would outlive it by a minute, holding a session on every instance, with their
        // socket directory about to be removed: closed after every run, timed out or not.
        close_masters(&control_dir(dir)).await;
        Ok(Finished {
            status: status?,
            stdout,
            stderr,
        })
    }

    /// The run's log, opened before it starts, with what the run is; stderr is streamed
    /// into it as it comes. Returns its path (for the history) and the sink.
    fn open_log(&self, key: &BatchKey, targets: &[Target]) -> (String, Mutex<LogSink>) {
        let ids: Vec<&str> = targets.iter().map(|t| t.id.as_str()).collect();
        // Each host's groups (sanitised names: word characters only), for a play whose
        // `hosts:` matched none.
        let groups: String = targets
            .iter()
            .map(|t| format!("  {}: all {}\n", t.id, self.host_groups(key, t).join(" ")))
            .collect();
        let header = format!(
            "playbook: {}\nlayer: {}\ntransition: {}\nhosts: {}\ngroups:\n{groups}strategy: {}\npipelining: {}\n\n--- stderr ---\n",
            key.playbook,
            key.layer,
            key.transition,
            ids.join(" "),
            key.runner.strategy.as_str(),
            key.runner.pipelining,
        );
        self.logs
            .open(&format!("{}-{}", key.layer, key.playbook), &header)
    }

    /// The end of the log: the results document (from the run's directory), the exit status
    /// and the time taken.
    fn finish_log(&self, sink: Mutex<LogSink>, run: &Finished, dir: &Path, elapsed: Duration) {
        let mut sink = sink.into_inner().unwrap();
        sink.note("\n--- results (provision_json) ---\n");
        if let Ok(mut f) = std::fs::File::open(dir.join("stdout")) {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = std::io::Read::read(&mut f, &mut buf) {
                if n == 0 {
                    break;
                }
                sink.write(&buf[..n]);
            }
        }
        sink.note(&format!(
            "\n--- end ---\nexit: {:?}\nelapsed: {:.1}s\nstdout: {} bytes\nstderr: {} bytes\n",
            run.status.code(),
            elapsed.as_secs_f64(),
            run.stdout.total(),
            run.stderr.total()
        ));
    }
}

/// `ansible-playbook`, run in the playbook directory, with an environment built from
/// scratch: PATH, HOME, the service's `ANSIBLE_*` settings (minus those this service
/// decides: callback, host key checking, vault, ssh arguments, strategy, pipelining; the
/// environment wins over any ansible.cfg, so those stay decided here), the
/// service's Mitogen tuning (`MITOGEN_POOL_SIZE`, `MITOGEN_CPU_COUNT`), a UTF-8 locale, host
/// key checking on. Nothing else is inherited.
pub fn command(settings: &AnsibleSettings) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(&settings.program);
    c.env_clear()
        .current_dir(&settings.playbook_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Stopped as a group (TERM, a grace, KILL: step::child), never the leader alone.
        .kill_on_drop(false)
        .process_group(0);
    for (k, v) in std::env::vars_os() {
        let name = k.to_string_lossy();
        let keep = matches!(
            name.as_ref(),
            "PATH"
                | "HOME"
                | "USER"
                | "LOGNAME"
                | "TMPDIR"
                | "SHELL"
                | "MITOGEN_POOL_SIZE"
                | "MITOGEN_CPU_COUNT"
        ) || (name.starts_with("ANSIBLE_")
            && !matches!(
                name.as_ref(),
                "ANSIBLE_STDOUT_CALLBACK"
                    | "ANSIBLE_CALLBACK_PLUGINS"
                    | "ANSIBLE_HOST_KEY_CHECKING"
                    | "ANSIBLE_SSH_HOST_KEY_CHECKING"
                    | "ANSIBLE_VAULT_PASSWORD_FILE"
                    | "ANSIBLE_SSH_ARGS"
                    | "ANSIBLE_STRATEGY"
                    | "ANSIBLE_STRATEGY_PLUGINS"
                    | "ANSIBLE_PIPELINING"
                    | "ANSIBLE_SSH_PIPELINING"
            ));
        if keep {
            c.env(k, v);
        }
    }
    if std::env::var_os("PATH").is_none() {
        c.env("PATH", "/usr/local/bin:/usr/bin:/bin");
    }
    // The layer's group is its exact name (`web-prod`), which Ansible takes as it is but
    // warns about on every run unless told to ignore; an operator's own setting wins.
    if std::env::var_os("ANSIBLE_TRANSFORM_INVALID_GROUP_CHARS").is_none() {
        c.env("ANSIBLE_TRANSFORM_INVALID_GROUP_CHARS", "ignore");
    }
    c.env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8")
        .env("PYTHONUNBUFFERED", "1")
        .env("ANSIBLE_HOST_KEY_CHECKING", "True")
        // ansible-core's own default, set so that an ansible.cfg (in the playbook directory
        // or ~) cannot: its `ssh_args` come first on ssh's command line, where the first
        // `-o StrictHostKeyChecking` / `UserKnownHostsFile` wins over the inventory's.
        .env(
            "ANSIBLE_SSH_ARGS",
            "-C -o ControlMaster=auto -o ControlPersist=60s",
        )
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
    if settings.runner.strategy == Strategy::Mitogen {
        mitogen::find(&settings.program)?;
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
    let mut child = c
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", settings.program.display()))?;
    let group = Group::of(&child, GRACE);
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (mut stdout, mut stderr) = (HeadTail::new(EXCERPT * 4), HeadTail::new(EXCERPT * 4));
    let io = async {
        let _ = tokio::join!(drain(out, &mut stdout, None), drain(err, &mut stderr, None));
        child.wait().await
    };
    let status = match tokio::time::timeout(Duration::from_secs(120), io).await {
        Ok(status) => {
            group.disarm();
            status.map_err(|e| format!("waiting for {}: {e}", settings.program.display()))?
        }
        Err(_) => {
            group.stop(&mut child).await;
            return Err("ansible-playbook --syntax-check did not finish in 2m".to_string());
        }
    };
    if status.success() {
        Ok(())
    } else {
        Err(tail(stderr.text().trim(), EXCERPT))
    }
}

/// Where a run's own ssh control masters (Ansible's `ControlPersist`) put their sockets.
fn control_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("cp")
}

/// Asks every ssh ControlMaster with a socket in `dir` to exit, as the verified logins are
/// closed ([`crate::ssh::mux::close_master`]: no `ssh -O exit` process each).
async fn close_masters(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let sockets: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    if sockets.is_empty() {
        return;
    }
    // Each is a few bytes over its socket (bounded at 2 s), as for the verified logins.
    let _ = tokio::task::spawn_blocking(move || {
        for s in &sockets {
            crate::ssh::mux::close_master(s);
        }
    })
    .await;
}

/// What a finished run left: its exit status and its output, bounded.
struct Finished {
    status: std::process::ExitStatus,
    stdout: HeadTail,
    stderr: HeadTail,
}

/// The run's extra vars: the step's rendered vars plus the layer and transition.
fn write_vars(
    dir: &Path,
    key: &BatchKey,
    mut vars: BTreeMap<String, String>,
) -> Result<PathBuf, String> {
    vars.insert("provision_layer".into(), key.layer.clone());
    vars.insert("provision_transition".into(), key.transition.to_string());
    let vars_path = dir.join("extra-vars.json");
    std::fs::write(&vars_path, serde_json::to_string(&vars).unwrap_or_default())
        .map_err(|e| e.to_string())?;
    Ok(vars_path)
}
