//! Faults, crashes and outages against the real binary and the emulator: whatever happens,
//! every lifecycle action ends with the right result, no message loops, nothing reaches the
//! dead-letter queue, and the history says what happened.
//!
//! Faults come from the emulator (`/_emulator/faults`: throttling, HTTP 500 with and without
//! an error code, ResourceContention, a 503 HTML page, connection resets, delays; per
//! operation and count). The SDK makes one attempt a call (`aws.max_attempts = 1`) so every
//! fault reaches provision's own classification. Every queue here has a redrive policy.

use crate::common;

use std::time::Duration;

use common::{eventually, Provision, Queue, World};
use serde_json::{json, Value};

const METADATA: &str = r#"{"environment":"production","platform":"web","major":"3"}"#;

/// Every transient fault the emulator can answer with.
const TRANSIENT: [&str; 6] = [
    "contention",
    "server",
    "server-nocode",
    "html",
    "reset",
    "throttle",
];

/// What a proxy or gateway in front of AWS may answer instead: HTTP 429 and 408, no AWS code.
const GATEWAY: [&str; 2] = ["http429", "http408"];

const WEB_LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
on_failure = "abandon"
launch = [ { tag = { Name = "web-{instance_id}", Layer = "{layer}" } } ]
"#;

/// A group `group` of `n` instances waiting in Pending:Wait, its launch hook notifying a
/// queue whose redrive policy dead-letters after `max_receives` receives.
async fn world(group: &str, n: i32, heartbeat: i32, max_receives: u32) -> World {
    World::builder(group)
        .heartbeat(heartbeat)
        .metadata(METADATA)
        .dead_letter_after(max_receives)
        .instances(n)
        .start()
        .await
}

/// What the chaos suite asserts of a world.
impl World {
    /// Each transient fault once, in order, on one operation.
    fn each_transient_fault(&self, service: &str, action: &str) {
        for kind in TRANSIENT {
            self.emu
                .fault(json!({"service": service, "action": action, "count": 1, "error": kind}));
        }
    }

    /// Every action completed once, by provision, with CONTINUE; its instance tagged and in
    /// service; the queue empty and nothing dead-lettered.
    async fn assert_all_continued(&self, n: usize) {
        let actions = self.emu.finished_actions();
        assert_eq!(actions.len(), n, "{actions:?}");
        for a in &actions {
            assert_eq!(a["finished_by"], "complete", "{a}");
            assert_eq!(a["result"], "CONTINUE", "{a}");
            assert_eq!(a["completions"], 1, "{a}");
        }
        let instances = self.aws.instances(&self.group).await;
        assert_eq!(instances.len(), n);
        for (id, state) in &instances {
            assert_eq!(state, "InService", "{id}");
            let tags = self.aws.tags(id).await;
            assert_eq!(tags.get("Name"), Some(&format!("web-{id}")), "{id}");
        }
        self.queue_is_empty().await;
        assert_eq!(
            self.aws
                .approximate_messages(self.dlq.as_ref().unwrap())
                .await,
            (0, 0),
            "nothing is dead-lettered"
        );
    }
}

/// The history tells the truth: one succeeded run per instance, CONTINUE sent because every
/// step succeeded, and no run that ended otherwise except those `allowed`.
fn assert_history(p: &Provision, n: usize, allowed: &[&str]) -> Vec<provision::store::RunRow> {
    let runs = p.history();
    let succeeded: Vec<_> = runs
        .iter()
        .filter(|r| r.outcome.as_str() == "succeeded")
        .collect();
    let mut ids: Vec<_> = succeeded.iter().map(|r| r.instance_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "one succeeded run per instance: {runs:#?}");
    assert_eq!(succeeded.len(), n, "{runs:#?}");
    for r in &succeeded {
        assert_eq!(r.hook_result.map(|c| c.as_str()), Some("CONTINUE"), "{r:?}");
        assert_eq!(r.decision.map(|d| d.as_str()), Some("CONTINUE"), "{r:?}");
        assert!(r.cause.is_some(), "{r:?}");
    }
    for r in &runs {
        let ok = ["succeeded", "skipped"].contains(&r.outcome.as_str())
            || allowed.contains(&r.outcome.as_str());
        assert!(ok, "unexpected run: {r:?}");
    }
    runs
}

