//! Reaching an instance over SSH: its address, its verified host keys, and a server that
//! accepts a connection. Used by the `ssh` and `ansible` steps.
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
//! - `accept-new`: the same per-instance file, filled by ssh on first connection.
//! - `known-hosts`: a file the operator maintains.
//! - `off`: no check (warned about at start).
//!
//! One file per instance means a reused private IP never meets an old key; the file is
//! removed when the instance's terminate run ends ([`Remote::forget`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::aws::{AwsError, InstanceInfo, Instances};
use crate::config::ConfigError;
use crate::event::InstanceId;
use crate::step::{StepContext, StepError};

const DEFAULT_USER: &str = "ec2-user";
const WAIT_FIRST: Duration = Duration::from_secs(1);
const WAIT_MAX: Duration = Duration::from_secs(10);
/// A known_hosts file this old whose instance EC2 no longer lists as alive is removed.
pub const PRUNE_MIN_AGE: Duration = Duration::from_secs(3600);

/// `[ssh]`: how every SSH step reaches instances.
#[derive(Debug, Clone)]
pub struct SshSettings {
    pub user: String,
    pub identity: Option<Identity>,
    pub port: u16,
    /// ProxyJump destination (`[user@]host[:port]`).
    pub jump_host: Option<String>,
    /// The bastion's known_hosts file (default: the service user's `~/.ssh/known_hosts`).
    pub jump_known_hosts: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// How long to wait for the instance to be running, have an address, publish its host
    /// keys and accept SSH.
    pub ready_timeout: Duration,
    pub address: AddressMode,
    pub host_key_check: HostKeyCheck,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Path(PathBuf),
    /// A systemd credential (`LoadCredential=ssh-key:...`).
    Credential(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressMode {
    PrivateIp,
    PublicIp,
    PrivateDns,
    PublicDns,
    Tag(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    Console,
    AcceptNew,
    KnownHosts(PathBuf),
    Off,
}

/// Per-layer overrides (`[layers.NAME] ssh = { user = "ubuntu", port = 2222 }`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerSsh {
    pub user: Option<String>,
    pub port: Option<u16>,
}

impl Default for SshSettings {
    fn default() -> Self {
        SshSettings {
            user: DEFAULT_USER.to_string(),
            identity: None,
            port: 22,
            jump_host: None,
            jump_known_hosts: None,
            connect_timeout: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(300),
            address: AddressMode::PrivateIp,
            host_key_check: HostKeyCheck::Console,
        }
    }
}

fn valid_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 32
        && !u.starts_with('-')
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn port(v: &toml::Value, key: &str, errs: &mut Vec<ConfigError>) -> Option<u16> {
    match v.as_integer() {
        Some(p) if (1..=65535).contains(&p) => Some(p as u16),
        _ => {
            errs.push(ConfigError::new(key, "must be a port number 1..=65535"));
            None
        }
    }
}

fn user(v: &toml::Value, key: &str, errs: &mut Vec<ConfigError>) -> Option<String> {
    match v.as_str() {
        Some(u) if valid_user(u) => Some(u.to_string()),
        _ => {
            errs.push(ConfigError::new(
                key,
                "must be a user name (letters, digits, '_', '-', '.')",
            ));
            None
        }
    }
}

fn duration(v: &toml::Value, key: &str, errs: &mut Vec<ConfigError>) -> Option<Duration> {
    match v.as_str().map(humantime::parse_duration) {
        Some(Ok(d)) if !d.is_zero() => Some(d),
        _ => {
            errs.push(ConfigError::new(key, "must be a duration such as \"30s\""));
            None
        }
    }
}

impl SshSettings {
    /// Parses the `[ssh]` table.
    pub fn parse(t: Option<&toml::Table>, errs: &mut Vec<ConfigError>) -> SshSettings {
        let mut s = SshSettings::default();
        let Some(t) = t else { return s };
        let mut known_hosts = None;
        let mut check = None;
        for (k, v) in t {
            let key = format!("ssh.{k}");
            match k.as_str() {
                "user" => s.user = user(v, &key, errs).unwrap_or(s.user),
                "port" => s.port = port(v, &key, errs).unwrap_or(s.port),
                "identity_file" => {
                    s.identity = match v {
                        toml::Value::String(p) if !p.is_empty() => {
                            Some(Identity::Path(PathBuf::from(p)))
                        }
                        toml::Value::Table(_) => match crate::secret::Source::parse(v, &key) {
                            Ok(crate::secret::Source::Credential(n)) => {
                                Some(Identity::Credential(n))
                            }
                            Ok(_) => {
                                errs.push(ConfigError::new(
                                    &key,
                                    "ssh reads its key from a file: a path or { credential = \"ssh-key\" }",
                                ));
                                None
                            }
                            Err(e) => {
                                errs.push(e);
                                None
                            }
                        },
                        _ => {
                            errs.push(ConfigError::new(
                                &key,
                                "must be a path or { credential = \"ssh-key\" }",
                            ));
                            None
                        }
                    }
                }
                "jump_host" => match v.as_str() {
                    Some(j)
                        if !j.is_empty()
                            && !j.starts_with('-')
                            && j.bytes().all(|b| {
                                b.is_ascii_alphanumeric()
                                    || matches!(b, b'.' | b'-' | b'_' | b'@' | b':' | b'[' | b']')
                            }) =>
                    {
                        s.jump_host = Some(j.to_string())
                    }
                    _ => errs.push(ConfigError::new(&key, "must be [user@]host[:port]")),
                },
                "jump_known_hosts" => match v.as_str() {
                    Some(p) if !p.is_empty() => s.jump_known_hosts = Some(PathBuf::from(p)),
                    _ => errs.push(ConfigError::new(&key, "must be a path")),
                },
                "connect_timeout" => {
                    s.connect_timeout = duration(v, &key, errs).unwrap_or(s.connect_timeout)
                }
                "ready_timeout" => {
                    s.ready_timeout = duration(v, &key, errs).unwrap_or(s.ready_timeout)
                }
                "address" => {
                    s.address = match v.as_str() {
                        Some("private-ip") => AddressMode::PrivateIp,
                        Some("public-ip") => AddressMode::PublicIp,
                        Some("private-dns") => AddressMode::PrivateDns,
                        Some("public-dns") => AddressMode::PublicDns,
                        Some(t) if t.starts_with("tag:") && t.len() > 4 => {
                            AddressMode::Tag(t[4..].to_string())
                        }
                        _ => {
                            errs.push(ConfigError::new(
                                &key,
                                "expected \"private-ip\", \"public-ip\", \"private-dns\", \"public-dns\" or \"tag:KEY\"",
                            ));
                            AddressMode::PrivateIp
                        }
                    }
                }
                "host_key_check" => {
                    check = v.as_str().map(str::to_string).or_else(|| {
                        errs.push(ConfigError::new(&key, "must be a string"));
                        None
                    })
                }
                "known_hosts" => match v.as_str() {
                    Some(p) if !p.is_empty() => known_hosts = Some(PathBuf::from(p)),
                    _ => errs.push(ConfigError::new(&key, "must be a path")),
                },
                _ => errs.push(ConfigError::new(&key, "unknown key in [ssh]")),
            }
        }
        s.host_key_check = match check.as_deref() {
            None | Some("console") => HostKeyCheck::Console,
            Some("accept-new") => HostKeyCheck::AcceptNew,
            Some("off") => HostKeyCheck::Off,
            Some("known-hosts") => match known_hosts.take() {
                Some(p) => HostKeyCheck::KnownHosts(p),
                None => {
                    errs.push(ConfigError::new(
                        "ssh.known_hosts",
                        "missing: host_key_check = \"known-hosts\" needs the file's path",
                    ));
                    HostKeyCheck::Console
                }
            },
            Some(other) => {
                errs.push(ConfigError::new(
                    "ssh.host_key_check",
                    format!("{other:?}: expected \"console\", \"accept-new\", \"known-hosts\" or \"off\""),
                ));
                HostKeyCheck::Console
            }
        };
        if known_hosts.is_some() {
            errs.push(ConfigError::new(
                "ssh.known_hosts",
                "only used with host_key_check = \"known-hosts\"",
            ));
        }
        if s.jump_known_hosts.is_some() && s.jump_host.is_none() {
            errs.push(ConfigError::new(
                "ssh.jump_known_hosts",
                "only used with ssh.jump_host",
            ));
        }
        if s.connect_timeout > s.ready_timeout {
            errs.push(ConfigError::new(
                "ssh.connect_timeout",
                "must not exceed ssh.ready_timeout",
            ));
        }
        s
    }
}

impl LayerSsh {
    pub fn parse(v: &toml::Value, key: &str, errs: &mut Vec<ConfigError>) -> LayerSsh {
        let mut o = LayerSsh::default();
        let Some(t) = v.as_table() else {
            errs.push(ConfigError::new(
                key,
                "must be a table: { user = \"ubuntu\", port = 22 }",
            ));
            return o;
        };
        for (k, v) in t {
            let vk = format!("{key}.{k}");
            match k.as_str() {
                "user" => o.user = user(v, &vk, errs),
                "port" => o.port = port(v, &vk, errs),
                _ => errs.push(ConfigError::new(
                    vk,
                    "unknown key; a layer may override ssh user and port",
                )),
            }
        }
        o
    }
}

/// The keys in the first complete `SSH HOST KEY KEYS` block of a console log, as
/// `type base64` (comments dropped). None while no complete block is there yet.
pub fn console_host_keys(console: &str) -> Option<Vec<String>> {
    const BEGIN: &str = "-----BEGIN SSH HOST KEY KEYS-----";
    const END: &str = "-----END SSH HOST KEY KEYS-----";
    let mut lines = console.lines().map(|l| l.trim_end_matches('\r'));
    lines.find(|l| l.trim_end().ends_with(BEGIN))?;
    let mut keys = Vec::new();
    for line in lines {
        if line.trim_end().ends_with(END) {
            return Some(keys);
        }
        let mut parts = line.split_whitespace();
        if let (Some(kind), Some(data)) = (parts.next(), parts.next()) {
            let known = matches!(
                kind,
                "ssh-ed25519"
                    | "ssh-rsa"
                    | "ecdsa-sha2-nistp256"
                    | "ecdsa-sha2-nistp384"
                    | "ecdsa-sha2-nistp521"
            );
            let b64 = data.len() >= 16
                && data
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
            if known && b64 {
                keys.push(format!("{kind} {data}"));
            }
        }
    }
    None
}

/// An instance ready for SSH: where to connect and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub id: InstanceId,
    pub address: String,
    pub port: u16,
    pub user: String,
}

/// Reaches instances; shared by every SSH step in flight.
pub struct Remote {
    settings: SshSettings,
    identity: Option<PathBuf>,
    known_hosts_dir: PathBuf,
    runtime_dir: PathBuf,
    ssh_config: PathBuf,
    _owned_runtime: Option<tempfile::TempDir>,
}

/// `$RUNTIME_DIRECTORY` (systemd) or a fresh private directory under $TMPDIR.
fn private_runtime_dir() -> std::io::Result<(PathBuf, Option<tempfile::TempDir>)> {
    if let Some(d) = crate::config::systemd_directory("RUNTIME_DIRECTORY") {
        return Ok((d, None));
    }
    let t = tempfile::Builder::new().prefix("provision-").tempdir()?;
    Ok((t.path().to_path_buf(), Some(t)))
}

impl Remote {
    /// Prepares the known_hosts directory (under `state_dir`) and a private runtime
    /// directory (control sockets, the generated ssh configuration, vault files).
    pub fn new(settings: SshSettings, state_dir: &Path) -> std::io::Result<Remote> {
        use std::os::unix::fs::DirBuilderExt as _;
        let known_hosts_dir = state_dir.join("known_hosts.d");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&known_hosts_dir)?;
        let (runtime_dir, owned) = private_runtime_dir()?;
        let ssh_config = runtime_dir.join("ssh_config");
        // -F this file: ~/.ssh/config and /etc/ssh/ssh_config do not apply, so only the keys
        // chosen here are trusted. The jump host (ProxyJump passes -F on) still finds its key
        // in ~/.ssh/known_hosts.
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
        let identity = match &settings.identity {
            None => None,
            Some(Identity::Path(p)) => Some(p.clone()),
            Some(Identity::Credential(n)) => Some(
                crate::secret::credential_path(n)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e))?,
            ),
        };
        if let Some(p) = &identity {
            std::fs::metadata(p).map_err(|e| {
                std::io::Error::new(e.kind(), format!("ssh.identity_file {}: {e}", p.display()))
            })?;
        }
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
            if let Some(k) = &identity {
                text.push_str(&format!(
                    "  IdentityFile \"{}\"\n  IdentitiesOnly yes\n",
                    k.display()
                ));
            }
        }
        if matches!(settings.host_key_check, HostKeyCheck::Off) {
            text.push_str("\nHost *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n");
        }
        std::fs::write(&ssh_config, text)?;
        if matches!(settings.host_key_check, HostKeyCheck::Off) {
            warn!("ssh.host_key_check = \"off\": instances' host keys are NOT checked; anyone on the path can impersonate them");
        }
        Ok(Remote {
            settings,
            identity,
            known_hosts_dir,
            runtime_dir,
            ssh_config,
            _owned_runtime: owned,
        })
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

    fn known_hosts_file(&self, id: &InstanceId) -> PathBuf {
        match &self.settings.host_key_check {
            HostKeyCheck::KnownHosts(p) => p.clone(),
            HostKeyCheck::Off => PathBuf::from("/dev/null"),
            _ => self.known_hosts_dir.join(id.as_str()),
        }
    }

    /// Forgets an instance's host keys (its terminate run ended, or its launch failed).
    pub fn forget(&self, id: &InstanceId) {
        if matches!(
            self.settings.host_key_check,
            HostKeyCheck::Console | HostKeyCheck::AcceptNew
        ) {
            match std::fs::remove_file(self.known_hosts_dir.join(id.as_str())) {
                Ok(()) => info!(instance_id = %id, "removed the instance's known_hosts entry"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(instance_id = %id, error = %e, "cannot remove known_hosts entry"),
            }
        }
    }

    /// Removes the known_hosts files of instances EC2 no longer lists as alive: terminated
    /// without their terminate hook reaching provision (no terminate hook, or a decommission
    /// run by hand). Files younger than [`PRUNE_MIN_AGE`] stay: a new instance may not be
    /// visible to DescribeInstances yet. One DescribeInstances call per 200 files, none when
    /// there is nothing old. Returns how many files were removed.
    pub async fn prune_known_hosts(&self, instances: &dyn Instances) -> Result<usize, AwsError> {
        if !matches!(
            self.settings.host_key_check,
            HostKeyCheck::Console | HostKeyCheck::AcceptNew
        ) {
            return Ok(0);
        }
        let Ok(dir) = std::fs::read_dir(&self.known_hosts_dir) else {
            return Ok(0);
        };
        let old: Vec<InstanceId> = dir
            .flatten()
            .filter(|e| {
                e.metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= PRUNE_MIN_AGE)
            })
            .filter_map(|e| InstanceId::parse(e.file_name().to_str()?).ok())
            .collect();
        if old.is_empty() {
            return Ok(0);
        }
        let alive: std::collections::HashSet<String> = instances
            .describe(&old)
            .await?
            .into_iter()
            .filter(|i| i.state != "terminated")
            .map(|i| i.id)
            .collect();
        let mut removed = 0;
        for id in old.iter().filter(|id| !alive.contains(id.as_str())) {
            match std::fs::remove_file(self.known_hosts_dir.join(id.as_str())) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => warn!(instance_id = %id, error = %e, "cannot remove known_hosts entry"),
            }
        }
        Ok(removed)
    }

    fn address_of(&self, info: &InstanceInfo) -> Option<String> {
        match &self.settings.address {
            AddressMode::PrivateIp => info.private_ip.clone(),
            AddressMode::PublicIp => info.public_ip.clone(),
            AddressMode::PrivateDns => info.private_dns.clone(),
            AddressMode::PublicDns => info.public_dns.clone(),
            AddressMode::Tag(k) => info.tags.get(k).cloned(),
        }
        .filter(|a| {
            // Tags are instance-writable data: only a plain host name or address passes.
            !a.is_empty()
                && !a.starts_with('-')
                && a.len() <= 253
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        })
    }

    fn address_name(&self) -> String {
        match &self.settings.address {
            AddressMode::PrivateIp => "private IP".into(),
            AddressMode::PublicIp => "public IP".into(),
            AddressMode::PrivateDns => "private DNS name".into(),
            AddressMode::PublicDns => "public DNS name".into(),
            AddressMode::Tag(k) => format!("address in tag {k:?}"),
        }
    }

    fn builder(&self, target: &Target, timeout: Duration) -> openssh::SessionBuilder {
        let mut b = openssh::SessionBuilder::default();
        b.user(target.user.clone())
            .port(target.port)
            .config_file(&self.ssh_config)
            .control_directory(&self.runtime_dir)
            .connect_timeout(timeout.max(Duration::from_secs(1)))
            .server_alive_interval(Duration::from_secs(15))
            .known_hosts_check(match self.settings.host_key_check {
                HostKeyCheck::AcceptNew => openssh::KnownHosts::Add,
                HostKeyCheck::Off => openssh::KnownHosts::Accept,
                _ => openssh::KnownHosts::Strict,
            })
            .user_known_hosts_file(self.known_hosts_file(&target.id));
        if let Some(k) = &self.identity {
            b.keyfile(k);
        }
        if let Some(j) = &self.settings.jump_host {
            b.jump_hosts([j]);
        }
        b
    }

    /// Host variables that make Ansible connect exactly as [`Remote::reach`] did: same
    /// user, key, jump host, and the same known_hosts with strict checking.
    pub fn ansible_host_vars(&self, t: &Target) -> serde_json::Map<String, serde_json::Value> {
        use serde_json::Value;
        let mut args = vec![
            "-F".to_string(),
            self.ssh_config.display().to_string(),
            "-o".into(),
            format!(
                "UserKnownHostsFile={}",
                self.known_hosts_file(&t.id).display()
            ),
            "-o".into(),
            match self.settings.host_key_check {
                HostKeyCheck::Off => "StrictHostKeyChecking=no".to_string(),
                _ => "StrictHostKeyChecking=yes".to_string(),
            },
        ];
        if let Some(j) = &self.settings.jump_host {
            args.push("-o".into());
            args.push(format!("ProxyJump={j}"));
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

    /// Waits until the instance is running, has an address, its host keys are known (console
    /// mode) and SSH accepts a connection; returns the open session. Fails at once when the
    /// server presents a key other than the verified ones.
    pub async fn reach(
        &self,
        ctx: &StepContext<'_>,
    ) -> Result<(Target, openssh::Session), StepError> {
        let id = ctx.template.event.instance_id.clone();
        let ready = self.settings.ready_timeout;
        let deadline = Instant::now() + ready;
        let late = |last: &str| {
            StepError::NotReady(format!(
                "{id} was not reachable over SSH within {} (ssh.ready_timeout): {last}",
                humantime::format_duration(ready)
            ))
        };
        let mut delay = WAIT_FIRST;
        let mut last;
        // Running, with an address.
        let address = loop {
            match ctx.shared.lookup.submit(id.clone()).await {
                Ok(info) => match info.state.as_str() {
                    "running" => match self.address_of(&info) {
                        Some(a) => break a,
                        None => last = format!("running, but it has no {}", self.address_name()),
                    },
                    s @ ("shutting-down" | "terminated" | "stopping" | "stopped") => {
                        return Err(StepError::NotReady(format!(
                            "{id} is {s}; nothing to connect to"
                        )))
                    }
                    s => last = format!("instance state is {s}"),
                },
                Err(e) => last = e,
            }
            ctx.note(format!("waiting for the instance: {last}"));
            if Instant::now() >= deadline {
                return Err(late(&last));
            }
            tokio::time::sleep(delay.min(deadline - Instant::now())).await;
            delay = (delay * 2).min(WAIT_MAX);
        };
        let target = Target {
            id: id.clone(),
            address,
            port: ctx.ssh.port.unwrap_or(self.settings.port),
            user: ctx
                .ssh
                .user
                .clone()
                .unwrap_or_else(|| self.settings.user.clone()),
        };
        if self.settings.host_key_check == HostKeyCheck::Console {
            self.console_keys(ctx, &target, deadline, &late).await?;
        }
        // SSH accepts a connection with a verified key.
        delay = WAIT_FIRST;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = self.settings.connect_timeout.min(left);
            ctx.note(format!(
                "waiting for SSH on {}:{}",
                target.address, target.port
            ));
            let attempt = tokio::time::timeout(
                timeout + Duration::from_secs(5),
                self.builder(&target, timeout).connect(&target.address),
            )
            .await;
            match attempt {
                Ok(Ok(session)) => {
                    info!(address = %target.address, port = target.port, user = %target.user, "SSH is up");
                    return Ok((target, session));
                }
                Ok(Err(e)) => {
                    let text = ssh_error_text(&e);
                    if let Some(why) = self.key_refused(&text, &target) {
                        return Err(StepError::Remote(why));
                    }
                    last = format!("{}:{}: {text}", target.address, target.port);
                }
                Err(_) => {
                    last = format!(
                        "{}:{}: connection attempt timed out",
                        target.address, target.port
                    )
                }
            }
            if Instant::now() >= deadline {
                return Err(late(&last));
            }
            tokio::time::sleep(delay.min(deadline - Instant::now())).await;
            delay = (delay * 2).min(WAIT_MAX);
        }
    }

    /// Reads the console until its first host key block appears, then writes the instance's
    /// known_hosts file. Already written (an earlier step or run): nothing to do.
    async fn console_keys(
        &self,
        ctx: &StepContext<'_>,
        target: &Target,
        deadline: Instant,
        late: &(dyn Fn(&str) -> StepError + Sync),
    ) -> Result<(), StepError> {
        let file = self.known_hosts_file(&target.id);
        if file.exists() {
            return Ok(());
        }
        let mut delay = Duration::from_secs(2);
        let last;
        loop {
            ctx.note("waiting for the host keys in the console output".to_string());
            let why = match ctx.services.instances.console_output(&target.id).await {
                Ok(Some(text)) => match console_host_keys(&text) {
                    Some(keys) if !keys.is_empty() => {
                        let host = if target.port == 22 {
                            target.address.clone()
                        } else {
                            format!("[{}]:{}", target.address, target.port)
                        };
                        let body: String = keys.iter().map(|k| format!("{host} {k}\n")).collect();
                        write_atomically(&file, &body).map_err(|e| {
                            StepError::NotReady(format!("cannot write {}: {e}", file.display()))
                        })?;
                        info!(keys = keys.len(), "host keys taken from the console output");
                        return Ok(());
                    }
                    Some(_) => "the console's host key block lists no usable key".to_string(),
                    None => "no SSH HOST KEY KEYS block in the console output yet".to_string(),
                },
                Ok(None) => "the console output is empty so far".to_string(),
                Err(e) if e.retryable => e.to_string(),
                Err(e) => {
                    return Err(StepError::Aws(e));
                }
            };
            if Instant::now() >= deadline {
                last = why;
                break;
            }
            tokio::time::sleep(delay.min(deadline - Instant::now())).await;
            delay = (delay * 2).min(Duration::from_secs(15));
        }
        Err(late(&format!(
            "{last} (cloud-init prints the keys at first boot; without them the host cannot be verified)"
        )))
    }

    /// When ssh refused the server's key: why, in words for the history.
    fn key_refused(&self, ssh_error: &str, t: &Target) -> Option<String> {
        let refused = ssh_error.contains("Host key verification failed")
            || ssh_error.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || ssh_error.contains("host key for")
            || ssh_error.contains("No matching host key");
        if !refused {
            return None;
        }
        let against = match &self.settings.host_key_check {
            HostKeyCheck::Console => format!("is not one of the keys in {}'s console output", t.id),
            HostKeyCheck::AcceptNew => "differs from the one it presented first".to_string(),
            HostKeyCheck::KnownHosts(p) => format!("is not in {}", p.display()),
            HostKeyCheck::Off => "was refused".to_string(),
        };
        Some(format!(
            "host key refused: the SSH server at {}:{} presented a key that {against}; not connecting (possible man-in-the-middle). ssh said: {}",
            t.address,
            t.port,
            ssh_error.lines().last().unwrap_or_default().trim()
        ))
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

fn write_atomically(path: &Path, body: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
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

    const KEY: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIGj0vNj1c0yJb2m4Ee0hOPHVdqvRyYR3Y0nCk0QpX9aM";

    #[test]
    fn takes_the_first_complete_block_only() {
        let console = format!(
            "[    1.0] boot\r\n<14>Nov 22 cloud-init: -----BEGIN SSH HOST KEY FINGERPRINTS-----\r\n\
             <14>Nov 22 cloud-init: 256 SHA256:abc root@h (ED25519)\r\n\
             -----BEGIN SSH HOST KEY KEYS-----\r\nssh-ed25519 {KEY} root@h\r\n\
             [   12.5] random: crng init done\r\n-----END SSH HOST KEY KEYS-----\r\n\
             -----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 AAAAforgedforgedforgedforged x\n-----END SSH HOST KEY KEYS-----\n"
        );
        assert_eq!(
            console_host_keys(&console),
            Some(vec![format!("ssh-ed25519 {KEY}")])
        );
    }

    #[test]
    fn an_unfinished_block_is_not_yet_an_answer() {
        assert_eq!(console_host_keys("boot\n"), None);
        let partial = format!("-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 {KEY}\n");
        assert_eq!(console_host_keys(&partial), None);
        let junk =
            "-----BEGIN SSH HOST KEY KEYS-----\n$(reboot) now\n-----END SSH HOST KEY KEYS-----\n";
        assert_eq!(console_host_keys(junk), Some(vec![]));
    }

    #[test]
    fn ssh_settings_parse_with_every_problem_named() {
        let t: toml::Table = toml::from_str(
            "user = \"root\"\nport = 70000\naddress = \"tag:SshAddress\"\nhost_key_check = \"known-hosts\"\nidentity_file = { credential = \"ssh-key\" }\n",
        )
        .unwrap();
        let mut errs = Vec::new();
        let s = SshSettings::parse(Some(&t), &mut errs);
        assert_eq!(s.user, "root");
        assert_eq!(s.address, AddressMode::Tag("SshAddress".into()));
        assert_eq!(s.identity, Some(Identity::Credential("ssh-key".into())));
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["ssh.port", "ssh.known_hosts"], "{errs:?}");
    }

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
