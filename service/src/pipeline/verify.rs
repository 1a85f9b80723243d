//! Showing a lifecycle action genuine before anything runs for it.
//!
//! Anyone allowed to send to the queue can write a message, so a message is a claim, not a
//! fact. Before a step runs, Auto Scaling must confirm it: the group has the hook, the hook's
//! transition is the message's, and the instance is a member of that group waiting in the
//! transition's wait state. The metadata the steps see is the hook's own, never the
//! message's copy. A group's member list (one DescribeAutoScalingGroups; one DescribeWarmPool
//! for instances in its warm pool, which the group's list leaves out) answers for every
//! instance of a burst for a couple of seconds, and hook descriptions come from the
//! verifier's cache (which also answers each hook's heartbeat timeout), so verifying costs
//! a call or two per group and burst, and adds no wait. A transient failure to ask keeps the
//! message in flight and asks again with growing pauses, while the action can be completed.
//! Owns no decision about what a forged message becomes: the run ends as [`End::Forged`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::run::End;
use crate::aws::{Action, AwsError, HookInfo, Hooks, LifecycleState, Membership};
use crate::cache::TtlCache;
use crate::event::{LifecycleEvent, Metadata, Phase, Place};
use crate::lease::heartbeat_interval;
use crate::retry::{in_flight_rounds, with_backoff, Backoff, Retry};

/// How long a group's member list answers for it. A burst of launches into one group is
/// verified with a call or two; a message the list does not confirm looks again, once.
const SNAPSHOT_TTL: Duration = Duration::from_secs(2);
/// How long a group's hook descriptions are trusted before being fetched again.
const HOOK_INFO_TTL: Duration = Duration::from_secs(300);
/// Heartbeat interval when the hook cannot be described: short enough for the 30 s minimum.
const FALLBACK_HEARTBEAT: Duration = Duration::from_secs(10);

/// Each group's members and their lifecycle states, by instance id: its instances
/// (DescribeAutoScalingGroups) and its warm pool's (DescribeWarmPool), which AWS lists apart.
type Snapshots = TtlCache<(String, List), Arc<HashMap<String, Membership>>>;

/// What Auto Scaling says of lifecycle actions, asked as seldom as a burst allows.
pub(super) struct Verifier {
    hooks: Arc<dyn Hooks>,
    /// How long one Describe call is retried.
    retry_for: Duration,
    /// The pauses between rounds of asking while a message waits in flight.
    rounds: Backoff,
    hook_info: TtlCache<String, Arc<HashMap<String, HookInfo>>>,
    snapshots: Snapshots,
}

/// A confirmed action: the hook's metadata, and how the message differed.
pub(super) struct Verified {
    pub(super) metadata: Metadata,
    pub(super) note: Option<String>,
}

/// Which of a group's member lists holds an event's instance while it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum List {
    Group,
    WarmPool,
}

impl List {
    fn of(ev: &LifecycleEvent) -> List {
        match ev.phase() {
            Phase::PoolEnter | Phase::PoolReturn => List::WarmPool,
            Phase::Terminate if ev.origin == Some(Place::WarmPool) => List::WarmPool,
            _ => List::Group,
        }
    }
}

/// What Auto Scaling says of a message's action.
#[derive(Debug)]
enum Verdict {
    /// The action is real. `metadata` is the hook's; `note` says how the message differed.
    Genuine {
        metadata: Metadata,
        note: Option<String>,
    },
    /// Not a waiting action of this group and hook: nothing may run for it.
    Forged(String),
}

impl Verifier {
    pub(super) fn new(hooks: Arc<dyn Hooks>, retry_for: Duration) -> Verifier {
        Verifier {
            hooks,
            retry_for: retry_for.min(Duration::from_secs(10)),
            rounds: in_flight_rounds(retry_for),
            hook_info: TtlCache::new(HOOK_INFO_TTL),
            snapshots: TtlCache::new(SNAPSHOT_TTL),
        }
    }

