//! One daemon for several accounts and regions: the `[queue]` source in the ops host's own
//! account (us-east-1) and `[sources.member]`, a queue in a member account (eu-west-1) read
//! with a role assumed there (trust policy on the ops account, external id). The emulator
//! serves both accounts (assumed-role credentials select the account) and refuses
//! AssumeRole as AWS does when the role does not exist or does not trust the caller.

use crate::common;

use std::time::Duration;

use common::{eventually, Aws, Emulator, Provision, World, ACCOUNT, LAUNCH};
use serde_json::{json, Value};

const MEMBER: &str = "210987654321";
const MEMBER_REGION: &str = "eu-west-1";
const EXTERNAL_ID: &str = "ops-7f3a-ext";

/// Its terminate step makes an instance that looks gone to a source's reconcile pass a
/// finding, so a pass that took another account's launches for its own would show them.
const LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
launch = [ { tag = { Configured = "by-provision", Layer = "{layer}" } } ]
terminate = [ { tag = { Decommissioned = "yes" } } ]
"#;

/// The member account's role (as config/member-role.yaml names it in eu-west-1), trusting
/// the ops account with the external id.
fn member_role(emu: &Emulator) -> String {
    let trust = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "AWS": format!("arn:aws:iam::{ACCOUNT}:root") },
            "Action": "sts:AssumeRole",
            "Condition": { "StringEquals": { "sts:ExternalId": EXTERNAL_ID } }
        }]
    });
    emu.create_role_in(MEMBER, "provision-member-eu-west-1", &trust)
}

/// The member account's queue and group "web-eu" (its launch hook notifying that queue),
/// made with the member role's credentials in eu-west-1.
async fn member_world(emu: &Emulator, role: &str) -> (Aws, common::Queue) {
    let aws = Aws::assumed(emu, role, EXTERNAL_ID, MEMBER_REGION).await;
    let q = aws.queue("lifecycle-eu").await;
    // The emulator put the queue in the account the assumed credentials belong to.
    assert!(q.url.contains(&format!("/{MEMBER}/")), "{}", q.url);
    aws.group("web-eu").await;
    aws.hook(
        "web-eu",
        "provision-launch",
        LAUNCH,
        Some(&q.arn),
        300,
        "ABANDON",
        None,
    )
    .await;
    (aws, q)
}

fn source_toml(name: &str, url: &str, role: &str) -> String {
    format!(
        "[sources.{name}]\nurl = \"{url}\"\nregion = \"{MEMBER_REGION}\"\nrole_arn = \"{role}\"\nexternal_id = \"{EXTERNAL_ID}\"\n"
    )
}

/// The body of a GET on the daemon's metrics endpoint.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// The instance ids of a group that are in service.
async fn in_service(aws: &Aws, group: &str, n: usize) -> Vec<String> {
    eventually(
        &format!("{n} instances of {group} in service"),
        Duration::from_secs(60),
        || async {
            let ids: Vec<String> = aws
                .instances(group)
                .await
                .into_iter()
                .filter(|(_, s)| s == "InService")
                .map(|(id, _)| id)
                .collect();
            (ids.len() == n).then_some(ids)
        },
    )
    .await
}

