//! The boundary traits implemented with the AWS SDK for Rust.
//!
//! Region, credentials and endpoint come from the standard chain (aws-config), so
//! `AWS_ENDPOINT_URL` points everything at an emulator with no special code path here.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};

use super::{
    Action, ActionCall, AwsError, BatchResult, ErrorClass, HookInfo, Hooks, InstanceInfo,
    Instances, Invocation, Membership, Message, Notifier, OpsWorks, OwInstance, OwLayer, OwStack,
    Queue, Ssm, SsmCommand,
};
use crate::event::InstanceId;
use crate::metrics::CountCalls;
use crate::outcome::HookResult;

/// Loads the shared SDK config: standard retry mode with `max_attempts` tries per call.
pub async fn load_config(max_attempts: u32) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    // Credentials that were in the environment live in memory only (secret::scrub_environment):
    // children never inherit them.
    if let Some(c) = crate::secret::env_credentials() {
        loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
            c.access_key_id,
            c.secret_access_key.expose(),
            c.session_token.map(|t| t.expose().to_string()),
            None,
            "environment",
        ));
    }
    loader
        // Shows as app/provision in the User-Agent (CloudTrail, and the emulator's counters).
        .app_name(aws_config::AppName::new("provision").expect("a valid app name"))
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(max_attempts)
                .with_initial_backoff(Duration::from_millis(200)),
        )
        // A long poll holds the connection for up to 20 s: leave room above that.
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(40))
                .build(),
        )
        .load()
        .await
}

/// Turns any SDK error into an [`AwsError`]; [`ErrorClass::of`] decides from the answer's
/// HTTP status and error code whether it is worth retrying.
pub(super) fn classify<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    let class = match &err {
        SdkError::TimeoutError(_) => ErrorClass::Timeout,
        SdkError::DispatchFailure(f) if f.is_timeout() => ErrorClass::Timeout,
        SdkError::DispatchFailure(f) if f.is_user() => ErrorClass::Local,
        SdkError::DispatchFailure(_) => ErrorClass::Connection,
        SdkError::ResponseError(_) => ErrorClass::of(status, None),
        SdkError::ServiceError(_) => ErrorClass::of(status, err.code()),
        _ => ErrorClass::Local,
    };
    match &err {
        SdkError::ServiceError(_) => AwsError {
            operation,
            code: err.code().map(str::to_string),
            message: match (err.message(), status) {
                (Some(m), _) => m.to_string(),
                (None, Some(s)) => format!("HTTP {s} without an error message"),
                (None, None) => "no message".to_string(),
            },
            class,
        },
        _ => AwsError {
            operation,
            code: None,
            message: aws_smithy_error_chain(&err),
            class,
        },
    }
}

/// The error and its sources on one line (`a: b: c`).
fn aws_smithy_error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut src = err.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

fn batch_result(n: usize, failed: impl Iterator<Item = (String, String)>) -> BatchResult {
    let mut out: BatchResult = vec![Ok(()); n];
    for (id, msg) in failed {
        if let Some(slot) = id.parse::<usize>().ok().and_then(|i| out.get_mut(i)) {
            *slot = Err(msg);
        }
    }
    out
}

pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    url: String,
}

impl SqsQueue {
    pub fn new(cfg: &aws_config::SdkConfig, calls: &CountCalls, url: &str) -> Self {
        let conf = aws_sdk_sqs::config::Builder::from(cfg)
            .interceptor(calls.clone())
            .build();
        Self {
            client: aws_sdk_sqs::Client::from_conf(conf),
            url: url.to_string(),
        }
    }
}

