//! What Auto Scaling says, read for a reconcile pass: the groups the layers manage, their
//! members (and warm pools), each group's hooks, and which instances in service carry the
//! mark a successful launch run writes. Reads only; deciding is `mod.rs`'s.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::aws::{AwsError, GroupView, HookInfo, LifecycleState, Membership};
use crate::cache::TtlCache;
use crate::event::{InstanceId, Transition};
use crate::instance::{phase_of, Found};
use crate::pipeline::{Pipeline, CONFIGURED_TAG};
use crate::retry::with_backoff;

/// How long a group's hook descriptions serve reconcile passes.
const HOOKS_TTL: Duration = Duration::from_secs(600);

/// Hook descriptions, by group.
pub(super) type HookCache = TtlCache<String, Arc<Vec<(String, HookInfo)>>>;

pub(super) fn hook_cache() -> HookCache {
    TtlCache::new(HOOKS_TTL)
}

/// Every group some layer's `groups` pattern matches, with its members; a group with a
/// warm pool has the pool's instances added (one DescribeWarmPool for it).
pub(super) async fn managed_groups(p: &Pipeline) -> Result<Vec<GroupView>, AwsError> {
    let retry = p.config().aws.retry_for;
    let hooks = p.hooks().clone();
    let all = with_backoff(retry, || hooks.all_groups()).await?;
    let layers = &p.config().layers;
    let mut out = Vec::new();
    for mut g in all {
        if !layers
            .iter()
            .any(|l| l.matcher.groups.iter().any(|glob| glob.matches(&g.name)))
        {
            continue;
        }
        if g.has_warm_pool {
            if let Some(pool) = with_backoff(retry, || hooks.warm_pool(&g.name)).await? {
                g.members.extend(pool.instances);
            }
        }
        out.push(g);
    }
    Ok(out)
}

/// The group's hooks, from the cache.
pub(super) async fn hooks_of(
    p: &Pipeline,
    cache: &HookCache,
    group: &str,
) -> Result<Arc<Vec<(String, HookInfo)>>, AwsError> {
    let retry = p.config().aws.retry_for;
    let hooks = p.hooks().clone();
    cache
        .get_or_load(&group.to_string(), || async {
            with_backoff(retry, || hooks.describe_hooks(group))
                .await
                .map(Arc::new)
        })
        .await
}

/// The transition an instance in `state` waits for, if it waits.
pub(super) fn waits(state: &LifecycleState) -> Option<Transition> {
    use LifecycleState::*;
    match state {
        PendingWait | WarmedPendingWait => Some(Transition::Launch),
        TerminatingWait | WarmedTerminatingWait => Some(Transition::Terminate),
        _ => None,
    }
}

/// `m` as the manual command would find it: waiting for `transition` (pending), or in
/// service (a launch run with nothing to complete). `hook` is the group's only hook for
/// the transition, when it has exactly one.
pub(super) fn found(
    m: &Membership,
    transition: Transition,
    pending: bool,
    hooks: &[(String, HookInfo)],
) -> Option<Found> {
    let id = InstanceId::parse(&m.instance_id).ok()?;
    let mut candidates = hooks.iter().filter(|(_, h)| h.transition == transition);
    let hook = match (candidates.next(), candidates.next()) {
        (Some(one), None) => Some(one.clone()),
        _ => None,
    };
    Some(Found {
        id,
        group: m.group.clone(),
        phase: phase_of(Some(&m.state), transition),
        state: Some(m.state.clone()),
        transition,
        pending,
        hook,
    })
}

