//! Counters of what the service did, shared by every part of it, and their Prometheus text.
//!
//! One [`Stats`] per source's account and region (its series carry `account` and `region`
//! labels) and one for the process (reloads, the calls of the clients every source shares),
//! gathered in one [`Registry`] that /metrics and /healthz read.
//!
//! Owns the numbers and how they read; serving them over HTTP is `endpoint.rs`, counting AWS
//! calls as the SDK makes them is the interceptor below.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aws_sdk_sqs::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_sqs::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_sqs::error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;

use crate::clock::now_ms;
use crate::outcome::Outcome;

/// Upper bounds (seconds) of the step duration histogram.
const STEP_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; STEP_BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug, Default)]
pub struct Stats {
    /// The constant labels of every series (`account="…",region="…"`); empty for the
    /// process's own.
    labels: String,
    /// (layer, outcome) -> runs.
    runs: Mutex<BTreeMap<(String, String), u64>>,
    /// step kind -> durations.
    steps: Mutex<BTreeMap<String, Histogram>>,
    /// (service, operation) -> HTTP attempts, retries included.
    aws_calls: Mutex<BTreeMap<(String, String), u64>>,
    /// (group, kind) -> instances the last reconcile pass found (`reconcile`).
    reconcile: Mutex<BTreeMap<(String, String), u64>>,
    /// Reconcile passes run.
    pub reconcile_passes: AtomicU64,
    /// Actions the reconciler worked without a message.
    pub reconciled: AtomicU64,
    pub received: AtomicU64,
    pub skipped: AtomicU64,
    pub rejected: AtomicU64,
    pub unmatched: AtomicU64,
    pub duplicates: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub released: AtomicU64,
    pub heartbeats: AtomicU64,
    pub receive_errors: AtomicU64,
    /// Config reloads (SIGHUP) applied, and refused (the old config kept serving).
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Messages being worked on now.
    pub in_flight: AtomicU64,
    /// When the receive loop last showed it is alive (a poll completed, or it was waiting
    /// for a free slot), in ms since the epoch; 0 before the first poll.
    pub loop_alive_ms: AtomicU64,
    /// When a receive last completed, in ms since the epoch; 0 before the first.
    pub last_poll_ms: AtomicU64,
}

impl Stats {
    /// The numbers of the sources in `scope`'s account and region.
    pub fn scoped(scope: &crate::sources::Scope) -> Stats {
        Stats {
            labels: format!(
                "account=\"{}\",region=\"{}\"",
                label(&scope.account),
                label(&scope.region)
            ),
            ..Stats::default()
        }
    }

