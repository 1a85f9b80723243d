//! Wiring: the real SDK clients, the store and the batchers assembled into a pipeline.
//!
//! Owns which clients, credentials and shared parts each source gets, and nothing else
//! (whether a source's queue has a dead-letter queue is read by its loop: `delivery`);
//! tests assemble their own pipelines from fakes through [`crate::pipeline::Parts`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use crate::aws::autoscaling::AutoScalingHooks;
use crate::aws::dynamo::DynamoClaims;
use crate::aws::ec2::Ec2Instances;
use crate::aws::ecs::EcsClient;
use crate::aws::history::FleetHistory;
use crate::aws::opsworks::OpsWorksClient;
use crate::aws::sdk;
use crate::aws::sns::SnsNotifier;
use crate::aws::sqs::SqsQueue;
use crate::aws::ssm::SsmClient;
use crate::aws::{Hooks, Notifier, Queue, Services};
use crate::batch::Batcher;
use crate::claims::Claims;
use crate::config::Config;
use crate::daemon::Settings;
use crate::delivery::{RejectPolicy, RejectRule};
use crate::lease::Leases;
use crate::metrics::{CountCalls, Registry, Stats};
use crate::pipeline::{Parts, Pipeline};
use crate::sources::{Scope, SourceConfig};
use crate::ssh::Remote;
use crate::step::ansible::Runner;
use crate::store::Store;

/// How long a result event waits for others to share its PublishBatch call.
const PUBLISH_LINGER: Duration = Duration::from_millis(250);

/// How often the known_hosts files of vanished instances are looked for.
const KNOWN_HOSTS_PRUNE_EVERY: Duration = Duration::from_secs(6 * 3600);

/// How long finished runs stay in the history.
const HISTORY_KEEP: Duration = Duration::from_secs(90 * 86_400);
/// The most rows of messages nothing ran for (rejected, skipped, unmatched) the history
/// keeps, whatever their age: anyone allowed to send to the queue makes them.
const JUNK_ROWS_KEEP: usize = 10_000;
/// How often the daemon prunes its history while it runs.
const HISTORY_PRUNE_EVERY: Duration = Duration::from_secs(3600);

pub struct App {
    /// The first source's pipeline, queue and settings (the one source of `[queue]`).
    pub pipeline: Arc<Pipeline>,
    pub queue: Arc<dyn Queue>,
    pub settings: Settings,
    /// Every source, in config order.
    pub sources: Vec<Source>,
    /// The numbers of the process and of every source's account and region.
    pub registry: Arc<Registry>,
    wiring: Arc<Wiring>,
    publisher_task: Option<JoinHandle<()>>,
    fleet_task: Option<JoinHandle<()>>,
}

/// One source wired: a pipeline with the clients of its account and region (its role's
/// credentials), its queue and how it is read.
#[derive(Clone)]
pub struct Source {
    pub name: String,
    pub scope: Scope,
    /// The role the source's calls assume, for logs.
    pub role_arn: Option<String>,
    pub pipeline: Arc<Pipeline>,
    pub queue: Arc<dyn Queue>,
    pub settings: Settings,
}

/// What every source's pipeline shares, kept to wire the sources a reload adds.
pub struct Wiring {
    /// The host's own SDK config: its credentials call STS for the sources' roles.
    base: aws_config::SdkConfig,
    store: Store,
    /// The claims table a fleet shares; None: the store's.
    claims: Option<Arc<dyn Claims>>,
    publisher: Option<Batcher<String>>,
    fleet_history: Option<Batcher<String>>,
    remote: Option<Arc<Remote>>,
    ansible: Option<Arc<Runner>>,
    registry: Arc<Registry>,
    purpose: Purpose,
}

/// The clients of one account and region.
fn services(sdk_cfg: &aws_config::SdkConfig, calls: &CountCalls) -> Services {
    Services {
        instances: Arc::new(Ec2Instances::new(sdk_cfg, calls)),
        ssm: Arc::new(SsmClient::new(sdk_cfg, calls)),
        opsworks: Arc::new(OpsWorksClient::new(sdk_cfg, calls)),
        ecs: Arc::new(EcsClient::new(sdk_cfg, calls)),
    }
}

impl Wiring {
    /// The account and region `s`'s calls act in: its role's account (else its queue
    /// URL's), its region (else the host's).
    pub fn scope_of(&self, s: &SourceConfig) -> Scope {
        let host_region = self.base.region().map(ToString::to_string);
        Scope::new(s.account(), s.region.as_deref().or(host_region.as_deref()))
    }

