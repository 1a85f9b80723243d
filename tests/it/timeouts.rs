//! A lifecycle action that ends without provision while its steps run, against the real
//! binary and the emulator: by its heartbeat timeout (`timed-out`: Auto Scaling applied the
//! hook's DefaultResult) or by someone else's completion (`already-finished`).
//!
//! The hooks here have a 6 s heartbeat timeout (the emulator accepts less than AWS's 30 s
//! minimum), so an action really times out, on the emulator's clock and the host's alike,
//! within a test: provision judges "no active action" by how long nothing showed the action
//! alive, and a timeout the test only simulated by moving Auto Scaling's clock would not be
//! one provision could see. The step is an `ssm` command that sleeps far longer than the
//! test waits, so only a stop ends it.

use crate::common;

use std::time::Duration;

use common::{eventually, Emulator, Provision, World};
use serde_json::{json, Value};

const METADATA: &str = r#"{"environment":"production"}"#;

/// One ssm step that would run for 10 minutes unless stopped.
const SLOW_LAYER: &str = r#"
[ssm]
batch_window = "1s"

[layers.app]
groups = ["app-*"]
launch = [ { ssm = { document = "AWS-RunShellScript", parameters = { commands = ["sleep 600", "touch finished"] } }, timeout = "15m" } ]
"#;

/// A group whose launch hook times out after 6 s without a heartbeat (beaten every 2 s),
/// a daemon reading its queue and publishing results, then one instance launched (after
/// the daemon is up, so its proof comes well within the timeout). Returns the world, the
/// daemon, its results queue and the instance.
async fn launch_under_a_slow_step(
    group: &str,
) -> (World, Provision, common::Running, common::Queue, String) {
    let w = World::builder(group)
        .heartbeat(6)
        .metadata(METADATA)
        .layer(SLOW_LAYER)
        .start()
        .await;
    let (topic, results) = w.aws.topic_with_queue("results").await;
    let p = w.provision_with(Some(&topic), SLOW_LAYER);
    let daemon = p.daemon();
    w.aws.scale(group, 1).await;
    let id = w.aws.instances(group).await.remove(0).0;
    // The step is under way: the instance's invocation runs.
    eventually(
        "the ssm command to run",
        Duration::from_secs(60),
        || async { invocation(&w.emu, &id).filter(|inv| inv["status"] == "InProgress") },
    )
    .await;
    (w, p, daemon, results, id)
}

/// The instance's invocation of the (one) command sent to it.
fn invocation(emu: &Emulator, id: &str) -> Option<Value> {
    let state = emu.control("GET", "/_emulator/ssm", None);
    state["commands"]
        .as_array()?
        .iter()
        .find_map(|c| c["invocations"].get(id).cloned())
}

/// The run of `id`'s launch once it has ended (its hook result recorded).
async fn ended_run(p: &Provision, id: &str) -> provision::store::RunRow {
    eventually("the run to end", Duration::from_secs(60), || async {
        p.history().into_iter().find(|r| {
            r.instance_id.as_deref() == Some(id)
                && r.transition.as_deref() == Some("launch")
                && r.hook_result.is_some()
        })
    })
    .await
}

/// The result event published for `id`.
async fn result_event(w: &World, results: &common::Queue, id: &str) -> Value {
    let seen = std::sync::Mutex::new(Vec::new());
    eventually("the result event", Duration::from_secs(60), || async {
        let new = w.aws.results(results).await;
        let mut seen = seen.lock().unwrap();
        seen.extend(new);
        seen.iter().find(|e| e["instance_id"] == id).cloned()
    })
    .await
}

