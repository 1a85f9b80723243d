//! The daemon's sources at work: one receive loop (and reconciler) per source, started at
//! start and by a reload that adds a source, retired by a reload that removes one (it
//! stops receiving; its runs in flight finish), all stopped at shutdown.
//!
//! Owns which sources run now and the log line of each one's state. What a source is
//! wired from is `app`'s ([`crate::app::Wiring`]); receiving is `daemon`'s; which sources a
//! reload keeps is decided here, from the new config's `sources` compared with the running.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::app::{Source, Wiring};
use crate::config::Config;
use crate::daemon::{self, Mode, Summary};
use crate::pipeline::Pipeline;
use crate::reconcile::Reconciler;
use crate::sources::SourceConfig;

/// One source receiving.
struct Running {
    config: SourceConfig,
    source: Source,
    /// Stops its receive loop (its runs in flight finish) and its reconciler.
    retire: CancellationToken,
    task: JoinHandle<Summary>,
}

/// Every source of the daemon, running or retired.
pub struct Receivers {
    wiring: Arc<Wiring>,
    mode: Mode,
    /// `reconcile.interval` (daemon mode only).
    reconcile_every: Option<Duration>,
    /// Cancelled at shutdown: every loop stops, runs in flight get the grace period.
    shutdown: CancellationToken,
    running: Mutex<BTreeMap<String, Running>>,
    /// Sources a reload removed: their loops finish what they had.
    retired: Mutex<Vec<Running>>,
}

/// What a reload did to the sources: names added and removed (a changed source is both).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SourceChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl Receivers {
    pub fn new(
        wiring: Arc<Wiring>,
        mode: Mode,
        reconcile_every: Option<Duration>,
        shutdown: CancellationToken,
    ) -> Arc<Receivers> {
        Arc::new(Receivers {
            wiring,
            mode,
            reconcile_every: reconcile_every.filter(|_| mode == Mode::Daemon),
            shutdown,
            running: Mutex::default(),
            retired: Mutex::default(),
        })
    }

    /// Starts the sources built at start (`sources`, in `cfg`'s order).
    pub fn start_all(&self, cfg: &Config, sources: &[Source]) {
        for (c, s) in cfg.sources.iter().zip(sources) {
            self.start(c.clone(), s.clone());
        }
    }

    /// The pipelines of the sources receiving now.
    pub fn pipelines(&self) -> Vec<Arc<Pipeline>> {
        self.running
            .lock()
            .unwrap()
            .values()
            .map(|r| r.source.pipeline.clone())
            .collect()
    }

    fn start(&self, config: SourceConfig, source: Source) {
        let retire = CancellationToken::new();
        let span = tracing::info_span!("source", source = %source.name,
            account = %source.scope.account, region = %source.scope.region);
        span.in_scope(|| {
            tracing::info!(queue = %config.url, role = source.role_arn.as_deref().unwrap_or("-"),
                "receiving from this source's queue");
        });
        let reconcile = self.reconcile_every.map(|every| {
            let r = Reconciler::new(source.pipeline.clone());
            let grace = source.settings.shutdown_grace;
            let stop = retire.child_token();
            let shutdown = self.shutdown.clone();
            tokio::spawn(
                async move {
                    // Stopped by shutdown too, and then awaited: its runs in flight get the
                    // grace period and are cancelled, not dropped with the runtime.
                    let run = r.run_every(every, grace, stop.clone());
                    tokio::pin!(run);
                    tokio::select! {
                        () = &mut run => {}
                        () = shutdown.cancelled() => {
                            stop.cancel();
                            run.await;
                        }
                    }
                }
                .instrument(span.clone()),
            )
        });
        let (s, shutdown, stop) = (source.clone(), self.shutdown.clone(), retire.clone());
        let mode = self.mode;
        let task = tokio::spawn(
            async move {
                let summary =
                    daemon::run(s.pipeline, s.queue, s.settings, mode, &shutdown, &stop).await;
                if let Some(r) = reconcile {
                    let _ = r.await;
                }
                summary
            }
            .instrument(span),
        );
        let name = source.name.clone();
        let running = Running {
            config,
            source,
            retire,
            task,
        };
        self.running.lock().unwrap().insert(name, running);
    }

    /// Applies a reloaded config's sources: those gone or changed are retired (their runs
    /// in flight finish), those new or changed start receiving. Every running pipeline
    /// (the new ones are built from `cfg`) starts its next runs under `cfg`.
    pub async fn apply(&self, cfg: &Arc<Config>) -> SourceChanges {
        let mut changes = SourceChanges::default();
        let gone: Vec<Running> = {
            let mut running = self.running.lock().unwrap();
            let names: Vec<String> = running
                .iter()
                .filter(|(n, r)| !cfg.sources.iter().any(|s| &s.name == *n && r.config == *s))
                .map(|(n, _)| n.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|n| running.remove(&n))
                .collect()
        };
        for r in gone {
            tracing::info!(source = %r.source.name, "source removed by a reload: no longer receiving from its queue; its runs in flight finish");
            r.retire.cancel();
            changes.removed.push(r.source.name.clone());
            self.retired.lock().unwrap().push(r);
        }
        for p in self.pipelines() {
            p.replace_config(cfg.clone());
        }
        for s in &cfg.sources {
            if self.running.lock().unwrap().contains_key(&s.name) {
                continue;
            }
            let span = tracing::info_span!("source", source = %s.name);
            let source = self.wiring.source(cfg, s).instrument(span).await;
            changes.added.push(s.name.clone());
            self.start(s.clone(), source);
        }
        changes
    }

    /// Waits for every loop (a daemon's after `shutdown`; draining, until each is done),
    /// summing them up;
    /// answers the sources, running and retired, for [`crate::app::App::close_with`].
    pub async fn join(&self) -> (Summary, Vec<Source>) {
        // A daemon's sources change with reloads until the shutdown: the set is taken then.
        if self.mode == Mode::Daemon {
            self.shutdown.cancelled().await;
        }
        let mut all: Vec<Running> = std::mem::take(&mut *self.running.lock().unwrap())
            .into_values()
            .collect();
        all.append(&mut self.retired.lock().unwrap());
        let mut total = Summary::default();
        let mut sources = Vec::new();
        for r in all {
            match r.task.await {
                Ok(s) => total.add(&s),
                Err(e) => {
                    tracing::error!(source = %r.source.name, error = %e, "a source's receive loop panicked")
                }
            }
            sources.push(r.source);
        }
        (total, sources)
    }
}