    /// The label set of a series: the constant labels, then `inner` (`kind="tag"`).
    fn with(&self, inner: &str) -> String {
        match (self.labels.is_empty(), inner.is_empty()) {
            (true, true) => String::new(),
            (true, false) => format!("{{{inner}}}"),
            (false, true) => format!("{{{}}}", self.labels),
            (false, false) => format!("{{{},{inner}}}", self.labels),
        }
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn mark(at: &AtomicU64) {
        at.store(now_ms().max(0) as u64, Ordering::Relaxed);
    }

    /// The counter that stands for an outcome, where there is one.
    fn counter(&self, outcome: Outcome) -> Option<&AtomicU64> {
        match outcome {
            Outcome::Succeeded => Some(&self.succeeded),
            Outcome::Failed | Outcome::HookError => Some(&self.failed),
            Outcome::Duplicate => Some(&self.duplicates),
            Outcome::Unmatched => Some(&self.unmatched),
            Outcome::Released => Some(&self.released),
            Outcome::Rejected => Some(&self.rejected),
            Outcome::Skipped => Some(&self.skipped),
            Outcome::Running | Outcome::Retry => None,
        }
    }

    /// Counts a message that ended with `outcome`.
    pub fn count(&self, outcome: Outcome) {
        if let Some(c) = self.counter(outcome) {
            Self::inc(c);
        }
    }

    /// Counts a worked run, by layer and outcome.
    pub fn run_finished(&self, layer: &str, outcome: Outcome) {
        self.count(outcome);
        *self
            .runs
            .lock()
            .unwrap()
            .entry((layer.to_string(), outcome.as_str().to_string()))
            .or_default() += 1;
    }

    pub fn step_finished(&self, kind: &str, seconds: f64) {
        let mut steps = self.steps.lock().unwrap();
        let h = steps.entry(kind.to_string()).or_default();
        for (i, bound) in STEP_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += seconds;
    }

    pub fn aws_call(&self, service: &str, operation: &str) {
        *self
            .aws_calls
            .lock()
            .unwrap()
            .entry((service.to_string(), operation.to_string()))
            .or_default() += 1;
    }

    /// What the last reconcile pass found: instances by (group, kind); replaces the last.
    pub fn reconcile_found(&self, found: BTreeMap<(String, String), u64>) {
        *self.reconcile.lock().unwrap() = found;
    }

    /// Every AWS call so far, by (service, operation).
    pub fn aws_calls(&self) -> BTreeMap<(String, String), u64> {
        self.aws_calls.lock().unwrap().clone()
    }

    fn write_reconcile(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP provision_reconcile_instances Instances the last reconcile pass found, by group and kind (waiting, unconfigured, gone).\n# TYPE provision_reconcile_instances gauge");
        for ((group, kind), n) in self.reconcile.lock().unwrap().iter() {
            let l = self.with(&format!(
                "group=\"{}\",kind=\"{}\"",
                label(group),
                label(kind)
            ));
            let _ = writeln!(out, "provision_reconcile_instances{l} {n}");
        }
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        self.write_counters(&mut out);
        self.write_runs(&mut out);
        self.write_steps(&mut out);
        self.write_aws_calls(&mut out);
        self.write_reconcile(&mut out);
        self.write_poll_age(&mut out);
        out
    }

    /// The plain counters and gauges.
    fn write_counters(&self, out: &mut String) {
        let counters: [(&str, &str, &AtomicU64); 13] = [
            (
                "provision_events_received_total",
                "Messages received from the queue.",
                &self.received,
            ),
            (
                "provision_events_skipped_total",
                "Messages skipped (test notifications, other events).",
                &self.skipped,
            ),
            (
                "provision_events_rejected_total",
                "Messages rejected as malformed or unsafe.",
                &self.rejected,
            ),
            (
                "provision_events_unmatched_total",
                "Events whose group no layer matches.",
                &self.unmatched,
            ),
            (
                "provision_events_duplicate_total",
                "Events whose lifecycle action was already completed.",
                &self.duplicates,
            ),
            (
                "provision_events_released_total",
                "Events released to the queue unfinished (shutdown).",
                &self.released,
            ),
            (
                "provision_heartbeats_total",
                "Lifecycle action heartbeats sent.",
                &self.heartbeats,
            ),
            (
                "provision_queue_receive_errors_total",
                "Failed ReceiveMessage calls.",
                &self.receive_errors,
            ),
            (
                "provision_config_reloads_total",
                "Config reloads (SIGHUP) applied.",
                &self.reloads,
            ),
            (
                "provision_config_reload_failures_total",
                "Config reloads (SIGHUP) refused; the previous config kept serving.",
                &self.reload_failures,
            ),
            (
                "provision_reconcile_passes_total",
                "Reconcile passes run.",
                &self.reconcile_passes,
            ),
            (
                "provision_reconciled_total",
                "Lifecycle actions worked without a message (found waiting by reconcile).",
                &self.reconciled,
            ),
            (
                "provision_in_flight",
                "Messages being worked on now.",
                &self.in_flight,
            ),
        ];
        for (name, help, value) in counters {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{} {}",
                self.with(""),
                Self::get(value)
            );
        }
    }

    fn write_runs(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP provision_runs_total Finished runs by layer and outcome.\n# TYPE provision_runs_total counter");
        for ((layer, outcome), n) in self.runs.lock().unwrap().iter() {
            let l = self.with(&format!(
                "layer=\"{}\",outcome=\"{}\"",
                label(layer),
                label(outcome)
            ));
            let _ = writeln!(out, "provision_runs_total{l} {n}");
        }
    }

    fn write_steps(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP provision_step_duration_seconds Step durations by kind.\n# TYPE provision_step_duration_seconds histogram");
        for (kind, h) in self.steps.lock().unwrap().iter() {
            let kind = format!("kind=\"{}\"", label(kind));
            for (bound, n) in STEP_BUCKETS.iter().zip(h.counts) {
                let l = self.with(&format!("{kind},le=\"{bound}\""));
                let _ = writeln!(out, "provision_step_duration_seconds_bucket{l} {n}");
            }
            let l = self.with(&format!("{kind},le=\"+Inf\""));
            let _ = writeln!(out, "provision_step_duration_seconds_bucket{l} {}", h.count);
            let l = self.with(&kind);
            let _ = writeln!(out, "provision_step_duration_seconds_sum{l} {}", h.sum);
            let _ = writeln!(out, "provision_step_duration_seconds_count{l} {}", h.count);
        }
    }

