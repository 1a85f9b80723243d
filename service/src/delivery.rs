//! A message handed to the pipeline by a queue source, and what becomes of it afterwards.
//!
//! Owns the message's side of at-least-once delivery. A [`Delivery`] keeps its message hidden
//! from other consumers from the moment it was received (its lease, extended by
//! [`crate::lease`]) until it is settled. [`Acks`] settles it by the run's [`Outcome`]:
//! deleted once handled; released to come back, at once (cancelled work) or after a growing
//! delay (a transient failure); a message that can never be handled deleted or left for the
//! dead-letter queue ([`RejectRule`]). The daemon and worker delete through the SQS API;
//! in Lambda the event source mapping deletes what the function reports handled, so only
//! releases are sent. The pipeline never sees any of this: it works the event and answers
//! with an outcome.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::warn;

use crate::aws::{Message, Queue};
use crate::batch::Batcher;
use crate::config::OnReject;
use crate::lease::{Lease, Leases};
use crate::outcome::Outcome;
use crate::retry::Backoff;

/// How long a delete or release waits for others to share its batch call.
const ACK_LINGER: Duration = Duration::from_millis(250);

/// One received message, hidden from other consumers while it is held.
pub struct Delivery {
    pub message: Message,
    /// When it was received: its visibility timeout started then.
    pub received: Instant,
    lease: Lease,
}

impl Delivery {
    pub fn new(message: Message, received: Instant, leases: &Leases) -> Delivery {
        let lease = leases.hold(Some(message.receipt.clone()), received);
        Delivery {
            message,
            received,
            lease,
        }
    }

    /// Keeps the message hidden and, once the pipeline knows the action, heartbeats it.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }
}

/// Where messages that can never be handled go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectPolicy {
    Delete,
    /// Release them so the queue's redrive policy moves them to its dead-letter queue.
    DeadLetter,
}

/// Where a source's rejected messages go, shared by its receive loop and its
/// acknowledgements: fixed by `queue.on_reject`, or with "auto" read from the queue's
/// redrive policy once the queue has answered a receive ([`RejectRule::decide`]), so a
/// source whose queue could not be read at start (its role not yet assumable) still
/// dead-letters once it can. Until decided, rejected messages are deleted.
#[derive(Debug, Clone)]
pub struct RejectRule {
    /// Set from the start unless "auto"; "auto" sets it once the redrive policy is read.
    decided: Arc<std::sync::OnceLock<RejectPolicy>>,
}

impl RejectRule {
    pub fn new(on_reject: OnReject) -> RejectRule {
        match on_reject {
            OnReject::Auto => RejectRule {
                decided: Arc::default(),
            },
            OnReject::Delete => RejectRule::fixed(RejectPolicy::Delete),
            OnReject::DeadLetter => RejectRule::fixed(RejectPolicy::DeadLetter),
        }
    }

    pub fn fixed(policy: RejectPolicy) -> RejectRule {
        let decided = std::sync::OnceLock::new();
        let _ = decided.set(policy);
        RejectRule {
            decided: Arc::new(decided),
        }
    }

    /// The policy now: Delete while "auto" has not read the queue's redrive policy yet.
    pub fn policy(&self) -> RejectPolicy {
        self.decided.get().copied().unwrap_or(RejectPolicy::Delete)
    }

    /// With "auto" and undecided: reads the queue's redrive policy (call it once the queue
    /// answered, with the credentials that will settle its messages). A transient failure
    /// leaves it to the next call; a permanent one (GetQueueAttributes refused) decides
    /// Delete, as a queue without a dead-letter queue. Otherwise nothing.
    pub async fn decide(&self, queue: &dyn Queue) {
        if self.decided.get().is_some() {
            return;
        }
        let policy = match queue.redrive_policy().await {
            Ok(Some(redrive)) => {
                tracing::info!(%redrive, "queue has a dead-letter queue: rejected messages are released to it");
                RejectPolicy::DeadLetter
            }
            Ok(None) => RejectPolicy::Delete,
            Err(e) if e.retryable() => {
                warn!(error = %e, "cannot read the queue's redrive policy yet; until it is read, rejected messages are deleted");
                return;
            }
            Err(e) => {
                warn!(error = %e, "cannot read the queue's redrive policy; rejected messages will be deleted");
                RejectPolicy::Delete
            }
        };
        let _ = self.decided.set(policy);
    }
}

