//! A micro-batcher: callers submit one item and await its own result; a background task
//! groups items into calls of up to `max` (AWS batch limits are 10), waiting at most
//! `linger` for a batch to fill.
//!
//! Used for DeleteMessageBatch, ChangeMessageVisibilityBatch (releases), SNS PublishBatch
//! and DescribeInstances. Owns no AWS knowledge: the flush function does the call;
//! [`Batcher::retried`] wraps it in the project's one retry policy.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::aws::AwsError;
use crate::retry::with_backoff;

type Item<T, R> = (T, oneshot::Sender<Result<R, AwsError>>);

/// Batches items of type `T`; each caller gets its own `Result<R, AwsError>`: its entry's
/// error, or the whole call's, with its class (transient or not).
pub struct Batcher<T, R = ()> {
    tx: mpsc::UnboundedSender<Item<T, R>>,
}

impl<T, R> Clone for Batcher<T, R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> Batcher<T, R> {
    /// Starts the batching task. It ends once every `Batcher` clone is dropped and the last
    /// batch has been flushed; await the handle to be sure nothing is left.
    pub fn spawn<F, Fut>(max: usize, linger: Duration, flush: F) -> (Batcher<T, R>, JoinHandle<()>)
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<R, AwsError>>> + Send + 'static,
    {
        Self::start(max, linger, Unwanted::Flush, flush)
    }

    fn start<F, Fut>(
        max: usize,
        linger: Duration,
        unwanted: Unwanted,
        flush: F,
    ) -> (Batcher<T, R>, JoinHandle<()>)
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<R, AwsError>>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Item<T, R>>();
        let handle = tokio::spawn(async move {
            let flush = std::sync::Arc::new(flush);
            let mut running = tokio::task::JoinSet::new();
            while let Some(first) = rx.recv().await {
                let mut items = vec![first];
                let deadline = tokio::time::sleep(linger);
                tokio::pin!(deadline);
                while items.len() < max {
                    tokio::select! {
                        next = rx.recv() => match next {
                            Some(i) => items.push(i),
                            None => break,
                        },
                        _ = &mut deadline => break,
                    }
                }
                let (values, replies): (Vec<T>, Vec<_>) = items.into_iter().unzip();
                let flush = flush.clone();
                // Batches may overlap: a slow (throttled) call must not hold up the next one.
                running.spawn(async move {
                    let mut replies = replies;
                    let results = match unwanted {
                        Unwanted::Flush => flush(values).await,
                        Unwanted::Drop => tokio::select! {
                            biased;
                            () = all_closed(&mut replies) => return,
                            r = flush(values) => r,
                        },
                    };
                    for (reply, r) in replies.into_iter().zip(results) {
                        let _ = reply.send(r);
                    }
                });
                while running.try_join_next().is_some() {}
            }
            while running.join_next().await.is_some() {}
        });
        (Batcher { tx }, handle)
    }

    /// A batcher whose calls are retried with backoff for `retry_for` after the SDK's own
    /// attempts; a call that still fails fails each of its items with its error.
    pub fn retried<F, Fut>(
        max: usize,
        linger: Duration,
        retry_for: Duration,
        call: F,
    ) -> (Batcher<T, R>, JoinHandle<()>)
    where
        T: Clone + Sync,
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<R, AwsError>>, AwsError>> + Send + 'static,
    {
        Self::retried_unless(max, linger, retry_for, Unwanted::Flush, call)
    }

    /// Like [`Batcher::retried`], but a batch every caller stopped waiting for is dropped,
    /// its call (and retries) with it: nothing is sent for work that ended. For calls
    /// whose items are kept elsewhere until they are known sent (the result outbox), so
    /// that a call frozen with a Lambda execution environment is not made late, beside
    /// the next invocation's own.
    pub fn retried_while_wanted<F, Fut>(
        max: usize,
        linger: Duration,
        retry_for: Duration,
        call: F,
    ) -> (Batcher<T, R>, JoinHandle<()>)
    where
        T: Clone + Sync,
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<R, AwsError>>, AwsError>> + Send + 'static,
    {
        Self::retried_unless(max, linger, retry_for, Unwanted::Drop, call)
    }

    fn retried_unless<F, Fut>(
        max: usize,
        linger: Duration,
        retry_for: Duration,
        unwanted: Unwanted,
        call: F,
    ) -> (Batcher<T, R>, JoinHandle<()>)
    where
        T: Clone + Sync,
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<Result<R, AwsError>>, AwsError>> + Send + 'static,
    {
        let call = std::sync::Arc::new(call);
        Self::start(max, linger, unwanted, move |items: Vec<T>| {
            let call = call.clone();
            async move {
                match with_backoff(retry_for, || call(items.clone())).await {
                    Ok(results) => results,
                    Err(e) => items.iter().map(|_| Err(e.clone())).collect(),
                }
            }
        })
    }

    pub async fn submit(&self, item: T) -> Result<R, AwsError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((item, reply))
            .map_err(|_| AwsError::permanent("batch", "the batcher has stopped"))?;
        rx.await
            .unwrap_or_else(|_| Err(AwsError::permanent("batch", "the batch call was dropped")))
    }
}

