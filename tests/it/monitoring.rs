//! The monitoring files in config/ against a running daemon: every metric (and every label)
//! that config/prometheus-rules.yml and config/grafana-dashboard.json name is one the daemon
//! serves on /metrics, read from a real `provision daemon` that has handled a launch
//! against the emulator. promtool checks the files' syntax and the alerts' logic
//! (scripts/lint-config); this checks that they watch something that exists.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::{eventually, Provision, World};

const METADATA: &str = r#"{"environment":"production","platform":"web","major":"3"}"#;

const WEB_LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
launch = [ { tag = { Name = "web-{instance_id}" } } ]
"#;

/// Series Prometheus makes itself for every scrape target, which the daemon cannot serve.
const FROM_PROMETHEUS: &[&str] = &["up"];
/// Labels Prometheus adds to every series it scrapes.
const TARGET_LABELS: &[&str] = &["job", "instance"];

/// Raw HTTP on 127.0.0.1:port: (head, body).
fn http(port: u16, request_line: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{request_line}\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// Metric name -> label names, from Prometheus text: `# TYPE` lines name every metric (a
/// histogram's `_bucket`, `_sum` and `_count` series too), samples give the labels.
fn exported(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut f = rest.split_whitespace();
            let (name, kind) = (f.next().unwrap(), f.next().unwrap());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.entry(format!("{name}{suffix}")).or_default();
                }
                out.entry(format!("{name}_bucket"))
                    .or_default()
                    .insert("le".into());
            } else {
                out.entry(name.to_string()).or_default();
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).unwrap();
            let labels = out.entry(line[..name_end].to_string()).or_default();
            if let Some(inner) = line[name_end..]
                .strip_prefix('{')
                .and_then(|r| r.split_once('}'))
            {
                for pair in inner.0.split("\",") {
                    labels.insert(pair.split('=').next().unwrap().trim().to_string());
                }
            }
        }
    }
    out
}

/// What one PromQL expression refers to: metric names with the labels their selectors
/// match on, and the labels of `by`/`without`/`on`/`ignoring` clauses.
#[derive(Debug, Default, PartialEq)]
struct Refs {
    metrics: BTreeMap<String, BTreeSet<String>>,
    grouping: BTreeSet<String>,
}

const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// A small PromQL scanner: identifiers outside strings, selectors' braces and range
/// brackets are metric names unless they are keywords, aggregations or functions (followed
/// by `(`). Enough for the expressions in config/, and it errs towards finding names.
fn refs(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut r = Refs::default();
    let mut i = 0;
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let skip_ws = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' {
            // A selector without a name before it ({__name__=...}) is not used here.
            panic!("a bare selector in {expr:?}");
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = skip_ws(i);
            let grouping = [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ];
            if grouping.contains(&word.as_str()) {
                if next < chars.len() && chars[next] == '(' {
                    let close = next + chars[next..].iter().position(|&c| c == ')').unwrap();
                    let list: String = chars[next + 1..close].iter().collect();
                    r.grouping.extend(
                        list.split(',')
                            .map(|l| l.trim().to_string())
                            .filter(|l| !l.is_empty()),
                    );
                    i = close + 1;
                }
            } else if KEYWORDS.contains(&word.as_str())
                || (next < chars.len() && chars[next] == '(')
            {
                // an operator, an aggregation or a function
            } else {
                let labels = r.metrics.entry(word).or_default();
                if next < chars.len() && chars[next] == '{' {
                    let mut j = next + 1;
                    let mut in_string = None;
                    let mut name = String::new();
                    while j < chars.len() {
                        let d = chars[j];
                        match in_string {
                            Some(q) if d == q => in_string = None,
                            Some(_) if d == '\\' => j += 1,
                            Some(_) => {}
                            None if d == '"' || d == '\'' || d == '`' => in_string = Some(d),
                            None if d == '}' => break,
                            None if ident(d) => name.push(d),
                            None => {
                                if !name.is_empty() {
                                    labels.insert(std::mem::take(&mut name));
                                }
                            }
                        }
                        j += 1;
                    }
                    i = j + 1;
                }
            }
        } else {
            i += 1;
        }
    }
    r
}

/// The expressions of the rules file and the dashboard, as scripts/promql_exprs.py finds
/// them (the one extractor scripts/lint-config feeds to promtool).
fn expressions(file: &str) -> Vec<String> {
    let root = common::root();
    let out = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/promql_exprs.py"))
        .arg(root.join(file))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exprs: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert!(!exprs.is_empty(), "no expressions in {file}");
    exprs
}