    /// One source: its clients (assuming its role), lease keeper, pipeline and settings,
    /// sharing the store, claims, publisher, SSH and Ansible with every other source.
    pub async fn source(&self, cfg: &Arc<Config>, s: &SourceConfig) -> Source {
        let scope = self.scope_of(s);
        let stats = self.registry.source(&scope);
        let calls = CountCalls(stats.clone());
        let sdk_cfg = sdk::source_config(&self.base, s, &calls).await;
        let queue: Arc<dyn Queue> = Arc::new(SqsQueue::new(&sdk_cfg, &calls, &s.url));
        let hooks: Arc<dyn Hooks> = Arc::new(AutoScalingHooks::new(&sdk_cfg, &calls));
        let named = s.name != crate::sources::DEFAULT_SOURCE;
        let claims: Option<Arc<dyn Claims>> = match (named, &self.claims) {
            (false, c) => c.clone(),
            (true, c) => Some(Arc::new(crate::claims::Scoped::new(
                c.clone()
                    .unwrap_or_else(|| Arc::new(self.store.clone()) as Arc<dyn Claims>),
                &scope.account,
                &scope.region,
            ))),
        };
        // "auto" reads the queue's redrive policy once the source's loop has received
        // (daemon::Listener::receive): its role may not be assumable yet.
        let reject = match self.purpose {
            Purpose::Run => RejectRule::new(cfg.queue.on_reject),
            Purpose::Plan => RejectRule::fixed(RejectPolicy::Delete),
        };
        let leases = Leases::spawn(
            Some(queue.clone()),
            hooks.clone(),
            cfg.queue.visibility_timeout,
            stats.clone(),
        );
        let settings = Settings {
            max_in_flight: cfg.queue.max_in_flight,
            wait_time: cfg.queue.wait_time,
            visibility_timeout: cfg.queue.visibility_timeout,
            shutdown_grace: cfg.daemon.shutdown_grace,
            retry_for: cfg.aws.retry_for,
            reject,
        };
        let pipeline = Pipeline::new(Parts {
            cfg: cfg.clone(),
            hooks,
            services: services(&sdk_cfg, &calls),
            store: self.store.clone(),
            claims,
            leases,
            publisher: self.publisher.clone(),
            stats,
            remote: self.remote.clone(),
            ansible: self.ansible.clone(),
        })
        .with_fleet_history(self.fleet_history.clone())
        .with_scope(&s.name, Some(scope.clone()));
        Source {
            name: s.name.clone(),
            scope,
            role_arn: s.role.as_ref().map(|r| r.arn.clone()),
            pipeline: Arc::new(pipeline),
            queue,
            settings,
        }
    }
}

/// Every [`HISTORY_PRUNE_EVERY`] while the daemon runs (it was pruned at start): finished
/// runs older than [`HISTORY_KEEP`] go, and rows of messages nothing ran for beyond the
/// newest [`JUNK_ROWS_KEEP`].
async fn prune_history_while_running(store: Store) {
    loop {
        tokio::time::sleep(HISTORY_PRUNE_EVERY).await;
        prune_history(&store).await;
    }
}

async fn prune_history(store: &Store) {
    match store.prune(HISTORY_KEEP, JUNK_ROWS_KEEP).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            runs = n,
            "pruned history older than 90 days, and rows of unworked messages beyond the newest 10000"
        ),
        Err(e) => tracing::warn!(error = %e, "could not prune old history"),
    }
}

/// The pipelines of the sources receiving now.
pub type ReceivingNow = Arc<dyn Fn() -> Vec<Arc<Pipeline>> + Send + Sync>;

/// At start and every [`KNOWN_HOSTS_PRUNE_EVERY`]: removes the known_hosts files of
/// instances that terminated without their terminate hook reaching provision. Only while
/// one source is receiving: an instance unknown to one account may live in another, so
/// with several (now: a reload may add or replace one) no file is removed by a sweep;
/// terminate runs remove theirs.
fn spawn_known_hosts_pruning(remote: Arc<Remote>, receiving: ReceivingNow) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut said = false;
        loop {
            let pipelines = receiving();
            let [only] = pipelines.as_slice() else {
                if !said {
                    tracing::info!(sources = pipelines.len(), "known_hosts entries are not pruned by a sweep while several sources receive (an instance unknown to one account may live in another); terminate runs remove theirs");
                    said = true;
                }
                tokio::time::sleep(KNOWN_HOSTS_PRUNE_EVERY).await;
                continue;
            };
            said = false;
            let instances = only.services().instances.clone();
            match remote.prune_known_hosts(instances.as_ref()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    files = n,
                    "removed the known_hosts entries of instances that no longer exist"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prune known_hosts entries; will try again later")
                }
            }
            tokio::time::sleep(KNOWN_HOSTS_PRUNE_EVERY).await;
        }
    })
}

