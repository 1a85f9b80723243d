//! Auto Scaling: the lifecycle hooks and their actions (heartbeat, complete), group
//! membership and lifecycle states, warm pools.

use std::time::Duration;

use async_trait::async_trait;

use super::sdk::classify;
use super::AwsError;
use crate::event::{InstanceId, Phase, Transition};
use crate::metrics::CountCalls;
use crate::outcome::HookResult;

/// Identifies one lifecycle action for the Auto Scaling API.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Action {
    pub group: String,
    pub hook: String,
    pub instance_id: InstanceId,
    /// The action's token; None completes or heartbeats by instance id (manual runs,
    /// where no message carried a token).
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HookInfo {
    pub heartbeat_timeout: Duration,
    pub default_result: HookResult,
    pub transition: HookTransition,
    pub notification_target: Option<String>,
    pub notification_metadata: Option<String>,
}

/// An instance's place in Auto Scaling (DescribeAutoScalingInstances).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub instance_id: String,
    pub group: String,
    pub state: LifecycleState,
}

vocabulary! {
    /// The transition a lifecycle hook is for (`LifecycleTransition`).
    pub enum HookTransition {
        Launching = "autoscaling:EC2_INSTANCE_LAUNCHING",
        Terminating = "autoscaling:EC2_INSTANCE_TERMINATING",
    }
}

impl PartialEq<Transition> for HookTransition {
    fn eq(&self, t: &Transition) -> bool {
        matches!(
            (self, t),
            (HookTransition::Launching, Transition::Launch)
                | (HookTransition::Terminating, Transition::Terminate)
        )
    }
}

vocabulary! {
    /// An instance's lifecycle state in its group or its warm pool.
    pub enum LifecycleState {
        Pending = "Pending",
        PendingWait = "Pending:Wait",
        PendingProceed = "Pending:Proceed",
        Quarantined = "Quarantined",
        InService = "InService",
        Terminating = "Terminating",
        TerminatingWait = "Terminating:Wait",
        TerminatingProceed = "Terminating:Proceed",
        Terminated = "Terminated",
        Detaching = "Detaching",
        Detached = "Detached",
        EnteringStandby = "EnteringStandby",
        Standby = "Standby",
        WarmedPending = "Warmed:Pending",
        WarmedPendingWait = "Warmed:Pending:Wait",
        WarmedPendingProceed = "Warmed:Pending:Proceed",
        WarmedTerminating = "Warmed:Terminating",
        WarmedTerminatingWait = "Warmed:Terminating:Wait",
        WarmedTerminatingProceed = "Warmed:Terminating:Proceed",
        WarmedTerminated = "Warmed:Terminated",
        WarmedStopped = "Warmed:Stopped",
        WarmedRunning = "Warmed:Running",
        WarmedHibernated = "Warmed:Hibernated",
    }
}

impl LifecycleState {
    /// The states in which an instance waits for a lifecycle action of `phase`.
    pub fn waiting_for(phase: Phase) -> &'static [LifecycleState] {
        use LifecycleState::*;
        match phase {
            Phase::Launch | Phase::PoolLeave => &[PendingWait],
            Phase::PoolEnter | Phase::PoolReturn => &[WarmedPendingWait],
            Phase::Terminate => &[TerminatingWait, WarmedTerminatingWait],
        }
    }

    /// Whether the instance waits for a lifecycle action of `phase`.
    pub fn waits_for(&self, phase: Phase) -> bool {
        Self::waiting_for(phase).contains(self)
    }

    /// In the warm pool (`Warmed:...`), a word this version does not know included.
    pub fn is_warmed(&self) -> bool {
        use LifecycleState::*;
        match self {
            WarmedPending
            | WarmedPendingWait
            | WarmedPendingProceed
            | WarmedTerminating
            | WarmedTerminatingWait
            | WarmedTerminatingProceed
            | WarmedTerminated
            | WarmedStopped
            | WarmedRunning
            | WarmedHibernated => true,
            Other(word) => word.starts_with("Warmed:"),
            _ => false,
        }
    }

    /// On the way out (`Terminating...`, in the group or the pool), a word this version does
    /// not know included.
    pub fn is_terminating(&self) -> bool {
        use LifecycleState::*;
        match self {
            Terminating
            | TerminatingWait
            | TerminatingProceed
            | WarmedTerminating
            | WarmedTerminatingWait
            | WarmedTerminatingProceed => true,
            Other(word) => word.contains("Terminating"),
            _ => false,
        }
    }
}

/// A group as DescribeAutoScalingGroups lists it: its members and whether it has a warm
/// pool (whose instances it does not list).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupView {
    pub name: String,
    pub members: Vec<Membership>,
    pub has_warm_pool: bool,
}

/// A group's warm pool (DescribeWarmPool): its configuration and the instances in it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WarmPool {
    pub min_size: i32,
    /// None: the group's MaxSize.
    pub max_group_prepared_capacity: Option<i32>,
    pub pool_state: WarmPoolState,
    /// Scale-in returns instances to the pool (InstanceReusePolicy.ReuseOnScaleIn).
    pub reuse_on_scale_in: bool,
    /// The pool's instances with their lifecycle states (Warmed:Pending:Wait, Warmed:Stopped...).
    pub instances: Vec<Membership>,
}

