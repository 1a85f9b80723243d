//! The receive loop: long-poll SQS, hand each message to the pipeline, acknowledge it.
//!
//! Owns concurrency (at most `max_in_flight` messages, never receiving more than it can
//! start), acknowledgement (DeleteMessageBatch, ten at a time; releases through
//! ChangeMessageVisibilityBatch) and shutdown: stop receiving, give in-flight work the grace
//! period, then cancel it and release its messages so another worker takes them. `Mode::Drain`
//! is the one-shot worker: it stops once a receive comes back empty with nothing in flight.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::aws::retry::{backoff, with_backoff};
use crate::aws::Queue;
use crate::batch::Batcher;
use crate::metrics::Stats;
use crate::pipeline::{Disposition, Pipeline};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Poll forever (until shutdown).
    Daemon,
    /// Drain the queue once and return.
    Drain,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub max_in_flight: usize,
    pub wait_time: Duration,
    pub visibility_timeout: Duration,
    pub shutdown_grace: Duration,
    pub retry_for: Duration,
}

/// What a run of the loop did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub received: u64,
    /// Deleted after being handled (completed, skipped, rejected, duplicate).
    pub deleted: u64,
    /// Left or released to come back.
    pub returned: u64,
    /// Acknowledgements that failed (the message will come back and be found done).
    pub ack_errors: u64,
    pub receive_errors: u64,
    /// Drain mode stopped because the queue could not be read.
    pub gave_up: bool,
}

impl Summary {
    /// True when every message received was handled and acknowledged.
    pub fn all_handled(&self) -> bool {
        self.returned == 0 && self.ack_errors == 0 && !self.gave_up
    }
}

const OUTBOX_EVERY: Duration = Duration::from_secs(60);
/// How often the loop marks itself alive while it waits for a free slot.
const ALIVE_EVERY: Duration = Duration::from_secs(5);
/// How long a receive waits for more free slots before asking for fewer than ten messages.
const BATCH_FILL: Duration = Duration::from_millis(100);
/// How long a delete or release waits for others to share its batch call.
const ACK_LINGER: Duration = Duration::from_millis(250);

/// Stops after this many consecutive failed receives in drain mode (the daemon keeps trying).
const DRAIN_MAX_RECEIVE_FAILURES: u32 = 5;

