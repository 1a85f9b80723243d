//! The `ansible` and `ssh` steps against simulated instances: a real sshd per instance in a
//! network namespace at the instance's private IP, host keys published through the
//! emulator's GetConsoleOutput, real ansible-playbook, the real `provision` binary.
//! Needs root (network namespaces); the suite runs as root in CI.

use crate::common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use common::hosts::{ansible_playbook_path, HostNet, SimHost};
use common::sim::{ansible_logs, results_by_instance, run_error, SimWorld as World, MARKER_LAYER};
use common::{path_str, root, Provision};

const LAUNCH: &str = "autoscaling:EC2_INSTANCE_LAUNCHING";
const TERMINATE: &str = "autoscaling:EC2_INSTANCE_TERMINATING";
const VAULT_PASSWORD: &str = "correct horse battery staple";

/// Runs the daemon until every one of `ids` has its lifecycle action finished (or, for an
/// action the emulator does not know, found already finished), then stops it. (An
/// ABANDONed launch gets a replacement instance without a simulated host, so a drain-once
/// worker would not finish.) Returns the daemon's log.
async fn daemon_until_finished(w: &World, p: &Provision, ids: &[&str]) -> String {
    let mut d = p.daemon();
    let emu = &w.emu;
    common::eventually(
        "the instances' actions to finish",
        Duration::from_secs(150),
        || async {
            let done = results_by_instance(emu);
            let history = p.history();
            let finished = |id: &str| {
                done.contains_key(id)
                    || history.iter().any(|r| {
                        r.instance_id.as_deref() == Some(id)
                            && (r.hook_result.map(|c| c.as_str()) == Some("already-finished")
                                || r.outcome.as_str() == "rejected")
                    })
            };
            ids.iter().all(|id| finished(id)).then_some(())
        },
    )
    .await;
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(30)), 0, "{}", d.log());
    d.log()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_five_shares_one_ansible_run_and_every_host_gets_its_marker() {
    let w = World::new("web-burst", 300, Some(r#"{"role":"api"}"#)).await;
    let hosts = w.launch("web-burst", 5, |net, ip| net.host(ip)).await;
    let p = w.provision(MARKER_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");

    let results = results_by_instance(&w.emu);
    assert_eq!(results.len(), 5, "{results:?}\n{log}");
    for (id, host) in &hosts {
        assert_eq!(
            results[id]["result"],
            "CONTINUE",
            "{id}: {}",
            run_error(&p, id)
        );
        let marker = std::fs::read_to_string(w.dir(id).join("marker")).unwrap();
        // The play reached this instance's own sshd, at its own address.
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
    // The playbook ran over the login that verified each host (its control master): each
    // sshd accepted one login, and the masters were closed with the run.
    for (id, host) in &hosts {
        let log = host.log();
        assert_eq!(log.matches("Accepted publickey").count(), 1, "{id}: {log}");
    }
    let ids: Vec<&str> = hosts.iter().map(|(id, _)| id.as_str()).collect();
    common::eventually(
        "the control masters to exit",
        Duration::from_secs(10),
        || async { masters_of(&ids).is_empty().then_some(()) },
    )
    .await;
    let logs = ansible_logs(&p);
    assert_eq!(
        logs.len(),
        1,
        "one ansible-playbook run for the burst: {logs:?}"
    );
    let text = std::fs::read_to_string(&logs[0]).unwrap();
    for (id, _) in &hosts {
        assert!(text.contains(id.as_str()), "{id} not in the run's log");
    }
    // The default runner: Mitogen for Ansible.
    assert!(text.contains("\nstrategy: mitogen\n"), "{text}");
    assert!(
        text.contains("Use of strategy plugins not included in ansible.builtin"),
        "a third-party strategy was loaded: {text}"
    );
    // Hosts' keys came from the console: one GetConsoleOutput per instance, no more; the
    // instances were looked up together, not one by one (how many lookups a burst takes
    // depends on how its messages spread over receives: 5 receives here, and the run's early
    // start shares the cores with them).
    let calls = w.emu.provision_calls();
    assert_eq!(calls["ec2:GetConsoleOutput"], 5, "{calls:?}");
    assert!(
        calls["ec2:DescribeInstances"].as_u64().unwrap() < 5,
        "{calls:?}"
    );
}

/// Without a kept login (the control socket directory is not usable), Ansible's `ssh`
/// (`linear`: Mitogen keeps no master past its run) logs in to each host itself, and its
/// `ControlPersist` masters, in the run's own directory, would outlive the run by a
/// minute: they are closed with the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_kept_login_ansibles_own_masters_are_closed_with_the_run() {
    let w = World::new("web-own", 300, Some(r#"{"role":"api"}"#)).await;
    let hosts = w.launch("web-own", 2, |net, ip| net.host(ip)).await;
    let mut p = w.provision(MARKER_LAYER);
    p.set("ansible.strategy", "linear");
    let runtime = p.dir.join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    // `mux` taken by a file: no socket directory, so no login is kept for the run.
    std::fs::write(runtime.join("mux"), "not a directory").unwrap();
    p.set_env("RUNTIME_DIRECTORY", path_str(&runtime));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let results = results_by_instance(&w.emu);
    for (id, host) in &hosts {
        assert_eq!(results[id]["result"], "CONTINUE", "{}", run_error(&p, id));
        // The reach's login and Ansible's own.
        let sshd = host.log();
        assert_eq!(
            sshd.matches("Accepted publickey").count(),
            2,
            "{id}: {sshd}"
        );
    }
    let runtime = runtime.display().to_string();
    let own = || {
        ssh_processes()
            .into_iter()
            .filter(|c| c.starts_with("ssh: ") && c.contains("[mux]") && c.contains(&runtime))
            .collect::<Vec<_>>()
    };
    common::eventually(
        "Ansible's own control masters to exit",
        Duration::from_secs(10),
        || async { own().is_empty().then_some(()) },
    )
    .await;
}

/// The command lines of this machine's `ssh` processes.
fn ssh_processes() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.starts_with("ssh"))
        .collect()
}

/// ssh control masters (`ssh: <socket> [mux]`, as a master names itself) whose socket names
/// one of `ids`.
fn masters_of(ids: &[&str]) -> Vec<String> {
    ssh_processes()
        .into_iter()
        .filter(|c| c.starts_with("ssh: ") && c.contains("[mux]"))
        .filter(|c| ids.iter().any(|id| c.contains(id)))
        .collect()
}

/// Provision's reach of `id` (at `ip`) is over and its login kept: a control master for it
/// runs, and the login's own command (its first client, `ControlMaster=yes`) has ended.
fn login_kept(id: &str, ip: &str) -> bool {
    !masters_of(&[id]).is_empty()
        && !ssh_processes()
            .iter()
            .any(|c| c.contains("ControlMaster=yes") && c.contains(&format!(" {ip}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_host_is_abandoned_while_the_others_continue() {
    let w = World::new("web-fail", 300, None).await;
    let hosts = w.launch("web-fail", 3, |net, ip| net.host(ip)).await;
    let bad = hosts[1].0.clone();
    std::fs::write(w.dir(&bad).join("fail"), "").unwrap();
    let p = w.provision(
        r#"
[layers.web]
groups = ["web-*"]
launch = [ { ansible = "fail-on-flag.yml", vars = { sim_root = "SIM_ROOT" } } ]
"#,
    );
    let ids: Vec<&str> = hosts.iter().map(|(id, _)| id.as_str()).collect();
    daemon_until_finished(&w, &p, &ids).await;
    let results = results_by_instance(&w.emu);
    for (id, _) in &hosts {
        if *id == bad {
            assert_eq!(results[id]["result"], "ABANDON");
            let err = run_error(&p, id);
            assert!(err.contains("is flagged to fail"), "{err}");
            assert!(!w.dir(id).join("succeeded").exists());
        } else {
            assert_eq!(results[id]["result"], "CONTINUE", "{}", run_error(&p, id));
            assert!(w.dir(id).join("succeeded").exists());
        }
    }
    assert_eq!(ansible_logs(&p).len(), 1, "the three shared one run");
}

/// Three instances share one `ansible-playbook` run (held at a gate the test opens); one
/// of them leaves it: its action is completed by someone else while the run is under
/// way. Its next heartbeat finds the action gone, its step stops (recorded cancelled) and
/// provision completes nothing for it (`already-finished`: AWS kept the other party's
/// result); the run goes on for the others, which complete CONTINUE once the gate opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaving_a_shared_ansible_run_does_not_stop_the_others() {
    // A 9 s heartbeat timeout: beats every 3 s, so the leaver learns of it soon.
    let w = World::new("web-leave", 9, None).await;
    let hosts = w.launch("web-leave", 3, |net, ip| net.host(ip)).await;
    let p = w.provision(
        r#"
[layers.web]
groups = ["web-*"]
launch = [ { ansible = "gate.yml", vars = { sim_root = "SIM_ROOT" } } ]
"#,
    );
    let mut d = p.daemon();
    common::eventually(
        "the run to reach every host",
        Duration::from_secs(120),
        || async {
            hosts
                .iter()
                .all(|(id, _)| w.dir(id).join("started").exists())
                .then_some(())
        },
    )
    .await;
    let leaver = hosts[1].0.clone();
    let token = w
        .emu
        .actions()
        .into_iter()
        .find(|a| a["instance_id"] == leaver.as_str())
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    w.aws
        .asg
        .complete_lifecycle_action()
        .auto_scaling_group_name("web-leave")
        .lifecycle_hook_name("provision-launch")
        .lifecycle_action_token(&token)
        .lifecycle_action_result("CONTINUE")
        .send()
        .await
        .unwrap();
    let left = common::eventually(
        "the leaver's run to end",
        Duration::from_secs(60),
        || async {
            p.history().into_iter().find(|r| {
                r.instance_id.as_deref() == Some(leaver.as_str()) && r.hook_result.is_some()
            })
        },
    )
    .await;
    assert_eq!(
        left.hook_result.map(|c| c.as_str()),
        Some("already-finished"),
        "{left:?}\n{}",
        d.log()
    );
    assert_eq!(left.steps.len(), 1, "{left:?}");
    assert_eq!(left.steps[0].outcome.as_str(), "cancelled", "{left:?}");
    assert!(
        left.error
            .as_deref()
            .unwrap_or_default()
            .contains("the lifecycle action ended while this step ran"),
        "{left:?}"
    );
    // The others' run still waits at the gate (that it was not stopped shows below: they
    // succeed in that one run).
    for (id, _) in hosts.iter().filter(|(id, _)| *id != leaver) {
        assert!(!w.dir(id).join("succeeded").exists(), "{id}");
    }
    std::fs::write(w.sim_root.join("release"), "").unwrap();
    let others: Vec<&str> = hosts
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| *id != leaver)
        .collect();
    common::eventually(
        "the others' actions to finish",
        Duration::from_secs(120),
        || async {
            let done = results_by_instance(&w.emu);
            others.iter().all(|id| done.contains_key(*id)).then_some(())
        },
    )
    .await;
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(30)), 0, "{}", d.log());

    let results = results_by_instance(&w.emu);
    for id in &others {
        let a = &results[*id];
        assert_eq!(
            (&a["result"], &a["finished_by"]),
            (&json!("CONTINUE"), &json!("complete")),
            "{id}: {}",
            run_error(&p, id)
        );
        assert!(w.dir(id).join("succeeded").exists(), "{id}");
    }
    let a = &results[leaver.as_str()];
    assert_eq!(
        (&a["result"], &a["completions"]),
        (&json!("CONTINUE"), &json!(1)),
        "only the other party completed the leaver: {a}"
    );
    assert_eq!(ansible_logs(&p).len(), 1, "the three shared one run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_presenting_another_key_than_its_console_is_refused() {
    let w = World::new("web-mitm", 300, Some(r#"{"role":"api"}"#)).await;
    // The console lists the advertised key; the sshd at the address presents another.
    let hosts = w.launch("web-mitm", 1, |net, ip| net.impostor(ip)).await;
    let (id, host) = &hosts[0];
    assert!(host.is_impostor());
    let p = w.provision(MARKER_LAYER);
    daemon_until_finished(&w, &p, &[id]).await;
    let results = results_by_instance(&w.emu);
    assert_eq!(results[id]["result"], "ABANDON");
    let err = run_error(&p, id);
    assert!(
        err.contains("host key refused") && err.contains("console output"),
        "{err}"
    );
    assert!(!w.dir(id).join("marker").exists());
    assert!(ansible_logs(&p).is_empty(), "ansible never ran against it");
    // And the refused key was never trusted: its known_hosts entry went with the ABANDON.
    assert!(!p.dir.join("known_hosts.d").join(id).exists());
}

/// The window a man in the middle would use: the host presents its console key while
/// provision reaches it, then another sshd takes its place before the playbook connects.
/// Under each runner, Ansible's own connection must use the instance's verified
/// known_hosts file with strict checking, and refuse. Every ssh client started meanwhile is
/// looked at too: each names that file and `StrictHostKeyChecking yes`.
async fn impostor_swapped_in_after_the_reach_is_refused(
    group: &str,
    runner: &str,
    hostile_cfg: bool,
) {
    let w = World::new(group, 300, Some(r#"{"role":"api"}"#)).await;
    let hosts = w.launch(group, 1, |net, ip| net.host(ip)).await;
    let (id, host) = (&hosts[0].0, &hosts[0].1);
    // A long quiet period: the run starts well after the swap below.
    let p = w.provision_with(
        MARKER_LAYER,
        &format!("{runner}\nbatch_quiet = \"6s\"\nbatch_window = \"20s\""),
    );
    if hostile_cfg {
        // The playbooks beside an ansible.cfg that turns every host key check off.
        let books = w.emu.dir.path().join("playbooks");
        std::fs::create_dir_all(&books).unwrap();
        for e in std::fs::read_dir(root().join("tests/playbooks"))
            .unwrap()
            .flatten()
        {
            if e.path().is_file() {
                std::fs::copy(e.path(), books.join(e.file_name())).unwrap();
            }
        }
        std::fs::write(
            books.join("ansible.cfg"),
            "[defaults]\nhost_key_checking = False\n\n[ssh_connection]\n\
             ssh_args = -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null\n",
        )
        .unwrap();
        p.set("ansible.playbook_dir", path_str(&books));
    }
    let known = p.dir.join("known_hosts.d").join(id);

    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let clients = Arc::new(Mutex::new(Vec::<(bool, String)>::new()));
    let swapped = Arc::new(AtomicBool::new(false));
    let scanner = {
        let (stop, clients, swapped) = (stop.0.clone(), clients.clone(), swapped.clone());
        let ip = host.ip().to_string();
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) && rounds < 30_000 {
                rounds += 1;
                for e in std::fs::read_dir("/proc").unwrap().flatten() {
                    let pid = e.file_name().to_string_lossy().into_owned();
                    if !pid.bytes().all(|b| b.is_ascii_digit()) || seen.contains(&pid) {
                        continue;
                    }
                    let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                    let args: Vec<String> = cmdline
                        .split(|b| *b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                    if args
                        .first()
                        .is_some_and(|a| a == "ssh" || a.ends_with("/ssh"))
                        && args
                            .iter()
                            .any(|a| a == &ip || a.ends_with(&format!("@{ip}")))
                    {
                        seen.insert(pid);
                        let after = swapped.load(Ordering::SeqCst);
                        clients.lock().unwrap().push((after, args.join(" ")));
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut d = p.daemon();
    // Provision verified the console key and connected: now the impostor.
    let ip = host.ip().to_string();
    common::eventually(
        "provision's reach to log in and keep its login",
        Duration::from_secs(60),
        || async { login_kept(id, &ip).then_some(()) },
    )
    .await;
    // The impostor answers at the address, and the verified connection (which the run
    // would use) is lost: the run's ssh must log in again, to the impostor.
    host.swap_in_impostor();
    host.drop_sessions();
    swapped.store(true, Ordering::SeqCst);
    assert!(host.is_impostor());
    common::eventually(
        "the instance's action to finish",
        Duration::from_secs(120),
        || async {
            results_by_instance(&w.emu)
                .contains_key(id.as_str())
                .then_some(())
        },
    )
    .await;
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(30)), 0, "{}", d.log());
    drop(stop);
    scanner.join().unwrap();

    let results = results_by_instance(&w.emu);
    assert_eq!(results[id.as_str()]["result"], "ABANDON");
    let err = run_error(&p, id);
    assert!(err.contains("host key refused"), "{err}");
    assert!(
        !w.dir(id).join("marker").exists(),
        "the play ran on the impostor"
    );
    let logs = ansible_logs(&p);
    assert_eq!(
        logs.len(),
        1,
        "the playbook did run, and was refused: {logs:?}"
    );
    let clients = clients.lock().unwrap();
    assert!(
        clients.iter().any(|(after, _)| *after),
        "no ssh client of the playbook's run seen: {clients:?}"
    );
    for (_, argv) in clients.iter() {
        assert!(
            argv.contains(&format!("UserKnownHostsFile={}", path_str(&known))),
            "not the verified known_hosts file: {argv}"
        );
        assert!(
            argv.contains("StrictHostKeyChecking=yes")
                || argv.contains("StrictHostKeyChecking yes"),
            "not strict: {argv}"
        );
        assert!(
            !argv.contains("StrictHostKeyChecking no")
                && !argv.contains("StrictHostKeyChecking=no")
                && !argv.contains("UserKnownHostsFile /dev/null"),
            "checking weakened: {argv}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_after_the_reach_is_refused_under_mitogen() {
    impostor_swapped_in_after_the_reach_is_refused("web-swap-m", "strategy = \"mitogen\"", false)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_after_the_reach_is_refused_under_linear_with_pipelining() {
    impostor_swapped_in_after_the_reach_is_refused(
        "web-swap-p",
        "strategy = \"linear\"\npipelining = true",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_after_the_reach_is_refused_under_linear_without_pipelining() {
    impostor_swapped_in_after_the_reach_is_refused(
        "web-swap-l",
        "strategy = \"linear\"\npipelining = false",
        false,
    )
    .await;
}

/// An `ansible.cfg` in the playbook directory (or `~`) that turns host key checking off
/// (`host_key_checking = False`, `ssh_args` with `StrictHostKeyChecking=no`) does not: the
/// service passes its settings in the environment, which wins over any ansible.cfg.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ansible_cfg_turning_host_key_checking_off_is_overridden() {
    impostor_swapped_in_after_the_reach_is_refused(
        "web-swap-cfg",
        "strategy = \"linear\"\npipelining = false",
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_that_never_comes_up_fails_after_ready_timeout_with_heartbeats_meanwhile() {
    // Heartbeat timeout 6 s (beats every 2 s): without heartbeats the hook would time out
    // long before the 10 s ready_timeout ends.
    let w = World::new("web-down", 6, Some(r#"{"role":"api"}"#)).await;
    let hosts = w
        .launch("web-down", 1, |net, ip| net.host_without_sshd(ip))
        .await;
    let id = &hosts[0].0;
    let p = w.provision(MARKER_LAYER);
    p.set("ssh.ready_timeout", "10s");
    daemon_until_finished(&w, &p, &[id]).await;
    let results = results_by_instance(&w.emu);
    let a = &results[id];
    assert_eq!(a["result"], "ABANDON", "{a}");
    assert_eq!(
        a["finished_by"], "complete",
        "we completed it, not its timeout: {a}"
    );
    assert!(a["heartbeats"].as_u64().unwrap() >= 2, "{a}");
    let err = run_error(&p, id);
    assert!(
        err.contains("not reachable over SSH within 10s") && err.contains("Connection refused"),
        "{err}"
    );
}

/// The command lines of this machine's `ansible-playbook` runs started from `runtime_dir`
/// (their inventory source is in a run directory there).
fn ansible_runs_in(runtime_dir: &Path) -> Vec<String> {
    let marker = format!("{}/ansible-", runtime_dir.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("ansible-playbook") && c.contains(&marker))
        .collect()
}

/// `ansible-playbook` starts as the batch opens, while its instance is still being reached
/// (its start overlaps the reach); the instance is never reached, so the batch ends without
/// a run: its early `ansible-playbook` is stopped and its run directory removed by the
/// daemon as it goes on (before it is told to stop, not by its exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_ansible_run_whose_batch_never_runs_is_stopped_and_leaves_nothing() {
    let w = World::new("web-early", 300, Some(r#"{"role":"api"}"#)).await;
    let hosts = w
        .launch("web-early", 1, |net, ip| net.host_without_sshd(ip))
        .await;
    let id = hosts[0].0.clone();
    let mut p = w.provision(MARKER_LAYER);
    p.set("ssh.ready_timeout", "10s");
    let runtime = p.dir.join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    p.set_env("RUNTIME_DIRECTORY", path_str(&runtime));
    let mut d = p.daemon();
    let mut early = Vec::new();
    for _ in 0..300 {
        early = ansible_runs_in(&runtime);
        if !early.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !early.is_empty(),
        "no ansible-playbook started while the instance was being reached: {}",
        d.log()
    );
    assert!(
        !results_by_instance(&w.emu).contains_key(&id),
        "started before the batch ran: {early:?}"
    );
    common::wait_for(
        "the unreachable instance's action to finish",
        Duration::from_secs(60),
        || results_by_instance(&w.emu).get(&id).cloned(),
    );
    assert_eq!(results_by_instance(&w.emu)[&id]["result"], "ABANDON");
    let run_dirs = || -> Vec<String> {
        std::fs::read_dir(&runtime)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ansible-"))
            .collect()
    };
    common::wait_for(
        "the early ansible-playbook to be stopped and its run directory removed, the daemon still serving",
        Duration::from_secs(20),
        || (ansible_runs_in(&runtime).is_empty() && run_dirs().is_empty()).then_some(()),
    );
    assert!(ansible_logs(&p).is_empty(), "no run was logged");
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(30)), 0, "{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_password_never_shows_in_argv_environments_or_logs() {
    let w = World::new("web-vault", 300, None).await;
    let creds = w.emu.dir.path().join("credentials");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("vault-password"), format!("{VAULT_PASSWORD}\n")).unwrap();
    vault_run(&w, "{ credential = \"vault-password\" }", Some(&creds)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_password_can_come_from_an_ssm_secure_string() {
    let w = World::new("web-vault-ssm", 300, None).await;
    w.emu.aws_json(
        "ssm",
        "AmazonSSM.PutParameter",
        json!({ "Name": "/provision/vault", "Value": VAULT_PASSWORD, "Type": "SecureString" }),
    );
    vault_run(&w, "{ ssm_parameter = \"/provision/vault\" }", None).await;
    let calls = w.emu.provision_calls();
    assert_eq!(
        calls["ssm:GetParameter"], 1,
        "read once for the run: {calls:?}"
    );
}

/// Two instances configured by vault.yml with the password from `source`, while every
/// process's argv and environment are scanned for it; then the logs.
async fn vault_run(w: &World, source: &str, credentials: Option<&Path>) {
    let hosts = w.launch(&w.group, 2, |net, ip| net.host(ip)).await;
    let mut p = w.provision_with(
        r#"
[layers.web]
groups = ["web-*"]
launch = [ { ansible = "vault.yml", vars = { sim_root = "SIM_ROOT" } } ]
"#,
        &format!("vault_password = {source}"),
    );
    if let Some(c) = credentials {
        p.set_env("CREDENTIALS_DIRECTORY", path_str(c));
    }
    // As under systemd (RuntimeDirectory=): where the password file lives during a run.
    let runtime = p.dir.join("run");
    std::fs::create_dir(&runtime).unwrap();
    p.set_env("RUNTIME_DIRECTORY", path_str(&runtime));

    // Scan every process's argv and environment while the run goes on; note this run's
    // ansible-playbook (its password file lies under this test's runtime directory) and
    // the password file it was given, with its mode.
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let seen = Arc::new(Mutex::new(Scan::default()));
    let scanner = {
        let (stop, seen, runtime) = (stop.0.clone(), seen.clone(), runtime.clone());
        std::thread::spawn(move || {
            let needle = VAULT_PASSWORD.as_bytes();
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) && rounds < 20_000 {
                rounds += 1;
                for e in std::fs::read_dir("/proc").unwrap().flatten() {
                    let pid = e.file_name().to_string_lossy().into_owned();
                    if !pid.bytes().all(|b| b.is_ascii_digit()) {
                        continue;
                    }
                    let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                    let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
                    let mut s = seen.lock().unwrap();
                    let args: Vec<String> = cmdline
                        .split(|b| *b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                    if args.iter().any(|a| a.ends_with("ansible-playbook")) {
                        if let Some(i) = args.iter().position(|a| a == "--vault-password-file") {
                            let file = PathBuf::from(&args[i + 1]);
                            if file.starts_with(&runtime) {
                                s.ansible_pids.insert(pid.clone());
                                if let Ok(m) = std::fs::metadata(&file) {
                                    use std::os::unix::fs::PermissionsExt as _;
                                    s.vault_files.insert((file, m.permissions().mode() & 0o777));
                                }
                            }
                        }
                    }
                    for (what, bytes) in [("cmdline", &cmdline), ("environ", &environ)] {
                        if bytes.windows(needle.len()).any(|w| w == needle) {
                            s.hits.push(format!("{pid} {what}: {}", args.join(" ")));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let (code, log) = p.worker();
    drop(stop);
    scanner.join().unwrap();
    assert_eq!(code, 0, "{log}");

    let results = results_by_instance(&w.emu);
    for (id, _) in &hosts {
        assert_eq!(results[id]["result"], "CONTINUE", "{}", run_error(&p, id));
        // The playbook did decrypt its vaulted variable with the password.
        let secret = std::fs::read_to_string(w.dir(id).join("secret")).unwrap();
        assert!(!secret.trim().is_empty());
    }
    let scan = seen.lock().unwrap();
    assert!(
        !scan.ansible_pids.is_empty(),
        "the scanner never saw this run's ansible-playbook"
    );
    assert!(
        scan.hits.is_empty(),
        "the password was visible: {:?}",
        scan.hits
    );
    // The password went through a 0600 file in the private runtime directory, gone now.
    assert!(!scan.vault_files.is_empty(), "no password file seen");
    for (file, mode) in &scan.vault_files {
        assert_eq!(*mode, 0o600, "{file:?}");
        assert!(!file.exists(), "left behind: {file:?}");
    }
    // Nor in any log: the worker's, the ansible run log, the history.
    assert!(!log.contains(VAULT_PASSWORD));
    let logs = ansible_logs(&p);
    assert_eq!(logs.len(), 1, "one run, one log: {logs:?}");
    for l in logs {
        assert!(
            !std::fs::read_to_string(&l)
                .unwrap()
                .contains(VAULT_PASSWORD),
            "{l:?}"
        );
    }
    let history = format!("{:?}", p.history());
    assert!(!history.contains(VAULT_PASSWORD));
    let left: Vec<PathBuf> = walk(&runtime)
        .into_iter()
        .filter(|f| f.to_string_lossy().contains("vault"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[derive(Default)]
struct Scan {
    /// This run's ansible-playbook processes.
    ansible_pids: BTreeSet<String>,
    /// `--vault-password-file` arguments seen, with the file's mode at the time.
    vault_files: BTreeSet<(PathBuf, u32)>,
    /// Where the password showed.
    hits: Vec<String>,
}

/// Stops the scanner thread however the test ends (a failed assertion included).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_with_jinja_or_shell_text_is_rejected_never_run() {
    let pwned = "PWNED";
    let w = World::new(
        "web-inj",
        300,
        Some(r#"{"role":"{{ lookup('pipe', 'id') }}"}"#),
    )
    .await;
    // A second group whose metadata carries shell text, for an ssh step; in a network of
    // its own (the emulator numbers each subnet's instances from .4).
    let net2 = HostNet::new();
    w.aws
        .group_in("app-inj", &net2.vpc_cidr(), &net2.cidr())
        .await;
    let shell = format!(
        r#"{{"note":"ok; touch {}/{pwned}"}}"#,
        path_str(&w.sim_root)
    );
    w.aws
        .hook(
            "app-inj",
            "provision-launch",
            LAUNCH,
            Some(&w.q.arn),
            300,
            "ABANDON",
            Some(&shell),
        )
        .await;
    let web = w.launch("web-inj", 1, |net, ip| net.host(ip)).await;
    let app = w.launch("app-inj", 1, |_, ip| net2.host(ip)).await;
    let p = w.provision(&format!(
        "{MARKER_LAYER}\n[layers.app]\ngroups = [\"app-*\"]\nvars = {{ note = \"[a-z ]{{1,40}}\" }}\nlaunch = [ {{ ssh = [\"echo {{metadata.note}} > SIM_ROOT/{{instance_id}}/note\"] }} ]\n"
    ));
    let ids = [web[0].0.as_str(), app[0].0.as_str()];
    daemon_until_finished(&w, &p, &ids).await;
    let results = results_by_instance(&w.emu);
    for (id, _) in web.iter().chain(&app) {
        assert_eq!(results[id]["result"], "ABANDON", "{id}");
        let err = run_error(&p, id);
        assert!(err.contains("does not match the layer's pattern"), "{err}");
        assert!(!w.dir(id).join("marker").exists());
        assert!(!w.dir(id).join("note").exists());
    }
    assert!(!w.sim_root.join(pwned).exists(), "the shell text ran");
    assert!(ansible_logs(&p).is_empty(), "ansible-playbook never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_playbook_drains_and_the_known_hosts_entry_goes() {
    let w = World::new("web-term", 300, Some(r#"{"role":"api"}"#)).await;
    w.aws
        .hook(
            "web-term",
            "provision-terminate",
            TERMINATE,
            Some(&w.q.arn),
            300,
            "CONTINUE",
            None,
        )
        .await;
    let hosts = w.launch("web-term", 1, |net, ip| net.host(ip)).await;
    let id = &hosts[0].0;
    let p = w.provision(&format!(
        "{}terminate = [ {{ ansible = \"drain.yml\", vars = {{ sim_root = \"SIM_ROOT\" }} }} ]\n",
        MARKER_LAYER
    ));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert!(w.dir(id).join("marker").exists());
    let known = p.dir.join("known_hosts.d").join(id);
    let entry = std::fs::read_to_string(&known).unwrap();
    assert_eq!(
        entry.trim(),
        format!("{id} {}", key_of(&hosts[0].1)),
        "keyed by instance id (HostKeyAlias), not by address"
    );

    w.aws.scale("web-term", 0).await;
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let drained = std::fs::read_to_string(w.dir(id).join("drained")).unwrap();
    assert_eq!(drained, format!("{id} drained\n"));
    assert!(!known.exists(), "known_hosts entry left after terminate");
    let finished: Vec<Value> = w.emu.finished_actions();
    assert!(
        finished.iter().any(|a| a["hook"] == "provision-terminate"
            && a["result"] == "CONTINUE"
            && a["finished_by"] == "complete"),
        "{finished:?}"
    );
    // The terminate run reused the verified keys: the console was read once.
    assert_eq!(w.emu.provision_calls()["ec2:GetConsoleOutput"], 1);
}

/// `type base64` of a host's advertised key (its line without the comment).
fn key_of(h: &SimHost) -> String {
    h.public_key_line()
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_commands_run_in_order_and_a_failing_one_fails_its_instance() {
    let w = World::new("app-ssh", 300, None).await;
    let hosts = w.launch("app-ssh", 2, |net, ip| net.host(ip)).await;
    let bad = &hosts[1].0;
    std::fs::write(w.dir(bad).join("fail"), "").unwrap();
    let p = w.provision(
        r#"
[layers.app]
groups = ["app-*"]
launch = [ { ssh = [
  "echo \"$SSH_CONNECTION\" | cut -d' ' -f3 > SIM_ROOT/{instance_id}/server",
  "echo first >> SIM_ROOT/{instance_id}/order",
  "test ! -e SIM_ROOT/{instance_id}/fail || {{ echo flagged >&2; exit 3; }}",
  "echo last >> SIM_ROOT/{instance_id}/order",
] } ]
"#,
    );
    let ids: Vec<&str> = hosts.iter().map(|(id, _)| id.as_str()).collect();
    daemon_until_finished(&w, &p, &ids).await;
    let results = results_by_instance(&w.emu);
    let order = |id: &str| std::fs::read_to_string(w.dir(id).join("order")).unwrap();
    for (id, host) in &hosts {
        let server = std::fs::read_to_string(w.dir(id).join("server")).unwrap();
        assert_eq!(server.trim(), host.ip().to_string(), "ran on its own host");
        if id == bad {
            assert_eq!(results[id]["result"], "ABANDON");
            let err = run_error(&p, id);
            assert!(err.contains("exit 3") && err.contains("flagged"), "{err}");
            assert_eq!(order(id), "first\n", "stopped at the failure");
        } else {
            assert_eq!(results[id]["result"], "CONTINUE", "{}", run_error(&p, id));
            assert_eq!(order(id), "first\nlast\n", "every command, in order");
        }
    }
}

/// The console's host keys are read with `Latest=true`: EC2's buffered console output
/// (without it) is posted only after state transitions and may lack the keys cloud-init
/// printed after boot for a long while (here an hour). An instance type that cannot give
/// the latest output (UnsupportedOperation) is read from the buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_keys_come_from_the_latest_console_output() {
    let w = World::new("app-lat", 300, None).await;
    let hosts = w.launch("app-lat", 2, |net, ip| net.host(ip)).await;
    for (i, (id, host)) in hosts.iter().enumerate() {
        let spec = if i == 0 {
            json!({ "host_keys": [host.public_key_line()], "buffered_lag_seconds": 3600 })
        } else {
            json!({ "host_keys": [host.public_key_line()], "latest_supported": false })
        };
        w.emu
            .control("POST", &format!("/_emulator/console/{id}"), Some(spec));
    }
    let p = w.provision(
        r#"
[layers.app]
groups = ["app-*"]
launch = [ { ssh = ["echo ok > SIM_ROOT/{instance_id}/ran"] } ]
"#,
    );
    let ids: Vec<&str> = hosts.iter().map(|(id, _)| id.as_str()).collect();
    daemon_until_finished(&w, &p, &ids).await;
    let results = results_by_instance(&w.emu);
    for (id, _) in &hosts {
        assert_eq!(results[id]["result"], "CONTINUE", "{}", run_error(&p, id));
        assert!(w.dir(id).join("ran").exists());
    }
}

/// The worker's own peak resident set (VmHWM), from the summary it logs at exit, in bytes.
fn own_peak_rss(log: &str) -> u64 {
    let mut plain = String::new();
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            plain.push(c);
        }
    }
    let at = plain.rfind("peak_rss_kib=").expect("the exit summary") + "peak_rss_kib=".len();
    let digits: String = plain[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse::<u64>().unwrap() * 1024
}

/// `provision worker` to its end, with the peak resident set size of it and its children
/// together (wait4's rusage counts the largest of them: ssh, ansible-playbook).
// The child is reaped by wait4 (for its rusage), which std's Child cannot see.
#[allow(clippy::zombie_processes)]
/// Runs the worker on `id`, checks its action continued, and answers the worker's own peak
/// RSS (printed for the record, with `what` caused it).
fn continued_within(w: &World, p: &Provision, id: &str, what: &str) -> u64 {
    let (code, log, tree) = worker_peak_rss(p, Duration::from_secs(300));
    assert_eq!(code, 0, "{log}");
    let peak = own_peak_rss(&log);
    eprintln!(
        "provision worker peak RSS with {what}: {} MiB (with its children: {} MiB)",
        peak >> 20,
        tree >> 20
    );
    assert_eq!(
        results_by_instance(&w.emu)[id]["result"],
        "CONTINUE",
        "{}",
        run_error(p, id)
    );
    peak
}

/// The worker's exit code, log, and the peak RSS of it and its children (wait4's rusage).
// The child is reaped by wait4 (its rusage is the point), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn worker_peak_rss(p: &Provision, timeout: Duration) -> (i32, String, u64) {
    let log = p.dir.join(format!("worker-{}.log", fastrand::u32(..)));
    let mut child = p
        .command(&["worker"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let t0 = std::time::Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: wait4 on our own child, with a zeroed rusage to fill.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                -1
            };
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            // ru_maxrss is in KiB on Linux.
            return (code, text, usage.ru_maxrss as u64 * 1024);
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("provision worker did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Output from an instance cannot take the worker's memory: an `ssh` step printing 400 MB
/// leaves the worker's peak RSS far below that (head and tail are kept, the rest counted),
/// and a script larger than the pipes sent on stdin to a command that prints while it reads
/// does not deadlock (stdin is written while the output is read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_output_is_bounded_and_a_large_script_does_not_deadlock() {
    let w = World::new("app-flood", 300, None).await;
    let hosts = w.launch("app-flood", 1, |net, ip| net.host(ip)).await;
    let id = hosts[0].0.as_str();
    let script = w.sim_root.join("chatty.sh");
    std::fs::write(
        &script,
        format!(
            "head -c 20000000 /dev/zero | tr '\\0' y\n{}echo done > {}/done\n",
            "# padding to make the script larger than any pipe buffer\n".repeat(100_000),
            w.dir(id).display()
        ),
    )
    .unwrap();
    let p = w.provision(&format!(
        r#"
[layers.app]
groups = ["app-*"]
launch = [
  {{ ssh = ["echo first-line; head -c 400000000 /dev/zero | tr '\\0' x; echo; echo the-end"] }},
  {{ ssh = {{ script = "{}" }}, timeout = "5m" }},
]
"#,
        script.display()
    ));
    let peak = continued_within(&w, &p, id, "a 400 MB ssh output");
    assert!(peak < 96 << 20, "peak RSS {} MiB", peak >> 20);
    assert!(w.dir(id).join("done").exists(), "the whole script ran");
    let run = p
        .history()
        .into_iter()
        .find(|r| r.instance_id.as_deref() == Some(id))
        .unwrap();
    let flood = run.steps[0].detail.as_deref().unwrap();
    // Every byte counted: the 400,000,020 of stdout, and whatever the host's shell start-up
    // wrote to stderr (this machine's root .bashrc runs `pyenv init`, which can complain).
    let counted: u64 = flood
        .split_once(" bytes of output; all of it")
        .and_then(|(head, _)| head.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count: {flood}"));
    assert!(counted >= 400_000_020, "{counted} bytes counted: {flood}");
    assert!(flood.contains("the-end"), "the tail is kept: {flood}");
    // The rest went to the step's log, bounded by ssh.log_max_bytes (1 MiB by default).
    let log_path = flood
        .split(" in ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .expect("the log's path");
    let size = std::fs::metadata(log_path).unwrap().len();
    assert!(size <= (1 << 20) + 4096, "log of {size} bytes");
    let text = std::fs::read_to_string(log_path).unwrap();
    assert!(
        text.starts_with(&format!("instance: {id}\n")),
        "{text:.300}"
    );
    assert!(
        text.contains("first-line") && text.contains("[log truncated"),
        "{text:.300}"
    );
}

/// A playbook whose task floods its output: the run's results are cut to head and tail
/// by the callback (strings over 64 KiB), the log stays within `ansible.log_max_bytes`, and
/// the host's result is still read and right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_playbook_is_read_within_the_budgets() {
    let w = World::new("web-chatty", 300, None).await;
    let hosts = w.launch("web-chatty", 1, |net, ip| net.host(ip)).await;
    let id = hosts[0].0.as_str();
    let p = w.provision_with(
        r#"
[layers.web]
groups = ["web-*"]
launch = [ { ansible = "chatty.yml", vars = { sim_root = "SIM_ROOT" } } ]
"#,
        "strategy = \"linear\"\nlog_max_bytes = 200000\noutput_max_bytes = 1048576",
    );
    let peak = continued_within(&w, &p, id, "a 30 MB ansible task output");
    assert_eq!(
        std::fs::read_to_string(w.dir(id).join("marker")).unwrap(),
        "flooded\n"
    );
    let logs = ansible_logs(&p);
    assert_eq!(logs.len(), 1);
    let size = std::fs::metadata(&logs[0]).unwrap().len();
    assert!(size <= 200_000 + 4096, "log of {size} bytes");
    let text = std::fs::read_to_string(&logs[0]).unwrap();
    assert!(
        text.contains("[log truncated at its size limit]"),
        "{text:.2000}"
    );
    assert!(peak < 96 << 20, "peak RSS {} MiB", peak >> 20);
}

/// The step's `timeout` bounds the commands once the instance is reached, not the wait for
/// it: a command still running at the deadline fails its instance with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_command_past_the_steps_timeout_fails_its_instance() {
    let w = World::new("app-slow", 300, None).await;
    let hosts = w.launch("app-slow", 1, |net, ip| net.host(ip)).await;
    let id = hosts[0].0.as_str();
    let p = w.provision(
        r#"
[layers.app]
groups = ["app-*"]
launch = [ { ssh = ["touch SIM_ROOT/{instance_id}/started", "sleep 60", "touch SIM_ROOT/{instance_id}/done"], timeout = "3s" } ]
"#,
    );
    daemon_until_finished(&w, &p, &[id]).await;
    assert_eq!(results_by_instance(&w.emu)[id]["result"], "ABANDON");
    let err = run_error(&p, id);
    assert!(
        err.contains("did not finish within 3s (the step's timeout)"),
        "{err}"
    );
    assert!(w.dir(id).join("started").exists(), "reached and ran: {err}");
    assert!(!w.dir(id).join("done").exists());
}

/// A message for an instance that no longer exists (a stale redelivery, a DLQ redrive) is
/// looked up in the same DescribeInstances call as the live ones: EC2 answers a call naming
/// an unknown instance id with InvalidInstanceID.NotFound, so the lookup must not name ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_for_a_vanished_instance_does_not_hold_up_the_others() {
    let w = World::new("app-gone", 300, None).await;
    let hosts = w.launch("app-gone", 2, |net, ip| net.host(ip)).await;
    let gone = "i-0dead00000000beef";
    let body = json!({
        "Origin": "EC2", "Destination": "AutoScalingGroup", "Service": "AWS Auto Scaling",
        "AccountId": "123456789012", "RequestId": "5f7e0c1a-0b1c-4d2e-8f3a-9b8c7d6e5f4a",
        "Time": "2026-11-21T10:15:42.113Z", "LifecycleHookName": "provision-launch",
        "LifecycleTransition": LAUNCH, "AutoScalingGroupName": "app-gone",
        "EC2InstanceId": gone, "LifecycleActionToken": "0c7d1e9a-3b5f-4a6e-9d2c-1f8e7a6b5c4d",
    });
    w.aws.send(&w.q, &body.to_string()).await;
    let p = w.provision(
        r#"
[layers.app]
groups = ["app-*"]
launch = [ { ssh = ["touch SIM_ROOT/{instance_id}/done"] } ]
"#,
    );
    p.set("ssh.ready_timeout", "8s");
    let mut ids: Vec<&str> = hosts.iter().map(|(id, _)| id.as_str()).collect();
    ids.push(gone);
    let log = daemon_until_finished(&w, &p, &ids).await;
    let results = results_by_instance(&w.emu);
    for (id, _) in &hosts {
        assert_eq!(
            results.get(id).map(|r| r["result"].clone()),
            Some(json!("CONTINUE")),
            "{id}: {}\n{log}",
            run_error(&p, id)
        );
        assert!(w.dir(id).join("done").exists());
    }
    // Auto Scaling does not know the vanished instance: its message is rejected before any
    // step, so it holds up nothing and never reaches DescribeInstances or SSH.
    let err = run_error(&p, gone);
    assert!(
        err.contains("forged or stale: ")
            && err.contains("not the instance's active lifecycle action"),
        "{err}"
    );
    let run = p
        .history()
        .into_iter()
        .find(|r| r.instance_id.as_deref() == Some(gone))
        .unwrap();
    assert_eq!(run.outcome.as_str(), "rejected");
    assert!(run.steps.is_empty(), "{run:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manual_command_shows_what_it_waits_for_then_completes() {
    let w = World::new("web-man", 300, Some(r#"{"role":"ops"}"#)).await;
    let hosts = w.launch("web-man", 1, |net, ip| net.host(ip)).await;
    let id = &hosts[0].0;
    // cloud-init prints the keys 2 s from now: the command waits for them.
    w.emu.control(
        "POST",
        &format!("/_emulator/console/{id}"),
        Some(json!({ "host_keys": [hosts[0].1.public_key_line()], "appear_after_seconds": 2 })),
    );
    let p = w.provision(MARKER_LAYER);
    let out = p.output(&[id]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("waiting for the host keys in the console output"),
        "{stdout}"
    );
    assert!(stdout.contains("step 1 succeeded"), "{stdout}");
    let results = results_by_instance(&w.emu);
    assert_eq!(results[id]["result"], "CONTINUE");
    assert!(w.dir(id).join("marker").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_reach_instances_through_a_jump_host_and_run_scripts() {
    let w = World::new("app-jump", 300, Some(r#"{"role":"api"}"#)).await;
    let hosts = w.launch("app-jump", 1, |net, ip| net.host(ip)).await;
    let (id, _) = &hosts[0];
    // The bastion: another sshd on the network, its key in a file of the operator's.
    let bastion = w.net.host(w.net.next_ip());
    let bastion_keys = w.net.known_hosts(&[&bastion]);
    let script = w.sim_root.join("whoami.sh");
    std::fs::write(
        &script,
        format!(
            "set -e\necho \"$SSH_CONNECTION\" | cut -d' ' -f1 > {}/{id}/script-client\n",
            path_str(&w.sim_root)
        ),
    )
    .unwrap();
    let p = w.provision(&format!(
        r#"
[layers.app]
groups = ["app-*"]
vars = {{ role = "[a-z]+" }}
launch = [
  {{ ssh = ["echo \"$SSH_CONNECTION\" | cut -d' ' -f1 > SIM_ROOT/{{instance_id}}/client"] }},
  {{ ssh = {{ script = "{script}" }} }},
  {{ ansible = "marker.yml", vars = {{ role = "{{metadata.role}}", sim_root = "SIM_ROOT" }} }},
]
"#,
        script = path_str(&script)
    ));
    p.set("ssh.jump_host", format!("root@{}", bastion.ip()));
    p.set("ssh.jump_known_hosts", path_str(&bastion_keys));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let results = results_by_instance(&w.emu);
    assert_eq!(results[id]["result"], "CONTINUE", "{}", run_error(&p, id));
    // The instance saw the bastion as its SSH client, not this host.
    let client = std::fs::read_to_string(w.dir(id).join("client")).unwrap();
    assert_eq!(client.trim(), bastion.ip().to_string());
    // The script and the play came through the bastion too.
    let script_client = std::fs::read_to_string(w.dir(id).join("script-client")).unwrap();
    assert_eq!(script_client.trim(), bastion.ip().to_string());
    let marker = std::fs::read_to_string(w.dir(id).join("marker")).unwrap();
    assert!(
        marker.ends_with(&format!("client={}\n", bastion.ip())),
        "ansible ran with the same settings: {marker}"
    );
}

#[test]
fn check_syntax_checks_the_playbooks_with_the_vault_password() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("vault"), VAULT_PASSWORD).unwrap();
    let books = dir.path().join("books");
    std::fs::create_dir(&books).unwrap();
    for f in ["vault.yml", "vault-vars.yml", "marker.yml"] {
        std::fs::copy(root().join("tests/playbooks").join(f), books.join(f)).unwrap();
    }
    std::fs::write(
        books.join("broken.yml"),
        "- hosts: all\n  tasks:\n    - name: x\n      no_such_module_here: {}\n",
    )
    .unwrap();
    let config = dir.path().join("provision.toml");
    let write = |launch: &str| {
        std::fs::write(
            &config,
            format!(
                "[queue]\nurl = \"https://sqs.us-east-1.amazonaws.com/123456789012/q\"\n[state]\npath = \"{}/state.db\"\n\
                 [ansible]\nplaybook_dir = \"books\"\nansible_playbook = \"{}\"\nvault_password = {{ credential = \"vault\" }}\n\
                 [layers.web]\ngroups = [\"web-*\"]\nlaunch = [ {launch} ]\n",
                path_str(dir.path()),
                path_str(&ansible_playbook_path())
            ),
        )
        .unwrap()
    };
    let check = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_provision"));
        c.args(["--config", path_str(&config), "check"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CREDENTIALS_DIRECTORY", &creds);
        common::output_within(&mut c, Duration::from_secs(180))
    };
    write("{ ansible = \"vault.yml\" }, { ansible = \"marker.yml\" }");
    let out = check();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("playbook vault.yml: syntax ok"), "{text}");

    write("{ ansible = \"broken.yml\" }, { ansible = \"missing.yml\" }");
    let out = check();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a playbook problem is a config problem: {text}"
    );
    assert!(
        text.contains("problem: layers.web.launch[0].ansible: playbook broken.yml")
            && text.contains("no_such_module_here"),
        "{text}"
    );
    assert!(
        text.contains("problem: layers.web.launch[1].ansible: playbook missing.yml")
            && text.contains("does not exist"),
        "{text}"
    );
}

/// SSH steps wait for cloud-init to finish on the instance: a host whose (stand-in)
/// cloud-init is still configuring it when SSH comes up gets its commands only once that
/// is done, and its known_hosts entry is keyed by instance id (HostKeyAlias).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_steps_wait_for_cloud_init_to_finish() {
    let w = World::new("app-boot", 300, None).await;
    let hosts = w.launch("app-boot", 1, |net, ip| net.host(ip)).await;
    let (id, host) = &hosts[0];
    let done = host.install_cloud_init();
    let p = w.provision(
        r#"
[layers.app]
groups = ["app-*"]
launch = [ { ssh = ["cloud-init status > SIM_ROOT/{instance_id}/seen"] } ]
"#,
    );
    let mut d = p.daemon();
    let waited = done.with_file_name("waited");
    common::eventually(
        "provision to wait for cloud-init",
        Duration::from_secs(60),
        || async { waited.exists().then_some(()) },
    )
    .await;
    assert!(
        !w.dir(id).join("seen").exists(),
        "no command ran while cloud-init was configuring the instance"
    );
    std::fs::write(&done, "").unwrap();
    common::eventually(
        "the launch to complete",
        Duration::from_secs(60),
        || async { results_by_instance(&w.emu).contains_key(id).then_some(()) },
    )
    .await;
    d.signal("TERM");
    d.wait(Duration::from_secs(30));
    assert_eq!(results_by_instance(&w.emu)[id]["result"], "CONTINUE");
    let seen = std::fs::read_to_string(w.dir(id).join("seen")).unwrap();
    assert_eq!(seen.trim(), "status: done");
    let known = std::fs::read_to_string(p.dir.join("known_hosts.d").join(id)).unwrap();
    assert!(
        known.lines().all(|l| l.starts_with(&format!("{id} "))),
        "keyed by instance id, not address: {known}"
    );
}

/// A cloud-init that failed, or that is still running at ssh.ready_timeout: the step fails
/// with the reason and nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_endless_cloud_init_fails_the_step_with_the_reason() {
    cloud_init_failures(
        "app-noboot",
        "{ ssh = [\"touch SIM_ROOT/{instance_id}/ran\"] }",
        "ran",
    )
    .await;
}

/// The same under the `ansible` step, whose reach runs the login and the cloud-init wait
/// as one `ssh` process: the playbook never runs on either host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_endless_cloud_init_fails_the_ansible_step_with_the_reason() {
    cloud_init_failures(
        "app-noboot-ans",
        "{ ansible = \"marker.yml\", vars = { sim_root = \"SIM_ROOT\" } }",
        "marker",
    )
    .await;
}

async fn cloud_init_failures(group: &str, step: &str, leaves: &str) {
    let w = World::new(group, 300, None).await;
    let hosts = w.launch(group, 2, |net, ip| net.host(ip)).await;
    let (failed, endless) = (&hosts[0], &hosts[1]);
    std::fs::write(failed.1.install_cloud_init(), "error").unwrap();
    endless.1.install_cloud_init();
    let p = w.provision(&format!(
        "[layers.app]\ngroups = [\"app-*\"]\nlaunch = [ {step} ]\n"
    ));
    p.set("ssh.ready_timeout", "8s");
    daemon_until_finished(&w, &p, &[&failed.0, &endless.0]).await;
    let results = results_by_instance(&w.emu);
    for (id, _) in [failed, endless] {
        assert_eq!(results[id]["result"], "ABANDON");
        assert!(!w.dir(id).join(leaves).exists(), "nothing ran on {id}");
    }
    let err = run_error(&p, &failed.0);
    assert!(
        err.contains("cloud-init ended in error (status: error; exit 1)"),
        "{err}"
    );
    let err = run_error(&p, &endless.0);
    assert!(
        err.contains("cloud-init had not finished within 8s (ssh.ready_timeout")
            && err.contains("still waiting"),
        "{err}"
    );
    assert!(ansible_logs(&p).is_empty(), "no playbook ran");
}

/// Host keys are known by instance id (HostKeyAlias): when the instance's address changes
/// (here `ssh.address = "tag:SshAddress"` names another address; a public IP after a stop
/// and start in a warm pool is the same), the same machine at the new address is accepted
/// with the keys verified at launch, and the console is not read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_address_changed_is_still_recognised_by_its_keys() {
    let w = World::new("app-moved", 300, None).await;
    let hosts = w.launch("app-moved", 1, |net, ip| net.host(ip)).await;
    let (id, first) = &hosts[0];
    let tag = |ip: String| {
        let ec2 = w.aws.ec2.clone();
        let id = id.clone();
        async move {
            ec2.create_tags()
                .resources(id)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("SshAddress")
                        .value(ip)
                        .build(),
                )
                .send()
                .await
                .unwrap();
        }
    };
    tag(first.ip().to_string()).await;
    let p = w.provision(
        r#"
[layers.app]
groups = ["app-*"]
launch = [ { ssh = ["echo \"$SSH_CONNECTION\" | cut -d' ' -f3 >> SIM_ROOT/{instance_id}/servers"] } ]
"#,
    );
    p.set("ssh.address", "tag:SshAddress");
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(results_by_instance(&w.emu)[id]["result"], "CONTINUE");

    // The same machine, now answering at another address only.
    let moved = w.net.host(w.net.next_ip());
    moved.take_host_key_of(first);
    first.stop_sshd();
    tag(moved.ip().to_string()).await;
    let out = p.output(&[id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let servers = std::fs::read_to_string(w.dir(id).join("servers")).unwrap();
    assert_eq!(
        servers.lines().collect::<Vec<_>>(),
        [first.ip().to_string(), moved.ip().to_string()]
    );
    assert_eq!(
        w.emu.provision_calls()["ec2:GetConsoleOutput"],
        1,
        "the keys verified at launch were used"
    );
}

/// A playbook and group_vars written for Ansible's EC2 inventory (amazon.aws.aws_ec2 with
/// `keyed_groups: [{prefix: tag, key: tags}]`) run unchanged: `hosts: tag_env_staging`
/// selects the instances tagged env=staging, `group_vars/tag_Role_web.yml` applies to the
/// one tagged Role=web, the plugin's host variables are there, the layer's group is its
/// exact name (`hosts: ec2-groups`), an untagged instance is not touched by the tag play,
/// and a tag value holding Jinja reaches the play as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_playbook_written_for_the_ec2_inventory_runs_unchanged() {
    let w = World::new("app-ec2", 300, None).await;
    let hosts = w.launch("app-ec2", 3, |net, ip| net.host(ip)).await;
    let (web, worker, untagged) = (&hosts[0].0, &hosts[1].0, &hosts[2].0);
    let jinja = "{{ lookup('pipe','id') }}";
    w.aws
        .tag(web, &[("env", "staging"), ("Role", "web"), ("Note", jinja)])
        .await;
    w.aws
        .tag(worker, &[("env", "staging"), ("Role", "worker")])
        .await;
    let p = w.provision(
        r#"
[layers.ec2-groups]
groups = ["app-*"]
launch = [ { ansible = "ec2-groups.yml", vars = { sim_root = "SIM_ROOT", asg_group = "tag_aws_autoscaling_groupName_app_ec2" } } ]
"#,
    );
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let results = results_by_instance(&w.emu);
    for (id, _) in &hosts {
        assert_eq!(results[id]["result"], "CONTINUE", "{}", run_error(&p, id));
        let layer = std::fs::read_to_string(w.dir(id).join("layer")).unwrap();
        assert!(
            layer.split_whitespace().any(|g| g == "ec2-groups"),
            "{id}: the layer's exact name is a group: {layer}"
        );
    }
    let ec2 = |id: &str| std::fs::read_to_string(w.dir(id).join("ec2"));
    let said = ec2(web).unwrap();
    let ip = w.aws.private_ip(web).await;
    for line in [
        "group_vars=web-tuned".to_string(),
        format!("note={jinja}"),
        format!("old_name_note={jinja}"),
        format!("instance_id={web}"),
        format!("private_ip_address={ip}"),
        "availability_zone=us-east-1a".into(),
        "region=us-east-1".into(),
        "instance_type=t3.micro".into(),
        "in_type_group=True".into(),
        "in_asg_group=True".into(),
    ] {
        assert!(said.lines().any(|l| l == line), "{line:?} not in:\n{said}");
    }
    assert!(said.contains("\nimage_id=ami-"), "{said}");
    let said = ec2(worker).unwrap();
    assert!(
        said.contains("group_vars=none\n") && said.contains("note=none\n"),
        "the worker is not in tag_Role_web: {said}"
    );
    assert!(
        ec2(untagged).is_err(),
        "the untagged instance is not in tag_env_staging"
    );
    let logs = ansible_logs(&p);
    assert_eq!(logs.len(), 1, "{logs:?}");
    let text = std::fs::read_to_string(&logs[0]).unwrap();
    assert!(
        !text.contains("Invalid characters were found in group names"),
        "{text}"
    );
    assert!(
        text.contains(&format!("  {web}: all ec2-groups ec2_groups tag_Note_")),
        "each host's groups in the log's header: {text}"
    );
}

const PAUSE_LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
launch = [ { ansible = "pause-for-go.yml", vars = { sim_root = "SIM_ROOT" } } ]
"#;

/// Unreachable is not a verdict, and a stall is not unreachable. Three hosts share a run
/// whose play pauses mid-way (`pause-for-go.yml`); then, mid-playbook, `stall` stops
/// answering for a few seconds (every process in its namespace SIGSTOPped; its connection
/// stays), while `flaky` and `down` lose their connection and stop answering (their sessions
/// killed, their sshd SIGSTOPped). `stall` finishes in the first run. `flaky`, answering
/// again a few seconds later, is reached again and completes CONTINUE in a follow-up run;
/// `down`, which never answers again, fails named unreachable once reaching it again gives
/// up (ssh.ready_timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_stops_answering_mid_playbook_gets_a_follow_up_run() {
    let w = World::new("web-flaky", 300, None).await;
    let hosts = w.launch("web-flaky", 3, |net, ip| net.host(ip)).await;
    let [(stall, stall_host), (flaky, flaky_host), (down, down_host)] = &hosts[..] else {
        panic!("three hosts");
    };
    let p = w.provision_with(PAUSE_LAYER, "");
    p.set("ssh.ready_timeout", "20s");
    // A frozen sshd accepts the TCP connection and never answers: each attempt to reach
    // it again ends here.
    p.set("ssh.connect_timeout", "2s");
    let mut d = p.daemon();
    common::eventually(
        "the play to start on all three",
        Duration::from_secs(90),
        || async {
            hosts
                .iter()
                .all(|(id, _)| w.dir(id).join("started").exists())
                .then_some(())
        },
    )
    .await;
    stall_host.freeze();
    for h in [flaky_host, down_host] {
        h.drop_sessions();
        h.freeze();
    }
    for (id, _) in &hosts {
        std::fs::write(w.dir(id).join("go"), "").unwrap();
    }
    // The stall: what `stall` was running waits, frozen, with its connection open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stall_host.thaw();
    common::eventually("the first run to end", Duration::from_secs(60), || async {
        ansible_logs(&p)
            .iter()
            .any(|l| {
                std::fs::read_to_string(l)
                    .unwrap_or_default()
                    .contains("\n--- end ---\n")
            })
            .then_some(())
    })
    .await;
    assert!(w.dir(stall).join("marker").exists(), "stall rode it out");
    assert!(
        !w.dir(flaky).join("marker").exists(),
        "the first run did not configure it"
    );
    // Answering again, a few seconds later: its follow-up reach is under way meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    flaky_host.thaw();
    common::eventually(
        "the three actions to finish",
        Duration::from_secs(120),
        || async {
            let done = results_by_instance(&w.emu);
            hosts
                .iter()
                .all(|(id, _)| done.contains_key(id.as_str()))
                .then_some(())
        },
    )
    .await;
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(30)), 0, "{}", d.log());

    let results = results_by_instance(&w.emu);
    let detail = |id: &str| {
        let run = p.last_run(id, "launch");
        run.steps[0].detail.clone().unwrap_or_default()
    };
    assert_eq!(
        results[stall.as_str()]["result"],
        "CONTINUE",
        "{}",
        run_error(&p, stall)
    );
    assert!(!detail(stall).contains("follow-up"), "{}", detail(stall));
    assert_eq!(
        results[flaky.as_str()]["result"],
        "CONTINUE",
        "{}",
        run_error(&p, flaky)
    );
    assert!(w.dir(flaky).join("marker").exists());
    assert!(
        detail(flaky).contains("in a follow-up run: the first found it unreachable"),
        "{}",
        detail(flaky)
    );
    assert_eq!(results[down.as_str()]["result"], "ABANDON");
    let err = run_error(&p, down);
    assert!(
        err.contains("unreachable in the ansible-playbook run")
            && err.contains("not reachable again for a follow-up run"),
        "{err}"
    );
    assert!(!w.dir(down).join("marker").exists());
    let logs = ansible_logs(&p);
    assert_eq!(logs.len(), 2, "the first run and one follow-up: {logs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_token_beside_the_genuine_launch_leaves_its_playbook_and_host_keys_alone() {
    let w = World::new("web-forge", 300, Some(r#"{"role":"api"}"#)).await;
    let hosts = w.launch("web-forge", 1, |net, ip| net.host(ip)).await;
    let id = &hosts[0].0;
    // The genuine launch message, and two copies with tokens of the sender's choosing: one
    // dated an hour back (it would be heartbeated at pickup, fail, and be decided ABANDON,
    // forgetting the instance's host keys mid-playbook), one fresh.
    let genuine = w
        .aws
        .drain(&w.q)
        .await
        .into_iter()
        .find(|b| b.contains("EC2_INSTANCE_LAUNCHING"))
        .unwrap();
    let forge = |token: &str| {
        let mut v: Value = serde_json::from_str(&genuine).unwrap();
        v["LifecycleActionToken"] = token.into();
        v.to_string()
    };
    let aged = common::backdated(
        &forge("0badf00d-0000-4000-8000-00000000000a"),
        Duration::from_secs(3600),
    );
    let fresh = forge("0badf00d-0000-4000-8000-00000000000b");
    for body in [&aged, &fresh, &genuine] {
        w.aws.send(&w.q, body).await;
    }
    let p = w.provision(MARKER_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    // The genuine launch: its playbook ran once, its keys are still known, CONTINUE.
    assert!(w.dir(id).join("marker").exists(), "{log}");
    assert_eq!(ansible_logs(&p).len(), 1, "one ansible-playbook run: {log}");
    let known = p.dir.join("known_hosts.d").join(id);
    assert!(known.exists(), "the instance's host keys were kept: {log}");
    let results = results_by_instance(&w.emu);
    assert_eq!(results[id.as_str()]["result"], "CONTINUE", "{log}");
    assert_eq!(w.emu.finished_actions().len(), 1);
    // The forged copies: rejected, nothing decided.
    let runs = p.history();
    let rejected: Vec<_> = runs
        .iter()
        .filter(|r| r.outcome.as_str() == "rejected")
        .collect();
    assert_eq!(rejected.len(), 2, "{runs:#?}");
    assert!(rejected
        .iter()
        .all(|r| r.decision.is_none() && r.steps.is_empty()));
    assert_eq!(
        runs.iter()
            .filter(|r| r.outcome.as_str() == "succeeded")
            .count(),
        1,
        "{runs:#?}"
    );
}
