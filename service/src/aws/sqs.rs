//! SQS, the queue lifecycle notifications arrive on: receive, delete and release in
//! batches, and the queue's redrive policy.

use std::time::Duration;

use async_trait::async_trait;

use super::sdk::{batch_result, classify, failed_entry};
use super::{AwsError, BatchResult};
use crate::metrics::CountCalls;

/// One message as received from SQS.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: String,
    pub receipt: String,
    pub body: String,
    pub receive_count: u32,
}

#[async_trait]
pub trait Queue: Send + Sync {
    async fn receive(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Message>, AwsError>;
    /// DeleteMessageBatch; at most 10 receipts.
    async fn delete_batch(&self, receipts: &[String]) -> Result<BatchResult, AwsError>;
    /// ChangeMessageVisibilityBatch; at most 10 entries. Zero releases a message at once.
    async fn change_visibility_batch(
        &self,
        entries: &[(String, Duration)],
    ) -> Result<BatchResult, AwsError>;
    /// The queue's RedrivePolicy attribute, when it has one (a dead-letter queue is set up).
    async fn redrive_policy(&self) -> Result<Option<String>, AwsError>;
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
                    failed_entry("sqs:DeleteMessageBatch", f.code(), f.message()),
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
                    failed_entry("sqs:ChangeMessageVisibilityBatch", f.code(), f.message()),
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
