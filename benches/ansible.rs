//! Benchmark of the Ansible runners (figures printed, never asserted), run by
//! `scripts/bench ansible[:N]` as `cargo test --bench ansible` with env PROVISION_BIN set
//! to the release build of provision, as production runs it (unset: the debug build the
//! tests use; the target is left out of `--all-targets`). Needs root: it builds its
//! simulated instances with the integration tests' support (tests/it/common).

// The tests' support, most of which this benchmark does not use.
#[allow(dead_code, unused_imports)]
#[path = "../tests/it/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use common::hosts::{HostNet, SimHost};
use common::sim::{ansible_logs, results_by_instance, run_error, SimWorld as World, MARKER_LAYER};
use common::{path_str, root, Provision};

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench_ansible_runners());
}

/// What the benchmark needs of a `/proc/<pid>/stat`.
struct ProcStat {
    comm: String,
    state: char,
    ppid: i32,
    /// CPU seconds (user+sys) of the process itself.
    own: f64,
    /// CPU seconds (user+sys) of the children it has reaped (and theirs).
    reaped: f64,
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // f[0] is field 3 (state), f[1] ppid; utime, stime, cutime, cstime are fields 14..=17.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ProcStat {
        comm: text[open + 1..close].to_string(),
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        own: (ticks(11)? + ticks(12)?) / hz,
        reaped: (ticks(13)? + ticks(14)?) / hz,
    })
}

/// The whole machine's CPU (every process: the simulated instances' sshd and what runs
/// through them, the emulator, the ops side), from `/proc/stat` every 50 ms while the
/// benchmark runs: how busy the cores were during a row's wall.
struct MachineCpu {
    /// (epoch seconds, busy CPU-seconds, idle CPU-seconds) since boot.
    samples: std::sync::Arc<std::sync::Mutex<Vec<(f64, f64, f64)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MachineCpu {
    fn start() -> MachineCpu {
        let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some((busy, idle)) = machine_cpu() {
                    s.lock().unwrap().push((epoch_now(), busy, idle));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        MachineCpu {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Busy CPU-seconds and the idle share of the cores between two moments (epoch
    /// seconds): the samples just outside them.
    fn between(&self, t0: f64, t1: f64) -> Option<(f64, f64)> {
        let s = self.samples.lock().unwrap();
        let a = s.iter().rev().find(|x| x.0 <= t0).or_else(|| s.first())?;
        let b = s.iter().find(|x| x.0 >= t1).or_else(|| s.last())?;
        let (busy, idle) = (b.1 - a.1, b.2 - a.2);
        (busy + idle > 0.0).then(|| (busy, idle / (busy + idle)))
    }
}

impl Drop for MachineCpu {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The machine's busy and idle CPU-seconds since boot (`/proc/stat`'s `cpu` line: user,
/// nice, system, irq, softirq busy; idle and iowait idle; steal neither).
fn machine_cpu() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<f64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // SAFETY: sysconf reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let at = |i: usize| f.get(i).copied().unwrap_or(0.0);
    Some((
        (at(0) + at(1) + at(2) + at(5) + at(6)) / hz,
        (at(3) + at(4)) / hz,
    ))
}

fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// CPU seconds (user+sys) the simulated instances have spent: each one's sshd and the
/// sessions it reaped (logins, and the commands and modules run through them).
fn hosts_cpu(hosts: &[SimHost]) -> f64 {
    hosts
        .iter()
        .filter_map(|h| proc_stat(h.sshd_pid()? as i32))
        .map(|s| s.own + s.reaped)
        .sum()
}

/// CPU seconds (user+sys) of every child this process has reaped so far, and of theirs.
fn reaped_children_cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let r = unsafe {
        let mut r: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_CHILDREN, &mut r), 0);
        r
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(r.ru_utime) + secs(r.ru_stime)
}

/// Processes named one of `names` whose parent is this process although it never started
/// them: orphans handed to it as the child subreaper (ssh ControlPersist masters detach with
/// daemon(3) from whatever started them).
fn adopted(names: &[&str]) -> Vec<(i32, ProcStat)> {
    let me = std::process::id() as i32;
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, proc_stat(pid)?)))
        .filter(|(_, s)| s.ppid == me && names.contains(&s.comm.as_str()))
        .collect()
}

