//! The `ssm` and `opsworks` steps against the emulator's SSM agent simulation and OpsWorks
//! Stacks API (tests/emulator/ssm_agent.py, opsworks.py), through the real binary.

use crate::common;

use std::time::Duration;

use common::{eventually, Aws, Emulator, Provision, World, LAUNCH, TERMINATE};
use serde_json::{json, Value};

const METADATA: &str = r#"{"environment":"production","platform":"web","major":"3","role":"api"}"#;

fn ssm_layer(commands: &str, extra: &str) -> String {
    format!(
        r#"
[ssm]
batch_window = "3s"

[layers.app]
groups = ["app-*"]
vars = {{ role = "[a-z]{{1,16}}" }}
launch = [ {{ ssm = {{ document = "AWS-RunShellScript", parameters = {{ commands = {commands} }}{extra} }} }} ]
"#
    )
}

fn count(p: &Provision, outcome: &str) -> usize {
    p.history()
        .iter()
        .filter(|r| r.outcome.as_str() == outcome)
        .count()
}

async fn setup(group: &str, n: i32, heartbeat: i32) -> World {
    World::builder(group)
        .heartbeat(heartbeat)
        .metadata(METADATA)
        .instances(n)
        .start()
        .await
}

fn ssm_state(emu: &Emulator) -> Value {
    emu.control("GET", "/_emulator/ssm", None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_twelve_shares_one_send_command() {
    let World { emu, aws, q, .. } = setup("app-burst", 12, 300).await;
    let p = Provision::new(
        &emu,
        &q,
        None,
        &ssm_layer(r#"["echo {metadata.role} > marker", "cat marker"]"#, ""),
    );
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");

    let state = ssm_state(&emu);
    let commands = state["commands"].as_array().unwrap();
    assert_eq!(
        commands.len(),
        1,
        "one SendCommand for the burst: {commands:?}"
    );
    assert_eq!(commands[0]["instance_ids"].as_array().unwrap().len(), 12);
    assert_eq!(
        commands[0]["parameters"]["commands"][0], "echo api > marker",
        "metadata reached the command validated"
    );
    let sandbox = state["sandbox"].as_str().unwrap();
    let instances = aws.instances("app-burst").await;
    assert_eq!(instances.len(), 12);
    for (id, lifecycle) in &instances {
        assert_eq!(lifecycle, "InService");
        let marker = std::fs::read_to_string(format!("{sandbox}/{id}/marker")).unwrap();
        assert_eq!(marker.trim(), "api", "{id}");
    }
    assert_eq!(count(&p, "succeeded"), 12);
    let run = p
        .history()
        .into_iter()
        .find(|r| r.outcome.as_str() == "succeeded")
        .unwrap();
    assert!(
        run.steps[0].detail.as_deref().unwrap().contains("Success"),
        "{:?}",
        run.steps[0]
    );
    // Per-instance results come from ListCommandInvocations, never one call per instance.
    let calls = emu.calls();
    assert!(!calls.contains_key("ssm:GetCommandInvocation"), "{calls:?}");
    assert_eq!(calls["ssm:SendCommand"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_command_abandons_only_that_instance() {
    let World { emu, aws, q, .. } = setup("app-fail", 3, 300).await;
    let instances = aws.instances("app-fail").await;
    let sandbox = ssm_state(&emu)["sandbox"].as_str().map(str::to_string);
    // The sandbox may only be created on first use: make the failing instance's directory.
    let sandbox = sandbox.unwrap_or_else(|| emu.dir.path().join("ssm").display().to_string());
    let doomed = &instances[1].0;
    std::fs::create_dir_all(format!("{sandbox}/{doomed}")).unwrap();
    std::fs::write(format!("{sandbox}/{doomed}/fail"), "").unwrap();
    // The neighbours' agents pick the command up later than the doomed one fails: with
    // Run Command's default MaxErrors (0) they would never be sent it.
    for (id, _) in instances.iter().filter(|(id, _)| id != doomed) {
        emu.control(
            "POST",
            &format!("/_emulator/ssm/instances/{id}"),
            Some(json!({"pickup_seconds": 3})),
        );
    }
    let p = Provision::new(
        &emu,
        &q,
        None,
        &ssm_layer(
            r#"["if [ -f fail ]; then echo broken >&2; exit 3; fi", "echo ok"]"#,
            "",
        ),
    );
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");

    // One shared SendCommand (the abandoned instance's replacement may get one of its own),
    // the failure before the neighbours were sent it.
    let state = ssm_state(&emu);
    let shared: Vec<&Value> = state["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["invocations"].get(doomed.as_str()).is_some())
        .collect();
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert_eq!(shared[0]["instance_ids"].as_array().unwrap().len(), 3);
    let invs = &shared[0]["invocations"];
    let failed_at = invs[doomed.as_str()]["end"].as_f64().unwrap();
    for (id, _) in instances.iter().filter(|(id, _)| id != doomed) {
        let inv = &invs[id.as_str()];
        assert_eq!(inv["status_details"], "Success", "{id}: {inv}");
        assert!(inv["start"].as_f64().unwrap() > failed_at, "{invs}");
    }

    let actions = emu.finished_actions();
    let result_of = |id: &str| {
        actions
            .iter()
            .find(|a| a["instance_id"] == id)
            .map(|a| a["result"].clone())
    };
    assert_eq!(result_of(doomed), Some(json!("ABANDON")));
    for (id, _) in instances.iter().filter(|(id, _)| id != doomed) {
        assert_eq!(result_of(id), Some(json!("CONTINUE")), "{id}");
    }
    let failed: Vec<_> = p
        .history()
        .into_iter()
        .filter(|r| r.outcome.as_str() == "failed")
        .collect();
    assert_eq!(failed.len(), 1);
    let err = failed[0].error.as_deref().unwrap();
    assert!(
        err.contains("Failed") && err.contains("exit 3") && err.contains("broken"),
        "{err}"
    );
}

/// The emulator's Run Command honours MaxErrors as AWS documents it: a command sent with
/// the default (0) stops being sent once one target failed, so a neighbour whose agent
/// had not picked it up yet never runs it (Cancelled, StatusDetails Terminated), and the
/// command fails. What provision's `MaxErrors = "100%"` (above) avoids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulator_stops_sending_a_command_past_its_max_errors() {
    let World { emu, aws, .. } = setup("app-maxerr", 2, 300).await;
    let ids: Vec<String> = aws
        .instances("app-maxerr")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    emu.control(
        "POST",
        &format!("/_emulator/ssm/instances/{}", ids[1]),
        Some(json!({"pickup_seconds": 2, "env": {"LATE": "1"}})),
    );
    let ssm = aws_sdk_ssm::Client::new(&aws.sdk);
    let sent = ssm
        .send_command()
        .document_name("AWS-RunShellScript")
        .set_instance_ids(Some(ids.clone()))
        .parameters(
            "commands",
            vec![r#"if [ -z "$LATE" ]; then exit 5; fi; echo ran > marker"#.to_string()],
        )
        .send()
        .await
        .unwrap();
    let command_id = sent.command().unwrap().command_id().unwrap().to_string();
    let state = eventually("the command to end", Duration::from_secs(30), || async {
        let s = ssm_state(&emu);
        let c = s["commands"][0].clone();
        (c["status"] != "Pending" && c["status"] != "InProgress").then_some(c)
    })
    .await;
    assert_eq!(state["command_id"], command_id.as_str());
    assert_eq!(
        (&state["status"], &state["status_details"]),
        (&json!("Failed"), &json!("Failed")),
        "{state}"
    );
    let late = &state["invocations"][ids[1].as_str()];
    assert_eq!(late["status"], "Cancelled", "{late}");
    assert_eq!(late["status_details"], "Terminated", "{late}");
    let listed = ssm
        .list_command_invocations()
        .command_id(&command_id)
        .send()
        .await
        .unwrap();
    let terminated = listed
        .command_invocations()
        .iter()
        .find(|i| i.instance_id() == Some(ids[1].as_str()))
        .unwrap();
    assert_eq!(terminated.status_details(), Some("Terminated"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_never_comes_online_fails_after_the_deadline() {
    // A 6 s heartbeat timeout (beats every 2 s) and a 10 s wait for the agent: the hook
    // lives only if it is heartbeated while the step waits.
    let World { emu, aws, q, .. } = setup("app-offline", 0, 6).await;
    // Nobody is online until told; the first instance never will be.
    emu.control(
        "POST",
        "/_emulator/ssm",
        Some(json!({"online_delay_seconds": 0})),
    );
    aws.scale("app-offline", 1).await;
    let id = aws.instances("app-offline").await.remove(0).0;
    emu.control(
        "POST",
        "/_emulator/ssm",
        Some(json!({"never_online": [id]})),
    );
    let p = Provision::new(
        &emu,
        &q,
        None,
        &ssm_layer(r#"["true"]"#, r#", online_timeout = "10s""#),
    );
    let mut daemon = p.daemon();
    let run = eventually(
        "the offline instance's run to fail",
        Duration::from_secs(60),
        || async {
            p.history().into_iter().find(|r| {
                r.instance_id.as_deref() == Some(id.as_str()) && r.outcome.as_str() == "failed"
            })
        },
    )
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(30)), 0);
    assert!(
        run.error
            .as_deref()
            .unwrap()
            .contains("did not come Online"),
        "{:?}",
        run.error
    );
    assert!(
        run.heartbeats >= 2,
        "heartbeats while waiting: {}",
        run.heartbeats
    );
    let action = emu
        .finished_actions()
        .into_iter()
        .find(|a| a["instance_id"] == id.as_str())
        .unwrap();
    assert_eq!(
        action["finished_by"], "complete",
        "completed by us, not by the hook's timeout: {action}"
    );
    assert_eq!(action["result"], "ABANDON");
    assert!(action["heartbeats"].as_u64().unwrap() >= 2);
    let commands = ssm_state(&emu)["commands"].as_array().unwrap().clone();
    assert!(
        commands
            .iter()
            .all(|c| !c["instance_ids"].as_array().unwrap().contains(&json!(id))),
        "nothing was sent to it: {commands:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_past_its_timeout_is_cancelled() {
    let World {
        emu, aws: _aws, q, ..
    } = setup("app-slow", 1, 300).await;
    let p = Provision::new(
        &emu,
        &q,
        None,
        &ssm_layer(r#"["sleep 60"]"#, r#", timeout = "3s""#),
    );
    // Every replacement would time out the same way: watch the first one, then stop.
    let mut daemon = p.daemon();
    eventually("the first run to fail", Duration::from_secs(60), || async {
        (count(&p, "failed") >= 1).then_some(())
    })
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(60)), 0, "{}", daemon.log());
    let state = ssm_state(&emu);
    let command_id = state["commands"][0]["command_id"].as_str().unwrap();
    let cancels = state["cancels"].as_array().unwrap();
    assert!(!cancels.is_empty(), "{state}");
    assert_eq!(cancels[0]["command_id"], command_id);
    let run = p
        .history()
        .into_iter()
        .find(|r| r.outcome.as_str() == "failed")
        .unwrap();
    assert!(
        run.error.as_deref().unwrap().contains("cancelled"),
        "{:?}",
        run.error
    );
    assert_eq!(run.hook_result.map(|c| c.as_str()), Some("ABANDON"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_or_unsafe_metadata_never_reaches_a_command() {
    let emu = Emulator::start();
    let aws = Aws::new(&emu).await;
    let q = aws.queue("lifecycle").await;
    aws.group("app-inject").await;
    let evil = r#"{"role":"$(id)","environment":"x","platform":"y","major":"1"}"#;
    aws.hook(
        "app-inject",
        "provision-launch",
        LAUNCH,
        Some(&q.arn),
        300,
        "ABANDON",
        Some(evil),
    )
    .await;
    aws.scale("app-inject", 1).await;
    let p = Provision::new(
        &emu,
        &q,
        None,
        &ssm_layer(r#"["echo {metadata.role} > marker"]"#, ""),
    );
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let run = p
        .history()
        .into_iter()
        .find(|r| r.outcome.as_str() == "failed")
        .expect("a failed run");
    assert!(
        run.error.as_deref().unwrap().contains("does not match"),
        "{:?}",
        run.error
    );
    assert!(
        ssm_state(&emu)["commands"].as_array().unwrap().is_empty(),
        "nothing was sent"
    );

    // A config that uses undeclared metadata in a command is refused at load time.
    let bad = Provision::new(
        &emu,
        &q,
        None,
        r#"
[layers.app]
groups = ["app-*"]
launch = [ { ssm = { document = "AWS-RunShellScript", parameters = { commands = ["echo {metadata.role}"] } } } ]
"#,
    );
    let (code, log) = bad.worker();
    assert_eq!(code, 2, "{log}");
    assert!(
        log.contains("layers.app.launch[0].ssm.parameters.commands[0]")
            && log.contains("not declared"),
        "{log}"
    );
}

fn opsworks_call(emu: &Emulator, op: &str, body: Value) -> Value {
    emu.aws_json("opsworks", &format!("OpsWorks_20130218.{op}"), body)
}

const OPSWORKS_LAYER: &str = r#"
[layers.legacy]
groups = ["legacy-*"]
launch = [ { opsworks = { stack = "v{metadata.major} {metadata.environment} {metadata.platform}", layer = "app", region = "us-east-1", online_timeout = "30s" } } ]
terminate = [ { opsworks = { stack = "v{metadata.major} {metadata.environment} {metadata.platform}", layer = "app", region = "us-east-1" } } ]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opsworks_register_assign_repeat_and_deregister() {
    let emu = Emulator::start();
    let aws = Aws::new(&emu).await;
    let source = aws.queue("hook-target").await;
    let q = aws.queue("lifecycle").await;
    emu.control(
        "POST",
        "/_emulator/opsworks",
        Some(json!({"register_delay_seconds": 0.5, "online_delay_seconds": 0.5})),
    );
    let stack = opsworks_call(
        &emu,
        "CreateStack",
        json!({"Name": "v3 production web", "Region": "us-east-1",
               "ServiceRoleArn": "arn:aws:iam::123456789012:role/opsworks", "DefaultInstanceProfileArn": "arn:aws:iam::123456789012:instance-profile/app"}),
    );
    let stack_id = stack["StackId"].as_str().unwrap().to_string();
    opsworks_call(
        &emu,
        "CreateStack",
        json!({"Name": "v3 staging web", "Region": "us-east-1",
        "ServiceRoleArn": "arn:aws:iam::123456789012:role/opsworks", "DefaultInstanceProfileArn": "arn:aws:iam::123456789012:instance-profile/app"}),
    );
    opsworks_call(
        &emu,
        "CreateLayer",
        json!({"StackId": stack_id, "Type": "custom", "Name": "App", "Shortname": "app"}),
    );
    aws.group("legacy-web").await;
    aws.hook(
        "legacy-web",
        "provision-launch",
        LAUNCH,
        Some(&source.arn),
        300,
        "ABANDON",
        Some(METADATA),
    )
    .await;
    aws.hook(
        "legacy-web",
        "provision-terminate",
        TERMINATE,
        Some(&source.arn),
        300,
        "CONTINUE",
        Some(METADATA),
    )
    .await;
    aws.scale("legacy-web", 2).await;
    let launches: Vec<String> = aws
        .drain(&source)
        .await
        .into_iter()
        .filter(|b| b.contains("EC2_INSTANCE_LAUNCHING"))
        .collect();
    assert_eq!(launches.len(), 2);
    for b in &launches {
        aws.send(&q, b).await;
    }

    let p = Provision::new(&emu, &q, None, OPSWORKS_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(count(&p, "succeeded"), 2, "{log}");
    let ow = emu.control("GET", "/_emulator/opsworks", None);
    let registered: Vec<&Value> = ow["instances"].as_array().unwrap().iter().collect();
    assert_eq!(registered.len(), 2, "{ow}");
    for inst in &registered {
        assert_eq!(inst["Status"], "online", "{inst}");
        assert_eq!(inst["StackId"], stack_id.as_str());
        let ec2 = inst["Ec2InstanceId"].as_str().unwrap();
        assert_eq!(ow["register_calls"][ec2], 1);
        let hostname = inst["Hostname"].as_str().unwrap();
        assert_eq!(
            aws.tags(ec2).await.get("Name"),
            Some(&format!("v3 production web - {hostname}"))
        );
    }
    for (id, state) in aws.instances("legacy-web").await {
        assert_eq!(state, "InService", "{id}");
    }

    // The same events again, on a host with no memory of them (a fresh state store): the
    // actions are over (the instances are InService), so the messages are stale and nothing
    // runs for them.
    for b in &launches {
        aws.send(&q, b).await;
    }
    let again = Provision::new(&emu, &q, None, OPSWORKS_LAYER);
    let (code, log) = again.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(count(&again, "rejected"), 2, "{log}");
    assert!(again.history().iter().all(|r| r
        .error
        .as_deref()
        .unwrap_or("")
        .starts_with("forged or stale: ")));
    // Run the layer again by hand on each instance: the step finds the registrations and
    // does not register twice.
    for inst in &registered {
        let ec2 = inst["Ec2InstanceId"].as_str().unwrap();
        let out = again.output(&[ec2]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ow = emu.control("GET", "/_emulator/opsworks", None);
    for (ec2, n) in ow["register_calls"].as_object().unwrap() {
        assert_eq!(n, 1, "{ec2} registered twice");
    }

    // Terminate: deregistered.
    let victim = registered[0]["Ec2InstanceId"].as_str().unwrap().to_string();
    aws.asg
        .terminate_instance_in_auto_scaling_group()
        .instance_id(&victim)
        .should_decrement_desired_capacity(true)
        .send()
        .await
        .unwrap();
    for b in aws
        .drain(&source)
        .await
        .into_iter()
        .filter(|b| b.contains("EC2_INSTANCE_TERMINATING"))
    {
        aws.send(&q, &b).await;
    }
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let ow = emu.control("GET", "/_emulator/opsworks", None);
    let left: Vec<&str> = ow["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["Ec2InstanceId"].as_str())
        .collect();
    assert_eq!(left.len(), 1, "{ow}");
    assert!(!left.contains(&victim.as_str()));
    let term = p
        .history()
        .into_iter()
        .find(|r| r.transition.as_deref() == Some("terminate"))
        .unwrap();
    assert_eq!(term.outcome.as_str(), "succeeded");
    assert!(
        term.steps[0]
            .detail
            .as_deref()
            .unwrap()
            .starts_with("deregistered"),
        "{:?}",
        term.steps[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opsworks_stack_not_found_fails_with_its_name() {
    let World {
        emu, aws: _aws, q, ..
    } = setup("legacy-none", 1, 300).await;
    let p = Provision::new(&emu, &q, None, OPSWORKS_LAYER);
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    let run = p
        .history()
        .into_iter()
        .find(|r| r.outcome.as_str() == "failed")
        .unwrap();
    assert!(
        run.error
            .as_deref()
            .unwrap()
            .contains("no OpsWorks stack named \"v3 production web\""),
        "{:?}",
        run.error
    );
}

/// `stack_id` finds the stack with DescribeStacks' StackIds, never listing every stack
/// (what AWS refuses to a policy scoped to stack ARNs); an unknown id fails the step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opsworks_finds_a_stack_by_id_without_listing_every_stack() {
    let emu = Emulator::start();
    let aws = Aws::new(&emu).await;
    let source = aws.queue("hook-target").await;
    let q = aws.queue("lifecycle").await;
    emu.control(
        "POST",
        "/_emulator/opsworks",
        Some(json!({"register_delay_seconds": 0.2, "online_delay_seconds": 0.2})),
    );
    let stack = opsworks_call(
        &emu,
        "CreateStack",
        json!({"Name": "v3 production web", "Region": "us-east-1",
               "ServiceRoleArn": "arn:aws:iam::123456789012:role/opsworks", "DefaultInstanceProfileArn": "arn:aws:iam::123456789012:instance-profile/app"}),
    );
    let stack_id = stack["StackId"].as_str().unwrap().to_string();
    opsworks_call(
        &emu,
        "CreateLayer",
        json!({"StackId": stack_id, "Type": "custom", "Name": "App", "Shortname": "app"}),
    );
    aws.group("legacy-id").await;
    aws.hook(
        "legacy-id",
        "provision-launch",
        LAUNCH,
        Some(&source.arn),
        300,
        "ABANDON",
        Some(METADATA),
    )
    .await;
    aws.scale("legacy-id", 1).await;
    for b in aws.drain(&source).await {
        if b.contains("EC2_INSTANCE_LAUNCHING") {
            aws.send(&q, &b).await;
        }
    }
    let p = Provision::new(
        &emu,
        &q,
        None,
        &format!(
            "[layers.legacy]\ngroups = [\"legacy-*\"]\nlaunch = [ {{ opsworks = {{ stack_id = \"{stack_id}\", layer = \"app\", region = \"us-east-1\" }} }} ]\n"
        ),
    );
    let (code, log) = p.worker();
    assert_eq!(code, 0, "{log}");
    assert_eq!(count(&p, "succeeded"), 1, "{log}");
    let ow = emu.control("GET", "/_emulator/opsworks", None);
    assert_eq!(ow["instances"][0]["StackId"], stack_id.as_str(), "{ow}");
    assert_eq!(ow["describe_all_stacks_calls"], 0, "{ow}");

    // Both ways at once is refused.
    p.merge("[layers.legacy]\nlaunch = [ { opsworks = { stack = \"x\", stack_id = \"y\", layer = \"app\" } } ]\n");
    let out = p.output(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not both"), "{err}");
}
