//! Reaching an instance over SSH: its address, its verified host keys, and a server that
//! accepts a connection. Used by the `ssh` and `ansible` steps (`step::ssh` is the `ssh`
//! STEP; this module is how every SSH step gets to the instance).
//!
//! ```text
//!  DescribeInstances (batched)   GetConsoleOutput              ssh (openssh crate)
//!  running? address? ──────────▶ first SSH HOST KEY KEYS ────▶ connect, strict host key check
//!         ▲   wait, backoff        block -> known_hosts.d/ID      ▲  refused/timeout: wait
//!         └───────────── until ssh.ready_timeout (the hook is heartbeated meanwhile) ┘
//! ```
//!
//! Host keys (`ssh.host_key_check`):
//! - `console` (default): the instance's console output holds the keys cloud-init printed
//!   at first boot. The FIRST `-----BEGIN SSH HOST KEY KEYS-----` block is taken: anything on
//!   the instance can print a later one. The keys go to a known_hosts file of that instance
//!   only (`<state dir>/known_hosts.d/<instance-id>`), and ssh (and Ansible) connect with
//!   `StrictHostKeyChecking=yes` against it, so a server presenting any other key is refused.
//!   Entries are keyed by instance id (`HostKeyAlias`), not by address: an instance that
//!   comes back from the warm pool with another public IP is still the same host.
//! - `accept-new`: the same per-instance file, filled by ssh on first connection.
//! - `known-hosts`: a file the operator maintains.
//! - `off`: no check (warned about at start).
//!
//! One concept a file: [`settings`] (`[ssh]` and a layer's overrides), [`host_keys`] (the
//! console's key block, refusals in words), [`known_hosts`] (the per-instance files,
//! forgetting and pruning them), [`reach`] (the waits), [`mux`] (the verified login kept
//! open as a control master for the `ansible` step). This file ties them together in
//! [`Remote`]: the generated ssh configuration, the runtime directory, and the options ssh
//! and Ansible connect with. Not here: running commands or playbooks (the steps).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::warn;

use crate::aws::{AwsError, Instances};
use crate::event::InstanceId;
use crate::setting::Env;

pub mod host_keys;
pub mod known_hosts;
pub mod mux;
pub mod reach;
pub mod settings;

pub use known_hosts::KnownHosts;
pub use mux::Mux;
pub use reach::{Reach, ReachError, Target};
pub use settings::{HostKeyCheck, Identity, LayerSsh, SshSettings};

/// Reaches instances; shared by every SSH step in flight.
pub struct Remote {
    settings: SshSettings,
    identity: Option<PathBuf>,
    known_hosts: KnownHosts,
    runtime_dir: PathBuf,
    ssh_config: PathBuf,
    _owned_runtime: Option<tempfile::TempDir>,
    /// Where verified logins stay open for the `ansible` step's clients (see [`mux`]).
    mux: Option<mux::MuxDir>,
    /// The `ssh` steps' output logs.
    logs: crate::output::LogDir,
}

/// `$RUNTIME_DIRECTORY` (systemd) or a fresh private directory under $TMPDIR.
fn private_runtime_dir(env: &Env) -> std::io::Result<(PathBuf, Option<tempfile::TempDir>)> {
    if let Some(d) = &env.runtime_directory {
        return Ok((d.clone(), None));
    }
    let t = tempfile::Builder::new().prefix("provision-").tempdir()?;
    Ok((t.path().to_path_buf(), Some(t)))
}

/// The private key's path: a file, or a systemd credential's file; it must exist.
fn identity_path(settings: &SshSettings, env: &Env) -> std::io::Result<Option<PathBuf>> {
    let identity = match &settings.identity {
        None => return Ok(None),
        Some(Identity::Path(p)) => p.clone(),
        Some(Identity::Credential(n)) => {
            crate::secret::credential_path_in(env.credentials_directory.as_deref(), n)
        }
    };
    let from = match &settings.identity {
        Some(Identity::Credential(_)) => format!(
            "; read from {}",
            crate::secret::credential_hint(env.credentials_directory.as_deref())
        ),
        _ => String::new(),
    };
    std::fs::metadata(&identity).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("ssh.identity_file {}: {e}{from}", identity.display()),
        )
    })?;
    Ok(Some(identity))
}

/// The ssh configuration provision writes at start (`-F`): ~/.ssh/config and
/// /etc/ssh/ssh_config do not apply, so only the keys chosen here are trusted. The jump host
/// (ProxyJump passes -F on) still finds its key in ~/.ssh/known_hosts.
fn ssh_config_text(settings: &SshSettings, identity: Option<&Path>) -> String {
    let mut text = String::from(
        "# Written by provision at start; ssh and ansible-playbook read it with -F.\n\
         GlobalKnownHostsFile /dev/null\n\
         BatchMode yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         ServerAliveInterval 15\n\
         ServerAliveCountMax 4\n\
         LogLevel ERROR\n",
    );
    // ProxyJump runs a second ssh for the bastion with this same -F file but none of the
    // destination's command-line options: its key and identity are set here.
    if let Some(j) = &settings.jump_host {
        text.push_str(&format!(
            "\nHost {}\n  StrictHostKeyChecking yes\n",
            jump_host_name(j)
        ));
        if let Some(k) = &settings.jump_known_hosts {
            text.push_str(&format!("  UserKnownHostsFile \"{}\"\n", k.display()));
        }
        if let Some(k) = identity {
            text.push_str(&format!(
                "  IdentityFile \"{}\"\n  IdentitiesOnly yes\n",
                k.display()
            ));
        }
    }
    if matches!(settings.host_key_check, HostKeyCheck::Off) {
        text.push_str("\nHost *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n");
    }
    text
}