/// Reaps the adopted zombies named one of `names`, except those in `keep`.
fn reap_adopted(names: &[&str], keep: &BTreeSet<i32>) {
    for (pid, s) in adopted(names) {
        if s.state == 'Z' && !keep.contains(&pid) {
            let mut status = 0;
            // SAFETY: waitpid on one exited process that this process adopted.
            unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        }
    }
}

/// Whether `pid` (a child) has exited, leaving it unreaped (waitid WNOWAIT), so that its
/// zombie's /proc stat still tells its own CPU.
fn exited_unreaped(pid: i32) -> bool {
    // SAFETY: waitid fills the siginfo it is given; WNOWAIT leaves the child unreaped.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        assert_eq!(
            libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags),
            0
        );
        info.si_pid() == pid
    }
}

/// A `provision daemon` started for a row (JSON logs), as production runs it.
struct Daemon {
    child: std::process::Child,
    log: PathBuf,
    /// Epoch seconds at the spawn.
    started: f64,
    /// RUSAGE_CHILDREN before the spawn.
    cpu_before: f64,
}

/// What a stopped daemon cost and said.
struct MeasuredRun {
    code: i32,
    log: String,
    /// Epoch seconds at the spawn.
    started: f64,
    /// CPU seconds of the daemon process itself.
    daemon_cpu: f64,
    /// CPU seconds of the daemon and everything it waited for (RUSAGE_CHILDREN delta).
    tree_cpu: f64,
}

