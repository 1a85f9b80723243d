//! `[ansible]`: the service-wide Ansible settings and their parsing.
//!
//! Owns the keys of the `[ansible]` table, their defaults and their validation, and the
//! runner choices a step may override (`strategy`, `pipelining`). Not how a run uses them
//! (see `runner`), nor the other per-step keys (`vars`, `timeout`: see the step).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::secret::Source;
use crate::setting::ConfigError;

use super::inventory::KeyedGroup;

/// Parallel hosts within one run unless `ansible.forks` says otherwise (see the README:
/// measured on 2 cores, 20 instances).
pub const DEFAULT_FORKS: usize = 20;

/// How a run executes its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Mitogen for Ansible (`mitogen_linear`): one Python per host for the whole run.
    Mitogen,
    /// Ansible's own `linear`: one SSH round trip (or more) per task and host.
    Linear,
}

impl Strategy {
    pub fn parse(v: &toml::Value, key: &str) -> Result<Strategy, ConfigError> {
        match v.as_str() {
            Some("mitogen") => Ok(Strategy::Mitogen),
            Some("linear") => Ok(Strategy::Linear),
            _ => Err(ConfigError::new(
                key,
                "expected \"mitogen\" (Mitogen for Ansible, the default) or \"linear\" (Ansible's own)",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Mitogen => "mitogen",
            Strategy::Linear => "linear",
        }
    }

    /// The value of `ANSIBLE_STRATEGY`.
    pub fn plugin(self) -> &'static str {
        match self {
            Strategy::Mitogen => "mitogen_linear",
            Strategy::Linear => "linear",
        }
    }
}

/// The runner of one run: `[ansible]`'s, or the step's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunnerChoice {
    pub strategy: Strategy,
    /// Ansible's pipelining (modules through the SSH session's stdin, no upload): used by
    /// `linear`; Mitogen has its own transport.
    pub pipelining: bool,
}

/// `[ansible]`.
#[derive(Debug, Clone)]
pub struct AnsibleSettings {
    pub playbook_dir: PathBuf,
    pub program: PathBuf,
    /// The longest a batch stays open to newcomers (a batch whose members are all reached
    /// closes after `batch_quiet` without one, so this bounds a burst that keeps coming).
    pub batch_window: Duration,
    /// A batch whose members are all reached closes after this long without a newcomer.
    pub batch_quiet: Duration,
    pub max_batch: usize,
    /// Parallel hosts within one run; default: [`DEFAULT_FORKS`], at most the batch size.
    pub forks: Option<usize>,
    pub runner: RunnerChoice,
    pub vault_password: Option<Source>,
    pub log_max_bytes: u64,
    /// How much of a run's stdout (the results document) and of its stderr is held in
    /// memory: head and tail, each within this; everything streams to the log.
    pub output_max_bytes: usize,
    pub log_keep: usize,
    /// The inventory groups each instance joins besides `all` and its layer's (see
    /// `inventory`).
    pub keyed_groups: Vec<KeyedGroup>,
}

impl Default for AnsibleSettings {
    fn default() -> Self {
        AnsibleSettings {
            playbook_dir: PathBuf::from("playbooks"),
            program: PathBuf::from("ansible-playbook"),
            batch_window: Duration::from_secs(5),
            batch_quiet: Duration::from_millis(500),
            max_batch: 50,
            forks: None,
            runner: RunnerChoice {
                strategy: Strategy::Mitogen,
                pipelining: true,
            },
            vault_password: None,
            log_max_bytes: 1 << 20,
            output_max_bytes: 4 << 20,
            log_keep: 200,
            keyed_groups: KeyedGroup::defaults(),
        }
    }
}