#[async_trait]
impl Queue for SqsQueue {
    async fn receive(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Message>, AwsError> {
        use aws_sdk_sqs::types::MessageSystemAttributeName as A;
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .visibility_timeout(visibility.as_secs().min(43_200) as i32)
            .message_system_attribute_names(A::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| classify("sqs:ReceiveMessage", e))?;
        Ok(out
            .messages
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| {
                let receive_count = m
                    .attributes()
                    .and_then(|a| a.get(&A::ApproximateReceiveCount))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1);
                Some(Message {
                    id: m.message_id?,
                    receipt: m.receipt_handle?,
                    body: m.body.unwrap_or_default(),
                    receive_count,
                })
            })
            .collect())
    }

    async fn delete_batch(&self, receipts: &[String]) -> Result<BatchResult, AwsError> {
        use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry as E;
        let entries = receipts
            .iter()
            .enumerate()
            .map(|(i, r)| E::builder().id(i.to_string()).receipt_handle(r).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AwsError::permanent("sqs:DeleteMessageBatch", e.to_string()))?;
        let out = self
            .client
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| classify("sqs:DeleteMessageBatch", e))?;
        Ok(batch_result(
            receipts.len(),
            out.failed().iter().map(|f| {
                (
                    f.id().to_string(),
                    format!("{}: {}", f.code(), f.message().unwrap_or("")),
                )
            }),
        ))
    }

    async fn change_visibility_batch(
        &self,
        entries: &[(String, Duration)],
    ) -> Result<BatchResult, AwsError> {
        use aws_sdk_sqs::types::ChangeMessageVisibilityBatchRequestEntry as E;
        let list = entries
            .iter()
            .enumerate()
            .map(|(i, (r, v))| {
                E::builder()
                    .id(i.to_string())
                    .receipt_handle(r)
                    .visibility_timeout(v.as_secs().min(43_200) as i32)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AwsError::permanent("sqs:ChangeMessageVisibilityBatch", e.to_string()))?;
        let out = self
            .client
            .change_message_visibility_batch()
            .queue_url(&self.url)
            .set_entries(Some(list))
            .send()
            .await
            .map_err(|e| classify("sqs:ChangeMessageVisibilityBatch", e))?;
        Ok(batch_result(
            entries.len(),
            out.failed().iter().map(|f| {
                (
                    f.id().to_string(),
                    format!("{}: {}", f.code(), f.message().unwrap_or("")),
                )
            }),
        ))
    }

    async fn redrive_policy(&self) -> Result<Option<String>, AwsError> {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(A::RedrivePolicy)
            .send()
            .await
            .map_err(|e| classify("sqs:GetQueueAttributes", e))?;
        Ok(out
            .attributes()
            .and_then(|a| a.get(&A::RedrivePolicy))
            .cloned())
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
                        transition: h.lifecycle_transition().unwrap_or_default().to_string(),
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
            state: i.lifecycle_state().unwrap_or_default().to_string(),
        }))
    }

    async fn warm_pool(&self, group: &str) -> Result<Option<super::WarmPool>, AwsError> {
        let mut pool: Option<super::WarmPool> = None;
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
            let p = pool.get_or_insert_with(|| super::WarmPool {
                min_size: c.min_size().unwrap_or(0),
                max_group_prepared_capacity: c.max_group_prepared_capacity().filter(|&m| m >= 0),
                pool_state: c
                    .pool_state()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|| "Stopped".into()),
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
                        .map(|s| s.as_str().to_string())
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
                    .map(|s| s.as_str())
                    .unwrap_or_default()
                    .to_string(),
            })
            .collect())
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

pub struct Ec2Instances {
    client: aws_sdk_ec2::Client,
}

impl Ec2Instances {
    pub fn new(cfg: &aws_config::SdkConfig, calls: &CountCalls) -> Self {
        let conf = aws_sdk_ec2::config::Builder::from(cfg)
            .interceptor(calls.clone())
            .build();
        Self {
            client: aws_sdk_ec2::Client::from_conf(conf),
        }
    }

