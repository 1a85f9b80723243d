//! `provision check`: is this config ready to run, and (with `--aws`) does AWS agree?
//!
//! The config itself is validated by `Config::load` (every problem with its key). This adds
//! what only the surroundings can tell: the queue can be read, the result topic exists, the
//! fleet's claims table is usable, the groups each layer matches have lifecycle hooks that
//! notify the queue, and how many of their instances wait or are in service unconfigured
//! (what `provision reconcile` would work and report). Problems
//! fail the check; notes are what an operator should know but may be intended.

use std::sync::Arc;

use crate::aws::autoscaling::AutoScalingHooks;
use crate::aws::ec2::Ec2Instances;
use crate::aws::sdk;
use crate::aws::sns::SnsNotifier;
use crate::aws::sqs::SqsQueue;
use crate::aws::ssm::SsmClient;
use crate::aws::{Hooks, Notifier, Queue};
use crate::config::{Config, OnReject};
use crate::layer::Layer;
use crate::metrics::{CountCalls, Stats};
use crate::sources::{SourceConfig, DEFAULT_SOURCE};

#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

/// What the config alone says.
pub fn offline(cfg: &Config) -> Report {
    let mut r = Report::default();
    for l in &cfg.layers {
        if l.all_steps().next().is_none() {
            r.notes.push(format!(
                "layers.{}: no steps; its hooks are completed with CONTINUE at once",
                l.name
            ));
        }
    }
    if let Some(addr) = cfg.metrics_listen {
        if !addr.ip().is_loopback() {
            r.notes.push(format!(
                "metrics.listen: {addr} is reachable from other hosts"
            ));
        }
    }
    // Patterns are the operator's choice; say so when one lets shell or template text in.
    const PROBES: &[&str] = &["$(id)", "`id`", "a;id", "a|id", "a b", "{{ x }}", "../x"];
    for l in &cfg.layers {
        for (k, p) in l.vars.iter() {
            let let_in: Vec<&str> = PROBES.iter().copied().filter(|x| p.matches(x)).collect();
            if !let_in.is_empty() {
                r.notes.push(format!(
                    "layers.{}.vars.{k}: pattern {:?} accepts {let_in:?}; metadata matching it reaches commands and playbooks as is (Jinja markers are refused for ansible anyway). Prefer a strict pattern such as \"[a-z0-9-]{{1,32}}\"",
                    l.name,
                    p.source()
                ));
            }
        }
    }
    if cfg.uses_ssh() && cfg.ssh.host_key_check == crate::ssh::HostKeyCheck::Off {
        r.notes.push(
            "ssh.host_key_check = \"off\": instances' host keys are not checked; anyone on the path can impersonate an instance and receive what the steps send".into(),
        );
    }
    if cfg.notify.is_none() {
        r.notes
            .push("notify: no result topic; results are only in the local history".into());
    }
    r
}

/// Every playbook of an `ansible` step exists and passes `ansible-playbook --syntax-check`.
/// The vault password comes from its credential; from SSM only with `--aws`.
pub async fn playbooks(cfg: &Config, aws: bool, r: &mut Report) {
    use crate::step::{ansible, StepKind};
    let mut books: Vec<(String, String)> = Vec::new();
    for l in &cfg.layers {
        for (which, steps) in l.step_lists() {
            for (i, s) in steps.iter().enumerate() {
                if let StepKind::Ansible(a) = &s.kind {
                    if !books.iter().any(|(_, b)| *b == a.playbook) {
                        books.push((
                            format!("layers.{}.{which}[{i}]", l.name),
                            a.playbook.clone(),
                        ));
                    }
                }
            }
        }
    }
    if books.is_empty() {
        return;
    }
    let vault = match &cfg.ansible.vault_password {
        None => None,
        Some(crate::secret::Source::Credential(n)) => match crate::secret::read_credential(n) {
            Ok(s) => Some(s),
            Err(e) => {
                r.problems.push(format!("ansible.vault_password: {e}"));
                None
            }
        },
        Some(crate::secret::Source::SsmParameter(n)) if aws => {
            let sdk_cfg = sdk::load_config(cfg.aws.max_attempts, cfg.aws.attempt_timeout).await;
            let calls = CountCalls(Arc::new(Stats::default()));
            let ssm = SsmClient::new(&sdk_cfg, &calls);
            match crate::aws::Ssm::parameter(&ssm, n).await {
                Ok(s) => Some(s),
                Err(e) => {
                    r.problems
                        .push(format!("ansible.vault_password: SSM parameter {n}: {e}"));
                    None
                }
            }
        }
        Some(crate::secret::Source::SsmParameter(n)) => {
            r.notes.push(format!(
                "ansible.vault_password: SSM parameter {n} not read without --aws; playbooks that need it will fail the syntax check"
            ));
            None
        }
    };
    for (key, book) in books {
        match ansible::syntax_check(&cfg.ansible, &book, vault.as_ref()).await {
            Ok(()) => r.notes.push(format!("playbook {book}: syntax ok")),
            Err(e) => r
                .problems
                .push(format!("{key}.ansible: playbook {book}: {e}")),
        }
    }
}

