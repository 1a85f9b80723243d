//! The verified connection, kept for the step that reached the instance: the login that
//! proved the host (its key strictly checked) and waited for cloud-init stays open as an
//! OpenSSH control master, and the step's own ssh clients (Ansible's, Mitogen's) become
//! its multiplexing clients (`-o ControlPath=<socket>`): no second key exchange or
//! authentication, and nothing new for a man in the middle to answer.
//!
//! ```text
//!  probe: ssh -o ControlMaster=yes -o ControlPath=mux/i-0…-7 -o ControlPersist=10m host 'cloud-init status --wait'
//!           └─ login (StrictHostKeyChecking=yes, the instance's known_hosts) ─▶ master (background)
//!  run:   ssh … -o ControlPath=mux/i-0…-7 host python…   (a channel of the master: no login)
//!  end:   ssh -o ControlPath=mux/i-0…-7 -O exit          (on drop of the Mux)
//! ```
//!
//! The sockets live in `<runtime dir>/mux`, a directory of this user's only (0700, checked
//! at start): whoever can open a socket can run commands on the instance. A master that is
//! gone when its client starts (idle past [`IDLE`], the connection lost) is not an error:
//! the client logs in again itself, with the same strict host key checking.
//!
//! Owns the directory, the names and closing the masters; not the login (see `reach`) nor
//! the clients' options (`Remote::ansible_host_vars`).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, warn};

/// How long a master waits without a client before it exits by itself: it must outlast the
/// wait between the reach and the run (the batch gathering, forks being busy); past it the
/// run's clients log in again. Also bounds what a crashed service leaves behind.
pub const IDLE: &str = "10m";

/// `sun_path` holds 108 bytes; ssh binds `<path>.<16 random characters>` first, then renames.
const MAX_PATH: usize = 90;

/// `<runtime dir>/mux`: where the masters' sockets are.
pub struct MuxDir {
    dir: PathBuf,
    next: AtomicU64,
}

impl MuxDir {
    /// Creates (or takes over) `parent/mux`, 0700 and owned by this user. None, with a
    /// warning, when it is someone else's: logins are then not shared.
    pub fn create(parent: &Path) -> Option<MuxDir> {
        let dir = parent.join("mux");
        let made = std::fs::DirBuilder::new().mode(0o700).create(&dir);
        let checked = made
            .or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .and_then(|()| std::fs::symlink_metadata(&dir))
            .and_then(|m| {
                // SAFETY: geteuid(2) cannot fail and touches no memory.
                let me = unsafe { libc::geteuid() };
                if !m.is_dir() || m.uid() != me {
                    return Err(std::io::Error::other(format!(
                        "not a directory owned by uid {me}"
                    )));
                }
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            });
        match checked {
            Ok(()) => Some(MuxDir {
                dir,
                next: AtomicU64::new(1),
            }),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot keep SSH control sockets there; every ansible run logs in to its hosts again");
                None
            }
        }
    }

    /// A fresh socket name for one login to `id` (never reused: a master refuses an
    /// existing path). None when the path would be too long for a socket.
    pub fn socket(&self, id: &str) -> Option<Mux> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{id}-{n}"));
        if path.as_os_str().len() > MAX_PATH {
            debug!(path = %path.display(), "control socket path too long; no shared login");
            return None;
        }
        Some(Mux { path })
    }
}

/// One master's socket. Dropped, it asks the master to exit (in the background) and
/// removes a socket left behind.
#[derive(Debug)]
pub struct Mux {
    path: PathBuf,
}

impl Mux {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// ssh options that make this login the master of [`Mux::path`].
    pub fn master_options(&self) -> [String; 6] {
        [
            "-o".into(),
            "ControlMaster=yes".into(),
            "-o".into(),
            format!("ControlPath={}", self.path.display()),
            "-o".into(),
            format!("ControlPersist={IDLE}"),
        ]
    }

    /// Whether a master answers there now (a socket left by one that died does not).
    pub fn is_up(&self) -> bool {
        std::os::unix::net::UnixStream::connect(&self.path).is_ok()
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        if !self.is_up() {
            let _ = std::fs::remove_file(&self.path);
            return;
        }
        let path = self.path.clone();
        // `ssh -O exit` never touches the network: it tells the master over its socket.
        let child = std::process::Command::new("ssh")
            .arg("-o")
            .arg(format!("ControlPath={}", path.display()))
            .args(["-O", "exit", "provision-master"])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        std::thread::spawn(move || {
            if let Ok(mut c) = child {
                let _ = c.wait();
            }
            let _ = std::fs::remove_file(&path);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_is_private_and_names_are_fresh_and_short() {
        let parent = tempfile::tempdir().unwrap();
        std::fs::create_dir(parent.path().join("mux")).unwrap();
        std::fs::set_permissions(
            parent.path().join("mux"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let d = MuxDir::create(parent.path()).unwrap();
        let mode = std::fs::metadata(parent.path().join("mux"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "tightened");
        let (a, b) = (d.socket("i-1").unwrap(), d.socket("i-1").unwrap());
        assert_ne!(a.path(), b.path());
        assert!(!a.is_up());
        let long = "i".repeat(100);
        assert!(d.socket(&long).is_none(), "too long for a socket");
    }

    #[test]
    fn a_directory_that_is_not_ours_is_not_used() {
        let parent = tempfile::tempdir().unwrap();
        std::fs::write(parent.path().join("mux"), "not a directory").unwrap();
        assert!(MuxDir::create(parent.path()).is_none());
    }
}
