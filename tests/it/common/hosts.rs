//! Simulated EC2 instances: one network namespace per instance, with its own IPv4 address, and
//! a real `sshd` listening on port 22 in it (how to build one by hand: tests/README.md).
//!
//! ```text
//!   host netns                                    netns psim-10-213-7-4
//!   bridge psb-213-7 (10.213.7.1/24) ── veth psv-213-7-4 ══ eth0 10.213.7.4/24 ── sshd :22
//!                                    └─ veth psv-213-7-5 ══ eth0 10.213.7.5/24 ── sshd :22   (netns psim-10-213-7-5)
//! ```
//!
//! A test makes a [`HostNet`] (one private /24 and a bridge holding its `.1`), creates the
//! emulator's subnet with [`HostNet::cidr`] so that instances get addresses in it, and starts a
//! [`SimHost`] with each instance's private IP. The test's own `ssh`, `ansible-playbook` or the
//! `provision` binary then reach the host at that IP from the host network namespace. Only the
//! network is isolated: the filesystem is shared, so whatever runs "on" a simulated host writes
//! to this machine; give playbooks [`SimHost::dir`] (a per-host scratch directory) to write in.
//! A namespace reaches its /24 only (no default route).
//!
//! # Address allocation (parallel tests, parallel test binaries)
//!
//! There are 10 240 slots: the /24s `10.S.T.0/24` with `S` in 210..=249 and `T` in 0..=255.
//! [`HostNet::new`] takes the next slot from a process-wide `AtomicU32` counter, starting at a
//! hash (FNV-1a) of the test binary's name and the pid, so that test binaries running at once
//! start far apart. A slot is owned by holding an exclusive `flock(2)` on
//! `/run/provision-simhosts/10.S.T.0.lock` (the file holds the owner's pid, for people): slots
//! locked by another test (thread or process) are skipped, and so are /24s in which this
//! machine already has an address or a route. The kernel drops the lock when its owner dies,
//! however it dies, so a killed run never blocks a slot.
//!
//! Interface and namespace names are derived from the owned /24 (and the host's last octet),
//! not from the pid: `psb-S-T` (bridge), `psv-S-T-H` (host side of a veth; the namespace side is
//! `eth0`), `psim-10-S-T-H` (namespace); all within IFNAMSIZ. Holding the slot's lock makes them
//! unique on the machine, and anything found with those names while holding the lock is a
//! leftover of a killed run: it is removed (processes in a leftover namespace are killed) before
//! the slot is used. In addition, the first `HostNet` of a process sweeps leftovers of every
//! slot nobody holds. Temporary directories are named `provsim-*`.
//!
//! Everything is removed on drop: a `SimHost` stops its sshd (SIGTERM, then SIGKILL), kills
//! every process left in its namespace (ssh sessions, commands run through them), deletes the
//! namespace and the veth; the `HostNet` deletes the bridge and releases the slot once it and all
//! its hosts are gone.
//!
//! # Example
//!
//! ```ignore
//! let net = HostNet::new();                        // needs root
//! // create the emulator's subnet with net.cidr() (in a VPC of net.vpc_cidr()), launch ...
//! let host = net.host(&private_ip);                // namespace + sshd, ready to accept
//! emu.control("POST", &format!("/_emulator/console/{id}"),
//!             Some(json!({ "host_keys": [host.public_key_line()] })));
//! let known_hosts = net.known_hosts(&[&host]);
//! let out = host.ssh(&known_hosts).arg("echo ok").output().unwrap();
//! host.stop_sshd();                                // "SSH goes away"; start_sshd() again later
//! let mitm = net.impostor(net.next_ip());          // sshd key != public_key_line()
//! host.swap_in_impostor();                         // from now on, this host's sshd is one too
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock};
use std::time::{Duration, Instant};

/// Second octets of the slots: 10.210.0.0/16 ..= 10.249.0.0/16.
const FIRST_OCTET2: u32 = 210;
const SLOTS: u32 = 40 * 256;
const LOCK_DIR: &str = "/run/provision-simhosts";
const SSHD: &str = "/usr/sbin/sshd";
/// Addresses `next_ip` hands out, counting down (moto gives instances .4, .5, ... upwards).
const AUTO_IP_FIRST: u32 = 250;
const AUTO_IP_LAST: u32 = 150;
const SSHD_READY_TIMEOUT: Duration = Duration::from_secs(15);
const SIGTERM: i32 = 15;
const SIGKILL: i32 = 9;
const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;
const LOCK_EX: i32 = 2;
const LOCK_NB: i32 = 4;

