//! `provision instance <id>` (or `provision <id>`): the pipeline by hand, for one instance.
//!
//! Finds the instance's group (DescribeAutoScalingInstances, which lists warm pool instances
//! too), its layer, and whether a lifecycle action is pending for it (`Pending:Wait`,
//! `Terminating:Wait`, and in a warm pool `Warmed:Pending:Wait` entering or returning to it,
//! `Warmed:Terminating:Wait`); prints the plan;
//! then (unless `--dry-run`) runs the layer's steps through the same pipeline as the daemon
//! (same history, heartbeats, result event), showing progress, and completes the pending
//! action by instance id (unless `--no-complete`). There is no message, hence no token and
//! nothing to acknowledge: the run is a [`Job`] handed straight to the pipeline.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::{App, Purpose};
use crate::aws::{Action, HookInfo, LifecycleState};
use crate::clock::now_ms;
use crate::config::Config;
use crate::event::{Envelope, InstanceId, LifecycleEvent, Metadata, Phase, Place, Transition};
use crate::layer::Layer;
use crate::pipeline::{printable, Finish, Job, Pipeline, Progress, RunReport, Trust};
use crate::retry::with_backoff;

/// A line on standard output. A reader that went away (`provision i-… | head`) does not stop
/// the run: its story is in the history too.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

#[derive(Debug, Clone)]
pub struct Args {
    pub instance: String,
    pub dry_run: bool,
    pub no_complete: bool,
    pub layer: Option<String>,
    pub transition: Option<Transition>,
    pub hook: Option<String>,
    /// The source (account, region, role) to act in; None: the first.
    pub source: Option<String>,
}

/// What Auto Scaling says about the instance, and the hook to complete.
pub(crate) struct Found {
    pub(crate) id: InstanceId,
    pub(crate) group: String,
    /// None: in no group (run with --layer).
    pub(crate) state: Option<LifecycleState>,
    pub(crate) transition: Transition,
    /// The transition read with the instance's state (warm pool or not).
    pub(crate) phase: Phase,
    /// A lifecycle action of `phase` waits for this instance.
    pub(crate) pending: bool,
    pub(crate) hook: Option<(String, HookInfo)>,
}

pub async fn run(cfg: Config, args: Args) -> anyhow::Result<ExitCode> {
    let id = InstanceId::parse(&args.instance).map_err(|e| anyhow!("{e}"))?;
    let purpose = if args.dry_run {
        Purpose::Plan
    } else {
        Purpose::Run
    };
    let app = App::build_for(cfg, purpose).await?;
    let pipeline = match &args.source {
        None => app.pipeline.clone(),
        Some(name) => {
            let names: Vec<&str> = app.sources.iter().map(|s| s.name.as_str()).collect();
            app.sources
                .iter()
                .find(|s| &s.name == name)
                .map(|s| s.pipeline.clone())
                .ok_or_else(|| {
                    anyhow!("--source {name:?}: no such source; the config has {names:?}")
                })?
        }
    };
    let found = find(&pipeline, id, &args).await?;
    let job = job(&found, &args);
    let layer = match &args.layer {
        Some(name) => pipeline
            .layer_named(name)
            .ok_or_else(|| anyhow!("no layer named {name:?} in the config"))?,
        None => pipeline.route(&job.event).ok_or_else(|| {
            anyhow!(
                "no layer matches group {}; pass --layer NAME to choose one",
                found.group
            )
        })?,
    };
    print_plan(&pipeline, &found, &job, &layer, &args);
    if args.dry_run {
        say!("(dry run: nothing was changed)");
        return Ok(ExitCode::SUCCESS);
    }
    let report = execute(&pipeline, job).await;
    drop(pipeline);
    app.close().await;
    Ok(print_result(&found.id, &report))
}