#[test]
fn the_expression_scanner_finds_metrics_selector_labels_and_grouping_labels() {
    let r = refs(
        r#"sum by (job, layer) (rate(a_total{outcome=~"x|y}", b="{c}"}[5m])) / ignoring(le) b_seconds > 0.25 and on() up == 0 offset 5m"#,
    );
    let metrics: Vec<_> = r.metrics.keys().map(String::as_str).collect();
    assert_eq!(metrics, ["a_total", "b_seconds", "up"]);
    assert_eq!(
        r.metrics["a_total"]
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["b", "outcome"]
    );
    assert_eq!(
        r.grouping.iter().map(String::as_str).collect::<Vec<_>>(),
        ["job", "layer", "le"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_the_dashboard_use_is_one_the_daemon_exports() {
    // A daemon that has handled a launch with a tag step, so that the labelled series
    // (runs by layer and outcome, step durations by kind, AWS calls) exist.
    let World { emu, q, .. } = World::builder("web-mon")
        .metadata(METADATA)
        .instances(1)
        .start()
        .await;
    let p = Provision::new(&emu, &q, None, WEB_LAYER);
    p.serve_metrics();
    // Reconcile passes too, so that its per-group series exist.
    p.set("reconcile.interval", "1s");
    p.set("reconcile.unconfigured", "report");
    let mut daemon = p.daemon();
    let port = daemon.metrics_port();
    eventually("the launch handled", Duration::from_secs(60), || async {
        (emu.finished_actions().len() == 1).then_some(())
    })
    .await;
    let text = eventually("the run counted", Duration::from_secs(10), || async {
        let (head, body) = http(port, "GET /metrics?scrape=1 HTTP/1.1");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        (body.contains("provision_runs_total{") && body.contains("provision_reconcile_instances{"))
            .then_some(body)
    })
    .await;
    // What a scraper sees on the wire (the endpoint's unit tests cover each case).
    let (head, body) = http(port, "HEAD /metrics HTTP/1.1");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    assert_eq!(body, "");
    daemon.signal("TERM");
    assert_eq!(daemon.wait(Duration::from_secs(30)), 0, "{}", daemon.log());

    let exported = exported(&text);
    for (name, labels) in [
        ("provision_runs_total", &["layer", "outcome"][..]),
        ("provision_step_duration_seconds_bucket", &["kind", "le"]),
        ("provision_aws_calls_total", &["service", "operation"]),
        ("provision_reconcile_instances", &["group", "kind"]),
    ] {
        let have = exported
            .get(name)
            .unwrap_or_else(|| panic!("{name} not served:\n{text}"));
        for l in labels {
            assert!(have.contains(*l), "{name} has no label {l}:\n{text}");
        }
    }
    let all_labels: BTreeSet<&str> = exported
        .values()
        .flatten()
        .map(String::as_str)
        .chain(TARGET_LABELS.iter().copied())
        .collect();

    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for file in [
        "config/prometheus-rules.yml",
        "config/grafana-dashboard.json",
    ] {
        for expr in expressions(file) {
            let r = refs(&expr);
            assert!(!r.metrics.is_empty(), "{file}: no metric in {expr:?}");
            for (metric, labels) in &r.metrics {
                used.insert(metric.clone());
                let known = match exported.get(metric) {
                    Some(known) => known,
                    None if FROM_PROMETHEUS.contains(&metric.as_str()) => &BTreeSet::new(),
                    None => {
                        problems.push(format!("{file}: {metric} is not exported, in {expr:?}"));
                        continue;
                    }
                };
                for l in labels {
                    if !known.contains(l) && !TARGET_LABELS.contains(&l.as_str()) {
                        problems.push(format!("{file}: {metric} has no label {l}, in {expr:?}"));
                    }
                }
            }
            for l in &r.grouping {
                if !all_labels.contains(l.as_str()) {
                    problems.push(format!("{file}: no series has label {l}, in {expr:?}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // And they watch what the issue asks for.
    for metric in [
        "provision_runs_total",
        "provision_step_duration_seconds_bucket",
        "provision_in_flight",
        "provision_aws_calls_total",
        "provision_heartbeats_total",
        "provision_last_poll_age_seconds",
        "provision_receive_loop_age_seconds",
        "provision_events_rejected_total",
    ] {
        assert!(used.contains(metric), "neither file uses {metric}");
    }
}