pub async fn run(
    pipeline: Arc<Pipeline>,
    queue: Arc<dyn Queue>,
    settings: Settings,
    mode: Mode,
    shutdown: impl Future<Output = ()>,
) -> Summary {
    let stats = pipeline.stats.clone();
    let retry_for = settings.retry_for;
    let q = queue.clone();
    let (deleter, deleter_task) = Batcher::spawn(10, ACK_LINGER, move |receipts: Vec<String>| {
        let q = q.clone();
        async move {
            match with_backoff(retry_for, || q.delete_batch(&receipts)).await {
                Ok(r) => r,
                Err(e) => vec![Err(e.to_string()); receipts.len()],
            }
        }
    });
    let q = queue.clone();
    let (releaser, releaser_task) =
        Batcher::spawn(10, ACK_LINGER, move |entries: Vec<(String, Duration)>| {
            let q = q.clone();
            async move {
                match with_backoff(retry_for, || q.change_visibility_batch(&entries)).await {
                    Ok(r) => r,
                    Err(e) => vec![Err(e.to_string()); entries.len()],
                }
            }
        });

    // Result events that failed to publish earlier (the outbox): at start, then every minute.
    let outbox_stop = CancellationToken::new();
    let outbox = {
        let (pipeline, stop) = (pipeline.clone(), outbox_stop.clone());
        tokio::spawn(async move {
            loop {
                pipeline.republish().await;
                tokio::select! {
                    _ = tokio::time::sleep(OUTBOX_EVERY) => {}
                    _ = stop.cancelled() => return,
                }
            }
        })
    };

    let slots = Arc::new(Semaphore::new(settings.max_in_flight));
    let cancel = CancellationToken::new();
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut summary = Summary::default();
    let mut receive_failures = 0u32;
    tokio::pin!(shutdown);

    'receive: loop {
        while let Some(done) = tasks.try_join_next() {
            tally(&mut summary, done);
        }
        // Only receive what can be started now: a message waiting for a slot would sit
        // invisible with nobody heartbeating its hook.
        // Waiting for a free slot is healthy (all slots busy): say so while waiting.
        let first = loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break 'receive,
                p = slots.clone().acquire_owned() => break p.expect("semaphore is never closed"),
                _ = tokio::time::sleep(ALIVE_EVERY) => Stats::mark(&stats.loop_alive_ms),
            }
        };
        let mut permits = vec![first];
        while permits.len() < 10 {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        // Fewer than ten free slots while work is finishing: wait a moment for more, so a
        // receive asks for a full batch instead of a trickle of small ones.
        if permits.len() < 10 && !tasks.is_empty() {
            let fill = tokio::time::sleep(BATCH_FILL);
            tokio::pin!(fill);
            while permits.len() < 10 {
                tokio::select! {
                    p = slots.clone().acquire_owned() => permits.push(p.expect("semaphore is never closed")),
                    _ = &mut fill => break,
                }
            }
        }
        let wait = match mode {
            Mode::Daemon => settings.wait_time,
            // Draining: a short poll is enough to tell "empty" from "busy".
            Mode::Drain => settings.wait_time.min(Duration::from_secs(1)),
        };
        let received = tokio::select! {
            biased;
            _ = &mut shutdown => break 'receive,
            r = queue.receive(permits.len() as u32, wait, settings.visibility_timeout) => r,
        };
        let at = Instant::now();
        let messages = match received {
            Ok(m) => {
                receive_failures = 0;
                Stats::mark(&stats.last_poll_ms);
                Stats::mark(&stats.loop_alive_ms);
                m
            }
            Err(e) => {
                Stats::inc(&stats.receive_errors);
                summary.receive_errors += 1;
                receive_failures += 1;
                error!(error = %e, failures = receive_failures, "cannot receive from the queue");
                if mode == Mode::Drain
                    && (!e.retryable || receive_failures >= DRAIN_MAX_RECEIVE_FAILURES)
                {
                    error!("giving up: the queue cannot be read");
                    summary.gave_up = true;
                    break 'receive;
                }
                let pause = backoff(
                    receive_failures,
                    Duration::from_secs(1),
                    Duration::from_secs(60),
                );
                tokio::select! {
                    _ = &mut shutdown => break 'receive,
                    _ = tokio::time::sleep(pause) => continue 'receive,
                }
            }
        };
        if messages.is_empty() {
            drop(permits);
            if mode == Mode::Drain {
                if tasks.is_empty() {
                    break 'receive;
                }
                // Something is still in flight and may release its message: wait for it.
                if let Some(done) = tasks.join_next().await {
                    tally(&mut summary, done);
                }
            }
            continue;
        }
        summary.received += messages.len() as u64;
        let mut permits = permits.into_iter();
        for msg in messages {
            let permit = permits.next();
            let (pipeline, deleter, releaser, cancel) = (
                pipeline.clone(),
                deleter.clone(),
                releaser.clone(),
                cancel.clone(),
            );
            Stats::inc(&pipeline.stats.in_flight);
            tasks.spawn(async move {
                let _permit = permit;
                let _in_flight = InFlight(pipeline.stats.clone());
                let disposition = pipeline.handle_message(&msg, at, &cancel).await;
                match disposition {
                    Disposition::Delete => match deleter.submit(msg.receipt.clone()).await {
                        Ok(()) => Outcome::Deleted,
                        Err(e) => {
                            warn!(message_id = %msg.id, error = %e, "could not delete the message; it will come back and be found done");
                            Outcome::AckFailed
                        }
                    },
                    Disposition::Retry(delay) => {
                        if let Err(e) = releaser.submit((msg.receipt.clone(), delay)).await {
                            warn!(message_id = %msg.id, error = %e, "could not release the message; it comes back when its visibility lapses");
                        }
                        Outcome::Returned
                    }
                }
            });
        }
    }

    // Shutdown (or drain finished): no more receives.
    while let Some(done) = tasks.try_join_next() {
        tally(&mut summary, done);
    }
    if !tasks.is_empty() {
        info!(in_flight = tasks.len(), grace = ?settings.shutdown_grace, "waiting for in-flight events");
        let grace = tokio::time::sleep(settings.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                next = tasks.join_next() => match next {
                    Some(done) => tally(&mut summary, done),
                    None => break,
                },
                _ = &mut grace, if !cancel.is_cancelled() => {
                    warn!(in_flight = tasks.len(), "grace period over; releasing unfinished events to the queue");
                    cancel.cancel();
                }
            }
        }
    }
    outbox_stop.cancel();
    let _ = outbox.await;
    drop(deleter);
    drop(releaser);
    let _ = deleter_task.await;
    let _ = releaser_task.await;
    summary
}

/// Counts a message as in flight until dropped.
struct InFlight(Arc<Stats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

enum Outcome {
    Deleted,
    Returned,
    AckFailed,
}

fn tally(summary: &mut Summary, done: Result<Outcome, tokio::task::JoinError>) {
    match done {
        Ok(Outcome::Deleted) => summary.deleted += 1,
        Ok(Outcome::Returned) => summary.returned += 1,
        Ok(Outcome::AckFailed) => summary.ack_errors += 1,
        Err(e) => {
            error!(error = %e, "message task panicked; its message will come back");
            summary.returned += 1;
        }
    }
}