    /// Every page of DescribeInstances with one filter, appended to `out`.
    async fn describe_pages(
        &self,
        filter: aws_sdk_ec2::types::Filter,
        out: &mut Vec<InstanceInfo>,
    ) -> Result<(), AwsError> {
        let mut pages = self
            .client
            .describe_instances()
            .filters(filter)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("ec2:DescribeInstances", e))?;
            for i in page.reservations().iter().flat_map(|r| r.instances()) {
                out.push(InstanceInfo {
                    id: i.instance_id().unwrap_or_default().to_string(),
                    state: i
                        .state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_default(),
                    private_ip: i.private_ip_address().map(str::to_string),
                    public_ip: i.public_ip_address().map(str::to_string),
                    private_dns: i
                        .private_dns_name()
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                    public_dns: i
                        .public_dns_name()
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                    tags: i
                        .tags()
                        .iter()
                        .map(|t| {
                            (
                                t.key().unwrap_or_default().to_string(),
                                t.value().unwrap_or_default().to_string(),
                            )
                        })
                        .collect(),
                });
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Instances for Ec2Instances {
    async fn create_tags(
        &self,
        instance: &InstanceId,
        tags: &[(String, String)],
    ) -> Result<(), AwsError> {
        use aws_sdk_ec2::types::Tag;
        self.client
            .create_tags()
            .resources(instance.as_str())
            .set_tags(Some(
                tags.iter()
                    .map(|(k, v)| Tag::builder().key(k).value(v).build())
                    .collect(),
            ))
            .send()
            .await
            .map_err(|e| classify("ec2:CreateTags", e))?;
        Ok(())
    }

    async fn describe(&self, ids: &[InstanceId]) -> Result<Vec<InstanceInfo>, AwsError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // The ids go in an `instance-id` filter, not in InstanceIds: EC2 fails the whole
        // call with InvalidInstanceID.NotFound when InstanceIds names one instance it does
        // not know (gone for over an hour, or too new to be visible yet), and one stale
        // message would then stop every instance it shares the call with. A filter simply
        // leaves unknown ids out. (EC2 takes at most 200 values in one filter.)
        let mut out = Vec::new();
        for chunk in ids.chunks(200) {
            let filter = aws_sdk_ec2::types::Filter::builder()
                .name("instance-id")
                .set_values(Some(chunk.iter().map(|i| i.to_string()).collect()))
                .build();
            self.describe_pages(filter, &mut out).await?;
        }
        Ok(out)
    }

    async fn console_output(&self, instance: &InstanceId) -> Result<Option<String>, AwsError> {
        use base64::Engine as _;
        let op = "ec2:GetConsoleOutput";
        let out = self
            .client
            .get_console_output()
            .instance_id(instance.as_str())
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        match out.output() {
            None | Some("") => Ok(None),
            Some(b64) => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| {
                        AwsError::permanent(op, format!("console output is not base64: {e}"))
                    })?;
                Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
            }
        }
    }
}

pub struct SsmClient {
    client: aws_sdk_ssm::Client,
}

impl SsmClient {
    pub fn new(cfg: &aws_config::SdkConfig, calls: &CountCalls) -> Self {
        let conf = aws_sdk_ssm::config::Builder::from(cfg)
            .interceptor(calls.clone())
            .build();
        Self {
            client: aws_sdk_ssm::Client::from_conf(conf),
        }
    }
}

