//! Every message shape in tests/fixtures/events/ parses to the outcome its README lists,
//! through the library and through `provision event parse`.

use std::path::PathBuf;
use std::process::Command;

use provision::event::{self, Envelope, Parsed, Phase, Place, Reject, Skip, Transition};

fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/events")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn event(name: &str) -> event::LifecycleEvent {
    match event::parse(&fixture(name)) {
        Parsed::Event(e) => e,
        other => panic!("{name}: expected an event, got {other:?}"),
    }
}

#[test]
fn direct_launch() {
    let e = event("direct-launch.json");
    assert_eq!(e.instance_id.as_str(), "i-0a1b2c3d4e5f60718");
    assert_eq!(e.group, "web-prod");
    assert_eq!(e.hook, "provision-launch");
    assert_eq!(e.transition, Transition::Launch);
    assert_eq!(e.token, "71514b9d-6a40-4b26-8523-05e7ee35fa40");
    assert_eq!(e.envelope, Envelope::Direct);
    assert_eq!(e.origin.map(Place::as_str), Some("EC2"));
    for (k, v) in [
        ("environment", "production"),
        ("platform", "web"),
        ("major", "3"),
    ] {
        assert_eq!(e.metadata.get(k).as_deref(), Some(v), "metadata {k}");
    }
}

#[test]
fn direct_terminate() {
    let e = event("direct-terminate.json");
    assert_eq!(e.instance_id.as_str(), "i-0a1b2c3d4e5f60718");
    assert_eq!(e.transition, Transition::Terminate);
    assert_eq!(e.metadata, event::Metadata::None);
}

#[test]
fn legacy_launch_without_origin() {
    let e = event("legacy-launch-no-origin.json");
    assert_eq!(e.transition, Transition::Launch);
    assert_eq!(e.instance_id.as_str(), "i-4c87e963");
    assert_eq!(e.origin, None);
    assert_eq!(e.destination, None);
}

#[test]
fn warm_pool_launch() {
    let e = event("warm-pool-launch.json");
    assert_eq!(e.transition, Transition::Launch);
    assert_eq!(e.origin.map(Place::as_str), Some("WarmPool"));
}

/// The warm pool's lifecycle actions, each in the three shapes: the phase their Origin and
/// Destination give, and the same event whatever the envelope.
#[test]
fn warm_pool_actions_in_every_shape() {
    let cases = [
        ("enter", Phase::PoolEnter, "EC2", "WarmPool"),
        ("leave", Phase::PoolLeave, "WarmPool", "AutoScalingGroup"),
        ("return", Phase::PoolReturn, "AutoScalingGroup", "WarmPool"),
        ("terminate", Phase::Terminate, "WarmPool", "EC2"),
    ];
    for (case, phase, origin, destination) in cases {
        let direct = event(&format!("warm-pool/direct-{case}.json"));
        assert_eq!(direct.phase(), phase, "{case}");
        assert_eq!(direct.transition, phase.transition(), "{case}");
        assert_eq!(direct.origin.map(Place::as_str), Some(origin), "{case}");
        assert_eq!(
            direct.destination.map(Place::as_str),
            Some(destination),
            "{case}"
        );
        assert_eq!(direct.instance_id.as_str(), "i-0b1c2d3e4f5a60001");
        for (shape, envelope) in [
            ("sns", Envelope::Sns),
            ("eventbridge", Envelope::EventBridge),
        ] {
            let e = event(&format!("warm-pool/{shape}-{case}.json"));
            assert_eq!(e.envelope, envelope);
            let same = event::LifecycleEvent {
                envelope: Envelope::Direct,
                account_id: direct.account_id.clone(),
                time: direct.time.clone(),
                ..e
            };
            assert_eq!(same, direct, "{shape}-{case}");
        }
    }
    // The older fixture: an instance leaving the pool.
    assert_eq!(event("warm-pool-launch.json").phase(), Phase::PoolLeave);
    assert_eq!(event("direct-launch.json").phase(), Phase::Launch);
    assert_eq!(event("legacy-launch-no-origin.json").phase(), Phase::Launch);
}

#[test]
fn sns_launch_is_the_same_event_as_direct() {
    let sns = event("sns-launch.json");
    let direct = event("direct-launch.json");
    assert_eq!(sns.envelope, Envelope::Sns);
    assert_eq!(
        event::LifecycleEvent {
            envelope: Envelope::Direct,
            ..sns
        },
        direct
    );
}

#[test]
fn eventbridge_launch_and_terminate() {
    let l = event("eventbridge-launch.json");
    assert_eq!(l.instance_id.as_str(), "i-1234567890abcdef0");
    assert_eq!(l.transition, Transition::Launch);
    assert_eq!(l.envelope, Envelope::EventBridge);
    assert_eq!(l.metadata.get("platform").as_deref(), Some("web"));
    // The detail has no AccountId or Time: they come from the envelope.
    assert_eq!(l.account_id.as_deref(), Some("123456789012"));
    assert_eq!(l.time.as_deref(), Some("2026-11-21T10:15:42Z"));
    let t = event("eventbridge-terminate.json");
    assert_eq!(t.transition, Transition::Terminate);
    assert_eq!(t.token, "11112222-3333-4444-5555-666677778888");
}

