//! `provision reconcile [--dry-run]`: one pass per source, printed; and the daemon's log of a pass.

use std::process::ExitCode;
use std::time::Duration;

use tracing::{info, warn};

use super::{Act, Finding, Mode, Pass, Reconciler};
use crate::app::App;
use crate::config::Config;
use crate::pipeline::printable;

/// One pass per source (each in its account and region), printed: each finding and what
/// was done, the runs it started (awaited), and the AWS calls it made. An operator's pass
/// works what waits now: no grace period.
pub async fn run(cfg: Config, dry_run: bool) -> anyhow::Result<ExitCode> {
    let app = App::build(cfg).await?;
    let several = app.sources.len() > 1;
    let mut failed = false;
    for source in &app.sources {
        if several {
            println!(
                "source {} (account {}, region {})",
                source.name, source.scope.account, source.scope.region
            );
        }
        match one_pass(source.pipeline.clone(), dry_run).await {
            Ok(f) => failed |= f,
            Err(e) if several => {
                println!("error         this source cannot be reconciled: {e:#}");
                failed = true;
            }
            Err(e) => return Err(e),
        }
    }
    if dry_run {
        println!("(dry run: nothing was changed)");
    }
    app.close().await;
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// One source's pass, printed; true when something failed.
async fn one_pass(
    pipeline: std::sync::Arc<crate::pipeline::Pipeline>,
    dry_run: bool,
) -> anyhow::Result<bool> {
    let reconciler = Reconciler::new(pipeline);
    let mode = Mode {
        grace: Duration::ZERO,
        dry_run,
    };
    let mut pass = reconciler.pass(mode).await?;
    println!(
        "{:<13} {:<20} {:<18} {:<22} {:<12} what",
        "kind", "instance", "group", "state", "layer"
    );
    for f in &pass.findings {
        println!("{}", line(f, dry_run));
    }
    if pass.findings.is_empty() {
        println!("(nothing to reconcile: every action waiting is worked, every instance in service configured)");
    }
    let mut failed = pass
        .findings
        .iter()
        .any(|f| matches!(f.act, Act::Failed(_)));
    for (_, task) in std::mem::take(&mut pass.started) {
        match task.await {
            Ok(r) => {
                let result = r.hook_result.map_or("hook not completed", |c| c.as_str());
                let error = r.error.as_deref().map(|e| format!(": {}", printable(e)));
                println!(
                    "result        {:<20} {} ({result}){}",
                    r.instance_id,
                    r.outcome,
                    error.unwrap_or_default()
                );
                failed |= !r.outcome.is_success();
            }
            Err(e) => {
                println!("result        a run ended abnormally: {e}");
                failed = true;
            }
        }
    }
    println!("aws calls     {}", calls(&pass));
    Ok(failed)
}

/// One finding as a table row.
fn line(f: &Finding, dry_run: bool) -> String {
    let what = match (&f.act, dry_run) {
        (Act::InProgress(who), _) => format!("in progress ({who})"),
        (Act::Grace(left), _) => format!(
            "left to its message for {} more",
            humantime::format_duration(Duration::from_secs(left.as_secs()))
        ),
        (Act::NoHook(why), _) => format!("left alone: {why}"),
        (Act::Work, true) => "would work it as `provision <instance-id>` does".into(),
        (Act::Work, false) => "working it as `provision <instance-id>` does".into(),
        (Act::Report, true) => "would report it".into(),
        (Act::Report, false) => "reported".into(),
        (Act::Configure, true) => "would run its launch steps".into(),
        (Act::Configure, false) => "running its launch steps".into(),
        (Act::Replace, true) => "would mark it unhealthy (replaced through the launch hook)".into(),
        (Act::Replace, false) => "marked unhealthy (replaced through the launch hook)".into(),
        (Act::Decommission(not_run), dry) => format!(
            "{} its terminate steps that need no instance{}",
            if dry { "would run" } else { "running" },
            not_run_list(not_run)
        ),
        (Act::NotRun(not_run), _) => format!(
            "reported: no terminate step can act without the instance{}",
            not_run_list(not_run)
        ),
        (Act::Failed(e), _) => format!("failed: {}", printable(e)),
    };
    format!(
        "{:<13} {:<20} {:<18} {:<22} {:<12} {what}",
        f.kind.as_str(),
        f.instance,
        f.group,
        f.state.as_str(),
        f.layer
    )
}

/// "; not run: a; b", or nothing.
fn not_run_list(steps: &[String]) -> String {
    if steps.is_empty() {
        String::new()
    } else {
        format!("; not run: {}", printable(&steps.join("; ")))
    }
}

/// "N (op n, ...)".
fn calls(pass: &Pass) -> String {
    let total: u64 = pass.calls.values().sum();
    let each: Vec<String> = pass
        .calls
        .iter()
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    format!("{total} ({})", each.join(", "))
}

/// The daemon's log of a pass: a line per finding that is acted on or stuck, and the
/// pass's call count.
pub(super) fn log(pass: &Pass) {
    for f in &pass.findings {
        match &f.act {
            Act::Grace(_) | Act::InProgress(_) => {}
            Act::Failed(e) => {
                warn!(instance_id = %f.instance, group = %f.group, kind = f.kind.as_str(), error = %e, "reconcile: could not act")
            }
            _ => {
                info!(instance_id = %f.instance, group = %f.group, kind = f.kind.as_str(), state = %f.state, what = %line(f, false), "reconcile")
            }
        }
    }
    info!(
        findings = pass.findings.len(),
        started = pass.started.len(),
        aws_calls = %calls(pass),
        "reconcile pass done"
    );
}