#[async_trait]
impl Ssm for SsmClient {
    async fn online(&self, ids: &[InstanceId]) -> Result<Vec<String>, AwsError> {
        use aws_sdk_ssm::types::{InstanceInformationStringFilter as F, PingStatus};
        let op = "ssm:DescribeInstanceInformation";
        let ids_filter = F::builder()
            .key("InstanceIds")
            .set_values(Some(ids.iter().map(|i| i.to_string()).collect()))
            .build()
            .map_err(|e| AwsError::permanent(op, e.to_string()))?;
        let ping = F::builder()
            .key("PingStatus")
            .values("Online")
            .build()
            .map_err(|e| AwsError::permanent(op, e.to_string()))?;
        let mut pages = self
            .client
            .describe_instance_information()
            .filters(ids_filter)
            .filters(ping)
            .max_results(50)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify(op, e))?;
            for i in page.instance_information_list() {
                if i.ping_status() == Some(&PingStatus::Online) {
                    if let Some(id) = i.instance_id() {
                        out.push(id.to_string());
                    }
                }
            }
        }
        Ok(out)
    }

    async fn send_command(&self, cmd: &SsmCommand, ids: &[InstanceId]) -> Result<String, AwsError> {
        let mut req = self
            .client
            .send_command()
            .document_name(&cmd.document)
            .set_instance_ids(Some(ids.iter().map(|i| i.to_string()).collect()))
            .set_parameters(Some(cmd.parameters.clone().into_iter().collect()))
            .set_timeout_seconds(cmd.timeout_seconds)
            .set_comment(cmd.comment.clone())
            .set_output_s3_bucket_name(cmd.output_s3_bucket.clone())
            .set_output_s3_key_prefix(cmd.output_s3_prefix.clone());
        if let Some(group) = &cmd.cloudwatch_log_group {
            req = req.cloud_watch_output_config(
                aws_sdk_ssm::types::CloudWatchOutputConfig::builder()
                    .cloud_watch_log_group_name(group)
                    .cloud_watch_output_enabled(true)
                    .build(),
            );
        }
        let out = req
            .send()
            .await
            .map_err(|e| classify("ssm:SendCommand", e))?;
        out.command()
            .and_then(|c| c.command_id())
            .map(str::to_string)
            .ok_or_else(|| AwsError::permanent("ssm:SendCommand", "no command id in the answer"))
    }

    async fn invocations(&self, command_id: &str) -> Result<Vec<Invocation>, AwsError> {
        let mut pages = self
            .client
            .list_command_invocations()
            .command_id(command_id)
            .details(true)
            .max_results(50)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("ssm:ListCommandInvocations", e))?;
            for inv in page.command_invocations() {
                let plugins = inv.command_plugins();
                out.push(Invocation {
                    instance_id: inv.instance_id().unwrap_or_default().to_string(),
                    status: inv
                        .status()
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                    status_details: inv.status_details().unwrap_or_default().to_string(),
                    response_code: plugins.last().map(|p| p.response_code()),
                    output: plugins
                        .iter()
                        .filter_map(|p| p.output())
                        .collect::<Vec<_>>()
                        .join("\n"),
                });
            }
        }
        Ok(out)
    }

    async fn cancel(&self, command_id: &str, ids: &[InstanceId]) -> Result<(), AwsError> {
        self.client
            .cancel_command()
            .command_id(command_id)
            .set_instance_ids(Some(ids.iter().map(|i| i.to_string()).collect()))
            .send()
            .await
            .map_err(|e| classify("ssm:CancelCommand", e))?;
        Ok(())
    }

    async fn parameter(&self, name: &str) -> Result<crate::secret::Secret, AwsError> {
        let op = "ssm:GetParameter";
        let out = self
            .client
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        out.parameter()
            .and_then(|p| p.value())
            .map(|v| crate::secret::Secret::new(v.to_string()))
            .ok_or_else(|| AwsError::permanent(op, format!("parameter {name} has no value")))
    }
}

/// OpsWorks Stacks, one client per region (stacks live in the region named by the step).
pub struct OpsWorksClient {
    base: aws_config::SdkConfig,
    calls: CountCalls,
    clients: std::sync::Mutex<HashMap<String, aws_sdk_opsworks::Client>>,
}

impl OpsWorksClient {
    pub fn new(cfg: &aws_config::SdkConfig, calls: &CountCalls) -> Self {
        Self {
            base: cfg.clone(),
            calls: calls.clone(),
            clients: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, region: &str) -> aws_sdk_opsworks::Client {
        let mut map = self.clients.lock().unwrap();
        map.entry(region.to_string())
            .or_insert_with(|| {
                let conf = aws_sdk_opsworks::config::Builder::from(&self.base)
                    .region(aws_config::Region::new(region.to_string()))
                    .interceptor(self.calls.clone())
                    .build();
                aws_sdk_opsworks::Client::from_conf(conf)
            })
            .clone()
    }
}

fn ow_instance(i: &aws_sdk_opsworks::types::Instance) -> OwInstance {
    OwInstance {
        id: i.instance_id().unwrap_or_default().to_string(),
        ec2_instance_id: i.ec2_instance_id().map(str::to_string),
        hostname: i.hostname().map(str::to_string),
        status: i.status().unwrap_or_default().to_string(),
        layer_ids: i.layer_ids().to_vec(),
    }
}

#[async_trait]
impl OpsWorks for OpsWorksClient {
    async fn stacks(&self, region: &str) -> Result<Vec<OwStack>, AwsError> {
        let out = self
            .client(region)
            .describe_stacks()
            .send()
            .await
            .map_err(|e| classify("opsworks:DescribeStacks", e))?;
        Ok(out
            .stacks()
            .iter()
            .map(|s| OwStack {
                id: s.stack_id().unwrap_or_default().to_string(),
                name: s.name().unwrap_or_default().to_string(),
            })
            .collect())
    }

