//! A message handed to the pipeline by a queue source, and what becomes of it afterwards.
//!
//! Owns the message's side of at-least-once delivery. A [`Delivery`] keeps its message hidden
//! from other consumers from the moment it was received (its lease, extended by
//! [`crate::lease`]) until it is settled. [`Acks`] settles it by the run's [`Outcome`]:
//! deleted once handled; released to come back, at once (cancelled work) or after a growing
//! delay (a transient failure); a message that can never be handled deleted or left for the
//! dead-letter queue ([`RejectPolicy`]). The daemon and worker delete through the SQS API;
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
    reject: RejectPolicy,
}

impl Acks {
    /// `deletes`: who deletes handled messages.
    pub fn spawn(
        queue: Arc<dyn Queue>,
        retry_for: Duration,
        deletes: Deleter,
        reject: RejectPolicy,
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
        match Ack::for_outcome(outcome, message.receive_count, self.reject) {
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

    #[test]
    fn retry_delays_grow_and_are_capped() {
        for n in 0..20 {
            let d = retry_delay(n);
            assert!(d <= Duration::from_secs(300), "{d:?}");
            assert!(d >= Duration::from_millis(2500), "{d:?}");
        }
    }
}