/// The queue ARN for a queue URL (`https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`, or an
/// endpoint's `/ACCOUNT/NAME`).
pub fn queue_arn(url: &str, region: &str) -> Option<String> {
    let mut parts = url.trim_end_matches('/').rsplit('/');
    let name = parts.next()?;
    let account = parts.next()?;
    (account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("arn:aws:sqs:{region}:{account}:{name}"))
}

/// What AWS says, added to `r`: what every source shares (the result topic, the claims
/// table) with the host's credentials, then each source with its own (its role assumed).
pub async fn with_aws(cfg: &Config, r: &mut Report) {
    let sdk_cfg = sdk::load_config(cfg.aws.max_attempts, cfg.aws.attempt_timeout).await;
    let calls = CountCalls(Arc::new(Stats::default()));
    if let Some(n) = &cfg.notify {
        let sns = SnsNotifier::new(&sdk_cfg, &calls);
        match sns.check_topic(&n.topic_arn).await {
            Ok(()) => r
                .notes
                .push(format!("notify.topic_arn: {} exists", n.topic_arn)),
            Err(e) => r.problems.push(format!("notify.topic_arn: {e}")),
        }
    }
    if let Some(table) = &cfg.state.claims_table {
        check_claims_table(&sdk_cfg, &calls, table, r).await;
    }
    for source in &cfg.sources {
        let named = source.name != DEFAULT_SOURCE;
        let mut sr = Report::default();
        check_source(cfg, &sdk_cfg, source, &calls, &mut sr).await;
        // A source's findings name it; the `[queue]` source's read as they always did.
        let tell = |m: String| match named {
            true => format!("sources.{}: {m}", source.name),
            false => m,
        };
        r.notes.extend(sr.notes.into_iter().map(tell));
        r.problems.extend(sr.problems.into_iter().map(tell));
    }
}

/// One source, with its credentials: a role that cannot be assumed is the one problem
/// said (nothing else can be asked of its account), and the other sources are checked on.
async fn check_source(
    cfg: &Config,
    host: &aws_config::SdkConfig,
    source: &SourceConfig,
    calls: &CountCalls,
    r: &mut Report,
) {
    let sdk_cfg = sdk::source_config(host, source, calls).await;
    if let Some(role) = &source.role {
        match sdk::credentials_work(&sdk_cfg).await {
            Ok(()) => r.notes.push(format!("role {} assumed", role.arn)),
            Err(e) => {
                r.problems.push(format!(
                    "cannot assume role {} (is the member account's role deployed, trusting this host's role, with this external id?): {e}",
                    role.arn
                ));
                return;
            }
        }
    }
    let region = sdk_cfg.region().map(|r| r.to_string()).unwrap_or_default();
    let queue = SqsQueue::new(&sdk_cfg, calls, &source.url);
    let key = match source.name.as_str() {
        DEFAULT_SOURCE => "queue.url",
        _ => "url",
    };
    check_queue(cfg, &queue, key, r).await;
    let hooks = AutoScalingHooks::new(&sdk_cfg, calls);
    let groups = match hooks.groups().await {
        Ok(g) => g,
        Err(e) => {
            r.problems
                .push(format!("cannot list Auto Scaling groups: {e}"));
            return;
        }
    };
    let arn = queue_arn(&source.url, &region).unwrap_or_default();
    for layer in &cfg.layers {
        check_layer_groups(layer, &groups, &hooks, &arn, r).await;
    }
    let instances = Ec2Instances::new(&sdk_cfg, calls);
    let managed = groups.iter().filter(|g| {
        cfg.layers
            .iter()
            .any(|l| l.matcher.groups.iter().any(|glob| glob.matches(g)))
    });
    for g in managed {
        count_unreconciled(cfg, g, &hooks, &instances, r).await;
    }
}

