//! The `ecs_drain` step against the emulator: a scale-in whose hook completes only after the
//! instance's service tasks moved to another container instance, and a drain that cannot
//! finish. Real SDK, real `provision` binary, the emulator's ECS draining
//! (tests/emulator/ecs.py).

use crate::common;

use std::time::Duration;

use aws_sdk_ecs::types::ContainerDefinition;
use common::{eventually, Aws, Emulator, Provision, Queue, World};
use serde_json::Value;

const TERMINATE: &str = "autoscaling:EC2_INSTANCE_TERMINATING";

fn layer(timeout: &str) -> String {
    format!(
        r#"
[layers.ecs]
groups = ["ecs-*"]
terminate = [ {{ ecs_drain = {{ cluster = "{{metadata.cluster}}", poll = "1s" }}, timeout = "{timeout}" }} ]
"#
    )
}

/// A group of `n` instances in service, its terminate hook (metadata names the cluster,
/// heartbeat timeout in seconds) notifying the queue, and an ECS cluster of the same name with each instance registered.
/// Returns the instances and their container instance ARNs, in the same order.
async fn cluster_group(
    emu: &Emulator,
    name: &str,
    n: i32,
    heartbeat: i32,
) -> (Aws, Queue, aws_sdk_ecs::Client, Vec<(String, String)>) {
    let aws = Aws::new(emu).await;
    let q = aws.queue("lifecycle").await;
    aws.group(name).await;
    aws.scale(name, n).await;
    let metadata = format!(r#"{{"cluster":"{name}"}}"#);
    aws.hook(
        name,
        "provision-terminate",
        TERMINATE,
        Some(&q.arn),
        heartbeat,
        "CONTINUE",
        Some(&metadata),
    )
    .await;
    let ecs = aws_sdk_ecs::Client::new(&aws.sdk);
    cluster(&ecs, name).await;
    let mut members = Vec::new();
    for (id, _) in aws.instances(name).await {
        let arn = register(&ecs, name, &id).await;
        members.push((id, arn));
    }
    (aws, q, ecs, members)
}

/// An ECS cluster `name` and the task definition "web".
async fn cluster(ecs: &aws_sdk_ecs::Client, name: &str) {
    ecs.create_cluster()
        .cluster_name(name)
        .send()
        .await
        .unwrap();
    ecs.register_task_definition()
        .family("web")
        .container_definitions(
            ContainerDefinition::builder()
                .name("web")
                .image("nginx")
                .memory(128)
                .cpu(64)
                .build(),
        )
        .send()
        .await
        .unwrap();
}

/// Registers EC2 instance `id` as a container instance of `cluster`; its ARN.
async fn register(ecs: &aws_sdk_ecs::Client, cluster: &str, id: &str) -> String {
    let doc = serde_json::json!({ "instanceId": id, "region": "us-east-1" }).to_string();
    let ci = ecs
        .register_container_instance()
        .cluster(cluster)
        .instance_identity_document(doc)
        .send()
        .await
        .unwrap();
    ci.container_instance
        .unwrap()
        .container_instance_arn
        .unwrap()
}

/// Starts `n` tasks of a service ("ecs-svc/..." as ECS marks them) on a container instance.
async fn service_tasks(ecs: &aws_sdk_ecs::Client, cluster: &str, on: &str, n: usize) {
    for _ in 0..n {
        ecs.start_task()
            .cluster(cluster)
            .task_definition("web")
            .container_instances(on)
            .started_by("ecs-svc/7261635412340001")
            .send()
            .await
            .unwrap();
    }
}

async fn running(ecs: &aws_sdk_ecs::Client, cluster: &str, arn: &str) -> (String, i32) {
    let out = ecs
        .describe_container_instances()
        .cluster(cluster)
        .container_instances(arn)
        .send()
        .await
        .unwrap();
    let c = &out.container_instances()[0];
    (
        c.status().unwrap_or_default().to_string(),
        c.running_tasks_count(),
    )
}

async fn terminate(aws: &Aws, id: &str) {
    aws.asg
        .terminate_instance_in_auto_scaling_group()
        .instance_id(id)
        .should_decrement_desired_capacity(true)
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_in_completes_only_after_its_tasks_moved_off() {
    let emu = Emulator::start();
    // A 6 s heartbeat timeout (beats every 2 s): the eight moves (one a second) take
    // longer, so the hook lives only if it is heartbeated while the step waits.
    let (aws, q, ecs, members) = cluster_group(&emu, "ecs-prod", 2, 6).await;
    let (leaving, from) = &members[0];
    let (_, to) = &members[1];
    service_tasks(&ecs, "ecs-prod", from, 8).await;
    assert_eq!(running(&ecs, "ecs-prod", from).await.1, 8);
    terminate(&aws, leaving).await;

    let p = Provision::new(&emu, &q, None, &layer("2m"));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");

    let run = p.last_run(leaving, "terminate");
    assert_eq!(run.outcome.as_str(), "succeeded", "{run:?}");
    assert_eq!(run.hook_result.map(|c| c.as_str()), Some("CONTINUE"));
    let detail = run.steps[0].detail.clone().unwrap_or_default();
    assert!(
        detail.contains("8 task(s) were running, none is now"),
        "{detail}"
    );
    assert_eq!(
        running(&ecs, "ecs-prod", from).await,
        ("DRAINING".to_string(), 0)
    );
    assert_eq!(
        running(&ecs, "ecs-prod", to).await,
        ("ACTIVE".to_string(), 8)
    );

    // The order, as the emulator saw it: every task moved off, then the hook completed.
    let moves = emu.control("GET", "/_emulator/ecs", None)["moves"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(moves.len(), 8, "{moves:?}");
    assert!(moves
        .iter()
        .all(|m| m["from"] == *from.as_str() && m["to"] == *to.as_str()));
    let last_move = moves
        .iter()
        .filter_map(|m| m["at"].as_f64())
        .fold(0.0, f64::max);
    let action = emu
        .finished_actions()
        .into_iter()
        .find(|a| a["instance_id"] == *leaving.as_str())
        .expect("the terminate action finished");
    assert_eq!(action["finished_by"], "complete");
    assert!(
        action["finished"].as_f64().unwrap() >= last_move,
        "completed before the last task moved: {action} {moves:?}"
    );
    assert!(
        action["heartbeats"].as_u64().unwrap_or(0) >= 2,
        "heartbeated: {action}"
    );
    eventually(
        "the drained instance to be terminated",
        Duration::from_secs(10),
        || async { (aws.instance_state(leaving).await == "terminated").then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_cannot_finish_fails_with_the_tasks_left() {
    let emu = Emulator::start();
    // One container instance: its service tasks have nowhere to go.
    let (aws, q, ecs, members) = cluster_group(&emu, "ecs-solo", 1, 300).await;
    let (leaving, arn) = &members[0];
    service_tasks(&ecs, "ecs-solo", arn, 2).await;
    terminate(&aws, leaving).await;

    let p = Provision::new(&emu, &q, None, &layer("3s"));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let run = p.last_run(leaving, "terminate");
    assert_eq!(run.outcome.as_str(), "failed", "{run:?}");
    assert_eq!(run.hook_result.map(|c| c.as_str()), Some("ABANDON"));
    let error = run.error.unwrap_or_default();
    assert!(
        error.contains(&format!(
            "2 task(s) still running on container instance {arn}"
        )) && error.contains("ecs-solo"),
        "{error}"
    );
    assert_eq!(
        running(&ecs, "ecs-solo", arn).await,
        ("DRAINING".to_string(), 2)
    );
    let calls: Value = emu.provision_calls().into();
    assert_eq!(calls["ecs:UpdateContainerInstancesState"], 1, "{calls}");
}

/// An instance the cluster does not know has nothing to drain: the step succeeds saying
/// so, touches no container instance, and the hook completes CONTINUE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_not_registered_with_the_cluster_has_nothing_to_drain() {
    let emu = Emulator::start();
    let (aws, q, ecs, members) = cluster_group(&emu, "ecs-none", 1, 300).await;
    let (_, arn) = &members[0];
    service_tasks(&ecs, "ecs-none", arn, 2).await;
    // A second instance, launched after the cluster registered the first.
    aws.scale("ecs-none", 2).await;
    let stranger = aws
        .instances("ecs-none")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .find(|id| *id != members[0].0)
        .expect("the second instance");
    terminate(&aws, &stranger).await;

    let p = Provision::new(&emu, &q, None, &layer("2m"));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let run = p.last_run(&stranger, "terminate");
    assert_eq!(run.outcome.as_str(), "succeeded", "{run:?}");
    assert_eq!(run.hook_result.map(|c| c.as_str()), Some("CONTINUE"));
    let detail = run.steps[0].detail.clone().unwrap_or_default();
    assert!(
        detail.contains(&format!(
            "{stranger} is not a container instance of cluster ecs-none: nothing to drain"
        )),
        "{detail}"
    );
    let calls: Value = emu.provision_calls().into();
    assert_eq!(calls["ecs:ListContainerInstances"], 1, "{calls}");
    assert!(
        calls.get("ecs:UpdateContainerInstancesState").is_none(),
        "{calls}"
    );
    assert_eq!(
        running(&ecs, "ecs-none", arn).await,
        ("ACTIVE".to_string(), 2),
        "the registered instance was left alone"
    );
}

/// An instance already DRAINING (an operator, or an earlier run that died): the step does
/// not set it again, waits for its tasks to leave, and the hook completes CONTINUE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_already_draining_is_waited_for_not_drained_again() {
    let emu = Emulator::start();
    let (aws, q, ecs, members) = cluster_group(&emu, "ecs-again", 2, 300).await;
    let (leaving, from) = &members[0];
    let (_, to) = &members[1];
    service_tasks(&ecs, "ecs-again", from, 3).await;
    ecs.update_container_instances_state()
        .cluster("ecs-again")
        .container_instances(from)
        .status(aws_sdk_ecs::types::ContainerInstanceStatus::Draining)
        .send()
        .await
        .unwrap();
    terminate(&aws, leaving).await;

    let p = Provision::new(&emu, &q, None, &layer("2m"));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let run = p.last_run(leaving, "terminate");
    assert_eq!(run.outcome.as_str(), "succeeded", "{run:?}");
    assert_eq!(run.hook_result.map(|c| c.as_str()), Some("CONTINUE"));
    let detail = run.steps[0].detail.clone().unwrap_or_default();
    assert!(detail.contains("none is now"), "{detail}");
    assert_eq!(
        running(&ecs, "ecs-again", from).await,
        ("DRAINING".to_string(), 0)
    );
    assert_eq!(
        running(&ecs, "ecs-again", to).await,
        ("ACTIVE".to_string(), 3)
    );
    let calls: Value = emu.provision_calls().into();
    assert!(
        calls.get("ecs:UpdateContainerInstancesState").is_none(),
        "not set DRAINING again: {calls}"
    );
    assert!(
        calls["ecs:DescribeContainerInstances"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "waited for the tasks: {calls}"
    );
}

/// A scale-in into the warm pool (ReuseOnScaleIn) with `ecs_drain` on `pool_return`: the
/// instance's service tasks move off before it returns to the pool, stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_return_to_the_warm_pool_drains_first() {
    const LAYER: &str = r#"
[layers.ecs]
groups = ["ecs-*"]
launch = [ { tag = { Setup = "full" } } ]
pool_return = [ { ecs_drain = { cluster = "{metadata.cluster}", poll = "1s" }, timeout = "2m" } ]
terminate = [ { tag = { Gone = "yes" } } ]
"#;
    let w = World::builder("ecs-wp")
        .metadata(r#"{"cluster":"ecs-wp"}"#)
        .terminate_hook("CONTINUE")
        .layer(LAYER)
        .start()
        .await;
    let aws = &w.aws;
    aws.asg
        .put_warm_pool()
        .auto_scaling_group_name("ecs-wp")
        .min_size(1)
        .max_group_prepared_capacity(1)
        .instance_reuse_policy(
            aws_sdk_autoscaling::types::InstanceReusePolicy::builder()
                .reuse_on_scale_in(true)
                .build(),
        )
        .send()
        .await
        .unwrap();
    let p = w.provision();
    let worker = |p: &Provision| {
        let (code, log) = p.worker();
        assert_eq!(code, 0, "{log}");
    };
    worker(&p);
    aws.scale("ecs-wp", 2).await;
    worker(&p);
    let members = aws.instances("ecs-wp").await;
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(members.iter().all(|(_, s)| s == "InService"), "{members:?}");
    let ecs = aws_sdk_ecs::Client::new(&aws.sdk);
    cluster(&ecs, "ecs-wp").await;
    let mut arns = std::collections::BTreeMap::new();
    for (id, _) in &members {
        let arn = register(&ecs, "ecs-wp", id).await;
        service_tasks(&ecs, "ecs-wp", &arn, 2).await;
        arns.insert(id.clone(), arn);
    }

    aws.scale("ecs-wp", 1).await;
    let staying = aws.instances("ecs-wp").await.remove(0).0;
    let leaving = members
        .iter()
        .map(|(id, _)| id.clone())
        .find(|id| *id != staying)
        .unwrap();
    worker(&p);

    let run = p.last_run(&leaving, "terminate");
    assert_eq!(run.outcome.as_str(), "succeeded", "{run:?}");
    assert_eq!(run.hook_result.map(|c| c.as_str()), Some("CONTINUE"));
    assert_eq!(run.steps.len(), 1, "pool_return, not terminate: {run:?}");
    let detail = run.steps[0].detail.clone().unwrap_or_default();
    assert!(
        detail.contains("2 task(s) were running, none is now"),
        "{detail}"
    );
    assert_eq!(
        running(&ecs, "ecs-wp", &arns[&leaving]).await,
        ("DRAINING".to_string(), 0)
    );
    assert_eq!(
        running(&ecs, "ecs-wp", &arns[&staying]).await,
        ("ACTIVE".to_string(), 4)
    );
    assert_eq!(aws.tags(&leaving).await.get("Gone"), None);
    eventually(
        "the drained instance back in the pool, stopped",
        Duration::from_secs(10),
        || async { (aws.instance_state(&leaving).await == "stopped").then_some(()) },
    )
    .await;
}

/// A Spot interruption warning for an ECS container instance, then the terminate hook: the
/// layer's `interrupt` drain starts at once, and the terminate steps (a drain that cannot
/// finish: the cluster has no other instance) are cut at the deadline, the history saying
/// why; `{deadline}` is the deadline. EC2 terminates the instance at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_interruption_drains_at_once_and_cuts_the_terminate_steps_at_its_deadline() {
    use serde_json::json;
    let emu = Emulator::start();
    let (aws, q, ecs, members) = cluster_group(&emu, "ecs-spot", 1, 300).await;
    let (id, arn) = &members[0];
    service_tasks(&ecs, "ecs-spot", arn, 2).await;
    // EC2's warnings reach the queue through an EventBridge rule, as the README shows.
    let pattern = json!({"source": ["aws.ec2"], "detail-type": [
        "EC2 Spot Instance Interruption Warning", "EC2 Instance Rebalance Recommendation"]});
    emu.aws_json(
        "events",
        "AWSEvents.PutRule",
        json!({"Name": "ec2-warnings", "EventPattern": pattern.to_string()}),
    );
    emu.aws_json(
        "events",
        "AWSEvents.PutTargets",
        json!({"Rule": "ec2-warnings", "Targets": [{"Id": "q", "Arn": q.arn}]}),
    );
    let (topic, results) = aws.topic_with_queue("results").await;
    let layer = r#"
[layers.ecs]
groups = ["ecs-*"]
interrupt = [ { ecs_drain = { cluster = "{metadata.cluster}", poll = "1s" }, timeout = "10m" } ]
terminate = [
  { tag = { GoneBy = "{deadline}" } },
  { ecs_drain = { cluster = "{metadata.cluster}", poll = "1s" }, timeout = "20m" },
]
"#;
    let p = Provision::new(&emu, &q, Some(&topic), layer);
    let d = p.daemon();
    // A rebalance recommendation first: recorded and published, nothing runs.
    emu.control(
        "POST",
        "/_emulator/spot",
        Some(json!({"instance_id": id, "kind": "rebalance"})),
    );
    eventually(
        "the recommendation recorded",
        Duration::from_secs(15),
        || async {
            p.history()
                .iter()
                .any(|r| {
                    r.outcome.as_str() == "skipped"
                        && r.error
                            .as_deref()
                            .unwrap_or("")
                            .starts_with("rebalance-recommendation recorded and published")
                })
                .then_some(())
        },
    )
    .await;
    assert_eq!(running(&ecs, "ecs-spot", arn).await.0, "ACTIVE");
    // The warning reaches the queue 8 s before the instance goes (dated 112 s ago).
    let sent = emu.control(
        "POST",
        "/_emulator/spot",
        Some(json!({"instance_id": id, "notice_seconds": 8})),
    );
    let deadline_ms = (sent["deadline"].as_f64().expect("a deadline") * 1000.0) as i64;
    let runs_over = || {
        let runs: Vec<_> = p
            .history()
            .into_iter()
            .filter(|r| r.transition.as_deref() == Some("terminate"))
            .collect();
        (runs.len() == 2 && runs.iter().all(|r| r.finished_at.is_some())).then_some(runs)
    };
    let runs = eventually(
        "the interrupt and terminate runs to end",
        Duration::from_secs(30),
        || async { runs_over() },
    )
    .await;
    eventually(
        "EC2 to terminate the instance at the deadline",
        Duration::from_secs(10),
        || async { (aws.instance_state(id).await == "terminated").then_some(()) },
    )
    .await;
    let log = {
        let mut d = d;
        d.signal("TERM");
        assert_eq!(d.wait(Duration::from_secs(30)), 0, "{}", d.log());
        d.log()
    };

    let interrupt = runs
        .iter()
        .find(|r| r.steps.len() == 1)
        .expect("the interrupt run");
    let terminate = runs
        .iter()
        .find(|r| r.steps.len() == 2)
        .expect("the terminate run");
    // At once: the interrupt drain started well before the deadline, and was cut at it.
    let drain = &interrupt.steps[0];
    assert_eq!(drain.kind, "ecs_drain", "{interrupt:?}");
    assert!(
        drain.started_at < deadline_ms - 4000,
        "{interrupt:?}\n{log}"
    );
    assert!(
        drain.finished_at.unwrap() <= deadline_ms + 1500,
        "{interrupt:?}"
    );
    // The terminate steps: the tag carries the deadline, the drain is cut at it, the
    // history says so.
    assert_eq!(terminate.steps[0].outcome, "succeeded", "{terminate:?}");
    let last = &terminate.steps[1];
    assert_eq!(last.outcome, "failed", "{terminate:?}");
    assert!(
        last.finished_at.unwrap() <= deadline_ms + 1500,
        "{terminate:?}"
    );
    let error = terminate.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("cut to the Spot interruption deadline"),
        "{terminate:?}"
    );
    let events = aws.results(&results).await;
    assert!(
        events.iter().any(|e| e["type"] == "provision.interruption"
            && e["kind"] == "rebalance-recommendation"
            && e["deadline"].is_null()),
        "{events:?}"
    );
    let warning = events
        .iter()
        .find(|e| e["type"] == "provision.interruption" && e["kind"] == "spot-interruption")
        .unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(warning["instance_id"], id.as_str());
    let deadline = warning["deadline"].as_str().unwrap().to_string();
    assert!(error.contains(&deadline), "{error} / {deadline}");
    assert_eq!(
        aws.tags(id).await.get("GoneBy"),
        Some(&deadline),
        "{{deadline}} in a template"
    );
}

/// A Spot warning for an instance no layer manages is recorded as unmatched, like any
/// unmatched event, and runs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_warning_for_an_instance_no_layer_manages_is_unmatched() {
    use serde_json::json;
    let emu = Emulator::start();
    let aws = Aws::new(&emu).await;
    let q = aws.queue("lifecycle").await;
    aws.group("batch-spot").await;
    aws.scale("batch-spot", 1).await;
    let id = aws.instances("batch-spot").await.remove(0).0;
    let pattern = json!({"source": ["aws.ec2"]});
    emu.aws_json(
        "events",
        "AWSEvents.PutRule",
        json!({"Name": "ec2-warnings", "EventPattern": pattern.to_string()}),
    );
    emu.aws_json(
        "events",
        "AWSEvents.PutTargets",
        json!({"Rule": "ec2-warnings", "Targets": [{"Id": "q", "Arn": q.arn}]}),
    );
    emu.control(
        "POST",
        "/_emulator/spot",
        Some(json!({"instance_id": id, "notice_seconds": 30})),
    );
    let p = Provision::new(&emu, &q, None, &layer("2m"));
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let runs = p.history();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].outcome.as_str(), "unmatched", "{runs:?}");
    assert!(
        runs[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("spot-interruption"),
        "{runs:?}"
    );
    assert!(!emu.calls().contains_key("ecs:ListContainerInstances"));
}
