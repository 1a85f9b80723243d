//! The pipeline against in-memory fakes of the AWS traits.

use super::*;
use std::time::Duration;

use crate::aws::fake::{FakeHooks, FakeInstances};
use crate::aws::Services;
use crate::aws::{ActionCall, Message};
use crate::claims::Claim;
use crate::delivery::{Ack, Delivery, RejectPolicy};
use crate::outcome::{Completion, HookResult, Outcome};
use tokio::time::Instant;

const CONFIG: &str = r#"
[queue]
url = "https://sqs.us-east-1.amazonaws.com/123456789012/q"
[state]
path = "unused"
claim_lease = "3s"
[aws]
retry_for = "1s"
[reconcile]
unconfigured = "off"
[layers.web]
groups = ["web-*"]
launch = [ { tag = { Name = "web-{instance_id}", Env = "{metadata.environment}" } } ]
[layers.lenient]
groups = ["lenient-*"]
on_failure = "continue"
launch = [ { tag = { Env = "{metadata.environment}" } } ]
"#;

struct World {
    pipeline: Pipeline,
    hooks: Arc<FakeHooks>,
    instances: Arc<FakeInstances>,
}

fn world(hooks: FakeHooks, instances: FakeInstances) -> World {
    world_with_claims(hooks, instances, None)
}

fn world_with_claims(
    hooks: FakeHooks,
    instances: FakeInstances,
    claims: Option<Arc<dyn Claims>>,
) -> World {
    world_from(CONFIG, hooks, instances, claims)
}

fn world_from(
    config: &str,
    hooks: FakeHooks,
    instances: FakeInstances,
    claims: Option<Arc<dyn Claims>>,
) -> World {
    let cfg = Arc::new(Config::parse(config, "test").unwrap());
    let hooks = Arc::new(hooks);
    let instances = Arc::new(instances);
    let stats = Arc::new(Stats::default());
    let leases = Leases::spawn(None, hooks.clone(), Duration::from_secs(30), stats.clone());
    let pipeline = Pipeline::new(Parts {
        cfg,
        hooks: hooks.clone(),
        services: Services {
            instances: instances.clone(),
            ssm: Arc::new(crate::aws::fake::Unused),
            opsworks: Arc::new(crate::aws::fake::Unused),
            ecs: Arc::new(crate::aws::fake::Unused),
        },
        store: Store::in_memory().unwrap(),
        claims,
        leases,
        publisher: None,
        stats,
        remote: None,
        ansible: None,
    });
    World {
        pipeline,
        hooks,
        instances,
    }
}

/// One instance per token, so that tokens of different groups are different instances.
fn instance_for(token: &str) -> String {
    let h = token.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("i-{h:017x}")
}

fn message(group: &str, token: &str, metadata: &str) -> Message {
    let body = serde_json::json!({
        "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
        "AutoScalingGroupName": group, "LifecycleHookName": "launch",
        "EC2InstanceId": instance_for(token), "LifecycleActionToken": token,
        "NotificationMetadata": metadata,
    });
    Message {
        id: format!("m-{}", fastrand::u32(..)),
        receipt: "r".into(),
        body: body.to_string(),
        receive_count: 1,
    }
}

/// Works a genuine message as the daemon does (Auto Scaling confirms its action and its
/// hook carries its metadata), and answers what becomes of it.
async fn handle(w: &World, m: &Message) -> Ack {
    if let crate::event::Parsed::Event(ev) = crate::event::parse(&m.body) {
        let raw: serde_json::Value = serde_json::from_str(&m.body).unwrap();
        let metadata = raw["NotificationMetadata"].as_str().unwrap_or_default();
        w.hooks
            .waiting(ev.instance_id.as_str(), &ev.group, metadata);
    }
    handle_as_is(w, m).await
}

/// Works a message as the daemon does, whatever Auto Scaling says of it.
async fn handle_as_is(w: &World, m: &Message) -> Ack {
    let d = Delivery::new(m.clone(), Instant::now(), w.pipeline.leases());
    let outcome = w.pipeline.handle(&d, &CancellationToken::new()).await;
    Ack::for_outcome(outcome, m.receive_count, RejectPolicy::Delete)
}

fn completions(w: &World) -> Vec<HookResult> {
    w.hooks
        .completions
        .lock()
        .unwrap()
        .iter()
        .map(|(_, r)| *r)
        .collect()
}

