//! The whole pipeline against the emulator: real AWS SDK, real `provision` binary, a moto
//! server extended with lifecycle hooks (tests/emulator/emulator.py). Each test has its own
//! emulator process on its own port.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{backdated, eventually, Aws, Emulator, Provision, Queue, World, LAUNCH, TERMINATE};
use serde_json::{json, Value};

const METADATA: &str = r#"{"environment":"production","platform":"web","major":"3"}"#;

const WEB_LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
on_failure = "abandon"
launch = [ { tag = { Name = "web-{instance_id}", Environment = "{metadata.environment}", Layer = "{layer}" } } ]
terminate = [ { tag = { Draining = "true" } } ]
"#;

fn outcomes(p: &Provision) -> Vec<(String, Option<String>)> {
    p.history()
        .into_iter()
        .map(|r| {
            (
                r.outcome.as_str().to_string(),
                r.hook_result.map(|c| c.as_str().to_string()),
            )
        })
        .collect()
}

fn count(p: &Provision, outcome: &str) -> usize {
    p.history()
        .iter()
        .filter(|r| r.outcome.as_str() == outcome)
        .count()
}

async fn assert_in_service_and_tagged(aws: &Aws, group: &str, n: usize) -> Vec<String> {
    let instances = aws.instances(group).await;
    assert_eq!(instances.len(), n, "{instances:?}");
    for (id, state) in &instances {
        assert_eq!(state, "InService", "{id}");
        let tags = aws.tags(id).await;
        assert_eq!(
            tags.get("Name"),
            Some(&format!("web-{id}")),
            "{id}: {tags:?}"
        );
        assert_eq!(
            tags.get("Environment").map(String::as_str),
            Some("production")
        );
        assert_eq!(tags.get("Layer").map(String::as_str), Some("web"));
    }
    instances.into_iter().map(|(id, _)| id).collect()
}

/// A web group of `instances` instances, its hook carrying METADATA.
async fn web(group: &str, instances: i32) -> World {
    let w = World::builder(group).metadata(METADATA);
    w.instances(instances).start().await
}

/// A web group whose hook notifies a queue of the test's own (returned), from which the test
/// relays (or tampers with) messages to provision's queue.
async fn relayed(group: &str, heartbeat: i32) -> (World, Queue) {
    let w = World::builder(group)
        .heartbeat(heartbeat)
        .metadata(METADATA);
    let mut w = w.relayed().start().await;
    let source = w.source.take().unwrap();
    (w, source)
}

