//! In-memory fakes of the boundary traits for the pipeline's unit tests. They record every
//! call and answer from a script; they never replace the emulator tests.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::autoscaling::HookTransition;
use super::{
    Action, ActionCall, AwsError, HookInfo, Hooks, InstanceInfo, InstanceState, Instances,
    Invocation, LifecycleState, Membership, OpsWorks, OwInstance, OwLayer, OwStack, Ssm,
    SsmCommand,
};
use crate::event::InstanceId;
use crate::outcome::HookResult;

#[derive(Default)]
pub struct FakeHooks {
    pub heartbeat_timeout: Duration,
    /// Every group has one hook, "launch"; this is its NotificationMetadata, by group.
    pub metadata: Mutex<HashMap<String, String>>,
    /// What DescribeAutoScalingInstances answers, by instance id.
    pub members: Mutex<HashMap<String, Membership>>,
    /// Answers for `complete`, in order; `Ok(Done)` once the script is used up.
    pub complete_script: Mutex<VecDeque<Result<ActionCall, AwsError>>>,
    pub completions: Mutex<Vec<(String, HookResult)>>,
    pub heartbeats: Mutex<Vec<String>>,
    pub describes: Mutex<u32>,
    /// DescribeAutoScalingGroups calls.
    pub group_describes: Mutex<u32>,
    /// Heartbeats answer "No active Lifecycle Action" (it timed out).
    pub gone: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Hooks for FakeHooks {
    async fn describe_hooks(&self, group: &str) -> Result<Vec<(String, HookInfo)>, AwsError> {
        *self.describes.lock().unwrap() += 1;
        Ok(vec![(
            "launch".into(),
            HookInfo {
                heartbeat_timeout: self.heartbeat_timeout,
                default_result: HookResult::Abandon,
                transition: HookTransition::Launching,
                notification_metadata: self.metadata.lock().unwrap().get(group).cloned(),
                ..Default::default()
            },
        )])
    }

    async fn heartbeat(&self, action: &Action) -> Result<ActionCall, AwsError> {
        self.heartbeats
            .lock()
            .unwrap()
            .push(action.token.clone().unwrap_or_default());
        // As Auto Scaling does: only a waiting instance of the action's group has an active
        // action (the fakes tie a token to its instance; the one hook is "launch").
        let active = self
            .members
            .lock()
            .unwrap()
            .get(action.instance_id.as_str())
            .is_some_and(|m| m.group == action.group && m.state.as_str().ends_with(":Wait"))
            && action.hook == "launch";
        if self.gone.load(std::sync::atomic::Ordering::Relaxed) || !active {
            return Ok(ActionCall::NotActive(
                "No active Lifecycle Action found".into(),
            ));
        }
        Ok(ActionCall::Done)
    }

    async fn complete(&self, action: &Action, result: HookResult) -> Result<ActionCall, AwsError> {
        self.completions
            .lock()
            .unwrap()
            .push((action.token.clone().unwrap_or_default(), result));
        self.complete_script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(ActionCall::Done))
    }

    async fn membership(&self, id: &InstanceId) -> Result<Option<Membership>, AwsError> {
        Ok(self.members.lock().unwrap().get(id.as_str()).cloned())
    }

    async fn group_members(&self, group: &str) -> Result<Vec<Membership>, AwsError> {
        *self.group_describes.lock().unwrap() += 1;
        let members = self.members.lock().unwrap();
        Ok(members
            .values()
            .filter(|m| m.group == group)
            .cloned()
            .collect())
    }

    async fn groups(&self) -> Result<Vec<String>, AwsError> {
        Ok(Vec::new())
    }
}

impl FakeHooks {
    /// CompleteLifecycleAction answers throttling `n` times, then succeeds.
    pub fn throttle_completions(&self, n: usize) {
        let throttled = AwsError {
            operation: "autoscaling:CompleteLifecycleAction",
            code: Some("Throttling".into()),
            message: "Rate exceeded".into(),
            class: crate::aws::ErrorClass::Throttled,
        };
        self.complete_script
            .lock()
            .unwrap()
            .extend(std::iter::repeat_n(Err(throttled), n));
    }