#[tokio::test]
async fn a_good_event_is_tagged_completed_and_deleted() {
    let w = world(FakeHooks::default(), FakeInstances::default());
    let d = handle(&w, &message("web-1", "t1", r#"{"environment":"prod"}"#)).await;
    assert_eq!(d, Ack::Delete);
    assert_eq!(completions(&w), [HookResult::Continue]);
    let tagged = w.instances.tagged.lock().unwrap();
    assert_eq!(
        tagged[0].1,
        [
            ("Name".into(), format!("web-{}", instance_for("t1"))),
            ("Env".into(), "prod".into())
        ]
    );
}

#[tokio::test]
async fn a_failed_step_completes_with_the_layers_failure_result() {
    let w = world(FakeHooks::default(), FakeInstances::default());
    // No "environment" in the metadata: the template cannot be filled.
    assert_eq!(handle(&w, &message("web-1", "t1", "{}")).await, Ack::Delete);
    assert_eq!(
        handle(&w, &message("lenient-1", "t2", "plain text")).await,
        Ack::Delete
    );
    assert_eq!(completions(&w), [HookResult::Abandon, HookResult::Continue]);
    assert!(w.instances.tagged.lock().unwrap().is_empty());
    let h = w.pipeline.store().history(None, 10).unwrap();
    assert!(h.iter().all(|r| r.outcome.as_str() == "failed"), "{h:?}");
    assert!(
        h[1].error.as_deref().unwrap().contains("\"environment\""),
        "{:?}",
        h[1].error
    );
}

#[tokio::test]
async fn an_action_finished_elsewhere_counts_as_done() {
    let hooks = hooks_with_timeout(60);
    hooks
        .complete_script
        .lock()
        .unwrap()
        .push_back(Ok(ActionCall::NotActive(
            "No active Lifecycle Action found".into(),
        )));
    let w = world(hooks, FakeInstances::default());
    assert_eq!(
        handle(&w, &message("web-1", "t1", r#"{"environment":"p"}"#)).await,
        Ack::Delete
    );
    let h = w.pipeline.store().history(None, 10).unwrap();
    assert_eq!(
        h[0].hook_result.map(|c| c.as_str()),
        Some("already-finished")
    );
    // A redelivery is acknowledged without running steps or completing again.
    assert_eq!(
        handle(&w, &message("web-1", "t1", r#"{"environment":"p"}"#)).await,
        Ack::Delete
    );
    assert_eq!(w.instances.tagged.lock().unwrap().len(), 1);
    assert_eq!(completions(&w).len(), 1);
}

fn hooks_with_timeout(secs: u64) -> FakeHooks {
    FakeHooks {
        heartbeat_timeout: Duration::from_secs(secs),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_transient_completion_failure_keeps_the_message_in_flight_until_it_completes() {
    // The action can be completed for 48 hours (100 heartbeat timeouts, at most 48 h): the
    // paused clock runs through hours of growing pauses.
    let hooks = hooks_with_timeout(3600);
    // Far more throttling than aws.retry_for (1 s) covers.
    hooks.throttle_completions(200);
    let w = world(hooks, FakeInstances::default());
    let m = message("web-1", "t1", r#"{"environment":"p"}"#);
    assert_eq!(handle(&w, &m).await, Ack::Delete, "never released");
    assert_eq!(completions(&w).len(), 201);
    assert_eq!(completions(&w).last(), Some(&HookResult::Continue));
    assert_eq!(w.instances.tagged.lock().unwrap().len(), 1);
    let h = w.pipeline.store().history(None, 10).unwrap();
    assert_eq!(h.len(), 1, "one run: {h:?}");
    assert_eq!(h[0].outcome.as_str(), "succeeded");
    assert_eq!(h[0].hook_result.map(|c| c.as_str()), Some("CONTINUE"));
    assert_eq!(h[0].decision.map(|d| d.as_str()), Some("CONTINUE"));
    assert_eq!(h[0].cause.as_deref(), Some("every step succeeded (1)"));
}

#[tokio::test(start_paused = true)]
async fn a_completion_failing_until_the_actions_global_timeout_is_given_up_there() {
    // 100 heartbeat timeouts of 30 s: the action can be completed for 3000 s from its
    // start. The message says it started 2940 s ago: a minute is left, and completing is
    // throttled for far longer (hours of the paused clock).
    let hooks = hooks_with_timeout(30);
    hooks.throttle_completions(100_000);
    let w = world(hooks, FakeInstances::default());
    let mut m = message("web-1", "t1", r#"{"environment":"p"}"#);
    let mut body: serde_json::Value = serde_json::from_str(&m.body).unwrap();
    body["Time"] = crate::clock::rfc3339(crate::clock::now_ms() - 2_940_000).into();
    m.body = body.to_string();
    w.hooks
        .waiting(&instance_for("t1"), "web-1", r#"{"environment":"p"}"#);
    let t0 = Instant::now();
    let d = Delivery::new(m.clone(), Instant::now(), w.pipeline.leases());
    let outcome = w.pipeline.handle(&d, &CancellationToken::new()).await;
    drop(d);
    assert_eq!(outcome, Outcome::Retry, "given up, the message goes back");
    let tried = completions(&w).len();
    assert!((2..100_000).contains(&tried), "{tried} completions");
    // Given up by the global timeout (a minute on; a retry that would land past it is not
    // waited for), not after the 48 h a longer hook would allow: the paused clock shows
    // where the retrying stopped.
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(30) && waited <= Duration::from_secs(60),
        "{waited:?}"
    );
    let h = w.pipeline.store().history(None, 10).unwrap();
    assert_eq!(h[0].outcome.as_str(), "retry", "{h:?}");
    assert_eq!(h[0].decision.map(|d| d.as_str()), Some("CONTINUE"), "kept");

    // Past it, Auto Scaling applied the DefaultResult: the redelivery finds the action
    // gone, completes the kept decision into "no active action" and reports a timeout.
    w.hooks.complete_script.lock().unwrap().clear();
    w.hooks
        .complete_script
        .lock()
        .unwrap()
        .push_back(Ok(ActionCall::NotActive(
            "No active Lifecycle Action found with token t1".into(),
        )));
    w.hooks
        .gone
        .store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(handle_as_is(&w, &m).await, Ack::Delete);
    let h = w.pipeline.store().history(None, 10).unwrap();
    assert_eq!(
        h[0].hook_result.map(|c| c.as_str()),
        Some("timed-out"),
        "{h:?}"
    );
    assert_eq!(h[0].outcome.as_str(), "failed", "{h:?}");
}

#[tokio::test(start_paused = true)]
async fn an_action_gone_past_its_global_timeout_is_timed_out_though_heartbeated() {
    // Heartbeats kept the action alive, but not past its global timeout (100 heartbeat
    // timeouts of 30 s): it started 3010 s ago, and completing finds it gone. Auto Scaling
    // applied the DefaultResult: a timeout, not someone else's completion.
    let hooks = hooks_with_timeout(30);
    hooks
        .complete_script
        .lock()
        .unwrap()
        .push_back(Ok(ActionCall::NotActive(
            "No active Lifecycle Action found with token t1".into(),
        )));
    let w = world(hooks, FakeInstances::default());
    let mut m = message("web-1", "t1", r#"{"environment":"p"}"#);
    let mut body: serde_json::Value = serde_json::from_str(&m.body).unwrap();
    body["Time"] = crate::clock::rfc3339(crate::clock::now_ms() - 3_010_000).into();
    m.body = body.to_string();
    assert_eq!(handle(&w, &m).await, Ack::Delete);
    let h = w.pipeline.store().history(None, 1).unwrap();
    assert_eq!(
        h[0].hook_result.map(|c| c.as_str()),
        Some("timed-out"),
        "{h:?}"
    );
    assert_eq!(h[0].outcome.as_str(), "failed", "{h:?}");
}

#[tokio::test(start_paused = true)]
async fn shutdown_returns_a_throttled_completion_and_the_redelivery_reports_the_decision() {
    let hooks = hooks_with_timeout(60);
    hooks.throttle_completions(1000);
    let w = world(hooks, FakeInstances::default());
    // No "environment": the step fails and the layer abandons.
    let m = message("web-1", "t1", "{}");
    w.hooks.waiting(&instance_for("t1"), "web-1", "{}");
    let d = Delivery::new(m.clone(), Instant::now(), w.pipeline.leases());
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        stop.cancel();
    });
    let outcome = w.pipeline.handle(&d, &cancel).await;
    drop(d);
    assert_eq!(outcome, Outcome::Retry, "released after the retry delay");
    assert!(completions(&w).len() > 5);

    w.hooks.complete_script.lock().unwrap().clear();
    assert_eq!(handle(&w, &m).await, Ack::Delete);
    assert_eq!(completions(&w).last(), Some(&HookResult::Abandon));
    let h = w.pipeline.store().history(None, 10).unwrap();
    let (redelivery, first) = (&h[0], &h[1]);
    assert_eq!(first.outcome.as_str(), "retry");
    assert_eq!(first.decision.map(|d| d.as_str()), Some("ABANDON"));
    // Not "succeeded" with no steps: the decision it completed, and why.
    assert_eq!(redelivery.outcome.as_str(), "failed", "{h:?}");
    assert_eq!(redelivery.hook_result.map(|c| c.as_str()), Some("ABANDON"));
    assert_eq!(redelivery.decision.map(|d| d.as_str()), Some("ABANDON"));
    let cause = redelivery.cause.as_deref().unwrap();
    assert!(
        cause.starts_with(&format!("decided by run {}: step 0 (tag)", first.id)),
        "{cause}"
    );
    assert!(redelivery.steps.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_message_whose_action_timed_out_before_pickup_runs_nothing_and_says_why() {
    // Sent two minutes ago, past its 30 s heartbeat timeout: Auto Scaling no longer knows
    // the token. Nothing runs, nothing is completed or published as failed (a forged
    // message would look the same), and the reason says what probably happened.
    let hooks = hooks_with_timeout(30);
    hooks.gone.store(true, std::sync::atomic::Ordering::Relaxed);
    let w = world(hooks, FakeInstances::default());
    let mut m = message("web-1", "t1", r#"{"environment":"p"}"#);
    let mut body: serde_json::Value = serde_json::from_str(&m.body).unwrap();
    body["Time"] = crate::clock::rfc3339(crate::clock::now_ms() - 120_000).into();
    m.body = body.to_string();
    assert_eq!(handle(&w, &m).await, Ack::Delete);
    let h = w.pipeline.store().history(None, 1).unwrap();
    assert_eq!(h[0].outcome.as_str(), "rejected", "{h:?}");
    assert_eq!(h[0].decision, None);
    let error = h[0].error.as_deref().unwrap();
    assert!(
        error.contains("not the instance's active lifecycle action")
            && error.contains("past the hook's 30s heartbeat timeout"),
        "{error}"
    );
    assert!(completions(&w).is_empty());
    assert!(w.instances.tagged.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_same_token_at_once_is_worked_once() {
    let w = world(
        FakeHooks::default(),
        FakeInstances {
            delay: Duration::from_millis(200),
            ..Default::default()
        },
    );
    let m = message("web-1", "t1", r#"{"environment":"p"}"#);
    let (a, b, c) = tokio::join!(handle(&w, &m), handle(&w, &m), handle(&w, &m));
    assert_eq!([a, b, c], [Ack::Delete; 3]);
    assert_eq!(w.instances.tagged.lock().unwrap().len(), 1);
    assert_eq!(completions(&w).len(), 1);
    assert_eq!(Stats::get(&w.pipeline.stats.duplicates), 2);
}

#[tokio::test(start_paused = true)]
async fn a_delivery_waiting_on_a_cancelled_run_works_the_action_whole() {
    // Releasing the cancelled run's claim takes a while (a DynamoDB round trip).
    let claims: Arc<dyn Claims> = Arc::new(FlakyClaims {
        inner: Store::in_memory().unwrap(),
        failures: 0.into(),
        transient: true,
        hang_renewals: false,
        slow_release: Duration::from_secs(2),
    });
    let instances = FakeInstances {
        delay: Duration::from_secs(10),
        ..Default::default()
    };
    let w = world_with_claims(FakeHooks::default(), instances, Some(claims));
    let m = message("web-1", "t1", r#"{"environment":"p"}"#);
    w.hooks
        .waiting(&instance_for("t1"), "web-1", r#"{"environment":"p"}"#);
    let first = Delivery::new(m.clone(), Instant::now(), w.pipeline.leases());
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        stop.cancel();
    });
    // The first is cancelled mid-step and forgets its claim; the second, waiting on it in
    // this process, must then claim and work the action without that release undoing it.
    let (a, b) = tokio::join!(w.pipeline.handle(&first, &shutdown), async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        handle_as_is(&w, &m).await
    });
    assert_eq!(a, Outcome::Released);
    assert_eq!(b, Ack::Delete);
    assert_eq!(completions(&w), [HookResult::Continue]);
    let h = w.pipeline.store().history(None, 10).unwrap();
    assert_eq!(h[0].outcome, Outcome::Succeeded, "{h:?}");
}

#[tokio::test(start_paused = true)]
async fn long_steps_are_heartbeated_and_the_hook_described_once() {
    let w = world(
        FakeHooks {
            heartbeat_timeout: Duration::from_secs(30),
            ..Default::default()
        },
        FakeInstances {
            delay: Duration::from_secs(100),
            ..Default::default()
        },
    );
    let (m1, m2) = (
        message("web-1", "t1", r#"{"environment":"p"}"#),
        message("web-2", "t2", r#"{"environment":"p"}"#),
    );
    let (a, b) = tokio::join!(handle(&w, &m1), handle(&w, &m2));
    assert_eq!([a, b], [Ack::Delete; 2]);
    // Every ~10 s (a third of 30 s, jittered) over 100 s, for each of the two actions.
    let beats = w.hooks.heartbeats.lock().unwrap().len();
    assert!((16..=24).contains(&beats), "heartbeats: {beats}");
    assert_eq!(
        *w.hooks.describes.lock().unwrap(),
        2,
        "one DescribeLifecycleHooks per group"
    );
}

#[tokio::test]
async fn rejects_and_skips_are_recorded_and_deleted() {
    let w = world(FakeHooks::default(), FakeInstances::default());
    let mut m = message("web-1", "t1", "{}");
    m.body = "not json".into();
    assert_eq!(handle(&w, &m).await, Ack::Delete);
    m.body = r#"{"Event":"autoscaling:TEST_NOTIFICATION","AutoScalingGroupName":"web-1"}"#.into();
    assert_eq!(handle(&w, &m).await, Ack::Delete);
    let outcomes: Vec<String> = w
        .pipeline
        .store()
        .history(None, 10)
        .unwrap()
        .into_iter()
        .map(|r| r.outcome.as_str().to_string())
        .collect();
    assert_eq!(outcomes, ["skipped", "rejected"]);
    assert!(completions(&w).is_empty());
}

#[tokio::test]
async fn a_message_auto_scaling_does_not_confirm_runs_nothing() {
    let w = world(FakeHooks::default(), FakeInstances::default());
    let metadata = r#"{"environment":"prod"}"#;
    // In service in another group; waiting in this group but for a hook it does not have.
    let in_service = message("web-1", "t1", metadata);
    w.hooks
        .waiting(&instance_for("t1"), "other-group", metadata);
    let mut no_hook = message("web-1", "t2", metadata);
    no_hook.body = no_hook.body.replace("\"launch\"", "\"made-up\"");
    w.hooks.waiting(&instance_for("t2"), "web-1", metadata);
    assert_eq!(handle_as_is(&w, &in_service).await, Ack::Delete);
    assert_eq!(handle_as_is(&w, &no_hook).await, Ack::Delete);
    assert!(w.instances.tagged.lock().unwrap().is_empty(), "no step ran");
    assert!(completions(&w).is_empty(), "no hook was completed");
    let h = w.pipeline.store().history(None, 10).unwrap();
    assert!(h.iter().all(|r| r.outcome.as_str() == "rejected"), "{h:?}");
    let errors: Vec<&str> = h.iter().filter_map(|r| r.error.as_deref()).collect();
    assert!(
        errors[1].starts_with("forged or stale: ")
            && errors[1].contains("not listed in group \"web-1\"")
            && errors[1].contains("not the instance's active lifecycle action"),
        "{errors:?}"
    );
    assert!(
        errors[0].contains("no lifecycle hook \"made-up\""),
        "{errors:?}"
    );
    // The claim was given back: once genuine, the same token is worked.
    w.hooks.waiting(&instance_for("t1"), "web-1", metadata);
    assert_eq!(handle_as_is(&w, &in_service).await, Ack::Delete);
    assert_eq!(completions(&w), [HookResult::Continue]);
}

#[tokio::test]
async fn steps_see_the_hooks_metadata_not_the_messages() {
    let w = world(FakeHooks::default(), FakeInstances::default());
    let forged = message("web-1", "t1", r#"{"environment":"attacker"}"#);
    w.hooks
        .waiting(&instance_for("t1"), "web-1", r#"{"environment":"prod"}"#);
    assert_eq!(handle_as_is(&w, &forged).await, Ack::Delete);
    let tagged = w.instances.tagged.lock().unwrap();
    assert_eq!(tagged[0].1[1], ("Env".into(), "prod".into()));
    let h = w.pipeline.store().history(None, 1).unwrap();
    assert_eq!(h[0].outcome.as_str(), "succeeded");
    assert!(
        h[0].error
            .as_deref()
            .unwrap()
            .contains("differs from the hook's"),
        "{h:?}"
    );
    // Differing metadata makes the pipeline describe the hook again, once.
    assert_eq!(*w.hooks.describes.lock().unwrap(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_message_that_waited_long_is_heartbeated_at_once() {
    let w = world(
        FakeHooks {
            heartbeat_timeout: Duration::from_secs(300),
            ..Default::default()
        },
        FakeInstances {
            delay: Duration::from_secs(5),
            ..Default::default()
        },
    );
    let mut m = message("web-1", "t1", r#"{"environment":"p"}"#);
    let mut body: serde_json::Value = serde_json::from_str(&m.body).unwrap();
    body["Time"] = "2020-01-01T00:00:00Z".into();
    m.body = body.to_string();
    assert_eq!(handle(&w, &m).await, Ack::Delete);
    // The step took 5 s, far less than the 100 s interval: only the beat at pickup.
    assert_eq!(w.hooks.heartbeats.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_step_stops_when_a_heartbeat_finds_the_action_gone() {
    let w = world(
        hooks_with_timeout(30),
        FakeInstances {
            delay: Duration::from_secs(600),
            ..Default::default()
        },
    );
    // The action is proven at pickup, then ends (timed out, or completed elsewhere).
    let hooks = w.hooks.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        hooks.gone.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let started = Instant::now();
    let m = message("web-1", "t1", r#"{"environment":"p"}"#);
    assert_eq!(handle(&w, &m).await, Ack::Delete);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert!(
        w.instances.tagged.lock().unwrap().is_empty(),
        "the step was stopped"
    );
    let h = w.pipeline.store().history(None, 1).unwrap();
    assert_eq!(h[0].outcome.as_str(), "failed");
    assert!(
        h[0].error
            .as_deref()
            .unwrap()
            .contains("lifecycle action ended"),
        "{h:?}"
    );
    assert_eq!(h[0].steps[0].outcome, "cancelled");
}

#[tokio::test]
async fn a_burst_into_one_group_is_verified_with_one_group_description() {
    let w = world(FakeHooks::default(), FakeInstances::default());
    let metadata = r#"{"environment":"p"}"#;
    let messages: Vec<Message> = (0..20)
        .map(|i| message("web-1", &format!("t{i}"), metadata))
        .collect();
    // The whole burst is waiting in the group before the first message is worked.
    for i in 0..20 {
        w.hooks
            .waiting(&instance_for(&format!("t{i}")), "web-1", metadata);
    }
    for m in &messages {
        assert_eq!(handle_as_is(&w, m).await, Ack::Delete);
    }
    assert_eq!(completions(&w).len(), 20);
    assert_eq!(*w.hooks.group_describes.lock().unwrap(), 1);
    // An instance the cached list does not know makes it look again, once.
    let late = message("web-1", "late", metadata);
    w.hooks.waiting(&instance_for("late"), "web-1", metadata);
    assert_eq!(handle_as_is(&w, &late).await, Ack::Delete);
    assert_eq!(*w.hooks.group_describes.lock().unwrap(), 2);
    assert_eq!(completions(&w).len(), 21);
}

/// Another process's claim on `token`, with a live lease.
async fn held_elsewhere(w: &World, token: &str) {
    let claims: &dyn Claims = w.pipeline.store();
    let got = claims
        .claim(token, "other-host:1:0000abcd", 0, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(got, Claim::Fresh { from: None });
}

#[tokio::test]
async fn a_token_another_owner_holds_waits_hidden_and_is_acknowledged_once_done() {
    let w = Arc::new(world(FakeHooks::default(), FakeInstances::default()));
    held_elsewhere(&w, "t-held").await;
    let m = message("web-1", "t-held", r#"{"environment":"prod"}"#);
    let task = tokio::spawn({
        let w = w.clone();
        async move { handle(&w, &m).await }
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !task.is_finished(),
        "it waits while the other owner's lease runs"
    );
    let claims: &dyn Claims = w.pipeline.store();
    let done = Completion::Completed(HookResult::Continue);
    let ended = claims.done("t-held", "other-host:1:0000abcd", done);
    assert!(ended.await.unwrap());
    assert_eq!(task.await.unwrap(), Ack::Delete);
    assert!(w.instances.tagged.lock().unwrap().is_empty(), "no step ran");
    assert!(completions(&w).is_empty(), "nothing completed");
}

#[tokio::test]
async fn a_claim_taken_over_mid_steps_stops_them_and_returns_the_message() {
    let slow = FakeInstances {
        delay: Duration::from_secs(30),
        ..Default::default()
    };
    let w = Arc::new(world(FakeHooks::default(), slow));
    let m = message("web-1", "t-lost", r#"{"environment":"prod"}"#);
    let task = tokio::spawn({
        let w = w.clone();
        async move { handle(&w, &m).await }
    });
    let claims: &dyn Claims = w.pipeline.store();
    for _ in 0..50 {
        if matches!(
            claims.peek("t-lost", "x").await.unwrap(),
            Claim::Held { .. }
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its lease lapses (a stalled host), and another owner takes the claim over.
    w.pipeline
        .store()
        .call(|c| c.execute("UPDATE actions SET lease_until = 0", []))
        .await
        .unwrap();
    assert!(matches!(
        claims
            .claim("t-lost", "thief", 0, Duration::from_secs(60))
            .await
            .unwrap(),
        Claim::Fresh { from: Some(_) }
    ));
    let ack = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the steps stopped at the next renewal")
        .unwrap();
    assert_eq!(ack, Ack::Release(Duration::ZERO));
    assert!(w.instances.tagged.lock().unwrap().is_empty());
    assert!(completions(&w).is_empty());
    assert!(
        matches!(
            claims.peek("t-lost", "x").await.unwrap(),
            Claim::Held { owner, .. } if owner == "thief"
        ),
        "the thief's claim is left alone"
    );
}

/// A launch message with Origin and Destination, for the warm pool's phases.
fn pool_message(token: &str, origin: &str, destination: &str) -> Message {
    let mut m = message("web-1", token, r#"{"environment":"prod"}"#);
    let mut body: serde_json::Value = serde_json::from_str(&m.body).unwrap();
    body["Origin"] = origin.into();
    body["Destination"] = destination.into();
    m.body = body.to_string();
    m
}

#[tokio::test]
async fn warm_pool_phases_run_their_lists_after_their_own_wait_state_is_confirmed() {
    let w = world(FakeHooks::default(), FakeInstances::default());
    // Entering the pool: no pool_enter list, so the launch steps run (the instance waits in
    // Warmed:Pending:Wait, which the group's member list leaves out: the instance is
    // confirmed on its own).
    let enter = pool_message("t-enter", "EC2", "WarmPool");
    w.hooks.waiting(
        &instance_for("t-enter"),
        "web-1",
        r#"{"environment":"prod"}"#,
    );
    w.hooks
        .members
        .lock()
        .unwrap()
        .get_mut(&instance_for("t-enter"))
        .unwrap()
        .state = "Warmed:Pending:Wait".into();
    assert_eq!(handle_as_is(&w, &enter).await, Ack::Delete);
    // Leaving it: pool_leave is empty, nothing is tagged again.
    let leave = pool_message("t-leave", "WarmPool", "AutoScalingGroup");
    assert_eq!(handle(&w, &leave).await, Ack::Delete);
    assert_eq!(
        completions(&w),
        [HookResult::Continue, HookResult::Continue]
    );
    let tagged: Vec<String> = (w.instances.tagged.lock().unwrap())
        .iter()
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(tagged, [instance_for("t-enter")]);
    // A message claiming the pool for an instance waiting to launch into the group is not
    // confirmed: nothing runs.
    let claimed = pool_message("t-claim", "EC2", "WarmPool");
    assert_eq!(handle(&w, &claimed).await, Ack::Delete);
    assert_eq!(completions(&w).len(), 2, "the forged one is not completed");
}

/// A claim store whose first `failures` claims fail, transiently or for good, and whose
/// releases take `slow_release`.
struct FlakyClaims {
    inner: Store,
    failures: std::sync::atomic::AtomicU32,
    transient: bool,
    slow_release: Duration,
    /// Renewals never answer (a claim store that hangs).
    hang_renewals: bool,
}

#[async_trait::async_trait]
impl Claims for FlakyClaims {
    async fn claim(
        &self,
        token: &str,
        owner: &str,
        run_id: i64,
        lease: Duration,
    ) -> Result<Claim, crate::claims::ClaimError> {
        use std::sync::atomic::Ordering::SeqCst;
        let left = self.failures.load(SeqCst);
        if left > 0 {
            self.failures.store(left - 1, SeqCst);
            let message = "ProvisionedThroughputExceededException";
            return Err(match self.transient {
                true => crate::claims::ClaimError::transient("flaky", message),
                false => crate::claims::ClaimError::new("flaky", "AccessDeniedException"),
            });
        }
        self.inner.claim(token, owner, run_id, lease).await
    }
    async fn peek(&self, token: &str, owner: &str) -> Result<Claim, crate::claims::ClaimError> {
        self.inner.peek(token, owner).await
    }
    async fn renew(
        &self,
        token: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, crate::claims::ClaimError> {
        if self.hang_renewals {
            std::future::pending::<()>().await;
        }
        self.inner.renew(token, owner, lease).await
    }
    async fn decide(
        &self,
        token: &str,
        owner: &str,
        result: HookResult,
    ) -> Result<bool, crate::claims::ClaimError> {
        self.inner.decide(token, owner, result).await
    }
    async fn done(
        &self,
        token: &str,
        owner: &str,
        result: Completion,
    ) -> Result<bool, crate::claims::ClaimError> {
        self.inner.done(token, owner, result).await
    }
    async fn release(&self, token: &str, owner: &str) -> Result<(), crate::claims::ClaimError> {
        tokio::time::sleep(self.slow_release).await;
        self.inner.release(token, owner).await
    }
    fn describe(&self) -> String {
        "flaky".into()
    }
}

fn flaky(failures: u32, transient: bool) -> Option<Arc<dyn Claims>> {
    Some(Arc::new(FlakyClaims {
        inner: Store::in_memory().unwrap(),
        failures: failures.into(),
        transient,
        slow_release: Duration::ZERO,
        hang_renewals: false,
    }))
}

#[tokio::test(start_paused = true)]
async fn an_owner_whose_renewals_hang_stops_before_its_lease_can_lapse() {
    // The claim store stops answering renewals mid-steps (a host cut off from DynamoDB).
    // Another host may take the claim over once the 3 s lease is over: this one must have
    // stopped its steps before, decided nothing and completed nothing.
    let claims: Arc<dyn Claims> = Arc::new(FlakyClaims {
        inner: Store::in_memory().unwrap(),
        failures: 0.into(),
        transient: true,
        slow_release: Duration::ZERO,
        hang_renewals: true,
    });
    let slow = FakeInstances {
        delay: Duration::from_secs(600),
        ..Default::default()
    };
    let w = world_with_claims(FakeHooks::default(), slow, Some(claims.clone()));
    let started = Instant::now();
    let m = message("web-1", "t-cut-off", r#"{"environment":"prod"}"#);
    assert_eq!(handle(&w, &m).await, Ack::Release(Duration::ZERO));
    let stopped_after = started.elapsed();
    assert!(
        stopped_after < Duration::from_secs(3),
        "stopped {stopped_after:?} after claiming, a quarter of the lease before it lapses"
    );
    assert!(w.instances.tagged.lock().unwrap().is_empty());
    assert!(completions(&w).is_empty(), "nothing completed");
    assert!(
        !matches!(
            claims.peek("t-cut-off", "other").await.unwrap(),
            Claim::Decided(_) | Claim::Done { .. }
        ),
        "nothing decided or done"
    );
    let h = w.pipeline.store().history(None, 1).unwrap();
    let error = h[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("could not be renewed"), "{h:?}");
    assert_eq!(h[0].steps[0].outcome, "cancelled");
}

/// A launch handled with a claim store whose first `failures` claims fail.
async fn with_flaky_claims(failures: u32, transient: bool) -> (World, Ack) {
    let claims = flaky(failures, transient);
    let w = world_with_claims(FakeHooks::default(), FakeInstances::default(), claims);
    let d = handle(
        &w,
        &message("web-1", "t-flaky", r#"{"environment":"prod"}"#),
    )
    .await;
    (w, d)
}

#[tokio::test]
async fn a_claim_store_failing_for_a_while_keeps_the_message_in_flight() {
    let (w, d) = with_flaky_claims(3, true).await;
    assert_eq!(d, Ack::Delete, "worked in the same delivery");
    assert_eq!(completions(&w), [HookResult::Continue]);
    assert_eq!(w.instances.tagged.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_claim_store_refusing_for_good_returns_the_message_with_the_reason() {
    let (w, d) = with_flaky_claims(1, false).await;
    assert!(matches!(d, Ack::Release(_)), "{d:?}");
    assert!(completions(&w).is_empty());
    let runs = w.pipeline.store().history(None, 10).unwrap();
    assert!(
        runs[0]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("AccessDeniedException")),
        "{runs:?}"
    );
}

#[tokio::test]
async fn daemon_unmatched_completes_only_an_action_auto_scaling_confirms() {
    let config = CONFIG.replace("[aws]", "[daemon]\nunmatched = \"continue\"\n[aws]");
    let w = world_from(
        &config,
        FakeHooks::default(),
        FakeInstances::default(),
        None,
    );
    // A group no layer takes. A message naming an instance that waits nowhere (its token
    // cannot be the instance's action) is not completed for nobody's layer.
    let forged = message("other-1", "t-forged", "{}");
    assert_eq!(handle_as_is(&w, &forged).await, Ack::Delete);
    assert!(
        completions(&w).is_empty(),
        "nothing completed for a forged message"
    );
    // A genuine action of that group is completed as `daemon.unmatched` says.
    let genuine = message("other-1", "t-real", "{}");
    assert_eq!(handle(&w, &genuine).await, Ack::Delete);
    assert_eq!(completions(&w), [HookResult::Continue]);
    let h = w.pipeline.store().history(None, 10).unwrap();
    let outcomes: Vec<&str> = h.iter().map(|r| r.outcome.as_str()).collect();
    assert!(
        outcomes.contains(&"rejected") && outcomes.contains(&"unmatched"),
        "{outcomes:?}"
    );
}

/// A source's pipeline over `store`, publishing through `publisher`.
fn source_over(store: &Store, publisher: &Batcher<String>) -> Arc<Pipeline> {
    let cfg = Arc::new(Config::parse(CONFIG, "test").unwrap());
    let hooks = Arc::new(FakeHooks::default());
    let stats = Arc::new(Stats::default());
    let leases = Leases::spawn(None, hooks.clone(), Duration::from_secs(30), stats.clone());
    Arc::new(Pipeline::new(Parts {
        cfg,
        hooks,
        services: Services {
            instances: Arc::new(FakeInstances::default()),
            ssm: Arc::new(crate::aws::fake::Unused),
            opsworks: Arc::new(crate::aws::fake::Unused),
            ecs: Arc::new(crate::aws::fake::Unused),
        },
        store: store.clone(),
        claims: None,
        leases,
        publisher: Some(publisher.clone()),
        stats,
        remote: None,
        ansible: None,
    }))
}

/// Two sources' loops over one store come to the outbox at once, while the first one's
/// publication of the waiting event is still on its way: the second finds the outbox
/// taken, so the event goes out once (without the turn, it reads the same event, not yet
/// marked published, and sends it too).
#[tokio::test]
async fn one_source_loop_at_a_time_republishes_the_outbox() {
    use crate::store::{NewRun, RunEnd};
    let store = Store::in_memory().unwrap();
    let run = store.insert_run(NewRun::default()).await.unwrap();
    let end = RunEnd {
        outcome: Outcome::Succeeded,
        unpublished: Some(r#"{"type":"provision.result"}"#),
        ..RunEnd::default()
    };
    store.finish_run(run, end).await.unwrap();

    // The result topic: counts the calls begun, holds each until the gate opens, and
    // keeps what was sent.
    let (begun, mut calls) = tokio::sync::watch::channel(0usize);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let sent = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let (begun, topic_gate, topic_sent) = (Arc::new(begun), gate.clone(), sent.clone());
    let (publisher, _task) =
        Batcher::spawn(10, Duration::from_millis(1), move |bodies: Vec<String>| {
            let (begun, gate, sent) = (begun.clone(), topic_gate.clone(), topic_sent.clone());
            async move {
                begun.send_modify(|n| *n += 1);
                let _ = gate.acquire().await;
                let n = bodies.len();
                sent.lock().unwrap().extend(bodies);
                vec![Ok(()); n]
            }
        });
    let (a, b) = (
        source_over(&store, &publisher),
        source_over(&store, &publisher),
    );
    let bound = Duration::from_secs(10);

    let first = tokio::spawn(async move { a.republish().await });
    tokio::time::timeout(bound, calls.wait_for(|n| *n >= 1))
        .await
        .expect("the first loop publishes")
        .unwrap();
    let mut second = tokio::spawn(async move { b.republish().await });
    let second_early = tokio::time::timeout(bound, async {
        tokio::select! {
            n = &mut second => Some(n.unwrap()),
            _ = calls.wait_for(|n| *n >= 2) => None,
        }
    })
    .await
    .expect("the second loop gives up its turn, or publishes too");
    gate.close();
    let first = first.await.unwrap();
    let second = match second_early {
        Some(n) => n,
        None => second.await.unwrap(),
    };
    let sent = sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 1, "sent once: {sent:?}");
    assert_eq!((first, second), (1, 0));
    assert!(store.unpublished(10).await.unwrap().is_empty());
}