/// What to do with a message once its run is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Handled (completed, skipped, rejected, duplicate): delete it.
    Delete,
    /// Not handled: make it visible again after this delay, so it comes back.
    Release(Duration),
}

impl Ack {
    /// The acknowledgement an outcome calls for. `receive_count` spaces out transient
    /// retries; `reject` decides where unhandleable messages go.
    pub fn for_outcome(outcome: Outcome, receive_count: u32, reject: RejectPolicy) -> Ack {
        match outcome {
            Outcome::Retry | Outcome::Running => Ack::Release(retry_delay(receive_count)),
            Outcome::Released => Ack::Release(Duration::ZERO),
            Outcome::Rejected => match reject {
                RejectPolicy::Delete => Ack::Delete,
                RejectPolicy::DeadLetter => Ack::Release(Duration::ZERO),
            },
            Outcome::Succeeded
            | Outcome::Failed
            | Outcome::HookError
            | Outcome::Duplicate
            | Outcome::Unmatched
            | Outcome::Skipped => Ack::Delete,
        }
    }
}

/// Delay before a message that failed for a transient reason comes back: grows with the
/// number of receives, capped at 5 minutes, jittered.
fn retry_delay(receive_count: u32) -> Duration {
    Backoff::doubling(Duration::from_secs(5), Duration::from_secs(300))
        .half_jitter()
        .delay(receive_count)
}

/// What settling a delivery came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Handled: deleted (or left for Lambda's event source mapping to delete).
    Handled,
    /// Released (or left) to come back.
    Released,
    /// Handled, but the delete failed: it comes back and is found done.
    AckFailed,
}

/// Who deletes a handled message from the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleter {
    /// This process (daemon, worker).
    Us,
    /// Lambda's event source mapping, for the records the function does not report failed.
    EventSource,
}

/// Settles deliveries with batched, retried SQS calls (ten messages a call).
pub struct Acks {
    /// None where the consumer deletes nothing itself (Lambda).
    deleter: Option<Batcher<String>>,
    releaser: Batcher<(String, Duration)>,
    tasks: Vec<JoinHandle<()>>,
    reject: RejectRule,
}

impl Acks {
    /// `deletes`: who deletes handled messages.
    pub fn spawn(
        queue: Arc<dyn Queue>,
        retry_for: Duration,
        deletes: Deleter,
        reject: RejectRule,
    ) -> Acks {
        let mut tasks = Vec::new();
        let deleter = (deletes == Deleter::Us).then(|| {
            let q = queue.clone();
            let (b, task) = Batcher::retried(10, ACK_LINGER, retry_for, move |r: Vec<String>| {
                let q = q.clone();
                async move { q.delete_batch(&r).await }
            });
            tasks.push(task);
            b
        });
        let (releaser, task) = Batcher::retried(
            10,
            ACK_LINGER,
            retry_for,
            move |entries: Vec<(String, Duration)>| {
                let q = queue.clone();
                async move { q.change_visibility_batch(&entries).await }
            },
        );
        tasks.push(task);
        Acks {
            deleter,
            releaser,
            tasks,
            reject,
        }
    }

    /// Ends the delivery's lease and acknowledges its message as `outcome` calls for.
    pub async fn settle(&self, delivery: Delivery, outcome: Outcome) -> Settled {
        let Delivery { message, lease, .. } = delivery;
        drop(lease);
        match Ack::for_outcome(outcome, message.receive_count, self.reject.policy()) {
            Ack::Delete => match &self.deleter {
                None => Settled::Handled,
                Some(deleter) => match deleter.submit(message.receipt).await {
                    Ok(()) => Settled::Handled,
                    Err(e) => {
                        warn!(message_id = %message.id, error = %e, "could not delete the message; it will come back and be found done");
                        Settled::AckFailed
                    }
                },
            },
            Ack::Release(delay) => {
                if let Err(e) = self.releaser.submit((message.receipt, delay)).await {
                    warn!(message_id = %message.id, error = %e, "could not release the message; it comes back when its visibility lapses");
                }
                Settled::Released
            }
        }
    }

