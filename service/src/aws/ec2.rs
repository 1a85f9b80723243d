//! EC2: what an instance is (state, addresses, tags), tagging it, its console output.

use async_trait::async_trait;

use super::sdk::classify;
use super::AwsError;
use crate::event::InstanceId;
use crate::metrics::CountCalls;

/// What DescribeInstances says about one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    pub private_dns: Option<String>,
    pub public_dns: Option<String>,
    pub tags: std::collections::BTreeMap<String, String>,
    /// What Ansible's EC2 inventory also tells a playbook (see `step::ansible::inventory`).
    pub facts: InstanceFacts,
}

/// Facts of an instance that only playbooks read: its type, image, placement and network,
/// as DescribeInstances gives them (absent ones None).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFacts {
    pub instance_type: Option<String>,
    pub image_id: Option<String>,
    pub availability_zone: Option<String>,
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
    pub architecture: Option<String>,
    pub key_name: Option<String>,
    /// RFC 3339.
    pub launch_time: Option<String>,
}

vocabulary! {
    /// An EC2 instance's state (`InstanceState.Name`).
    pub enum InstanceState {
        Pending = "pending",
        Running = "running",
        ShuttingDown = "shutting-down",
        Terminated = "terminated",
        Stopping = "stopping",
        Stopped = "stopped",
    }
}

#[async_trait]
pub trait Instances: Send + Sync {
    /// CreateTags on one instance (tags differ per instance, so this cannot be batched).
    async fn create_tags(
        &self,
        instance: &InstanceId,
        tags: &[(String, String)],
    ) -> Result<(), AwsError>;
    /// The same tags on many instances. One call per instance unless the implementation
    /// tags them together (EC2's CreateTags takes many resources).
    async fn tag_all(
        &self,
        instances: &[InstanceId],
        tags: &[(String, String)],
    ) -> Result<(), AwsError> {
        for i in instances {
            self.create_tags(i, tags).await?;
        }
        Ok(())
    }
    /// DescribeInstances for many instances (one call per 200 ids). Unknown ids are simply
    /// absent from the answer, never an error.
    async fn describe(&self, ids: &[InstanceId]) -> Result<Vec<InstanceInfo>, AwsError>;
    /// GetConsoleOutput, decoded from base64; None while the instance has no output yet.
    /// (EC2 has no batch form of this call.)
    async fn console_output(&self, instance: &InstanceId) -> Result<Option<String>, AwsError>;
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
                        .map(|n| n.as_str().into())
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
                    facts: facts_of(i),
                });
            }
        }
        Ok(())
    }
}

fn facts_of(i: &aws_sdk_ec2::types::Instance) -> InstanceFacts {
    let text = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(str::to_string);
    InstanceFacts {
        instance_type: i.instance_type().map(|t| t.as_str().to_string()),
        image_id: text(i.image_id()),
        availability_zone: text(i.placement().and_then(|p| p.availability_zone())),
        vpc_id: text(i.vpc_id()),
        subnet_id: text(i.subnet_id()),
        architecture: i.architecture().map(|a| a.as_str().to_string()),
        key_name: text(i.key_name()),
        launch_time: i.launch_time().and_then(|t| {
            t.fmt(aws_sdk_ec2::primitives::DateTimeFormat::DateTime)
                .ok()
        }),
    }
}

#[async_trait]
impl Instances for Ec2Instances {
    async fn create_tags(
        &self,
        instance: &InstanceId,
        tags: &[(String, String)],
    ) -> Result<(), AwsError> {
        self.tag_all(std::slice::from_ref(instance), tags).await
    }

    async fn tag_all(
        &self,
        instances: &[InstanceId],
        tags: &[(String, String)],
    ) -> Result<(), AwsError> {
        use aws_sdk_ec2::types::Tag;
        if instances.is_empty() {
            return Ok(());
        }
        self.client
            .create_tags()
            .set_resources(Some(instances.iter().map(|i| i.to_string()).collect()))
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
        // Latest: what the console shows now, not the buffer EC2 posts only after a state
        // transition (cloud-init prints the keys after boot, so the buffer may lack them for
        // a long while). Instances that cannot give it (not on Nitro) answer
        // UnsupportedOperation: the buffer is all there is for them.
        let latest = self
            .client
            .get_console_output()
            .instance_id(instance.as_str())
            .latest(true)
            .send()
            .await
            .map_err(|e| classify(op, e));
        let out = match latest {
            Err(e) if e.code.as_deref() == Some("UnsupportedOperation") => self
                .client
                .get_console_output()
                .instance_id(instance.as_str())
                .send()
                .await
                .map_err(|e| classify(op, e))?,
            other => other?,
        };
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
