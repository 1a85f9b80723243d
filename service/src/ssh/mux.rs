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
//!  end:   MUX_C_TERMINATE over the socket, as `ssh -O exit` (on drop of the Mux)
//! ```
//!
//! The sockets live in `<runtime dir>/mux`, a directory of this user's only (0700, checked
//! at start): whoever can open a socket can run commands on the instance. A master that is
//! gone when its client starts (idle past [`IDLE`], the connection lost) is not an error:
//! the client logs in again itself, with the same strict host key checking.
//!
//! Owns the directory, the names and closing the masters; not the login (see `reach`) nor
//! the clients' options (`Remote::ansible_host_vars`).

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// One master's socket. Dropped, it asks the master to exit and removes a socket left
/// behind.
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
        UnixStream::connect(&self.path).is_ok()
    }
}

impl Drop for Mux {
    fn drop(&mut self) {
        // A burst's masters close at once: a few bytes each over the socket, not a process.
        close_master(&self.path);
    }
}

/// Asks the master whose socket is `path` to exit (see [`terminate`]); a socket nobody
/// answers on is removed.
pub fn close_master(path: &Path) {
    if let Err(e) = terminate(path) {
        debug!(socket = %path.display(), error = %e, "no master to close");
        let _ = std::fs::remove_file(path);
    }
}

const MUX_MSG_HELLO: u32 = 0x0000_0001;
const MUX_C_TERMINATE: u32 = 0x1000_0005;
const MUX_S_OK: u32 = 0x8000_0001;
/// The multiplexing protocol's version OpenSSH speaks (and `ssh -O` sends).
const MUX_VERSION: u32 = 4;

/// Asks the master at `path` to exit, as `ssh -O exit` does (OpenSSH's PROTOCOL.mux: each
/// side says hello, then the client sends MUX_C_TERMINATE and the master answers
/// MUX_S_OK, closes its connection to the host and removes its socket; it may also close
/// the connection before MUX_S_OK goes out, which counts as done). Bounded: a master
/// that does not answer within 2 s is left to its idle timeout.
fn terminate(path: &Path) -> std::io::Result<()> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut out = Vec::with_capacity(24);
    for (kind, value) in [(MUX_MSG_HELLO, MUX_VERSION), (MUX_C_TERMINATE, 1)] {
        out.extend(8u32.to_be_bytes());
        out.extend(kind.to_be_bytes());
        out.extend(value.to_be_bytes());
    }
    s.write_all(&out)?;
    // The master's hello (perhaps with extensions), then its answer to request 1.
    for want in [MUX_MSG_HELLO, MUX_S_OK] {
        let mut len = [0u8; 4];
        match s.read_exact(&mut len) {
            // Told to terminate, a master may exit before its answer goes out (OpenSSH's
            // mux.c says as much): the connection closing after its hello is its answer.
            Err(e) if want == MUX_S_OK && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(())
            }
            r => r?,
        }
        let len = u32::from_be_bytes(len) as usize;
        if !(4..=4096).contains(&len) {
            return Err(std::io::Error::other(format!("a {len}-byte message")));
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body)?;
        let kind = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        if kind != want {
            return Err(std::io::Error::other(format!(
                "the master answered {kind:#x}, not {want:#x}"
            )));
        }
    }
    Ok(())
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

    /// A stand-in master speaking OpenSSH's side of PROTOCOL.mux: it must be asked, in
    /// order, hello (version 4) and terminate; the real ssh is the integration tests' own.
    #[test]
    fn closing_asks_the_master_to_terminate() {
        let parent = tempfile::tempdir().unwrap();
        let d = MuxDir::create(parent.path()).unwrap();
        let m = d.socket("i-1").unwrap();
        let listener = std::os::unix::net::UnixListener::bind(m.path()).unwrap();
        let master = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let hello = [0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 4];
            c.write_all(&hello).unwrap();
            let mut asked = [0u8; 24];
            c.read_exact(&mut asked).unwrap();
            c.write_all(&[0, 0, 0, 8, 0x80, 0, 0, 1, 0, 0, 0, 1])
                .unwrap();
            asked
        });
        drop(m);
        let asked = master.join().unwrap();
        assert_eq!(&asked[..12], &[0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 4]);
        assert_eq!(&asked[12..], &[0, 0, 0, 8, 0x10, 0, 0, 5, 0, 0, 0, 1]);
    }

    #[test]
    fn a_directory_that_is_not_ours_is_not_used() {
        let parent = tempfile::tempdir().unwrap();
        std::fs::write(parent.path().join("mux"), "not a directory").unwrap();
        assert!(MuxDir::create(parent.path()).is_none());
    }
}