async fn queue_is_empty(aws: &Aws, q: &Queue) {
    eventually("queue to be empty", Duration::from_secs(10), || async {
        (aws.approximate_messages(q).await == (0, 0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_of_three_is_tagged_completed_recorded_and_published() {
    let World { emu, aws, q, .. } = web("web-prod", 3).await;
    let (topic, results) = aws.topic_with_queue("results").await;
    let pending = aws.instances("web-prod").await;
    assert!(
        pending.iter().all(|(_, s)| s == "Pending:Wait"),
        "{pending:?}"
    );

    let p = Provision::new(&emu, &q, Some(&topic), WEB_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "worker failed:\n{log}");

    let ids: BTreeSet<String> = assert_in_service_and_tagged(&aws, "web-prod", 3)
        .await
        .into_iter()
        .collect();
    let runs = p.history();
    let done: Vec<_> = runs
        .iter()
        .filter(|r| r.outcome.as_str() == "succeeded")
        .collect();
    assert_eq!(done.len(), 3, "{:?}", outcomes(&p));
    for r in &done {
        assert_eq!(r.hook_result.map(|c| c.as_str()), Some("CONTINUE"));
        assert_eq!(r.layer.as_deref(), Some("web"));
        assert_eq!(r.steps.len(), 1);
        assert_eq!(r.steps[0].outcome, "succeeded");
    }
    assert_eq!(
        count(&p, "skipped"),
        1,
        "the hook's test notification is skipped"
    );

    let events = aws.results(&results).await;
    assert_eq!(events.len(), 3, "{events:?}");
    let published: BTreeSet<String> = events
        .iter()
        .map(|e| e["instance_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(published, ids);
    for e in &events {
        assert_eq!(e["type"], "provision.result");
        assert_eq!(e["outcome"], "succeeded");
        assert_eq!(e["hook_result"], "CONTINUE");
        assert_eq!(e["steps"][0]["kind"], "tag");
    }

    let actions = emu.finished_actions();
    assert_eq!(actions.len(), 3);
    for a in &actions {
        assert_eq!(a["result"], "CONTINUE");
        assert_eq!(a["finished_by"], "complete");
        assert_eq!(a["completions"], 1);
    }
    queue_is_empty(&aws, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launches_through_sns_are_handled() {
    let emu = Emulator::start();
    let aws = Aws::new(&emu).await;
    let q = aws.queue("lifecycle").await;
    let topic = aws.topic_into("asg-lifecycle", &q).await;
    aws.group("web-sns").await;
    aws.hook(
        "web-sns",
        "provision-launch",
        LAUNCH,
        Some(&topic),
        300,
        "ABANDON",
        Some(METADATA),
    )
    .await;
    aws.scale("web-sns", 2).await;

    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_in_service_and_tagged(&aws, "web-sns", 2).await;
    assert_eq!(count(&p, "succeeded"), 2, "{:?}", outcomes(&p));
    assert_eq!(count(&p, "skipped"), 1, "SNS-wrapped test notification");
    queue_is_empty(&aws, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launches_through_eventbridge_are_handled() {
    let emu = Emulator::start();
    let aws = Aws::new(&emu).await;
    let q = aws.queue("lifecycle").await;
    // A rule on the default bus for Auto Scaling lifecycle events, targeting the queue.
    emu.aws_json(
        "events",
        "AWSEvents.PutRule",
        json!({"Name": "asg-lifecycle", "EventPattern": json!({"source": ["aws.autoscaling"], "detail-type": ["EC2 Instance-launch Lifecycle Action"]}).to_string()}),
    );
    emu.aws_json(
        "events",
        "AWSEvents.PutTargets",
        json!({"Rule": "asg-lifecycle", "Targets": [{"Id": "q", "Arn": q.arn}]}),
    );
    aws.group("web-eb").await;
    // No notification target: the event reaches the queue only through EventBridge.
    aws.hook(
        "web-eb",
        "provision-launch",
        LAUNCH,
        None,
        300,
        "ABANDON",
        Some(METADATA),
    )
    .await;
    aws.scale("web-eb", 2).await;

    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_in_service_and_tagged(&aws, "web-eb", 2).await;
    assert_eq!(count(&p, "succeeded"), 2, "{:?}", outcomes(&p));
    assert_eq!(
        count(&p, "skipped"),
        0,
        "EventBridge sends no test notification"
    );
    queue_is_empty(&aws, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_runs_decommission_steps_then_lets_the_instance_go() {
    let World { emu, aws, q, .. } = World::builder("web-t")
        .metadata(METADATA)
        .terminate_hook("CONTINUE")
        .instances(1)
        .start()
        .await;
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    assert_eq!(p.worker().0, 0);
    let id = assert_in_service_and_tagged(&aws, "web-t", 1)
        .await
        .remove(0);

    aws.asg
        .terminate_instance_in_auto_scaling_group()
        .instance_id(&id)
        .should_decrement_desired_capacity(true)
        .send()
        .await
        .unwrap();
    assert_eq!(
        aws.instances("web-t").await,
        vec![(id.clone(), "Terminating:Wait".to_string())]
    );
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");

    let term = p
        .history()
        .into_iter()
        .find(|r| r.transition.as_deref() == Some("terminate"))
        .expect("a terminate run");
    assert_eq!(term.outcome.as_str(), "succeeded");
    assert_eq!(term.hook_result.map(|c| c.as_str()), Some("CONTINUE"));
    assert_eq!(term.steps[0].description, "tag Draining=true");
    assert_eq!(
        aws.tags(&id).await.get("Draining").map(String::as_str),
        Some("true")
    );
    eventually(
        "the instance to be terminated",
        Duration::from_secs(10),
        || async { (aws.instance_state(&id).await == "terminated").then_some(()) },
    )
    .await;
    assert!(aws.instances("web-t").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_messages_are_worked_once() {
    let (World { emu, aws, q, .. }, source) = relayed("web-dup", 300).await;
    aws.scale("web-dup", 1).await;
    let launch = aws
        .drain(&source)
        .await
        .into_iter()
        .find(|b| b.contains("EC2_INSTANCE_LAUNCHING"))
        .expect("launch message");
    // At-least-once delivery, exaggerated: the same body four times, plus once more later.
    for _ in 0..4 {
        aws.send(&q, &launch).await;
    }
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    aws.send(&q, &launch).await;
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");

    assert_eq!(count(&p, "succeeded"), 1, "{:?}", outcomes(&p));
    assert_eq!(count(&p, "duplicate"), 4, "{:?}", outcomes(&p));
    let actions = emu.finished_actions();
    assert_eq!(actions.len(), 1);
    assert_eq!(actions[0]["completions"], 1, "completed exactly once");
    let tags = emu.calls().get("ec2:CreateTags").cloned();
    assert_eq!(tags, Some(json!(1)), "steps ran once");
    queue_is_empty(&aws, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_a_reason_and_do_not_loop() {
    let emu = Emulator::start();
    let aws = Aws::new(&emu).await;
    let q = aws.queue("lifecycle").await;
    let dir = common::root().join("tests/fixtures/events/bad");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for path in &names {
        aws.send(&q, &std::fs::read_to_string(path).unwrap()).await;
    }
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let (code, log) = p.worker();
    assert_eq!(
        code, 0,
        "rejects are handled (recorded and deleted):\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");

    let runs = p.history();
    assert_eq!(
        runs.len(),
        names.len(),
        "one record per message: {:?}",
        outcomes(&p)
    );
    let rejected: Vec<_> = runs
        .iter()
        .filter(|r| r.outcome.as_str() == "rejected")
        .collect();
    assert_eq!(rejected.len(), 6, "{:?}", outcomes(&p));
    assert_eq!(
        count(&p, "skipped"),
        1,
        "the EC2 state-change event is skipped"
    );
    for r in &rejected {
        let e = r.error.as_deref().unwrap_or_default();
        assert!(e.len() > 10, "reason too thin: {e:?}");
    }
    assert!(rejected
        .iter()
        .any(|r| r.error.as_deref().unwrap().contains("i-[0-9a-f]{8,17}")));
    assert!(log.contains("rejected message"), "{log}");
    queue_is_empty(&aws, &q).await;
    // Nothing was completed or tagged on behalf of garbage.
    assert!(emu
        .calls()
        .keys()
        .all(|k| !k.starts_with("autoscaling:Complete") && k != "ec2:CreateTags"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_abandons_and_the_replacement_is_handled() {
    let World { emu, aws, q, .. } = web("web-f", 1).await;
    let first = aws.instances("web-f").await.remove(0).0;
    // The first CreateTags fails with a server error, and this config gives up at once.
    emu.fault(json!({"service": "ec2", "action": "CreateTags", "count": 1, "error": "server"}));
    let p = Provision::new(
        &emu,
        &q,
        None,
        &format!("[aws]\nmax_attempts = 1\nretry_for = \"0s\"\n{WEB_LAYER}"),
    );
    let mut daemon = p.daemon();
    eventually(
        "the replacement to be InService",
        Duration::from_secs(60),
        || async {
            let inst = aws.instances("web-f").await;
            (inst.len() == 1 && inst[0].0 != first && inst[0].1 == "InService").then_some(())
        },
    )
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(30)), 0, "{}", daemon.log());

    let runs = p.history();
    let failed = runs
        .iter()
        .find(|r| r.outcome.as_str() == "failed")
        .expect("a failed run");
    assert_eq!(failed.instance_id.as_deref(), Some(first.as_str()));
    assert_eq!(failed.hook_result.map(|c| c.as_str()), Some("ABANDON"));
    assert!(
        failed.error.as_deref().unwrap().contains("CreateTags"),
        "{:?}",
        failed.error
    );
    assert_eq!(failed.steps[0].outcome, "failed");
    assert_eq!(count(&p, "succeeded"), 1, "{:?}", outcomes(&p));
    assert_eq!(aws.instance_state(&first).await, "terminated");
    assert_in_service_and_tagged(&aws, "web-f", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_a_long_run_alive() {
    // AWS's shortest heartbeat timeout, 30 s (provision beats every 10 s, jittered); the
    // step takes 32 s, room for two beats. After each heartbeat Auto Scaling's clock jumps
    // 10 s ahead, so the action is over 50 s old by the end: without heartbeats it would
    // have timed out (ABANDON) long before.
    let World { emu, aws, q, .. } = World::builder("web-hb")
        .heartbeat(30)
        .metadata(METADATA)
        .instances(1)
        .start()
        .await;
    emu.fault(json!({"service": "ec2", "action": "CreateTags", "count": 1, "delay_seconds": 32}));
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let mut daemon = p.daemon();
    emu.age_between_heartbeats(2, 10).await;
    eventually("the action to finish", Duration::from_secs(60), || async {
        (emu.finished_actions().len() == 1).then_some(())
    })
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(30)), 0, "{}", daemon.log());

    let actions = emu.finished_actions();
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(actions[0]["finished_by"], "complete", "{actions:?}");
    assert_eq!(actions[0]["result"], "CONTINUE");
    let beats = actions[0]["heartbeats"].as_u64().unwrap();
    assert!(beats >= 2, "heartbeats: {beats}");
    let run = p
        .history()
        .into_iter()
        .find(|r| r.outcome.as_str() == "succeeded")
        .unwrap();
    assert!(
        run.heartbeats >= 2 && run.heartbeats as u64 <= beats,
        "{} vs {beats}",
        run.heartbeats
    );
    assert_in_service_and_tagged(&aws, "web-hb", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_restart_completes_every_action_once() {
    let World { emu, aws, q, .. } = web("web-k", 4).await;
    // Every CreateTags takes 3 s, so the kill lands while steps are running.
    emu.fault(json!({"service": "ec2", "action": "CreateTags", "count": -1, "delay_seconds": 3}));
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    // A short visibility timeout, so the killed worker's messages come back soon.
    p.set("queue.visibility_timeout", "4s");
    let mut first = p.daemon();
    eventually("steps to be running", Duration::from_secs(30), || async {
        (emu.calls()
            .get("ec2:CreateTags")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            >= 2)
            .then_some(())
    })
    .await;
    first.signal("KILL");
    first.wait(Duration::from_secs(10));
    emu.control("DELETE", "/_emulator/faults", None);

    let mut second = p.daemon();
    eventually(
        "all four actions to finish",
        Duration::from_secs(60),
        || async { (emu.finished_actions().len() == 4).then_some(()) },
    )
    .await;
    second.signal("TERM");
    assert_eq!(second.wait(Duration::from_secs(30)), 0, "{}", second.log());

    for a in emu.finished_actions() {
        assert_eq!(a["finished_by"], "complete", "{a}");
        assert_eq!(a["result"], "CONTINUE", "{a}");
        assert_eq!(a["completions"], 1, "{a}");
    }
    assert_in_service_and_tagged(&aws, "web-k", 4).await;
    queue_is_empty(&aws, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_work_in_flight_and_exits_zero() {
    let World { emu, aws, q, .. } = web("web-s", 2).await;
    emu.fault(json!({"service": "ec2", "action": "CreateTags", "count": -1, "delay_seconds": 20}));
    let p = Provision::new(
        &emu,
        &q,
        None,
        &format!("[daemon]\nshutdown_grace = \"1s\"\n{WEB_LAYER}"),
    );
    let mut daemon = p.daemon();
    eventually(
        "both steps to be running",
        Duration::from_secs(30),
        || async {
            (emu.calls()
                .get("ec2:CreateTags")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                >= 2)
                .then_some(())
        },
    )
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(15)), 0, "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("releasing unfinished events"), "{log}");

    // Released at once (visibility 0), not after the 30 s visibility timeout.
    eventually(
        "both messages to be visible again",
        Duration::from_secs(5),
        || async { (aws.approximate_messages(&q).await.0 == 2).then_some(()) },
    )
    .await;
    assert!(emu.finished_actions().is_empty(), "nothing was completed");
    assert_eq!(count(&p, "released"), 2, "{:?}", outcomes(&p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_is_retried_with_backoff() {
    let World { emu, aws, q, .. } = web("web-th", 1).await;
    // More throttles than the SDK's 5 attempts: our own backoff carries on.
    emu.fault(json!({"service": "ec2", "action": "CreateTags", "count": 7, "error": "throttle"}));
    emu.fault(json!({"service": "autoscaling", "action": "CompleteLifecycleAction", "count": 2, "error": "throttle"}));
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(count(&p, "succeeded"), 1, "{:?}", outcomes(&p));
    let calls = emu.calls();
    assert!(calls["ec2:CreateTags"].as_u64().unwrap() >= 8, "{calls:?}");
    assert!(log.contains("retrying after AWS error"), "{log}");
    assert_in_service_and_tagged(&aws, "web-th", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_without_a_layer_are_left_alone() {
    let World { emu, aws, q, .. } = World::builder("batch-1").instances(1).start().await;
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(count(&p, "unmatched"), 1, "{:?}", outcomes(&p));
    assert!(log.contains("no layer matches"), "{log}");
    assert_eq!(
        aws.instances("batch-1").await[0].1,
        "Pending:Wait",
        "hook left alone"
    );
    assert!(emu.finished_actions().is_empty());
    queue_is_empty(&aws, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_read_the_queue_fails() {
    let emu = Emulator::start();
    let aws = Aws::new(&emu).await;
    let mut q = aws.queue("lifecycle").await;
    q.url = q.url.replace("/lifecycle", "/no-such-queue");
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("cannot receive from the queue") && log.contains("giving up"),
        "{log}"
    );
}

/// GET on 127.0.0.1:port, returning (status, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, resp.split_once("\r\n\r\n").unwrap().1.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_metrics_and_health_and_notifies_systemd() {
    let World { emu, q, .. } = web("web-m", 2).await;
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    p.serve_metrics();
    // A notify socket, as systemd would hand it to a Type=notify service.
    let sock_path = p.dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut cmd = p.command(&["daemon"]);
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000");
    let log = p.dir.join("daemon-m.log");
    let child = cmd
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut daemon = common::Running { child, log };
    let port = daemon.metrics_port();

    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("READY=1"),
        "first notification is READY"
    );
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"WATCHDOG=1");

    eventually("both launches handled", Duration::from_secs(30), || async {
        (emu.finished_actions().len() == 2).then_some(())
    })
    .await;
    let (status, body) = http_get(port, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // The hooks are done; the messages' deletes may still be lingering for a batch.
    let metrics = eventually("nothing in flight", Duration::from_secs(10), || async {
        let (status, m) = http_get(port, "/metrics");
        assert_eq!(status, 200);
        m.lines()
            .any(|l| l == "provision_in_flight{account=\"123456789012\",region=\"us-east-1\"} 0")
            .then_some(m)
    })
    .await;
    // Every series of the queue's work carries its account and region.
    let scoped = |l: &str| match l.contains('{') {
        true => l.replacen('{', "{account=\"123456789012\",region=\"us-east-1\",", 1),
        false => l.replacen(' ', "{account=\"123456789012\",region=\"us-east-1\"} ", 1),
    };
    for line in [
        "provision_events_received_total 3",
        "provision_events_skipped_total 1",
        "provision_runs_total{layer=\"web\",outcome=\"succeeded\"} 2",
        "provision_step_duration_seconds_count{kind=\"tag\"} 2",
        "provision_aws_calls_total{service=\"autoscaling\",operation=\"CompleteLifecycleAction\"} 2",
        "provision_aws_calls_total{service=\"ec2\",operation=\"CreateTags\"} 2",
        "provision_in_flight 0",
    ] {
        let line = scoped(line);
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in:\n{metrics}");
    }
    assert_eq!(http_get(port, "/nope").0, 404);

    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(30)), 0, "{}", daemon.log());
    let mut saw_stopping = false;
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        saw_stopping |= String::from_utf8_lossy(&buf[..n]).starts_with("STOPPING=1");
    }
    assert!(saw_stopping, "STOPPING=1 on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_lists_what_is_wrong_precisely() {
    let World { emu, aws, q, .. } = World::builder("web-c").start().await;
    let (topic, _results) = aws.topic_with_queue("results").await;

    let good = Provision::new(&emu, &q, Some(&topic), WEB_LAYER);
    let out = good.output(&["check", "--aws"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("group web-c (layer web): hooks provision-launch (EC2_INSTANCE_LAUNCHING)"),
        "{text}"
    );

    // A missing topic and an unreadable queue: both listed, exit 1.
    let mut gone = aws.queue("other").await;
    gone.url = gone.url.replace("/other", "/missing");
    let bad = Provision::new(
        &emu,
        &gone,
        Some("arn:aws:sns:us-east-1:123456789012:nope"),
        WEB_LAYER,
    );
    let out = bad.output(&["check", "--aws"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("problem: queue.url: cannot read the queue"),
        "{text}"
    );
    assert!(text.contains("problem: notify.topic_arn"), "{text}");
    assert!(text.contains("2 problem(s)"), "{text}");

    // A broken config: every problem with its key, exit 2.
    let broken = Provision::new(
        &emu,
        &q,
        None,
        "[layers.web]\ngroups = []\non_failure = \"maybe\"\n",
    );
    let out = broken.output(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("layers.web.groups") && err.contains("layers.web.on_failure"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_provisions_one_instance_by_hand() {
    // The manual command reads no queue: the hook's messages stay where they are.
    let World { emu, aws, q, .. } = web("web-h", 1).await;
    let id = aws.instances("web-h").await.remove(0).0;
    let p = Provision::new(&emu, &q, None, WEB_LAYER);

    let out = p.output(&[&id, "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("Name=\"web-{id}\"")) && text.contains("Environment=\"production\""),
        "{text}"
    );
    assert!(
        text.contains("complete hook provision-launch by instance id"),
        "{text}"
    );
    assert_eq!(
        aws.instances("web-h").await[0].1,
        "Pending:Wait",
        "a dry run changes nothing"
    );
    assert!(!aws.tags(&id).await.contains_key("Name"));

    let out = p.output(&[&id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("step 1/1 tag") && text.contains("result     succeeded (CONTINUE)"),
        "{text}"
    );
    assert_in_service_and_tagged(&aws, "web-h", 1).await;
    let run = p
        .history()
        .into_iter()
        .find(|r| r.outcome.as_str() == "succeeded")
        .expect("recorded in the history");
    assert_eq!(run.layer.as_deref(), Some("web"));
    let action = &emu.finished_actions()[0];
    assert_eq!(
        (action["result"].as_str(), action["completions"].as_u64()),
        (Some("CONTINUE"), Some(1))
    );

    let out = p.output(&["i-0000000000000000f"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in an Auto Scaling group"),
        "{out:?}"
    );
}

/// Datagrams on a notify socket until one contains `want` (bounded by the socket's timeout).
fn notified_until(sock: &std::os::unix::net::UnixDatagram, want: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {want:?} from the daemon ({e}); saw {seen:?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = msg.contains(want);
        seen.push(msg);
        if done {
            return seen;
        }
    }
}

/// SIGHUP while a launch's slow step runs: that run finishes under the layer it started
/// with, the next launch runs the new layer; an invalid config is refused with its
/// problems, the previous one keeps serving, and the refusal is counted. systemd hears
/// RELOADING=1 (with MONOTONIC_USEC) and READY=1 around each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_layers_for_new_runs_and_refuses_an_invalid_config() {
    let World { emu, aws, q, .. } = web("web-r", 1).await;
    let first = aws.instances("web-r").await[0].0.clone();
    let layer = |version: &str| {
        format!(
            r#"
[layers.web]
groups = ["web-*"]
launch = [
  {{ ssm = {{ document = "AWS-RunShellScript", parameters = {{ commands = ["sleep 4"] }} }} }},
  {{ tag = {{ Version = "{version}" }} }},
]
"#
        )
    };
    let p = Provision::new(&emu, &q, None, &layer("v1"));
    p.serve_metrics();
    let sock_path = p.dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut cmd = p.command(&["daemon"]);
    cmd.env("NOTIFY_SOCKET", &sock_path);
    let log = p.dir.join("daemon-r.log");
    let child = cmd
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let daemon = common::Running { child, log };
    let port = daemon.metrics_port();
    notified_until(&sock, "READY=1");

    // The first launch is in its slow ssm step.
    eventually(
        "the first launch's ssm command",
        Duration::from_secs(30),
        || async {
            let state = emu.control("GET", "/_emulator/ssm", None);
            (!state["commands"].as_array()?.is_empty()).then_some(())
        },
    )
    .await;
    p.merge(&layer("v2"));
    daemon.signal("HUP");
    let seen = notified_until(&sock, "READY=1");
    assert!(
        seen.iter()
            .any(|m| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC=")),
        "{seen:?}"
    );
    assert!(daemon.log().contains("config reloaded"), "{}", daemon.log());

    eventually(
        "the first launch to finish",
        Duration::from_secs(60),
        || async { (aws.instances("web-r").await[0].1 == "InService").then_some(()) },
    )
    .await;
    assert_eq!(
        aws.tags(&first).await.get("Version").map(String::as_str),
        Some("v1"),
        "the run in flight finished under the layer it started with"
    );

    // The next launch runs the new layer.
    aws.scale("web-r", 2).await;
    let second = eventually(
        "a second instance in service",
        Duration::from_secs(60),
        || async {
            let all = aws.instances("web-r").await;
            all.iter()
                .find(|(id, state)| *id != first && state == "InService")
                .map(|(id, _)| id.clone())
        },
    )
    .await;
    assert_eq!(
        aws.tags(&second).await.get("Version").map(String::as_str),
        Some("v2"),
        "{}",
        daemon.log()
    );

    // An invalid config (and a key only a restart applies) is refused, every problem said.
    p.merge("[layers.web]\ngroups = []\n");
    p.set("queue.max_in_flight", 7);
    daemon.signal("HUP");
    let seen = notified_until(&sock, "READY=1");
    assert!(seen.iter().any(|m| m.contains("RELOADING=1")), "{seen:?}");
    let log = daemon.log();
    assert!(
        log.contains("config reload refused") && log.contains("layers.web.groups"),
        "{log}"
    );
    // The previous config keeps serving.
    aws.scale("web-r", 3).await;
    let third = eventually(
        "a third instance in service",
        Duration::from_secs(60),
        || async {
            let all = aws.instances("web-r").await;
            all.iter()
                .find(|(id, state)| *id != first && *id != second && state == "InService")
                .map(|(id, _)| id.clone())
        },
    )
    .await;
    assert_eq!(
        aws.tags(&third).await.get("Version").map(String::as_str),
        Some("v2")
    );
    // A valid config that changes a restart-only key is refused too, naming it.
    p.merge(&layer("v3"));
    daemon.signal("HUP");
    notified_until(&sock, "READY=1");
    let log = daemon.log();
    assert!(
        log.contains("queue.max_in_flight: changed, and it takes effect only at a restart"),
        "{log}"
    );
    let (_, metrics) = http_get(port, "/metrics");
    assert!(
        metrics.contains("provision_config_reloads_total 1")
            && metrics.contains("provision_config_reload_failures_total 2"),
        "{metrics}"
    );
}

/// `notify.format = "chat"`: the result reaches the topic as a custom notification of
/// Amazon Q Developer in chat applications, read back here from the topic's subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_can_be_published_as_chat_notifications() {
    let World { emu, aws, q, .. } = web("web-chat", 1).await;
    let id = aws.instances("web-chat").await.remove(0).0;
    let (topic, results) = aws.topic_with_queue("chat").await;
    // The instance's SSM agent never comes online: the ssm step fails after online_timeout.
    emu.control(
        "POST",
        "/_emulator/ssm",
        Some(json!({ "never_online": [id] })),
    );
    let p = Provision::new(
        &emu,
        &q,
        Some(&topic),
        r#"
[layers.web]
groups = ["web-*"]
launch = [
  { tag = { Role = "web" } },
  { ssm = { document = "AWS-RunShellScript", parameters = { commands = ["true"] }, online_timeout = "1s" } },
]
"#,
    );
    p.set("notify.format", "chat");
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    // The abandoned instance's replacement is launched (and configured) too.
    let events = aws.results(&results).await;
    let n = events
        .iter()
        .find(|e| e["metadata"]["threadId"] == id.as_str())
        .unwrap_or_else(|| panic!("no notification for {id}: {events:?}"));
    assert_eq!(n["version"], "1.0", "{n}");
    assert_eq!(n["source"], "custom", "{n}");
    assert_eq!(n["content"]["textType"], "client-markdown");
    let title = n["content"]["title"].as_str().unwrap();
    assert!(
        title.contains(&format!("{id} launch failed: ABANDON (layer web)")),
        "{title}"
    );
    let description = n["content"]["description"].as_str().unwrap();
    assert!(
        description.contains("*Failed step* ssm") && description.contains("web-chat"),
        "{description}"
    );
    assert_eq!(n["metadata"]["threadId"], id.as_str());
    assert_eq!(n["metadata"]["additionalContext"]["outcome"], "failed");
    assert!(
        n["content"]["nextSteps"][0]
            .as_str()
            .unwrap()
            .contains(&format!("provision history --instance {id}")),
        "{n}"
    );

    // Anything else is refused with the choices.
    p.set("notify.format", "slack");
    let out = p.output(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("notify.format") && err.contains("\"chat\""),
        "{err}"
    );
}

/// Text logs written to a file (or a pipe, or the journal) carry no terminal colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_off_a_terminal_have_no_colour_codes() {
    let World { emu, q, .. } = web("web-n", 0).await;
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains('\x1b'), "escape codes in a log file: {log:?}");
}

/// `--dry-run` outside systemd, with the example's SSH key credential and a state
/// directory that does not exist yet: the plan is shown, and nothing is created (no
/// `state.db`, no `known_hosts.d`) and no credential read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_creates_nothing_and_needs_no_credentials() {
    let World { emu, aws, q, .. } = web("web-d", 1).await;
    let id = aws.instances("web-d").await.remove(0).0;
    let p = Provision::new(
        &emu,
        &q,
        None,
        "[ssh]\nidentity_file = { credential = \"ssh-key\" }\n[layers.web]\ngroups = [\"web-*\"]\nlaunch = [ { ssh = [\"true\"] } ]\n",
    );
    let state_dir = p.dir.join("not-yet");
    p.set("state.path", common::path_str(&state_dir.join("state.db")));
    let out = p.output(&[&id, "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("(dry run: nothing was changed)"), "{text}");
    assert!(
        !state_dir.exists(),
        "a dry run created {}",
        state_dir.display()
    );
    assert_eq!(aws.instances("web-d").await[0].1, "Pending:Wait");
}

/// A manual command run as root in the service's state directory would leave root-owned
/// files the service cannot read: refused, naming whom to run it as.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_is_refused_in_a_state_directory_of_another_user() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (it runs a command as root in a directory owned by another uid)"
    );
    let World { emu, q, .. } = web("web-o", 0).await;
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let state_dir = p.dir.join("service-owned");
    std::fs::create_dir(&state_dir).unwrap();
    std::os::unix::fs::chown(&state_dir, Some(65534), Some(65534)).unwrap();
    p.set("state.path", common::path_str(&state_dir.join("state.db")));
    for args in [&["worker"][..], &["history"][..]] {
        let out = p.output(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("belongs to uid 65534") && err.contains("sudo -u provision"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        std::fs::read_dir(&state_dir).unwrap().count(),
        0,
        "nothing created"
    );
}

/// Instances that terminate without their terminate hook reaching provision leave their
/// known_hosts files behind; the daemon removes those of instances EC2 lists as terminated
/// or not at all, once they are an hour old, and keeps the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_hosts_files_of_vanished_instances_are_pruned() {
    let emu = Emulator::start();
    let aws = Aws::new(&emu).await;
    let q = aws.queue("lifecycle").await;
    aws.group("app-prune").await;
    aws.scale("app-prune", 2).await;
    let ids: Vec<String> = aws
        .instances("app-prune")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids.len(), 2);
    let (alive, terminated) = (&ids[0], &ids[1]);
    aws.ec2
        .terminate_instances()
        .instance_ids(terminated)
        .send()
        .await
        .unwrap();
    let p = Provision::new(
        &emu,
        &q,
        None,
        "[layers.app]\ngroups = [\"app-*\"]\nlaunch = [ { ssh = [\"true\"] } ]\n",
    );
    let dir = p.dir.join("known_hosts.d");
    std::fs::create_dir_all(&dir).unwrap();
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    let file = |name: &str, old: bool| {
        let f = std::fs::File::create(dir.join(name)).unwrap();
        if old {
            f.set_modified(two_hours_ago).unwrap();
        }
    };
    let never_existed = "i-0123456789abcdef0";
    let too_new_to_judge = "i-0fedcba9876543210";
    file(alive, true);
    file(terminated, true);
    file(never_existed, true);
    file(too_new_to_judge, false);
    file("not-an-instance", true);
    let mut d = p.daemon();
    let left = || -> BTreeSet<String> {
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    eventually(
        "the vanished instances' files to go",
        Duration::from_secs(30),
        || async {
            (!left().contains(terminated.as_str()) && !left().contains(never_existed)).then_some(())
        },
    )
    .await;
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(30)), 0, "{}", d.log());
    let expected: BTreeSet<String> = [alive.as_str(), too_new_to_judge, "not-an-instance"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(left(), expected, "{}", d.log());
    assert!(
        d.log()
            .contains("removed the known_hosts entries of instances that no longer exist"),
        "{}",
        d.log()
    );
    // One DescribeInstances for the three old files.
    assert_eq!(emu.provision_calls()["ec2:DescribeInstances"], 1);
}

/// A lifecycle message as an application role with `sqs:SendMessage` could write it.
fn forged(transition: &str, group: &str, hook: &str, instance: &str) -> String {
    json!({
        "Origin": "EC2", "Destination": "AutoScalingGroup",
        "LifecycleTransition": transition, "AutoScalingGroupName": group,
        "LifecycleHookName": hook, "EC2InstanceId": instance,
        "LifecycleActionToken": format!("{:08x}-0000-4000-8000-000000000000", 0xdead_beefu32),
        "NotificationMetadata": METADATA, "Service": "AWS Auto Scaling",
        "Time": "2026-01-01T00:00:00.000Z", "AccountId": "123456789012",
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_messages_run_nothing_and_the_hooks_metadata_wins() {
    let (World { emu, aws, q, .. }, source) = relayed("web-f", 300).await;
    aws.hook(
        "web-f",
        "provision-terminate",
        TERMINATE,
        Some(&source.arn),
        300,
        "ABANDON",
        Some(METADATA),
    )
    .await;
    // Another group, without hooks: its instance goes straight into service.
    aws.group("web-other").await;
    aws.scale("web-other", 1).await;
    let (outsider, state) = aws.instances("web-other").await.remove(0);
    assert_eq!(state, "InService");

    // One genuine launch of web-f, worked as usual.
    aws.scale("web-f", 1).await;
    for b in aws.drain(&source).await {
        aws.send(&q, &b).await;
    }
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    assert_eq!(p.worker().0, 0);
    let member = assert_in_service_and_tagged(&aws, "web-f", 1)
        .await
        .remove(0);

    // A second, genuine launch whose message carries other metadata; a launch for the
    // outsider (in service, in another group); a terminate for the member (in service).
    aws.scale("web-f", 2).await;
    let genuine = aws
        .drain(&source)
        .await
        .into_iter()
        .find(|b| b.contains("EC2_INSTANCE_LAUNCHING"))
        .unwrap();
    let tampered = genuine.replace("production", "attacker");
    assert_ne!(tampered, genuine);
    aws.send(&q, &tampered).await;
    aws.send(&q, &forged(LAUNCH, "web-f", "provision-launch", &outsider))
        .await;
    aws.send(
        &q,
        &forged(TERMINATE, "web-f", "provision-terminate", &member),
    )
    .await;
    let tags_before = emu.calls().get("ec2:CreateTags").and_then(Value::as_u64);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");

    // Only the genuine launch ran (one CreateTags), with the hook's metadata.
    let tags_after = emu.calls().get("ec2:CreateTags").and_then(Value::as_u64);
    assert_eq!(tags_after, tags_before.map(|n| n + 1), "{log}");
    assert_in_service_and_tagged(&aws, "web-f", 2).await;
    assert_eq!(aws.tags(&outsider).await.get("Name"), None);
    assert_eq!(aws.tags(&member).await.get("Draining"), None);
    assert_eq!(
        emu.finished_actions().len(),
        2,
        "no forged action was completed"
    );
    let history = p.history();
    let rejected: Vec<&str> = history
        .iter()
        .filter(|r| r.outcome.as_str() == "rejected")
        .filter_map(|r| r.error.as_deref())
        .collect();
    assert_eq!(rejected.len(), 2, "{history:?}");
    assert!(
        rejected.iter().all(|e| e.starts_with("forged or stale: ")),
        "{rejected:?}"
    );
    assert!(
        rejected
            .iter()
            .all(|e| e.contains("not the instance's active lifecycle action")),
        "{rejected:?}"
    );
    assert!(
        rejected
            .iter()
            .any(|e| e.contains("not listed in group \"web-f\"")),
        "{rejected:?}"
    );
    assert!(
        rejected.iter().any(|e| e.contains("InService")),
        "{rejected:?}"
    );
    let noted = history
        .iter()
        .find(|r| r.outcome.as_str() == "succeeded" && r.error.is_some());
    assert!(
        noted
            .and_then(|r| r.error.as_deref())
            .is_some_and(|e| e.contains("differs from the hook's")),
        "{history:?}"
    );
    queue_is_empty(&aws, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_waited_in_a_backlog_is_heartbeated_at_pickup() {
    let (World { emu, aws, q, .. }, source) = relayed("web-late", 30).await;
    aws.scale("web-late", 1).await;
    // The message waits 24 s of the hook's 30 s before anyone reads it; the step then takes
    // 8 s. The first scheduled heartbeat (a third of 30 s after pickup) would come after
    // the action timed out: only a beat at pickup keeps it alive. The wait is not slept:
    // Auto Scaling's clock moves 24 s on, and the message carries the time it would have
    // (its action began 24 s before provision reads it).
    emu.advance_clock(24);
    for b in aws.drain(&source).await {
        aws.send(&q, &backdated(&b, Duration::from_secs(24))).await;
    }
    emu.fault(json!({"service": "ec2", "action": "CreateTags", "count": 1, "delay_seconds": 8}));
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let actions = emu.finished_actions();
    assert_eq!(actions.len(), 1, "{actions:?}");
    assert_eq!(actions[0]["finished_by"], "complete", "{actions:?}");
    assert_eq!(actions[0]["result"], "CONTINUE", "{actions:?}");
    // The heartbeat that proved the token at pickup kept it alive.
    assert!(
        actions[0]["heartbeats"].as_u64().unwrap() >= 1,
        "{actions:?}"
    );
    assert_in_service_and_tagged(&aws, "web-late", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_never_takes_more_than_max_in_flight() {
    let w = World::builder("web-slots")
        .metadata(METADATA)
        .layer(WEB_LAYER)
        .instances(6)
        .start()
        .await;
    let (emu, aws, q) = (&w.emu, &w.aws, &w.q);
    // Each step takes 2 s: six launches, two at a time.
    emu.fault(json!({"service": "ec2", "action": "CreateTags", "count": -1, "delay_seconds": 2}));
    let p = w.provision();
    p.set("queue.max_in_flight", 2i64);
    let mut d = p.daemon();
    let mut most = 0;
    for _ in 0..600 {
        let (_, in_flight) = aws.approximate_messages(q).await;
        most = most.max(in_flight);
        if emu.finished_actions().len() == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(30)), 0, "{}", d.log());
    assert_eq!(emu.finished_actions().len(), 6, "{}", d.log());
    assert!(most >= 1, "the daemon was seen working");
    assert!(
        most <= 2,
        "{most} messages in flight at once, max_in_flight is 2"
    );
}