/// The claims table a fleet shares (`state.claims_table`); None: the state store's.
fn claims_store(
    cfg: &Config,
    sdk_cfg: &aws_config::SdkConfig,
    calls: &CountCalls,
) -> Option<Arc<dyn Claims>> {
    let table = cfg.state.claims_table.as_deref()?;
    tracing::info!(
        table,
        "claims are kept in a DynamoDB table shared with other ops hosts"
    );
    Some(Arc::new(DynamoClaims::new(
        sdk_cfg,
        calls,
        table,
        crate::claims::hostname(),
    )))
}

pub use crate::aws::history::FleetRun;

/// The fleet's history table (`state.history_table`), written by every host: finished
/// runs go out 25 to a BatchWriteItem call.
fn fleet_history_writer(
    cfg: &Config,
    sdk_cfg: &aws_config::SdkConfig,
    calls: &CountCalls,
) -> Option<(Batcher<String>, JoinHandle<()>)> {
    let table = cfg.state.history_table.as_deref()?;
    tracing::info!(
        table,
        "finished runs are also written to the fleet's history table"
    );
    let history = Arc::new(FleetHistory::new(sdk_cfg, calls, table));
    Some(Batcher::retried(
        25,
        PUBLISH_LINGER,
        cfg.aws.retry_for,
        move |records: Vec<String>| {
            let history = history.clone();
            async move { history.put_batch(&records).await }
        },
    ))
}

/// `provision history` from the fleet's table: None when `state.history_table` is unset.
pub async fn fleet_history(
    cfg: &Config,
    filter: &crate::store::HistoryFilter,
    limit: usize,
) -> anyhow::Result<Option<Vec<FleetRun>>> {
    let Some(table) = cfg.state.history_table.as_deref() else {
        return Ok(None);
    };
    let sdk_cfg = sdk::load_config(cfg.aws.max_attempts, cfg.aws.attempt_timeout).await;
    let calls = CountCalls(Arc::new(Stats::default()));
    let runs = FleetHistory::new(&sdk_cfg, &calls, table)
        .runs(filter, limit)
        .await
        .with_context(|| format!("reading the fleet's history table {table}"))?;
    Ok(Some(runs))
}

/// Result events go out ten to a PublishBatch call.
fn publisher(
    notifier: Arc<dyn Notifier>,
    topic: String,
    retry_for: Duration,
) -> (Batcher<String>, JoinHandle<()>) {
    // A batch whose callers all stopped waiting is dropped: its events are in the outbox.
    Batcher::retried_while_wanted(10, PUBLISH_LINGER, retry_for, move |bodies: Vec<String>| {
        let (notifier, topic) = (notifier.clone(), topic.clone());
        async move { notifier.publish_batch(&topic, &bodies).await }
    })
}

/// SSH reach and the Ansible runner, for configs with SSH steps.
fn ssh_parts(cfg: &Config, services: &Services) -> anyhow::Result<(Arc<Remote>, Arc<Runner>)> {
    let state_dir = cfg.state_dir();
    let remote = Arc::new(
        Remote::new(cfg.ssh.clone(), &state_dir)
            .context("setting up SSH (known_hosts directory, runtime directory, key)")?,
    );
    let runner = Runner::new(
        cfg.ansible.clone(),
        remote.clone(),
        services.ssm.clone(),
        cfg.aws.retry_for,
        &state_dir,
    )
    .context("setting up Ansible (log directory, callback plugin)")?;
    Ok((remote, runner))
}

/// A command run as root in a state directory that belongs to another user (the service's)
/// would leave root-owned 0600 files there (`state.db`'s journal, known_hosts, logs) the
/// service then cannot read: refused, saying whom to run as. A directory that does not
/// exist yet, or belongs to root, is fine.
pub fn refuse_foreign_owner(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    if euid == 0 && meta.uid() != 0 {
        anyhow::bail!(
            "{} belongs to uid {} (the service's user), and this command runs as root: files it created there would be root's and unreadable by the service. Run it as the owner, e.g. `sudo -u provision provision …`",
            dir.display(),
            meta.uid()
        );
    }
    Ok(())
}

/// The state store: `state.path` (created and migrated, old history pruned), or for a plan
/// an in-memory one.
async fn open_store(cfg: &Config, purpose: Purpose) -> anyhow::Result<Store> {
    if purpose == Purpose::Plan {
        return Ok(Store::in_memory()?);
    }
    refuse_foreign_owner(&cfg.state_dir())?;
    let store = Store::open(&cfg.state.path)
        .with_context(|| format!("opening the state store {}", cfg.state.path.display()))?;
    prune_history(&store).await;
    Ok(store)
}

