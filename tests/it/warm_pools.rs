//! Warm pools against the emulator: instances entering the pool, leaving it on scale-out,
//! returning to it on scale-in, and terminated from it while stopped; the manual command
//! and `check --aws` on a pool. Real SDK, real `provision` binary, the emulator's warm pool
//! (tests/emulator/emulator.py, "warm pools").

use crate::common;

use std::time::Duration;

use common::{eventually, Aws, Provision, World};

const METADATA: &str = r#"{"environment":"production"}"#;

/// Each phase tags what it saw. The terminate steps need a running instance: an ssm step
/// (whose SSM agent wait is 10 minutes) and an ssh step, so a stopped instance shows
/// whether they fail at once.
const POOL_LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
launch = [ { tag = { Setup = "full" } } ]
pool_enter = [ { tag = { Setup = "{origin}->{destination}", Phase = "{phase}" } } ]
pool_leave = [ { tag = { Resumed = "{origin}->{destination}" } } ]
pool_return = [ { tag = { Returned = "{phase}" } } ]
terminate = [
  { ssm = { document = "AWS-RunShellScript", parameters = { commands = ["true"] } } },
  { ssh = ["true"] },
]
"#;

/// A group with launch and terminate hooks notifying the queue, and a warm pool of one.
async fn pool_group(group: &str, reuse_on_scale_in: bool) -> World {
    let w = World::builder(group)
        .metadata(METADATA)
        .terminate_hook("CONTINUE")
        .start()
        .await;
    let aws = &w.aws;
    use aws_sdk_autoscaling::types::InstanceReusePolicy;
    aws.asg
        .put_warm_pool()
        .auto_scaling_group_name(group)
        .min_size(1)
        .max_group_prepared_capacity(1)
        .instance_reuse_policy(
            InstanceReusePolicy::builder()
                .reuse_on_scale_in(reuse_on_scale_in)
                .build(),
        )
        .send()
        .await
        .unwrap();
    w
}

/// (instance id, lifecycle state) of every instance in the group's warm pool.
async fn pool(aws: &Aws, group: &str) -> Vec<(String, String)> {
    let r = aws
        .asg
        .describe_warm_pool()
        .auto_scaling_group_name(group)
        .send()
        .await
        .unwrap();
    r.instances()
        .iter()
        .map(|i| common::id_and_state(i.instance_id(), i.lifecycle_state()))
        .collect()
}

/// The one instance in the pool, in `state`.
async fn the_pool_instance(aws: &Aws, group: &str, state: &str) -> String {
    let p = pool(aws, group).await;
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].1, state, "{p:?}");
    p[0].0.clone()
}

fn worker(p: &Provision) {
    let (code, log) = p.worker();
    assert_eq!(code, 0, "worker failed:\n{log}");
}

/// A known_hosts file as provision keeps it (keyed by instance id).
fn known_hosts(p: &Provision, id: &str) -> std::path::PathBuf {
    let dir = p.dir.join("known_hosts.d");
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join(id);
    std::fs::write(
        &f,
        format!("{id} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGj0vNj1c0yJb2m4Ee0hOPHVdqvRyYR3Y0nCk0QpX9aM\n"),
    )
    .unwrap();
    f
}

