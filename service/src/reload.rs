//! Reloading the config on SIGHUP (`systemctl reload provision`, the unit's `ExecReload=`).
//!
//! Owns what a reload may change and how it is told: the file is read and validated again
//! (every problem listed, as at start); `[layers]` may change (layers added, removed,
//! edited), and runs that start afterwards use the new ones while runs in flight finish
//! under the layers they started with (they hold their config, `pipeline::LayerRef`).
//! `[sources]` and `queue.url` may change too: a source added starts receiving, a source
//! removed stops receiving and its runs in flight finish (`receivers`), a source changed
//! is both. Anything else (the queue, the state, `[ssh]`, `[ansible]`, ...) was wired into clients,
//! stores and batchers at start: a change there is refused, naming the keys, and takes a
//! restart. A refused reload keeps the old config serving and counts in
//! `provision_config_reload_failures_total`. systemd hears `RELOADING=1` (with
//! `MONOTONIC_USEC`) before and `READY=1` after, either way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Stats;
use crate::receivers::Receivers;
use crate::systemd::SystemdNotify;

/// Top-level tables a reload may change.
const RELOADABLE: &[&str] = &["layers", "sources"];
/// Keys of other tables a reload may change: `[queue]`'s source.
const RELOADABLE_KEYS: &[&str] = &["queue.url"];

/// What became of one reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// Applied: the new layers' names, and what changed.
    Applied {
        layers: usize,
        added: Vec<String>,
        removed: Vec<String>,
        changed: Vec<String>,
        /// Sources started and retired (a changed source is both).
        sources_added: Vec<String>,
        sources_removed: Vec<String>,
    },
    /// Refused, with every reason; the old config keeps serving.
    Refused(Vec<String>),
}

/// Re-reads the config at `path` on every SIGHUP, for as long as the daemon runs.
pub struct Reloader {
    path: PathBuf,
    /// The file as it was at start (or at the last applied reload), to compare with.
    text: String,
    receivers: Arc<Receivers>,
    /// Whether SSH was set up at start (some layer had an ssh or ansible step).
    ssh_at_start: bool,
    /// The config runs start under now.
    live: Arc<Config>,
    stats: Arc<Stats>,
    systemd: Arc<SystemdNotify>,
}

impl Reloader {
    /// `text` is the file `cfg`, the running config, was read from; `stats` the process's.
    pub fn new(
        path: &Path,
        (cfg, text): (Arc<Config>, String),
        receivers: Arc<Receivers>,
        stats: Arc<Stats>,
        systemd: Arc<SystemdNotify>,
    ) -> Reloader {
        Reloader {
            path: path.to_path_buf(),
            text,
            receivers,
            ssh_at_start: cfg.uses_ssh(),
            live: cfg,
            stats,
            systemd,
        }
    }

    /// Waits for SIGHUP and reloads, forever (abort the task to stop).
    pub async fn run(mut self, mut hangups: tokio::signal::unix::Signal) {
        while hangups.recv().await.is_some() {
            self.reload().await;
        }
    }

    /// One reload: validated, compared, applied or refused, and said.
    pub async fn reload(&mut self) -> Reload {
        self.systemd.reloading();
        let outcome = match std::fs::read_to_string(&self.path) {
            Err(e) => Reload::Refused(vec![format!("cannot read {}: {e}", self.path.display())]),
            Ok(text) => match self.check(&text) {
                Ok(cfg) => {
                    let cfg = Arc::new(cfg);
                    let mut outcome = diff(&self.live, &cfg);
                    let changes = self.receivers.apply(&cfg).await;
                    if let Reload::Applied {
                        sources_added,
                        sources_removed,
                        ..
                    } = &mut outcome
                    {
                        (*sources_added, *sources_removed) = (changes.added, changes.removed);
                    }
                    self.live = cfg;
                    self.text = text;
                    outcome
                }
                Err(problems) => Reload::Refused(problems),
            },
        };
        self.tell(&outcome);
        outcome
    }