    async fn layers(&self, region: &str, stack_id: &str) -> Result<Vec<OwLayer>, AwsError> {
        let out = self
            .client(region)
            .describe_layers()
            .stack_id(stack_id)
            .send()
            .await
            .map_err(|e| classify("opsworks:DescribeLayers", e))?;
        Ok(out
            .layers()
            .iter()
            .map(|l| OwLayer {
                id: l.layer_id().unwrap_or_default().to_string(),
                shortname: l.shortname().unwrap_or_default().to_string(),
            })
            .collect())
    }

    async fn instances(&self, region: &str, stack_id: &str) -> Result<Vec<OwInstance>, AwsError> {
        let out = self
            .client(region)
            .describe_instances()
            .stack_id(stack_id)
            .send()
            .await
            .map_err(|e| classify("opsworks:DescribeInstances", e))?;
        Ok(out.instances().iter().map(ow_instance).collect())
    }

    async fn instance(&self, region: &str, id: &str) -> Result<Option<OwInstance>, AwsError> {
        let out = self
            .client(region)
            .describe_instances()
            .instance_ids(id)
            .send()
            .await;
        match out {
            Ok(o) => Ok(o.instances().first().map(ow_instance)),
            Err(e) => {
                let e = classify("opsworks:DescribeInstances", e);
                if e.code.as_deref() == Some("ResourceNotFoundException") {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn hostname_suggestion(&self, region: &str, layer_id: &str) -> Result<String, AwsError> {
        let out = self
            .client(region)
            .get_hostname_suggestion()
            .layer_id(layer_id)
            .send()
            .await
            .map_err(|e| classify("opsworks:GetHostnameSuggestion", e))?;
        out.hostname().map(str::to_string).ok_or_else(|| {
            AwsError::permanent(
                "opsworks:GetHostnameSuggestion",
                "no hostname in the answer",
            )
        })
    }

    async fn register(
        &self,
        region: &str,
        stack_id: &str,
        hostname: &str,
        ec2: &InstanceInfo,
    ) -> Result<String, AwsError> {
        // The identity document names the EC2 instance, which makes this an "ec2"
        // registration. The instance itself would add a signature; the service accepts the
        // document from a caller with permission on the stack.
        let document = serde_json::json!({
            "instanceId": ec2.id,
            "privateIp": ec2.private_ip,
            "region": region,
        })
        .to_string();
        let out = self
            .client(region)
            .register_instance()
            .stack_id(stack_id)
            .hostname(hostname)
            .set_private_ip(ec2.private_ip.clone())
            .set_public_ip(ec2.public_ip.clone())
            .instance_identity(
                aws_sdk_opsworks::types::InstanceIdentity::builder()
                    .document(document)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify("opsworks:RegisterInstance", e))?;
        out.instance_id().map(str::to_string).ok_or_else(|| {
            AwsError::permanent("opsworks:RegisterInstance", "no instance id in the answer")
        })
    }

    async fn assign(&self, region: &str, id: &str, layer_id: &str) -> Result<(), AwsError> {
        self.client(region)
            .assign_instance()
            .instance_id(id)
            .layer_ids(layer_id)
            .send()
            .await
            .map_err(|e| classify("opsworks:AssignInstance", e))?;
        Ok(())
    }

    async fn deregister(&self, region: &str, id: &str) -> Result<(), AwsError> {
        self.client(region)
            .deregister_instance()
            .instance_id(id)
            .send()
            .await
            .map_err(|e| classify("opsworks:DeregisterInstance", e))?;
        Ok(())
    }
}

pub struct SnsNotifier {
    client: aws_sdk_sns::Client,
}

impl SnsNotifier {
    pub fn new(cfg: &aws_config::SdkConfig, calls: &CountCalls) -> Self {
        let conf = aws_sdk_sns::config::Builder::from(cfg)
            .interceptor(calls.clone())
            .build();
        Self {
            client: aws_sdk_sns::Client::from_conf(conf),
        }
    }
}

#[async_trait]
impl Notifier for SnsNotifier {
    async fn publish_batch(
        &self,
        topic_arn: &str,
        messages: &[String],
    ) -> Result<BatchResult, AwsError> {
        use aws_sdk_sns::types::PublishBatchRequestEntry as E;
        let entries = messages
            .iter()
            .enumerate()
            .map(|(i, m)| E::builder().id(i.to_string()).message(m).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AwsError::permanent("sns:PublishBatch", e.to_string()))?;
        let out = self
            .client
            .publish_batch()
            .topic_arn(topic_arn)
            .set_publish_batch_request_entries(Some(entries))
            .send()
            .await
            .map_err(|e| classify("sns:PublishBatch", e))?;
        let failed: HashMap<String, String> = out
            .failed()
            .iter()
            .map(|f| {
                (
                    f.id().to_string(),
                    format!("{}: {}", f.code(), f.message().unwrap_or("")),
                )
            })
            .collect();
        Ok(batch_result(messages.len(), failed.into_iter()))
    }

    async fn check_topic(&self, topic_arn: &str) -> Result<(), AwsError> {
        self.client
            .get_topic_attributes()
            .topic_arn(topic_arn)
            .send()
            .await
            .map_err(|e| classify("sns:GetTopicAttributes", e))?;
        Ok(())
    }
}

pub struct EcsClient {
    client: aws_sdk_ecs::Client,
}

impl EcsClient {
    pub fn new(cfg: &aws_config::SdkConfig, calls: &CountCalls) -> Self {
        let conf = aws_sdk_ecs::config::Builder::from(cfg)
            .interceptor(calls.clone())
            .build();
        Self {
            client: aws_sdk_ecs::Client::from_conf(conf),
        }
    }
}

#[async_trait]
impl super::Ecs for EcsClient {
    async fn container_instance(
        &self,
        cluster: &str,
        ec2: &InstanceId,
    ) -> Result<Option<super::ContainerInstance>, AwsError> {
        // The instance id is validated (i-[0-9a-f]+): safe inside the cluster query language.
        let out = self
            .client
            .list_container_instances()
            .cluster(cluster)
            .filter(format!("ec2InstanceId == {ec2}"))
            .send()
            .await
            .map_err(|e| classify("ecs:ListContainerInstances", e))?;
        match out.container_instance_arns().first() {
            Some(arn) => self.describe_container_instance(cluster, arn).await,
            None => Ok(None),
        }
    }

    async fn describe_container_instance(
        &self,
        cluster: &str,
        arn: &str,
    ) -> Result<Option<super::ContainerInstance>, AwsError> {
        let out = self
            .client
            .describe_container_instances()
            .cluster(cluster)
            .container_instances(arn)
            .send()
            .await
            .map_err(|e| classify("ecs:DescribeContainerInstances", e))?;
        Ok(out
            .container_instances()
            .first()
            .map(|c| super::ContainerInstance {
                arn: c.container_instance_arn().unwrap_or(arn).to_string(),
                status: c.status().unwrap_or_default().to_string(),
                running_tasks: c.running_tasks_count(),
            }))
    }

    async fn drain(&self, cluster: &str, arn: &str) -> Result<(), AwsError> {
        let op = "ecs:UpdateContainerInstancesState";
        let out = self
            .client
            .update_container_instances_state()
            .cluster(cluster)
            .container_instances(arn)
            .status(aws_sdk_ecs::types::ContainerInstanceStatus::Draining)
            .send()
            .await
            .map_err(|e| classify(op, e))?;
        match out.failures().first() {
            Some(f) => Err(AwsError::permanent(
                op,
                format!(
                    "{}: {}",
                    f.arn().unwrap_or(arn),
                    f.reason().unwrap_or("refused")
                ),
            )),
            None => Ok(()),
        }
    }
}
