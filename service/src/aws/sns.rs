//! SNS: the result topic's PublishBatch, and checking the topic exists.

use std::collections::HashMap;

use async_trait::async_trait;

use super::sdk::{batch_result, classify, failed_entry};
use super::{AwsError, BatchResult};
use crate::metrics::CountCalls;

#[async_trait]
pub trait Notifier: Send + Sync {
    /// PublishBatch; at most 10 messages.
    async fn publish_batch(
        &self,
        topic_arn: &str,
        messages: &[String],
    ) -> Result<BatchResult, AwsError>;
    /// GetTopicAttributes: the topic exists and may be read (`provision check --aws`).
    async fn check_topic(&self, topic_arn: &str) -> Result<(), AwsError>;
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
        let failed: HashMap<String, AwsError> = out
            .failed()
            .iter()
            .map(|f| {
                let e = failed_entry("sns:PublishBatch", f.code(), f.message());
                (f.id().to_string(), e)
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