/// The instance's group and state, the transition to run, and the hook to complete.
async fn find(pipeline: &Pipeline, id: InstanceId, args: &Args) -> anyhow::Result<Found> {
    let retry = pipeline.config().aws.retry_for;
    let hooks = pipeline.hooks().clone();
    let membership = with_backoff(retry, || hooks.membership(&id))
        .await
        .context("looking up the instance's Auto Scaling group")?;
    let (group, state) = match &membership {
        Some(m) => (m.group.clone(), Some(m.state.clone())),
        None if args.layer.is_some() => ("-".to_string(), None),
        None => bail!("{id} is not in an Auto Scaling group (or does not exist); pass --layer NAME to run a layer's steps on it anyway"),
    };
    let transition = args.transition.unwrap_or(
        if state.as_ref().is_some_and(LifecycleState::is_terminating) {
            Transition::Terminate
        } else {
            Transition::Launch
        },
    );
    let phase = phase_of(state.as_ref(), transition);
    let pending = state.as_ref().is_some_and(|s| s.waits_for(phase));
    let group_hooks = match membership {
        Some(_) => with_backoff(retry, || hooks.describe_hooks(&group))
            .await
            .context("describing the group's lifecycle hooks")?,
        None => Vec::new(),
    };
    let mut candidates: Vec<(String, HookInfo)> = group_hooks
        .into_iter()
        .filter(|(_, h)| h.transition == transition)
        .collect();
    let hook = match &args.hook {
        Some(name) => Some(
            candidates
                .iter()
                .find(|(n, _)| n == name)
                .cloned()
                .ok_or_else(|| anyhow!("group {group} has no {transition} hook named {name:?}"))?,
        ),
        None if candidates.len() == 1 => candidates.pop(),
        None if candidates.len() > 1 && pending && !args.no_complete => bail!(
            "group {group} has several {transition} hooks ({}); name the one to complete with --hook",
            candidates.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
        ),
        None => None,
    };
    Ok(Found {
        id,
        group,
        state,
        transition,
        phase,
        pending,
        hook,
    })
}

/// What running `transition` means for an instance in lifecycle state `state`: in the warm
/// pool, `Warmed:Pending:Wait` is entering it (launch) or returning to it (terminate), and
/// a launch run on a pool instance (`Warmed:Stopped`, ...) runs what entering it runs.
/// (`Pending:Wait` reads as a plain launch: Auto Scaling does not say whether the instance
/// comes from the pool.)
pub(crate) fn phase_of(state: Option<&LifecycleState>, transition: Transition) -> Phase {
    match (transition, state) {
        (Transition::Launch, Some(s)) if s.is_warmed() => Phase::PoolEnter,
        (Transition::Launch, _) => Phase::Launch,
        (Transition::Terminate, Some(LifecycleState::WarmedPendingWait)) => Phase::PoolReturn,
        (Transition::Terminate, _) => Phase::Terminate,
    }
}

/// The Origin and Destination a hook's message would carry for this phase and state.
fn places(phase: Phase, state: Option<&LifecycleState>) -> (Place, Place) {
    match phase {
        Phase::Launch => (Place::Ec2, Place::AutoScalingGroup),
        Phase::PoolEnter => (Place::Ec2, Place::WarmPool),
        Phase::PoolLeave => (Place::WarmPool, Place::AutoScalingGroup),
        Phase::PoolReturn => (Place::AutoScalingGroup, Place::WarmPool),
        Phase::Terminate if state.is_some_and(LifecycleState::is_warmed) => {
            (Place::WarmPool, Place::Ec2)
        }
        Phase::Terminate => (Place::AutoScalingGroup, Place::Ec2),
    }
}

/// The pipeline's job: the instance's event as the hook would describe it, its pending
/// action addressed by instance id (there is no token), completed unless told otherwise.
fn job(found: &Found, args: &Args) -> Job {
    let finish = if args.no_complete {
        Finish::Leave
    } else {
        Finish::Complete
    };
    let mut job = job_for(found, Envelope::Manual, finish);
    job.layer = args.layer.clone();
    job
}

/// The job for an instance found in Auto Scaling (by hand or by the reconciler): its event
/// as the hook would describe it, with the hook's own metadata, and its pending action, if
/// any, addressed by instance id.
pub(crate) fn job_for(found: &Found, envelope: Envelope, finish: Finish) -> Job {
    let hook_name = found.hook.as_ref().map(|(n, _)| n.clone());
    let (origin, destination) = places(found.phase, found.state.as_ref());
    let source = match envelope {
        Envelope::Reconcile => "reconcile",
        _ => "manual",
    };
    let event = LifecycleEvent {
        instance_id: found.id.clone(),
        group: found.group.clone(),
        hook: hook_name.clone().unwrap_or_else(|| "-".into()),
        transition: found.transition,
        token: format!("{source}-{}-{}", found.id, now_ms()),
        origin: Some(origin),
        destination: Some(destination),
        metadata: Metadata::parse(
            found
                .hook
                .as_ref()
                .and_then(|(_, h)| h.notification_metadata.as_deref()),
        ),
        account_id: None,
        time: None,
        envelope,
    };
    let action = match (found.pending, hook_name) {
        (true, Some(hook)) => Some(Action {
            group: found.group.clone(),
            hook,
            instance_id: found.id.clone(),
            token: None,
        }),
        _ => None,
    };
    Job {
        event,
        message_id: None,
        layer: None,
        action,
        finish,
        progress: None,
        trust: Trust::FromAutoScaling,
        instance_gone: false,
        interrupt: false,
    }
}

