//! Simulated instances (tests/common/hosts.rs): network namespaces with real sshd, reached with
//! the system `ssh` and `ansible-playbook`, and the emulator's console output carrying their
//! host keys. Needs root (namespaces, veths, bridges). Timings are printed (run with
//! `--nocapture` to see them), never asserted.

use crate::common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::hosts::{ansible_stats, base64_decode, HostNet, SimHost};
use common::{output_within, Aws, Emulator, REGION};
use serde_json::{json, Value};

const VAULT_PASSWORD: &str = "correct horse battery staple";
const VAULT_SECRET: &str = "provision vault test secret 7f3a";

fn root() -> PathBuf {
    common::root()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn report(what: &str, d: Duration) {
    eprintln!("TIMING {what}: {:.1} ms", d.as_secs_f64() * 1000.0);
}

fn ssh_echo(host: &SimHost, known_hosts: &Path) -> Output {
    output_within(
        host.ssh(known_hosts)
            .arg("echo ok; printenv SSH_CONNECTION"),
        Duration::from_secs(20),
    )
}

fn vault_password_file(net: &HostNet) -> PathBuf {
    let p = net.dir().join("vault-password");
    fs::write(&p, format!("{VAULT_PASSWORD}\n")).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// ansible-playbook with the JSON callback: (exit code, per-host stats, stdout+stderr).
fn playbook(
    net: &HostNet,
    inventory: &Path,
    playbooks: &[PathBuf],
    extra: &[&str],
) -> (i32, std::collections::BTreeMap<String, Value>, String) {
    let out = output_within(
        net.ansible_playbook() // stdout: the provision_json callback
            .arg("-i")
            .arg(inventory)
            .args(extra)
            .args(playbooks),
        Duration::from_secs(180),
    );
    let stdout = text(&out.stdout);
    let log = format!("{stdout}\n--- stderr\n{}", text(&out.stderr));
    let stats = if stdout.contains('{') {
        ansible_stats(&stdout)
    } else {
        Default::default()
    };
    (out.status.code().unwrap_or(-1), stats, log)
}

fn stat(stats: &std::collections::BTreeMap<String, Value>, host: &str, key: &str) -> i64 {
    stats.get(host).and_then(|s| s[key].as_i64()).unwrap_or(-1)
}

#[test]
fn two_hosts_answer_ssh_with_their_own_host_keys() {
    let t = Instant::now();
    let net = HostNet::new();
    report("HostNet::new (slot, bridge, client key)", t.elapsed());
    let t = Instant::now();
    let h1 = net.host(net.next_ip());
    report(
        "net.host(): namespace + veth + host key + sshd listening",
        t.elapsed(),
    );
    let h2 = net.host(net.next_ip());
    assert_ne!(h1.ip(), h2.ip());
    assert_ne!(h1.public_key_line(), h2.public_key_line());
    assert!(h1.public_key_line().starts_with("ssh-ed25519 AAAA"));
    assert!(h1
        .public_key_line()
        .ends_with(&format!("root@{}", h1.hostname())));

    // sshd start alone
    h1.stop_sshd();
    assert!(!h1.sshd_running());
    let t = Instant::now();
    h1.start_sshd();
    report("start_sshd() until listening", t.elapsed());
    assert!(h1.sshd_running());

    let known_hosts = net.known_hosts(&[&h1, &h2]);
    for h in [&h1, &h2] {
        let t = Instant::now();
        let out = ssh_echo(h, &known_hosts);
        report(
            &format!("ssh {} echo ok (new connection)", h.ip()),
            t.elapsed(),
        );
        assert!(
            out.status.success(),
            "ssh {}: {}\n{}\nsshd log:\n{}",
            h.ip(),
            text(&out.stdout),
            text(&out.stderr),
            h.log()
        );
        let stdout = text(&out.stdout);
        let mut lines = stdout.lines();
        assert_eq!(lines.next(), Some("ok"));
        // SSH_CONNECTION = client_ip client_port server_ip server_port: the session came in
        // through this host's own address, from the bridge.
        let conn: Vec<&str> = lines.next().unwrap_or_default().split(' ').collect();
        assert_eq!(conn.len(), 4, "{stdout}");
        assert_eq!(conn[0], net.gateway().to_string());
        assert_eq!(conn[2], h.ip().to_string());
        assert_eq!(conn[3], "22");
    }
}

#[test]
fn an_impostor_is_refused_with_strict_host_key_checking() {
    let net = HostNet::new();
    let honest = net.host(net.next_ip());
    let impostor = net.impostor(net.next_ip());
    assert!(impostor.is_impostor());
    let known_hosts = net.known_hosts(&[&honest, &impostor]);
    let out = ssh_echo(&impostor, &known_hosts);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{stderr}");
    assert!(!text(&out.stdout).contains("ok"));
    assert!(
        stderr.contains("Host key verification failed")
            || stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{stderr}"
    );
    // the honest one on the same net is fine
    assert!(ssh_echo(&honest, &known_hosts).status.success());
}

#[test]
fn ssh_that_never_comes_up_or_comes_up_late() {
    let net = HostNet::new();
    let host = net.host_without_sshd(net.next_ip());
    let known_hosts = net.known_hosts(&[&host]);
    let out = ssh_echo(&host, &known_hosts);
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("Connection refused"),
        "{}",
        text(&out.stderr)
    );

    // sshd comes up late (refused until then, as above); ssh gets through once it listens.
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(1500));
            host.start_sshd();
        });
        common::wait_for("sshd to come up late", Duration::from_secs(20), || {
            ssh_echo(&host, &known_hosts).status.success().then_some(())
        });
    });

    host.stop_sshd();
    assert!(!ssh_echo(&host, &known_hosts).status.success());
}