fn fast(extra: &str) -> String {
    format!("[aws]\nmax_attempts = 1\n{extra}\n{WEB_LAYER}")
}

// ---- one path at a time: every transient fault is retried, never taken as permanent ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_rides_out_every_transient_fault() {
    let w = world("web-c", 1, 300, 2).await;
    w.each_transient_fault("autoscaling", "CompleteLifecycleAction");
    for kind in GATEWAY {
        w.emu.fault(json!({"service": "autoscaling", "action": "CompleteLifecycleAction", "count": 1, "error": kind}));
    }
    let p = Provision::new(&w.emu, &w.q, None, &fast("retry_for = \"1s\""));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(w.calls("autoscaling:CompleteLifecycleAction"), 9, "{log}");
    for class in [
        "transient: server error",
        "transient: throttled",
        "transient: connection error",
        "transient: timeout",
    ] {
        assert!(log.contains(class), "{class} not in:\n{log}");
    }
    w.assert_all_continued(1).await;
    assert_history(&p, 1, &[]);
}

/// A completion that gets no answer at all (the emulator holds the connection open and
/// serves nothing): the attempt is given up after `aws.attempt_timeout` (2 s here, not the
/// default 40 s), classed a timeout and sent again, and the action is completed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_within_the_attempt_timeout_is_retried() {
    let w = world("web-hang", 1, 300, 2).await;
    w.emu.fault(json!({"service": "autoscaling", "action": "CompleteLifecycleAction", "count": 1, "error": "hang"}));
    let p = Provision::new(
        &w.emu,
        &w.q,
        None,
        &fast("retry_for = \"30s\"\nattempt_timeout = \"2s\""),
    );
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert!(w.emu.faults_left().is_empty(), "the hang was met");
    // The SDK names the timeout that ended the attempt: the configured one.
    assert!(
        log.contains("operation attempt timeout (single attempt) occurred after 2s")
            && log.contains("transient: timeout"),
        "the unanswered attempt was given up after aws.attempt_timeout:\n{log}"
    );
    assert_eq!(w.calls("autoscaling:CompleteLifecycleAction"), 2, "{log}");
    w.assert_all_continued(1).await;
    assert_history(&p, 1, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_ride_out_transient_faults() {
    // A 6 s heartbeat timeout (beats every 2 s) and a step of 8 s: without heartbeats
    // getting through, the action would time out and be abandoned.
    let w = world("web-h", 1, 6, 2).await;
    w.emu
        .fault(json!({"service": "ec2", "action": "CreateTags", "count": 1, "delay_seconds": 8}));
    let p = Provision::new(&w.emu, &w.q, None, &fast("retry_for = \"10s\""));
    let mut d = p.daemon();
    // The faults meet the heartbeats of the running step (not the one that proved the
    // token at pickup).
    eventually("the step to start", Duration::from_secs(30), || async {
        (w.calls("ec2:CreateTags") >= 1).then_some(())
    })
    .await;
    for kind in ["contention", "server-nocode", "html", "reset"] {
        w.emu.fault(json!({"service": "autoscaling", "action": "RecordLifecycleActionHeartbeat", "count": 1, "error": kind}));
    }
    eventually("the action completed", Duration::from_secs(60), || async {
        (w.emu.finished_actions().len() == 1).then_some(())
    })
    .await;
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(60)), 0, "{}", d.log());
    let log = d.log();
    assert!(
        w.calls("autoscaling:RecordLifecycleActionHeartbeat") >= 5,
        "{log}"
    );
    assert!(log.contains("heartbeat failed; will retry"), "{log}");
    w.assert_all_continued(1).await;
    let runs = assert_history(&p, 1, &[]);
    assert!(runs.iter().any(|r| r.heartbeats >= 1), "{runs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagging_rides_out_every_transient_fault() {
    let w = world("web-t", 1, 300, 2).await;
    w.each_transient_fault("ec2", "CreateTags");
    // Room for six backoffs (at most 0.5 + 1 + 2 + 4 + 8 + 16 s).
    let p = Provision::new(&w.emu, &w.q, None, &fast("retry_for = \"40s\""));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(w.calls("ec2:CreateTags"), 7, "{log}");
    w.assert_all_continued(1).await;
    assert_history(&p, 1, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_command_rides_out_every_transient_fault() {
    let w = world("web-s", 1, 300, 2).await;
    w.each_transient_fault("ssm", "SendCommand");
    let layer = r#"
[ssm]
batch_window = "1s"
[layers.web]
groups = ["web-*"]
launch = [
  { tag = { Name = "web-{instance_id}" } },
  { ssm = { document = "AWS-RunShellScript", parameters = { commands = ["echo configured"] } } },
]
"#;
    let p = Provision::new(
        &w.emu,
        &w.q,
        None,
        &format!("[aws]\nmax_attempts = 1\nretry_for = \"40s\"\n{layer}"),
    );
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(w.calls("ssm:SendCommand"), 7, "{log}");
    let ssm = w.emu.control("GET", "/_emulator/ssm", None);
    assert_eq!(ssm["commands"].as_array().unwrap().len(), 1, "{ssm}");
    w.assert_all_continued(1).await;
    assert_history(&p, 1, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_rides_out_every_transient_fault() {
    let w = world("web-p", 1, 300, 2).await;
    let (topic, results) = w.aws.topic_with_queue("results").await;
    w.each_transient_fault("sns", "PublishBatch");
    let p = Provision::new(&w.emu, &w.q, Some(&topic), &fast("retry_for = \"40s\""));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(w.calls("sns:PublishBatch"), 7, "{log}");
    w.assert_all_continued(1).await;
    assert_history(&p, 1, &[]);
    let events = w.aws.results(&results).await;
    assert_eq!(events.len(), 1, "published once: {events:?}");
    assert_eq!(events[0]["outcome"], "succeeded");
    assert_eq!(events[0]["hook_result"], "CONTINUE");
    assert_eq!(events[0]["decision"], "CONTINUE");
    assert_eq!(events[0]["cause"], "every step succeeded (1)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_rides_out_every_transient_fault() {
    let w = world("web-d", 1, 300, 2).await;
    w.each_transient_fault("sqs", "DeleteMessageBatch");
    let p = Provision::new(&w.emu, &w.q, None, &fast("retry_for = \"40s\""));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert!(w.calls("sqs:DeleteMessageBatch") >= 7, "{log}");
    w.assert_all_continued(1).await;
    // Deleted, not come back: no duplicate run.
    assert_history(&p, 1, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiving_verifying_and_extending_ride_out_every_transient_fault() {
    let w = world("web-v", 1, 300, 2).await;
    // Two faults on receiving (the daemon backs off up to a minute between failed
    // receives), every kind on the others.
    for kind in ["html", "reset"] {
        w.emu.fault(
            json!({"service": "sqs", "action": "ReceiveMessage", "count": 1, "error": kind}),
        );
    }
    for (service, action) in [
        ("autoscaling", "DescribeAutoScalingGroups"),
        ("autoscaling", "DescribeLifecycleHooks"),
        ("sqs", "ChangeMessageVisibilityBatch"),
    ] {
        w.each_transient_fault(service, action);
    }
    // A slow step and a short visibility timeout: the message's visibility is extended
    // (through the faults, which take a few of the 5 s left when extending starts) while
    // the step runs.
    w.emu
        .fault(json!({"service": "ec2", "action": "CreateTags", "count": 1, "delay_seconds": 12}));
    let p = Provision::new(&w.emu, &w.q, None, &fast("retry_for = \"1s\""));
    p.set("queue.visibility_timeout", "10s");
    let mut daemon = p.daemon();
    w.wait_finished(1).await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(30)), 0, "{}", daemon.log());
    let log = daemon.log();
    for op in [
        "ReceiveMessage",
        "DescribeAutoScalingGroups",
        "ChangeMessageVisibilityBatch",
    ] {
        assert!(log.contains(op), "no fault on {op} seen:\n{log}");
    }
    // Every injected fault was answered: each path really met every kind.
    let left = w.emu.faults_left();
    assert!(left.is_empty(), "faults never met: {left:?}\n{log}");
    assert!(w.calls("sqs:ChangeMessageVisibilityBatch") >= 7, "{log}");
    w.assert_all_continued(1).await;
    // Verified and worked in one delivery: the message never came back.
    let runs = assert_history(&p, 1, &[]);
    assert_eq!(
        runs.iter().filter(|r| r.instance_id.is_some()).count(),
        1,
        "{runs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_is_named_and_ends_the_run() {
    let w = world("web-x", 1, 300, 2).await;
    // The hook disappears under the worker: completing is refused for good.
    w.emu
        .fault(json!({"service": "ec2", "action": "CreateTags", "count": 1, "delay_seconds": 3}));
    let p = Provision::new(&w.emu, &w.q, None, &fast("retry_for = \"1s\""));
    let mut daemon = p.daemon();
    w.wait_calls("ec2:CreateTags", 1).await;
    w.aws
        .asg
        .delete_lifecycle_hook()
        .auto_scaling_group_name(&w.group)
        .lifecycle_hook_name("provision-launch")
        .send()
        .await
        .unwrap();
    eventually("the run to end", Duration::from_secs(60), || async {
        p.history()
            .into_iter()
            .find(|r| r.instance_id.is_some() && r.outcome.as_str() != "running")
    })
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(30)), 0, "{}", daemon.log());
    let run = p
        .history()
        .into_iter()
        .find(|r| r.instance_id.is_some())
        .unwrap();
    // Refused for good, and said so: not retried, not taken for success.
    assert_eq!(run.outcome.as_str(), "hook-error", "{run:?}");
    let error = run.error.as_deref().unwrap();
    assert!(error.contains("(permanent: invalid request)"), "{error}");
    assert_eq!(w.calls("autoscaling:CompleteLifecycleAction"), 1);
    assert_eq!(
        w.aws.approximate_messages(w.dlq.as_ref().unwrap()).await,
        (0, 0)
    );
}

// ---- transient faults never spend the dead-letter budget ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_far_past_retry_for_keeps_the_message_in_flight_not_dead_lettered() {
    let w = world("web-dl", 1, 300, 2).await;
    w.emu.fault(json!({"service": "autoscaling", "action": "CompleteLifecycleAction", "count": -1, "error": "throttle"}));
    let p = Provision::new(&w.emu, &w.q, None, &fast("retry_for = \"1s\""));
    // A 3 s visibility timeout: a message released after retry_for would be received
    // again (and dead-lettered on its third receive) many times over.
    p.set("queue.visibility_timeout", "3s");
    let mut daemon = p.daemon();
    // Throttled for far longer than aws.retry_for and the visibility timeout: the message's
    // visibility had to be extended three times over (each extension is for less than the
    // 3 s a receive gave it).
    w.wait_calls("autoscaling:CompleteLifecycleAction", 8).await;
    eventually(
        "three visibility extensions",
        Duration::from_secs(60),
        || async {
            let extended = w.calls("sqs:ChangeMessageVisibilityBatch")
                + w.calls("sqs:ChangeMessageVisibility");
            (extended >= 3).then_some(())
        },
    )
    .await;
    assert!(w.emu.finished_actions().is_empty());
    w.emu.control("DELETE", "/_emulator/faults", None);
    w.wait_finished(1).await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(30)), 0, "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("the message stays in flight"), "{log}");
    assert!(
        log.contains("ChangeMessageVisibility") || w.calls("sqs:ChangeMessageVisibilityBatch") > 0
    );
    w.assert_all_continued(1).await;
    // One delivery, one run: the message never came back.
    let runs = assert_history(&p, 1, &[]);
    assert_eq!(
        runs.iter().filter(|r| r.instance_id.is_some()).count(),
        1,
        "{runs:#?}"
    );
}

// ---- SIGKILL of the worker at each stage, then a fresh worker ----

/// Kills the daemon once `op` was called `calls` times (held there by `faults`), then
/// runs a fresh daemon to the end. Returns the world, provision, and with `topic` the
/// queue subscribed to the result topic.
async fn kill_at(
    stage: &str,
    faults: &[Value],
    op: &str,
    calls: u64,
    topic: bool,
) -> (World, Provision, Option<Queue>) {
    let w = world(&format!("web-{stage}"), 1, 300, 3).await;
    let (topic, results) = match topic {
        true => {
            let (arn, q) = w.aws.topic_with_queue("results").await;
            (Some(arn), Some(q))
        }
        false => (None, None),
    };
    let p = Provision::new(&w.emu, &w.q, topic.as_deref(), &fast("retry_for = \"1s\""));
    p.set("queue.visibility_timeout", "3s");
    for f in faults {
        w.emu.fault(f.clone());
    }
    let mut first = p.daemon();
    w.wait_calls(op, calls).await;
    first.signal("KILL");
    first.wait(Duration::from_secs(10));
    w.emu.control("DELETE", "/_emulator/faults", None);

    // One host: the fresh daemon takes the killed one's claim at once (its store sees the
    // process is gone), well before the 60 s lease could expire; the message is back after
    // its 3 s visibility timeout.
    let mut second = p.daemon();
    w.wait_finished_within(1, Duration::from_secs(30)).await;
    eventually("the queue to be empty", Duration::from_secs(60), || async {
        (w.aws.approximate_messages(&w.q).await == (0, 0)).then_some(())
    })
    .await;
    second.signal("TERM");
    assert_eq!(second.wait(Duration::from_secs(30)), 0, "{}", second.log());
    w.assert_all_continued(1).await;
    (w, p, results)
}

fn delay(service: &str, action: &str) -> Value {
    json!({"service": service, "action": action, "count": 1, "delay_seconds": 30})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_receive() {
    let faults = [delay("autoscaling", "DescribeLifecycleHooks")];
    let (_w, p, _) = kill_at(
        "rcv",
        &faults,
        "autoscaling:DescribeLifecycleHooks",
        1,
        false,
    )
    .await;
    // The killed run stays "running" (its process died); the fresh one did the work.
    assert_history(&p, 1, &["running"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_step() {
    let faults = [delay("ec2", "CreateTags")];
    let (_w, p, _) = kill_at("mid", &faults, "ec2:CreateTags", 1, false).await;
    assert_history(&p, 1, &["running"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_the_steps() {
    let faults = [
        json!({"service": "autoscaling", "action": "CompleteLifecycleAction", "count": -1, "error": "throttle"}),
    ];
    let (w, p, _) = kill_at(
        "dec",
        &faults,
        "autoscaling:CompleteLifecycleAction",
        2,
        false,
    )
    .await;
    assert_eq!(w.calls("ec2:CreateTags"), 1, "the steps ran once");
    let runs = assert_history(&p, 1, &["running"]);
    let redelivery = runs
        .iter()
        .find(|r| r.outcome.as_str() == "succeeded")
        .unwrap();
    assert!(redelivery.steps.is_empty(), "{redelivery:?}");
    let cause = redelivery.cause.as_deref().unwrap();
    assert!(cause.contains("every step succeeded"), "{cause}");
    assert!(cause.starts_with("decided by run"), "{cause}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_completing() {
    // Killed while its publish is held for 10 s: SNS has the request, and answers it after
    // the kill.
    let faults =
        [json!({"service": "sns", "action": "PublishBatch", "count": 1, "delay_seconds": 10})];
    let (w, p, results) = kill_at("cmp", &faults, "sns:PublishBatch", 1, true).await;
    // The action was completed and recorded as done: the redelivery is a duplicate.
    let runs = assert_history_after_completion(&p);
    assert!(
        runs.iter().any(|r| r.outcome.as_str() == "duplicate"),
        "{runs:#?}"
    );
    // The result event went out: the killed run's, which SNS answered after the kill, and
    // its copy in the outbox (put there before the action was recorded done), which the
    // fresh daemon republished: at least once, at most twice, always the same run.
    let results = results.unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await; // past the held publish
    let events = w.aws.results(&results).await;
    assert!((1..=2).contains(&events.len()), "{events:?}");
    for e in &events {
        assert_eq!(e["outcome"], "succeeded", "{events:?}");
        assert_eq!(e["hook_result"], "CONTINUE", "{events:?}");
        assert_eq!(e["run_id"], events[0]["run_id"], "{events:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_publishing_a_result_sns_never_gets_loses_no_event() {
    // Killed while its publish is held, and SNS then refuses it: the event never went out.
    // It was in the outbox before the action was recorded done, so the fresh daemon (whose
    // redelivery is a duplicate, publishing nothing) republishes it.
    let faults = [
        json!({"service": "sns", "action": "PublishBatch", "count": 1, "delay_seconds": 10}),
        json!({"service": "sns", "action": "PublishBatch", "count": 1, "error": "server"}),
    ];
    let (w, p, results) = kill_at("pub", &faults, "sns:PublishBatch", 1, true).await;
    assert_history_after_completion(&p);
    let results = results.unwrap();
    let events = eventually("the result event", Duration::from_secs(30), || async {
        let events = w.aws.results(&results).await;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["outcome"], "succeeded", "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_before_delete() {
    let faults = [delay("sqs", "DeleteMessageBatch")];
    let (_w, p, _) = kill_at("del", &faults, "sqs:DeleteMessageBatch", 1, false).await;
    let runs = assert_history(&p, 1, &["duplicate"]);
    assert!(
        runs.iter().any(|r| r.outcome.as_str() == "duplicate"),
        "{runs:#?}"
    );
}

/// After a kill between completing and recording the run's end: the action's end is in
/// the store (the redelivery is a duplicate) while the killed run's row stays `running`.
fn assert_history_after_completion(p: &Provision) -> Vec<provision::store::RunRow> {
    let runs = p.history();
    let worked: Vec<_> = runs.iter().filter(|r| r.instance_id.is_some()).collect();
    for r in &worked {
        assert!(
            ["running", "succeeded", "duplicate"].contains(&r.outcome.as_str()),
            "{r:?}"
        );
    }
    assert_eq!(
        worked
            .iter()
            .filter(|r| r.outcome.as_str() == "duplicate")
            .count(),
        1,
        "{runs:#?}"
    );
    runs
}

// ---- an emulator outage mid-burst under the daemon ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_mid_burst_loses_nothing() {
    let w = world("web-o", 6, 300, 3).await;
    // Slow steps, so the outage lands with work in flight.
    w.emu
        .fault(json!({"service": "ec2", "action": "CreateTags", "count": -1, "delay_seconds": 1}));
    let p = Provision::new(&w.emu, &w.q, None, &fast("retry_for = \"20s\""));
    let mut daemon = p.daemon();
    w.wait_finished(1).await;
    // An outage: the next 6 AWS calls, whatever they are, have their connection reset.
    w.emu
        .fault(json!({"service": "*", "action": "*", "count": 6, "error": "reset"}));
    eventually("the outage to be over", Duration::from_secs(90), || async {
        let outage = w
            .emu
            .faults_left()
            .into_iter()
            .any(|f| f["error"] == "reset");
        (!outage).then_some(())
    })
    .await;
    w.emu.control("DELETE", "/_emulator/faults", None);
    w.wait_finished(6).await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(30)), 0, "{}", daemon.log());
    w.assert_all_continued(6).await;
    assert_history(&p, 6, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_completing_keeps_failing_exits_in_time_and_keeps_the_decision() {
    // Completion is throttled without end and may be retried for 10 minutes; SIGTERM must
    // still end the daemon within its grace (well inside the unit's TimeoutStopSec), with
    // its summary, the message released and the decision kept for the next delivery.
    let w = world("web-stop", 1, 300, 5).await;
    w.emu.fault(json!({"service": "autoscaling", "action": "CompleteLifecycleAction", "count": -1, "error": "throttle"}));
    let p = Provision::new(&w.emu, &w.q, None, &fast("retry_for = \"10m\""));
    p.set("daemon.shutdown_grace", "2s");
    let mut d = p.daemon();
    eventually("completion retried", Duration::from_secs(60), || async {
        (w.calls("autoscaling:CompleteLifecycleAction") >= 2).then_some(())
    })
    .await;
    d.signal("TERM");
    assert_eq!(d.wait(Duration::from_secs(30)), 0, "{}", d.log());
    let log = d.log();
    assert!(log.contains("stopped"), "the summary: {log}");
    w.emu.control("DELETE", "/_emulator/faults", None);
    // The message comes back after its retry delay; a worker then completes the decision.
    eventually(
        "the kept decision completed",
        Duration::from_secs(90),
        || async {
            let (code, log) = p.worker();
            assert_eq!(code, 0, "{log}");
            (w.emu.finished_actions().len() == 1).then_some(())
        },
    )
    .await;
    w.assert_all_continued(1).await;
    let runs = p.history();
    assert!(
        runs.iter().any(|r| r.outcome.as_str() == "succeeded"
            && r.cause
                .as_deref()
                .is_some_and(|c| c.starts_with("decided by run"))),
        "the next delivery completed the kept decision: {runs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_row_a_locked_state_store_cannot_take_is_waited_out_in_flight() {
    // Another process holds the state store's write lock (an EXCLUSIVE transaction, kept
    // past the store's 5 s busy timeout) when a launch arrives, so its history row cannot be
    // written. That is transient, as a claim the store cannot write: the message waits in
    // flight (its 3 s visibility extended; the queue, maxReceiveCount 1, would dead-letter
    // it at a second receive, and no completion would come); once the lock is gone the
    // launch completes once, recorded once.
    let w = World::builder("web-lock")
        .heartbeat(300)
        .metadata(METADATA)
        .dead_letter_after(1)
        .start()
        .await;
    let p = w.provision_with(None, &fast("retry_for = \"1s\""));
    p.set("queue.visibility_timeout", "3s");
    let mut daemon = p.daemon();
    eventually("the daemon to poll", Duration::from_secs(60), || async {
        daemon
            .log()
            .contains("receiving from this source's queue")
            .then_some(())
    })
    .await;
    let lock = rusqlite::Connection::open(&p.state).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    w.aws.scale("web-lock", 1).await;
    let says = "the claim store fails for a transient reason; the message stays in flight";
    eventually(
        "the locked store to be waited out",
        Duration::from_secs(60),
        || async { (daemon.log().matches(says).count() >= 2).then_some(()) },
    )
    .await;
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    w.wait_finished(1).await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(60)), 0, "{}", daemon.log());
    let log = daemon.log();
    assert!(log.contains("state store"), "{log}");
    w.assert_all_continued(1).await;
    assert_history(&p, 1, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claims_table_rides_out_every_transient_fault() {
    // The fleet's claims table (DynamoDB) answers each transient fault once on its writes:
    // the claim waits in flight and is tried again; the decision and `done`, written within
    // the lease, are logged when they fail. The launch completes once.
    let w = World::builder("web-d")
        .heartbeat(300)
        .metadata(METADATA)
        .dead_letter_after(2)
        .claims("10s")
        .instances(1)
        .start()
        .await;
    w.each_transient_fault("dynamodb", "UpdateItem");
    let p = w.provision_with(None, &fast("retry_for = \"1s\""));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    w.assert_all_continued(1).await;
    assert_eq!(
        w.emu.faults_left(),
        Vec::<Value>::new(),
        "every fault was met: {log}"
    );
    assert!(
        log.contains("the claim store fails for a transient reason"),
        "{log}"
    );
}
