//! `[ssh]` and a layer's `ssh = { user, port }`: how every SSH step reaches instances.
//!
//! Owns the keys, their defaults and their checks. Not here: using them (the generated
//! ssh_config in [`super::Remote`], waiting in [`super::reach`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Source;
use crate::setting::{ConfigError, Fields};

const DEFAULT_USER: &str = "ec2-user";

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
    /// Before an SSH step works, wait for cloud-init to finish on the instance
    /// (`cloud-init status --wait`, within `ready_timeout`; "not installed" is ready).
    pub wait_for_cloud_init: bool,
    /// How much of an `ssh` step's stdout (and as much of its stderr) is kept in memory:
    /// its head and its tail; the rest is counted and left out.
    pub output_max_bytes: usize,
    /// Each `ssh` step's whole output goes to a log in `<state dir>/ssh-logs/`, at most
    /// this long; the newest `log_keep` logs are kept.
    pub log_max_bytes: u64,
    pub log_keep: usize,
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
            wait_for_cloud_init: true,
            output_max_bytes: 4 << 20,
            log_max_bytes: 1 << 20,
            log_keep: 200,
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

fn port(v: &toml::Value) -> Result<u16, String> {
    match v.as_integer() {
        Some(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err("must be a port number 1..=65535".into()),
    }
}

fn user(v: &toml::Value) -> Result<String, String> {
    match v.as_str() {
        Some(u) if valid_user(u) => Ok(u.to_string()),
        _ => Err("must be a user name (letters, digits, '_', '-', '.')".into()),
    }
}

fn jump_host(v: &toml::Value) -> Result<String, String> {
    match v.as_str() {
        Some(j)
            if !j.is_empty()
                && !j.starts_with('-')
                && j.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b'.' | b'-' | b'_' | b'@' | b':' | b'[' | b']')
                }) =>
        {
            Ok(j.to_string())
        }
        _ => Err("must be [user@]host[:port]".into()),
    }
}

fn address(v: &toml::Value) -> Result<AddressMode, String> {
    match v.as_str() {
        Some("private-ip") => Ok(AddressMode::PrivateIp),
        Some("public-ip") => Ok(AddressMode::PublicIp),
        Some("private-dns") => Ok(AddressMode::PrivateDns),
        Some("public-dns") => Ok(AddressMode::PublicDns),
        Some(t) if t.starts_with("tag:") && t.len() > 4 => Ok(AddressMode::Tag(t[4..].to_string())),
        _ => Err("expected \"private-ip\", \"public-ip\", \"private-dns\", \"public-dns\" or \"tag:KEY\"".into()),
    }
}

/// `identity_file`: a path, or a systemd credential (never an SSM parameter: ssh reads a file).
fn identity(f: &mut Fields<'_>) -> Option<Identity> {
    let key = f.key("identity_file");
    let v = f.value("identity_file")?;
    match v {
        toml::Value::String(p) if !p.is_empty() => Some(Identity::Path(PathBuf::from(p))),
        toml::Value::Table(_) => match Source::parse(v, &key) {
            Ok(Source::Credential(n)) => Some(Identity::Credential(n)),
            Ok(_) => {
                f.error(
                    "identity_file",
                    "ssh reads its key from a file: a path or { credential = \"ssh-key\" }",
                );
                None
            }
            Err(e) => {
                f.errors().push(e);
                None
            }
        },
        _ => {
            f.error(
                "identity_file",
                "must be a path or { credential = \"ssh-key\" }",
            );
            None
        }
    }
}

/// `host_key_check`, with `known_hosts` (the file of `"known-hosts"`, and only of it).
fn host_key_check(f: &mut Fields<'_>) -> HostKeyCheck {
    let check = f.string("host_key_check");
    let mut known_hosts = f.path("known_hosts");
    let mode = match check {
        None | Some("console") => HostKeyCheck::Console,
        Some("accept-new") => HostKeyCheck::AcceptNew,
        Some("off") => HostKeyCheck::Off,
        Some("known-hosts") => match known_hosts.take() {
            Some(p) => HostKeyCheck::KnownHosts(p),
            None => {
                f.error(
                    "known_hosts",
                    "missing: host_key_check = \"known-hosts\" needs the file's path",
                );
                HostKeyCheck::Console
            }
        },
        Some(other) => {
            f.error(
                "host_key_check",
                format!(
                    "{other:?}: expected \"console\", \"accept-new\", \"known-hosts\" or \"off\""
                ),
            );
            HostKeyCheck::Console
        }
    };
    if known_hosts.is_some() {
        f.error(
            "known_hosts",
            "only used with host_key_check = \"known-hosts\"",
        );
    }
    mode
}

impl SshSettings {
    /// Parses the `[ssh]` table.
    pub fn parse(t: Option<&toml::Table>, errs: &mut Vec<ConfigError>) -> SshSettings {
        let d = SshSettings::default();
        let mut f = Fields::new(t, "ssh", errs);
        let s = SshSettings {
            user: f.with("user", user).unwrap_or(d.user),
            port: f.with("port", port).unwrap_or(d.port),
            identity: identity(&mut f),
            jump_host: f.with("jump_host", jump_host),
            jump_known_hosts: f.path("jump_known_hosts"),
            connect_timeout: f
                .timeout("connect_timeout", "30s")
                .unwrap_or(d.connect_timeout),
            ready_timeout: f.timeout("ready_timeout", "30s").unwrap_or(d.ready_timeout),
            address: f.with("address", address).unwrap_or(d.address),
            host_key_check: host_key_check(&mut f),
            wait_for_cloud_init: f
                .with("wait_for_cloud_init", |v| {
                    v.as_bool()
                        .ok_or_else(|| "must be true or false".to_string())
                })
                .unwrap_or(d.wait_for_cloud_init),
            output_max_bytes: f.int(
                "output_max_bytes",
                4096..=1 << 30,
                d.output_max_bytes as i64,
            ) as usize,
            log_max_bytes: f.int("log_max_bytes", 0..=1 << 40, d.log_max_bytes as i64) as u64,
            log_keep: f.int("log_keep", 1..=100_000, d.log_keep as i64) as usize,
        };
        if s.jump_known_hosts.is_some() && s.jump_host.is_none() {
            f.error("jump_known_hosts", "only used with ssh.jump_host");
        }
        if s.connect_timeout > s.ready_timeout {
            f.error("connect_timeout", "must not exceed ssh.ready_timeout");
        }
        f.finish("unknown key in [ssh]");
        s
    }
}

impl LayerSsh {
    pub fn parse(v: &toml::Value, key: &str, errs: &mut Vec<ConfigError>) -> LayerSsh {
        let Some(t) = v.as_table() else {
            errs.push(ConfigError::new(
                key,
                "must be a table: { user = \"ubuntu\", port = 22 }",
            ));
            return LayerSsh::default();
        };
        let mut f = Fields::new(Some(t), key, errs);
        let o = LayerSsh {
            user: f.with("user", user),
            port: f.with("port", port),
        };
        f.finish("unknown key; a layer may override ssh user and port");
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(s.wait_for_cloud_init, "on by default");
        let t: toml::Table = toml::from_str("wait_for_cloud_init = false").unwrap();
        assert!(!SshSettings::parse(Some(&t), &mut errs).wait_for_cloud_init);
        let t: toml::Table = toml::from_str("wait_for_cloud_init = \"yes\"").unwrap();
        let mut errs = Vec::new();
        SshSettings::parse(Some(&t), &mut errs);
        assert_eq!(errs[0].key, "ssh.wait_for_cloud_init");
    }
}