/// What becomes of a batch every caller stopped waiting for.
#[derive(Clone, Copy)]
enum Unwanted {
    /// Sent all the same (a delete, a release: wanted whoever waits).
    Flush,
    /// Dropped, its call with it.
    Drop,
}

/// Returns once every caller of a batch stopped waiting for its answer.
async fn all_closed<R>(replies: &mut [oneshot::Sender<Result<R, AwsError>>]) {
    for reply in replies.iter_mut() {
        reply.closed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test(start_paused = true)]
    async fn groups_up_to_max_and_answers_each_caller() {
        let calls = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let seen = calls.clone();
        let (b, handle) =
            Batcher::<u32>::spawn(10, Duration::from_millis(50), move |items: Vec<u32>| {
                seen.lock().unwrap().push(items.clone());
                async move {
                    items
                        .iter()
                        .map(|i| {
                            if i % 7 == 0 {
                                Err(AwsError::permanent("test", format!("no {i}")))
                            } else {
                                Ok(())
                            }
                        })
                        .collect()
                }
            });
        let mut tasks = Vec::new();
        for i in 1..=25u32 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move { (i, b.submit(i).await) }));
        }
        for t in tasks {
            let (i, r) = t.await.unwrap();
            assert_eq!(r.is_err(), i % 7 == 0, "item {i}");
        }
        drop(b);
        handle.await.unwrap();
        let calls = calls.lock().unwrap();
        assert_eq!(calls.iter().map(Vec::len).sum::<usize>(), 25);
        assert!(calls.iter().all(|c| c.len() <= 10));
        assert_eq!(calls.len(), 3, "25 items in batches of 10: {calls:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn retried_calls_back_off_then_fail_each_item() {
        let attempts = Arc::new(Mutex::new(0u32));
        let seen = attempts.clone();
        let (b, handle) = Batcher::<u32>::retried(
            10,
            Duration::from_millis(10),
            Duration::from_secs(5),
            move |items: Vec<u32>| {
                let n = {
                    let mut a = seen.lock().unwrap();
                    *a += 1;
                    *a
                };
                async move {
                    if n < 3 {
                        Err(AwsError {
                            operation: "sqs:DeleteMessageBatch",
                            code: Some("Throttling".into()),
                            message: "slow down".into(),
                            class: crate::aws::ErrorClass::Throttled,
                        })
                    } else if items[0] == 99 {
                        Err(AwsError::permanent(
                            "sqs:DeleteMessageBatch",
                            "no such queue",
                        ))
                    } else {
                        Ok(items.iter().map(|_| Ok(())).collect())
                    }
                }
            },
        );
        assert_eq!(b.submit(1).await, Ok(()));
        assert_eq!(
            *attempts.lock().unwrap(),
            3,
            "two throttled attempts, then success"
        );
        let e = b.submit(99).await.unwrap_err();
        assert_eq!(e.message, "no such queue", "{e}");
        assert!(!e.retryable(), "the call's class reaches the caller");
        drop(b);
        handle.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_nobody_waits_for_any_more_is_dropped_only_when_asked() {
        for (while_wanted, expect_sent) in [(true, 0), (false, 1)] {
            let sent = Arc::new(Mutex::new(0u32));
            let seen = sent.clone();
            let call = move |items: Vec<u32>| {
                let seen = seen.clone();
                async move {
                    // A slow call (a hung attempt, a throttled retry).
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    *seen.lock().unwrap() += 1;
                    Ok(items.iter().map(|_| Ok(())).collect())
                }
            };
            let (linger, retry_for) = (Duration::from_millis(10), Duration::from_secs(5));
            let (b, handle) = match while_wanted {
                true => Batcher::<u32>::retried_while_wanted(10, linger, retry_for, call),
                false => Batcher::<u32>::retried(10, linger, retry_for, call),
            };
            let waiter = {
                let b = b.clone();
                tokio::spawn(async move { b.submit(1).await })
            };
            tokio::time::sleep(Duration::from_secs(1)).await;
            // The caller gives up (its task aborted, as an invocation's outbox is).
            waiter.abort();
            let _ = waiter.await;
            drop(b);
            handle.await.unwrap();
            assert_eq!(
                *sent.lock().unwrap(),
                expect_sent,
                "while_wanted {while_wanted}"
            );
        }
    }
}