#[test]
fn spot_interruptions_and_rebalance_recommendations_are_warnings_with_their_deadline() {
    use provision::event::InterruptionKind;
    let warning = |name: &str| match event::parse(&fixture(name)) {
        Parsed::Interruption(i) => i,
        other => panic!("{name}: expected an interruption, got {other:?}"),
    };
    let spot = warning("eventbridge-spot-interruption.json");
    assert_eq!(spot.instance_id.as_str(), "i-1234567890abcdef0");
    assert_eq!(spot.kind, InterruptionKind::SpotInterruption);
    let at = |s: &str| {
        humantime::parse_rfc3339(s)
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    assert_eq!(spot.deadline_ms, Some(at("2026-12-02T01:02:00Z")));
    let rebalance = warning("eventbridge-rebalance-recommendation.json");
    assert_eq!(rebalance.kind, InterruptionKind::RebalanceRecommendation);
    assert_eq!(rebalance.deadline_ms, None);
    // A warning about an instance id that is not one is rejected like any other message.
    let forged = fixture("eventbridge-spot-interruption.json")
        .replace("\"i-1234567890abcdef0\"", "\"i-1; rm -rf /\"");
    assert!(matches!(
        event::parse(&forged),
        Parsed::Reject(Reject::BadInstanceId(_))
    ));
}

#[test]
fn test_notifications_are_skipped() {
    for name in ["test-notification.json", "sns-test-notification.json"] {
        match event::parse(&fixture(name)) {
            Parsed::Skip(Skip::TestNotification { group }) => assert_eq!(group, "web-prod"),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn bad_messages_are_rejected_or_skipped_with_a_reason() {
    type Check = fn(&Parsed) -> bool;
    let cases: &[(&str, Check)] = &[
        ("bad/not-json.txt", |p| {
            matches!(p, Parsed::Reject(Reject::NotJson(_)))
        }),
        ("bad/array.json", |p| {
            matches!(p, Parsed::Reject(Reject::NotAnObject("an array")))
        }),
        ("bad/missing-token.json", |p| {
            matches!(p, Parsed::Reject(Reject::Missing("LifecycleActionToken")))
        }),
        ("bad/injected-instance-id.json", |p| {
            matches!(p, Parsed::Reject(Reject::BadInstanceId(_)))
        }),
        ("bad/sns-bad-inner.json", |p| {
            matches!(p, Parsed::Reject(Reject::BadSnsMessage(_)))
        }),
        ("bad/eventbridge-other-event.json", |p| {
            matches!(p, Parsed::Skip(Skip::OtherEventBridgeEvent { .. }))
        }),
        ("bad/unknown-destination.json", |p| {
            matches!(
                p,
                Parsed::Reject(Reject::Invalid {
                    field: "Destination",
                    ..
                })
            )
        }),
    ];
    for (name, ok) in cases {
        let parsed = event::parse(&fixture(name));
        assert!(ok(&parsed), "{name}: unexpected {parsed:?}");
        let reason = match &parsed {
            Parsed::Reject(r) => r.to_string(),
            Parsed::Skip(s) => s.to_string(),
            Parsed::Event(_) | Parsed::Interruption(_) => unreachable!(),
        };
        assert!(reason.len() > 10, "{name}: reason too thin: {reason:?}");
    }
}

#[test]
fn cli_prints_the_normalized_event_or_the_reason() {
    let bin = env!("CARGO_BIN_EXE_provision");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/events");
    let out = Command::new(bin)
        .args(["event", "parse"])
        .arg(dir.join("sns-launch.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "event");
    assert_eq!(v["event"]["instance_id"], "i-0a1b2c3d4e5f60718");
    assert_eq!(v["event"]["envelope"], "sns");
    assert_eq!(v["event"]["metadata"]["environment"], "production");
    assert_eq!(v["phase"], "launch");

    let out = Command::new(bin)
        .args(["event", "parse"])
        .arg(dir.join("warm-pool/eventbridge-return.json"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["phase"], "pool-return", "{v}");

    let out = Command::new(bin)
        .args(["event", "parse"])
        .arg(dir.join("eventbridge-launch.json"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["event"]["account_id"], "123456789012", "{v}");
    assert_eq!(v["event"]["time"], "2026-11-21T10:15:42Z", "{v}");

    let out = Command::new(bin)
        .args(["event", "parse"])
        .arg(dir.join("bad/injected-instance-id.json"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a reject exits 1");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "reject");
    assert!(
        v["reason"]
            .as_str()
            .unwrap()
            .contains("does not match i-[0-9a-f]{8,17}"),
        "{v}"
    );

    // stdin
    let mut child = Command::new(bin)
        .args(["event", "parse", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(fixture("test-notification.json").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "skip");
}

#[test]
fn the_example_config_is_valid() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/provision.toml");
    let cfg = provision::config::Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.layers.len(), 5);
    // Every playbook the example names ships in playbooks/.
    let mut books = 0;
    for l in &cfg.layers {
        for s in l.launch.iter().chain(&l.terminate) {
            if let provision::step::StepKind::Ansible(a) = &s.kind {
                let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("playbooks")
                    .join(&a.playbook);
                assert!(p.is_file(), "{}", p.display());
                books += 1;
            }
        }
    }
    assert!(books > 0, "the example config shows no ansible step");
    assert_eq!(cfg.queue.max_in_flight, 64);
}

#[test]
fn a_reader_that_went_away_ends_the_output_without_a_panic() {
    // `provision … | head -1`: the pipe is closed before the command writes.
    let bin = env!("CARGO_BIN_EXE_provision");
    let mut child = Command::new(bin)
        .args(["event", "parse", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(fixture("direct-launch.json").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

#[test]
fn generate_docs_help_prints_usage_and_creates_nothing() {
    let bin = env!("CARGO_BIN_EXE_provision");
    let dir = tempfile::tempdir().unwrap();
    for (arg, code) in [("--help", 0), ("-h", 0), ("--bogus", 2)] {
        let out = Command::new(bin)
            .args(["generate-docs", arg])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{arg}: {out:?}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("usage: provision generate-docs DIR"),
            "{text}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "generate-docs created {left:?}");
}
