//! Only genuine lifecycle actions, at a bounded cost: a message's token is proven to be its
//! instance's active action before anything is stored or runs for it, and junk costs a
//! bounded number of AWS calls (the emulator on 127.0.0.1, the real binary).

use crate::common;

use std::time::Duration;

use common::{backdated, eventually, Emulator, Provision, World};
use serde_json::Value;

const METADATA: &str = r#"{"environment":"production"}"#;

const WEB_LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
on_failure = "abandon"
launch = [ { tag = { Name = "web-{instance_id}", Environment = "{metadata.environment}" } } ]
"#;

/// `body` with another token, as a sender that can write to the queue would forge it.
fn with_token(body: &str, token: &str) -> String {
    let mut v: Value = serde_json::from_str(body).unwrap();
    v["LifecycleActionToken"] = token.into();
    v.to_string()
}

fn calls(emu: &Emulator, op: &str) -> u64 {
    emu.provision_calls()
        .get(op)
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_token_for_a_waiting_instance_runs_nothing_alone_or_beside_the_genuine_one() {
    let w = World::builder("web-t")
        .metadata(METADATA)
        .relayed()
        .start()
        .await;
    let (emu, aws, q) = (&w.emu, &w.aws, &w.q);
    let (topic, results) = aws.topic_with_queue("results").await;
    let p = Provision::new(emu, q, Some(&topic), WEB_LAYER);
    aws.scale("web-t", 1).await;
    let genuine = aws
        .launch_notifications(w.source.as_ref().unwrap(), 1)
        .await
        .remove(0);
    let (instance, state) = aws.instances("web-t").await.remove(0);
    assert_eq!(state, "Pending:Wait");

    // Alone: a copy of the genuine message with a token of the sender's choosing. Nothing
    // runs, nothing is completed, no result event, and the instance still waits.
    let forged = with_token(&genuine, "0badf00d-0000-4000-8000-000000000001");
    aws.send(q, &forged).await;
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(calls(emu, "ec2:CreateTags"), 0, "{log}");
    assert!(emu.finished_actions().is_empty(), "{log}");
    assert_eq!(aws.instances("web-t").await[0].1, "Pending:Wait");
    assert!(aws.results(&results).await.is_empty(), "no result event");
    let rejected = p.history();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].outcome.as_str(), "rejected");
    let why = rejected[0].error.as_deref().unwrap();
    assert!(
        why.contains("not the instance's active lifecycle action"),
        "{why}"
    );

    // Beside the genuine message: a forged copy sent an hour ago (it would be heartbeated at
    // once), another fresh one, and the genuine one, all in one receive.
    let aged = backdated(
        &with_token(&genuine, "0badf00d-0000-4000-8000-000000000002"),
        Duration::from_secs(3600),
    );
    let fresh = with_token(&genuine, "0badf00d-0000-4000-8000-000000000003");
    for body in [&aged, &fresh, &genuine] {
        aws.send(q, body).await;
    }
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    // The genuine launch ran its step once and was completed CONTINUE.
    assert_eq!(calls(emu, "ec2:CreateTags"), 1, "{log}");
    let finished = emu.finished_actions();
    assert_eq!(finished.len(), 1, "{finished:?}");
    assert_eq!(finished[0]["result"], "CONTINUE");
    assert_eq!(
        aws.tags(&instance).await.get("Name"),
        Some(&format!("web-{instance}"))
    );
    // One result event, the genuine one's: no false "failed" for a healthy instance.
    let events = aws.results(&results).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["outcome"], "succeeded", "{events:?}");
    let history = p.history();
    let outcomes: Vec<&str> = history.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == "rejected").count(),
        3,
        "{history:?}"
    );
    assert_eq!(outcomes.iter().filter(|o| **o == "succeeded").count(), 1);
    assert!(
        history.iter().any(|r| r
            .error
            .as_deref()
            .is_some_and(|e| e.contains("heartbeat timeout"))),
        "the aged copy's reason says it would have timed out: {history:?}"
    );
}