/// Of `ids` (instances in service), those without the configured mark, asking EC2 only
/// about instances not yet known to carry it (`known` remembers those that do: a mark is
/// never taken off by us). DescribeInstances takes 200 ids a call.
pub(super) async fn unmarked(
    p: &Pipeline,
    ids: Vec<InstanceId>,
    known: &std::sync::Mutex<HashSet<String>>,
) -> Result<HashSet<String>, AwsError> {
    let ask: Vec<InstanceId> = {
        let known = known.lock().unwrap();
        ids.into_iter()
            .filter(|id| !known.contains(id.as_str()))
            .collect()
    };
    if ask.is_empty() {
        return Ok(HashSet::new());
    }
    let instances = p.services().instances.clone();
    let retry = p.config().aws.retry_for;
    let infos = with_backoff(retry, || instances.describe(&ask)).await?;
    let marked: HashMap<&str, bool> = infos
        .iter()
        .map(|i| (i.id.as_str(), i.tags.contains_key(CONFIGURED_TAG)))
        .collect();
    let mut known = known.lock().unwrap();
    let mut out = HashSet::new();
    for id in ask {
        match marked.get(id.as_str()) {
            Some(true) => {
                known.insert(id.to_string());
            }
            // Absent from EC2's answer: gone already; nothing to configure.
            None => {}
            Some(false) => {
                out.insert(id.to_string());
            }
        }
    }
    Ok(out)
}

/// AWS calls made between two snapshots of the call counters, by "service:Operation".
pub fn calls_between(
    before: &BTreeMap<(String, String), u64>,
    after: &BTreeMap<(String, String), u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, n)| {
            let d = n - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| (format!("{}:{}", k.0, k.1), d))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::autoscaling::HookTransition;

    fn hook(transition: HookTransition) -> HookInfo {
        HookInfo {
            transition,
            notification_metadata: Some(r#"{"environment":"production"}"#.into()),
            ..HookInfo::default()
        }
    }

    fn member(state: LifecycleState) -> Membership {
        Membership {
            instance_id: "i-0123456789abcdef0".into(),
            group: "web-a".into(),
            state,
        }
    }

    #[test]
    fn every_wait_state_waits_for_its_transition_and_nothing_else_waits() {
        use LifecycleState::*;
        assert_eq!(waits(&PendingWait), Some(Transition::Launch));
        assert_eq!(waits(&WarmedPendingWait), Some(Transition::Launch));
        assert_eq!(waits(&TerminatingWait), Some(Transition::Terminate));
        assert_eq!(waits(&WarmedTerminatingWait), Some(Transition::Terminate));
        for other in [InService, Pending, Terminating, WarmedStopped, Standby] {
            assert_eq!(waits(&other), None, "{other}");
        }
    }

    #[test]
    fn an_instance_is_found_with_the_groups_only_hook_of_its_transition() {
        let hooks = vec![
            ("launch".to_string(), hook(HookTransition::Launching)),
            ("terminate".to_string(), hook(HookTransition::Terminating)),
        ];
        let f = found(
            &member(LifecycleState::PendingWait),
            Transition::Launch,
            true,
            &hooks,
        )
        .unwrap();
        assert_eq!(f.hook.as_ref().map(|(n, _)| n.as_str()), Some("launch"));
        assert!(f.pending);
        assert_eq!(f.phase, crate::event::Phase::Launch);
        let f = found(
            &member(LifecycleState::WarmedPendingWait),
            Transition::Launch,
            true,
            &hooks,
        )
        .unwrap();
        assert_eq!(f.phase, crate::event::Phase::PoolEnter);
        // Two hooks for one transition: Auto Scaling does not say which holds the instance.
        let two = vec![
            ("a".to_string(), hook(HookTransition::Launching)),
            ("b".to_string(), hook(HookTransition::Launching)),
        ];
        let f = found(
            &member(LifecycleState::PendingWait),
            Transition::Launch,
            true,
            &two,
        )
        .unwrap();
        assert!(f.hook.is_none());
        // An id that is not an instance id is no finding at all.
        let mut bad = member(LifecycleState::PendingWait);
        bad.instance_id = "i-; rm -rf /".into();
        assert!(found(&bad, Transition::Launch, true, &hooks).is_none());
    }

    #[test]
    fn a_pass_counts_only_its_own_calls() {
        let k = |s: &str, o: &str| (s.to_string(), o.to_string());
        let before = BTreeMap::from([(k("sqs", "ReceiveMessage"), 5)]);
        let after = BTreeMap::from([
            (k("sqs", "ReceiveMessage"), 5),
            (k("autoscaling", "DescribeAutoScalingGroups"), 1),
        ]);
        assert_eq!(
            calls_between(&before, &after),
            BTreeMap::from([("autoscaling:DescribeAutoScalingGroups".to_string(), 1)])
        );
    }
}
