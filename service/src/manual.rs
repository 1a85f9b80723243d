//! `provision <instance-id>`: the pipeline by hand, for one instance.
//!
//! Finds the instance's group (DescribeAutoScalingInstances), its layer, and whether a
//! lifecycle action is pending for it (`Pending:Wait` / `Terminating:Wait`); prints the plan;
//! then (unless `--dry-run`) runs the layer's steps through the same pipeline as the daemon
//! (same history, heartbeats, result event), showing progress, and completes the pending
//! action by instance id (unless `--no-complete`). There is no message, hence no token.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::aws::retry::with_backoff;
use crate::config::Config;
use crate::event::{Envelope, InstanceId, LifecycleEvent, Metadata, Transition};
use crate::pipeline::{Progress, RunOptions};

#[derive(Debug, Clone)]
pub struct Args {
    pub instance: String,
    pub dry_run: bool,
    pub no_complete: bool,
    pub layer: Option<String>,
    pub transition: Option<Transition>,
    pub hook: Option<String>,
}

pub async fn run(cfg: Config, args: Args) -> anyhow::Result<ExitCode> {
    let id = InstanceId::parse(&args.instance).map_err(|e| anyhow!("{e}"))?;
    let app = App::build(cfg).await?;
    let pipeline = app.pipeline.clone();
    let retry = pipeline.config().aws.retry_for;
    let hooks = pipeline.hooks().clone();

    let found = with_backoff(retry, || hooks.instance_group(&id))
        .await
        .context("looking up the instance's Auto Scaling group")?;
    let (group, state) = match &found {
        Some((g, s)) => (g.clone(), s.clone()),
        None if args.layer.is_some() => ("-".to_string(), "not in an Auto Scaling group".to_string()),
        None => bail!("{id} is not in an Auto Scaling group (or does not exist); pass --layer NAME to run a layer's steps on it anyway"),
    };
    let transition = args
        .transition
        .unwrap_or(if state.starts_with("Terminating") {
            Transition::Terminate
        } else {
            Transition::Launch
        });
    let waiting_state = match transition {
        Transition::Launch => "Pending:Wait",
        Transition::Terminate => "Terminating:Wait",
    };
    let pending = state == waiting_state;

    let group_hooks = if found.is_some() {
        with_backoff(retry, || hooks.describe_hooks(&group))
            .await
            .context("describing the group's lifecycle hooks")?
    } else {
        Vec::new()
    };
    let candidates: Vec<_> = group_hooks
        .iter()
        .filter(|(_, h)| h.transition == transition.aws_name())
        .collect();
    let hook = match &args.hook {
        Some(name) => Some(
            candidates
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| anyhow!("group {group} has no {transition} hook named {name:?}"))?,
        ),
        None if candidates.len() == 1 => Some(&candidates[0]),
        None if candidates.len() > 1 && pending && !args.no_complete => bail!(
            "group {group} has several {transition} hooks ({}); name the one to complete with --hook",
            candidates.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
        ),
        None => None,
    };
    let event = LifecycleEvent {
        instance_id: id.clone(),
        group: group.clone(),
        hook: hook.map(|(n, _)| n.clone()).unwrap_or_else(|| "-".into()),
        transition,
        token: format!("manual-{id}-{}", crate::store::now_ms()),
        origin: None,
        destination: None,
        metadata: Metadata::parse(hook.and_then(|(_, h)| h.notification_metadata.as_deref())),
        account_id: None,
        time: None,
        envelope: Envelope::Manual,
    };
    let layer = match &args.layer {
        Some(name) => pipeline
            .config()
            .layers
            .iter()
            .find(|l| &l.name == name)
            .ok_or_else(|| anyhow!("no layer named {name:?} in the config"))?,
        None => pipeline.route(&event).ok_or_else(|| {
            anyhow!("no layer matches group {group}; pass --layer NAME to choose one")
        })?,
    };
    let complete = pending && hook.is_some() && !args.no_complete;

    println!("instance   {id} in group {group} ({state})");
    println!(
        "layer      {}{}",
        layer.name,
        if args.layer.is_some() {
            " (chosen with --layer)"
        } else {
            ""
        }
    );
    println!("transition {transition}");
    for (i, line) in pipeline.preview(&event, layer).iter().enumerate() {
        println!("step {i}     {line}");
    }
    match (pending, hook, args.no_complete) {
        (true, Some((name, _)), false) => println!(
            "then       complete hook {name} by instance id: CONTINUE, or {} if a step fails",
            layer.on_failure
        ),
        (true, Some((name, _)), true) => {
            println!("then       leave the pending action of hook {name} as it is (--no-complete)")
        }
        _ => println!(
            "then       nothing to complete: no lifecycle action is pending for this {transition}"
        ),
    }
    if args.dry_run {
        println!("(dry run: nothing was changed)");
        return Ok(ExitCode::SUCCESS);
    }

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let opts = RunOptions {
        complete,
        heartbeat: pending,
        by_instance_id: true,
        progress: Some(tx),
    };
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        crate::shutdown::signal().await;
        stop.cancel();
    });
    let start = Instant::now();
    let printer = tokio::spawn(async move {
        use std::io::{IsTerminal as _, Write as _};
        // On a terminal the "still running" line updates in place; otherwise plain lines.
        let tty = std::io::stdout().is_terminal();
        let mut live = false;
        let mut current: Option<(usize, usize, String, Instant)> = None;
        let mut waiting = String::new();
        let mut tick = tokio::time::interval(Duration::from_secs(if tty { 1 } else { 5 }));
        tick.tick().await;
        let mut line = |text: String, transient: bool| {
            let mut out = std::io::stdout().lock();
            if live {
                let _ = write!(out, "\r\x1b[K");
            }
            if transient && tty {
                let _ = write!(out, "{text}");
                live = true;
            } else {
                let _ = writeln!(out, "{text}");
                live = false;
            }
            let _ = out.flush();
        };
        loop {
            let at = format!("[{:>6.1}s]", start.elapsed().as_secs_f64());
            tokio::select! {
                p = rx.recv() => match p {
                    Some(Progress::Started { idx, total, description }) => {
                        line(format!("{at} step {}/{total} {description}: running", idx + 1), false);
                        current = Some((idx, total, description, Instant::now()));
                        waiting.clear();
                    }
                    Some(Progress::Waiting { idx, what }) => {
                        line(format!("{at} step {}: {what}", idx + 1), false);
                        waiting = what;
                    }
                    Some(Progress::Finished { idx, outcome, detail, elapsed }) => {
                        let first = detail.lines().next().unwrap_or("");
                        line(format!("{at} step {} {outcome} in {:.1}s: {first}", idx + 1, elapsed.as_secs_f64()), false);
                        current = None;
                    }
                    None => {
                        if tty {
                            line(String::new(), true);
                        }
                        return;
                    }
                },
                _ = tick.tick() => if let Some((idx, total, d, since)) = &current {
                    let doing = if waiting.is_empty() { "still running".to_string() } else { format!("still {waiting}") };
                    line(format!("{at} step {}/{total} {d}: {doing} ({:.0}s)", idx + 1, since.elapsed().as_secs_f64()), true);
                },
            }
        }
    });
    let report = pipeline
        .handle_event(&event, None, Some(layer), &cancel, &opts)
        .await;
    drop(opts);
    let _ = printer.await;
    drop(pipeline);
    app.close().await;

    println!(
        "result     {} ({}){}",
        report.outcome,
        report
            .hook_result
            .as_deref()
            .unwrap_or("hook not completed"),
        report
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default()
    );
    if report.outcome == "succeeded" {
        Ok(ExitCode::SUCCESS)
    } else {
        println!("next       see `provision history --instance {id}` for each step's output; fix and run again (every step is safe to repeat)");
        Ok(ExitCode::from(1))
    }
}
