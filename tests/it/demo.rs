//! The demo (`./scripts/demo`, README's first command), on the tests' own support: an
//! emulated AWS account with a queue, a group and lifecycle hooks; the provision daemon
//! configures three launches and one termination while you watch. Run as root, it also
//! configures three simulated instances (each a real sshd in its own network namespace) with
//! an `ansible` step: the main path, with its figures. Not a test: ignored, and run by
//! scripts/demo (`--ignored --nocapture`).

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::common::hosts::HostNet;
use crate::common::sim::{ansible_logs, reach_simulated_hosts, simulate_instances};
use crate::common::{eventually, path_str, Running, World, LAUNCH};

const GROUP: &str = "web-demo";
const APP: &str = "app-demo";
const METADATA: &str = r#"{"environment":"demo","platform":"web","major":"3"}"#;

const WEB_LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
on_failure = "abandon"
launch = [ { tag = { Name = "web-{instance_id}", Environment = "{metadata.environment}", Stack = "v{metadata.major} {metadata.environment} {metadata.platform}" } } ]
terminate = [ { tag = { Draining = "true" } } ]
"#;

const APP_LAYER: &str = r#"
[layers.app]
groups = ["app-*"]
vars = { role = "[a-z]{1,16}" }
launch = [ { ansible = "marker.yml", vars = { role = "{metadata.role}", sim_root = "SIM_ROOT" } } ]
"#;

fn say(text: &str) {
    println!("\n== {text}");
}

