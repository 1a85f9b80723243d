//! Secrets: the Ansible vault password, and where secrets may never go.
//!
//! A [`Secret`] prints as `[redacted]` in every `Debug`/`Display`, so a stray `?secret` in a
//! log line shows nothing. Secrets come from a systemd credential (`$CREDENTIALS_DIRECTORY`,
//! see `LoadCredential=` in the unit) or an SSM SecureString parameter, and reach a child
//! process only as a 0600 file in a private directory that is removed after the run
//! ([`SecretFile`]); never through argv or the environment.
//!
//! Children get an explicit environment (`ansible-playbook`), and the ssh client started by
//! the `openssh` crate inherits ours: [`scrub_environment`] therefore takes AWS credentials
//! out of this process's environment at start, before any thread or child exists, and keeps
//! them for the SDK only.

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::setting::{ConfigError, Env};

/// A secret value. Never printed, never compared in logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The value itself, for writing it where it is needed. Keep call sites few.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret comes from, as written in the config.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// `{ credential = "vault-password" }`: `$CREDENTIALS_DIRECTORY/vault-password`.
    Credential(String),
    /// `{ ssm_parameter = "/provision/vault" }`: GetParameter WithDecryption.
    SsmParameter(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Credential(n) => write!(f, "systemd credential {n:?}"),
            Source::SsmParameter(n) => write!(f, "SSM parameter {n}"),
        }
    }
}

impl Source {
    /// Parses `{ credential = "NAME" }` or `{ ssm_parameter = "/NAME" }`.
    pub fn parse(value: &toml::Value, key: &str) -> Result<Source, ConfigError> {
        let usage = "must be { credential = \"NAME\" } (a systemd LoadCredential= name) or { ssm_parameter = \"/NAME\" } (a SecureString); a secret is never written in the config itself";
        let t = value
            .as_table()
            .filter(|t| t.len() == 1)
            .ok_or_else(|| ConfigError::new(key, usage))?;
        match (t.get("credential"), t.get("ssm_parameter")) {
            (Some(toml::Value::String(n)), None) => {
                if n.is_empty() || n.contains('/') || n == "." || n == ".." {
                    Err(ConfigError::new(
                        format!("{key}.credential"),
                        "a credential name, without '/'",
                    ))
                } else {
                    Ok(Source::Credential(n.clone()))
                }
            }
            (None, Some(toml::Value::String(n))) if !n.is_empty() => {
                Ok(Source::SsmParameter(n.clone()))
            }
            _ => Err(ConfigError::new(key, usage)),
        }
    }
}

/// The path of a systemd credential, or why it cannot be used.
pub fn credential_path(name: &str) -> Result<PathBuf, String> {
    credential_path_in(Env::from_process().credentials_directory.as_deref(), name)
}

/// The path of a systemd credential in `dir` (`$CREDENTIALS_DIRECTORY`), or why it cannot
/// be used.
pub fn credential_path_in(dir: Option<&Path>, name: &str) -> Result<PathBuf, String> {
    match dir {
        Some(dir) => Ok(dir.join(name)),
        None => Err(format!(
            "credential {name:?}: $CREDENTIALS_DIRECTORY is not set (run under systemd with LoadCredential={name}:PATH, or set it to a directory holding a file {name:?})"
        )),
    }
}

/// Reads a systemd credential (trailing newline dropped, as `ansible-vault` does).
pub fn read_credential(name: &str) -> Result<Secret, String> {
    let path = credential_path(name)?;
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("credential {name:?}: cannot read {}: {e}", path.display()))?;
    let value = text.strip_suffix('\n').unwrap_or(&text);
    if value.is_empty() {
        return Err(format!("credential {name:?} ({}) is empty", path.display()));
    }
    Ok(Secret(value.to_string()))
}

/// A secret written for a child to read: mode 0600 inside a private (0700) directory;
/// removed with the directory when dropped.
pub struct SecretFile {
    path: PathBuf,
}

impl SecretFile {
    pub fn write(dir: &Path, name: &str, secret: &Secret) -> std::io::Result<SecretFile> {
        let path = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(secret.expose().as_bytes())?;
        f.write_all(b"\n")?;
        Ok(SecretFile { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// AWS credentials found in the environment at start, for the SDK only.
#[derive(Clone)]
pub struct EnvCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

static ENV_CREDENTIALS: OnceLock<Option<EnvCredentials>> = OnceLock::new();

/// Environment variables that hold secrets; removed from this process's environment so no
/// child (ssh, ansible-playbook, a playbook's local task) inherits them.
const SECRET_VARS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
];

/// Moves AWS credentials from the environment into memory. Call once, first thing in
/// `main`, while the process has a single thread.
pub fn scrub_environment() {
    let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let found = match (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) {
        (Some(id), Some(secret)) => Some(EnvCredentials {
            access_key_id: id,
            secret_access_key: Secret(secret),
            session_token: get("AWS_SESSION_TOKEN").map(Secret),
        }),
        _ => None,
    };
    for k in SECRET_VARS {
        // Single-threaded here (see above), which is what remove_var requires.
        std::env::remove_var(k);
    }
    let _ = ENV_CREDENTIALS.set(found);
}

/// The credentials [`scrub_environment`] took from the environment, if any.
pub fn env_credentials() -> Option<EnvCredentials> {
    ENV_CREDENTIALS.get().cloned().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn sources_parse_and_refuse_inline_secrets() {
        let v: toml::Value =
            toml::from_str::<toml::Table>("x = { credential = \"vault\" }").unwrap()["x"].clone();
        assert_eq!(
            Source::parse(&v, "k").unwrap(),
            Source::Credential("vault".into())
        );
        let v: toml::Value =
            toml::from_str::<toml::Table>("x = { ssm_parameter = \"/provision/vault\" }").unwrap()
                ["x"]
                .clone();
        assert_eq!(
            Source::parse(&v, "k").unwrap(),
            Source::SsmParameter("/provision/vault".into())
        );
        let v = toml::Value::String("hunter2".into());
        let e = Source::parse(&v, "ansible.vault_password").unwrap_err();
        assert!(e.message.contains("never written in the config"), "{e}");
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn secret_files_are_private_and_removed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let f = SecretFile::write(dir.path(), "vault", &Secret::new("pw".into())).unwrap();
        let meta = std::fs::metadata(f.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(f.path()).unwrap(), "pw\n");
        let p = f.path().to_path_buf();
        drop(f);
        assert!(!p.exists());
    }
}