impl Remote {
    /// Prepares the known_hosts directory (under `state_dir`) and a private runtime
    /// directory (control sockets, the generated ssh configuration, vault files).
    pub fn new(settings: SshSettings, state_dir: &Path) -> std::io::Result<Remote> {
        Remote::with_env(settings, state_dir, &Env::from_process())
    }

    /// [`Remote::new`] with the environment's facts (runtime and credentials directories)
    /// handed in.
    pub fn with_env(settings: SshSettings, state_dir: &Path, env: &Env) -> std::io::Result<Remote> {
        let known_hosts = KnownHosts::create(state_dir, settings.host_key_check.clone())?;
        let (runtime_dir, owned) = private_runtime_dir(env)?;
        let ssh_config = runtime_dir.join("ssh_config");
        let identity = identity_path(&settings, env)?;
        std::fs::write(&ssh_config, ssh_config_text(&settings, identity.as_deref()))?;
        if matches!(settings.host_key_check, HostKeyCheck::Off) {
            warn!("ssh.host_key_check = \"off\": instances' host keys are NOT checked; anyone on the path can impersonate them");
        }
        let logs = crate::output::LogDir::create(
            state_dir.join("ssh-logs"),
            settings.log_max_bytes,
            settings.log_keep,
        )?;
        Ok(Remote {
            logs,
            mux: mux::MuxDir::create(&runtime_dir),
            settings,
            identity,
            known_hosts,
            runtime_dir,
            ssh_config,
            _owned_runtime: owned,
        })
    }

    /// Where `ssh` steps log their whole output.
    pub fn logs(&self) -> &crate::output::LogDir {
        &self.logs
    }

    pub fn settings(&self) -> &SshSettings {
        &self.settings
    }