/// The peak resident memory of a running process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// 1,000 junk messages of five kinds: 100 each that cost a call to tell apart from the
/// genuine (a random group a layer's glob takes, a hook the group lacks, a forged token
/// for a waiting instance), 700 that cost none (a group no layer takes, fields of 200 KB).
fn junk(genuine: &[String]) -> Vec<String> {
    let huge = "9".repeat(200_000);
    let mut out = Vec::new();
    for i in 0..1000usize {
        let mut v: Value = serde_json::from_str(&genuine[i % genuine.len()]).unwrap();
        let token = format!("0badf00d-0000-4000-8000-{i:012}");
        v["LifecycleActionToken"] = token.into();
        match i % 10 {
            0 => v["AutoScalingGroupName"] = format!("web-junk-{i}").into(),
            1 => v["LifecycleHookName"] = format!("made-up-{i}").into(),
            2 => {}
            3..=6 => v["AutoScalingGroupName"] = format!("other-{i}").into(),
            7 | 8 => v["Time"] = huge.clone().into(),
            _ => v["AccountId"] = huge.clone().into(),
        }
        out.push(v.to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_junk_costs_a_bounded_number_of_calls_and_genuine_launches_complete() {
    let w = World::builder("web-flood")
        .metadata(METADATA)
        .relayed()
        .start()
        .await;
    let (emu, aws, q) = (&w.emu, &w.aws, &w.q);
    aws.scale("web-flood", 5).await;
    let genuine = aws
        .launch_notifications(w.source.as_ref().unwrap(), 5)
        .await;
    assert_eq!(genuine.len(), 5);
    let junk = junk(&genuine);
    // The genuine messages in the middle of the flood.
    for (i, body) in junk.iter().enumerate() {
        aws.send(q, body).await;
        if i % 200 == 100 {
            aws.send(q, &genuine[i / 200]).await;
        }
    }
    let p = Provision::new(emu, q, None, WEB_LAYER);
    let started = std::time::Instant::now();
    let d = p.daemon();
    eventually(
        "the five genuine launches completed and the queue empty",
        Duration::from_secs(240),
        || async {
            let done = emu.finished_actions().len() == 5;
            (done && aws.approximate_messages(q).await == (0, 0)).then_some(())
        },
    )
    .await;
    let took = started.elapsed();
    let peak = peak_rss_kib(d.child.id());
    let mut d = d;
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(60)), 0, "{}", d.log());
    let log = d.log();
    for a in emu.finished_actions() {
        assert_eq!(a["result"], "CONTINUE", "{a}");
    }
    assert_eq!(
        calls(emu, "ec2:CreateTags"),
        5,
        "only the genuine were tagged"
    );
    let by_op = emu.provision_calls();
    let autoscaling: u64 = by_op
        .iter()
        .filter(|(op, _)| op.starts_with("autoscaling:"))
        .filter_map(|(_, n)| n.as_u64())
        .sum();
    // At most one call of each kind per junk message that costs anything: the description
    // of its group's hooks (100 unknown groups, 100 made-up hooks), the proof's heartbeat
    // (100 forged tokens), the member list (shared, read at most every 2 s). Before, an
    // unconfirmed message cost 3 to 4 calls, and invalidated the shared lists.
    let n = |op: &str| calls(emu, op);
    assert!(n("autoscaling:DescribeLifecycleHooks") <= 201, "{by_op:?}");
    assert!(
        n("autoscaling:RecordLifecycleActionHeartbeat") <= 100 + 5 * 2,
        "{by_op:?}"
    );
    assert!(
        n("autoscaling:DescribeAutoScalingGroups") <= 100 + 5,
        "{by_op:?}"
    );
    assert_eq!(
        n("autoscaling:DescribeAutoScalingInstances"),
        0,
        "{by_op:?}"
    );
    let rows = p.history().len();
    assert!(rows <= 1005, "{rows}");
    println!(
        "junk flood: 1000 junk + 5 genuine messages, worked in {took:.0?}; Auto Scaling calls {autoscaling} ({:.2} per junk message), all calls {by_op:?}; history rows {rows}; daemon peak RSS {:.1} MiB",
        autoscaling as f64 / 1000.0,
        peak as f64 / 1024.0
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_announced_before_the_descriptions_show_it_waiting_is_proven_and_worked() {
    // AWS's descriptions lag the notification: for 20 s the instance still shows `Pending`
    // (not `Pending:Wait`) while its launch action is already active.
    let w = World::builder("web-lag").metadata(METADATA).start().await;
    let (emu, aws, q) = (&w.emu, &w.aws, &w.q);
    emu.control(
        "POST",
        "/_emulator/lag",
        Some(serde_json::json!({"describe_seconds": 20})),
    );
    aws.scale("web-lag", 1).await;
    let (instance, state) = aws.instances("web-lag").await.remove(0);
    assert_eq!(state, "Pending", "the descriptions lag");
    let p = Provision::new(emu, q, None, WEB_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    // Not rejected (and so not dead-lettered into the hook's DefaultResult): the heartbeat
    // proved the action, and the history says the descriptions had not caught up.
    let finished = emu.finished_actions();
    assert_eq!(finished.len(), 1, "{log}");
    assert_eq!(finished[0]["result"], "CONTINUE");
    assert_eq!(
        aws.tags(&instance).await.get("Name"),
        Some(&format!("web-{instance}"))
    );
    let run = p.last_run(&instance, "launch");
    assert_eq!(run.outcome.as_str(), "succeeded", "{run:?}");
    let note = run.error.as_deref().unwrap_or_default();
    assert!(note.contains("did not show the action yet"), "{run:?}");
}