    fn write_aws_calls(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP provision_aws_calls_total AWS API calls (HTTP attempts, retries included).\n# TYPE provision_aws_calls_total counter");
        for ((service, op), n) in self.aws_calls.lock().unwrap().iter() {
            let l = self.with(&format!(
                "service=\"{}\",operation=\"{}\"",
                label(service),
                label(op)
            ));
            let _ = writeln!(out, "provision_aws_calls_total{l} {n}");
        }
    }

    fn write_poll_age(&self, out: &mut String) {
        let l = self.with("");
        let _ = writeln!(out, "# HELP provision_last_poll_age_seconds Seconds since a receive last completed (-1 before the first).\n# TYPE provision_last_poll_age_seconds gauge\nprovision_last_poll_age_seconds{l} {}", age_seconds(&self.last_poll_ms));
        // What /healthz and the systemd watchdog judge by: unlike the poll age it stays low
        // while every in-flight slot is busy, so an alert on it means a stuck loop.
        let _ = writeln!(out, "# HELP provision_receive_loop_age_seconds Seconds since the receive loop last showed life: a poll completed, or it waited for a free slot (-1 before the first).\n# TYPE provision_receive_loop_age_seconds gauge\nprovision_receive_loop_age_seconds{l} {}", age_seconds(&self.loop_alive_ms));
    }

    /// True when the receive loop has shown it is alive within `within`.
    pub fn loop_is_alive(&self, within: std::time::Duration) -> bool {
        let last = Self::get(&self.loop_alive_ms);
        last > 0 && (now_ms().max(0) as u64).saturating_sub(last) <= within.as_millis() as u64
    }
}

/// Families only the process's [`Stats`] counts (a reload is the process's, not a source's).
const PROCESS_FAMILIES: [&str; 2] = [
    "provision_config_reloads_total",
    "provision_config_reload_failures_total",
];
/// Families both count: the process's are the calls of the clients every source shares
/// (the claims and history tables, the result topic).
const SHARED_FAMILIES: [&str; 1] = ["provision_aws_calls_total"];

/// Every [`Stats`] of the process: its own, and one per account and region of its sources
/// (sources in the same account and region count together, so no two carry the same labels).
#[derive(Debug, Default)]
pub struct Registry {
    process: Arc<Stats>,
    sources: Mutex<BTreeMap<crate::sources::Scope, Arc<Stats>>>,
}

impl Registry {
    /// The process's own numbers (reloads, the shared clients' calls).
    pub fn process(&self) -> &Arc<Stats> {
        &self.process
    }

    /// The numbers of `scope`'s account and region, made at the first call.
    pub fn source(&self, scope: &crate::sources::Scope) -> Arc<Stats> {
        self.sources
            .lock()
            .unwrap()
            .entry(scope.clone())
            .or_insert_with(|| Arc::new(Stats::scoped(scope)))
            .clone()
    }

    fn all_sources(&self) -> Vec<Arc<Stats>> {
        self.sources.lock().unwrap().values().cloned().collect()
    }

    /// `f` of every source's numbers, summed.
    pub fn sum(&self, f: impl Fn(&Stats) -> u64) -> u64 {
        self.all_sources().iter().map(|s| f(s)).sum()
    }

    /// True when some source's receive loop has shown it is alive within `within`.
    pub fn loop_is_alive(&self, within: std::time::Duration) -> bool {
        self.all_sources().iter().any(|s| s.loop_is_alive(within))
    }

    /// True once some source's receive completed.
    pub fn polled(&self) -> bool {
        self.all_sources()
            .iter()
            .any(|s| Stats::get(&s.last_poll_ms) > 0)
    }

    /// Everything, in the Prometheus text exposition format: each family's HELP and TYPE
    /// once, then its series from every source and the process.
    pub fn prometheus(&self) -> String {
        let mut families: Vec<(String, String, String)> = Vec::new();
        let mut add = |text: String, process: bool| {
            for (name, head, mut samples) in split_families(&text) {
                let ours = PROCESS_FAMILIES.contains(&name.as_str());
                if !(ours == process || SHARED_FAMILIES.contains(&name.as_str())) {
                    // Its HELP and TYPE still, so every family shows before any source.
                    samples.clear();
                }
                match families.iter_mut().find(|(n, _, _)| *n == name) {
                    Some((_, _, all)) => all.push_str(&samples),
                    None => families.push((name, head, samples)),
                }
            }
        };
        for s in self.all_sources() {
            add(s.prometheus(), false);
        }
        add(self.process.prometheus(), true);
        families
            .into_iter()
            .map(|(_, head, samples)| head + &samples)
            .collect()
    }
}

