//! Several ops hosts on one queue, sharing claims in a DynamoDB table (moto serves it): each
//! lifecycle action's steps run once whatever delivers it twice, and a host that dies
//! mid-step has its actions taken over by another once its claims' leases expire.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use common::{claims_table, eventually, Emulator, Provision, Running, World};
use serde_json::{json, Value};

const LAUNCH: &str = "autoscaling:EC2_INSTANCE_LAUNCHING";
const TABLE: &str = "provision-claims";

const WEB_LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
launch = [ { tag = { Name = "web-{instance_id}", Layer = "{layer}" } } ]
"#;

/// Every token's claim in the table: token -> (state, owner, lease_until ms). The action
/// keys runs hold beside their tokens while they work (`instance-action:...`) are left out.
async fn claims(db: &aws_sdk_dynamodb::Client) -> BTreeMap<String, (String, String, i64)> {
    let items = db
        .scan()
        .table_name(TABLE)
        .send()
        .await
        .unwrap()
        .items
        .unwrap_or_default();
    let s = |i: &std::collections::HashMap<String, AttributeValue>, k: &str| {
        i.get(k)
            .and_then(|v| v.as_s().ok())
            .cloned()
            .unwrap_or_default()
    };
    items
        .iter()
        .map(|i| {
            let until = i
                .get("lease_until")
                .and_then(|v| v.as_n().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            (s(i, "token"), (s(i, "state"), s(i, "owner"), until))
        })
        .filter(|(token, _)| !token.starts_with("instance-action:"))
        .collect()
}

/// An ops host: its own config, state.db and logs; claims in the shared table.
fn host(emu: &Emulator, q: &common::Queue, lease: &str) -> Provision {
    let p = Provision::new(emu, q, None, WEB_LAYER);
    p.share_claims(TABLE, lease);
    p
}

fn calls(emu: &Emulator, op: &str) -> u64 {
    emu.calls().get(op).and_then(Value::as_u64).unwrap_or(0)
}

fn stop(mut d: Running) -> String {
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(60)), 0, "{}", d.log());
    d.log()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_work_each_doubly_delivered_launch_once() {
    let w = World::builder("web-fleet")
        .relayed()
        .claims("10s")
        .layer(WEB_LAYER)
        .start()
        .await;
    let (emu, aws, q) = (&w.emu, &w.aws, &w.q);
    let (source, db) = (w.source.as_ref().unwrap(), w.claims.as_ref().unwrap());
    // The lifecycle queue is subscribed to a topic as well: a second way in.
    let topic = aws.topic_into("asg-lifecycle", q).await;
    aws.scale("web-fleet", 40).await;
    // Every launch twice: straight from the hook and through SNS (as when both a hook
    // target and an EventBridge rule or a second subscription deliver). Slow steps, and
    // the second copies sent once the first host is working the first ones, so that the
    // two copies of an action are in two hosts' hands at once. A step (14 s) outlasts the
    // 10 s lease: without its renewals the other host would take the claim over and run
    // the steps again.
    // (A lease of 10 s, not less: a renewal is given a sixth of it, and the emulator's
    // DynamoDB on a loaded 2-core machine can take over a second; a host that cannot renew
    // in time stops its steps, and an API call already sent cannot be taken back.)
    emu.fault(json!({"service": "ec2", "action": "CreateTags", "count": -1, "delay_seconds": 14}));
    let bodies = aws.launch_notifications(source, 40).await;
    for body in &bodies {
        aws.send(q, body).await;
    }
    let (a, b) = (w.provision(), w.provision());
    let da = a.daemon();
    eventually(
        "the first host to work",
        Duration::from_secs(60),
        || async { (calls(emu, "ec2:CreateTags") >= 1).then_some(()) },
    )
    .await;
    for body in &bodies {
        aws.sns
            .publish()
            .topic_arn(&topic)
            .message(body)
            .send()
            .await
            .unwrap();
    }
    let db_ = b.daemon();
    eventually(
        "all 40 actions to finish",
        Duration::from_secs(240),
        || async { (emu.finished_actions().len() == 40).then_some(()) },
    )
    .await;
    // The duplicates still held by a host come back done and are deleted.
    eventually("the queue to drain", Duration::from_secs(60), || async {
        (aws.approximate_messages(q).await == (0, 0)).then_some(())
    })
    .await;
    let logs = [stop(da), stop(db_)];

    for act in emu.finished_actions() {
        assert_eq!(act["finished_by"], "complete", "{act}");
        assert_eq!(act["result"], "CONTINUE", "{act}");
        assert_eq!(act["completions"], 1, "completed once: {act}");
    }
    assert_eq!(
        calls(emu, "ec2:CreateTags"),
        40,
        "each action's steps ran once"
    );
    let instances = aws.instances("web-fleet").await;
    assert_eq!(instances.len(), 40);
    assert!(
        instances.iter().all(|(_, s)| s == "InService"),
        "{instances:?}"
    );

    // 80 deliveries: 40 worked, 40 acknowledged as duplicates, spread over the two hosts.
    let runs: Vec<_> = a.history().into_iter().chain(b.history()).collect();
    let count = |o: &str| runs.iter().filter(|r| r.outcome.as_str() == o).count();
    assert_eq!(count("succeeded"), 40, "{runs:?}");
    assert_eq!(count("duplicate"), 40, "{runs:?}");
    let worked: BTreeSet<_> = runs
        .iter()
        .filter(|r| r.outcome.as_str() == "succeeded")
        .filter_map(|r| r.instance_id.clone())
        .collect();
    assert_eq!(worked.len(), 40, "no instance was worked twice");
    let table = claims(db).await;
    assert_eq!(table.len(), 40);
    assert!(
        table.values().all(|(state, _, _)| state == "done"),
        "{table:?}"
    );
    assert!(
        logs[1].contains("another owner works this lifecycle action"),
        "a duplicate waited for the other host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hosts_actions_are_taken_over_once_their_leases_expire() {
    let w = World::builder("web-kill")
        .claims("10s")
        .layer(WEB_LAYER)
        .start()
        .await;
    let (emu, aws, q) = (&w.emu, &w.aws, &w.q);
    let db = w.claims.as_ref().unwrap();
    aws.scale("web-kill", 4).await;
    // Every CreateTags takes 3 s, so the kill lands while steps are running.
    emu.fault(json!({"service": "ec2", "action": "CreateTags", "count": -1, "delay_seconds": 3}));
    let (a, b) = (w.provision(), w.provision());
    // Short visibility: the dead host's messages come back well before its leases expire.
    for p in [&a, &b] {
        p.set("queue.visibility_timeout", "2s");
    }
    let mut first = a.daemon();
    eventually("four running claims", Duration::from_secs(60), || async {
        let t = claims(db).await;
        (t.len() == 4 && calls(emu, "ec2:CreateTags") >= 1).then_some(())
    })
    .await;
    first.signal("KILL");
    first.wait(Duration::from_secs(10));
    let held = claims(db).await;
    emu.control("DELETE", "/_emulator/faults", None);

    let second = b.daemon();
    eventually(
        "all four actions to finish",
        Duration::from_secs(90),
        || async { (emu.finished_actions().len() == 4).then_some(()) },
    )
    .await;
    eventually("the queue to drain", Duration::from_secs(30), || async {
        (aws.approximate_messages(q).await == (0, 0)).then_some(())
    })
    .await;
    let log = stop(second);

    for act in emu.finished_actions() {
        assert_eq!(act["result"], "CONTINUE", "{act}");
        assert_eq!(act["completions"], 1, "{act}");
    }
    assert!(
        log.contains("took over a claim whose lease expired"),
        "{log}"
    );
    let noted = b
        .history()
        .iter()
        .filter(|r| {
            r.error
                .as_deref()
                .is_some_and(|e| e.contains("took over the claim of"))
        })
        .count();
    assert!(noted >= 1, "the history says which runs took a claim over");
    assert!(
        log.contains("another owner works this lifecycle action"),
        "{log}"
    );
    // Taken over only after the dead host's leases: no step of the second host started
    // before the earliest lease it found had expired.
    let expired_at = held
        .values()
        .filter(|(state, _, _)| state == "running")
        .map(|(_, _, until)| *until)
        .min()
        .expect("the dead host held running claims");
    for run in b
        .history()
        .iter()
        .filter(|r| r.outcome.as_str() == "succeeded")
    {
        for step in &run.steps {
            assert!(
                step.started_at >= expired_at,
                "{:?}: a step started at {}, before the dead host's lease ran out at {expired_at}",
                run.instance_id,
                step.started_at
            );
        }
    }
    let table = claims(db).await;
    assert!(
        table.values().all(|(state, _, _)| state == "done"),
        "{table:?}"
    );
    let instances = aws.instances("web-kill").await;
    assert_eq!(instances.len(), 4);
    assert!(
        instances.iter().all(|(_, s)| s == "InService"),
        "{instances:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_looks_at_the_claims_table() {
    let World { emu, aws, q, .. } = World::builder("web-chk").start().await;
    let p = host(&emu, &q, "60s");

    let out = p.output(&["check", "--aws"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("problem: state.claims_table: DescribeTable") && text.contains(TABLE),
        "{text}"
    );

    claims_table(&aws, TABLE).await;
    let out = p.output(&["check", "--aws"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "state.claims_table: {TABLE} is active, keyed by token, old claims expire"
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_message_leaves_no_claim_in_the_shared_table() {
    let World { emu, aws, q, .. } = World::builder("web-forge").start().await;
    let db = claims_table(&aws, TABLE).await;
    aws.scale("web-forge", 1).await;
    let p = host(&emu, &q, "60s");
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let instances = aws.instances("web-forge").await;
    assert_eq!(instances[0].1, "InService", "{log}");

    // A launch for the instance already in service, with a made-up token.
    let forged_token = "0badc0de-0000-4000-8000-000000000000";
    let body = json!({
        "Origin": "EC2", "Destination": "AutoScalingGroup",
        "LifecycleTransition": LAUNCH, "AutoScalingGroupName": "web-forge",
        "LifecycleHookName": "provision-launch", "EC2InstanceId": instances[0].0,
        "LifecycleActionToken": forged_token, "Service": "AWS Auto Scaling",
        "Time": "2026-01-01T00:00:00.000Z", "AccountId": "123456789012",
    });
    aws.send(&q, &body.to_string()).await;
    let tags_before = calls(&emu, "ec2:CreateTags");
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(calls(&emu, "ec2:CreateTags"), tags_before, "nothing ran");
    assert!(
        p.history().iter().any(|r| r.outcome.as_str() == "rejected"
            && r.error
                .as_deref()
                .is_some_and(|e| e.contains("forged or stale"))),
        "{log}"
    );
    // Nothing was claimed for it: its token was refused before any write.
    let table = claims(&db).await;
    assert!(!table.contains_key(forged_token), "{table:?}");
    assert_eq!(table.len(), 1, "{table:?}");
}

/// A step that records itself: a tick per 0.2 s for 12 s, each with its shell's pid, in a
/// file every instance's sandbox shares (the emulator's SSM agent runs it).
const TICKING_LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
on_failure = "abandon"
launch = [ { ssm = { document = "AWS-RunShellScript", parameters = { commands = ["for i in $(seq 60); do echo $$ $(date +%s%N) >> ../ticks.log; sleep 0.2; done"] } } } ]
"#;

/// Each run of the ticking step (by pid): its first and last tick, in ns.
fn tick_spans(path: &std::path::Path) -> BTreeMap<String, (u128, u128)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut spans: BTreeMap<String, (u128, u128)> = BTreeMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(pid), Some(at)) = (parts.next(), parts.next()) else {
            continue;
        };
        let at: u128 = at.parse().unwrap();
        let span = spans.entry(pid.to_string()).or_insert((at, at));
        span.0 = span.0.min(at);
        span.1 = span.1.max(at);
    }
    spans
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_cut_off_from_the_claims_table_stops_before_another_takes_over() {
    let w = World::builder("web-fence")
        .claims("10s")
        .layer(TICKING_LAYER)
        .relayed()
        .start()
        .await;
    let (emu, aws, q) = (&w.emu, &w.aws, &w.q);
    aws.scale("web-fence", 1).await;
    // The launch twice (a hook target and a second way in): each host gets a copy.
    let body = aws
        .launch_notifications(w.source.as_ref().unwrap(), 1)
        .await
        .remove(0);
    let (mut a, b) = (w.provision(), w.provision());
    a.set_env("AWS_ACCESS_KEY_ID", "AKIDCUTOFFHOSTA");
    // One message at a time: host A cannot take the second copy while it works the first.
    a.set("queue.max_in_flight", 1i64);
    aws.send(q, &body).await;
    let da = a.daemon();
    let ticks = eventually("host A's step to tick", Duration::from_secs(60), || async {
        let state = emu.control("GET", "/_emulator/ssm", None);
        let dir = state["sandbox"].as_str().map(std::path::PathBuf::from)?;
        let path = dir.join("ticks.log");
        (!tick_spans(&path).is_empty()).then_some(path)
    })
    .await;
    // Host A's claims table stops answering its writes (its renewals hang); host B gets
    // the second copy and finds the claim held.
    emu.fault(
        json!({"service": "dynamodb", "action": "UpdateItem", "count": -1,
        "delay_seconds": 30, "access_key": "AKIDCUTOFFHOSTA"}),
    );
    aws.send(q, &body).await;
    let db_ = b.daemon();
    eventually("the launch completed", Duration::from_secs(90), || async {
        (emu.finished_actions().len() == 1).then_some(())
    })
    .await;
    let (log_b, log_a) = (stop(db_), stop(da));
    let finished = emu.finished_actions();
    assert_eq!(
        finished[0]["result"], "CONTINUE",
        "{finished:?}\n{log_a}\n{log_b}"
    );
    assert_eq!(finished[0]["completions"], 1, "only one host completed");
    assert!(
        log_a.contains("the claim's lease could not be renewed before it would lapse"),
        "{log_a}"
    );
    // The steps never overlapped: host A's ticks all come before host B's first.
    let spans: Vec<(u128, u128)> = tick_spans(&ticks).into_values().collect();
    assert!(spans.len() >= 2, "{spans:?}\n{log_a}\n{log_b}");
    let mut sorted = spans.clone();
    sorted.sort();
    for pair in sorted.windows(2) {
        assert!(
            pair[0].1 < pair[1].0,
            "two runs of the step overlapped: {sorted:?}\n{log_a}\n{log_b}"
        );
    }
    // Host A was stopped midway (fewer than its 60 ticks); the run that completed ticked to
    // its end.
    let text = std::fs::read_to_string(&ticks).unwrap();
    let counts: Vec<usize> = sorted
        .iter()
        .map(|(first, _)| {
            let pid = text
                .lines()
                .find(|l| l.ends_with(&first.to_string()))
                .and_then(|l| l.split_whitespace().next())
                .unwrap();
            text.lines()
                .filter(|l| l.starts_with(&format!("{pid} ")))
                .count()
        })
        .collect();
    assert!(counts[0] < 60, "host A's step was stopped: {counts:?}");
    assert_eq!(*counts.last().unwrap(), 60, "{counts:?}");
    emu.control("DELETE", "/_emulator/faults", None);
}

/// Two ops hosts, one history table: an instance's launch worked by one host and its
/// terminate by the other both show in `provision history --instance` on either host (and
/// the filters narrow it); `--local` shows a host's own runs only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn either_host_shows_the_fleets_history_of_an_instance() {
    let w = World::builder("web-hist")
        .terminate_hook("CONTINUE")
        .instances(1)
        .start()
        .await;
    common::history_table(&w.aws, "provision-history").await;
    let layers = r#"
[layers.web]
groups = ["web-*"]
launch = [ { tag = { Layer = "{layer}" } } ]
terminate = [ { tag = { Draining = "true" } } ]
"#;
    let hosts: Vec<Provision> = (0..2)
        .map(|_| {
            let p = Provision::new(&w.emu, &w.q, None, layers);
            p.share_claims(TABLE, "10s");
            p.set("state.history_table", "provision-history");
            p
        })
        .collect();
    claims_table(&w.aws, TABLE).await;
    let id = w.aws.instances("web-hist").await[0].0.clone();

    let (code, log) = hosts[0].worker();
    assert_eq!(code, 0, "{log}");
    w.aws.scale("web-hist", 0).await;
    eventually(
        "the terminate hook to hold the instance",
        Duration::from_secs(30),
        || async {
            let all = w.aws.instances("web-hist").await;
            all.iter()
                .any(|(i, s)| *i == id && s == "Terminating:Wait")
                .then_some(())
        },
    )
    .await;
    let (code, log) = hosts[1].worker();
    assert_eq!(code, 0, "{log}");

    for (n, p) in hosts.iter().enumerate() {
        let out = p.output(&["history", "--instance", &id, "--json"]);
        assert!(out.status.success(), "{out:?}");
        let runs: Value = serde_json::from_slice(&out.stdout).unwrap();
        let transitions: BTreeSet<&str> = runs
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["outcome"] == "succeeded")
            .map(|r| r["transition"].as_str().unwrap())
            .collect();
        assert_eq!(
            transitions,
            BTreeSet::from(["launch", "terminate"]),
            "host {n} sees both hosts' runs: {runs}"
        );
        let text = p.output(&["history", "--instance", &id]);
        let text = String::from_utf8_lossy(&text.stdout).into_owned();
        assert!(
            text.contains("HOST") && text.contains("terminate"),
            "{text}"
        );

        let none = p.output(&["history", "--group", "web-other", "--json"]);
        assert_eq!(String::from_utf8_lossy(&none.stdout).trim(), "[]");
        let failed = p.output(&["history", "--outcome", "failed", "--json"]);
        assert_eq!(String::from_utf8_lossy(&failed.stdout).trim(), "[]");
    }
    // Each host's own history holds only what it worked.
    let own = hosts[0].output(&["history", "--instance", &id, "--local", "--json"]);
    let runs: Value = serde_json::from_slice(&own.stdout).unwrap();
    assert!(
        runs.as_array()
            .unwrap()
            .iter()
            .all(|r| r["transition"] != "terminate"),
        "{runs}"
    );
}