async fn in_service(w: &World, group: &str, n: usize) {
    let what = format!("{n} {group} instances InService");
    eventually(&what, Duration::from_secs(180), || async {
        let all = w.aws.instances(group).await;
        (all.len() == n && all.iter().all(|(_, s)| s == "InService")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the demo: ./scripts/demo runs it"]
async fn demo() {
    say("starting the AWS emulator (moto + lifecycle hooks) on 127.0.0.1");
    let mut w = World::builder(GROUP)
        .heartbeat(120)
        .metadata(METADATA)
        .terminate_hook("ABANDON")
        .start()
        .await;
    // Kept after the demo: its config, state.db and logs.
    w.emu.dir.disable_cleanup(true);
    let (topic, results) = w.aws.topic_with_queue("provision-results").await;
    println!(
        "queue {}\ngroup {GROUP} with launch and terminate hooks -> queue, metadata {METADATA}",
        w.q.url
    );
    // As root, a second group whose instances are simulated hosts.
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let net = root.then(HostNet::new);
    let mut p = w.provision_with(Some(&topic), WEB_LAYER);
    p.set_env("RUST_LOG", "provision=info,warn");
    p.set("queue.wait_time", "2s");
    let sim_root = w.emu.dir.path().join("sim");
    if let Some(net) = &net {
        w.aws.group_in(APP, &net.vpc_cidr(), &net.cidr()).await;
        let role = Some(r#"{"role":"api"}"#);
        let hook = "provision-launch";
        w.aws
            .hook(APP, hook, LAUNCH, Some(&w.q.arn), 300, "ABANDON", role)
            .await;
        p.merge(&APP_LAYER.replace("SIM_ROOT", path_str(&sim_root)));
        reach_simulated_hosts(&mut p, net);
        println!(
            "group {APP} in {}: its instances will be simulated hosts (sshd in network namespaces)",
            net.cidr()
        );
    }
    println!("config {}", p.config.display());

    say("starting `provision daemon` (its log follows)");
    let child = p.command(&["daemon"]).stdin(Stdio::null()).spawn().unwrap();
    let mut daemon = Running {
        child,
        log: p.dir.join("daemon.log"),
    };

    say(&format!(
        "scaling {GROUP} out to 3: new instances wait in Pending:Wait"
    ));
    w.aws.scale(GROUP, 3).await;
    for (id, state) in w.aws.instances(GROUP).await {
        println!("  {id}  {state}");
    }
    in_service(&w, GROUP, 3).await;
    say("every hook completed with CONTINUE; instances are InService and tagged");
    for (id, state) in w.aws.instances(GROUP).await {
        println!("  {id}  {state:10}  {:?}", w.aws.tags(&id).await);
    }

    let victim = w.aws.instances(GROUP).await.remove(0).0;
    say(&format!(
        "terminating {victim}: it waits in Terminating:Wait for the decommission steps"
    ));
    w.aws
        .asg
        .terminate_instance_in_auto_scaling_group()
        .instance_id(&victim)
        .should_decrement_desired_capacity(true)
        .send()
        .await
        .unwrap();
    eventually(
        "the instance to leave the group",
        Duration::from_secs(60),
        || async {
            let gone = !w
                .aws
                .instances(GROUP)
                .await
                .iter()
                .any(|(id, _)| *id == victim);
            gone.then_some(())
        },
    )
    .await;
    let state = w.aws.instance_state(&victim).await;
    println!("  {victim}  {state}, tags {:?}", w.aws.tags(&victim).await);

    match &net {
        Some(net) => ansible_part(&w, net, &sim_root, &p).await,
        None => {
            say("skipped: the ansible part");
            println!(
                "  An `ansible` step needs instances to reach over SSH; the demo simulates them as sshd\n  \
                 processes in network namespaces, which only root may create. Run `sudo ./scripts/demo`\n  \
                 to see three instances configured by one batched ansible-playbook run (Mitogen)."
            );
        }
    }

    say("result events published to the SNS topic");
    for e in w.aws.results(&results).await {
        println!(
            "  {}  {:9}  {:9}  hook {}",
            e["instance_id"].as_str().unwrap_or_default(),
            e["transition"].as_str().unwrap_or_default(),
            e["outcome"].as_str().unwrap_or_default(),
            e["hook_result"].as_str().unwrap_or_default()
        );
    }

    say("stopping the daemon (SIGTERM)");
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(60)), 0);

    say("provision history");
    let out = p.output(&["history"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "\nDone. Files in {}; try: target/debug/provision --config {} history --json",
        p.dir.display(),
        p.config.display()
    );
}

async fn ansible_part(
    w: &World,
    net: &HostNet,
    sim_root: &std::path::Path,
    p: &crate::common::Provision,
) {
    say(&format!(
        "scaling {APP} out to 3: each instance a simulated host, configured by an ansible step"
    ));
    w.aws.scale(APP, 3).await;
    let hosts =
        simulate_instances((&w.emu, &w.aws, net), APP, sim_root, |net, ip| net.host(ip)).await;
    for (id, host) in &hosts {
        println!("  {id}  {}  sshd up, host key on the console", host.ip());
    }
    in_service(w, APP, 3).await;
    say("batched ansible-playbook runs configured the three; each wrote its marker through its own sshd");
    for (id, _) in &hosts {
        let marker = std::fs::read_to_string(sim_root.join(id).join("marker")).unwrap_or_default();
        println!(
            "  {id}  {}",
            marker.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
    let actions: Vec<Value> = w
        .emu
        .actions()
        .into_iter()
        .filter(|a| a["group"] == APP)
        .collect();
    let first = actions
        .iter()
        .filter_map(|a| a["created"].as_f64())
        .fold(f64::MAX, f64::min);
    let last = actions
        .iter()
        .filter_map(|a| a["finished"].as_f64())
        .fold(0.0, f64::max);
    let mut logs = ansible_logs(p);
    logs.sort();
    let log = logs.last().expect("an ansible-playbook run");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let head = |key: &str| {
        text.lines()
            .take_while(|l| !l.trim().is_empty())
            .find_map(|l| l.strip_prefix(&format!("{key}: ")).map(str::trim))
            .unwrap_or_default()
            .to_string()
    };
    println!(
        "  first launch message -> last InService   {:.1} s",
        last - first
    );
    println!(
        "  ansible-playbook runs                    {} (strategy {}, pipelining {})",
        logs.len(),
        head("strategy"),
        head("pipelining")
    );
    println!(
        "  the run's full output                    {}",
        log.display()
    );
}
