//! `[ansible]`: the service-wide Ansible settings and their parsing.
//!
//! Owns the keys of the `[ansible]` table, their defaults and their validation. Not how a
//! run uses them (see `runner`), nor the per-step keys (`vars`, `timeout`: see the step).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::ConfigError;
use crate::secret::Source;

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
                    "batch_window" => match v.as_str().map(humantime::parse_duration) {
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
