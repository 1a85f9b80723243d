//! ECS: an EC2 instance's container instance, and draining it.

use async_trait::async_trait;

use super::sdk::classify;
use super::AwsError;
use crate::event::InstanceId;
use crate::metrics::CountCalls;

/// An EC2 instance's place in an ECS cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInstance {
    pub arn: String,
    pub status: ContainerInstanceStatus,
    pub running_tasks: i32,
}

vocabulary! {
    /// A container instance's status in its cluster.
    pub enum ContainerInstanceStatus {
        Active = "ACTIVE",
        Draining = "DRAINING",
        Inactive = "INACTIVE",
        Registering = "REGISTERING",
        RegistrationFailed = "REGISTRATION_FAILED",
        Deregistering = "DEREGISTERING",
    }
}

/// The ECS calls the ecs_drain step makes.
#[async_trait]
pub trait Ecs: Send + Sync {
    /// The cluster's container instance on an EC2 instance (ListContainerInstances with the
    /// filter `ec2InstanceId == ID`, then DescribeContainerInstances); None when the
    /// instance is not registered in the cluster.
    async fn container_instance(
        &self,
        cluster: &str,
        ec2: &InstanceId,
    ) -> Result<Option<ContainerInstance>, AwsError>;
    /// DescribeContainerInstances for one container instance; None when it is gone
    /// (deregistered).
    async fn describe_container_instance(
        &self,
        cluster: &str,
        arn: &str,
    ) -> Result<Option<ContainerInstance>, AwsError>;
    /// UpdateContainerInstancesState to DRAINING: services move their tasks elsewhere.
    async fn drain(&self, cluster: &str, arn: &str) -> Result<(), AwsError>;
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
impl Ecs for EcsClient {
    async fn container_instance(
        &self,
        cluster: &str,
        ec2: &InstanceId,
    ) -> Result<Option<ContainerInstance>, AwsError> {
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
    ) -> Result<Option<ContainerInstance>, AwsError> {
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
            .map(|c| ContainerInstance {
                arn: c.container_instance_arn().unwrap_or(arn).to_string(),
                status: c.status().unwrap_or_default().into(),
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