#[test]
fn ansible_runs_the_marker_playbook_on_two_hosts() {
    let net = HostNet::new();
    let h1 = net.host(net.next_ip());
    let h2 = net.host(net.next_ip());
    let known_hosts = net.known_hosts(&[&h1, &h2]);
    let inventory = net.inventory(
        &[("web1", &h1), ("web2", &h2)],
        &known_hosts,
        &[("role", "web")],
    );
    let marker = root().join("tests/playbooks/marker.yml");

    let t = Instant::now();
    let (code, stats, log) = playbook(&net, &inventory, std::slice::from_ref(&marker), &[]);
    report(
        "ansible-playbook marker.yml, 2 hosts, first run",
        t.elapsed(),
    );
    assert_eq!(code, 0, "{log}");
    for (name, h) in [("web1", &h1), ("web2", &h2)] {
        assert_eq!(stat(&stats, name, "ok"), 3, "{name}: {log}");
        assert_eq!(stat(&stats, name, "changed"), 1, "{name}: {log}");
        assert_eq!(stat(&stats, name, "failures"), 0, "{name}: {log}");
        assert_eq!(stat(&stats, name, "unreachable"), 0, "{name}: {log}");
        assert_eq!(
            fs::read_to_string(h.dir().join("marker")).unwrap(),
            format!(
                "host={name}\nrole=web\nserver={}\nclient={}\n",
                h.ip(),
                net.gateway()
            )
        );
    }

    // Again without `role`: a warm run, and no role line.
    let inventory = net.inventory(&[("web1", &h1), ("web2", &h2)], &known_hosts, &[]);
    let t = Instant::now();
    let (code, stats, log) = playbook(&net, &inventory, &[marker], &[]);
    report(
        "ansible-playbook marker.yml, 2 hosts, second run",
        t.elapsed(),
    );
    assert_eq!(code, 0, "{log}");
    assert_eq!(stat(&stats, "web1", "changed"), 1, "{log}");
    assert_eq!(
        fs::read_to_string(h2.dir().join("marker")).unwrap(),
        format!("host=web2\nserver={}\nclient={}\n", h2.ip(), net.gateway())
    );
}