    /// A private directory for one run's files (inventory, vault password); removed on drop.
    pub fn scratch_dir(&self, prefix: &str) -> std::io::Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.runtime_dir)
    }

    pub fn runtime_dir(&self) -> &Path {
        &self.runtime_dir
    }

    /// Forgets an instance's host keys (its terminate run ended, or its launch failed).
    pub fn forget(&self, id: &InstanceId) {
        self.known_hosts.forget(id);
        let _ = std::fs::remove_file(self.runtime_dir.join("hosts.d").join(id.as_str()));
    }

    /// Removes the known_hosts files of instances EC2 no longer lists as alive (see
    /// [`KnownHosts::prune`]). Returns how many files were removed.
    pub async fn prune_known_hosts(&self, instances: &dyn Instances) -> Result<usize, AwsError> {
        self.known_hosts.prune(instances).await
    }

    /// The ssh configuration one instance is reached with: the common one, plus (when
    /// provision keeps the instance's known_hosts file) `HostKeyAlias` = the instance id, so
    /// that its key is known by the instance and not by an address that may change (a new
    /// public IP after a stop and start in the warm pool, an Elastic IP attached at boot).
    fn instance_config(&self, target: &Target) -> std::io::Result<PathBuf> {
        if !self.known_hosts.aliased() {
            return Ok(self.ssh_config.clone());
        }
        let dir = self.runtime_dir.join("hosts.d");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(target.id.as_str());
        // `Host` matches the address as given to ssh, so a jump host (its own ssh, reading
        // this file too) keeps its own name and its own known_hosts entry.
        let text = format!(
            "# Written by provision for {id}: its host key is known by its instance id.\n\
             Host {address}\n  HostKeyAlias {id}\nMatch all\nInclude \"{common}\"\n",
            id = target.id,
            address = target.address,
            common = self.ssh_config.display()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    fn builder(
        &self,
        target: &Target,
        config: &Path,
        timeout: Duration,
    ) -> openssh::SessionBuilder {
        let mut b = openssh::SessionBuilder::default();
        b.user(target.user.clone())
            .port(target.port)
            .config_file(config)
            .control_directory(&self.runtime_dir)
            .connect_timeout(timeout.max(Duration::from_secs(1)))
            .server_alive_interval(Duration::from_secs(15))
            .known_hosts_check(match self.settings.host_key_check {
                HostKeyCheck::AcceptNew => openssh::KnownHosts::Add,
                HostKeyCheck::Off => openssh::KnownHosts::Accept,
                _ => openssh::KnownHosts::Strict,
            })
            .user_known_hosts_file(self.known_hosts.file(&target.id));
        if let Some(k) = &self.identity {
            b.keyfile(k);
        }
        if let Some(j) = &self.settings.jump_host {
            b.jump_hosts([j]);
        }
        b
    }

    /// A plain `ssh` to `target` with the options of [`Remote::builder`] (the same
    /// configuration, key, jump host and host key checking), for one command: add it with
    /// `.arg(..)`. With `master`, the login stays open as that control master once the
    /// command ends; else it is not shared. Killed if dropped (a master already in the
    /// background is not: dropping the [`Mux`] ends it).
    fn ssh_command(
        &self,
        target: &Target,
        config: &Path,
        timeout: Duration,
        master: Option<&Mux>,
    ) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ssh");
        let checking = match self.settings.host_key_check {
            HostKeyCheck::AcceptNew => "accept-new",
            HostKeyCheck::Off => "no",
            _ => "yes",
        };
        c.arg("-F")
            .arg(config)
            .arg("-o")
            .arg(format!("StrictHostKeyChecking={checking}"))
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.known_hosts.file(&target.id).display()
            ))
            .arg("-o")
            .arg(format!("ConnectTimeout={}", timeout.as_secs().max(1)));
        match master {
            Some(m) => c.args(m.master_options()),
            None => c.args(["-o", "ControlMaster=no", "-o", "ControlPath=none"]),
        };
        c.arg("-T")
            .arg("-p")
            .arg(target.port.to_string())
            .arg("-l")
            .arg(&target.user);
        if let Some(k) = &self.identity {
            c.arg("-i").arg(k);
        }
        if let Some(j) = &self.settings.jump_host {
            c.arg("-J").arg(j);
        }
        c.arg("--")
            .arg(&target.address)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// A fresh control socket for a login to `target` that is kept for the step's clients
    /// (none when sockets cannot be kept).
    fn mux_for(&self, target: &Target) -> Option<Mux> {
        self.mux.as_ref()?.socket(target.id.as_str())
    }

    /// Host variables that make Ansible connect exactly as [`Remote::reach`] did: same
    /// user, key, jump host, and the same known_hosts with strict checking; through the
    /// reach's own login when it left one open ([`Target::control_path`]: Ansible's
    /// `ControlMaster=auto` finds that master; were it gone, the client logs in again, as
    /// strictly, and becomes the master of that path, closed with the reach's [`Mux`]).
    pub fn ansible_host_vars(&self, t: &Target) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::Value;
        let mut args = vec![
            "-F".to_string(),
            self.ssh_config.display().to_string(),
            "-o".into(),
            format!(
                "UserKnownHostsFile={}",
                self.known_hosts.file(&t.id).display()
            ),
            "-o".into(),
            match self.settings.host_key_check {
                HostKeyCheck::Off => "StrictHostKeyChecking=no".to_string(),
                _ => "StrictHostKeyChecking=yes".to_string(),
            },
        ];
        if self.known_hosts.aliased() {
            args.push("-o".into());
            args.push(format!("HostKeyAlias={}", t.id));
        }
        if let Some(j) = &self.settings.jump_host {
            args.push("-o".into());
            args.push(format!("ProxyJump={j}"));
        }
        if let Some(p) = &t.control_path {
            args.push("-o".into());
            args.push(format!("ControlPath={}", p.display()));
        }
        let mut m = serde_json::Map::new();
        m.insert("ansible_host".into(), Value::String(t.address.clone()));
        m.insert("ansible_port".into(), Value::from(t.port));
        m.insert("ansible_user".into(), Value::String(t.user.clone()));
        if let Some(k) = &self.identity {
            m.insert(
                "ansible_ssh_private_key_file".into(),
                Value::String(k.display().to_string()),
            );
        }
        m.insert(
            "ansible_ssh_common_args".into(),
            Value::String(
                args.iter()
                    .map(|a| shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        );
        m
    }
}

/// The host part of `[user@]host[:port]` (`[v6]:port` too), as ssh matches `Host` against it.
fn jump_host_name(j: &str) -> &str {
    let host = j.rsplit_once('@').map(|(_, h)| h).unwrap_or(j);
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.split_once(':') {
        Some((h, _)) => h,
        None => host,
    }
}

/// ssh's own words from an openssh error (the crate nests them as the error's source).
pub fn ssh_error_text(e: &openssh::Error) -> String {
    use std::error::Error as _;
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    let text = parts.join(": ");
    text.trim().to_string()
}

/// Quotes one argument for the POSIX shell-like splitting Ansible applies to ssh arguments.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@[]+%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_host_names() {
        assert_eq!(
            jump_host_name("ec2-user@bastion.example.com:2222"),
            "bastion.example.com"
        );
        assert_eq!(jump_host_name("10.0.0.5"), "10.0.0.5");
        assert_eq!(jump_host_name("u@[fd00::5]:22"), "fd00::5");
    }

    #[test]
    fn ansible_arguments_are_quoted() {
        assert_eq!(
            shell_quote("UserKnownHostsFile=/a b"),
            "'UserKnownHostsFile=/a b'"
        );
        assert_eq!(shell_quote("-o"), "-o");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
