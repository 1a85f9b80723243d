//! Systems Manager: Run Command (agents online, send, invocations, cancel) and
//! Parameter Store.

use async_trait::async_trait;

use super::sdk::classify;
use super::AwsError;
use crate::event::InstanceId;
use crate::metrics::CountCalls;

/// One Run Command request, the same for every instance it targets.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SsmCommand {
    pub document: String,
    pub parameters: std::collections::BTreeMap<String, Vec<String>>,
    /// Delivery timeout (SendCommand's TimeoutSeconds); the run time is the document's.
    pub timeout_seconds: Option<i32>,
    pub comment: Option<String>,
    pub output_s3_bucket: Option<String>,
    pub output_s3_prefix: Option<String>,
    pub cloudwatch_log_group: Option<String>,
}

/// One instance's part of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub instance_id: String,
    pub status: InvocationStatus,
    pub status_details: String,
    pub response_code: Option<i32>,
    pub output: String,
}

vocabulary! {
    /// Where one instance's part of a command is (`CommandInvocationStatus`).
    pub enum InvocationStatus {
        Pending = "Pending",
        InProgress = "InProgress",
        Delayed = "Delayed",
        Success = "Success",
        Cancelled = "Cancelled",
        Cancelling = "Cancelling",
        TimedOut = "TimedOut",
        Failed = "Failed",
    }
}

impl InvocationStatus {
    /// Finished: it will not change any more.
    pub fn is_terminal(&self) -> bool {
        use InvocationStatus::*;
        matches!(self, Success | Cancelled | TimedOut | Failed)
    }
}

impl Invocation {
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }
}

#[async_trait]
pub trait Ssm: Send + Sync {
    /// Which of these instances (at most 50) have an SSM agent that is Online.
    async fn online(&self, ids: &[InstanceId]) -> Result<Vec<String>, AwsError>;
    /// SendCommand to at most 50 instances; returns the command id.
    async fn send_command(&self, cmd: &SsmCommand, ids: &[InstanceId]) -> Result<String, AwsError>;
    /// Every invocation of a command (ListCommandInvocations with details, all pages).
    async fn invocations(&self, command_id: &str) -> Result<Vec<Invocation>, AwsError>;
    async fn cancel(&self, command_id: &str, ids: &[InstanceId]) -> Result<(), AwsError>;
    /// GetParameter WithDecryption (a SecureString's plain text).
    async fn parameter(&self, name: &str) -> Result<crate::secret::Secret, AwsError>;
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
            // Each instance's invocation is its own launch: one failing must not stop Run
            // Command from sending to the others (AWS's default MaxErrors is 0).
            .max_errors("100%")
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
                    status: inv.status().map(|s| s.as_str().into()).unwrap_or_default(),
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