    /// Auto Scaling's confirmation of `ev`, asked again with growing pauses while asking
    /// fails for a transient reason, until `until` (when the action can no longer be
    /// completed) or `stop`.
    pub(super) async fn confirm(
        &self,
        ev: &LifecycleEvent,
        until: Instant,
        stop: &CancellationToken,
    ) -> Result<Verified, End> {
        let says = "cannot verify the lifecycle action yet; the message stays in flight";
        let asking = Retry::new(self.rounds, says).until(until).unless(stop);
        match asking.run(|| self.verify(ev)).await {
            Ok(Verdict::Genuine { metadata, note }) => Ok(Verified { metadata, note }),
            Ok(Verdict::Forged(why)) => Err(End::Forged(why)),
            Err(e) => Err(End::Unverified(e)),
        }
    }

    /// How often to heartbeat `action`: a third of its hook's heartbeat timeout.
    /// A hook that cannot be described is warned about here, once per run.
    pub(super) async fn heartbeat_every(&self, action: &Action) -> Duration {
        match self.hooks_of(&action.group).await {
            Ok(map) => match map.get(&action.hook) {
                Some(info) => heartbeat_interval(info.heartbeat_timeout),
                None => {
                    warn!(every = ?FALLBACK_HEARTBEAT,
                        "hook is not among the group's lifecycle hooks; heartbeating at the fallback interval");
                    FALLBACK_HEARTBEAT
                }
            },
            Err(e) => {
                warn!(error = %e, every = ?FALLBACK_HEARTBEAT,
                    "cannot describe the group's lifecycle hooks; heartbeating at the fallback interval");
                FALLBACK_HEARTBEAT
            }
        }
    }

    /// One hook's description (for its heartbeat timeout), from the cache; None when the
    /// group or hook cannot be described.
    pub(super) async fn hook(&self, group: &str, hook: &str) -> Option<HookInfo> {
        self.hooks_of(group).await.ok()?.get(hook).cloned()
    }

    /// A group's lifecycle hooks, from one DescribeLifecycleHooks per group (cached, and
    /// shared by concurrent callers so a burst of launches makes one call).
    async fn hooks_of(&self, group: &str) -> Result<Arc<HashMap<String, HookInfo>>, AwsError> {
        self.hook_info
            .get_or_load(&group.to_string(), || async {
                with_backoff(self.retry_for, || self.hooks.describe_hooks(group))
                    .await
                    .map(|v| Arc::new(v.into_iter().collect::<HashMap<_, _>>()))
            })
            .await
    }

    /// Asks Auto Scaling whether `ev` describes an action that is waiting now. A transient
    /// AWS error is returned as such; everything else is a verdict.
    async fn verify(&self, ev: &LifecycleEvent) -> Result<Verdict, AwsError> {
        let Some(hook) = self.hook_of(ev).await? else {
            return Ok(Verdict::Forged(format!(
                "group {:?} has no lifecycle hook {:?}",
                ev.group, ev.hook
            )));
        };
        if hook.transition != ev.transition {
            return Ok(Verdict::Forged(format!(
                "hook {:?} is a {} hook, the message says {}",
                ev.hook,
                hook.transition,
                ev.transition.aws_name()
            )));
        }
        let member = self.member(ev).await?;
        if let Some(why) = not_waiting(ev, member.as_ref()) {
            return Ok(Verdict::Forged(why));
        }
        Ok(self.hook_metadata(ev, hook).await)
    }

    /// The instance's membership: from the recent member list that should hold it (the
    /// group's, or its warm pool's for an instance in the pool) when it confirms the event;
    /// else from a fresh list (the cached one may predate the action); else, to say where
    /// the instance is, from DescribeAutoScalingInstances.
    async fn member(&self, ev: &LifecycleEvent) -> Result<Option<Membership>, AwsError> {
        let id = ev.instance_id.as_str();
        let key = (ev.group.clone(), List::of(ev));
        let cached = self.members_of(&key).await?;
        if let Some(m) = cached
            .get(id)
            .filter(|m| not_waiting(ev, Some(m)).is_none())
        {
            return Ok(Some(m.clone()));
        }
        self.snapshots.invalidate(&key);
        if let Some(m) = self.members_of(&key).await?.get(id) {
            return Ok(Some(m.clone()));
        }
        with_backoff(self.retry_for, || self.hooks.membership(&ev.instance_id)).await
    }

