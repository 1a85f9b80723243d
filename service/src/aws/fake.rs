//! In-memory fakes of the boundary traits for the pipeline's unit tests. They record every
//! call and answer from a script; they never replace the emulator tests.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::{Action, ActionCall, AwsError, HookInfo, HookResult, Hooks, Instances};
use crate::event::InstanceId;

#[derive(Default)]
pub struct FakeHooks {
    pub heartbeat_timeout: Duration,
    /// Answers for `complete`, in order; `Ok(Done)` once the script is used up.
    pub complete_script: Mutex<VecDeque<Result<ActionCall, AwsError>>>,
    pub completions: Mutex<Vec<(String, HookResult)>>,
    pub heartbeats: Mutex<Vec<String>>,
    pub describes: Mutex<u32>,
}

#[async_trait]
impl Hooks for FakeHooks {
    async fn describe_hooks(&self, _group: &str) -> Result<Vec<(String, HookInfo)>, AwsError> {
        *self.describes.lock().unwrap() += 1;
        Ok(vec![(
            "launch".into(),
            HookInfo {
                heartbeat_timeout: self.heartbeat_timeout,
                default_result: HookResult::Abandon,
            },
        )])
    }

    async fn heartbeat(&self, action: &Action) -> Result<ActionCall, AwsError> {
        self.heartbeats.lock().unwrap().push(action.token.clone());
        Ok(ActionCall::Done)
    }

    async fn complete(&self, action: &Action, result: HookResult) -> Result<ActionCall, AwsError> {
        self.completions
            .lock()
            .unwrap()
            .push((action.token.clone(), result));
        self.complete_script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(ActionCall::Done))
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
}
