//! The per-instance known_hosts files: `<state dir>/known_hosts.d/<instance-id>`.
//!
//! One file per instance means a reused private IP never meets an old key. A file is
//! written from the console's keys (console mode) or by ssh on first connection
//! (accept-new), removed when the instance's terminate run ends or its launch is abandoned
//! ([`KnownHosts::forget`]), and pruned when EC2 no longer lists the instance as alive
//! ([`KnownHosts::prune`]). Not here: reading the keys from the console
//! ([`super::host_keys`]), ssh's use of the file ([`super::Remote`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{info, warn};

use crate::aws::{AwsError, InstanceState, Instances};
use crate::event::InstanceId;

use super::reach::Target;
use super::settings::HostKeyCheck;

/// A known_hosts file this old whose instance EC2 no longer lists as alive is removed.
pub const PRUNE_MIN_AGE: Duration = Duration::from_secs(3600);

/// The known_hosts directory and the mode that decides which file an instance is checked
/// against.
pub struct KnownHosts {
    dir: PathBuf,
    check: HostKeyCheck,
}

impl KnownHosts {
    /// Creates `<state_dir>/known_hosts.d` (0700) when missing.
    pub fn create(state_dir: &Path, check: HostKeyCheck) -> std::io::Result<KnownHosts> {
        use std::os::unix::fs::DirBuilderExt as _;
        let dir = state_dir.join("known_hosts.d");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        Ok(KnownHosts { dir, check })
    }

    /// The file ssh checks the instance's key against.
    pub fn file(&self, id: &InstanceId) -> PathBuf {
        match &self.check {
            HostKeyCheck::KnownHosts(p) => p.clone(),
            HostKeyCheck::Off => PathBuf::from("/dev/null"),
            _ => self.dir.join(id.as_str()),
        }
    }

    /// Whether provision keeps the files (console and accept-new modes).
    fn kept(&self) -> bool {
        matches!(self.check, HostKeyCheck::Console | HostKeyCheck::AcceptNew)
    }

    /// Whether entries are keyed by instance id (`HostKeyAlias`): in the files provision
    /// keeps. An operator's known_hosts file keeps its own names.
    pub fn aliased(&self) -> bool {
        self.kept()
    }

    /// Whether the instance's file holds keys under its instance id. A file written before
    /// entries were keyed by instance (by address) does not count: it is written again.
    pub fn has_keys(&self, id: &InstanceId) -> bool {
        let prefix = format!("{id} ");
        std::fs::read_to_string(self.file(id))
            .is_ok_and(|text| text.lines().any(|l| l.starts_with(&prefix)))
    }

    /// Writes the target's verified keys (from its console) as its known_hosts file, under
    /// its instance id (ssh looks them up by `HostKeyAlias`, whatever the address and port).
    pub fn write(&self, target: &Target, keys: &[String]) -> std::io::Result<()> {
        let host = target.id.as_str();
        let body: String = keys.iter().map(|k| format!("{host} {k}\n")).collect();
        let path = self.file(&target.id);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, path)
    }

    /// Forgets an instance's host keys (its terminate run ended, or its launch failed).
    pub fn forget(&self, id: &InstanceId) {
        if self.kept() {
            match std::fs::remove_file(self.dir.join(id.as_str())) {
                Ok(()) => info!(instance_id = %id, "removed the instance's known_hosts entry"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(instance_id = %id, error = %e, "cannot remove known_hosts entry"),
            }
        }
    }

    /// Removes the files of instances EC2 no longer lists as alive: terminated without their
    /// terminate hook reaching provision (no terminate hook, or a decommission run by hand).
    /// Files younger than [`PRUNE_MIN_AGE`] stay: a new instance may not be visible to
    /// DescribeInstances yet. One DescribeInstances call per 200 files, none when there is
    /// nothing old. Returns how many files were removed.
    pub async fn prune(&self, instances: &dyn Instances) -> Result<usize, AwsError> {
        if !self.kept() {
            return Ok(0);
        }
        let old = self.older_than(PRUNE_MIN_AGE);
        if old.is_empty() {
            return Ok(0);
        }
        let alive: std::collections::HashSet<String> = instances
            .describe(&old)
            .await?
            .into_iter()
            .filter(|i| i.state != InstanceState::Terminated)
            .map(|i| i.id)
            .collect();
        let mut removed = 0;
        for id in old.iter().filter(|id| !alive.contains(id.as_str())) {
            match std::fs::remove_file(self.dir.join(id.as_str())) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(instance_id = %id, error = %e, "cannot remove known_hosts entry"),
            }
        }
        Ok(removed)
    }

    /// The instances whose files were last written at least `age` ago.
    fn older_than(&self, age: Duration) -> Vec<InstanceId> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        dir.flatten()
            .filter(|e| {
                e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|a| a >= age)
            })
            .filter_map(|e| InstanceId::parse(e.file_name().to_str()?).ok())
            .collect()
    }
}
