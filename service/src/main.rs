//! The `provision` command line: `<instance-id>` (instance) | daemon | worker | lambda |
//! event parse | check | history. What the commands and options are is `cli.rs` (in the
//! library, so the man page and the shell completions are generated from the same
//! definitions).

use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;

use provision::app::App;
use provision::cli::{Cli, Command, EventCommand};
use provision::config::{self, Config};
use provision::daemon::{self, Mode, Summary};
use provision::event::{self, Parsed};
use provision::metrics::Stats;
use provision::store::Store;
use provision::systemd::SystemdNotify;
use provision::telemetry;

/// `provision i-0123…` is short for `provision instance i-0123…`.
fn args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut i = 1;
    while i < args.len() {
        let a = args[i].to_string_lossy();
        if a == "--config" || a == "--log-format" {
            i += 2;
            continue;
        }
        if !a.starts_with('-') {
            if a.starts_with("i-") {
                args.insert(i, "instance".into());
            }
            break;
        }
        i += 1;
    }
    args
}

fn main() -> ExitCode {
    // First, while single-threaded: no child may inherit AWS credentials from us.
    provision::secret::scrub_environment();
    let args = args();
    // `provision generate-docs DIR` (scripts/package) is not in cli.rs: the man page and the
    // completions generated from cli.rs would list it (clap_complete offers even hidden
    // subcommands).
    if args.get(1).is_some_and(|a| a == "generate-docs") {
        return provision::docs::run(&args[2..]);
    }
    let cli = Cli::parse_from(args);
    telemetry::init(cli.log_format, cli.verbose);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("provision: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The runtime every async command runs on: two workers (the machine size this is built
/// for); blocking threads serve SQLite calls.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn load_config(flag: Option<&std::path::Path>) -> anyhow::Result<Config> {
    let path = config::resolve_path(flag);
    Ok(Config::load(&path)?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Event(EventCommand::Parse { file }) => parse_event(&file),
        Command::History {
            instance,
            limit,
            json,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            history(&cfg, instance.as_deref(), limit, json)
        }
        Command::Check { aws } => check(load_config(cli.config.as_deref())?, aws),
        Command::Instance {
            id,
            dry_run,
            no_complete,
            layer,
            transition,
            hook,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            let args = provision::instance::Args {
                instance: id,
                dry_run,
                no_complete,
                layer,
                transition,
                hook,
            };
            let rt = runtime()?;
            rt.block_on(provision::instance::run(cfg, args))
        }
        Command::Daemon => serve(load_config(cli.config.as_deref())?, Mode::Daemon),
        Command::Reconcile { dry_run } => {
            let cfg = load_config(cli.config.as_deref())?;
            runtime()?.block_on(provision::reconcile::command(cfg, dry_run))
        }
        Command::Worker => serve(load_config(cli.config.as_deref())?, Mode::Drain),
        Command::Lambda => lambda(cli.config.as_deref()),
    }
}

fn check(cfg: Config, aws: bool) -> anyhow::Result<ExitCode> {
    let mut report = provision::check::offline(&cfg);
    let rt = runtime()?;
    rt.block_on(provision::check::playbooks(&cfg, aws, &mut report));
    if aws {
        rt.block_on(provision::check::with_aws(&cfg, &mut report));
    }
    println!("config: {} layer(s), every key valid", cfg.layers.len());
    for n in &report.notes {
        println!("note: {n}");
    }
    for p in &report.problems {
        println!("problem: {p}");
    }
    if report.problems.is_empty() {
        println!("ok");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} problem(s)", report.problems.len());
        Ok(ExitCode::from(1))
    }
}

fn parse_event(file: &str) -> anyhow::Result<ExitCode> {
    let mut body = String::new();
    if file == "-" {
        std::io::stdin()
            .read_to_string(&mut body)
            .context("reading stdin")?;
    } else {
        body = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    }
    let (out, code) = match event::parse(&body) {
        Parsed::Event(e) => (
            serde_json::json!({ "outcome": "event", "phase": e.phase(), "event": e }),
            0,
        ),
        Parsed::Interruption(i) => (
            serde_json::json!({ "outcome": "interruption", "interruption": i }),
            0,
        ),
        Parsed::Skip(s) => (
            serde_json::json!({ "outcome": "skip", "reason": s.to_string() }),
            0,
        ),
        Parsed::Reject(r) => (
            serde_json::json!({ "outcome": "reject", "reason": r.to_string() }),
            1,
        ),
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::from(code))
}

