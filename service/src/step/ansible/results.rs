//! The per-host results of a run: the `provision_json` callback's JSON document turned into
//! one result per instance (task outcomes for the history, failed or unreachable hosts as
//! errors).
//!
//! Owns reading the document; not running Ansible nor writing logs (see `runner`).

use serde_json::Value;

use crate::step::tail;

const EXCERPT: usize = 1500;

/// One host's outcome of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostResult {
    /// Every task ran: the history's detail.
    Done(String),
    /// A task failed, the play never ran on it, or the run itself failed.
    Failed(String),
    /// Ansible could not connect (or lost the connection) to a host that was reached just
    /// before, with no failed task and its key not refused: worth a follow-up run.
    Unreachable(String),
}

pub fn parse_results(stdout: &str) -> Option<Value> {
    let start = stdout.find('{')?;
    serde_json::from_str(&stdout[start..]).ok()
}

/// One host's result from the run's JSON document.
pub fn host_result(
    host: &str,
    doc: Option<&Value>,
    exit: Option<i32>,
    stderr: &str,
    log: &str,
) -> HostResult {
    let Some(doc) = doc else {
        return HostResult::Failed(format!(
            "ansible-playbook exited with {} and printed no results: {} (log: {log})",
            exit.map(|c| c.to_string())
                .unwrap_or_else(|| "a signal".into()),
            tail(stderr, EXCERPT)
        ));
    };
    let Some(stats) = doc.pointer(&format!(
        "/stats/{}",
        host.replace('~', "~0").replace('/', "~1")
    )) else {
        return HostResult::Failed(format!(
            "the playbook did not run on this host: no play's `hosts:` matched it (its groups are listed in the log's header); exit {}: {} (log: {log})",
            exit.map(|c| c.to_string()).unwrap_or_default(),
            tail(stderr, EXCERPT)
        ));
    };
    let n = |k: &str| stats.get(k).and_then(Value::as_i64).unwrap_or(0);
    let summary = format!(
        "ok={} changed={} failed={} unreachable={} skipped={}",
        n("ok"),
        n("changed"),
        n("failures"),
        n("unreachable"),
        n("skipped")
    );
    // The tasks of this host, in order, as `status task: message`.
    let mut lines = Vec::new();
    for play in doc["plays"].as_array().into_iter().flatten() {
        for task in play["tasks"].as_array().into_iter().flatten() {
            if let Some(r) = task["hosts"].get(host) {
                let status = r["status"].as_str().unwrap_or("?");
                let name = task["task"]["name"].as_str().unwrap_or("");
                let mut line = format!("{status}: {name}");
                if matches!(status, "failed" | "unreachable") {
                    for k in ["msg", "stderr", "stdout"] {
                        if let Some(s) = r.get(k).and_then(Value::as_str).filter(|s| !s.is_empty())
                        {
                            line.push_str(&format!(" | {k}: {}", s.trim()));
                        }
                    }
                }
                lines.push(line);
            }
        }
    }
    let detail = format!("{summary}\n{}\n(log: {log})", lines.join("\n"));
    let refused = n("unreachable") > 0 && lines.iter().any(|l| host_key_refused(l));
    let detail = if refused {
        // In the words of `remote` for the same refusal, first (and kept whatever the
        // length of ssh's banner), so the history says it.
        let lead = format!(
            "host key refused: the SSH server of {host} presented a key that is not its verified one (the instance's known_hosts file, strict checking); not connecting (possible man-in-the-middle)."
        );
        let room = EXCERPT.saturating_sub(lead.len() + 1);
        format!("{lead}\n{}", tail(&detail, room))
    } else {
        tail(&detail, EXCERPT)
    };
    if n("failures") > 0 || refused {
        HostResult::Failed(detail)
    } else if n("unreachable") > 0 {
        HostResult::Unreachable(detail)
    } else {
        HostResult::Done(detail)
    }
}

/// Whether ssh (or Mitogen, which runs ssh) refused the server's host key.
fn host_key_refused(msg: &str) -> bool {
    [
        "Host key verification failed",
        "REMOTE HOST IDENTIFICATION HAS CHANGED",
        "mismatching host key",
        "No matching host key",
    ]
    .iter()
    .any(|m| msg.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn per_host_results_come_from_the_callback_document() {
        let doc = json!({
            "plays": [{"play": {"name": "p"}, "tasks": [
                {"task": {"name": "write marker"}, "hosts": {
                    "i-1": {"status": "changed"},
                    "i-2": {"status": "failed", "msg": "disk full"}}}]}],
            "stats": {
                "i-1": {"ok": 1, "changed": 1, "failures": 0, "unreachable": 0},
                "i-2": {"ok": 0, "changed": 0, "failures": 1, "unreachable": 0}}
        });
        let HostResult::Done(ok) = host_result("i-1", Some(&doc), Some(2), "", "L") else {
            panic!("i-1 succeeded")
        };
        assert!(ok.starts_with("ok=1 changed=1 failed=0"), "{ok}");
        let bad = failed(host_result("i-2", Some(&doc), Some(2), "", "L"));
        assert!(
            bad.contains("failed: write marker | msg: disk full"),
            "{bad}"
        );
        let missing = failed(host_result("i-3", Some(&doc), Some(0), "", "L"));
        assert!(missing.contains("did not run on this host"), "{missing}");
        let none = failed(host_result("i-1", None, Some(4), "ERROR! syntax", "L"));
        assert!(none.contains("ERROR! syntax"), "{none}");
    }

    fn failed(r: HostResult) -> String {
        match r {
            HostResult::Failed(e) => e,
            other => panic!("not failed: {other:?}"),
        }
    }

    #[test]
    fn a_lost_connection_is_unreachable_and_a_failed_task_beside_it_is_a_failure() {
        let doc = json!({
            "plays": [{"tasks": [{"task": {"name": "t"}, "hosts": {
                "i-1": {"status": "unreachable", "msg": "Connection timed out"},
                "i-2": {"status": "failed", "msg": "boom"}}},
                {"task": {"name": "u"}, "hosts": {
                "i-2": {"status": "unreachable", "msg": "Connection timed out"}}}]}],
            "stats": {"i-1": {"ok": 0, "failures": 0, "unreachable": 1},
                      "i-2": {"ok": 0, "failures": 1, "unreachable": 1}}
        });
        match host_result("i-1", Some(&doc), Some(4), "", "L") {
            HostResult::Unreachable(e) => assert!(e.contains("Connection timed out"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(failed(host_result("i-2", Some(&doc), Some(4), "", "L")).contains("boom"));
    }

    #[test]
    fn a_refused_host_key_is_named_as_such_whatever_the_runner() {
        for msg in [
            "Failed to connect to the host via ssh: Host key verification failed.",
            "Host key checking is enabled, and SSH reported an unrecognized or mismatching host key.",
        ] {
            let doc = json!({
                "plays": [{"tasks": [{"task": {"name": "t"}, "hosts": {
                    "i-1": {"status": "unreachable", "msg": msg}}}]}],
                "stats": {"i-1": {"ok": 0, "failures": 0, "unreachable": 1}}
            });
            let e = failed(host_result("i-1", Some(&doc), Some(4), "", "L"));
            assert!(e.starts_with("host key refused"), "{e}");
            assert!(e.contains(msg), "{e}");
        }
    }
}