/// An integer setting within `lo..=hi`; None (and the error noted) otherwise.
fn int_in(
    v: &toml::Value,
    key: &str,
    lo: i64,
    hi: i64,
    errs: &mut Vec<ConfigError>,
) -> Option<i64> {
    match v.as_integer() {
        Some(n) if (lo..=hi).contains(&n) => Some(n),
        _ => {
            errs.push(ConfigError::new(
                key,
                format!("must be a number {lo}..={hi}"),
            ));
            None
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
                let int = |lo, hi, errs: &mut Vec<ConfigError>| int_in(v, &key, lo, hi, errs);
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
                    "batch_window" | "batch_quiet" => {
                        match v.as_str().map(crate::setting::parse_duration) {
                            Some(Ok(d)) if k == "batch_window" => s.batch_window = d,
                            Some(Ok(d)) => s.batch_quiet = d,
                            _ => errs.push(ConfigError::new(
                                &key,
                                "must be a duration such as \"2s\" or \"500ms\"",
                            )),
                        }
                    }
                    "strategy" => match Strategy::parse(v, &key) {
                        Ok(st) => s.runner.strategy = st,
                        Err(e) => errs.push(e),
                    },
                    "pipelining" => match v.as_bool() {
                        Some(b) => s.runner.pipelining = b,
                        None => errs.push(ConfigError::new(&key, "must be true or false")),
                    },
                    "max_batch" => s.max_batch = int(1, 500, errs).unwrap_or(50) as usize,
                    "forks" => s.forks = int(1, 500, errs).map(|n| n as usize),
                    "log_max_bytes" | "output_max_bytes" => {
                        let n = int(4096, 1 << 30, errs);
                        match k.as_str() {
                            "log_max_bytes" => s.log_max_bytes = n.unwrap_or(1 << 20) as u64,
                            _ => s.output_max_bytes = n.unwrap_or(4 << 20) as usize,
                        }
                    }
                    "log_keep" => s.log_keep = int(1, 100_000, errs).unwrap_or(200) as usize,
                    "keyed_groups" => match KeyedGroup::parse_list(v, &key) {
                        Ok(groups) => s.keyed_groups = groups,
                        Err(e) => errs.extend(e),
                    },
                    "vault_password" => match Source::parse(v, &key) {
                        Ok(src) => s.vault_password = Some(src),
                        Err(e) => errs.push(e),
                    },
                    _ => errs.push(ConfigError::new(&key, "unknown key in [ansible]")),
                }
            }
        }
        if s.batch_quiet > s.batch_window {
            errs.push(ConfigError::new(
                "ansible.batch_quiet",
                "must not exceed ansible.batch_window",
            ));
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

    /// Parallel hosts of a run of `hosts` instances.
    pub fn forks(&self, hosts: usize) -> usize {
        self.forks.unwrap_or(DEFAULT_FORKS).min(hosts).clamp(1, 500)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (AnsibleSettings, Vec<String>) {
        let t: toml::Table = toml::from_str(text).unwrap();
        let mut errs = Vec::new();
        let s = AnsibleSettings::parse(Some(&t), Path::new("/etc/provision"), &mut errs);
        (s, errs.into_iter().map(|e| e.key).collect())
    }

    #[test]
    fn mitogen_with_pipelining_is_the_default_and_linear_can_be_chosen() {
        let (s, errs) = parse("");
        assert!(errs.is_empty());
        assert_eq!(s.runner.strategy, Strategy::Mitogen);
        assert!(s.runner.pipelining);
        assert_eq!(s.forks(3), 3);
        assert_eq!(s.forks(50), DEFAULT_FORKS);
        let (s, errs) = parse("strategy = \"linear\"\npipelining = false\nforks = 40\n");
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            s.runner,
            RunnerChoice {
                strategy: Strategy::Linear,
                pipelining: false
            }
        );
        assert_eq!(s.forks(50), 40);
        assert_eq!(s.forks(5), 5, "never more forks than hosts");
        let (_, mut errs) = parse(
            "strategy = \"free\"\npipelining = \"yes\"\nbatch_window = \"1s\"\nbatch_quiet = \"2s\"\n",
        );
        errs.sort();
        assert_eq!(
            errs,
            [
                "ansible.batch_quiet",
                "ansible.pipelining",
                "ansible.strategy"
            ]
        );
    }
}