    /// The log line, the metric and systemd's word on one reload.
    fn tell(&self, outcome: &Reload) {
        match outcome {
            Reload::Applied {
                layers,
                added,
                removed,
                changed,
                sources_added,
                sources_removed,
            } => {
                Stats::inc(&self.stats.reloads);
                tracing::info!(
                    layers,
                    ?added,
                    ?removed,
                    ?changed,
                    ?sources_added,
                    ?sources_removed,
                    "config reloaded: runs that start now use it; runs in flight finish under the layers they started with"
                );
                self.systemd.reloaded("polling the queue (config reloaded)");
            }
            Reload::Refused(problems) => {
                Stats::inc(&self.stats.reload_failures);
                tracing::error!(
                    problems = %problems.join("; "),
                    "config reload refused; the previous config keeps serving"
                );
                self.systemd
                    .reloaded("polling the queue (reload refused; previous config serving)");
            }
        }
    }

    /// The new config when it is valid and changes only what a reload may change.
    fn check(&self, text: &str) -> Result<Config, Vec<String>> {
        let base = self.path.parent().unwrap_or(Path::new("."));
        let name = self.path.display().to_string();
        let cfg = Config::parse_in(text, &name, base)
            .map_err(|e| e.errors.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let mut problems = restart_only_changes(&self.text, text);
        if cfg.uses_ssh() && !self.ssh_at_start {
            problems.push(
                "layers: ssh or ansible steps appear, and SSH was not set up at start (no layer had one); restart to apply".into(),
            );
        }
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(problems)
        }
    }
}

/// The keys outside [`RELOADABLE`] tables that differ between two versions of the file.
fn restart_only_changes(old: &str, new: &str) -> Vec<String> {
    let table = |t: &str| -> toml::Table { t.parse().unwrap_or_default() };
    let (old, new) = (table(old), table(new));
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut changed = Vec::new();
    for k in keys {
        if RELOADABLE.contains(&k.as_str()) || old.get(k) == new.get(k) {
            continue;
        }
        let (a, b) = (old.get(k), new.get(k));
        match (
            a.and_then(toml::Value::as_table),
            b.and_then(toml::Value::as_table),
        ) {
            (Some(a), Some(b)) => {
                let mut inner: Vec<&String> = a.keys().chain(b.keys()).collect();
                inner.sort();
                inner.dedup();
                changed.extend(
                    inner
                        .into_iter()
                        .filter(|i| a.get(*i) != b.get(*i))
                        .map(|i| format!("{k}.{i}"))
                        .filter(|key| !RELOADABLE_KEYS.contains(&key.as_str())),
                );
            }
            _ => changed.push(format!("[{k}]")),
        }
    }
    changed
        .into_iter()
        .map(|k| format!("{k}: changed, and it takes effect only at a restart (systemctl restart provision); a reload applies [layers], [sources] and queue.url only"))
        .collect()
}

/// Which layers a reload adds, removes and changes.
fn diff(old: &Config, new: &Config) -> Reload {
    let names = |c: &Config| c.layers.iter().map(|l| l.name.clone()).collect::<Vec<_>>();
    let (before, after) = (names(old), names(new));
    let shown = |l: &crate::layer::Layer| format!("{l:?}");
    Reload::Applied {
        layers: new.layers.len(),
        added: after
            .iter()
            .filter(|n| !before.contains(n))
            .cloned()
            .collect(),
        removed: before
            .iter()
            .filter(|n| !after.contains(n))
            .cloned()
            .collect(),
        changed: new
            .layers
            .iter()
            .filter(|l| {
                old.layers
                    .iter()
                    .find(|o| o.name == l.name)
                    .is_some_and(|o| shown(o) != shown(l))
            })
            .map(|l| l.name.clone())
            .collect(),
        sources_added: Vec::new(),
        sources_removed: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_layers_change_without_a_restart() {
        let old = "[queue]\nurl = \"q1\"\n[ssh]\nuser = \"a\"\n[layers.web]\ngroups = [\"w-*\"]\n";
        let same = "[queue]\nurl = \"q1\"\n[ssh]\nuser = \"a\"\n[layers.app]\ngroups = [\"a-*\"]\n";
        assert!(restart_only_changes(old, same).is_empty());
        let moved = "[queue]\nurl = \"q2\"\nwait_time = \"5s\"\n[layers.web]\ngroups = [\"w-*\"]\n[metrics]\nlisten = \"off\"\n[sources.eu]\nurl = \"q3\"\n";
        let got = restart_only_changes(old, moved);
        let keys: Vec<&str> = got.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(keys, ["[metrics]", "queue.wait_time", "[ssh]"], "{got:?}");
    }
}
