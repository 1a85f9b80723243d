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

/// Result events go out ten to a PublishBatch call.
fn publisher(
    notifier: Arc<dyn Notifier>,
    topic: String,
    retry_for: Duration,
) -> (Batcher<String>, JoinHandle<()>) {
    Batcher::retried(10, PUBLISH_LINGER, retry_for, move |bodies: Vec<String>| {
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

impl App {
    pub async fn build(cfg: Config) -> anyhow::Result<App> {
        let cfg = Arc::new(cfg);
        let store = Store::open(&cfg.state.path)
            .with_context(|| format!("opening the state store {}", cfg.state.path.display()))?;
        prune_history(&store).await;
        let stats = Arc::new(Stats::default());
        let calls = CountCalls(stats.clone());
        let sdk_cfg = sdk::load_config(cfg.aws.max_attempts).await;
        let queue: Arc<dyn Queue> = Arc::new(SqsQueue::new(&sdk_cfg, &calls, &cfg.queue.url));
        let hooks: Arc<dyn Hooks> = Arc::new(AutoScalingHooks::new(&sdk_cfg, &calls));
        let services = Services {
            instances: Arc::new(Ec2Instances::new(&sdk_cfg, &calls)),
            ssm: Arc::new(SsmClient::new(&sdk_cfg, &calls)),
            opsworks: Arc::new(OpsWorksClient::new(&sdk_cfg, &calls)),
            ecs: Arc::new(EcsClient::new(&sdk_cfg, &calls)),
        };
        let claims = claims_store(&cfg, &sdk_cfg, &calls);
        let reject_policy = reject_policy(cfg.queue.on_reject, queue.as_ref()).await;
        let (publisher, publisher_task) = match &cfg.notify {
            Some(n) => {
                let notifier: Arc<dyn Notifier> = Arc::new(SnsNotifier::new(&sdk_cfg, &calls));
                let (b, task) = publisher(notifier, n.topic_arn.clone(), cfg.aws.retry_for);
                (Some(b), Some(task))
            }
            None => (None, None),
        };
        let leases = Leases::spawn(
            Some(queue.clone()),
            hooks.clone(),
            cfg.queue.visibility_timeout,
            stats.clone(),
        );
        let (remote, ansible) = if cfg.uses_ssh() {
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
        let pipeline = Arc::new(Pipeline::new(Parts {
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
        }));
        Ok(App {
            pipeline,
            queue,
            settings,
            publisher_task,
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

    /// Waits until every queued result event was published.
    pub async fn close(self) {
        let App {
            pipeline,
            publisher_task,
            ..
        } = self;
        drop(pipeline);
        if let Some(t) = publisher_task {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }
}