fn tag(tags: &std::collections::BTreeMap<String, String>, k: &str) -> Option<String> {
    tags.get(k).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_instance_is_prepared_on_entering_and_resumed_on_leaving() {
    let World { emu, aws, q, .. } = pool_group("web-wp", false).await;
    let warm = the_pool_instance(&aws, "web-wp", "Warmed:Pending:Wait").await;
    assert!(
        aws.instances("web-wp").await.is_empty(),
        "pool instances are not group members"
    );

    let p = Provision::new(&emu, &q, None, POOL_LAYER);
    worker(&p);
    let tags = aws.tags(&warm).await;
    assert_eq!(tag(&tags, "Setup").as_deref(), Some("EC2->WarmPool"));
    assert_eq!(tag(&tags, "Phase").as_deref(), Some("pool-enter"));
    assert_eq!(
        the_pool_instance(&aws, "web-wp", "Warmed:Stopped").await,
        warm
    );
    assert_eq!(aws.instance_state(&warm).await, "stopped");

    // Scale-out: the pool instance leaves for the group, a new one enters the pool.
    aws.scale("web-wp", 1).await;
    assert_eq!(
        aws.instances("web-wp").await,
        vec![(warm.clone(), "Pending:Wait".to_string())]
    );
    let refill = the_pool_instance(&aws, "web-wp", "Warmed:Pending:Wait").await;
    worker(&p);
    assert_eq!(
        aws.instances("web-wp").await,
        vec![(warm.clone(), "InService".to_string())]
    );
    let tags = aws.tags(&warm).await;
    assert_eq!(
        tag(&tags, "Resumed").as_deref(),
        Some("WarmPool->AutoScalingGroup")
    );
    assert_eq!(
        tag(&tags, "Setup").as_deref(),
        Some("EC2->WarmPool"),
        "the full launch steps did not run again"
    );
    assert_eq!(
        tag(&aws.tags(&refill).await, "Setup").as_deref(),
        Some("EC2->WarmPool")
    );
    the_pool_instance(&aws, "web-wp", "Warmed:Stopped").await;

    let runs = p.history();
    let worked: Vec<_> = runs.iter().filter(|r| r.instance_id.is_some()).collect();
    assert_eq!(worked.len(), 3, "{runs:?}");
    for r in worked {
        assert_eq!(
            (r.outcome.as_str(), r.hook_result.map(|c| c.as_str())),
            ("succeeded", Some("CONTINUE")),
            "verified as genuine and worked: {r:?}"
        );
        assert_eq!(r.steps.len(), 1, "{r:?}");
    }
    // Pool instances are confirmed from the pool's member list, not one by one.
    let calls = emu.provision_calls();
    assert!(
        calls.contains_key("autoscaling:DescribeWarmPool")
            && !calls.contains_key("autoscaling:DescribeAutoScalingInstances"),
        "{calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_in_returns_an_instance_to_the_pool_with_its_host_keys() {
    let World { emu, aws, q, .. } = pool_group("web-back", true).await;
    let p = Provision::new(&emu, &q, None, POOL_LAYER);
    worker(&p);
    aws.scale("web-back", 1).await;
    worker(&p);
    let id = aws.instances("web-back").await.remove(0).0;
    let keys = known_hosts(&p, &id);

    aws.scale("web-back", 0).await;
    assert!(aws.instances("web-back").await.is_empty());
    assert!(
        pool(&aws, "web-back")
            .await
            .contains(&(id.clone(), "Warmed:Pending:Wait".to_string())),
        "{:?}",
        pool(&aws, "web-back").await
    );
    worker(&p);

    let run = p.last_run(&id, "terminate");
    assert_eq!(run.outcome.as_str(), "succeeded", "{run:?}");
    assert_eq!(run.hook_result.map(|c| c.as_str()), Some("CONTINUE"));
    assert_eq!(
        run.steps.len(),
        1,
        "pool_return ran, not the terminate steps: {run:?}"
    );
    assert_eq!(
        tag(&aws.tags(&id).await, "Returned").as_deref(),
        Some("pool-return")
    );
    assert!(
        pool(&aws, "web-back")
            .await
            .contains(&(id.clone(), "Warmed:Stopped".to_string())),
        "{:?}",
        pool(&aws, "web-back").await
    );
    assert!(keys.exists(), "the instance comes back: its host keys stay");

    // The same instance leaving for good (terminated from the pool) loses that file: what
    // stayed above is the file provision forgets, not one it never looks at.
    aws.asg
        .terminate_instance_in_auto_scaling_group()
        .instance_id(&id)
        .should_decrement_desired_capacity(false)
        .send()
        .await
        .unwrap();
    worker(&p);
    assert_eq!(
        p.last_run(&id, "terminate").hook_result.map(|c| c.as_str()),
        Some("ABANDON")
    );
    assert!(!keys.exists(), "a terminated instance's host keys go");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_a_stopped_pool_instance_fails_fast_with_the_reason() {
    let World { emu, aws, q, .. } = pool_group("web-gone", false).await;
    let p = Provision::new(&emu, &q, None, POOL_LAYER);
    worker(&p);
    let id = the_pool_instance(&aws, "web-gone", "Warmed:Stopped").await;
    let keys = known_hosts(&p, &id);
    aws.asg
        .terminate_instance_in_auto_scaling_group()
        .instance_id(&id)
        .should_decrement_desired_capacity(false)
        .send()
        .await
        .unwrap();
    assert!(pool(&aws, "web-gone")
        .await
        .contains(&(id.clone(), "Warmed:Terminating:Wait".to_string())));

    // The ssm step would wait 10 minutes for an agent; the worker is bounded at 2.
    worker(&p);
    let run = p.last_run(&id, "terminate");
    assert_eq!(run.outcome.as_str(), "failed", "{run:?}");
    assert_eq!(run.hook_result.map(|c| c.as_str()), Some("ABANDON"));
    let error = run.error.clone().unwrap_or_default();
    assert!(
        error.contains(&format!("{id} is stopped"))
            && error.contains("warm pool")
            && error.contains("needs a running instance"),
        "{error}"
    );
    assert_eq!(run.steps.len(), 1, "the first failure stops the list");
    eventually(
        "the instance to be terminated",
        Duration::from_secs(10),
        || async { (aws.instance_state(&id).await == "terminated").then_some(()) },
    )
    .await;
    assert!(!keys.exists(), "a terminated instance's host keys go");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manual_command_and_check_know_the_warm_pool() {
    let World { emu, aws, q, .. } = pool_group("web-man", true).await;
    let warm = the_pool_instance(&aws, "web-man", "Warmed:Pending:Wait").await;
    let p = Provision::new(&emu, &q, None, POOL_LAYER);

    let out = p.output(&["check", "--aws"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("group web-man (layer web): warm pool, 1 instance(s) kept stopped")
            && text.contains("scale-in returns instances to it")
            && text.contains("entering it runs 1 step(s) (pool_enter)"),
        "{text}"
    );

    let out = p.output(&[&warm, "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Warmed:Pending:Wait")
            && text.contains("transition launch (pool-enter)")
            && text.contains("Setup=\"EC2->WarmPool\"")
            && text.contains("complete hook provision-launch by instance id"),
        "{text}"
    );

    let out = p.output(&[&warm]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("result     succeeded (CONTINUE)"), "{text}");
    assert_eq!(
        the_pool_instance(&aws, "web-man", "Warmed:Stopped").await,
        warm
    );
    assert_eq!(
        tag(&aws.tags(&warm).await, "Phase").as_deref(),
        Some("pool-enter")
    );
}

/// A warm pool filling at once: every instance is confirmed from the pool's member list,
/// a call or two for the whole burst (never one DescribeAutoScalingInstances per instance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_filling_at_once_is_verified_with_a_call_or_two() {
    const N: i32 = 12;
    let World { emu, aws, q, .. } = World::builder("web-burst").metadata(METADATA).start().await;
    aws.asg
        .put_warm_pool()
        .auto_scaling_group_name("web-burst")
        .min_size(N)
        .max_group_prepared_capacity(N)
        .send()
        .await
        .unwrap();
    assert_eq!(pool(&aws, "web-burst").await.len(), N as usize);
    let p = Provision::new(&emu, &q, None, POOL_LAYER);
    worker(&p);
    let p_states = pool(&aws, "web-burst").await;
    assert!(
        p_states.iter().all(|(_, s)| s == "Warmed:Stopped"),
        "{p_states:?}"
    );
    let calls = emu.provision_calls();
    let n = |k: &str| calls.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    println!(
        "figure: {N} pool entries verified with {} DescribeWarmPool call(s)",
        n("autoscaling:DescribeWarmPool")
    );
    assert!(
        (1..=(N as u64) / 2).contains(&n("autoscaling:DescribeWarmPool")),
        "{calls:?}"
    );
    assert_eq!(
        n("autoscaling:DescribeAutoScalingInstances"),
        0,
        "{calls:?}"
    );
}

/// An instance entering the pool whose message was lost waits in `Warmed:Pending:Wait`
/// (DescribeWarmPool lists it, not the group): `provision reconcile` finds it through the
/// group's warm pool and runs what entering the pool runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_works_a_pool_instance_whose_message_was_lost() {
    let World { emu, aws, q, .. } = pool_group("web-wpr", false).await;
    let warm = the_pool_instance(&aws, "web-wpr", "Warmed:Pending:Wait").await;
    let lost = aws.drain(&q).await;
    assert!(
        lost.iter().any(|b| b.contains("EC2_INSTANCE_LAUNCHING")),
        "{lost:?}"
    );
    let p = Provision::new(&emu, &q, None, POOL_LAYER);
    let out = p.output(&["reconcile"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("waiting") && l.contains(&warm))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(row.contains("Warmed:Pending:Wait"), "{text}");
    let tags = aws.tags(&warm).await;
    assert_eq!(tag(&tags, "Setup").as_deref(), Some("EC2->WarmPool"));
    assert_eq!(tag(&tags, "Phase").as_deref(), Some("pool-enter"));
    assert_eq!(
        the_pool_instance(&aws, "web-wpr", "Warmed:Stopped").await,
        warm
    );
}

/// A layer that names only `launch` and `terminate`: entering the pool runs the launch
/// steps (`pool_enter`'s default), leaving it and returning to it run nothing (their
/// defaults, `[]`), and a return is not a termination.
const DEFAULTS_LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
launch = [ { tag = { Setup = "launch steps in {phase}" } } ]
terminate = [ { tag = { Decommissioned = "{phase}" } } ]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_enter_defaults_to_the_launch_steps() {
    let World { emu, aws, q, .. } = pool_group("web-dflt", true).await;
    let warm = the_pool_instance(&aws, "web-dflt", "Warmed:Pending:Wait").await;
    let p = Provision::new(&emu, &q, None, DEFAULTS_LAYER);
    worker(&p);
    assert_eq!(
        tag(&aws.tags(&warm).await, "Setup").as_deref(),
        Some("launch steps in pool-enter")
    );
    let run = p.last_run(&warm, "launch");
    assert_eq!(run.steps.len(), 1, "{run:?}");
    assert_eq!(run.hook_result.map(|c| c.as_str()), Some("CONTINUE"));
    the_pool_instance(&aws, "web-dflt", "Warmed:Stopped").await;

    // Leaving the pool runs nothing by default (the instance was set up on entering).
    aws.tag(&warm, &[("Setup", "kept")]).await;
    aws.scale("web-dflt", 1).await;
    worker(&p);
    assert_eq!(
        aws.instances("web-dflt").await,
        vec![(warm.clone(), "InService".to_string())]
    );
    let run = p.last_run(&warm, "launch");
    assert_eq!(run.steps.len(), 0, "pool_leave defaults to none: {run:?}");
    assert_eq!(run.hook_result.map(|c| c.as_str()), Some("CONTINUE"));
    assert_eq!(
        tag(&aws.tags(&warm).await, "Setup").as_deref(),
        Some("kept"),
        "the launch steps did not run again on leaving"
    );
    // The refill entering the pool got the launch steps too.
    let refill = the_pool_instance(&aws, "web-dflt", "Warmed:Stopped").await;
    assert_eq!(
        tag(&aws.tags(&refill).await, "Setup").as_deref(),
        Some("launch steps in pool-enter")
    );

    // Returning to the pool runs nothing by default: not the terminate steps.
    aws.scale("web-dflt", 0).await;
    worker(&p);
    let run = p.last_run(&warm, "terminate");
    assert_eq!(run.steps.len(), 0, "pool_return defaults to none: {run:?}");
    assert_eq!(run.hook_result.map(|c| c.as_str()), Some("CONTINUE"));
    assert_eq!(tag(&aws.tags(&warm).await, "Decommissioned"), None);
    assert!(
        pool(&aws, "web-dflt")
            .await
            .contains(&(warm.clone(), "Warmed:Stopped".to_string())),
        "{:?}",
        pool(&aws, "web-dflt").await
    );
}

/// A stopped pool instance terminated from the pool, with a terminate list of one step
/// that needs it running, whose readiness waits are far longer than the worker's bound
/// (2 minutes): the step fails at once, before connecting, saying why.
async fn a_stopped_instance_fails(group: &str, kind: &str, step: &str) {
    let World { emu, aws, q, .. } = pool_group(group, false).await;
    let books = common::root().join("tests/playbooks");
    let layer = format!(
        "[layers.web]\ngroups = [\"web-*\"]\nlaunch = [ {{ tag = {{ Setup = \"full\" }} }} ]\n\
         terminate = [ {step} ]\n\
         [ssh]\nconnect_timeout = \"5m\"\nready_timeout = \"10m\"\n\
         [ansible]\nplaybook_dir = {:?}\n",
        common::path_str(&books)
    );
    let p = Provision::new(&emu, &q, None, &layer);
    worker(&p);
    let id = the_pool_instance(&aws, group, "Warmed:Stopped").await;
    aws.asg
        .terminate_instance_in_auto_scaling_group()
        .instance_id(&id)
        .should_decrement_desired_capacity(false)
        .send()
        .await
        .unwrap();

    let (code, log) = p.worker();
    assert_eq!(code, 0, "the worker ended within its bound:\n{log}");
    let run = p.last_run(&id, "terminate");
    assert_eq!(run.outcome.as_str(), "failed", "{run:?}");
    assert_eq!(run.hook_result.map(|c| c.as_str()), Some("ABANDON"));
    let error = run.error.clone().unwrap_or_default();
    assert!(
        error.contains(&format!("{id} is stopped"))
            && error.contains("warm pool")
            && error.contains(&format!("a {kind} step needs a running instance")),
        "{error}"
    );
    assert!(
        !log.contains("running ansible-playbook"),
        "nothing was started:\n{log}"
    );
    let calls = emu.provision_calls();
    assert!(
        !calls.contains_key("ec2:GetConsoleOutput"),
        "no host key was looked up: {calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_step_on_a_stopped_instance_fails_at_once() {
    a_stopped_instance_fails("web-dssh", "ssh", r#"{ ssh = ["true"] }"#).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ansible_step_on_a_stopped_instance_fails_at_once() {
    a_stopped_instance_fails("web-dans", "ansible", r#"{ ansible = "marker.yml" }"#).await;
}
