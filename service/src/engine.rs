//! The in-flight engine: at most `max_in_flight` deliveries worked at once, each cancellable
//! at a deadline.
//!
//! Owns concurrency, cancellation and the end of work for every source that works many
//! deliveries: the SQS daemon and worker (which take a free [`Slot`] before receiving, so a
//! message never waits unheartbeated for one) and the Lambda batch (whose records queue for
//! a slot). It knows nothing of messages, pipelines or acknowledgements: the work it runs
//! does that, and reports a value of type `T`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{warn, Instrument};

/// The right to work one delivery now.
pub type Slot = OwnedSemaphorePermit;

/// One finished piece of work: its value, or how its task died.
pub type Done<T> = Result<T, JoinError>;

pub struct Engine<T> {
    slots: Arc<Semaphore>,
    tasks: JoinSet<T>,
    cancel: CancellationToken,
}

impl<T: Send + 'static> Engine<T> {
    pub fn new(max_in_flight: usize) -> Engine<T> {
        Engine {
            slots: Arc::new(Semaphore::new(max_in_flight.max(1))),
            tasks: JoinSet::new(),
            cancel: CancellationToken::new(),
        }
    }

    /// Waits for a free slot.
    pub async fn slot(&self) -> Slot {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Up to `max` free slots, at least one: waits for the first, then for more while
    /// `fill` lasts and work is finishing, so a receive asks for a full batch instead of a
    /// trickle of small ones.
    pub async fn slots(&self, max: usize, fill: Duration) -> Vec<Slot> {
        let mut slots = vec![self.slot().await];
        while slots.len() < max {
            match self.slots.clone().try_acquire_owned() {
                Ok(s) => slots.push(s),
                Err(_) => break,
            }
        }
        if slots.len() < max && !self.tasks.is_empty() {
            let fill = tokio::time::sleep(fill);
            tokio::pin!(fill);
            while slots.len() < max {
                tokio::select! {
                    s = self.slot() => slots.push(s),
                    _ = &mut fill => break,
                }
            }
        }
        slots
    }

    /// Starts work that already holds its slot. `work` gets the engine's cancellation token:
    /// it fires when the engine stops waiting (see [`Engine::finish`]).
    pub fn start<F, Fut>(&mut self, slot: Slot, work: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let fut = work(self.cancel.clone());
        self.tasks.spawn(
            async move {
                let _slot = slot;
                fut.await
            }
            .in_current_span(),
        );
    }

    /// Queues work for the next free slot. `work` gets the cancellation token once it has
    /// a slot, or None when the engine was cancelled before one came free: it then only
    /// winds down (its delivery goes back untouched).
    pub fn queue<F, Fut>(&mut self, work: F)
    where
        F: FnOnce(Option<CancellationToken>) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let (slots, cancel) = (self.slots.clone(), self.cancel.clone());
        self.tasks.spawn(
            async move {
                let slot = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => None,
                    s = slots.acquire_owned() => Some(s.expect("the semaphore is never closed")),
                };
                let done = work(slot.is_some().then_some(cancel)).await;
                drop(slot);
                done
            }
            .in_current_span(),
        );
    }

    pub fn in_flight(&self) -> usize {
        self.tasks.len()
    }

    /// Work that has finished, without waiting.
    pub fn finished(&mut self) -> Vec<Done<T>> {
        std::iter::from_fn(|| self.tasks.try_join_next()).collect()
    }

    /// Waits for the next piece of work to finish; None when nothing is in flight.
    pub async fn next(&mut self) -> Option<Done<T>> {
        self.tasks.join_next().await
    }

    /// Waits for all work. At `cancel_at` the rest is cancelled (it winds down and reports
    /// as it sees fit, e.g. by releasing its message), logging `why`; at `give_up_at`
    /// whatever still runs is aborted and reported as a `JoinError`.
    pub async fn finish(
        &mut self,
        cancel_at: Instant,
        give_up_at: Option<Instant>,
        why: &str,
    ) -> Vec<Done<T>> {
        let mut done = Vec::new();
        let cancel_timer = tokio::time::sleep_until(cancel_at);
        let give_up_timer = tokio::time::sleep_until(give_up_at.unwrap_or(cancel_at));
        tokio::pin!(cancel_timer, give_up_timer);
        loop {
            tokio::select! {
                next = self.tasks.join_next() => match next {
                    Some(d) => done.push(d),
                    None => break,
                },
                _ = &mut cancel_timer, if !self.cancel.is_cancelled() => {
                    warn!(unfinished = self.tasks.len(), "{why}");
                    self.cancel.cancel();
                }
                _ = &mut give_up_timer, if give_up_at.is_some() => {
                    warn!(unfinished = self.tasks.len(), "still unfinished at the deadline: giving up on it");
                    self.tasks.abort_all();
                    while let Some(d) = self.tasks.join_next().await {
                        done.push(d);
                    }
                    break;
                }
            }
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn never_runs_more_than_its_slots() {
        let mut engine = Engine::new(3);
        let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        for i in 0..10u32 {
            let (now, peak) = (now.clone(), peak.clone());
            engine.queue(move |started| async move {
                assert!(started.is_some());
                let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(1)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                i
            });
        }
        let done = engine
            .finish(Instant::now() + Duration::from_secs(60), None, "late")
            .await;
        let mut values: Vec<u32> = done.into_iter().map(Result::unwrap).collect();
        values.sort();
        assert_eq!(values, (0..10).collect::<Vec<_>>());
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn cancels_at_the_deadline_and_gives_up_after() {
        let mut engine = Engine::new(1);
        let slot = engine.slot().await;
        // Winds down when cancelled.
        engine.start(slot, |cancel| async move {
            cancel.cancelled().await;
            "released"
        });
        // Queued behind it: never starts.
        engine.queue(|started| async move {
            match started {
                Some(_) => "ran",
                None => "unstarted",
            }
        });
        let t0 = Instant::now();
        let mut done: Vec<&str> = engine
            .finish(
                t0 + Duration::from_secs(5),
                Some(t0 + Duration::from_secs(8)),
                "late",
            )
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        done.sort();
        assert_eq!(done, ["released", "unstarted"]);
        assert_eq!(t0.elapsed(), Duration::from_secs(5));

        // Work that ignores cancellation is aborted at the give-up time.
        let slot = engine.slot().await;
        engine.start(slot, |_| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            "never"
        });
        let t1 = Instant::now();
        let done = engine
            .finish(
                t1 + Duration::from_secs(1),
                Some(t1 + Duration::from_secs(2)),
                "late",
            )
            .await;
        assert!(done[0].as_ref().unwrap_err().is_cancelled());
        assert_eq!(t1.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn slots_fill_a_batch_while_work_finishes() {
        let mut engine = Engine::new(4);
        let busy = engine.slots(3, Duration::ZERO).await;
        assert_eq!(busy.len(), 3);
        for slot in busy {
            engine.start(slot, |_| async {
                tokio::time::sleep(Duration::from_millis(10)).await;
            });
        }
        // One slot is free; the other three free up within the fill window.
        let got = engine.slots(4, Duration::from_millis(100)).await;
        assert_eq!(got.len(), 4);
    }
}