    /// Waits until every acknowledgement submitted so far was sent.
    pub async fn close(self) {
        let Acks {
            deleter,
            releaser,
            tasks,
            ..
        } = self;
        drop((deleter, releaser));
        for t in tasks {
            let _ = t.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::{AwsError, BatchResult, ErrorClass};

    #[test]
    fn outcomes_map_to_acknowledgements() {
        use RejectPolicy::*;
        assert_eq!(Ack::for_outcome(Outcome::Succeeded, 1, Delete), Ack::Delete);
        assert_eq!(Ack::for_outcome(Outcome::Duplicate, 1, Delete), Ack::Delete);
        assert_eq!(
            Ack::for_outcome(Outcome::Released, 1, Delete),
            Ack::Release(Duration::ZERO)
        );
        assert_eq!(Ack::for_outcome(Outcome::Rejected, 1, Delete), Ack::Delete);
        assert_eq!(
            Ack::for_outcome(Outcome::Rejected, 1, DeadLetter),
            Ack::Release(Duration::ZERO)
        );
        match Ack::for_outcome(Outcome::Retry, 2, Delete) {
            Ack::Release(d) => {
                assert!(d >= Duration::from_secs(10) && d <= Duration::from_secs(20))
            }
            other => panic!("{other:?}"),
        }
    }

    /// A queue that only answers GetQueueAttributes, from a script.
    struct Redrive(std::sync::Mutex<Vec<Result<Option<String>, AwsError>>>);

    #[async_trait::async_trait]
    impl Queue for Redrive {
        async fn receive(
            &self,
            _: u32,
            _: Duration,
            _: Duration,
        ) -> Result<Vec<Message>, AwsError> {
            unreachable!()
        }
        async fn delete_batch(&self, _: &[String]) -> Result<BatchResult, AwsError> {
            unreachable!()
        }
        async fn change_visibility_batch(
            &self,
            _: &[(String, Duration)],
        ) -> Result<BatchResult, AwsError> {
            unreachable!()
        }
        async fn redrive_policy(&self) -> Result<Option<String>, AwsError> {
            self.0.lock().unwrap().remove(0)
        }
    }

    fn failing(class: ErrorClass) -> Result<Option<String>, AwsError> {
        Err(AwsError {
            operation: "sqs:GetQueueAttributes",
            code: None,
            message: "no".into(),
            class,
        })
    }

    #[tokio::test]
    async fn auto_reads_the_redrive_policy_until_it_is_known_then_never_again() {
        let q = Redrive(std::sync::Mutex::new(vec![
            failing(ErrorClass::Timeout),
            Ok(Some("{}".into())),
        ]));
        let rule = RejectRule::new(OnReject::Auto);
        let shared = rule.clone();
        rule.decide(&q).await;
        assert_eq!(rule.policy(), RejectPolicy::Delete, "undecided: deleted");
        rule.decide(&q).await;
        assert_eq!(
            shared.policy(),
            RejectPolicy::DeadLetter,
            "read again, shared"
        );
        rule.decide(&q).await; // the script is empty: a third read would panic
        let refused = Redrive(std::sync::Mutex::new(vec![failing(ErrorClass::Access)]));
        let rule = RejectRule::new(OnReject::Auto);
        rule.decide(&refused).await;
        rule.decide(&refused).await;
        assert_eq!(rule.policy(), RejectPolicy::Delete, "refused: decided once");
        let fixed = RejectRule::new(OnReject::DeadLetter);
        fixed.decide(&refused).await;
        assert_eq!(fixed.policy(), RejectPolicy::DeadLetter, "nothing read");
    }

    #[test]
    fn retry_delays_grow_and_are_capped() {
        for n in 0..20 {
            let d = retry_delay(n);
            assert!(d <= Duration::from_secs(300), "{d:?}");
            assert!(d >= Duration::from_millis(2500), "{d:?}");
        }
    }
}