impl Daemon {
    /// Starts `provision daemon` and waits (bounded) until it polls the queue: its first
    /// ReceiveMessage, as the emulator counts provision's calls.
    fn start(p: &Provision, emu: &common::Emulator) -> Daemon {
        let log = p
            .dir
            .join(format!("bench-daemon-{}.log", fastrand::u32(..)));
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let cpu_before = reaped_children_cpu();
        let child = p
            .command(&["--log-format", "json", "daemon"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            log,
            started,
            cpu_before,
        };
        let t0 = std::time::Instant::now();
        while !emu.provision_calls().contains_key("sqs:ReceiveMessage") {
            d.check_alive();
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "provision daemon did not poll the queue within 60 s\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn check_alive(&self) {
        assert!(
            !exited_unreaped(self.child.id() as i32),
            "provision daemon exited\n{}",
            self.log()
        );
    }

    /// SIGTERM, then its exit awaited without reaping (bounded: 60 s), so that the zombie's
    /// /proc stat still tells the daemon's own CPU; then it is reaped, which adds it and its
    /// descendants to RUSAGE_CHILDREN.
    fn stop_measured(mut self) -> MeasuredRun {
        let pid = self.child.id() as i32;
        // SAFETY: kill(2) on our own, unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = std::time::Instant::now();
        while !exited_unreaped(pid) {
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("provision daemon did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let daemon_cpu = proc_stat(pid).expect("the exited daemon's /proc stat").own;
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        MeasuredRun {
            code,
            log: self.log(),
            started: self.started,
            daemon_cpu,
            tree_cpu: reaped_children_cpu() - self.cpu_before,
        }
    }
}

/// One row of the benchmark table.
struct Row {
    name: String,
    forks: usize,
    /// ansible-playbook runs.
    runs: usize,
    /// Plain: ansible-playbook start -> exit. Provision: first launch message -> last
    /// completed hook (emulator clock).
    wall: f64,
    /// Provision only: daemon start -> last completed hook (the daemon polls before the
    /// burst, so this is the wall and the daemon's lead).
    daemon_to_last: Option<f64>,
    /// CPU seconds (user+sys) of the whole tree (see bench_ansible_runners).
    cpu: f64,
    /// Provision only: of that, the daemon process itself.
    daemon_cpu: Option<f64>,
    /// Provision only: GetConsoleOutput calls provision made (one per instance when every
    /// instance's keys were registered before provision first asked for them).
    console_reads: Option<u64>,
    /// Provision only: each instance's moments (see [`MOMENTS`]).
    timeline: BTreeMap<String, [Option<f64>; 10]>,
    /// The whole machine during the wall: busy CPU-seconds, and the idle share of the cores.
    machine: Option<(f64, f64)>,
    /// Provision only: the emulator's CPU-seconds from the scale-out to the last completed
    /// hook (part of `machine`).
    emulator_cpu: Option<f64>,
    /// The simulated instances' CPU-seconds for the row (their sshd and its sessions,
    /// reaped once the row's connections closed).
    hosts_cpu: f64,
}

/// ssh ControlPersist masters that detached from a finished run, and so became this
/// process's children: their CPU (reaped ones through RUSAGE_CHILDREN, live ones from /proc),
/// `earlier` (those of an earlier row) left out.
fn masters_cpu(earlier: &BTreeSet<i32>) -> f64 {
    let before = reaped_children_cpu();
    reap_adopted(&["ssh"], earlier);
    let live: f64 = adopted(&["ssh"])
        .into_iter()
        .filter(|(pid, s)| s.state != 'Z' && !earlier.contains(pid))
        .map(|(_, s)| s.own + s.reaped)
        .sum();
    reaped_children_cpu() - before + live
}

/// Ends what a row left (idle ssh masters: asked to exit, then reaped), bounded, so the
/// next row starts clean. Not counted.
fn settle(control_dirs: &[&Path]) {
    for dir in control_dirs {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let _ = common::output_within(
                std::process::Command::new("ssh")
                    .arg("-o")
                    .arg(format!("ControlPath={}", e.path().display()))
                    .args(["-O", "exit", "x"]),
                Duration::from_secs(5),
            );
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        reap_adopted(&["ssh", "sshd"], &BTreeSet::new());
        if adopted(&["ssh"]).is_empty() || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Mitogen for Ansible's strategy plugins in the venv scripts/setup made.
fn venv_mitogen_strategy_dir() -> PathBuf {
    let lib = root().join(".venv/lib");
    std::fs::read_dir(&lib)
        .unwrap()
        .flatten()
        .map(|e| {
            e.path()
                .join("site-packages/ansible_mitogen/plugins/strategy")
        })
        .find(|p| p.join("mitogen_linear.py").is_file())
        .expect("mitogen in .venv (scripts/setup installs it)")
}

/// Plain `ansible-playbook` over the same hosts (marker.yml, a hand-made inventory with
/// strict host key checking), measured: wall from spawn to exit, CPU of its tree.
fn bench_plain(
    machine: &MachineCpu,
    net: &HostNet,
    hosts: &[SimHost],
    name: &str,
    env: &[(&str, String)],
    forks: usize,
) -> Row {
    let names: Vec<String> = (0..hosts.len()).map(|i| format!("h{i}")).collect();
    let pairs: Vec<(&str, &SimHost)> = names.iter().map(String::as_str).zip(hosts).collect();
    let refs: Vec<&SimHost> = hosts.iter().collect();
    let known = net.known_hosts(&refs);
    let inventory = net.inventory(&pairs, &known, &[("role", "api")]);
    for h in hosts {
        let _ = std::fs::remove_file(h.dir().join("marker"));
    }
    let mut c = net.ansible_playbook();
    c.env("ANSIBLE_FORKS", forks.to_string())
        .arg("-i")
        .arg(&inventory)
        .arg(root().join("tests/playbooks/marker.yml"));
    for (k, v) in env {
        c.env(k, v);
    }
    let earlier: BTreeSet<i32> = adopted(&["ssh"]).into_iter().map(|(pid, _)| pid).collect();
    let cpu_before = reaped_children_cpu();
    let hosts_before = hosts_cpu(hosts);
    let t0 = std::time::Instant::now();
    let from = epoch_now();
    let out = common::output_within(&mut c, Duration::from_secs(600));
    let wall = t0.elapsed().as_secs_f64();
    let machine = machine.between(from, from + wall);
    let tree = reaped_children_cpu() - cpu_before;
    let cpu = tree + masters_cpu(&earlier);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats = common::hosts::ansible_stats(&stdout);
    assert_eq!(stats.len(), hosts.len(), "{name}: {stats:?}");
    for h in hosts {
        assert!(
            h.dir().join("marker").exists(),
            "{name}: no marker on {}",
            h.ip()
        );
    }
    settle(&[&net.dir().join("cp")]);
    let hosts_cpu = hosts_cpu(hosts) - hosts_before;
    Row {
        name: name.to_string(),
        forks,
        runs: 1,
        wall,
        daemon_to_last: None,
        cpu,
        daemon_cpu: None,
        console_reads: None,
        timeline: BTreeMap::new(),
        machine,
        emulator_cpu: None,
        hosts_cpu,
    }
}

/// A fresh emulator and group on `net`, whose instances get the addresses of `hosts` (the
/// same sshd serve every row), and one `provision daemon` with `ansible_extra` in
/// `[ansible]`, already polling when the group scales out (as in production); checks every
/// hook CONTINUEd and every marker is written.
///
/// The order: the hosts' keys are registered in the emulator's console by private IP (the
/// instances' ids exist only once the group has scaled, and a registration made after the
/// scale loses the race against the daemon: a read that finds no keys backs off 2 s); the
/// daemon is started and waits for its first ReceiveMessage; then the group scales out
/// (the hooks fire: the wall starts). So every instance shows its keys from its first
/// GetConsoleOutput, as the old bench (keys registered before the worker started) and
/// plain Mitogen (known_hosts given) have them: `console_reads` counts provision's
/// GetConsoleOutput calls (the timeline prints it; one per instance: none came early).
async fn bench_provision(
    machine: &MachineCpu,
    net: &HostNet,
    hosts: &[SimHost],
    group: &str,
    name: &str,
    ansible_extra: &str,
    forks: usize,
) -> Row {
    let n = hosts.len();
    let w = World::on(net.clone(), group, 600, Some(r#"{"role":"api"}"#)).await;
    let p = w.provision_with(MARKER_LAYER, ansible_extra);
    // BENCH_IN_FLIGHT=64: queue.max_in_flight (default 64).
    if let Ok(v) = std::env::var("BENCH_IN_FLIGHT") {
        let n: i64 = v.parse().expect("BENCH_IN_FLIGHT must be a number");
        p.set("queue.max_in_flight", n);
    }

    for host in hosts {
        w.emu.control(
            "POST",
            &format!("/_emulator/console/address/{}", host.ip()),
            Some(json!({ "host_keys": [host.public_key_line()] })),
        );
    }

    let earlier: BTreeSet<i32> = adopted(&["ssh"]).into_iter().map(|(pid, _)| pid).collect();
    let daemon = Daemon::start(&p, &w.emu);
    let emu_cpu = || proc_stat(w.emu.pid() as i32).map_or(0.0, |s| s.own);
    let emu_before = emu_cpu();
    let hosts_before = hosts_cpu(hosts);
    w.aws.scale(group, n as i32).await;
    let ids = instance_hosts(&w, group, hosts).await;
    assert_eq!(ids.len(), n);
    let t0 = std::time::Instant::now();
    while w.emu.finished_actions().len() < n {
        daemon.check_alive();
        assert!(
            t0.elapsed() < Duration::from_secs(900),
            "{name}: the hooks were not all completed within 900 s\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let emulator_cpu = emu_cpu() - emu_before;
    let run = daemon.stop_measured();
    let masters = masters_cpu(&earlier);
    if let Some(dir) = std::env::var_os("BENCH_KEEP_LOGS") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{group}-daemon.log")), &run.log).unwrap();
        for l in ansible_logs(&p) {
            std::fs::copy(&l, dir.join(format!("{group}-ansible.log"))).unwrap();
        }
    }
    assert_eq!(run.code, 0, "{}", run.log);
    let actions = w.emu.actions();
    let results = results_by_instance(&w.emu);
    for (id, host) in &ids {
        let r = results
            .get(id)
            .unwrap_or_else(|| panic!("{id} unfinished\n{}", run.log));
        assert_eq!(r["result"], "CONTINUE", "{id}: {}", run_error(&p, id));
        let marker = std::fs::read_to_string(w.dir(id).join("marker")).unwrap();
        assert_eq!(
            marker,
            format!(
                "host={id}\nrole=api\nserver={}\nclient={}\n",
                host.ip(),
                w.net.gateway()
            ),
            "{id}"
        );
    }
    let console_reads = w
        .emu
        .provision_calls()
        .get("ec2:GetConsoleOutput")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let time = |a: &Value, k: &str| a[k].as_f64().unwrap_or_else(|| panic!("{k} of {a}"));
    let first = actions
        .iter()
        .map(|a| time(a, "created"))
        .fold(f64::INFINITY, f64::min);
    let last = results
        .values()
        .map(|a| time(a, "finished"))
        .fold(0.0, f64::max);
    let row = Row {
        name: name.to_string(),
        forks,
        runs: ansible_logs(&p).len(),
        wall: last - first,
        daemon_to_last: Some(last - run.started),
        cpu: run.tree_cpu + masters,
        daemon_cpu: Some(run.daemon_cpu),
        console_reads: Some(console_reads),
        timeline: timeline(&run.log, &p.history(), &actions),
        machine: machine.between(first, last),
        emulator_cpu: Some(emulator_cpu),
        hosts_cpu: 0.0,
    };
    drop(p);
    drop(w);
    settle(&[]);
    Row {
        hosts_cpu: hosts_cpu(hosts) - hosts_before,
        ..row
    }
}

/// Each instance of the group that just scaled out, with the simulated host at its address
/// (one DescribeInstances for every address), and a directory for its marker (made at once:
/// the playbook writes it seconds later, after the reach).
async fn instance_hosts<'h>(
    w: &World,
    group: &str,
    hosts: &'h [SimHost],
) -> Vec<(String, &'h SimHost)> {
    let ids: Vec<String> = w
        .aws
        .instances(group)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let described = w
        .aws
        .ec2
        .describe_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await
        .unwrap();
    let ips: BTreeMap<String, String> = described
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| {
            Some((
                i.instance_id()?.to_string(),
                i.private_ip_address()?.to_string(),
            ))
        })
        .collect();
    let mut out = Vec::new();
    for id in ids {
        let ip = &ips[&id];
        let host = hosts
            .iter()
            .find(|h| h.ip().to_string() == *ip)
            .unwrap_or_else(|| panic!("{ip}: no simulated host there"));
        std::fs::create_dir_all(w.dir(&id)).unwrap();
        out.push((id, host));
    }
    out
}

/// N instances (env BENCH_INSTANCES, default 20), each a simulated host (its own sshd in a
/// network namespace), configured by marker.yml (3 tasks: command, assert, copy), in one
/// sitting on the same hosts: plain `ansible-playbook` with Ansible's defaults (linear, no
/// pipelining), with pipelining, and with Mitogen for Ansible; then provision (a burst of
/// launches, one `provision daemon` already polling when the group scales out) under each runner: `linear` without and with
/// pipelining, and the default (`mitogen`). Every row uses provision's default forks
/// (env BENCH_FORKS="5,20" adds provision-mitogen rows with those forks). Prints wall time,
/// CPU seconds and their ratio to plain Mitogen; asserts only that every host was
/// configured.
///
/// CPU is user+sys of the whole tree on this (ops) side: ansible-playbook, its forks,
/// Mitogen's multiplexers, ssh clients, ssh ControlPersist masters that detached (adopted by
/// this process as child subreaper; live ones read from /proc), and for provision the
/// daemon itself (its CPU from the start to its stop after the last hook, idle polls
/// included). Not counted: the simulated instances' sshd and what runs through it (the
/// instances' cost), the emulator. Run it alone: RUSAGE_CHILDREN is process-wide.
async fn bench_ansible_runners() {
    // SAFETY: prctl with integer arguments only.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) },
        0
    );
    let n: usize = std::env::var("BENCH_INSTANCES")
        .ok()
        .map(|v| v.parse().expect("BENCH_INSTANCES must be a number"))
        .unwrap_or(20);
    // The emulator numbers a subnet's instances from .4; the harness keeps .150 and up.
    assert!(
        (1..=140).contains(&n),
        "BENCH_INSTANCES must be 1..=140, not {n}"
    );
    let extra_forks: Vec<usize> = std::env::var("BENCH_FORKS")
        .ok()
        .map(|v| {
            v.split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    s.trim()
                        .parse()
                        .expect("BENCH_FORKS: numbers, comma-separated")
                })
                .collect()
        })
        .unwrap_or_default();
    let forks = provision::step::ansible::DEFAULT_FORKS.min(n);

    // The hosts, at the addresses the emulator will give the instances (.4 upwards).
    let net = HostNet::new();
    let hosts: Vec<SimHost> = {
        let probe = World::on(net.clone(), "web-bench-ips", 600, None).await;
        probe.aws.scale("web-bench-ips", n as i32).await;
        let mut ips = Vec::new();
        for (id, _) in probe.aws.instances("web-bench-ips").await {
            ips.push(probe.aws.private_ip(&id).await);
        }
        ips.iter().map(|ip| net.host(ip)).collect()
    };

    let mitogen_env = vec![
        ("ANSIBLE_STRATEGY", "mitogen_linear".to_string()),
        (
            "ANSIBLE_STRATEGY_PLUGINS",
            path_str(&venv_mitogen_strategy_dir()).to_string(),
        ),
    ];
    // BENCH_ROWS="mitogen,pipelining": only the rows whose name contains one of those.
    let wanted = |name: &str| {
        std::env::var("BENCH_ROWS")
            .map(|v| v.split(',').any(|w| name.contains(w.trim())))
            .unwrap_or(true)
    };
    let plain: [(&str, Vec<(&str, String)>); 3] = [
        ("plain, defaults", vec![("ANSIBLE_PIPELINING", "0".into())]),
        (
            "plain, pipelining",
            vec![("ANSIBLE_PIPELINING", "1".into())],
        ),
        ("plain, mitogen", mitogen_env),
    ];
    let mut runners = vec![
        (
            "provision, linear".to_string(),
            "strategy = \"linear\"\npipelining = false".to_string(),
            forks,
        ),
        (
            "provision, linear+pipelining".to_string(),
            "strategy = \"linear\"\npipelining = true".to_string(),
            forks,
        ),
        (
            "provision, mitogen (default)".to_string(),
            String::new(),
            forks,
        ),
    ];
    for f in &extra_forks {
        runners.push((
            format!("provision, mitogen, forks {f}"),
            format!("forks = {f}"),
            *f,
        ));
    }
    // BENCH_REPEAT=3: every row that many times, in rounds (one sitting); medians shown.
    let repeat: usize = std::env::var("BENCH_REPEAT")
        .ok()
        .map(|v| v.parse().expect("BENCH_REPEAT must be a number"))
        .unwrap_or(1)
        .max(1);
    let mut rows = Vec::new();
    let machine = MachineCpu::start();
    for round in 0..repeat {
        for (name, env) in &plain {
            if wanted(name) {
                rows.push(bench_plain(&machine, &net, &hosts, name, env, forks));
            }
        }
        for (i, (name, extra, f)) in runners.iter().enumerate() {
            if wanted(name) {
                let group = format!("web-bench-{i}-{round}");
                rows.push(bench_provision(&machine, &net, &hosts, &group, name, extra, *f).await);
            }
        }
    }
    drop(machine);
    report(n, repeat, &rows);
    drop(hosts);
    drop(net);
}

/// A row's name and its rounds' figures, medians first.
struct Summary<'a> {
    name: &'a str,
    rows: Vec<&'a Row>,
}

impl Summary<'_> {
    fn wall(&self) -> f64 {
        median(&self.rows.iter().map(|r| r.wall).collect::<Vec<_>>())
    }
    fn cpu(&self) -> f64 {
        median(&self.rows.iter().map(|r| r.cpu).collect::<Vec<_>>())
    }
    fn opt(&self, f: impl Fn(&Row) -> Option<f64>) -> Option<f64> {
        let v: Vec<f64> = self.rows.iter().filter_map(|r| f(r)).collect();
        (!v.is_empty()).then(|| median(&v))
    }
}

fn summaries(rows: &[Row]) -> Vec<Summary<'_>> {
    let mut out: Vec<Summary<'_>> = Vec::new();
    for r in rows {
        match out.iter_mut().find(|s| s.name == r.name) {
            Some(s) => s.rows.push(r),
            None => out.push(Summary {
                name: &r.name,
                rows: vec![r],
            }),
        }
    }
    out
}

/// Prints the table (medians over the rounds, each round's figures after), the timelines
/// of provision's rows, and the JSON figures for scripts/bench.
fn report(n: usize, repeat: usize, rows: &[Row]) {
    let sums = summaries(rows);
    let base = sums
        .iter()
        .find(|s| s.name == "plain, mitogen")
        .map(|s| (s.wall(), s.cpu()))
        .unwrap_or((f64::NAN, f64::NAN));
    for r in rows.iter().filter(|r| !r.timeline.is_empty()) {
        print_timeline(r);
    }
    println!(
        "\n== ansible: {n} simulated instances, marker.yml (3 tasks), the same hosts for every row, median of {repeat}"
    );
    println!(
        "{:<32}{:>6}{:>6}{:>9}{:>10}{:>8}{:>8}{:>11}{:>10}{:>10}{:>6}{:>8}{:>8}   rounds (wall/CPU)",
        "runner",
        "forks",
        "runs",
        "wall",
        "(dmn->)",
        "CPU",
        "(dmn)",
        "wall/mtg",
        "CPU/mtg",
        "machine",
        "idle",
        "(emu)",
        "hosts"
    );
    let secs = |v: Option<f64>| v.map(|w| format!("{w:.2}s")).unwrap_or_else(|| "-".into());
    for s in &sums {
        let r0 = s.rows[0];
        let rounds: Vec<String> = s
            .rows
            .iter()
            .map(|r| format!("{:.2}/{:.2}", r.wall, r.cpu))
            .collect();
        let idle = s
            .opt(|r| r.machine.map(|m| m.1))
            .map(|i| format!("{:.0}%", i * 100.0))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<32}{:>6}{:>6}{:>8.2}s{:>10}{:>7.2}s{:>8}{:>10.2}x{:>9.2}x{:>10}{:>6}{:>8}{:>8}   {}",
            s.name,
            r0.forks,
            r0.runs,
            s.wall(),
            secs(s.opt(|r| r.daemon_to_last)),
            s.cpu(),
            secs(s.opt(|r| r.daemon_cpu)),
            s.wall() / base.0,
            s.cpu() / base.1,
            secs(s.opt(|r| r.machine.map(|m| m.0))),
            idle,
            secs(s.opt(|r| r.emulator_cpu)),
            secs(s.opt(|r| Some(r.hosts_cpu))),
            rounds.join(" "),
        );
    }
    let (wr, cr) = sums
        .iter()
        .find(|s| s.name == "provision, mitogen (default)")
        .map(|d| (d.wall() / base.0, d.cpu() / base.1))
        .unwrap_or((f64::NAN, f64::NAN));
    println!(
        "provision's default runner / plain Mitogen: wall {wr:.2}x, CPU {cr:.2}x (target <= 1.1x: {})",
        if wr <= 1.1 && cr <= 1.1 { "met" } else { "NOT met" }
    );
    let binary = std::env::var("PROVISION_BIN")
        .map(|b| format!("{b} (PROVISION_BIN)"))
        .unwrap_or_else(|_| "the debug build (PROVISION_BIN unset)".into());
    println!(
        "wall: plain = ansible-playbook start to exit; provision = first launch message to last \
         completed hook (emulator clock; the hosts run before the burst, and a `provision daemon` \
         already polls the queue when the group scales out, as in production), dmn-> = daemon \
         start to last completed hook (the wall plus the daemon's lead). CPU (user+sys) of the \
         ops side's whole tree: ansible-playbook, its forks, Mitogen's multiplexers, ssh clients \
         and detached ControlPersist masters, and the provision daemon from its start to its \
         stop ((dmn): the daemon alone). provision: {binary}. Not counted: the instances' sshd \
         and the modules run through it, the emulator. machine = the whole machine's busy \
         CPU-seconds during the wall (every process: the instances' sshd and modules, the \
         emulator, the ops side), idle = the share of the cores left idle then (/proc/stat): a \
         row near 0% idle is bound by these cores, which the instances and the emulator share \
         with the ops side here and do not in production; (emu) = of that, the emulator's, \
         from the scale-out to the last completion; hosts = the simulated instances' own \
         CPU-seconds (their sshd and everything run through it). The machine is shared: run it twice \
         to see the noise."
    );
    let json = json!({
        "ansible_instances": n,
        "ansible_repeat": repeat,
        "ansible_rows": sums.iter().map(|s| json!({
            "runner": s.name, "forks": s.rows[0].forks, "runs": s.rows[0].runs,
            "wall_seconds": round2(s.wall()), "cpu_seconds": round2(s.cpu()),
            "machine_busy_seconds": s.opt(|r| r.machine.map(|m| m.0)).map(round2),
            "machine_idle_share": s.opt(|r| r.machine.map(|m| m.1)).map(round2),
            "emulator_cpu_seconds": s.opt(|r| r.emulator_cpu).map(round2),
            "hosts_cpu_seconds": s.opt(|r| Some(r.hosts_cpu)).map(round2),
        })).collect::<Vec<_>>(),
        "ansible_default_wall_ratio_to_plain_mitogen": round2(wr),
        "ansible_default_cpu_ratio_to_plain_mitogen": round2(cr),
    });
    println!("BENCH_JSON {json}");
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The moments of one instance's launch, in order, each where it is cheapest and honest to
/// read: the emulator (the hook fired, the hook completed), the history (received,
/// verified: the first step's start, the step's end) and the daemon's JSON log lines
/// (keys, SSH, cloud-init, the run that took it).
const MOMENTS: [&str; 10] = [
    "hook fired",
    "received",
    "verified",
    "host keys",
    "sshd up",
    "cloud-init done",
    "batch started",
    "playbook ended",
    "step ended",
    "hook completed",
];