/// The action times out while its step runs: heartbeats stop getting through (one is held
/// by the emulator for 9 s, longer than the 6 s timeout), Auto Scaling applies the hook's
/// DefaultResult, and the held heartbeat then answers that the action is gone. The running
/// step is stopped (its SSM command cancelled on the instance), the run is recorded
/// `timed-out` (outcome `failed`), and the result event says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_timing_out_mid_step_stops_the_step_and_is_recorded_timed_out() {
    let (w, p, daemon, results, id) = launch_under_a_slow_step("app-tmo").await;
    w.emu.fault(
        json!({"service": "autoscaling", "action": "RecordLifecycleActionHeartbeat",
        "count": 1, "delay_seconds": 9}),
    );

    w.wait_finished_within(1, Duration::from_secs(60)).await;
    let action = w.emu.finished_actions().remove(0);
    assert_eq!(action["finished_by"], "timeout", "{action}");
    assert_eq!(
        action["result"], "ABANDON",
        "the hook's DefaultResult: {action}"
    );

    let run = ended_run(&p, &id).await;
    assert_eq!(
        run.hook_result.map(|c| c.as_str()),
        Some("timed-out"),
        "{run:?}\n{}",
        daemon.log()
    );
    assert_eq!(run.outcome.as_str(), "failed", "{run:?}");
    let error = run.error.clone().unwrap_or_default();
    assert!(
        error.contains("the lifecycle action ended while this step ran"),
        "{error}"
    );
    assert_eq!(run.steps.len(), 1, "{run:?}");
    assert_eq!(run.steps[0].outcome.as_str(), "cancelled", "{run:?}");

    // The step was stopped on the instance, not left running.
    let inv = eventually("the invocation to end", Duration::from_secs(30), || async {
        invocation(&w.emu, &id).filter(|inv| inv["status"] != "InProgress")
    })
    .await;
    assert_eq!(inv["status_details"], "Cancelled", "{inv}");
    let cancels = w.emu.control("GET", "/_emulator/ssm", None)["cancels"].clone();
    assert!(
        cancels
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["cancelled"].as_array().unwrap().contains(&json!(id))),
        "{cancels}"
    );

    let event = result_event(&w, &results, &id).await;
    assert_eq!(event["hook_result"], "timed-out", "{event}");
    assert_eq!(event["outcome"], "failed", "{event}");
    assert!(w.emu.faults_left().is_empty(), "the held heartbeat was met");
    // (The queue is not empty: the abandoned instance's replacement is launching.)
}

/// Someone else completes the action while its step runs (an operator, another tool): the
/// next heartbeat finds it gone and stops the step; provision's completion finds no
/// active action while heartbeats had kept it alive, so the run is `already-finished`,
/// not a timeout, and Auto Scaling kept the other party's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_completed_by_someone_else_mid_step_is_already_finished() {
    let (w, p, daemon, results, id) = launch_under_a_slow_step("app-fin").await;
    let token = w
        .emu
        .actions()
        .into_iter()
        .find(|a| a["instance_id"] == id.as_str())
        .unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string();
    w.aws
        .asg
        .complete_lifecycle_action()
        .auto_scaling_group_name("app-fin")
        .lifecycle_hook_name("provision-launch")
        .lifecycle_action_token(&token)
        .lifecycle_action_result("CONTINUE")
        .send()
        .await
        .unwrap();

    let run = ended_run(&p, &id).await;
    assert_eq!(
        run.hook_result.map(|c| c.as_str()),
        Some("already-finished"),
        "{run:?}\n{}",
        daemon.log()
    );
    let error = run.error.clone().unwrap_or_default();
    assert!(
        error.contains("the lifecycle action ended while this step ran"),
        "{error}"
    );
    assert_eq!(run.steps[0].outcome.as_str(), "cancelled", "{run:?}");
    let action = w.emu.finished_actions().remove(0);
    assert_eq!(
        (
            &action["finished_by"],
            &action["result"],
            &action["completions"]
        ),
        (&json!("complete"), &json!("CONTINUE"), &json!(1)),
        "only the other party's completion counted: {action}"
    );
    let event = result_event(&w, &results, &id).await;
    assert_eq!(event["hook_result"], "already-finished", "{event}");
    w.queue_is_empty().await;
}
