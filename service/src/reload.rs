//! Reloading the config on SIGHUP (`systemctl reload provision`, the unit's `ExecReload=`).
//!
//! Owns what a reload may change and how it is told: the file is read and validated again
//! (every problem listed, as at start); `[layers]` may change (layers added, removed,
//! edited), and runs that start afterwards use the new ones while runs in flight finish
//! under the layers they started with (they hold their config, `pipeline::LayerRef`).
//! Anything else (the queue, the state, `[ssh]`, `[ansible]`, ...) was wired into clients,
//! stores and batchers at start: a change there is refused, naming the keys, and takes a
//! restart. A refused reload keeps the old config serving and counts in
//! `provision_config_reload_failures_total`. systemd hears `RELOADING=1` (with
//! `MONOTONIC_USEC`) before and `READY=1` after, either way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::metrics::Stats;
use crate::pipeline::Pipeline;
use crate::systemd::SystemdNotify;

/// Top-level tables a reload may change.
const RELOADABLE: &[&str] = &["layers"];

/// What became of one reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// Applied: the new layers' names, and what changed.
    Applied {
        layers: usize,
        added: Vec<String>,
        removed: Vec<String>,
        changed: Vec<String>,
    },
    /// Refused, with every reason; the old config keeps serving.
    Refused(Vec<String>),
}

/// Re-reads the config at `path` on every SIGHUP, for as long as the daemon runs.
pub struct Reloader {
    path: PathBuf,
    /// The file as it was at start (or at the last applied reload), to compare with.
    text: String,
    pipeline: Arc<Pipeline>,
    stats: Arc<Stats>,
    systemd: Arc<SystemdNotify>,
}

impl Reloader {
    /// `text` is the file the running config was read from.
    pub fn new(
        path: &Path,
        text: String,
        pipeline: Arc<Pipeline>,
        systemd: Arc<SystemdNotify>,
    ) -> Reloader {
        let stats = pipeline.stats.clone();
        Reloader {
            path: path.to_path_buf(),
            text,
            pipeline,
            stats,
            systemd,
        }
    }

    /// Waits for SIGHUP and reloads, forever (abort the task to stop).
    pub async fn run(mut self, mut hangups: tokio::signal::unix::Signal) {
        while hangups.recv().await.is_some() {
            self.reload();
        }
    }

    /// One reload: validated, compared, applied or refused, and said.
    pub fn reload(&mut self) -> Reload {
        self.systemd.reloading();
        let outcome = match std::fs::read_to_string(&self.path) {
            Err(e) => Reload::Refused(vec![format!("cannot read {}: {e}", self.path.display())]),
            Ok(text) => match self.check(&text) {
                Ok(cfg) => {
                    let outcome = diff(&self.pipeline.live_config(), &cfg);
                    self.pipeline.replace_config(Arc::new(cfg));
                    self.text = text;
                    outcome
                }
                Err(problems) => Reload::Refused(problems),
            },
        };
        match &outcome {
            Reload::Applied {
                layers,
                added,
                removed,
                changed,
            } => {
                Stats::inc(&self.stats.reloads);
                tracing::info!(
                    layers,
                    ?added,
                    ?removed,
                    ?changed,
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
        outcome
    }

    /// The new config when it is valid and changes only what a reload may change.
    fn check(&self, text: &str) -> Result<Config, Vec<String>> {
        let base = self.path.parent().unwrap_or(Path::new("."));
        let name = self.path.display().to_string();
        let cfg = Config::parse_in(text, &name, base)
            .map_err(|e| e.errors.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let mut problems = restart_only_changes(&self.text, text);
        let started = self.pipeline.config();
        if cfg.uses_ssh() && !started.uses_ssh() {
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
                        .map(|i| format!("{k}.{i}")),
                );
            }
            _ => changed.push(format!("[{k}]")),
        }
    }
    changed
        .into_iter()
        .map(|k| format!("{k}: changed, and it takes effect only at a restart (systemctl restart provision); a reload applies [layers] only"))
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
        let moved = "[queue]\nurl = \"q2\"\n[layers.web]\ngroups = [\"w-*\"]\n[metrics]\nlisten = \"off\"\n";
        let got = restart_only_changes(old, moved);
        let keys: Vec<&str> = got.iter().map(|p| p.split(':').next().unwrap()).collect();
        assert_eq!(keys, ["[metrics]", "queue.url", "[ssh]"], "{got:?}");
    }
}
