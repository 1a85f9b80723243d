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
use provision::daemon::{Mode, Summary};
use provision::event::{self, Parsed};
use provision::metrics::{Registry, Stats};
use provision::store::{HistoryFilter, Store};
use provision::systemd::SystemdNotify;
use provision::telemetry;

/// `provision i-0123…` is short for `provision instance i-0123…`; the binary named
/// `bootstrap` with no arguments (Lambda's custom runtime starts `/var/task/bootstrap` so)
/// is `provision --log-format json --config <its directory>/provision.toml lambda`, the
/// config being `$PROVISION_CONFIG` when that is set.
fn args() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let exe = args.first().map(std::path::PathBuf::from);
    if args.len() == 1 && exe.as_ref().and_then(|p| p.file_name()) == Some("bootstrap".as_ref()) {
        args.extend(["--log-format".into(), "json".into()]);
        if std::env::var_os("PROVISION_CONFIG").is_none() {
            let dir = std::env::current_exe()
                .ok()
                .and_then(|e| e.parent().map(std::path::Path::to_path_buf))
                .unwrap_or_default();
            args.extend(["--config".into(), dir.join("provision.toml").into()]);
        }
        args.push("lambda".into());
        return args;
    }
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
    few_malloc_arenas();
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
        // `provision history | head -1`: the reader has what it wanted.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("provision: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A line on standard output; an error (a closed pipe) ends the command.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)?
    }};
}

/// At most two malloc arenas (glibc makes up to eight per core, one per thread that meets
/// contention): the two runtime workers and the SQLite threads share them, and a burst's
/// peak RSS is about 0.7 MiB lower (500 launches, `scripts/bench tag`). `MALLOC_ARENA_MAX`
/// in the environment still decides when set. Called while single-threaded.
fn few_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt(3) with integer arguments, before any other thread exists.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
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
            group,
            account,
            region,
            outcome,
            local,
            limit,
            json,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            let outcome = match outcome.as_deref() {
                None => None,
                Some(o) => Some(provision::store::parse_outcome(o).ok_or_else(|| {
                    anyhow::anyhow!("--outcome {o:?}: not an outcome (succeeded, failed, rejected, skipped, unmatched, duplicate, retry, running)")
                })?),
            };
            let filter = HistoryFilter {
                instance,
                group,
                account,
                region,
                outcome,
            };
            history(&cfg, &filter, local, limit, json)
        }
        Command::Check { aws } => check(load_config(cli.config.as_deref())?, aws),
        Command::Instance {
            id,
            dry_run,
            no_complete,
            layer,
            transition,
            hook,
            source,
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            let args = provision::instance::Args {
                instance: id,
                dry_run,
                no_complete,
                layer,
                transition,
                hook,
                source,
            };
            let rt = runtime()?;
            rt.block_on(provision::instance::run(cfg, args))
        }
        Command::Daemon => {
            let path = config::resolve_path(cli.config.as_deref());
            let (cfg, text) = Config::load_with_text(&path)?;
            serve(cfg, Mode::Daemon, Some((path, text)))
        }
        Command::Reconcile { dry_run } => {
            let cfg = load_config(cli.config.as_deref())?;
            runtime()?.block_on(provision::reconcile::command(cfg, dry_run))
        }
        Command::Worker => serve(load_config(cli.config.as_deref())?, Mode::Drain, None),
        Command::Lambda => lambda(cli.config.as_deref()),
    }
}

fn check(cfg: Config, aws: bool) -> anyhow::Result<ExitCode> {
    let mut report = provision::check::offline(&cfg);
    let rt = runtime()?;
    rt.block_on(provision::check::playbooks(&cfg, aws, &mut report));
    // The config and its playbooks are the operator's files (exit 2, as a config that does
    // not load); what AWS says comes after (exit 1).
    let offline_problems = report.problems.len();
    if aws {
        rt.block_on(provision::check::with_aws(&cfg, &mut report));
    }
    out!("config: {} layer(s), every key valid", cfg.layers.len());
    for n in &report.notes {
        out!("note: {n}");
    }
    for p in &report.problems {
        out!("problem: {p}");
    }
    if report.problems.is_empty() {
        out!("ok");
        Ok(ExitCode::SUCCESS)
    } else {
        out!("{} problem(s)", report.problems.len());
        Ok(ExitCode::from(if offline_problems > 0 { 2 } else { 1 }))
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
    out!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::from(code))
}

