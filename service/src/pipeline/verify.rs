//! Showing a lifecycle action genuine before anything runs for it.
//!
//! Anyone allowed to send to the queue can write a message, so a message is a claim, not a
//! fact. Before anything is stored or runs for it, Auto Scaling must confirm it, in two
//! parts:
//!
//! - **Described**: the group has the hook, and the hook's transition is the message's. The
//!   group's recent member list (one DescribeAutoScalingGroups per group and burst; one
//!   DescribeWarmPool for warm-pool actions) says which phase the instance waits for, so
//!   that entering the warm pool, leaving it and returning to it are told apart by AWS's
//!   word, not the message's.
//! - **Proven**: a heartbeat naming the group, the hook, the instance and the message's token
//!   ([`Verifier::confirm`]). Auto Scaling answers it only for that instance's active action
//!   of that hook, so a message with a token of its sender's choosing is refused here. The
//!   proof is also the action's first heartbeat (a backlogged action is kept alive at
//!   pickup), and it costs one call per action: the price of never acting on a guess.
//!
//! A member list that does not show the instance waiting yet (Describe* lags the
//! notification) does not reject a message: the proof decides, and the list is read again
//! for the phase. The steps see the hook's metadata, never the message's copy.
//!
//! Junk is bounded in cost: every call made for a message that turns out forged is charged
//! to a [`Budget`] that refills at [`JUNK_CALLS_PER_SECOND`]; while it is spent, asking
//! about messages not yet confirmed waits. A genuine message costs the budget nothing, so
//! without junk nothing ever waits, and with a flood of it Auto Scaling (whose quotas the
//! genuine completions share) sees at most that rate from us on its behalf.
//! Owns no decision about what a forged message becomes: the run ends as [`End::Forged`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::run::End;
use crate::aws::{
    Action, ActionCall, AwsError, ErrorClass, HookInfo, Hooks, LifecycleState, Membership,
};
use crate::cache::TtlCache;
use crate::event::{LifecycleEvent, Metadata, Phase, Place};
use crate::lease::heartbeat_interval;
use crate::retry::{in_flight_rounds, with_backoff, Backoff, Retry};

/// How long a group's member list answers for it. A burst of launches into one group is
/// verified with a call or two; a message the list does not confirm looks again, once.
const SNAPSHOT_TTL: Duration = Duration::from_secs(2);
/// How long a group's hook descriptions are trusted before being fetched again.
const HOOK_INFO_TTL: Duration = Duration::from_secs(300);
/// A message naming a hook the cached description of an existing group lacks has it
/// described again once the description is this old (waiting until then if younger): a
/// hook created just now is found, and junk naming made-up hooks costs a group at most
/// one call per this much time.
const HOOK_RECHECK_AFTER: Duration = Duration::from_secs(2);
/// Heartbeat interval when the hook cannot be described: short enough for the 30 s minimum.
const FALLBACK_HEARTBEAT: Duration = Duration::from_secs(10);
/// The rate at which calls spent on forged messages are forgiven.
pub(super) const JUNK_CALLS_PER_SECOND: f64 = 10.0;
/// How many such calls may be spent at once before asking waits.
const JUNK_BURST: f64 = 50.0;

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
    hook_info: TtlCache<String, Arc<GroupHooks>>,
    snapshots: Snapshots,
    budget: Budget,
}