fn history(
    cfg: &Config,
    instance: Option<&str>,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if !cfg.state.path.exists() {
        anyhow::bail!(
            "no history yet: {} does not exist",
            cfg.state.path.display()
        );
    }
    let store = Store::open(&cfg.state.path)?;
    let runs = store.history(instance, limit)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
        return Ok(ExitCode::SUCCESS);
    }
    let ts = |ms: i64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
        )
        .to_string()
    };
    // Everything but the fixed columns may hold text from instances or messages: shown
    // escaped, never obeyed by the terminal.
    let text = |s: Option<&str>| provision::pipeline::printable(s.unwrap_or(""));
    println!(
        "{:>6}  {:<20}  {:<19}  {:<10}  {:<12}  {:<10}  {:<16}  ERROR / CAUSE",
        "RUN", "STARTED", "INSTANCE", "TRANSITION", "LAYER", "OUTCOME", "HOOK"
    );
    for r in &runs {
        let why = match (&r.error, &r.cause) {
            (Some(e), _) => text(Some(e)),
            (None, Some(c)) => format!(
                "{}: {}",
                r.decision.map_or("-", |d| d.as_str()),
                text(Some(c))
            ),
            (None, None) => String::new(),
        };
        println!(
            "{:>6}  {:<20}  {:<19}  {:<10}  {:<12}  {:<10}  {:<16}  {why}",
            r.id,
            ts(r.received_at),
            text(r.instance_id.as_deref().or(Some("-"))),
            text(r.transition.as_deref().or(Some("-"))),
            text(r.layer.as_deref().or(Some("-"))),
            r.outcome.as_str(),
            r.hook_result.map_or("-", |c| c.as_str()),
        );
        for s in &r.steps {
            let ms = s.finished_at.map(|f| f - s.started_at).unwrap_or(0);
            println!(
                "{:>6}  step {} {:<9} {:>6} ms  {}  {}",
                "",
                s.idx,
                s.outcome,
                ms,
                text(Some(&s.description)),
                text(s.detail.as_deref())
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Serves Lambda invocations until the process is stopped; startup problems (the config
/// included) are posted to the Runtime API's /runtime/init/error and exit 2.
fn lambda(flag: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    rt.block_on(async {
        let cfg = match load_config(flag) {
            Ok(cfg) => cfg,
            Err(e) => {
                provision::lambda::report_init_error(&format!("{e:#}")).await;
                return Err(e);
            }
        };
        provision::lambda::run(cfg).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn serve(cfg: Config, mode: Mode) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let metrics_listen = cfg.metrics_listen;
    let reconcile_every = cfg.reconcile.interval.filter(|_| mode == Mode::Daemon);
    let shutdown_grace = cfg.daemon.shutdown_grace;
    rt.block_on(async move {
        let app = App::build(cfg).await?;
        let reconcile = reconcile_every.map(|every| {
            let stop = tokio_util::sync::CancellationToken::new();
            let r = provision::reconcile::Reconciler::new(app.pipeline.clone());
            let stopped = stop.clone();
            let task = tokio::spawn(async move { r.run_every(every, shutdown_grace, stopped).await });
            (stop, task)
        });
        tracing::info!(max_in_flight = app.settings.max_in_flight, mode = ?mode, "provision started");
        let systemd = Arc::new(SystemdNotify::from_env());
        let stats = app.pipeline.stats.clone();
        let alive_within = (app.settings.wait_time * 3).max(Duration::from_secs(60));
        let health = tokio::spawn(report_health(systemd.clone(), stats.clone(), alive_within));
        let housekeeping = match mode {
            Mode::Daemon => app.spawn_housekeeping(),
            _ => None,
        };
        let endpoint = match (mode, metrics_listen) {
            (Mode::Daemon, Some(addr)) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => {
                    let addr = l.local_addr().unwrap_or(addr); // the port picked for port 0
                    tracing::info!(%addr, "serving /metrics and /healthz");
                    Some(tokio::spawn(provision::endpoint::serve(l, stats.clone(), alive_within)))
                }
                Err(e) => {
                    tracing::error!(%addr, error = %e, "cannot serve metrics (metrics.listen); continuing without them");
                    None
                }
            },
            _ => None,
        };
        let shutdown = {
            let systemd = systemd.clone();
            // The reconciler stops with the receive loop; its runs get the same grace.
            let stop_reconcile = reconcile.as_ref().map(|(stop, _)| stop.clone());
            async move {
                provision::shutdown::signal().await;
                systemd.stopping();
                if let Some(stop) = stop_reconcile {
                    stop.cancel();
                }
            }
        };
        let summary = daemon::run(app.pipeline.clone(), app.queue.clone(), app.settings.clone(), mode, shutdown).await;
        if let Some((stop, task)) = reconcile {
            stop.cancel();
            let _ = task.await;
        }
        health.abort();
        if let Some(h) = housekeeping {
            h.abort();
        }
        if let Some(e) = endpoint {
            e.abort();
        }
        let stats = app.pipeline.stats.clone();
        app.close().await;
        log_summary(&summary, &stats);
        Ok(match mode {
            Mode::Drain if !summary.all_handled() => ExitCode::from(1),
            _ => ExitCode::SUCCESS,
        })
    })
}

/// Tells systemd the service is ready after the first successful poll, and pings its
/// watchdog only while the receive loop shows it is alive.
async fn report_health(systemd: Arc<SystemdNotify>, stats: Arc<Stats>, alive_within: Duration) {
    if !systemd.enabled() {
        return;
    }
    while Stats::get(&stats.last_poll_ms) == 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    systemd.ready();
    let Some(every) = systemd.watchdog_every else {
        return;
    };
    loop {
        if stats.loop_is_alive(alive_within) {
            systemd.watchdog();
        } else {
            tracing::error!("the receive loop has not shown life for {alive_within:?}; not pinging the watchdog");
        }
        tokio::time::sleep(every).await;
    }
}

fn log_summary(s: &Summary, stats: &Stats) {
    tracing::info!(
        received = s.received,
        deleted = s.deleted,
        released = s.released,
        ack_errors = s.ack_errors,
        receive_errors = s.receive_errors,
        succeeded = Stats::get(&stats.succeeded),
        failed = Stats::get(&stats.failed),
        skipped = Stats::get(&stats.skipped),
        rejected = Stats::get(&stats.rejected),
        unmatched = Stats::get(&stats.unmatched),
        duplicates = Stats::get(&stats.duplicates),
        released = Stats::get(&stats.released),
        heartbeats = Stats::get(&stats.heartbeats),
        peak_rss_kib = peak_rss_kib(),
        "stopped"
    );
}

/// This process's peak resident memory (VmHWM), for the exit summary.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