fn history(
    cfg: &Config,
    filter: &HistoryFilter,
    local: bool,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if !local && cfg.state.history_table.is_some() {
        let runs = runtime()?
            .block_on(provision::app::fleet_history(cfg, filter, limit))?
            .unwrap_or_default();
        if json {
            out!("{}", serde_json::to_string_pretty(&runs)?);
        } else {
            print_runs(runs.iter().map(|r| (Some(r.host.as_str()), &r.run)))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    provision::app::refuse_foreign_owner(&cfg.state_dir())?;
    if !cfg.state.path.exists() {
        anyhow::bail!(
            "no history yet: {} does not exist",
            cfg.state.path.display()
        );
    }
    let store = Store::open(&cfg.state.path)?;
    let runs = store.history_where(filter, limit)?;
    if json {
        out!("{}", serde_json::to_string_pretty(&runs)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_runs(runs.iter().map(|r| (None, r)))?;
    Ok(ExitCode::SUCCESS)
}

/// The history as a table, with the host that worked each run when it is known (the
/// fleet's table).
fn print_runs<'a>(
    runs: impl Iterator<Item = (Option<&'a str>, &'a provision::store::RunRow)>,
) -> anyhow::Result<()> {
    let ts = |ms: i64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
        )
        .to_string()
    };
    // Everything but the fixed columns may hold text from instances or messages: shown
    // escaped, never obeyed by the terminal.
    let text = |s: Option<&str>| provision::pipeline::printable(s.unwrap_or(""));
    let runs: Vec<_> = runs.collect();
    let hosts = runs.iter().any(|(h, _)| h.is_some());
    let host_col = |h: Option<&str>| {
        if hosts {
            format!("{:<16}  ", text(h.or(Some("-"))))
        } else {
            String::new()
        }
    };
    out!(
        "{:>6}  {:<20}  {}{:<12}  {:<14}  {:<19}  {:<10}  {:<12}  {:<10}  {:<16}  ERROR / CAUSE",
        "RUN",
        "STARTED",
        host_col(Some("HOST")),
        "ACCOUNT",
        "REGION",
        "INSTANCE",
        "TRANSITION",
        "LAYER",
        "OUTCOME",
        "HOOK"
    );
    for (host, r) in runs {
        let why = match (&r.error, &r.cause) {
            (Some(e), _) => text(Some(e)),
            (None, Some(c)) => format!(
                "{}: {}",
                r.decision.map_or("-", |d| d.as_str()),
                text(Some(c))
            ),
            (None, None) => String::new(),
        };
        out!(
            "{:>6}  {:<20}  {}{:<12}  {:<14}  {:<19}  {:<10}  {:<12}  {:<10}  {:<16}  {why}",
            r.id,
            ts(r.received_at),
            host_col(host),
            text(r.account.as_deref().or(Some("-"))),
            text(r.region.as_deref().or(Some("-"))),
            text(r.instance_id.as_deref().or(Some("-"))),
            text(r.transition.as_deref().or(Some("-"))),
            text(r.layer.as_deref().or(Some("-"))),
            r.outcome.as_str(),
            r.hook_result.map_or("-", |c| c.as_str()),
        );
        for s in &r.steps {
            let ms = s.finished_at.map(|f| f - s.started_at).unwrap_or(0);
            out!(
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
    Ok(())
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

/// Serves /metrics and /healthz on `addr` (port 0: one the kernel picks); None, said in the
/// log, when it cannot be bound (the daemon goes on without them).
async fn serve_metrics(
    addr: std::net::SocketAddr,
    stats: Arc<Registry>,
    alive_within: Duration,
) -> Option<tokio::task::JoinHandle<()>> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            let addr = l.local_addr().unwrap_or(addr); // the port picked for port 0
            tracing::info!(%addr, "serving /metrics and /healthz");
            Some(tokio::spawn(provision::endpoint::serve(
                l,
                stats,
                alive_within,
            )))
        }
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot serve metrics (metrics.listen); continuing without them");
            None
        }
    }
}

/// The daemon's reloads: the config file and the text it was read from at start.
type ReloadFrom = (std::path::PathBuf, String);

fn serve(cfg: Config, mode: Mode, reload: Option<ReloadFrom>) -> anyhow::Result<ExitCode> {
    let rt = runtime()?;
    let metrics_listen = cfg.metrics_listen;
    let reconcile_every = cfg.reconcile.interval;
    rt.block_on(async move {
        // SIGHUP reloads the daemon's config; listened for before anything slow, as its
        // default action ends the process.
        let hangups = match &reload {
            Some(_) => Some(
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                    .context("listening for SIGHUP")?,
            ),
            None => None,
        };
        let cfg = Arc::new(cfg);
        let app = App::build((*cfg).clone()).await?;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let receivers = provision::receivers::Receivers::new(app.wiring(), mode, reconcile_every, shutdown.clone());
        receivers.start_all(&cfg, &app.sources);
        tracing::info!(max_in_flight = app.settings.max_in_flight, sources = app.sources.len(), mode = ?mode, "provision started");
        let systemd = Arc::new(SystemdNotify::from_env());
        let registry = app.registry.clone();
        let reloader = match (reload, hangups) {
            (Some((path, text)), Some(signals)) => {
                let r = provision::reload::Reloader::new(&path, (cfg.clone(), text), receivers.clone(), registry.process().clone(), systemd.clone());
                Some(tokio::spawn(r.run(signals)))
            }
            _ => None,
        };
        let alive_within = (app.settings.wait_time * 3).max(Duration::from_secs(60));
        let health = tokio::spawn(report_health(systemd.clone(), registry.clone(), alive_within));
        let housekeeping = match mode {
            Mode::Daemon => {
                let r = receivers.clone();
                app.spawn_housekeeping(Arc::new(move || r.pipelines()))
            }
            _ => Vec::new(),
        };
        let endpoint = match (mode, metrics_listen) {
            (Mode::Daemon, Some(addr)) => serve_metrics(addr, registry.clone(), alive_within).await,
            _ => None,
        };
        let signal = {
            let (systemd, shutdown) = (systemd.clone(), shutdown.clone());
            tokio::spawn(async move {
                provision::shutdown::signal().await;
                systemd.stopping();
                shutdown.cancel();
            })
        };
        // Draining, the loops end by themselves; a daemon's at the signal.
        let (summary, sources) = receivers.join().await;
        signal.abort();
        health.abort();
        if let Some(r) = reloader {
            r.abort();
            let _ = r.await;
        }
        for h in housekeeping {
            h.abort();
        }
        if let Some(e) = endpoint {
            e.abort();
        }
        // The result publisher's task ends once nothing holds it: the sources' wiring either.
        drop(receivers);
        app.close_with(sources).await;
        log_summary(&summary, &registry);
        Ok(match mode {
            Mode::Drain if !summary.all_handled() => ExitCode::from(1),
            _ => ExitCode::SUCCESS,
        })
    })
}

/// Tells systemd the service is ready after the first successful poll, and pings its
/// watchdog only while the receive loop shows it is alive.
async fn report_health(systemd: Arc<SystemdNotify>, stats: Arc<Registry>, alive_within: Duration) {
    if !systemd.enabled() {
        return;
    }
    while !stats.polled() {
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

/// The counters summed over the sources.
fn log_summary(s: &Summary, registry: &Registry) {
    tracing::info!(
        received = s.received,
        deleted = s.deleted,
        released = s.released,
        ack_errors = s.ack_errors,
        receive_errors = s.receive_errors,
        succeeded = registry.sum(|s| Stats::get(&s.succeeded)),
        failed = registry.sum(|s| Stats::get(&s.failed)),
        skipped = registry.sum(|s| Stats::get(&s.skipped)),
        rejected = registry.sum(|s| Stats::get(&s.rejected)),
        unmatched = registry.sum(|s| Stats::get(&s.unmatched)),
        duplicates = registry.sum(|s| Stats::get(&s.duplicates)),
        released = registry.sum(|s| Stats::get(&s.released)),
        heartbeats = registry.sum(|s| Stats::get(&s.heartbeats)),
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