    async fn members_of(
        &self,
        key: &(String, List),
    ) -> Result<Arc<HashMap<String, Membership>>, AwsError> {
        let retry_for = self.retry_for;
        let group = key.0.as_str();
        self.snapshots
            .get_or_load(key, || async {
                let members = match key.1 {
                    List::Group => {
                        with_backoff(retry_for, || self.hooks.group_members(group)).await?
                    }
                    List::WarmPool => self.warm_pool_members(group, retry_for).await,
                };
                Ok(Arc::new(
                    members
                        .into_iter()
                        .map(|m| (m.instance_id.clone(), m))
                        .collect(),
                ))
            })
            .await
    }

    /// The group's warm pool instances (DescribeWarmPool); none when it cannot be described
    /// (DescribeAutoScalingInstances then answers for the instance).
    async fn warm_pool_members(&self, group: &str, retry_for: Duration) -> Vec<Membership> {
        match with_backoff(retry_for, || self.hooks.warm_pool(group)).await {
            Ok(pool) => pool.map(|p| p.instances).unwrap_or_default(),
            Err(e) => {
                warn!(error = %e, "cannot describe the group's warm pool; asking for the instance alone");
                Vec::new()
            }
        }
    }

    /// The event's hook, described again once when the cached group has no such hook (it
    /// may just have been created). None when the group or hook does not exist.
    async fn hook_of(&self, ev: &LifecycleEvent) -> Result<Option<HookInfo>, AwsError> {
        if let Some(h) = self.group_hooks(&ev.group).await?.get(&ev.hook) {
            return Ok(Some(h.clone()));
        }
        self.hook_info.invalidate(&ev.group);
        Ok(self.group_hooks(&ev.group).await?.get(&ev.hook).cloned())
    }

    /// The group's hooks; none when the group does not exist (AWS answers ValidationError).
    async fn group_hooks(&self, group: &str) -> Result<Arc<HashMap<String, HookInfo>>, AwsError> {
        match self.hooks_of(group).await {
            Err(e) if !e.retryable() && e.code.as_deref() == Some("ValidationError") => {
                Ok(Default::default())
            }
            other => other,
        }
    }

    /// The hook's NotificationMetadata, which wins over the message's copy. When they differ
    /// the hook is described once more (an operator may just have edited it).
    async fn hook_metadata(&self, ev: &LifecycleEvent, cached: HookInfo) -> Verdict {
        let from_hook = |h: &HookInfo| Metadata::parse(h.notification_metadata.as_deref());
        let mut metadata = from_hook(&cached);
        if metadata == ev.metadata {
            return Verdict::Genuine {
                metadata,
                note: None,
            };
        }
        self.hook_info.invalidate(&ev.group);
        match self.hook_of(ev).await {
            Ok(Some(fresh)) => metadata = from_hook(&fresh),
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "cannot describe the hook again; using its cached metadata")
            }
        }
        if metadata == ev.metadata {
            info!("the hook's metadata changed since it was cached; using the new one");
            return Verdict::Genuine {
                metadata,
                note: None,
            };
        }
        warn!("the message's NotificationMetadata differs from the hook's; using the hook's");
        Verdict::Genuine {
            metadata,
            note: Some(
                "the message's NotificationMetadata differs from the hook's; the hook's was used"
                    .into(),
            ),
        }
    }
}

