//! Running a layer's steps in order, for one run.
//!
//! Owns the order (the first failure stops the list and decides the layer's `on_failure`),
//! the history rows of each step, the step metrics, and the progress a watching person sees
//! ([`Progress`]). What a step does is the step's own business ([`crate::step`]).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use super::record::clip;
use super::{Job, Pipeline, RunReport, StepReport};
use crate::layer::Layer;
use crate::lease::Lease;
use crate::outcome::{HookResult, Outcome, StepOutcome};
use crate::step::{Step, StepContext, StepError, StepOutput};
use crate::template::Context;

/// How long a step's output may be in the history.
const DETAIL_MAX: usize = 2000;
/// How long it may be in a result event: ten events share one PublishBatch (256 KiB).
const EVENT_DETAIL_MAX: usize = 500;

const ACTION_GONE: &str = "the lifecycle action ended while this step ran (heartbeat timeout, or completed elsewhere): the step was stopped";

/// How a step ended.
enum StepEnd {
    Done(Result<StepOutput, StepError>),
    /// Shutdown or a deadline: the run is released.
    Cancelled,
    /// A heartbeat found the action gone: nothing the steps do can count any more.
    ActionGone,
}

/// A step starting or ending, as [`Job::progress`] reports it.
#[derive(Debug, Clone)]
pub enum Progress {
    Started {
        idx: usize,
        total: usize,
        description: String,
    },
    Finished {
        idx: usize,
        outcome: StepOutcome,
        detail: String,
        elapsed: Duration,
    },
    /// What a running step waits for (the instance, its host keys, SSH, a batch).
    Waiting { idx: usize, what: String },
}

impl Job {
    fn tell(&self, p: Progress) {
        if let Some(tx) = &self.progress {
            let _ = tx.send(p);
        }
    }
}

impl Pipeline {
    /// Runs the layer's steps in order, stopping at the first failure. Returns the hook
    /// result, or None when cancelled.
    pub(super) async fn run_steps(
        &self,
        job: &Job,
        layer: &Layer,
        run_id: i64,
        run: &mut RunReport,
        lease: &Lease,
        cancel: &CancellationToken,
    ) -> Option<HookResult> {
        let steps = layer.steps(job.event.phase());
        for (idx, step) in steps.iter().enumerate() {
            let at = (idx, steps.len());
            let failure = match self
                .run_step(job, layer, run_id, at, step, run, lease, cancel)
                .await
            {
                StepEnd::Done(Ok(_)) => continue,
                StepEnd::Done(Err(e)) => e.to_string(),
                StepEnd::ActionGone => ACTION_GONE.to_string(),
                StepEnd::Cancelled => return None,
            };
            run.outcome = Outcome::Failed;
            run.error = Some(format!("step {idx} ({}): {failure}", step.kind_name()));
            return Some(layer.on_failure);
        }
        Some(HookResult::Continue)
    }

    /// One step: recorded, timed, reported.
    #[allow(clippy::too_many_arguments)]
    async fn run_step(
        &self,
        job: &Job,
        layer: &Layer,
        run_id: i64,
        (idx, total): (usize, usize),
        step: &Step,
        run: &mut RunReport,
        lease: &Lease,
        cancel: &CancellationToken,
    ) -> StepEnd {
        let last_note = Mutex::new(String::new());
        let note = |what: String| {
            let mut last = last_note.lock().unwrap();
            if *last != what {
                debug!(%what, "waiting");
                *last = what.clone();
                job.tell(Progress::Waiting { idx, what });
            }
        };
        let ctx = StepContext {
            template: Context::new(&job.event, &layer.name, &layer.vars),
            services: &self.services,
            shared: &self.shared,
            retry_for: self.cfg.aws.retry_for,
            ssh: &layer.ssh,
            note: &note,
        };
        let description = step.describe();
        let span = info_span!("step", idx, kind = step.kind_name());
        if let Err(e) = self
            .store
            .start_step(run_id, idx, step.kind_name(), &description)
            .await
        {
            warn!(error = %e, "could not record step start");
        }
        job.tell(Progress::Started {
            idx,
            total,
            description: description.clone(),
        });
        let t0 = Instant::now();
        let r = tokio::select! {
            r = step.run(&ctx).instrument(span.clone()) => r,
            _ = cancel.cancelled() => {
                let _ = self.store.finish_step(run_id, idx, StepOutcome::Cancelled, "shutdown").await;
                return StepEnd::Cancelled;
            }
            _ = lease.gone().cancelled() => {
                warn!("{ACTION_GONE}");
                let _ = self.store.finish_step(run_id, idx, StepOutcome::Cancelled, ACTION_GONE).await;
                return StepEnd::ActionGone;
            }
        };
        self.record_step(job, run_id, idx, step, description, &r, t0.elapsed(), run)
            .instrument(span)
            .await;
        StepEnd::Done(r)
    }

    /// A finished step: its history row, its metrics, its progress line, its report.
    #[allow(clippy::too_many_arguments)]
    async fn record_step(
        &self,
        job: &Job,
        run_id: i64,
        idx: usize,
        step: &Step,
        description: String,
        r: &Result<StepOutput, StepError>,
        elapsed: Duration,
        run: &mut RunReport,
    ) {
        let (outcome, detail) = match r {
            Ok(out) => (StepOutcome::Succeeded, clip(&out.detail, DETAIL_MAX)),
            Err(e) => (StepOutcome::Failed, clip(&e.to_string(), DETAIL_MAX)),
        };
        match r {
            Ok(_) => info!(%detail, "step succeeded"),
            Err(e) => warn!(error = %e, "step failed"),
        }
        if let Err(e) = self.store.finish_step(run_id, idx, outcome, &detail).await {
            warn!(error = %e, "could not record step result");
        }
        self.stats
            .step_finished(step.kind_name(), elapsed.as_secs_f64());
        job.tell(Progress::Finished {
            idx,
            outcome,
            detail: detail.clone(),
            elapsed,
        });
        run.steps.push(StepReport {
            kind: step.kind_name(),
            description,
            outcome,
            detail: clip(&detail, EVENT_DETAIL_MAX),
            duration_ms: elapsed.as_millis() as u64,
        });
    }
}