/// Epoch seconds of an RFC 3339 UTC timestamp as tracing writes it
/// (`2026-12-02T02:11:36.123456Z`).
fn epoch_of(ts: &str) -> Option<f64> {
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let s: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// Per instance, the epoch seconds of each of [`MOMENTS`] that was seen.
fn timeline(
    log: &str,
    history: &[provision::store::RunRow],
    actions: &[Value],
) -> BTreeMap<String, [Option<f64>; 10]> {
    let mut t: BTreeMap<String, [Option<f64>; 10]> = BTreeMap::new();
    for a in actions {
        let (Some(id), Some(created)) = (a["instance_id"].as_str(), a["created"].as_f64()) else {
            continue;
        };
        let e = t.entry(id.to_string()).or_default();
        e[0] = Some(created);
        e[9] = a["finished"].as_f64();
    }
    for r in history {
        let Some(e) = r.instance_id.as_ref().and_then(|id| t.get_mut(id)) else {
            continue;
        };
        e[1] = Some(r.received_at as f64 / 1000.0);
        if let Some(s) = r.steps.first() {
            e[2] = Some(s.started_at as f64 / 1000.0);
            e[8] = s.finished_at.map(|f| f as f64 / 1000.0);
        }
    }
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(at) = v["timestamp"].as_str().and_then(epoch_of) else {
            continue;
        };
        let spans = v["spans"].as_array().cloned().unwrap_or_default();
        let own = spans.iter().find_map(|s| s["instance_id"].as_str());
        let slot = match v["message"].as_str().unwrap_or("") {
            "host keys taken from the console output" => 3,
            "SSH is up" => 4,
            "cloud-init has finished" => 5,
            "running ansible-playbook" => 6,
            "ansible-playbook finished" => 7,
            _ => continue,
        };
        // The run's lines name their instances; the others are in the instance's span.
        let ids: Vec<String> = match own {
            Some(id) => vec![id.to_string()],
            None => t
                .keys()
                .filter(|id| {
                    v["instances"]
                        .as_str()
                        .is_some_and(|l| l.contains(id.as_str()))
                })
                .cloned()
                .collect(),
        };
        for id in ids {
            if let Some(e) = t.get_mut(&id) {
                // The first reach and batch; the last playbook end (a follow-up run's).
                if slot == 7 || e[slot].is_none() {
                    e[slot] = Some(at);
                }
            }
        }
    }
    t
}