/// How many of a group's instances wait in a lifecycle wait state, and how many are in
/// service without the mark a launch run of ours writes (what `provision reconcile` works
/// and reports).
async fn count_unreconciled(
    cfg: &Config,
    group: &str,
    hooks: &AutoScalingHooks,
    instances: &Ec2Instances,
    r: &mut Report,
) {
    use crate::aws::{Instances as _, LifecycleState as S};
    let members = match hooks.group_members(group).await {
        Ok(m) => m,
        Err(e) => {
            r.problems
                .push(format!("group {group}: cannot list its instances: {e}"));
            return;
        }
    };
    let waiting = members
        .iter()
        .filter(|m| matches!(m.state, S::PendingWait | S::TerminatingWait))
        .count();
    let in_service: Vec<crate::event::InstanceId> = members
        .iter()
        .filter(|m| m.state == S::InService)
        .filter_map(|m| crate::event::InstanceId::parse(&m.instance_id).ok())
        .collect();
    let unconfigured = if !cfg.reconcile.unconfigured.marks() || in_service.is_empty() {
        None
    } else {
        match instances.describe(&in_service).await {
            Ok(infos) => Some(
                infos
                    .iter()
                    .filter(|i| !i.tags.contains_key(crate::pipeline::CONFIGURED_TAG))
                    .count(),
            ),
            Err(e) => {
                r.problems
                    .push(format!("group {group}: cannot describe its instances: {e}"));
                return;
            }
        }
    };
    let unconfigured = match unconfigured {
        Some(n) => format!(
            "{n} in service unconfigured (no {} tag)",
            crate::pipeline::CONFIGURED_TAG
        ),
        None => "in service unconfigured: not looked for (reconcile.unconfigured = \"off\")".into(),
    };
    r.notes.push(format!(
        "group {group}: {waiting} waiting in a lifecycle wait state, {unconfigured}"
    ));
}

/// The fleet's claims table exists, is keyed as claims need, and expires old claims.
async fn check_claims_table(
    sdk_cfg: &aws_config::SdkConfig,
    calls: &CountCalls,
    table: &str,
    r: &mut Report,
) {
    match crate::aws::dynamo::check_table(sdk_cfg, calls, table).await {
        Ok(warnings) if warnings.is_empty() => r.notes.push(format!(
            "state.claims_table: {table} is active, keyed by token, old claims expire (TTL on expires_at)"
        )),
        Ok(warnings) => r.notes.extend(
            warnings
                .into_iter()
                .map(|w| format!("state.claims_table: {w}")),
        ),
        Err(e) => r.problems.push(format!("state.claims_table: {e}")),
    }
}

/// The queue is readable, and its dead-letter setup fits `queue.on_reject`.
async fn check_queue(cfg: &Config, queue: &SqsQueue, key: &str, r: &mut Report) {
    match queue.redrive_policy().await {
        Ok(Some(p)) => r.notes.push(format!("queue: readable, dead-letter queue configured ({p})")),
        Ok(None) if cfg.queue.on_reject == OnReject::DeadLetter => r.problems.push(
            "queue.on_reject = \"dead-letter\" but the queue has no RedrivePolicy: rejected messages would loop".into(),
        ),
        Ok(None) => r.notes.push("queue: readable, no dead-letter queue (rejected messages are deleted)".into()),
        Err(e) => r.problems.push(format!("{key}: cannot read the queue: {e}")),
    }
}

