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

/// Where credentials are read from outside systemd (`$CREDENTIALS_DIRECTORY` unset): the
/// directory the unit's `LoadCredential=` lines copy them from, so a manual command run as
/// root (`sudo provision i-…`, `sudo provision worker`) uses the same key and password.
pub const FALLBACK_CREDENTIALS_DIR: &str = "/etc/provision/credentials";

/// The path of a systemd credential.
pub fn credential_path(name: &str) -> PathBuf {
    credential_path_in(Env::from_process().credentials_directory.as_deref(), name)
}

/// The path of credential `name` in `dir` (`$CREDENTIALS_DIRECTORY`), or in
/// [`FALLBACK_CREDENTIALS_DIR`] when it is unset.
pub fn credential_path_in(dir: Option<&Path>, name: &str) -> PathBuf {
    dir.unwrap_or(Path::new(FALLBACK_CREDENTIALS_DIR))
        .join(name)
}

/// What to say when a credential cannot be read: where it was looked for and why there.
pub fn credential_hint(dir: Option<&Path>) -> String {
    match dir {
        Some(_) => "$CREDENTIALS_DIRECTORY (systemd LoadCredential=)".to_string(),
        None => format!(
            "$CREDENTIALS_DIRECTORY is not set, so {FALLBACK_CREDENTIALS_DIR} (root-only: run manual commands as root, or set $CREDENTIALS_DIRECTORY to a directory of yours holding the file)"
        ),
    }
}

/// Reads a systemd credential (trailing newline dropped, as `ansible-vault` does).
pub fn read_credential(name: &str) -> Result<Secret, String> {
    let dir = Env::from_process().credentials_directory;
    let path = credential_path_in(dir.as_deref(), name);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "credential {name:?}: cannot read {}: {e}; read from {}",
            path.display(),
            credential_hint(dir.as_deref())
        )
    })?;
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

/// Creates `dir` and its missing parents 0700 (the state directory and its logs hold
/// instance output and metadata): under systemd `StateDirectory=` made it already; by hand,
/// the process umask would decide. An existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates `path` empty and 0600 unless it exists (an existing file is not touched, so a
/// reader without write access is not refused).
pub fn create_private_file(path: &Path) -> std::io::Result<()> {
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
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
    hide_container_token();
    let _ = ENV_CREDENTIALS.set(found);
}

const CONTAINER_TOKEN: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN";
const CONTAINER_TOKEN_FILE: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE";

/// The container credentials endpoint's token (ECS, EKS Pod Identity) leaves the
/// environment. The SDK reads it again at every refresh, so it moves to a memfd that the SDK
/// reads as `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=/proc/self/fd/N`: the fd is close-on-exec,
/// and the path names the reader's own fd table, so no child can read it through that path.
/// A `..._TOKEN_FILE` set already wins in the SDK: then the token is simply dropped.
fn hide_container_token() {
    let token = std::env::var(CONTAINER_TOKEN)
        .ok()
        .filter(|t| !t.is_empty());
    std::env::remove_var(CONTAINER_TOKEN);
    let Some(token) = token else { return };
    if std::env::var_os(CONTAINER_TOKEN_FILE).is_some() {
        return;
    }
    match token_fd(&token) {
        Ok(path) => std::env::set_var(CONTAINER_TOKEN_FILE, path),
        Err(e) => eprintln!(
            "provision: cannot keep {CONTAINER_TOKEN} out of the environment ({e}); container credentials will not be fetched"
        ),
    }
}

/// A close-on-exec memfd holding `token`, kept open for the life of the process; its
/// `/proc/self/fd/N` path.
fn token_fd(token: &str) -> std::io::Result<String> {
    use std::io::Write as _;
    use std::os::fd::FromRawFd as _;
    // SAFETY: a NUL-terminated name and valid flags; the fd returned is ours alone.
    let fd =
        unsafe { libc::memfd_create(c"provision-container-token".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(token.as_bytes())?;
    // Open for the process's lifetime: the SDK reopens the path at every refresh.
    std::mem::forget(file);
    Ok(format!("/proc/self/fd/{fd}"))
}

/// The credentials [`scrub_environment`] took from the environment, if any.
pub fn env_credentials() -> Option<EnvCredentials> {
    ENV_CREDENTIALS.get().cloned().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_systemd_credentials_come_from_the_units_source_directory() {
        assert_eq!(
            credential_path_in(None, "ssh-key"),
            PathBuf::from("/etc/provision/credentials/ssh-key")
        );
        assert_eq!(
            credential_path_in(
                Some(Path::new("/run/credentials/provision.service")),
                "ssh-key"
            ),
            PathBuf::from("/run/credentials/provision.service/ssh-key")
        );
        assert!(credential_hint(None).contains("$CREDENTIALS_DIRECTORY is not set"));
    }

    #[test]
    fn the_container_token_is_readable_here_and_inherited_by_no_child() {
        let path = token_fd("Bearer sekrit").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "Bearer sekrit");
        let fd: i32 = path.rsplit('/').next().unwrap().parse().unwrap();
        // SAFETY: F_GETFD on an fd this test owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "close-on-exec");
        // A child resolving the same path reads its own fd table: not the token.
        let out = std::process::Command::new("cat")
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(!String::from_utf8_lossy(&out.stdout).contains("sekrit"));
    }

    #[test]
    fn state_directories_and_files_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state/ansible-logs");
        create_private_dir(&dir).unwrap();
        for d in [&dir, &tmp.path().join("state")] {
            let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        let f = dir.join("run.log");
        create_private_file(&f).unwrap();
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

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