#[test]
fn ansible_refuses_an_impostor_and_reports_it_unreachable() {
    let net = HostNet::new();
    let honest = net.host(net.next_ip());
    let impostor = net.impostor(net.next_ip());
    let known_hosts = net.known_hosts(&[&honest, &impostor]);
    let inventory = net.inventory(&[("good", &honest), ("mitm", &impostor)], &known_hosts, &[]);
    let (code, stats, log) = playbook(
        &net,
        &inventory,
        &[root().join("tests/playbooks/drain.yml")],
        &[],
    );
    assert_eq!(code, 4, "unreachable host: exit 4\n{log}");
    assert_eq!(stat(&stats, "mitm", "unreachable"), 1, "{log}");
    assert_eq!(stat(&stats, "good", "ok"), 1, "{log}");
    assert!(!impostor.dir().join("drained").exists());
    assert!(honest.dir().join("drained").exists());
    assert!(
        log.contains("Host key verification failed")
            || log.contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{log}"
    );
}

#[test]
fn the_other_test_playbooks_fail_per_host_decrypt_and_drain() {
    let net = HostNet::new();
    let h1 = net.host(net.next_ip());
    let h2 = net.host(net.next_ip());
    let known_hosts = net.known_hosts(&[&h1, &h2]);
    let inventory = net.inventory(&[("web1", &h1), ("web2", &h2)], &known_hosts, &[]);
    let dir = root().join("tests/playbooks");

    // fail-on-flag: web2 is flagged
    fs::write(h2.dir().join("fail"), "").unwrap();
    let (code, stats, log) = playbook(&net, &inventory, &[dir.join("fail-on-flag.yml")], &[]);
    assert_eq!(code, 2, "a failed host: exit 2\n{log}");
    assert_eq!(stat(&stats, "web1", "failures"), 0, "{log}");
    assert_eq!(stat(&stats, "web2", "failures"), 1, "{log}");
    assert!(h1.dir().join("succeeded").exists());
    assert!(!h2.dir().join("succeeded").exists());

    // vault: without the password it cannot run; with it, the secret is written, not logged
    let (code, _, log) = playbook(&net, &inventory, &[dir.join("vault.yml")], &[]);
    assert_ne!(code, 0, "{log}");
    assert!(!h1.dir().join("secret").exists());
    let password = vault_password_file(&net);
    let password_arg = format!("--vault-password-file={}", password.display());
    let (code, stats, log) = playbook(
        &net,
        &inventory,
        &[dir.join("vault.yml")],
        &[password_arg.as_str()],
    );
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains(VAULT_SECRET), "the secret was logged:\n{log}");
    for (name, h) in [("web1", &h1), ("web2", &h2)] {
        assert_eq!(stat(&stats, name, "changed"), 1, "{log}");
        let secret = h.dir().join("secret");
        assert_eq!(
            fs::read_to_string(&secret).unwrap(),
            format!("{VAULT_SECRET}\n")
        );
        assert_eq!(
            fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // drain
    let (code, _, log) = playbook(&net, &inventory, &[dir.join("drain.yml")], &[]);
    assert_eq!(code, 0, "{log}");
    assert_eq!(
        fs::read_to_string(h1.dir().join("drained")).unwrap(),
        "web1 drained\n"
    );
}

#[test]
fn base_and_ecs_host_playbooks_configure_a_host_under_its_root_dir() {
    let net = HostNet::new();
    let h = net.host(net.next_ip());
    let known_hosts = net.known_hosts(&[&h]);
    // root_dir per host from the inventory; apply_sysctl only ever raises the value, and 1 is
    // below any kernel's, so the running kernel is read but left alone; no NFS server here.
    let inventory = net.inventory(
        &[("es1", &h)],
        &known_hosts,
        &[
            ("root_dir", "{{ host_dir }}"),
            ("ecs_cluster", "prod-es"),
            ("efs_id", "fs-0123456789abcdef0"),
            ("aws_region", "eu-west-1"),
            ("mount_now", "false"),
            ("vm_max_map_count", "1"),
            ("instance_id", "i-0123456789abcdef0"),
            ("layer", "es"),
        ],
    );
    let books = [
        root().join("playbooks/base.yml"),
        root().join("playbooks/ecs-host.yml"),
    ];
    let extra =
        r#"{"ecs_extra_config": {"ECS_ENABLE_TASK_IAM_ROLE": "true", "ECS_RESERVED_MEMORY": 256}}"#;
    let t = Instant::now();
    let (code, stats, log) = playbook(&net, &inventory, &books, &["-e", extra]);
    report(
        "ansible-playbook base.yml + ecs-host.yml, 1 host",
        t.elapsed(),
    );
    assert_eq!(code, 0, "{log}");
    assert_eq!(stat(&stats, "es1", "failures"), 0, "{log}");
    let d = h.dir();
    let read = |p: &str| fs::read_to_string(d.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_eq!(
        read("etc/ecs/ecs.config"),
        "ECS_CLUSTER=prod-es\nECS_ENABLE_TASK_IAM_ROLE=true\nECS_RESERVED_MEMORY=256\n"
    );
    assert!(read("etc/sysctl.d/99-elasticsearch.conf").contains("\nvm.max_map_count = 1\n"));
    assert_eq!(
        read("etc/fstab"),
        "fs-0123456789abcdef0.efs.eu-west-1.amazonaws.com:/ /mnt/efs nfs4 \
         nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,_netdev 0 0\n"
    );
    assert!(d.join("mnt/efs").is_dir());
    assert_eq!(read("etc/hosts"), "127.0.1.1 es1\n");
    let facts: Value = serde_json::from_str(&read("etc/provision/node.json")).unwrap();
    assert_eq!(facts["instance_id"], "i-0123456789abcdef0");
    assert_eq!(facts["address"], h.ip().to_string());
    assert!(read("etc/motd.d/50-provision").contains("layer es"));
    assert!(d.join("var/lib/provision").is_dir());

    // idempotent: a second run changes nothing
    let (code, stats, log) = playbook(&net, &inventory, &books, &["-e", extra]);
    assert_eq!(code, 0, "{log}");
    assert_eq!(stat(&stats, "es1", "changed"), 0, "{log}");

    // ecs_cluster is required
    let inventory = net.inventory(
        &[("es1", &h)],
        &known_hosts,
        &[("root_dir", "{{ host_dir }}")],
    );
    let (code, stats, log) = playbook(&net, &inventory, &books[1..], &[]);
    assert_eq!(code, 2, "{log}");
    assert_eq!(stat(&stats, "es1", "failures"), 1, "{log}");
    assert!(log.contains("ecs_cluster is required"), "{log}");
}

#[test]
fn every_playbook_passes_syntax_check() {
    let mut books = Vec::new();
    for dir in ["playbooks", "tests/playbooks"] {
        for e in fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".yml") && !name.ends_with(".yaml") {
                continue;
            }
            if name.ends_with("-vars.yml") {
                // a vars file, not a playbook: it must be vault-encrypted
                assert!(fs::read_to_string(&p)
                    .unwrap()
                    .starts_with("$ANSIBLE_VAULT;1.1;AES256\n"));
                continue;
            }
            books.push(p);
        }
    }
    books.sort();
    assert!(books.len() >= 6, "{books:?}");
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("vault-password");
    fs::write(&password, format!("{VAULT_PASSWORD}\n")).unwrap();
    fs::set_permissions(&password, fs::Permissions::from_mode(0o600)).unwrap();
    for book in &books {
        let out = output_within(
            std::process::Command::new(common::hosts::ansible_playbook_path())
                .current_dir(dir.path())
                .args(["--syntax-check", "-i", "localhost,"])
                .arg(format!("--vault-password-file={}", password.display()))
                .arg(book),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "{}: {}{}",
            book.display(),
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

/// The key lines between the first BEGIN/END SSH HOST KEY KEYS markers of a console log.
fn console_keys(console: &str) -> Option<Vec<String>> {
    let (_, rest) = console.split_once("-----BEGIN SSH HOST KEY KEYS-----")?;
    let (block, _) = rest.split_once("-----END SSH HOST KEY KEYS-----")?;
    Some(
        block
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_output_carries_the_simulated_hosts_key() {
    let net = HostNet::new();
    let emu = Emulator::start();
    let aws = Aws::new(&emu).await;

    // A subnet with the net's /24, so the instance's private IP is an address of the net.
    let vpc = aws
        .ec2
        .create_vpc()
        .cidr_block(net.vpc_cidr())
        .send()
        .await
        .unwrap()
        .vpc
        .unwrap()
        .vpc_id
        .unwrap();
    let subnet = aws
        .ec2
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block(net.cidr())
        .availability_zone(format!("{REGION}a"))
        .send()
        .await
        .unwrap()
        .subnet
        .unwrap()
        .subnet_id
        .unwrap();
    let image = aws
        .ec2
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .unwrap()
        .images
        .unwrap_or_default()
        .into_iter()
        .find_map(|i| i.image_id)
        .unwrap();
    let launched = aws
        .ec2
        .run_instances()
        .image_id(image)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(2)
        .max_count(2)
        .subnet_id(subnet)
        .send()
        .await
        .unwrap();
    let instances: Vec<(String, String)> = launched
        .instances()
        .iter()
        .map(|i| {
            (
                i.instance_id().unwrap().to_string(),
                i.private_ip_address().unwrap().to_string(),
            )
        })
        .collect();
    let (id, private_ip) = instances[0].clone();
    let (other_id, other_ip) = instances[1].clone();

    let host = net.host(&private_ip);
    assert_eq!(host.ip().to_string(), private_ip);
    let reg = emu.control(
        "POST",
        &format!("/_emulator/console/{id}"),
        Some(json!({ "host_keys": [host.public_key_line()], "appear_after_seconds": 1.5 })),
    );
    assert_eq!(reg["instance_id"], id.as_str());
    let listed = emu.control("GET", "/_emulator/console", None);
    assert_eq!(
        listed["instances"][&id]["host_keys"][0],
        host.public_key_line()
    );

    // The client `provision` will be: the SDK with app name "provision".
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(emu.endpoint())
        .region(aws_config::Region::new(REGION))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .app_name(aws_config::AppName::new("provision").unwrap())
        .load()
        .await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let console = |id: String| {
        let ec2 = ec2.clone();
        async move {
            let out = ec2
                .get_console_output()
                .instance_id(&id)
                .send()
                .await
                .unwrap();
            assert_eq!(out.instance_id(), Some(id.as_str()));
            assert!(out.timestamp().is_some());
            let bytes = base64_decode(out.output().expect("Output")).expect("Output is base64");
            String::from_utf8(bytes).unwrap()
        }
    };

    // Before the delay: boot lines only.
    let early = console(id.clone()).await;
    assert!(early.contains("Cloud-init v."), "{early}");
    assert!(console_keys(&early).is_none(), "{early}");
    let log = common::eventually("the host key block", Duration::from_secs(30), || {
        let console = &console;
        let id = id.clone();
        async move {
            let log = console(id).await;
            console_keys(&log).is_some().then_some(log)
        }
    })
    .await;
    assert_eq!(
        console_keys(&log).unwrap(),
        vec![host.public_key_line().to_string()]
    );
    // The fingerprint block is what ssh-keygen -l prints for that key.
    let pubfile = net.dir().join("console-key.pub");
    fs::write(&pubfile, format!("{}\n", host.public_key_line())).unwrap();
    let keygen = std::process::Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(&pubfile)
        .output()
        .unwrap();
    let fingerprint = text(&keygen.stdout).trim().to_string();
    assert!(fingerprint.ends_with("(ED25519)"), "{fingerprint}");
    let (_, fp_block) = log
        .split_once("-----BEGIN SSH HOST KEY FINGERPRINTS-----")
        .unwrap();
    let (fp_block, _) = fp_block
        .split_once("-----END SSH HOST KEY FINGERPRINTS-----")
        .unwrap();
    assert!(
        fp_block
            .lines()
            .any(|l| l.ends_with(&format!("cloud-init: {fingerprint}"))),
        "{fp_block}"
    );

    // The key from the console is the one to trust: ssh works with it.
    let known_hosts = net.dir().join("known_hosts-from-console");
    fs::write(
        &known_hosts,
        format!("{private_ip} {}\n", console_keys(&log).unwrap()[0]),
    )
    .unwrap();
    let out = ssh_echo(&host, &known_hosts);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An instance with nothing registered keeps moto's canned log.
    let canned = console(other_id.clone()).await;
    assert!(canned.contains("Linux version 2.6.16-xenU"), "{canned}");
    assert!(console_keys(&canned).is_none());

    // A registration by private IP serves the instance at that address (one registered by
    // its id keeps its own).
    // (Any valid key: the client's.)
    let other_key = fs::read_to_string(net.client_key().with_extension("pub"))
        .unwrap()
        .trim()
        .to_string();
    emu.control(
        "POST",
        &format!("/_emulator/console/address/{other_ip}"),
        Some(json!({ "host_keys": [other_key] })),
    );
    emu.control(
        "POST",
        &format!("/_emulator/console/address/{private_ip}"),
        Some(json!({ "host_keys": [other_key] })),
    );
    let by_address = console(other_id).await;
    assert_eq!(console_keys(&by_address).unwrap(), vec![other_key.clone()]);
    assert_eq!(
        console_keys(&console(id.clone()).await).unwrap(),
        vec![host.public_key_line().to_string()]
    );
    let listed = emu.control("GET", "/_emulator/console", None);
    assert_eq!(listed["addresses"][&other_ip]["host_keys"][0], other_key);

    // Calls by app: only the "provision" client's requests.
    let calls = emu.control("GET", "/_emulator/calls", None);
    let mine = &calls["by_app"]["provision"];
    assert!(
        mine["ec2:GetConsoleOutput"].as_i64().unwrap() >= 3,
        "{calls}"
    );
    assert!(mine.get("ec2:RunInstances").is_none(), "{calls}");
    assert_eq!(calls["calls"]["ec2:RunInstances"], 1, "{calls}");

    // Reset forgets the registration.
    emu.control("POST", "/moto-api/reset", None);
    let listed = emu.control("GET", "/_emulator/console", None);
    assert_eq!(listed["instances"], json!({}));
    assert_eq!(listed["addresses"], json!({}));
}

/// Figures for the report (nothing asserted about them):
/// `cargo test --test hosts -- --ignored --nocapture timings`.
#[test]
#[ignore = "prints timings; run with --ignored --nocapture"]
fn timings() {
    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }
    let t = Instant::now();
    let net = HostNet::new();
    report("HostNet::new", t.elapsed());
    let mut created = Vec::new();
    let mut hosts = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        hosts.push(net.host(net.next_ip()));
        created.push(t.elapsed());
    }
    report("net.host() (median of 5)", median(created));
    let mut starts = Vec::new();
    for h in &hosts {
        h.stop_sshd();
        let t = Instant::now();
        h.start_sshd();
        starts.push(t.elapsed());
    }
    report("start_sshd() until listening (median of 5)", median(starts));
    let refs: Vec<&SimHost> = hosts.iter().collect();
    let known_hosts = net.known_hosts(&refs);
    let mut connects = Vec::new();
    for h in &hosts {
        let t = Instant::now();
        assert!(h.ssh(&known_hosts).arg("true").status().unwrap().success());
        connects.push(t.elapsed());
    }
    report(
        "ssh HOST true, new connection (median of 5)",
        median(connects),
    );

    let inventory = net.inventory(
        &[("web1", &hosts[0]), ("web2", &hosts[1])],
        &known_hosts,
        &[("role", "web")],
    );
    let one = net.inventory(
        &[("es1", &hosts[2])],
        &known_hosts,
        &[
            ("root_dir", "{{ host_dir }}"),
            ("ecs_cluster", "prod-es"),
            ("apply_sysctl", "false"),
        ],
    );
    for pipelining in ["0", "1"] {
        for run in 1..=2 {
            let t = Instant::now();
            let mut c = net.ansible_playbook();
            c.env("ANSIBLE_PIPELINING", pipelining)
                .arg("-i")
                .arg(&inventory)
                .arg(root().join("tests/playbooks/marker.yml"));
            let out = output_within(&mut c, Duration::from_secs(300));
            assert!(out.status.success());
            report(
                &format!("marker.yml, 2 hosts, pipelining={pipelining}, run {run}"),
                t.elapsed(),
            );
        }
        let t = Instant::now();
        let mut c = net.ansible_playbook();
        c.env("ANSIBLE_PIPELINING", pipelining)
            .arg("-i")
            .arg(&one)
            .arg(root().join("playbooks/base.yml"))
            .arg(root().join("playbooks/ecs-host.yml"));
        let out = output_within(&mut c, Duration::from_secs(300));
        assert!(out.status.success(), "{}", text(&out.stdout));
        report(
            &format!("base.yml + ecs-host.yml, 1 host, pipelining={pipelining}"),
            t.elapsed(),
        );
    }
}
