//! Wiring: the real SDK clients, the store and the batchers assembled into a pipeline.
//!
//! Owns startup decisions that need AWS (is there a dead-letter queue?) and nothing else;
//! tests assemble their own pipelines from fakes through [`crate::pipeline::Parts`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinHandle;

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
use crate::aws::{Hooks, Instances, Notifier, Queue, Services};
use crate::batch::Batcher;
use crate::claims::Claims;
use crate::config::{Config, OnReject};
use crate::daemon::Settings;
use crate::delivery::RejectPolicy;
use crate::lease::Leases;
use crate::metrics::{CountCalls, Stats};
use crate::pipeline::{Parts, Pipeline};
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
    pub pipeline: Arc<Pipeline>,
    pub queue: Arc<dyn Queue>,
    pub settings: Settings,
    publisher_task: Option<JoinHandle<()>>,
    fleet_task: Option<JoinHandle<()>>,
    /// For the daemon's housekeeping (None when no step uses SSH).
    known_hosts: Option<(Arc<Remote>, Arc<dyn Instances>)>,
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

/// At start and every [`KNOWN_HOSTS_PRUNE_EVERY`]: removes the known_hosts files of
/// instances that terminated without their terminate hook reaching provision.
fn spawn_known_hosts_pruning(remote: Arc<Remote>, instances: Arc<dyn Instances>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
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

/// Where rejected messages go: `queue.on_reject`, or with "auto" the queue's redrive policy.
async fn reject_policy(on_reject: OnReject, queue: &dyn Queue) -> RejectPolicy {
    match on_reject {
        OnReject::Delete => RejectPolicy::Delete,
        OnReject::DeadLetter => RejectPolicy::DeadLetter,
        OnReject::Auto => match queue.redrive_policy().await {
            Ok(Some(policy)) => {
                tracing::info!(%policy, "queue has a dead-letter queue: rejected messages are released to it");
                RejectPolicy::DeadLetter
            }
            Ok(None) => RejectPolicy::Delete,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the queue's redrive policy; rejected messages will be deleted");
                RejectPolicy::Delete
            }
        },
    }
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

    pub async fn build_for(cfg: Config, purpose: Purpose) -> anyhow::Result<App> {
        let cfg = Arc::new(cfg);
        let store = open_store(&cfg, purpose).await?;
        let stats = Arc::new(Stats::default());
        let calls = CountCalls(stats.clone());
        let sdk_cfg = sdk::load_config(cfg.aws.max_attempts, cfg.aws.attempt_timeout).await;
        let queue: Arc<dyn Queue> = Arc::new(SqsQueue::new(&sdk_cfg, &calls, &cfg.queue.url));
        let hooks: Arc<dyn Hooks> = Arc::new(AutoScalingHooks::new(&sdk_cfg, &calls));
        let services = Services {
            instances: Arc::new(Ec2Instances::new(&sdk_cfg, &calls)),
            ssm: Arc::new(SsmClient::new(&sdk_cfg, &calls)),
            opsworks: Arc::new(OpsWorksClient::new(&sdk_cfg, &calls)),
            ecs: Arc::new(EcsClient::new(&sdk_cfg, &calls)),
        };
        let run = purpose == Purpose::Run;
        let claims = claims_store(&cfg, &sdk_cfg, &calls).filter(|_| run);
        let reject_policy = match purpose {
            Purpose::Run => reject_policy(cfg.queue.on_reject, queue.as_ref()).await,
            Purpose::Plan => RejectPolicy::Delete,
        };
        let (publisher, publisher_task) = match (&cfg.notify, purpose) {
            (Some(n), Purpose::Run) => {
                let notifier: Arc<dyn Notifier> = Arc::new(SnsNotifier::new(&sdk_cfg, &calls));
                let (b, task) = publisher(notifier, n.topic_arn.clone(), cfg.aws.retry_for);
                (Some(b), Some(task))
            }
            _ => (None, None),
        };
        let leases = Leases::spawn(
            Some(queue.clone()),
            hooks.clone(),
            cfg.queue.visibility_timeout,
            stats.clone(),
        );
        let (remote, ansible) = if cfg.uses_ssh() && run {
            let (remote, runner) = ssh_parts(&cfg, &services)?;
            (Some(remote), Some(runner))
        } else {
            (None, None)
        };
        let known_hosts = remote
            .as_ref()
            .map(|r| (r.clone(), services.instances.clone()));
        let settings = Settings {
            max_in_flight: cfg.queue.max_in_flight,
            wait_time: cfg.queue.wait_time,
            visibility_timeout: cfg.queue.visibility_timeout,
            shutdown_grace: cfg.daemon.shutdown_grace,
            retry_for: cfg.aws.retry_for,
            reject: reject_policy,
        };
        let (fleet_history, fleet_task) = match fleet_history_writer(&cfg, &sdk_cfg, &calls) {
            Some((b, task)) if run => (Some(b), Some(task)),
            _ => (None, None),
        };
        let pipeline = Arc::new(
            Pipeline::new(Parts {
                cfg,
                hooks,
                services,
                store,
                claims,
                leases,
                publisher,
                stats,
                remote,
                ansible,
            })
            .with_fleet_history(fleet_history),
        );
        Ok(App {
            pipeline,
            queue,
            settings,
            publisher_task,
            fleet_task,
            known_hosts,
        })
    }

    /// The long-running daemon's housekeeping (not for one-shot commands): the history is
    /// pruned every hour, and known_hosts files of vanished instances at start and every
    /// few hours. Abort them at shutdown.
    pub fn spawn_housekeeping(&self) -> Vec<JoinHandle<()>> {
        let store = self.pipeline.store().clone();
        let mut tasks = vec![tokio::spawn(prune_history_while_running(store))];
        if let Some((remote, instances)) = self.known_hosts.clone() {
            tasks.push(spawn_known_hosts_pruning(remote, instances));
        }
        tasks
    }

    /// Waits until every queued result event was published (and fleet history written).
    pub async fn close(self) {
        let App {
            pipeline,
            publisher_task,
            fleet_task,
            ..
        } = self;
        let mark_task = pipeline.take_mark_task();
        drop(pipeline);
        for t in [publisher_task, fleet_task, mark_task]
            .into_iter()
            .flatten()
        {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }
}