fn print_plan(pipeline: &Pipeline, found: &Found, job: &Job, layer: &Layer, args: &Args) {
    let chosen = if args.layer.is_some() {
        " (chosen with --layer)"
    } else {
        ""
    };
    say!(
        "instance   {} in group {} ({})",
        found.id,
        found.group,
        found
            .state
            .as_ref()
            .map_or("not in an Auto Scaling group", LifecycleState::as_str)
    );
    say!("layer      {}{chosen}", layer.name);
    if found.phase.as_str() == found.transition.as_str() {
        say!("transition {}", found.transition);
    } else {
        say!("transition {} ({})", found.transition, found.phase);
    }
    for (i, line) in pipeline.preview(&job.event, layer).iter().enumerate() {
        say!("step {i}     {line}");
    }
    match (&job.action, job.finish) {
        (Some(a), Finish::Complete) => say!(
            "then       complete hook {} by instance id: CONTINUE, or {} if a step fails",
            a.hook,
            layer.on_failure
        ),
        (Some(a), Finish::Leave) => say!(
            "then       leave the pending action of hook {} as it is (--no-complete)",
            a.hook
        ),
        (None, _) => say!(
            "then       nothing to complete: no lifecycle action is pending for this {}",
            found.transition
        ),
    }
}

/// Runs the job, printing progress until it ends; Ctrl-C cancels it.
async fn execute(pipeline: &Pipeline, mut job: Job) -> RunReport {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    job.progress = Some(tx);
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        crate::shutdown::signal().await;
        stop.cancel();
    });
    let printer = tokio::spawn(print_progress(rx, Instant::now()));
    // No message to keep hidden: the lease only heartbeats the action.
    let lease = pipeline.leases().hold(None, Instant::now());
    let report = pipeline.run(job, &lease, &cancel).await;
    drop(lease);
    let _ = printer.await;
    report
}

/// Prints each step's start, waits and end; on a terminal a "still running" line updates
/// in place, elsewhere plain lines every few seconds.
async fn print_progress(mut rx: UnboundedReceiver<Progress>, start: Instant) {
    use std::io::IsTerminal as _;
    let mut out = Screen {
        tty: std::io::stdout().is_terminal(),
        live: false,
    };
    let mut current: Option<(usize, usize, String, Instant)> = None;
    let mut waiting = String::new();
    let every = Duration::from_secs(if out.tty { 1 } else { 5 });
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        let at = format!("[{:>6.1}s]", start.elapsed().as_secs_f64());
        tokio::select! {
            p = rx.recv() => match p {
                Some(Progress::Started { idx, total, description }) => {
                    out.line(format!("{at} step {}/{total} {description}: running", idx + 1), false);
                    current = Some((idx, total, description, Instant::now()));
                    waiting.clear();
                }
                Some(Progress::Waiting { idx, what }) => {
                    let what = printable(&what);
                    out.line(format!("{at} step {}: {what}", idx + 1), false);
                    waiting = what;
                }
                Some(Progress::Finished { idx, outcome, detail, elapsed }) => {
                    let first = printable(detail.lines().next().unwrap_or(""));
                    out.line(format!("{at} step {} {outcome} in {:.1}s: {first}", idx + 1, elapsed.as_secs_f64()), false);
                    current = None;
                }
                None => return out.end(),
            },
            _ = tick.tick() => if let Some((idx, total, d, since)) = &current {
                let doing = if waiting.is_empty() { "still running".to_string() } else { format!("still {waiting}") };
                out.line(format!("{at} step {}/{total} {d}: {doing} ({:.0}s)", idx + 1, since.elapsed().as_secs_f64()), true);
            },
        }
    }
}

/// Standard output, with one line that may be rewritten in place on a terminal.
struct Screen {
    tty: bool,
    /// The last line written is a transient one (no newline yet).
    live: bool,
}

impl Screen {
    fn line(&mut self, text: String, transient: bool) {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        if self.live {
            let _ = write!(out, "\r\x1b[K");
        }
        if transient && self.tty {
            let _ = write!(out, "{text}");
            self.live = true;
        } else {
            let _ = writeln!(out, "{text}");
            self.live = false;
        }
        let _ = out.flush();
    }

    fn end(&mut self) {
        if self.tty {
            self.line(String::new(), true);
        }
    }
}

fn print_result(id: &InstanceId, report: &RunReport) -> ExitCode {
    say!(
        "result     {} ({}){}",
        report.outcome,
        report
            .hook_result
            .map(|c| c.as_str())
            .unwrap_or("hook not completed"),
        report
            .error
            .as_deref()
            .map(|e| format!(": {}", printable(e)))
            .unwrap_or_default()
    );
    if report.outcome.is_success() {
        ExitCode::SUCCESS
    } else {
        say!("next       see `provision history --instance {id}` for each step's output; fix and run again (every step is safe to repeat)");
        ExitCode::from(1)
    }
}