/// Why `member` shows the event's instance is not waiting for it, or None when it is.
fn not_waiting(ev: &LifecycleEvent, member: Option<&Membership>) -> Option<String> {
    let id = &ev.instance_id;
    let Some(m) = member else {
        return Some(format!("instance {id} is not in an Auto Scaling group"));
    };
    if m.group != ev.group {
        return Some(format!(
            "instance {id} is in group {:?}, not {:?}",
            m.group, ev.group
        ));
    }
    // The phase, not only the transition: a message saying the instance enters the warm
    // pool is confirmed only by an instance waiting to enter it.
    let states = LifecycleState::waiting_for(ev.phase());
    (!states.contains(&m.state)).then(|| {
        let states: Vec<&str> = states.iter().map(LifecycleState::as_str).collect();
        format!(
            "instance {id} is {}, not waiting for a {} action ({})",
            m.state,
            ev.phase(),
            states.join(" or ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(transition: &str) -> LifecycleEvent {
        let body = serde_json::json!({
            "LifecycleTransition": transition,
            "AutoScalingGroupName": "web", "LifecycleHookName": "h",
            "EC2InstanceId": "i-0123456789abcdef0", "LifecycleActionToken": "t",
        });
        parsed(body)
    }

    fn parsed(body: serde_json::Value) -> LifecycleEvent {
        match crate::event::parse(&body.to_string()) {
            crate::event::Parsed::Event(e) => e,
            other => panic!("{other:?}"),
        }
    }

    fn member(group: &str, state: &str) -> Membership {
        Membership {
            instance_id: "i-0123456789abcdef0".into(),
            group: group.into(),
            state: state.into(),
        }
    }

    #[test]
    fn warm_pool_actions_are_confirmed_by_their_own_wait_states() {
        let place = |t: &str, o: &str, d: &str| {
            parsed(serde_json::json!({
                "LifecycleTransition": t, "Origin": o, "Destination": d,
                "AutoScalingGroupName": "web", "LifecycleHookName": "h",
                "EC2InstanceId": "i-0123456789abcdef0", "LifecycleActionToken": "t",
            }))
        };
        let enter = place("autoscaling:EC2_INSTANCE_LAUNCHING", "EC2", "WarmPool");
        let leave = place(
            "autoscaling:EC2_INSTANCE_LAUNCHING",
            "WarmPool",
            "AutoScalingGroup",
        );
        let back = place(
            "autoscaling:EC2_INSTANCE_TERMINATING",
            "AutoScalingGroup",
            "WarmPool",
        );
        let out = place("autoscaling:EC2_INSTANCE_TERMINATING", "WarmPool", "EC2");
        let genuine = [
            (&enter, "Warmed:Pending:Wait"),
            (&leave, "Pending:Wait"),
            (&back, "Warmed:Pending:Wait"),
            (&out, "Warmed:Terminating:Wait"),
        ];
        for (ev, state) in genuine {
            assert_eq!(
                not_waiting(ev, Some(&member("web", state))),
                None,
                "{state}"
            );
        }
        let lists: Vec<List> = [&enter, &leave, &back, &out].map(List::of).into();
        assert_eq!(
            lists,
            [List::WarmPool, List::Group, List::WarmPool, List::WarmPool],
            "where each instance waits"
        );
        let plain = event("autoscaling:EC2_INSTANCE_TERMINATING");
        assert_eq!(List::of(&plain), List::Group);
        let forged = [
            (&enter, "Pending:Wait"),
            (&leave, "Warmed:Pending:Wait"),
            (&back, "Terminating:Wait"),
            (&enter, "Warmed:Stopped"),
        ];
        for (ev, state) in forged {
            let why = not_waiting(ev, Some(&member("web", state)));
            assert!(why.is_some(), "{} in {state}", ev.phase());
        }
    }

    #[test]
    fn only_an_instance_waiting_in_the_messages_group_is_genuine() {
        let launch = event("autoscaling:EC2_INSTANCE_LAUNCHING");
        let terminate = event("autoscaling:EC2_INSTANCE_TERMINATING");
        assert_eq!(
            not_waiting(&launch, Some(&member("web", "Pending:Wait"))),
            None
        );
        assert_eq!(
            not_waiting(&terminate, Some(&member("web", "Terminating:Wait"))),
            None
        );
        let forged = [
            (&launch, None),
            (&launch, Some(member("other", "Pending:Wait"))),
            (&launch, Some(member("web", "InService"))),
            (&launch, Some(member("web", "Terminating:Wait"))),
            (&terminate, Some(member("web", "InService"))),
            (&terminate, Some(member("web", "Pending:Wait"))),
        ];
        for (ev, m) in forged {
            let why = not_waiting(ev, m.as_ref());
            assert!(why.is_some(), "{m:?} for {}", ev.transition);
        }
        let why = not_waiting(&launch, Some(&member("web", "InService"))).unwrap();
        assert!(
            why.contains("InService") && why.contains("Pending:Wait"),
            "{why}"
        );
        let why = not_waiting(&launch, Some(&member("web", "Warmed:Pending:Wait"))).unwrap();
        assert!(why.contains("not waiting for a launch action"), "{why}");
    }
}
