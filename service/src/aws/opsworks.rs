//! OpsWorks Stacks: the calls the opsworks step makes, in the stack's region.

use std::collections::HashMap;

use async_trait::async_trait;

use super::sdk::classify;
use super::{AwsError, InstanceInfo};
use crate::metrics::CountCalls;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwStack {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwLayer {
    pub id: String,
    pub shortname: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwInstance {
    pub id: String,
    pub ec2_instance_id: Option<String>,
    pub hostname: Option<String>,
    pub status: String,
    pub layer_ids: Vec<String>,
}

/// The OpsWorks Stacks calls the opsworks step makes, in a given region.
#[async_trait]
pub trait OpsWorks: Send + Sync {
    async fn stacks(&self, region: &str) -> Result<Vec<OwStack>, AwsError>;
    /// One stack by id (DescribeStacks with StackIds: what a policy scoped to stack ARNs
    /// allows); None when there is no such stack.
    async fn stack(&self, region: &str, id: &str) -> Result<Option<OwStack>, AwsError>;
    async fn layers(&self, region: &str, stack_id: &str) -> Result<Vec<OwLayer>, AwsError>;
    async fn instances(&self, region: &str, stack_id: &str) -> Result<Vec<OwInstance>, AwsError>;
    async fn instance(&self, region: &str, id: &str) -> Result<Option<OwInstance>, AwsError>;
    async fn hostname_suggestion(&self, region: &str, layer_id: &str) -> Result<String, AwsError>;
    async fn register(
        &self,
        region: &str,
        stack_id: &str,
        hostname: &str,
        ec2: &InstanceInfo,
    ) -> Result<String, AwsError>;
    async fn assign(&self, region: &str, id: &str, layer_id: &str) -> Result<(), AwsError>;
    async fn deregister(&self, region: &str, id: &str) -> Result<(), AwsError>;
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

    async fn stack(&self, region: &str, id: &str) -> Result<Option<OwStack>, AwsError> {
        let op = "opsworks:DescribeStacks";
        match self
            .client(region)
            .describe_stacks()
            .stack_ids(id)
            .send()
            .await
            .map_err(|e| classify(op, e))
        {
            Ok(out) => Ok(out.stacks().first().map(|s| OwStack {
                id: s.stack_id().unwrap_or_default().to_string(),
                name: s.name().unwrap_or_default().to_string(),
            })),
            Err(e) if e.class == super::ErrorClass::NotFound => Ok(None),
            Err(e) => Err(e),
        }
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