/// Prints, for each pair of consecutive moments, the median and worst gap over the
/// instances that have both.
fn print_timeline(r: &Row) {
    let t = &r.timeline;
    println!("\n-- timeline of {}: {} instances", r.name, t.len());
    if let Some(reads) = r.console_reads {
        let verdict = if reads as usize <= t.len() {
            "one per instance: every first read found the keys the bench registered"
        } else {
            "more than one per instance: a read found no keys yet and waited (2 s or more, against provision)"
        };
        println!("GetConsoleOutput calls by provision: {reads} ({verdict})");
    }
    println!(
        "{:<38}{:>6}{:>10}{:>10}   (from the hook fired: median, worst)",
        "from -> to", "n", "median", "worst"
    );
    let first = t
        .values()
        .filter_map(|m| m[0])
        .fold(f64::INFINITY, f64::min);
    let mut prev = 0;
    for i in 1..MOMENTS.len() {
        let gaps: Vec<f64> = t.values().filter_map(|m| Some(m[i]? - m[prev]?)).collect();
        if gaps.is_empty() {
            continue;
        }
        let since: Vec<f64> = t.values().filter_map(|m| Some(m[i]? - first)).collect();
        println!(
            "{:<38}{:>6}{:>9.2}s{:>9.2}s   {:>7.2}s {:>7.2}s",
            format!("{} -> {}", MOMENTS[prev], MOMENTS[i]),
            gaps.len(),
            median(&gaps),
            gaps.iter().cloned().fold(f64::MIN, f64::max),
            median(&since),
            since.iter().cloned().fold(f64::MIN, f64::max),
        );
        prev = i;
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}