vocabulary! {
    /// The state a warm pool keeps its instances in (`PoolState`).
    pub enum WarmPoolState {
        Stopped = "Stopped",
        Running = "Running",
        Hibernated = "Hibernated",
    }
}

/// What CompleteLifecycleAction / RecordLifecycleActionHeartbeat said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionCall {
    Done,
    /// "No active Lifecycle Action found": completed by someone else, or timed out.
    NotActive(String),
}

#[async_trait]
pub trait Hooks: Send + Sync {
    /// Every lifecycle hook of a group, by hook name (one DescribeLifecycleHooks call).
    async fn describe_hooks(&self, group: &str) -> Result<Vec<(String, HookInfo)>, AwsError>;
    async fn heartbeat(&self, action: &Action) -> Result<ActionCall, AwsError>;
    async fn complete(&self, action: &Action, result: HookResult) -> Result<ActionCall, AwsError>;
    /// The group an instance belongs to and its lifecycle state (DescribeAutoScalingInstances);
    /// None when it is in no group.
    async fn membership(&self, instance: &InstanceId) -> Result<Option<Membership>, AwsError>;
    /// Every member of a group with its lifecycle state, from one DescribeAutoScalingGroups
    /// call (empty when the group does not exist).
    async fn group_members(&self, group: &str) -> Result<Vec<Membership>, AwsError>;
    /// Every Auto Scaling group name (DescribeAutoScalingGroups, all pages).
    async fn groups(&self) -> Result<Vec<String>, AwsError>;
    /// The group's warm pool (DescribeWarmPool), None when it has none.
    async fn warm_pool(&self, _group: &str) -> Result<Option<WarmPool>, AwsError> {
        Ok(None)
    }
    /// Every group with its members (DescribeAutoScalingGroups, every page: 100 groups a
    /// call with their instances).
    async fn all_groups(&self) -> Result<Vec<GroupView>, AwsError> {
        let mut out = Vec::new();
        for name in self.groups().await? {
            let members = self.group_members(&name).await?;
            out.push(GroupView {
                name,
                members,
                has_warm_pool: false,
            });
        }
        Ok(out)
    }
    /// Marks an instance unhealthy (SetInstanceHealth, not respecting the health check
    /// grace period): Auto Scaling replaces it, through the launch hook.
    async fn set_unhealthy(&self, _instance: &InstanceId) -> Result<(), AwsError> {
        Err(AwsError::permanent(
            "autoscaling:SetInstanceHealth",
            "not supported by this client",
        ))
    }
}

pub struct AutoScalingHooks {
    client: aws_sdk_autoscaling::Client,
}

impl AutoScalingHooks {
    pub fn new(cfg: &aws_config::SdkConfig, calls: &CountCalls) -> Self {
        let conf = aws_sdk_autoscaling::config::Builder::from(cfg)
            .interceptor(calls.clone())
            .build();
        Self {
            client: aws_sdk_autoscaling::Client::from_conf(conf),
        }
    }
}

/// "No active Lifecycle Action found with token …" / "… with instance ID …".
fn not_active(e: &AwsError) -> bool {
    e.code.as_deref() == Some("ValidationError") && e.message.contains("No active Lifecycle Action")
}

#[async_trait]
impl Hooks for AutoScalingHooks {
    async fn describe_hooks(&self, group: &str) -> Result<Vec<(String, HookInfo)>, AwsError> {
        let out = self
            .client
            .describe_lifecycle_hooks()
            .auto_scaling_group_name(group)
            .send()
            .await
            .map_err(|e| classify("autoscaling:DescribeLifecycleHooks", e))?;
        Ok(out
            .lifecycle_hooks()
            .iter()
            .filter_map(|h| {
                Some((
                    h.lifecycle_hook_name()?.to_string(),
                    HookInfo {
                        // AWS's default when the hook was created without one.
                        heartbeat_timeout: Duration::from_secs(
                            h.heartbeat_timeout().unwrap_or(3600).max(1) as u64,
                        ),
                        default_result: h
                            .default_result()
                            .and_then(HookResult::parse)
                            .unwrap_or(HookResult::Abandon),
                        transition: h.lifecycle_transition().unwrap_or_default().into(),
                        notification_target: h.notification_target_arn().map(str::to_string),
                        notification_metadata: h.notification_metadata().map(str::to_string),
                    },
                ))
            })
            .collect())
    }

    async fn heartbeat(&self, a: &Action) -> Result<ActionCall, AwsError> {
        let r = self
            .client
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(&a.group)
            .lifecycle_hook_name(&a.hook)
            .instance_id(a.instance_id.as_str())
            .set_lifecycle_action_token(a.token.clone())
            .send()
            .await
            .map_err(|e| classify("autoscaling:RecordLifecycleActionHeartbeat", e));
        match r {
            Ok(_) => Ok(ActionCall::Done),
            Err(e) if not_active(&e) => Ok(ActionCall::NotActive(e.message)),
            Err(e) => Err(e),
        }
    }