/// The groups a layer matches, and which of their hooks notify the queue (`queue_arn`), or
/// an SNS topic (which the queue may subscribe to: subscriptions are not checked).
async fn check_layer_groups(
    layer: &Layer,
    groups: &[String],
    hooks: &AutoScalingHooks,
    queue_arn: &str,
    r: &mut Report,
) {
    let ours = |target: &str| target == queue_arn || target.contains(":sns:");
    let matched: Vec<&String> = groups
        .iter()
        .filter(|g| layer.matcher.groups.iter().any(|glob| glob.matches(g)))
        .collect();
    if matched.is_empty() {
        let globs: Vec<&str> = layer.matcher.groups.iter().map(|g| g.as_str()).collect();
        r.notes.push(format!(
            "layers.{}: no Auto Scaling group matches {globs:?} yet",
            layer.name
        ));
    }
    for g in matched {
        let list = match hooks.describe_hooks(g).await {
            Ok(list) => list,
            Err(e) => {
                r.problems.push(format!(
                    "group {g}: cannot describe its lifecycle hooks: {e}"
                ));
                continue;
            }
        };
        let notifying: Vec<String> = list
            .iter()
            .filter(|(_, h)| h.notification_target.as_deref().is_some_and(ours))
            .map(|(name, h)| {
                format!(
                    "{name} ({})",
                    h.transition.as_str().trim_start_matches("autoscaling:")
                )
            })
            .collect();
        if notifying.is_empty() {
            r.notes.push(format!(
                "group {g} (layer {}): no lifecycle hook notifies the queue or an SNS topic; fine only if an EventBridge rule delivers its events",
                layer.name
            ));
        } else {
            r.notes.push(format!(
                "group {g} (layer {}): hooks {}",
                layer.name,
                notifying.join(", ")
            ));
        }
        check_warm_pool(layer, g, hooks, r).await;
    }
}

/// A group's warm pool, and which of the layer's step lists its instances will run.
async fn check_warm_pool(layer: &Layer, group: &str, hooks: &AutoScalingHooks, r: &mut Report) {
    use crate::aws::WarmPoolState;
    use crate::event::Phase;
    let pool = match hooks.warm_pool(group).await {
        Ok(Some(pool)) => pool,
        Ok(None) => return,
        Err(e) => {
            r.problems
                .push(format!("group {group}: cannot describe its warm pool: {e}"));
            return;
        }
    };
    let count = |phase| layer.steps(phase).len();
    let enter_from = if layer.pool_enter.is_some() {
        "pool_enter"
    } else {
        "launch, as layers.*.pool_enter is not set"
    };
    r.notes.push(format!(
        "group {group} (layer {}): warm pool, {} instance(s) kept {}, min size {}, {}; entering it runs {} step(s) ({enter_from}), leaving it {} (pool_leave), returning to it {} (pool_return)",
        layer.name,
        pool.instances.len(),
        pool.pool_state.as_str().to_lowercase(),
        pool.min_size,
        if pool.reuse_on_scale_in { "scale-in returns instances to it" } else { "scale-in terminates" },
        count(Phase::PoolEnter),
        count(Phase::PoolLeave),
        count(Phase::PoolReturn),
    ));
    let needs_running = |phase| {
        layer
            .steps(phase)
            .iter()
            .any(|s| s.needs_running_instance())
    };
    if pool.pool_state != WarmPoolState::Running && needs_running(Phase::Terminate) {
        r.notes.push(format!(
            "layers.{}.terminate: ssm/ssh/ansible steps fail at once for instances terminated from the {} warm pool of {group} (they are not running)",
            layer.name,
            pool.pool_state.as_str().to_lowercase()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_arns_from_urls() {
        assert_eq!(
            queue_arn(
                "https://sqs.us-east-1.amazonaws.com/123456789012/asg-lifecycle",
                "us-east-1"
            )
            .as_deref(),
            Some("arn:aws:sqs:us-east-1:123456789012:asg-lifecycle")
        );
        assert_eq!(
            queue_arn("http://127.0.0.1:5000/123456789012/q/", "eu-west-1").as_deref(),
            Some("arn:aws:sqs:eu-west-1:123456789012:q")
        );
        assert_eq!(queue_arn("https://example.com/q", "x"), None);
    }
}
