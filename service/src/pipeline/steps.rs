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
use super::run::{End, Run};
use super::{Job, StepReport};
use crate::event::Transition;
use crate::layer::Layer;
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
    /// Shutdown, a deadline, or the claim taken over: the run is released.
    Stopped,
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

impl Run<'_> {
    /// Runs the layer's steps in order, stopping at the first failure: the hook result to
    /// complete with. `stop` fires when the run must stop (shutdown, or the claim lost).
    pub(super) async fn run_steps(
        &mut self,
        layer: &Layer,
        stop: &CancellationToken,
    ) -> Result<HookResult, End> {
        let steps = self.steps_to_run(layer);
        let deadline = self.spot_deadline().await;
        for (idx, &step) in steps.iter().enumerate() {
            let at = At {
                idx,
                total: steps.len(),
            };
            let cut = deadline.and_then(|d| cut_to(step, d));
            let step = cut.as_ref().unwrap_or(step);
            let failure = match self.run_step(layer, at, step, stop).await {
                StepEnd::Done(Ok(_)) => continue,
                StepEnd::Done(Err(e)) if cut.is_some() => format!(
                    "{e} (its timeout was cut to the Spot interruption deadline {})",
                    self.deadline.as_deref().unwrap_or_default()
                ),
                StepEnd::Done(Err(e)) => e.to_string(),
                StepEnd::ActionGone => ACTION_GONE.to_string(),
                StepEnd::Stopped => return Err(self.stopped()),
            };
            self.report.outcome = Outcome::Failed;
            self.report.error = Some(format!("step {idx} ({}): {failure}", step.kind_name()));
            return Ok(layer.on_failure);
        }
        Ok(HookResult::Continue)
    }

    /// The steps this run runs: the layer's `interrupt` list for a Spot interruption, else
    /// its phase's; for an instance that is gone, only those that act without it (the
    /// others named in the run's note).
    fn steps_to_run<'l>(&mut self, layer: &'l Layer) -> Vec<&'l Step> {
        let all = if self.job.interrupt {
            &layer.interrupt[..]
        } else {
            layer.steps(self.job.event.phase())
        };
        let steps: Vec<&Step> = all
            .iter()
            .filter(|s| !self.job.instance_gone || s.acts_without_instance())
            .collect();
        if steps.len() < all.len() {
            let skipped: Vec<String> = all
                .iter()
                .filter(|s| !s.acts_without_instance())
                .map(Step::describe)
                .collect();
            self.report.note = Some(format!(
                "reconciled: the instance is gone; steps that need it were not run: {}",
                skipped.join("; ")
            ));
        }
        steps
    }

    /// The Spot interruption deadline of the instance a terminate (or interrupt) run
    /// works, when EC2 warned of one: kept for `{deadline}`, and said in the run's note.
    async fn spot_deadline(&mut self) -> Option<i64> {
        if self.job.event.transition != Transition::Terminate {
            return None;
        }
        let deadline = self.p.deadline_of(&self.job.event.instance_id).await?;
        let at = crate::clock::rfc3339(deadline);
        info!(deadline = %at, "Spot interruption: every step's timeout is cut to the deadline");
        self.report.note = Some(format!(
            "Spot interruption: the instance goes at {at}; each step's timeout was cut to what was left"
        ));
        self.deadline = Some(at);
        Some(deadline)
    }

    /// One step: recorded, timed, reported.
    async fn run_step(
        &mut self,
        layer: &Layer,
        at: At,
        step: &Step,
        stop: &CancellationToken,
    ) -> StepEnd {
        let (p, job, run_id) = (self.p, &self.job, self.report.run_id.unwrap_or_default());
        let last_note = Mutex::new(String::new());
        let note = |what: String| {
            let mut last = last_note.lock().unwrap();
            if *last != what {
                debug!(%what, "waiting");
                *last = what.clone();
                job.tell(Progress::Waiting { idx: at.idx, what });
            }
        };
        let ctx = StepContext {
            template: Context::new(&job.event, &layer.name, &layer.vars)
                .with_deadline(self.deadline.as_deref()),
            services: &p.services,
            shared: &p.shared,
            retry_for: p.cfg.aws.retry_for,
            ssh: &layer.ssh,
            note: &note,
        };
        let description = step.describe();
        let span = info_span!("step", idx = at.idx, kind = step.kind_name());
        let store = &p.store;
        if let Err(e) = store
            .start_step(run_id, at.idx, step.kind_name(), &description)
            .await
        {
            warn!(error = %e, "could not record step start");
        }
        job.tell(Progress::Started {
            idx: at.idx,
            total: at.total,
            description: description.clone(),
        });
        let t0 = Instant::now();
        let r = tokio::select! {
            r = step.run(&ctx).instrument(span.clone()) => r,
            _ = stop.cancelled() => {
                let why = match self.stopped() {
                    End::ClaimLost(lost) => lost.to_string(),
                    _ => "shutdown".to_string(),
                };
                let _ = store.finish_step(run_id, at.idx, StepOutcome::Cancelled, &why).await;
                return StepEnd::Stopped;
            }
            _ = self.lease.gone().cancelled() => {
                warn!("{ACTION_GONE}");
                let _ = store.finish_step(run_id, at.idx, StepOutcome::Cancelled, ACTION_GONE).await;
                return StepEnd::ActionGone;
            }
        };
        let finished = Finished {
            at,
            kind: step.kind_name(),
            description,
            elapsed: t0.elapsed(),
        };
        self.record_step(finished, &r).instrument(span).await;
        StepEnd::Done(r)
    }

    /// A finished step: its history row, its metrics, its progress line, its report.
    async fn record_step(&mut self, step: Finished, r: &Result<StepOutput, StepError>) {
        let (outcome, detail) = match r {
            Ok(out) => (StepOutcome::Succeeded, clip(&out.detail, DETAIL_MAX)),
            Err(e) => (StepOutcome::Failed, clip(&e.to_string(), DETAIL_MAX)),
        };
        match r {
            Ok(_) => info!(%detail, "step succeeded"),
            Err(e) => warn!(error = %e, "step failed"),
        }
        let run_id = self.report.run_id.unwrap_or_default();
        let p = self.p;
        if let Err(e) = p
            .store
            .finish_step(run_id, step.at.idx, outcome, &detail)
            .await
        {
            warn!(error = %e, "could not record step result");
        }
        p.stats.step_finished(step.kind, step.elapsed.as_secs_f64());
        self.job.tell(Progress::Finished {
            idx: step.at.idx,
            outcome,
            detail: detail.clone(),
            elapsed: step.elapsed,
        });
        self.report.steps.push(StepReport {
            kind: step.kind,
            description: step.description,
            outcome,
            detail: clip(&detail, EVENT_DETAIL_MAX),
            duration_ms: step.elapsed.as_millis() as u64,
        });
    }
}

/// Which step of how many.
#[derive(Debug, Clone, Copy)]
struct At {
    idx: usize,
    total: usize,
}

/// A step that ran to its end, for the record.
struct Finished {
    at: At,
    kind: &'static str,
    description: String,
    elapsed: Duration,
}

/// `step` with its timeout cut to what is left until `deadline` (ms since the epoch), when
/// that is shorter.
fn cut_to(step: &Step, deadline: i64) -> Option<Step> {
    let left = Duration::from_millis((deadline - crate::clock::now_ms()).max(1) as u64);
    (left < step.timeout).then(|| Step {
        timeout: left,
        ..step.clone()
    })
}