/// What the assembled pipeline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Runs steps: the state store on disk, SSH set up, results published.
    Run,
    /// Only shows a plan (`provision i-… --dry-run`): nothing on disk is created or migrated
    /// (an in-memory store, no SSH directories), no credential is read, nothing published.
    Plan,
}

impl App {
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        Self::build_for(cfg, Purpose::Run).await
    }

    /// The shared parts (store, claims, result publisher, fleet history, SSH and Ansible,
    /// the metrics registry), then one pipeline per source, each with the clients of its
    /// account and region.
    pub async fn build_for(cfg: Config, purpose: Purpose) -> anyhow::Result<App> {
        let cfg = Arc::new(cfg);
        let store = open_store(&cfg, purpose).await?;
        let registry = Arc::new(Registry::default());
        let calls = CountCalls(registry.process().clone());
        let sdk_cfg = sdk::load_config(cfg.aws.max_attempts, cfg.aws.attempt_timeout).await;
        let run = purpose == Purpose::Run;
        let claims = claims_store(&cfg, &sdk_cfg, &calls).filter(|_| run);
        let (publisher, publisher_task) = match (&cfg.notify, purpose) {
            (Some(n), Purpose::Run) => {
                let notifier: Arc<dyn Notifier> = Arc::new(SnsNotifier::new(&sdk_cfg, &calls));
                let (b, task) = publisher(notifier, n.topic_arn.clone(), cfg.aws.retry_for);
                (Some(b), Some(task))
            }
            _ => (None, None),
        };
        // SSH reach is the ops host's; the vault password's parameter is in its account.
        let host_services = services(&sdk_cfg, &calls);
        let (remote, ansible) = if cfg.uses_ssh() && run {
            let (remote, runner) = ssh_parts(&cfg, &host_services)?;
            (Some(remote), Some(runner))
        } else {
            (None, None)
        };
        let (fleet_history, fleet_task) = match fleet_history_writer(&cfg, &sdk_cfg, &calls) {
            Some((b, task)) if run => (Some(b), Some(task)),
            _ => (None, None),
        };
        let wiring = Wiring {
            base: sdk_cfg,
            store,
            claims,
            publisher,
            fleet_history,
            remote,
            ansible,
            registry: registry.clone(),
            purpose,
        };
        let mut sources = Vec::new();
        for s in &cfg.sources {
            let span = tracing::info_span!("source", source = %s.name);
            sources.push(wiring.source(&cfg, s).instrument(span).await);
        }
        let first = sources.first().ok_or_else(|| {
            anyhow::anyhow!("the config names no queue ([queue] url or [sources.NAME])")
        })?;
        Ok(App {
            pipeline: first.pipeline.clone(),
            queue: first.queue.clone(),
            settings: first.settings.clone(),
            sources,
            registry,
            wiring: Arc::new(wiring),
            publisher_task,
            fleet_task,
        })
    }

    /// The wiring of sources a reload adds.
    pub fn wiring(&self) -> Arc<Wiring> {
        self.wiring.clone()
    }

    /// The long-running daemon's housekeeping (not for one-shot commands): the history is
    /// pruned every hour, and known_hosts files of vanished instances at start and every
    /// few hours, asked of the source `receiving` names at that moment (sources change with
    /// reloads). Abort them at shutdown.
    pub fn spawn_housekeeping(&self, receiving: ReceivingNow) -> Vec<JoinHandle<()>> {
        let store = self.pipeline.store().clone();
        let mut tasks = vec![tokio::spawn(prune_history_while_running(store))];
        // The known_hosts files are SSH's (none when no step uses SSH).
        if let Some(remote) = self.wiring.remote.clone() {
            tasks.push(spawn_known_hosts_pruning(remote, receiving));
        }
        tasks
    }

    /// Waits until every queued result event was published (and fleet history written).
    pub async fn close(self) {
        self.close_with(Vec::new()).await;
    }

    /// [`App::close`], and `sources` (those a reload added or removed) with it.
    pub async fn close_with(self, retired: Vec<Source>) {
        let App {
            pipeline,
            sources,
            wiring,
            publisher_task,
            fleet_task,
            ..
        } = self;
        let all: Vec<Source> = sources.into_iter().chain(retired).collect();
        let mark_tasks: Vec<_> = all
            .iter()
            .filter_map(|s| s.pipeline.take_mark_task())
            .collect();
        drop((pipeline, all, wiring));
        for t in [publisher_task, fleet_task]
            .into_iter()
            .flatten()
            .chain(mark_tasks)
        {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }
}