    /// A launch of `instance` waiting in `group`, whose hook carries `metadata`.
    pub fn waiting(&self, instance: &str, group: &str, metadata: &str) {
        self.members.lock().unwrap().insert(
            instance.to_string(),
            Membership {
                instance_id: instance.to_string(),
                group: group.to_string(),
                state: LifecycleState::PendingWait,
            },
        );
        self.metadata
            .lock()
            .unwrap()
            .insert(group.to_string(), metadata.to_string());
    }
}

/// An instance id and the tags it was given.
pub type Tagged = (String, Vec<(String, String)>);

#[derive(Default)]
pub struct FakeInstances {
    pub delay: Duration,
    pub tagged: Mutex<Vec<Tagged>>,
}

#[async_trait]
impl Instances for FakeInstances {
    async fn create_tags(
        &self,
        instance: &InstanceId,
        tags: &[(String, String)],
    ) -> Result<(), AwsError> {
        tokio::time::sleep(self.delay).await;
        self.tagged
            .lock()
            .unwrap()
            .push((instance.to_string(), tags.to_vec()));
        Ok(())
    }

    async fn describe(&self, ids: &[InstanceId]) -> Result<Vec<InstanceInfo>, AwsError> {
        Ok(ids
            .iter()
            .map(|i| InstanceInfo {
                id: i.to_string(),
                state: InstanceState::Running,
                ..Default::default()
            })
            .collect())
    }

    async fn console_output(&self, _: &InstanceId) -> Result<Option<String>, AwsError> {
        Ok(None)
    }
}

/// For services a test never expects to be called: any call fails the test.
pub struct Unused;

#[async_trait]
impl Ssm for Unused {
    async fn online(&self, _: &[InstanceId]) -> Result<Vec<String>, AwsError> {
        panic!("unexpected SSM call")
    }
    async fn send_command(&self, _: &SsmCommand, _: &[InstanceId]) -> Result<String, AwsError> {
        panic!("unexpected SSM call")
    }
    async fn invocations(&self, _: &str) -> Result<Vec<Invocation>, AwsError> {
        panic!("unexpected SSM call")
    }
    async fn cancel(&self, _: &str, _: &[InstanceId]) -> Result<(), AwsError> {
        panic!("unexpected SSM call")
    }
    async fn parameter(&self, _: &str) -> Result<crate::secret::Secret, AwsError> {
        panic!("unexpected SSM call")
    }
}

#[async_trait]
impl OpsWorks for Unused {
    async fn stacks(&self, _: &str) -> Result<Vec<OwStack>, AwsError> {
        panic!("unexpected OpsWorks call")
    }
    async fn stack(&self, _: &str, _: &str) -> Result<Option<OwStack>, AwsError> {
        panic!("unexpected OpsWorks call")
    }
    async fn layers(&self, _: &str, _: &str) -> Result<Vec<OwLayer>, AwsError> {
        panic!("unexpected OpsWorks call")
    }
    async fn instances(&self, _: &str, _: &str) -> Result<Vec<OwInstance>, AwsError> {
        panic!("unexpected OpsWorks call")
    }
    async fn instance(&self, _: &str, _: &str) -> Result<Option<OwInstance>, AwsError> {
        panic!("unexpected OpsWorks call")
    }
    async fn hostname_suggestion(&self, _: &str, _: &str) -> Result<String, AwsError> {
        panic!("unexpected OpsWorks call")
    }
    async fn register(
        &self,
        _: &str,
        _: &str,
        _: &str,
        _: &InstanceInfo,
    ) -> Result<String, AwsError> {
        panic!("unexpected OpsWorks call")
    }
    async fn assign(&self, _: &str, _: &str, _: &str) -> Result<(), AwsError> {
        panic!("unexpected OpsWorks call")
    }
    async fn deregister(&self, _: &str, _: &str) -> Result<(), AwsError> {
        panic!("unexpected OpsWorks call")
    }
}

#[async_trait]
impl crate::aws::Ecs for Unused {
    async fn container_instance(
        &self,
        _: &str,
        _: &InstanceId,
    ) -> Result<Option<crate::aws::ContainerInstance>, AwsError> {
        panic!("unexpected ECS call")
    }
    async fn describe_container_instance(
        &self,
        _: &str,
        _: &str,
    ) -> Result<Option<crate::aws::ContainerInstance>, AwsError> {
        panic!("unexpected ECS call")
    }
    async fn drain(&self, _: &str, _: &str) -> Result<(), AwsError> {
        panic!("unexpected ECS call")
    }
}