/// Two accounts in two regions, one daemon. A source whose role cannot be assumed is
/// reported by `check --aws` (the others checked on) and, in the daemon, logged and
/// retried while the others are served. SIGHUP adding the member source starts serving
/// it: its launches are verified, tagged and completed with the member role's credentials
/// in eu-west-1, and the ops account's credentials find nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_daemon_serves_two_accounts_and_regions_and_a_broken_role_stops_nothing() {
    let w = World::builder("web-us").layer(LAYER).start().await;
    let (emu, aws) = (&w.emu, &w.aws);
    let role = member_role(emu);
    let (member, member_q) = member_world(emu, &role).await;
    let missing_role = format!("arn:aws:iam::{MEMBER}:role/not-deployed");
    let (topic, results) = aws.topic_with_queue("results").await;

    // `check --aws`: the member source checked with its role; the broken one reported,
    // and it stops nothing else.
    let p = Provision::new(emu, &w.q, Some(&topic), LAYER);
    p.merge(&source_toml("member", &member_q.url, &role));
    p.merge(&source_toml(
        "broken",
        &member_q.url.replace("lifecycle-eu", "other"),
        &missing_role,
    ));
    let out = p.output(&["check", "--aws"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "problem: sources.broken: cannot assume role {missing_role}"
        )) && text.contains("AccessDenied"),
        "{text}"
    );
    assert!(text.contains("1 problem(s)"), "{text}");
    assert!(
        text.contains(&format!("note: sources.member: role {role} assumed"))
            && text
                .contains("note: sources.member: group web-eu (layer web): hooks provision-launch"),
        "{text}"
    );
    assert!(text.contains("note: group web-us (layer web)"), "{text}");

    // The daemon starts without the member source; the broken one fails and is retried.
    p.remove("sources");
    p.merge(&source_toml(
        "broken",
        &member_q.url.replace("lifecycle-eu", "other"),
        &missing_role,
    ));
    p.serve_metrics();
    let mut daemon = p.daemon();
    let port = daemon.metrics_port();
    aws.scale("web-us", 2).await;
    let us = in_service(aws, "web-us", 2).await;
    eventually(
        "the broken source's failure logged",
        Duration::from_secs(30),
        || async {
            let log = daemon.log();
            (log.contains("source=broken")
                && log.contains("cannot receive from the queue")
                && log.contains("AccessDenied"))
            .then_some(())
        },
    )
    .await;

    // SIGHUP adds the member source: it starts receiving.
    p.merge(&source_toml("member", &member_q.url, &role));
    daemon.signal("HUP");
    eventually(
        "the member source receiving",
        Duration::from_secs(30),
        || async {
            daemon
                .log()
                .contains("sources_added=[\"member\"]")
                .then_some(())
        },
    )
    .await;
    member.scale("web-eu", 2).await;
    let eu = in_service(&member, "web-eu", 2).await;

    // Each account's instances got their tags in their own account and region.
    for id in &us {
        assert_eq!(
            aws.tags(id).await.get("Configured").map(String::as_str),
            Some("by-provision")
        );
    }
    for id in &eu {
        assert_eq!(
            member.tags(id).await.get("Configured").map(String::as_str),
            Some("by-provision")
        );
    }
    // The ops account's credentials find nothing of the member's group, in either region.
    assert!(aws.instances("web-eu").await.is_empty());
    let ops_in_eu = Aws::with_region(emu, MEMBER_REGION).await;
    assert!(ops_in_eu.instances("web-eu").await.is_empty());
    assert!(member.instances("web-us").await.is_empty());
    // Every action completed by provision, CONTINUE.
    let finished: Vec<Value> = emu.finished_actions();
    for id in us.iter().chain(&eu) {
        let a = finished.iter().find(|a| a["instance_id"] == id.as_str());
        assert!(
            a.is_some_and(|a| a["result"] == "CONTINUE"),
            "{id}: {finished:?}"
        );
    }

    // Result events (in the ops account's topic) and metrics name account and region.
    // Read off the queue as they come (each read takes them), kept across polls.
    let seen = std::sync::Mutex::new(Vec::new());
    let events = eventually("4 result events", Duration::from_secs(30), || {
        let (aws, results, seen) = (aws, &results, &seen);
        async move {
            let got = aws.results(results).await;
            let mut all = seen.lock().unwrap();
            all.extend(got);
            (all.len() >= 4).then(|| all.clone())
        }
    })
    .await;
    assert_eq!(events.len(), 4, "one per launch: {events:?}");
    let us_events: Vec<&Value> = events.iter().filter(|e| e["group"] == "web-us").collect();
    assert_eq!(us_events.len(), 2, "{events:?}");
    for e in us_events {
        assert_eq!(
            (e["account_id"].as_str(), e["region"].as_str()),
            (Some(ACCOUNT), Some("us-east-1")),
            "{e}"
        );
    }
    let eu_events: Vec<&Value> = events.iter().filter(|e| e["group"] == "web-eu").collect();
    assert_eq!(eu_events.len(), 2, "{events:?}");
    for e in eu_events {
        assert_eq!(
            (e["account_id"].as_str(), e["region"].as_str()),
            (Some(MEMBER), Some(MEMBER_REGION)),
            "{e}"
        );
    }
    let metrics = http_get(port, "/metrics");
    for want in [
        format!("provision_runs_total{{account=\"{MEMBER}\",region=\"{MEMBER_REGION}\",layer=\"web\",outcome=\"succeeded\"}} 2"),
        format!("provision_runs_total{{account=\"{ACCOUNT}\",region=\"us-east-1\",layer=\"web\",outcome=\"succeeded\"}} 2"),
        "provision_config_reloads_total 1".to_string(),
    ] {
        assert!(metrics.lines().any(|l| l == want), "no {want} in\n{metrics}");
    }
    // The member role's AssumeRole calls count with the member's account and region (the
    // broken source's refused ones too: same account and region).
    let sts = format!("provision_aws_calls_total{{account=\"{MEMBER}\",region=\"{MEMBER_REGION}\",service=\"sts\",operation=\"AssumeRole\"}} ");
    let assumed = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&sts))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(assumed.is_some_and(|n| n >= 2), "{sts}in\n{metrics}");

    // SIGHUP removing the broken source retires it.
    p.remove("sources");
    p.merge(&source_toml("member", &member_q.url, &role));
    daemon.signal("HUP");
    eventually(
        "the broken source retired",
        Duration::from_secs(30),
        || async {
            daemon
                .log()
                .contains("sources_removed=[\"broken\"]")
                .then_some(())
        },
    )
    .await;
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(60)), 0, "{}", daemon.log());
    w.queue_is_empty().await;
    assert_eq!(member.approximate_messages(&member_q).await, (0, 0));

    // By hand: `reconcile` passes over each source; `provision <id> --source` acts in the
    // source's account (without it, in the first source's, which has no such instance).
    let out = p.output(&["reconcile", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("gone")),
        "each source's pass looks only at its own account's launches: {text}"
    );
    assert!(
        text.contains(&format!(
            "source queue (account {ACCOUNT}, region us-east-1)"
        )) && text.contains(&format!(
            "source member (account {MEMBER}, region {MEMBER_REGION})"
        )),
        "{text}"
    );
    // The history names each run's source account.
    let out = p.output(&["history", "--account", MEMBER, "--json"]);
    let runs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let groups: Vec<&str> = runs.iter().filter_map(|r| r["group"].as_str()).collect();
    assert_eq!(groups, ["web-eu", "web-eu"], "{runs:?}");
    // Each run's source account and region are columns of the history: `--region` narrows
    // it to the member's rows (its launches, and the hook's test notification it skipped),
    // and the text output shows both.
    let out = p.output(&["history", "--region", MEMBER_REGION, "--json"]);
    let runs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        runs.iter()
            .all(|r| (r["account"].as_str(), r["region"].as_str())
                == (Some(MEMBER), Some(MEMBER_REGION))),
        "{runs:?}"
    );
    let groups: Vec<&str> = runs.iter().filter_map(|r| r["group"].as_str()).collect();
    assert_eq!(groups, ["web-eu", "web-eu"], "{runs:?}");
    let out = p.output(&["history"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("ACCOUNT") && text.contains("REGION"),
        "{text}"
    );
    for (ids, account, region) in [(&us, ACCOUNT, "us-east-1"), (&eu, MEMBER, MEMBER_REGION)] {
        for id in ids {
            let row = text
                .lines()
                .find(|l| l.contains(id.as_str()) && l.contains("launch"));
            assert!(
                row.is_some_and(|l| l.contains(account) && l.contains(region)),
                "{id} in {account} {region}: {text}"
            );
        }
    }
    let out = p.output(&[&eu[0], "--source", "member", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("web-eu"), "{text}");
    let out = p.output(&[&eu[0], "--dry-run"]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A reload that removes a source while one of its runs is in a slow step: the source stops
/// receiving, the run finishes (its step, the tag after it, the completion) and its message
/// is deleted, while the source that replaced it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_source_finishes_its_runs_in_flight() {
    let slow = r#"
[layers.web]
groups = ["web-*"]
launch = [
  { ssm = { document = "AWS-RunShellScript", parameters = { commands = ["sleep 4"] } } },
  { tag = { Configured = "by-provision" } },
]
"#;
    let w = World::builder("web-us")
        .layer(slow)
        .instances(1)
        .start()
        .await;
    let (emu, aws) = (&w.emu, &w.aws);
    let role = member_role(emu);
    let (member, member_q) = member_world(emu, &role).await;
    let p = w.provision();
    // Shorter than the step: a retired source's runs are not cut at the shutdown grace.
    p.set("daemon.shutdown_grace", "1s");
    let mut daemon = p.daemon();
    eventually(
        "the launch's ssm command",
        Duration::from_secs(30),
        || async {
            let state = emu.control("GET", "/_emulator/ssm", None);
            (!state["commands"].as_array()?.is_empty()).then_some(())
        },
    )
    .await;

    // The [queue] source goes, the member's comes.
    p.remove("queue.url");
    p.merge(&source_toml("member", &member_q.url, &role));
    daemon.signal("HUP");
    eventually("the reload", Duration::from_secs(30), || async {
        let log = daemon.log();
        (log.contains("sources_added=[\"member\"]") && log.contains("sources_removed=[\"queue\"]"))
            .then_some(())
    })
    .await;
    let us = in_service(aws, "web-us", 1).await;
    assert_eq!(
        aws.tags(&us[0]).await.get("Configured").map(String::as_str),
        Some("by-provision"),
        "{}",
        daemon.log()
    );
    w.queue_is_empty().await;
    member.scale("web-eu", 1).await;
    let eu = in_service(&member, "web-eu", 1).await;
    assert_eq!(
        member
            .tags(&eu[0])
            .await
            .get("Configured")
            .map(String::as_str),
        Some("by-provision")
    );
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(60)), 0, "{}", daemon.log());
}
