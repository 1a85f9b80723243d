//! Reconcile: what Auto Scaling says, against what messages announced. A launch whose message
//! was lost is worked by the daemon's pass; a message and the reconciler racing for one
//! action (two hosts, one claims table) run its steps once; instances in service that no
//! launch run configured are reported, configured or replaced; a dry run changes nothing.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Provision, Running, World};
use serde_json::json;

const LAUNCH: &str = "autoscaling:EC2_INSTANCE_LAUNCHING";

const LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
launch = [ { tag = { Role = "web-{instance_id}" } } ]
"#;

fn stop(mut d: Running) -> String {
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(60)), 0, "{}", d.log());
    d.log()
}

/// Reconcile on: a pass every `interval`, working actions seen waiting for `grace`.
fn reconciling(p: &Provision, interval: &str, grace: &str) {
    p.set("reconcile.interval", interval);
    p.set("reconcile.grace", grace);
}

fn stdout(out: &std::process::Output) -> String {
    format!(
        "{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Waits for the launch notification(s) in the queue provision reads, and deletes them:
/// as if a purge, a refusing queue policy or a dead-letter queue had taken them.
async fn lose_messages(w: &World, n: usize) {
    let mut lost = 0;
    for _ in 0..150 {
        lost += w
            .aws
            .drain(&w.q)
            .await
            .iter()
            .filter(|b| b.contains("EC2_INSTANCE_LAUNCHING"))
            .count();
        if lost >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("only {lost} of {n} launch messages arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_whose_message_was_lost_is_completed_by_the_daemons_pass() {
    let w = World::builder("web-lost")
        .layer(LAYER)
        .instances(1)
        .start()
        .await;
    lose_messages(&w, 1).await;
    let id = w.aws.instances("web-lost").await.remove(0).0;
    let (topic, results) = w.aws.topic_with_queue("results").await;
    let p = w.provision_with(Some(&topic), LAYER);
    reconciling(&p, "1s", "2s");
    let d = p.daemon();
    // interval + grace, and room for the run itself.
    w.wait_finished_within(1, Duration::from_secs(1 + 2 + 30))
        .await;
    let log = stop(d);

    let action = &w.emu.finished_actions()[0];
    assert_eq!(action["result"], "CONTINUE", "{action}\n{log}");
    assert_eq!(action["finished_by"], "complete", "{action}");
    assert_eq!(action["completions"], 1, "{action}");
    assert_eq!(w.calls("ec2:CreateTags"), 1, "the steps ran once\n{log}");
    assert_eq!(
        w.aws.tags(&id).await.get("Role").map(String::as_str),
        Some(format!("web-{id}").as_str())
    );
    assert_eq!(w.aws.instances("web-lost").await[0].1, "InService");
    let run = p.last_run(&id, "launch");
    assert_eq!(run.outcome.as_str(), "succeeded", "{run:?}");
    assert!(
        run.error.as_deref().unwrap_or("").starts_with("reconciled"),
        "the history says the run was reconciled: {run:?}"
    );
    let published = w.aws.results(&results).await;
    let result = published
        .iter()
        .find(|r| r["type"] == "provision.result")
        .expect("a result event");
    assert_eq!(result["instance_id"], id.as_str());
    assert_eq!(result["hook_result"], "CONTINUE");
    assert!(
        result["note"]
            .as_str()
            .unwrap_or("")
            .starts_with("reconciled"),
        "{result}"
    );
    assert!(
        log.contains("reconcile: working an action no message announced"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_and_the_reconciler_on_two_hosts_run_an_actions_steps_once() {
    let w = World::builder("web-race")
        .relayed()
        .claims("6s")
        .layer(LAYER)
        .start()
        .await;
    let (emu, aws, q) = (&w.emu, &w.aws, &w.q);
    let source = w.source.as_ref().unwrap();
    aws.scale("web-race", 6).await;
    let mut bodies = Vec::new();
    for _ in 0..150 {
        bodies.extend(
            aws.drain(source)
                .await
                .into_iter()
                .filter(|b| b.contains("EC2_INSTANCE_LAUNCHING")),
        );
        if bodies.len() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(bodies.len(), 6);
    // Slow steps, so that a message's run and a pass's run overlap.
    emu.fault(json!({"service": "ec2", "action": "CreateTags", "count": -1, "delay_seconds": 2}));
    let (a, b) = (w.provision(), w.provision());
    for p in [&a, &b] {
        reconciling(p, "1s", "0s");
    }
    // Half the messages arrive as the two hosts start, the other half once the first steps
    // run: each action is in reach of both hosts' receive loops and both hosts' passes, and
    // the late messages find the passes working their actions (three only a pass can work).
    for body in &bodies[..3] {
        aws.send(q, body).await;
    }
    let (da, db) = (a.daemon(), b.daemon());
    w.wait_calls("ec2:CreateTags", 1).await;
    for body in &bodies[3..] {
        aws.send(q, body).await;
    }
    w.wait_finished_within(6, Duration::from_secs(120)).await;
    w.queue_is_empty().await;
    let logs = [stop(da), stop(db)];

    for act in emu.finished_actions() {
        assert_eq!(act["result"], "CONTINUE", "{act}\n{logs:?}");
        assert_eq!(act["completions"], 1, "completed once: {act}");
    }
    assert_eq!(
        w.calls("ec2:CreateTags"),
        6,
        "each action's steps ran once\n{}\n{}",
        logs[0],
        logs[1]
    );
    let runs: Vec<_> = a.history().into_iter().chain(b.history()).collect();
    let worked: Vec<_> = runs
        .iter()
        .filter(|r| r.outcome.as_str() == "succeeded")
        .filter_map(|r| r.instance_id.clone())
        .collect();
    let distinct: BTreeSet<_> = worked.iter().collect();
    assert_eq!(worked.len(), 6, "{runs:#?}");
    assert_eq!(distinct.len(), 6, "no instance worked twice: {runs:#?}");
    let reconciled = runs
        .iter()
        .filter(|r| r.outcome.as_str() == "succeeded")
        .filter(|r| r.error.as_deref().unwrap_or("").starts_with("reconciled"))
        .count();
    assert!(
        reconciled >= 3,
        "the passes worked the actions whose messages came late: {runs:#?}"
    );
}

/// A group whose launch hook times out with DefaultResult CONTINUE: its instances go into
/// service without any run of ours.
async fn unconfigured_world(group: &str) -> World {
    let w = World::builder(group)
        .layer(LAYER)
        .heartbeat(30)
        .start()
        .await;
    let target = w.q.arn.clone();
    w.aws
        .hook(
            group,
            "provision-launch",
            LAUNCH,
            Some(&target),
            30,
            "CONTINUE",
            None,
        )
        .await;
    w
}

/// Scales to `n` and lets the new instances' launch hooks time out (no daemon runs).
async fn into_service_unconfigured(w: &World, n: i32) -> Vec<String> {
    let before: BTreeSet<String> = w
        .aws
        .instances(&w.group)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    w.aws.scale(&w.group, n).await;
    lose_messages(w, (n as usize) - before.len()).await;
    w.emu.advance_clock(31);
    let now = w.aws.instances(&w.group).await;
    assert!(now.iter().all(|(_, s)| s == "InService"), "{now:?}");
    now.into_iter()
        .map(|(id, _)| id)
        .filter(|id| !before.contains(id))
        .collect()
}

async fn health(w: &World, id: &str) -> String {
    let out = w
        .aws
        .asg
        .describe_auto_scaling_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap();
    out.auto_scaling_instances()[0]
        .health_status()
        .unwrap_or_default()
        .to_uppercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_in_service_unconfigured_are_reported_configured_or_replaced() {
    let w = unconfigured_world("web-unconf").await;
    let first = into_service_unconfigured(&w, 1).await.remove(0);
    let (topic, results) = w.aws.topic_with_queue("results").await;
    let p = w.provision_with(Some(&topic), LAYER);

    // Default: reported, nothing changed.
    p.set("reconcile.unconfigured", "report");
    let out = p.output(&["reconcile"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let row = text
        .lines()
        .find(|l| l.contains(&first))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.starts_with("unconfigured") && row.contains("reported"),
        "{text}"
    );
    assert_eq!(w.calls("ec2:CreateTags"), 0, "{text}");
    let events = w.aws.results(&results).await;
    assert!(
        events.iter().any(|e| e["type"] == "provision.reconcile"
            && e["kind"] == "unconfigured"
            && e["instance_id"] == first.as_str()
            && e["action"] == "report"),
        "{events:?}"
    );

    // configure: the launch steps run, and the instance is marked configured.
    p.set("reconcile.unconfigured", "configure");
    let out = p.output(&["reconcile"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("running its launch steps"), "{text}");
    let tags = w.aws.tags(&first).await;
    assert_eq!(tags.get("Role"), Some(&format!("web-{first}")), "{tags:?}");
    assert!(tags.contains_key("provision:configured"), "{tags:?}");
    let out = p.output(&["reconcile"]);
    assert!(
        !stdout(&out).contains(&first),
        "configured now: {}",
        stdout(&out)
    );

    // replace: a new unconfigured instance is marked unhealthy; the configured one is not.
    p.set("reconcile.unconfigured", "replace");
    let second = into_service_unconfigured(&w, 2).await.remove(0);
    let out = p.output(&["reconcile"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("marked unhealthy"), "{text}");
    assert_eq!(health(&w, &second).await, "UNHEALTHY");
    assert_eq!(health(&w, &first).await, "HEALTHY");
    assert_eq!(w.calls("autoscaling:SetInstanceHealth"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_on_a_mixed_group_prints_each_kind_and_changes_nothing() {
    let w = unconfigured_world("web-mixed").await;
    let unconfigured = into_service_unconfigured(&w, 1).await.remove(0);
    // A second instance waits in Pending:Wait; its message is lost.
    w.aws.scale("web-mixed", 2).await;
    lose_messages(&w, 1).await;
    let waiting = w
        .aws
        .instances("web-mixed")
        .await
        .into_iter()
        .find(|(_, s)| s == "Pending:Wait")
        .expect("an instance waiting")
        .0;
    let p = w.provision();
    p.set("reconcile.unconfigured", "replace");
    let calls_before = w.emu.calls();
    let out = p.output(&["check", "--aws"]);
    let text = stdout(&out);
    assert!(
        text.contains(
            "group web-mixed: 1 waiting in a lifecycle wait state, 1 in service unconfigured"
        ),
        "{text}"
    );
    let out = p.output(&["reconcile", "--dry-run"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let row = |id: &str| {
        text.lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} in {text}"))
            .to_string()
    };
    assert!(row(&waiting).starts_with("waiting"), "{text}");
    assert!(
        row(&waiting).contains("Pending:Wait") && row(&waiting).contains("would work it"),
        "{text}"
    );
    assert!(row(&unconfigured).starts_with("unconfigured"), "{text}");
    assert!(
        row(&unconfigured).contains("would mark it unhealthy"),
        "{text}"
    );
    assert!(
        text.contains("aws calls") && text.contains("(dry run: nothing was changed)"),
        "{text}"
    );

    // Nothing changed: still waiting, nothing completed, tagged or marked.
    let now = w.aws.instances("web-mixed").await;
    assert!(
        now.contains(&(waiting.clone(), "Pending:Wait".to_string())),
        "{now:?}"
    );
    assert!(w
        .emu
        .finished_actions()
        .iter()
        .all(|a| a["finished_by"] != "complete"));
    assert_eq!(health(&w, &unconfigured).await, "HEALTHY");
    let calls = w.emu.calls();
    for op in [
        "ec2:CreateTags",
        "autoscaling:SetInstanceHealth",
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:RecordLifecycleActionHeartbeat",
    ] {
        assert_eq!(calls.get(op), calls_before.get(op), "{op}: {calls:?}");
    }
}

const OPSWORKS_METADATA: &str =
    r#"{"environment":"production","platform":"web","major":"3","role":"api"}"#;

const OPSWORKS_LAYER: &str = r#"
[layers.legacy]
groups = ["legacy-*"]
launch = [ { opsworks = { stack = "v{metadata.major} {metadata.environment} {metadata.platform}", layer = "app", region = "us-east-1", online_timeout = "30s" } } ]
terminate = [
  { tag = { Leaving = "yes" } },
  { opsworks = { stack = "v{metadata.major} {metadata.environment} {metadata.platform}", layer = "app", region = "us-east-1" } },
]
"#;

fn opsworks(w: &World, op: &str, body: serde_json::Value) -> serde_json::Value {
    w.emu
        .aws_json("opsworks", &format!("OpsWorks_20130218.{op}"), body)
}

/// Instances registered with the emulator's OpsWorks, by EC2 id.
fn registered(w: &World) -> Vec<String> {
    let ow = w.emu.control("GET", "/_emulator/opsworks", None);
    ow["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["Ec2InstanceId"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_terminated_while_the_daemon_was_down_is_deregistered_by_the_next_pass() {
    // No terminate hook: a scale-in terminates the instance at once, and nothing tells
    // provision (as when it is terminated through EC2, or the hook's message is lost).
    let w = World::builder("legacy-gone")
        .metadata(OPSWORKS_METADATA)
        .layer(OPSWORKS_LAYER)
        .start()
        .await;
    w.emu.control(
        "POST",
        "/_emulator/opsworks",
        Some(json!({"register_delay_seconds": 0.2, "online_delay_seconds": 0.2})),
    );
    let stack = opsworks(
        &w,
        "CreateStack",
        json!({"Name": "v3 production web", "Region": "us-east-1",
               "ServiceRoleArn": "arn:aws:iam::123456789012:role/opsworks",
               "DefaultInstanceProfileArn": "arn:aws:iam::123456789012:instance-profile/app"}),
    );
    opsworks(
        &w,
        "CreateLayer",
        json!({"StackId": stack["StackId"], "Type": "custom", "Name": "App", "Shortname": "app"}),
    );
    w.aws.scale("legacy-gone", 2).await;
    let p = w.provision();
    p.set("reconcile.interval", "1s");
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(registered(&w).len(), 2, "{log}");

    // While no daemon runs, one instance is terminated; the other stays in service.
    let members = w.aws.instances("legacy-gone").await;
    let (victim, stays) = (members[0].0.clone(), members[1].0.clone());
    w.aws
        .asg
        .terminate_instance_in_auto_scaling_group()
        .instance_id(&victim)
        .should_decrement_desired_capacity(true)
        .send()
        .await
        .unwrap();
    common::eventually(
        "the instance to leave its group",
        Duration::from_secs(30),
        || async {
            let now = w.aws.instances("legacy-gone").await;
            (!now.iter().any(|(id, _)| id == &victim)).then_some(())
        },
    )
    .await;
    let out = p.output(&["reconcile", "--dry-run"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let row = text
        .lines()
        .find(|l| l.contains(&victim))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.starts_with("gone")
            && row.contains("would run its terminate steps that need no instance"),
        "{text}"
    );
    assert!(row.contains("not run: tag Leaving=yes"), "{text}");
    assert_eq!(registered(&w).len(), 2, "a dry run changes nothing");

    let d = p.daemon();
    common::eventually(
        "the next pass to deregister it",
        Duration::from_secs(30),
        || async { (!registered(&w).contains(&victim)).then_some(()) },
    )
    .await;
    // Later passes find it decommissioned and leave it be.
    let passes = |log: &str| log.matches("reconcile pass done").count();
    common::eventually("two more passes", Duration::from_secs(30), || async {
        (passes(&std::fs::read_to_string(&d.log).unwrap_or_default()) >= 3).then_some(())
    })
    .await;
    let log = stop(d);
    assert_eq!(registered(&w), vec![stays.clone()], "{log}");
    assert_eq!(
        w.calls("opsworks:DeregisterInstance"),
        1,
        "deregistered once\n{log}"
    );
    let run = p.last_run(&victim, "terminate");
    assert_eq!(run.outcome.as_str(), "succeeded", "{run:?}");
    assert_eq!(run.steps.len(), 1, "only the API step ran: {run:?}");
    assert_eq!(run.steps[0].kind, "opsworks");
    assert!(
        run.error
            .as_deref()
            .unwrap_or("")
            .contains("steps that need it were not run: tag Leaving=yes"),
        "{run:?}"
    );
    assert!(!w.aws.tags(&stays).await.contains_key("Leaving"));
}

/// What each pass of a daemon cost, from its log: "N (op n, ...)" per pass, in order.
fn pass_costs(log: &str) -> Vec<(u64, String)> {
    log.lines()
        .filter(|l| l.contains("reconcile pass done"))
        .filter_map(|l| {
            let plain: String = strip_ansi(l);
            let calls = plain.split("aws_calls=").nth(1)?.trim().to_string();
            let n = calls.split(' ').next()?.parse().ok()?;
            Some((n, calls))
        })
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The cost of reconciling 10 groups of 100 instances in service, printed: the first pass
/// reads each group's hooks and asks EC2 about every instance once (100 ids a call here,
/// 200 at most); the passes after it cost one paginated DescribeAutoScalingGroups (100
/// groups a page), whatever the number of instances, while every instance carries the
/// configured mark. Bounded, not timed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_over_ten_groups_of_a_hundred_costs_a_bounded_number_of_calls() {
    // The world's own group is no layer's; the ten groups have no hooks: their instances
    // go into service at once, and no run competes with the passes.
    let w = World::builder("other-cost").layer(LAYER).start().await;
    let mut ids = Vec::new();
    for g in 0..10 {
        let name = format!("web-cost-{g}");
        w.aws.group(&name).await;
        w.aws.scale(&name, 100).await;
        ids.extend(w.aws.instances(&name).await.into_iter().map(|(id, _)| id));
    }
    assert_eq!(ids.len(), 1000);
    // Every instance as a launch run of ours leaves it: marked configured.
    for chunk in ids.chunks(200) {
        w.aws
            .ec2
            .create_tags()
            .set_resources(Some(chunk.to_vec()))
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key("provision:configured")
                    .value("web 2026-01-01T00:00:00Z")
                    .build(),
            )
            .send()
            .await
            .unwrap();
    }
    let p = w.provision();
    p.set("reconcile.interval", "1s");
    p.set("reconcile.unconfigured", "report");
    let d = p.daemon();
    common::eventually("three passes", Duration::from_secs(120), || async {
        let log = std::fs::read_to_string(&d.log).unwrap_or_default();
        (pass_costs(&log).len() >= 3).then_some(())
    })
    .await;
    let log = stop(d);
    let costs = pass_costs(&log);
    println!("reconcile, 10 groups of 100 instances in service, every one marked configured:");
    for (i, (_, calls)) in costs.iter().enumerate().take(3) {
        println!("  pass {}: {calls}", i + 1);
    }
    // First pass: one DescribeAutoScalingGroups page, ten DescribeLifecycleHooks, ten
    // DescribeInstances (one a group).
    assert!(costs[0].0 <= 21, "{costs:?}");
    // Then one call a pass.
    for (n, calls) in &costs[1..3] {
        assert_eq!(*n, 1, "{calls}");
        assert!(
            calls.contains("autoscaling:DescribeAutoScalingGroups 1"),
            "{calls}"
        );
    }
    assert!(
        !log.contains("instance in service that no launch run of ours configured"),
        "{log}"
    );
}