extern "C" {
    fn geteuid() -> u32;
    fn flock(fd: i32, operation: i32) -> i32;
    fn kill(pid: i32, sig: i32) -> i32;
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `ansible-playbook` of the project's venv (installed by scripts/setup).
pub fn ansible_playbook_path() -> PathBuf {
    manifest_dir().join(".venv/bin/ansible-playbook")
}

// ------------------------------------------------------------------------------------------
// small process helpers
// ------------------------------------------------------------------------------------------

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion; panics with its output when it fails.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(cmd)));
    assert!(
        out.status.success(),
        "{} failed ({}): {}{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, ignoring failure (cleanup paths).
fn run_quietly(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_ip(args: &[&str]) -> String {
    run(Command::new("ip").args(args))
}

fn ip_quietly(args: &[&str]) -> Option<String> {
    run_quietly(Command::new("ip").args(args))
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid of a process this module started (or found in one of its
    // namespaces); no memory is involved.
    unsafe {
        kill(pid as i32, sig);
    }
}

/// Stops a child: SIGTERM, up to `grace` to exit, then SIGKILL; always reaps it.
fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    signal(child.id(), SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn require_root_and_tools() {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let euid = unsafe { geteuid() };
    assert!(
        euid == 0,
        "simulated hosts (tests/common/hosts.rs) need root: they create network namespaces, veth \
         pairs and a bridge, and run sshd. Run these tests as root (CI does); euid is {euid}"
    );
    for (tool, package) in [
        ("/usr/sbin/sshd", "openssh-server"),
        ("/usr/bin/ssh-keygen", "openssh-client"),
        ("/usr/bin/ssh", "openssh-client"),
    ] {
        assert!(
            Path::new(tool).exists(),
            "{tool} is missing: apt-get install -y {package} (scripts/setup does)"
        );
    }
    assert!(
        Command::new("ip")
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "`ip` is missing: apt-get install -y iproute2"
    );
}

// ------------------------------------------------------------------------------------------
// slots: /24s owned through flock
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Slot {
    s: u8,
    t: u8,
}

impl Slot {
    fn from_index(i: u32) -> Slot {
        Slot {
            s: (FIRST_OCTET2 + (i % SLOTS) / 256) as u8,
            t: (i % 256) as u8,
        }
    }
    fn contains(&self, addr: Ipv4Addr) -> bool {
        let o = addr.octets();
        o[0] == 10 && o[1] == self.s && o[2] == self.t
    }
    fn addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.s, self.t, last)
    }
    fn bridge(&self) -> String {
        format!("psb-{}-{}", self.s, self.t)
    }
    fn veth_prefix(&self) -> String {
        format!("psv-{}-{}-", self.s, self.t)
    }
    fn netns_prefix(&self) -> String {
        format!("psim-10-{}-{}-", self.s, self.t)
    }
    fn lock_path(&self) -> PathBuf {
        Path::new(LOCK_DIR).join(format!("10.{}.{}.0.lock", self.s, self.t))
    }
}

/// Parses `psb-S-T`, `psv-S-T-H`, `psim-10-S-T-H` into the slot they belong to.
fn slot_of_name(name: &str) -> Option<Slot> {
    let rest = name
        .strip_prefix("psb-")
        .or_else(|| name.strip_prefix("psv-"))
        .or_else(|| name.strip_prefix("psim-10-"))?;
    let mut it = rest.split('-');
    let s: u32 = it.next()?.parse().ok()?;
    let t: u8 = it.next()?.parse().ok()?;
    (FIRST_OCTET2..FIRST_OCTET2 + SLOTS / 256)
        .contains(&s)
        .then_some(Slot { s: s as u8, t })
}

/// An exclusive flock on a slot's lock file; dropping it removes the file, then unlocks.
struct SlotLock {
    path: PathBuf,
    // Held for the flock; closed (unlocking) when the lock drops.
    _file: File,
}

impl SlotLock {
    fn try_acquire(slot: Slot) -> Option<SlotLock> {
        let path = slot.lock_path();
        loop {
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .mode(0o644)
                .open(&path)
                .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
            // SAFETY: flock(2) on a descriptor owned by `file`, alive for the call.
            if unsafe { flock(file.as_raw_fd(), LOCK_EX | LOCK_NB) } != 0 {
                return None; // another owner (thread or process)
            }
            // The previous owner removes the file before unlocking: a lock taken on a file that
            // is no longer at `path` protects nothing, start over.
            let same = fs::metadata(&path)
                .ok()
                .zip(file.metadata().ok())
                .is_some_and(|(a, b)| a.ino() == b.ino() && a.dev() == b.dev());
            if !same {
                continue;
            }
            let _ = file.set_len(0);
            let _ = file.seek(SeekFrom::Start(0));
            let _ = writeln!(file, "{}", std::process::id());
            return Some(SlotLock { path, _file: file });
        }
    }
}

impl Drop for SlotLock {
    fn drop(&mut self) {
        // Remove while still locked; `_file` is closed (and the lock released) right after.
        let _ = fs::remove_file(&self.path);
    }
}

fn netns_names() -> Vec<String> {
    ip_quietly(&["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn link_names() -> Vec<String> {
    ip_quietly(&["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let name = l.split(": ").nth(1)?;
            Some(name.split('@').next()?.to_string())
        })
        .collect()
}

/// Kills every process in a namespace (bounded wait until none is left).
fn kill_netns_processes(netns: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids: Vec<u32> = ip_quietly(&["netns", "pids", netns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            signal(pid, SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn remove_netns(netns: &str) {
    kill_netns_processes(netns);
    let _ = ip_quietly(&["netns", "delete", netns]);
}

/// Removes whatever carries a slot's names (the caller holds the slot's lock).
fn remove_leftovers(slot: Slot) {
    for ns in netns_names() {
        if ns.starts_with(&slot.netns_prefix()) {
            remove_netns(&ns);
        }
    }
    for link in link_names() {
        if link.starts_with(&slot.veth_prefix()) || link == slot.bridge() {
            let _ = ip_quietly(&["link", "delete", &link]);
        }
    }
}

/// Once per process: directories sshd and the locks need, and a sweep of leftovers of killed
/// runs in slots nobody holds.
fn prepare_machine() {
    static PREPARED: Once = Once::new();
    PREPARED.call_once(|| {
        fs::create_dir_all(LOCK_DIR).expect("create the slot lock directory");
        // sshd's privilege separation directory (Debian creates it in its service unit).
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let slots: BTreeSet<Slot> = netns_names()
            .iter()
            .chain(link_names().iter())
            .filter_map(|n| slot_of_name(n))
            .collect();
        for slot in slots {
            if let Some(_held) = SlotLock::try_acquire(slot) {
                remove_leftovers(slot);
            }
        }
        // Temporary directories of killed runs: provsim-<pid>-..., whose pid is gone.
        if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name
                    .strip_prefix("provsim-")
                    .and_then(|r| r.split('-').next())
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    });
}

/// IPv4 addresses and route destinations this machine already has (in its own namespace).
fn addresses_in_use() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for l in ip_quietly(&["-o", "-4", "addr", "show"])
        .unwrap_or_default()
        .lines()
    {
        let mut it = l.split_whitespace();
        while let Some(w) = it.next() {
            if w == "inet" {
                if let Some(a) = it.next().and_then(|c| c.split('/').next()?.parse().ok()) {
                    out.push(a);
                }
            }
        }
    }
    for l in ip_quietly(&["-4", "route", "show", "table", "all"])
        .unwrap_or_default()
        .lines()
    {
        let dest = l
            .split_whitespace()
            .find(|w| w.starts_with(|c: char| c.is_ascii_digit()));
        if let Some(a) = dest.and_then(|d| d.split('/').next()?.parse().ok()) {
            out.push(a);
        }
    }
    out
}

fn start_index() -> u32 {
    static START: OnceLock<u32> = OnceLock::new();
    *START.get_or_init(|| {
        let exe = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        let mut h: u32 = 0x811c_9dc5;
        for b in exe.bytes().chain(std::process::id().to_le_bytes()) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        h % SLOTS
    })
}

static NEXT_SLOT: AtomicU32 = AtomicU32::new(0);
static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

fn tempdir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!(
            "provsim-{}-{what}-{}-",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ))
        .tempdir()
        .expect("create a temporary directory")
}

fn keygen(path: &Path, comment: &str) -> String {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path));
    let line = fs::read_to_string(path.with_extension("pub")).expect("read the public key");
    line.trim().to_string()
}

// ------------------------------------------------------------------------------------------
// HostNet
// ------------------------------------------------------------------------------------------

struct Net {
    slot: Slot,
    bridge: String,
    dir: tempfile::TempDir,
    client_key: PathBuf,
    client_public_key: String,
    used: Mutex<BTreeSet<u8>>,
    next_auto: AtomicU32,
    files: AtomicU32,
    // last: removed (and unlocked) after the bridge is gone
    _lock: SlotLock,
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip_quietly(&["link", "delete", &self.bridge]);
    }
}

/// A private /24 for one test: a bridge holding `.1` in the host namespace, a client key, and
/// the [`SimHost`]s on it. Released when it (every clone) and all its hosts are dropped.
#[derive(Clone)]
pub struct HostNet {
    net: Arc<Net>,
}

impl Default for HostNet {
    fn default() -> Self {
        Self::new()
    }
}

impl HostNet {
    /// Claims a free /24 (see the module docs) and sets up its bridge. Panics without root.
    pub fn new() -> HostNet {
        require_root_and_tools();
        prepare_machine();
        let in_use = addresses_in_use();
        for _ in 0..SLOTS {
            let slot = Slot::from_index(
                start_index().wrapping_add(NEXT_SLOT.fetch_add(1, Ordering::Relaxed)),
            );
            if in_use.iter().any(|a| slot.contains(*a)) {
                continue;
            }
            let Some(held) = SlotLock::try_acquire(slot) else {
                continue;
            };
            remove_leftovers(slot);
            let bridge = slot.bridge();
            run_ip(&["link", "add", &bridge, "type", "bridge"]);
            let gateway = format!("{}/24", slot.addr(1));
            run_ip(&["addr", "add", &gateway, "dev", &bridge]);
            run_ip(&["link", "set", &bridge, "up"]);
            let dir = tempdir(&format!("net-10.{}.{}", slot.s, slot.t));
            let client_key = dir.path().join("client_ed25519");
            let client_public_key = keygen(&client_key, "provision-tests");
            fs::set_permissions(&client_key, fs::Permissions::from_mode(0o600)).unwrap();
            return HostNet {
                net: Arc::new(Net {
                    slot,
                    bridge,
                    dir,
                    client_key,
                    client_public_key,
                    used: Mutex::new(BTreeSet::new()),
                    next_auto: AtomicU32::new(0),
                    files: AtomicU32::new(0),
                    _lock: held,
                }),
            };
        }
        panic!("no free /24 in 10.210.0.0-10.249.255.0 for simulated hosts");
    }

    /// The /24, e.g. "10.213.7.0/24": the CIDR of the emulator subnet for this test.
    pub fn cidr(&self) -> String {
        format!("{}/24", self.net.slot.addr(0))
    }

    /// The /16 around [`cidr`](Self::cidr), for the emulator VPC.
    pub fn vpc_cidr(&self) -> String {
        format!("10.{}.0.0/16", self.net.slot.s)
    }

    /// The bridge's address (`.1`), where connections from this machine come from.
    pub fn gateway(&self) -> Ipv4Addr {
        self.net.slot.addr(1)
    }

    /// Private key (0600) every host of this net authorizes for root.
    pub fn client_key(&self) -> &Path {
        &self.net.client_key
    }

    /// A scratch directory for the test (inventories, known_hosts files, ...).
    pub fn dir(&self) -> &Path {
        self.net.dir.path()
    }

    /// An unused address of the /24 for a host that is not an emulator instance: .250, .249,
    /// ... (the emulator gives instances .4, .5, ... upwards).
    pub fn next_ip(&self) -> Ipv4Addr {
        loop {
            let n = self.net.next_auto.fetch_add(1, Ordering::Relaxed);
            assert!(
                n <= AUTO_IP_FIRST - AUTO_IP_LAST,
                "next_ip: no free address left"
            );
            let last = (AUTO_IP_FIRST - n) as u8;
            if !lock(&self.net.used).contains(&last) {
                return self.net.slot.addr(last);
            }
        }
    }

    /// A host at `ip` (in [`cidr`](Self::cidr)) with sshd accepting connections.
    pub fn host(&self, ip: impl std::fmt::Display) -> SimHost {
        self.spawn(ip, false, true)
    }

    /// A host whose sshd is not started: SSH "never comes up" until
    /// [`SimHost::start_sshd`] is called.
    pub fn host_without_sshd(&self, ip: impl std::fmt::Display) -> SimHost {
        self.spawn(ip, false, false)
    }

    /// A man in the middle: [`SimHost::public_key_line`] reports one host key (the one to
    /// register in the console output), sshd presents another.
    pub fn impostor(&self, ip: impl std::fmt::Display) -> SimHost {
        self.spawn(ip, true, true)
    }

    fn spawn(&self, ip: impl std::fmt::Display, impostor: bool, start: bool) -> SimHost {
        let text = ip.to_string();
        let addr: Ipv4Addr = text
            .parse()
            .unwrap_or_else(|_| panic!("not an IPv4 address: {text:?}"));
        let slot = self.net.slot;
        let last = addr.octets()[3];
        assert!(
            slot.contains(addr) && (2..=254).contains(&last),
            "{addr} is not a host address of {} (or is its gateway .1)",
            self.cidr()
        );
        assert!(
            lock(&self.net.used).insert(last),
            "{addr} is already a simulated host"
        );
        let netns = format!("{}{last}", slot.netns_prefix());
        let veth = format!("{}{last}", slot.veth_prefix());
        // From here on, Drop cleans up whatever was created.
        let dir = tempdir(&format!("host-{addr}"));
        let scratch = dir.path().join("root");
        fs::create_dir(&scratch).unwrap();
        let hostname = format!("ip-{}", addr.to_string().replace('.', "-"));
        let comment = format!("root@{hostname}");
        let host_key = dir.path().join("ssh_host_ed25519_key");
        let advertised = keygen(&host_key, &comment);
        let sshd_key = if impostor {
            let k = dir.path().join("impostor_ed25519_key");
            keygen(&k, &comment);
            k
        } else {
            host_key
        };
        // The instance's own home for its sessions: a fresh instance's root has no rc files
        // of its own, and this machine's (a developer's pyenv in /root/.bashrc, read by every
        // bash that sshd starts) would cost each session 0.15 CPU-seconds here.
        let home = dir.path().join("home");
        fs::create_dir(&home).unwrap();
        let authorized_keys = dir.path().join("authorized_keys");
        fs::write(
            &authorized_keys,
            format!("{}\n", self.net.client_public_key),
        )
        .unwrap();
        fs::set_permissions(&authorized_keys, fs::Permissions::from_mode(0o600)).unwrap();
        let config = dir.path().join("sshd_config");
        fs::write(
            &config,
            format!(
                "ListenAddress {addr}:22\n\
                 HostKey {key}\n\
                 PidFile {pid}\n\
                 AuthorizedKeysFile {ak}\n\
                 PermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 UseDNS no\n\
                 PrintMotd no\n\
                 PrintLastLog no\n\
                 MaxStartups 100:30:200\n\
                 MaxSessions 50\n\
                 Subsystem sftp internal-sftp\n\
                 SetEnv PATH={bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME={home}\n",
                bin = dir.path().join("bin").display(),
                home = home.display(),
                key = sshd_key.display(),
                pid = dir.path().join("sshd.pid").display(),
                ak = authorized_keys.display(),
            ),
        )
        .unwrap();
        let host = SimHost {
            net: self.net.clone(),
            ip: addr,
            last,
            hostname,
            netns,
            veth,
            log: dir.path().join("sshd.log"),
            config,
            scratch,
            public_key_line: advertised,
            impostor: AtomicBool::new(impostor),
            sshd: Mutex::new(None),
            dir,
        };
        // A leftover with this name cannot exist (the slot lock is held and leftovers were
        // removed), so plain `ip` calls that panic on failure are right here.
        run_ip(&["netns", "add", &host.netns]);
        run_ip(&[
            "link",
            "add",
            &host.veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &host.netns,
        ]);
        run_ip(&["link", "set", &host.veth, "master", &self.net.bridge, "up"]);
        let cidr = format!("{addr}/24");
        run_ip(&["-n", &host.netns, "addr", "add", &cidr, "dev", "eth0"]);
        run_ip(&["-n", &host.netns, "link", "set", "eth0", "up"]);
        run_ip(&["-n", &host.netns, "link", "set", "lo", "up"]);
        if start {
            host.start_sshd();
        }
        host
    }

    /// Writes a known_hosts file with each host's advertised key (`IP keytype base64`).
    pub fn known_hosts(&self, hosts: &[&SimHost]) -> PathBuf {
        let path = self.fresh_file("known_hosts");
        let text: String = hosts
            .iter()
            .map(|h| format!("{}\n", h.known_hosts_line()))
            .collect();
        fs::write(&path, text).unwrap();
        path
    }

    /// Writes an Ansible INI inventory: one line per (name, host) with ansible_host,
    /// ansible_user=root, the client key, strict host key checking against `known_hosts`, and
    /// host_dir = the host's scratch directory; `vars` go to [all:vars].
    pub fn inventory(
        &self,
        hosts: &[(&str, &SimHost)],
        known_hosts: &Path,
        vars: &[(&str, &str)],
    ) -> PathBuf {
        let path = self.fresh_file("inventory.ini");
        let mut text = String::from("[sim]\n");
        for (name, h) in hosts {
            text.push_str(&format!(
                "{name} ansible_host={} host_dir={}\n",
                h.ip(),
                h.dir().display()
            ));
        }
        text.push_str(&format!(
            "\n[all:vars]\nansible_user=root\nansible_python_interpreter=/usr/bin/python3\n\
             ansible_ssh_private_key_file={}\n\
             ansible_ssh_common_args=\"-F /dev/null -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes\"\n",
            self.client_key().display(),
            known_hosts.display()
        ));
        for (k, v) in vars {
            text.push_str(&format!("{k}={v}\n"));
        }
        fs::write(&path, text).unwrap();
        path
    }

    /// `ansible-playbook` from the venv with a hermetic environment: an empty config file,
    /// SSH control sockets and local temp under this net's directory, no colour, working
    /// directory = this net's directory, and the stdout callback `provision_json`
    /// (playbooks/callback_plugins: one JSON document, see [`ansible_stats`]; ansible-core has
    /// no JSON callback of its own), and pipelining (fewer SSH round trips per task: a base +
    /// ecs-host run takes about half the time; `.env("ANSIBLE_PIPELINING", "0")` turns it
    /// off). Host key checking stays on. Add the arguments.
    pub fn ansible_playbook(&self) -> Command {
        let dir = self.dir();
        let cfg = dir.join("ansible.cfg");
        if !cfg.exists() {
            fs::write(&cfg, "# empty: defaults only\n").unwrap();
        }
        fs::create_dir_all(dir.join("cp")).unwrap();
        fs::create_dir_all(dir.join("ansible-tmp")).unwrap();
        let mut c = Command::new(ansible_playbook_path());
        c.current_dir(dir)
            .env("ANSIBLE_CONFIG", &cfg)
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", dir.join("cp"))
            .env("ANSIBLE_LOCAL_TEMP", dir.join("ansible-tmp"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "false")
            .env(
                "ANSIBLE_CALLBACK_PLUGINS",
                manifest_dir().join("playbooks/callback_plugins"),
            )
            .env("ANSIBLE_STDOUT_CALLBACK", "provision_json")
            .env("ANSIBLE_PIPELINING", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1") // no __pycache__ in the work tree
            .env_remove("ANSIBLE_HOST_KEY_CHECKING")
            .stdin(Stdio::null());
        c
    }

    fn fresh_file(&self, name: &str) -> PathBuf {
        let n = self.net.files.fetch_add(1, Ordering::Relaxed);
        self.dir().join(format!("{n}-{name}"))
    }
}

// ------------------------------------------------------------------------------------------
// SimHost
// ------------------------------------------------------------------------------------------

/// A simulated instance: a namespace with one address and (normally) sshd on port 22.
/// Its methods take `&self`, so it can be shared with a thread (e.g. one that starts sshd late).
pub struct SimHost {
    net: Arc<Net>,
    ip: Ipv4Addr,
    last: u8,
    hostname: String,
    netns: String,
    veth: String,
    log: PathBuf,
    config: PathBuf,
    scratch: PathBuf,
    public_key_line: String,
    impostor: AtomicBool,
    sshd: Mutex<Option<Child>>,
    dir: tempfile::TempDir,
}

impl SimHost {
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `ip-10-213-7-4`, as EC2 names it (the comment of the host key is `root@` this).
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The host key this host *claims*: `ssh-ed25519 AAAA... root@ip-10-213-7-4`. For an
    /// impostor, not the key its sshd presents.
    pub fn public_key_line(&self) -> &str {
        &self.public_key_line
    }

    /// `10.213.7.4 ssh-ed25519 AAAA...` for a known_hosts file.
    pub fn known_hosts_line(&self) -> String {
        let mut it = self.public_key_line.split_whitespace();
        let (kind, key) = (it.next().unwrap(), it.next().unwrap());
        format!("{} {kind} {key}", self.ip)
    }

    pub fn is_impostor(&self) -> bool {
        self.impostor.load(Ordering::SeqCst)
    }

    /// A man in the middle takes the host's place: sshd is restarted with a fresh key that
    /// is not [`public_key_line`](Self::public_key_line) (open sessions carry on). For the
    /// window between a client verifying the host and its next connection.
    pub fn swap_in_impostor(&self) {
        let key = self.dir.path().join("swapped_impostor_ed25519_key");
        if !key.exists() {
            keygen(&key, &format!("root@{}", self.hostname));
        }
        let config = fs::read_to_string(&self.config).unwrap();
        let swapped: String = config
            .lines()
            .map(|l| {
                if l.starts_with("HostKey ") {
                    format!("HostKey {}\n", key.display())
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        fs::write(&self.config, swapped).unwrap();
        self.stop_sshd();
        self.start_sshd();
        self.impostor.store(true, Ordering::SeqCst);
    }

    /// Per-host scratch directory (empty at start) for playbooks to write into.
    pub fn dir(&self) -> &Path {
        &self.scratch
    }

    /// Its sshd's process id while it runs (the benchmark reads the instance's CPU there:
    /// sshd reaps its sessions and what ran through them).
    #[allow(dead_code)]
    pub fn sshd_pid(&self) -> Option<u32> {
        self.sshd.lock().unwrap().as_ref().map(Child::id)
    }

    /// The same machine at another address: this host's sshd restarts with `other`'s host
    /// key (as an instance keeps its keys when its public IP changes on a stop and start).
    pub fn take_host_key_of(&self, other: &SimHost) {
        self.stop_sshd();
        let key = |h: &SimHost| h.dir.path().join("ssh_host_ed25519_key");
        fs::copy(key(other), key(self)).unwrap();
        fs::copy(
            key(other).with_extension("pub"),
            key(self).with_extension("pub"),
        )
        .unwrap();
        self.start_sshd();
    }

    /// Installs a stand-in `cloud-init` first on the PATH of the host's SSH sessions: its
    /// boot configuration runs until the test writes the file it returns (`done`, or
    /// `error` in it for a failed boot). `cloud-init status --wait` waits for that (and
    /// leaves a `waited` file next to it when called); `cloud-init status` answers at once.
    pub fn install_cloud_init(&self) -> PathBuf {
        let bin = self.dir.path().join("bin");
        fs::create_dir_all(&bin).unwrap();
        let script = bin.join("cloud-init");
        fs::write(
            &script,
            r#"#!/bin/sh
# A stand-in for cloud-init on a simulated host (tests/common/hosts.rs).
here=$(dirname "$0")
state() {
  if grep -q error "$here/done" 2>/dev/null; then echo error
  elif [ -e "$here/done" ]; then echo done
  else echo running; fi
}
case "$*" in
  "status --wait")
    touch "$here/waited"
    while [ "$(state)" = running ]; do printf .; sleep 0.2; done
    echo; echo "status: $(state)"
    [ "$(state)" = done ] ;;
  "status") echo "status: $(state)" ;;
  *) echo "stand-in cloud-init: '$*' is not simulated" >&2; exit 64 ;;
esac
"#,
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        bin.join("done")
    }

    /// sshd's log (it runs with -e), for assertion messages.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn sshd_running(&self) -> bool {
        lock(&self.sshd)
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts sshd (no-op when it runs) and returns once it listens on `ip:22`.
    pub fn start_sshd(&self) {
        let mut guard = lock(&self.sshd);
        if let Some(child) = guard.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                return;
            }
        }
        let offset = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // `ip netns exec` execs sshd (no fork): the child's pid is sshd's.
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.netns, SSHD, "-D", "-e", "-f"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        let ready = format!("Server listening on {} port 22", self.ip);
        let deadline = Instant::now() + SSHD_READY_TIMEOUT;
        loop {
            let mut text = String::new();
            if let Ok(mut f) = File::open(&self.log) {
                let _ = f.seek(SeekFrom::Start(offset));
                let _ = f.read_to_string(&mut text);
            }
            if text.contains(&ready) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("sshd for {} exited ({status}):\n{text}", self.ip);
            }
            if Instant::now() > deadline {
                terminate(&mut child, Duration::from_secs(2));
                panic!(
                    "sshd for {} not listening after {SSHD_READY_TIMEOUT:?}:\n{text}",
                    self.ip
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        *guard = Some(child);
    }

    /// Stops the listening sshd (SIGTERM, then SIGKILL): new connections are refused. Open
    /// sessions carry on, as with `systemctl stop ssh` on Debian; drop the host to end them.
    pub fn stop_sshd(&self) {
        if let Some(mut child) = lock(&self.sshd).take() {
            terminate(&mut child, Duration::from_secs(5));
        }
    }

    /// Every process in the host's namespace: sshd (listening and per connection) and what
    /// runs through its sessions.
    fn netns_pids(&self) -> Vec<u32> {
        ip_quietly(&["netns", "pids", &self.netns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The host loses its open SSH connections, as a restart of its sshd or a reset on the
    /// network would end them: every process in its namespace but the listening sshd is
    /// killed. New connections are still accepted (see [`SimHost::freeze`]).
    pub fn drop_sessions(&self) {
        let listener = lock(&self.sshd).as_ref().map(Child::id);
        for _ in 0..50 {
            let sessions: Vec<u32> = self
                .netns_pids()
                .into_iter()
                .filter(|p| Some(*p) != listener)
                .collect();
            if sessions.is_empty() {
                return;
            }
            for pid in sessions {
                signal(pid, SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the sessions of {} did not end", self.ip);
    }

    /// The host stops answering: every process in its namespace (the listening sshd, its
    /// sessions, what they run) is stopped with SIGSTOP until [`SimHost::thaw`]. The
    /// kernel still completes TCP handshakes and acknowledges data; no SSH answer comes.
    pub fn freeze(&self) {
        for pid in self.netns_pids() {
            signal(pid, SIGSTOP);
        }
    }

    /// Undoes [`SimHost::freeze`]: what was stopped carries on.
    pub fn thaw(&self) {
        for pid in self.netns_pids() {
            signal(pid, SIGCONT);
        }
    }

    /// The system `ssh` client for root on this host: no user config, the net's client key,
    /// strict host key checking against `known_hosts`, batch mode, 5 s connect timeout. Add
    /// the remote command with `.arg(...)`.
    pub fn ssh(&self, known_hosts: &Path) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-F", "/dev/null", "-o", "BatchMode=yes"])
            .args(["-o", "StrictHostKeyChecking=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(["-o", "ConnectTimeout=5"])
            .args(["-o", "LogLevel=ERROR"])
            .arg("-i")
            .arg(self.net.client_key.as_path())
            .args(["-l", "root"])
            .arg(self.ip.to_string())
            .stdin(Stdio::null());
        c
    }
}

impl Drop for SimHost {
    fn drop(&mut self) {
        self.thaw(); // a frozen sshd would wait out stop_sshd's grace
        self.stop_sshd();
        remove_netns(&self.netns); // kills sessions and whatever they started
        if link_names().contains(&self.veth) {
            let _ = ip_quietly(&["link", "delete", &self.veth]);
        }
        lock(&self.net.used).remove(&self.last);
    }
}

// ------------------------------------------------------------------------------------------
// helpers for tests
// ------------------------------------------------------------------------------------------

/// Standard base64 (with or without padding; whitespace ignored), e.g. for EC2's console
/// output. None on anything else.
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let clean: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let body = clean
        .strip_suffix(b"==")
        .or_else(|| clean.strip_suffix(b"="))
        .unwrap_or(&clean);
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in body {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Per-host stats of an `ansible-playbook` run with ANSIBLE_STDOUT_CALLBACK=provision_json:
/// host -> {"ok": n, "changed": n, "failures": n, "unreachable": n, ...}. The callback prints
/// one document per playbook of the run; their counters are added up.
pub fn ansible_stats(json_stdout: &str) -> BTreeMap<String, serde_json::Value> {
    let start = json_stdout.find('{').unwrap_or(json_stdout.len());
    let mut total: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for doc in
        serde_json::Deserializer::from_str(&json_stdout[start..]).into_iter::<serde_json::Value>()
    {
        let doc = doc.unwrap_or_else(|e| panic!("ansible JSON output: {e}\n{json_stdout}"));
        for (host, counters) in doc["stats"].as_object().into_iter().flatten() {
            let entry = total
                .entry(host.clone())
                .or_insert_with(|| serde_json::json!({}));
            for (k, v) in counters.as_object().into_iter().flatten() {
                let sum = entry[k].as_i64().unwrap_or(0) + v.as_i64().unwrap_or(0);
                entry[k] = sum.into();
            }
        }
    }
    total
}