    async fn complete(&self, a: &Action, result: HookResult) -> Result<ActionCall, AwsError> {
        let r = self
            .client
            .complete_lifecycle_action()
            .auto_scaling_group_name(&a.group)
            .lifecycle_hook_name(&a.hook)
            .instance_id(a.instance_id.as_str())
            .set_lifecycle_action_token(a.token.clone())
            .lifecycle_action_result(result.as_str())
            .send()
            .await
            .map_err(|e| classify("autoscaling:CompleteLifecycleAction", e));
        match r {
            Ok(_) => Ok(ActionCall::Done),
            Err(e) if not_active(&e) => Ok(ActionCall::NotActive(e.message)),
            Err(e) => Err(e),
        }
    }

    async fn membership(&self, instance: &InstanceId) -> Result<Option<Membership>, AwsError> {
        let out = self
            .client
            .describe_auto_scaling_instances()
            .instance_ids(instance.as_str())
            .send()
            .await
            .map_err(|e| classify("autoscaling:DescribeAutoScalingInstances", e))?;
        Ok(out.auto_scaling_instances().first().map(|i| Membership {
            instance_id: i.instance_id().unwrap_or_default().to_string(),
            group: i.auto_scaling_group_name().unwrap_or_default().to_string(),
            state: i.lifecycle_state().unwrap_or_default().into(),
        }))
    }

    async fn warm_pool(&self, group: &str) -> Result<Option<WarmPool>, AwsError> {
        let mut pool: Option<WarmPool> = None;
        let mut token: Option<String> = None;
        // Every page (MaxRecords is at most 100), bounded.
        for _ in 0..100 {
            let out = self
                .client
                .describe_warm_pool()
                .auto_scaling_group_name(group)
                .max_records(100)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| classify("autoscaling:DescribeWarmPool", e))?;
            let Some(c) = out.warm_pool_configuration() else {
                return Ok(None);
            };
            let p = pool.get_or_insert_with(|| WarmPool {
                min_size: c.min_size().unwrap_or(0),
                max_group_prepared_capacity: c.max_group_prepared_capacity().filter(|&m| m >= 0),
                pool_state: c
                    .pool_state()
                    .map_or(WarmPoolState::Stopped, |s| s.as_str().into()),
                reuse_on_scale_in: c
                    .instance_reuse_policy()
                    .and_then(|p| p.reuse_on_scale_in())
                    .unwrap_or(false),
                instances: Vec::new(),
            });
            p.instances.extend(out.instances().iter().map(|i| {
                Membership {
                    instance_id: i.instance_id().unwrap_or_default().to_string(),
                    group: group.to_string(),
                    state: i
                        .lifecycle_state()
                        .map(|s| s.as_str().into())
                        .unwrap_or_default(),
                }
            }));
            match out.next_token() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok(pool)
    }

    async fn group_members(&self, group: &str) -> Result<Vec<Membership>, AwsError> {
        let out = self
            .client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .map_err(|e| classify("autoscaling:DescribeAutoScalingGroups", e))?;
        Ok(out
            .auto_scaling_groups()
            .iter()
            .flat_map(|g| g.instances())
            .map(|i| Membership {
                instance_id: i.instance_id().unwrap_or_default().to_string(),
                group: group.to_string(),
                state: i
                    .lifecycle_state()
                    .map(|s| s.as_str().into())
                    .unwrap_or_default(),
            })
            .collect())
    }

    async fn all_groups(&self) -> Result<Vec<GroupView>, AwsError> {
        let mut pages = self
            .client
            .describe_auto_scaling_groups()
            .max_records(100)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("autoscaling:DescribeAutoScalingGroups", e))?;
            for g in page.auto_scaling_groups() {
                let name = g.auto_scaling_group_name().unwrap_or_default().to_string();
                let members = g
                    .instances()
                    .iter()
                    .map(|i| Membership {
                        instance_id: i.instance_id().unwrap_or_default().to_string(),
                        group: name.clone(),
                        state: i
                            .lifecycle_state()
                            .map(|s| s.as_str().into())
                            .unwrap_or_default(),
                    })
                    .collect();
                out.push(GroupView {
                    has_warm_pool: g.warm_pool_configuration().is_some(),
                    name,
                    members,
                });
            }
        }
        Ok(out)
    }

    async fn set_unhealthy(&self, instance: &InstanceId) -> Result<(), AwsError> {
        self.client
            .set_instance_health()
            .instance_id(instance.as_str())
            .health_status("Unhealthy")
            .should_respect_grace_period(false)
            .send()
            .await
            .map_err(|e| classify("autoscaling:SetInstanceHealth", e))?;
        Ok(())
    }

    async fn groups(&self) -> Result<Vec<String>, AwsError> {
        let mut pages = self
            .client
            .describe_auto_scaling_groups()
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("autoscaling:DescribeAutoScalingGroups", e))?;
            out.extend(
                page.auto_scaling_groups()
                    .iter()
                    .filter_map(|g| g.auto_scaling_group_name().map(str::to_string)),
            );
        }
        Ok(out)
    }
}