/// A Prometheus text split by family: (name, its HELP and TYPE lines, its samples).
fn split_families(text: &str) -> Vec<(String, String, String)> {
    let mut out: Vec<(String, String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("").to_string();
            out.push((name, format!("{line}\n"), String::new()));
        } else if let Some(f) = out.last_mut() {
            match line.starts_with('#') {
                true => f.1.push_str(&format!("{line}\n")),
                false => f.2.push_str(&format!("{line}\n")),
            }
        }
    }
    out
}

/// Seconds since the instant in `at` (ms since the epoch), or -1 when it is still 0.
fn age_seconds(at: &AtomicU64) -> f64 {
    match Stats::get(at) {
        0 => -1.0,
        t => (now_ms().max(0) as u64).saturating_sub(t) as f64 / 1000.0,
    }
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// An SDK interceptor counting every HTTP attempt by service and operation.
#[derive(Debug, Clone)]
pub struct CountCalls(pub Arc<Stats>);

impl Intercept for CountCalls {
    fn name(&self) -> &'static str {
        "CountCalls"
    }

    fn read_before_attempt(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(m) = cfg.load::<Metadata>() {
            self.0
                .aws_call(&m.service().to_ascii_lowercase().replace(' ', ""), m.name());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let s = Stats::default();
        Stats::inc(&s.received);
        s.run_finished("web", Outcome::Succeeded);
        s.step_finished("tag", 0.3);
        s.step_finished("tag", 7.0);
        s.aws_call("sqs", "ReceiveMessage");
        let text = s.prometheus();
        assert!(text.contains("provision_events_received_total 1"), "{text}");
        assert!(
            text.contains("provision_runs_total{layer=\"web\",outcome=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("provision_step_duration_seconds_bucket{kind=\"tag\",le=\"0.5\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("provision_step_duration_seconds_bucket{kind=\"tag\",le=\"10\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("provision_step_duration_seconds_count{kind=\"tag\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "provision_aws_calls_total{service=\"sqs\",operation=\"ReceiveMessage\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("provision_last_poll_age_seconds -1"),
            "{text}"
        );
        assert!(
            text.contains("provision_receive_loop_age_seconds -1"),
            "{text}"
        );
        Stats::mark(&s.loop_alive_ms);
        let text = s.prometheus();
        let age: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("provision_receive_loop_age_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((0.0..60.0).contains(&age), "{age}");
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }

    #[test]
    fn a_registry_labels_each_account_and_region_and_names_each_family_once() {
        use crate::sources::Scope;
        let r = Registry::default();
        let eu = Scope::new(Some("210987654321"), Some("eu-west-1"));
        let us = Scope::new(Some("123456789012"), Some("us-east-1"));
        Stats::inc(&r.source(&eu).received);
        Stats::inc(&r.source(&eu).received);
        Arc::clone(&r.source(&us)).run_finished("web", Outcome::Succeeded);
        r.source(&us).aws_call("sqs", "ReceiveMessage");
        r.process().aws_call("dynamodb", "PutItem");
        Stats::inc(&r.process().reload_failures);
        let text = r.prometheus();
        for want in [
            "provision_events_received_total{account=\"210987654321\",region=\"eu-west-1\"} 2",
            "provision_events_received_total{account=\"123456789012\",region=\"us-east-1\"} 0",
            "provision_runs_total{account=\"123456789012\",region=\"us-east-1\",layer=\"web\",outcome=\"succeeded\"} 1",
            "provision_aws_calls_total{account=\"123456789012\",region=\"us-east-1\",service=\"sqs\",operation=\"ReceiveMessage\"} 1",
            "provision_aws_calls_total{service=\"dynamodb\",operation=\"PutItem\"} 1",
            "provision_config_reload_failures_total 1",
        ] {
            assert!(text.lines().any(|l| l == want), "no {want} in\n{text}");
        }
        for family in [
            "provision_events_received_total",
            "provision_aws_calls_total",
        ] {
            let helps = text.matches(&format!("# HELP {family} ")).count();
            assert_eq!(helps, 1, "{text}");
        }
        assert!(
            !text.contains("provision_events_received_total 0"),
            "{text}"
        );
        assert!(
            !text.contains("provision_config_reload_failures_total{"),
            "{text}"
        );
        assert!(!r.polled() && !r.loop_is_alive(std::time::Duration::from_secs(60)));
        Stats::mark(&r.source(&eu).loop_alive_ms);
        assert!(r.loop_is_alive(std::time::Duration::from_secs(60)));
    }
}
