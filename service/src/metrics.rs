//! Counters of what the service did, shared by every part of it, and their Prometheus text.
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
            let _ = writeln!(
                out,
                "provision_reconcile_instances{{group=\"{}\",kind=\"{}\"}} {n}",
                label(group),
                label(kind)
            );
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
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                Self::get(value)
            );
        }
    }

    fn write_runs(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP provision_runs_total Finished runs by layer and outcome.\n# TYPE provision_runs_total counter");
        for ((layer, outcome), n) in self.runs.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "provision_runs_total{{layer=\"{}\",outcome=\"{}\"}} {n}",
                label(layer),
                label(outcome)
            );
        }
    }

    fn write_steps(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP provision_step_duration_seconds Step durations by kind.\n# TYPE provision_step_duration_seconds histogram");
        for (kind, h) in self.steps.lock().unwrap().iter() {
            let kind = label(kind);
            for (bound, n) in STEP_BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "provision_step_duration_seconds_bucket{{kind=\"{kind}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "provision_step_duration_seconds_bucket{{kind=\"{kind}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "provision_step_duration_seconds_sum{{kind=\"{kind}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "provision_step_duration_seconds_count{{kind=\"{kind}\"}} {}",
                h.count
            );
        }
    }

    fn write_aws_calls(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP provision_aws_calls_total AWS API calls (HTTP attempts, retries included).\n# TYPE provision_aws_calls_total counter");
        for ((service, op), n) in self.aws_calls.lock().unwrap().iter() {
            let _ = writeln!(
                out,
                "provision_aws_calls_total{{service=\"{}\",operation=\"{}\"}} {n}",
                label(service),
                label(op)
            );
        }
    }

    fn write_poll_age(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP provision_last_poll_age_seconds Seconds since a receive last completed (-1 before the first).\n# TYPE provision_last_poll_age_seconds gauge\nprovision_last_poll_age_seconds {}", age_seconds(&self.last_poll_ms));
        // What /healthz and the systemd watchdog judge by: unlike the poll age it stays low
        // while every in-flight slot is busy, so an alert on it means a stuck loop.
        let _ = writeln!(out, "# HELP provision_receive_loop_age_seconds Seconds since the receive loop last showed life: a poll completed, or it waited for a free slot (-1 before the first).\n# TYPE provision_receive_loop_age_seconds gauge\nprovision_receive_loop_age_seconds {}", age_seconds(&self.loop_alive_ms));
    }

    /// True when the receive loop has shown it is alive within `within`.
    pub fn loop_is_alive(&self, within: std::time::Duration) -> bool {
        let last = Self::get(&self.loop_alive_ms);
        last > 0 && (now_ms().max(0) as u64).saturating_sub(last) <= within.as_millis() as u64
    }
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
}