/// A group's lifecycle hooks by name, as one DescribeLifecycleHooks said.
#[derive(Default)]
struct GroupHooks {
    /// False when AWS knows no such group.
    exists: bool,
    by_name: HashMap<String, HookInfo>,
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

/// What the descriptions say, before the proof.
enum Described {
    /// The group has the hook, of the message's transition; `waiting` is None when the
    /// member list shows the instance waiting for the message's phase, else why not.
    Hook {
        hook: HookInfo,
        waiting: Option<String>,
    },
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
            budget: Budget::new(JUNK_CALLS_PER_SECOND, JUNK_BURST),
        }
    }

    /// Auto Scaling's confirmation of `ev`, its token proven by a heartbeat of `action`;
    /// asked again with growing pauses while asking fails for a transient reason, until
    /// `until` (when the action can no longer be completed) or `stop`.
    pub(super) async fn confirm(
        &self,
        ev: &LifecycleEvent,
        action: &Action,
        until: Instant,
        stop: &CancellationToken,
    ) -> Result<Verified, End> {
        let says = "cannot verify the lifecycle action yet; the message stays in flight";
        let asking = Retry::new(self.rounds, says).until(until).unless(stop);
        match asking.run(|| self.judge(ev, action)).await {
            Ok(Verdict::Genuine { metadata, note }) => Ok(Verified { metadata, note }),
            Ok(Verdict::Forged(why)) => Err(End::Forged(why)),
            Err(e) => Err(End::Unverified(e)),
        }
    }

    /// The descriptions, then the proof. A forged verdict is charged to the budget.
    async fn judge(&self, ev: &LifecycleEvent, action: &Action) -> Result<Verdict, AwsError> {
        self.budget.wait().await;
        let (hook, waiting) = match self.describe(ev).await? {
            Described::Forged(why) => {
                self.budget.charge(1.0);
                return Ok(Verdict::Forged(why));
            }
            Described::Hook { hook, waiting } => (hook, waiting),
        };
        let refused = match with_backoff(self.retry_for, || self.hooks.heartbeat(action)).await {
            Ok(ActionCall::Done) => None,
            Ok(ActionCall::NotActive(reason)) => Some(reason),
            // A token or name AWS finds malformed: not an action either.
            Err(e) if e.class == ErrorClass::Validation => Some(e.message),
            Err(e) => return Err(e),
        };
        if let Some(reason) = refused {
            self.budget.charge(1.0);
            let seen = waiting.unwrap_or_else(|| "its member list shows it waiting".into());
            return Ok(Verdict::Forged(format!(
                "the token is not the instance's active lifecycle action ({seen}; Auto Scaling: {reason})"
            )));
        }
        let note = match waiting {
            None => None,
            Some(why) => match self.seen_after_proof(ev, why).await {
                Ok(note) => note,
                Err(wrong) => return Ok(Verdict::Forged(wrong)),
            },
        };
        Ok(self.hook_metadata(ev, hook, note).await)
    }

    /// A proven action the member list did not show waiting: the list is read afresh (it
    /// may predate the action), then the instance alone (DescribeAutoScalingInstances, which
    /// also sees warm pools). An instance AWS shows waiting for another phase is forged (the
    /// message lies about where it goes); one not shown waiting yet stands on its proof,
    /// and the note says so. Only a proven message gets here, so junk never pays for this.
    async fn seen_after_proof(
        &self,
        ev: &LifecycleEvent,
        why: String,
    ) -> Result<Option<String>, String> {
        let key = (ev.group.clone(), List::of(ev));
        self.snapshots.invalidate(&key);
        if let Ok(members) = self.members_of(&key).await {
            if not_waiting(ev, members.get(ev.instance_id.as_str())).is_none() {
                return Ok(None);
            }
        }
        let member = with_backoff(self.retry_for, || self.hooks.membership(&ev.instance_id)).await;
        if let Ok(Some(m)) = &member {
            let other_wait = m.state.as_str().ends_with(":Wait");
            if let Some(wrong) = not_waiting(ev, Some(m)).filter(|_| other_wait) {
                return Err(wrong);
            }
        }
        info!(%why, "Auto Scaling's descriptions do not show the instance waiting yet; the heartbeat proved the action");
        Ok(Some(format!(
            "Auto Scaling's descriptions did not show the action yet ({why}); its heartbeat proved it"
        )))
    }

    /// How often to heartbeat `action`: a third of its hook's heartbeat timeout.
    /// A hook that cannot be described is warned about here, once per run.
    pub(super) async fn heartbeat_every(&self, action: &Action) -> Duration {
        match self.hooks_of(&action.group).await {
            Ok(group) => match group.by_name.get(&action.hook) {
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
        self.hooks_of(group).await.ok()?.by_name.get(hook).cloned()
    }

    /// A group's lifecycle hooks, from one DescribeLifecycleHooks per group (cached, and
    /// shared by concurrent callers so a burst of launches makes one call). A group that
    /// does not exist (AWS answers ValidationError) has none, and that is cached too: a
    /// message naming it asks once.
    async fn hooks_of(&self, group: &str) -> Result<Arc<GroupHooks>, AwsError> {
        self.hook_info
            .get_or_load(&group.to_string(), || async {
                match with_backoff(self.retry_for, || self.hooks.describe_hooks(group)).await {
                    Ok(v) => Ok(Arc::new(GroupHooks {
                        exists: true,
                        by_name: v.into_iter().collect(),
                    })),
                    Err(e) if !e.retryable() && e.code.as_deref() == Some("ValidationError") => {
                        Ok(Arc::default())
                    }
                    Err(e) => Err(e),
                }
            })
            .await
    }

    /// What the descriptions say of `ev`: the hook and its transition, and whether the
    /// group's recent member list (the group's, or its warm pool's for an action in the
    /// pool) shows the instance waiting for the message's phase. A transient AWS error is
    /// returned as such. Nothing here is read afresh for a message's sake but the hooks of
    /// a group that lacks the message's hook (once, charged to the budget when still
    /// missing): junk cannot make the shared lists be read again.
    async fn describe(&self, ev: &LifecycleEvent) -> Result<Described, AwsError> {
        let Some(hook) = self.hook_of(ev).await? else {
            return Ok(Described::Forged(format!(
                "group {:?} has no lifecycle hook {:?}",
                ev.group, ev.hook
            )));
        };
        if hook.transition != ev.transition {
            return Ok(Described::Forged(format!(
                "hook {:?} is a {} hook, the message says {}",
                ev.hook,
                hook.transition,
                ev.transition.aws_name()
            )));
        }
        let key = (ev.group.clone(), List::of(ev));
        let members = self.members_of(&key).await?;
        let waiting = not_waiting(ev, members.get(ev.instance_id.as_str()));
        Ok(Described::Hook { hook, waiting })
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

    /// The event's hook, described again when the cached group has no such hook (it may
    /// just have been created) and the description is older than [`HOOK_RECHECK_AFTER`].
    /// None when the group or hook does not exist.
    async fn hook_of(&self, ev: &LifecycleEvent) -> Result<Option<HookInfo>, AwsError> {
        let group = self.hooks_of(&ev.group).await?;
        if let Some(h) = group.by_name.get(&ev.hook) {
            return Ok(Some(h.clone()));
        }
        if !group.exists {
            return Ok(None);
        }
        let age = self.hook_info.age(&ev.group).unwrap_or(Duration::MAX);
        if age < HOOK_RECHECK_AFTER {
            tokio::time::sleep(HOOK_RECHECK_AFTER - age).await;
        }
        // Another message may have had it described again meanwhile.
        if self.hook_info.age(&ev.group).unwrap_or(Duration::MAX) >= HOOK_RECHECK_AFTER {
            self.budget.wait().await;
            self.hook_info.invalidate(&ev.group);
        }
        Ok(self
            .hooks_of(&ev.group)
            .await?
            .by_name
            .get(&ev.hook)
            .cloned())
    }

    /// The hook's NotificationMetadata, which wins over the message's copy. When they differ
    /// the hook is described once more (an operator may just have edited it).
    async fn hook_metadata(
        &self,
        ev: &LifecycleEvent,
        cached: HookInfo,
        note: Option<String>,
    ) -> Verdict {
        let from_hook = |h: &HookInfo| Metadata::parse(h.notification_metadata.as_deref());
        let mut metadata = from_hook(&cached);
        if metadata == ev.metadata {
            return Verdict::Genuine { metadata, note };
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
            return Verdict::Genuine { metadata, note };
        }
        warn!("the message's NotificationMetadata differs from the hook's; using the hook's");
        let differs =
            "the message's NotificationMetadata differs from the hook's; the hook's was used";
        Verdict::Genuine {
            metadata,
            note: Some(match note {
                Some(n) => format!("{differs}; {n}"),
                None => differs.into(),
            }),
        }
    }
}

/// Calls spent on messages that turned out forged, forgiven at `rate` per second up to
/// `burst`: while the balance is below zero, asking about a message not yet confirmed
/// waits. Genuine messages are never charged.
struct Budget {
    /// The balance, and when it was last brought up to date.
    state: Mutex<(f64, Instant)>,
    rate: f64,
    burst: f64,
}

impl Budget {
    fn new(rate: f64, burst: f64) -> Budget {
        Budget {
            state: Mutex::new((burst, Instant::now())),
            rate,
            burst,
        }
    }

    /// The balance now.
    fn balance(&self) -> f64 {
        let mut st = self.state.lock().unwrap();
        let now = Instant::now();
        st.0 = (st.0 + (now - st.1).as_secs_f64() * self.rate).min(self.burst);
        st.1 = now;
        st.0
    }

    /// Waits while the balance is spent.
    async fn wait(&self) {
        loop {
            let balance = self.balance();
            if balance >= 0.0 {
                return;
            }
            tokio::time::sleep(Duration::from_secs_f64(-balance / self.rate)).await;
        }
    }

    fn charge(&self, calls: f64) {
        self.balance();
        self.state.lock().unwrap().0 -= calls;
    }
}

/// Why `member` shows the event's instance is not waiting for it, or None when it is.
fn not_waiting(ev: &LifecycleEvent, member: Option<&Membership>) -> Option<String> {
    let id = &ev.instance_id;
    let Some(m) = member else {
        return Some(format!(
            "instance {id} is not listed in group {:?}",
            ev.group
        ));
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
