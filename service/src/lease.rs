//! Keeping work alive while it runs: lifecycle heartbeats and message visibility.
//!
//! One background task serves every event in flight. Each event holds a [`Lease`]; the task
//! heartbeats its lifecycle action every third of the hook's heartbeat timeout and extends
//! its message's visibility when half of it is used, grouping the extensions of all messages
//! due at the same moment into ChangeMessageVisibilityBatch calls of ten. Dropping the lease
//! stops both. Completing the hook is not this module's business.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::aws::{Action, ActionCall, ErrorClass, Hooks, Queue};
use crate::metrics::Stats;
use crate::retry::Backoff;

const TICK: Duration = Duration::from_millis(250);

/// The heartbeat interval for a hook: a third of its timeout, so two beats may fail before
/// Auto Scaling gives up on the action.
pub fn heartbeat_interval(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout / 3).clamp(Duration::from_millis(500), Duration::from_secs(900))
}

struct Entry {
    receipt: Option<String>,
    visible_until: Instant,
    extending: bool,
    /// Extensions failed in a row, and when the next may be tried.
    extend_failures: u32,
    next_extend: Instant,
    action: Option<Action>,
    every: Duration,
    next_beat: Instant,
    beating: bool,
    beats: Arc<AtomicU32>,
    /// When a heartbeat last succeeded, in ms since the epoch (0: never).
    beat_at: Arc<AtomicU64>,
    gone: CancellationToken,
}

struct Inner {
    entries: Mutex<HashMap<u64, Entry>>,
    next_id: AtomicU64,
    queue: Option<Arc<dyn Queue>>,
    hooks: Arc<dyn Hooks>,
    visibility: Duration,
    stats: Arc<Stats>,
}

#[derive(Clone)]
pub struct Leases {
    inner: Arc<Inner>,
}

/// When an action's first heartbeat goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Now: the action may be close to timing out (its message waited long).
    AtOnce,
    /// One interval from now, jittered.
    AfterInterval,
}

/// Held while one event is worked on.
pub struct Lease {
    id: u64,
    inner: Arc<Inner>,
    beats: Arc<AtomicU32>,
    beat_at: Arc<AtomicU64>,
    gone: CancellationToken,
}

impl Lease {
    /// Heartbeats that succeeded so far.
    pub fn heartbeats(&self) -> u32 {
        self.beats.load(Ordering::Relaxed)
    }

    /// When a heartbeat last succeeded (the action was alive then).
    pub fn last_heartbeat(&self) -> Option<std::time::SystemTime> {
        match self.beat_at.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(std::time::UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// A heartbeat of this lease's action succeeded outside the lease (the proof that
    /// confirmed it): counted, and the action known alive now.
    pub fn beaten(&self) {
        self.beats.fetch_add(1, Ordering::Relaxed);
        self.beat_at
            .store(crate::clock::now_ms().max(1) as u64, Ordering::Relaxed);
        Stats::inc(&self.inner.stats.heartbeats);
    }

    /// Starts heartbeating an action (once its hook's timeout is known) every `every`,
    /// the first beat as `first` says.
    pub fn beat(&self, action: Action, every: Duration, first: Beat) {
        if let Some(e) = self.inner.entries.lock().unwrap().get_mut(&self.id) {
            e.action = Some(action);
            e.every = every;
            e.next_beat = Instant::now()
                + match first {
                    Beat::AtOnce => Duration::ZERO,
                    Beat::AfterInterval => jitter(every),
                };
        }
    }

    /// Fires when a heartbeat finds the action no longer active (timed out, or completed
    /// elsewhere): the work for it is moot.
    pub fn gone(&self) -> &CancellationToken {
        &self.gone
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inner.entries.lock().unwrap().remove(&self.id);
    }
}

/// 90..110 % of `d`, so hundreds of actions started together do not beat in lockstep.
fn jitter(d: Duration) -> Duration {
    Backoff::every(d).jitter(0.9, 1.1).delay(0)
}

impl Leases {
    /// `queue` is None where there is no message to keep hidden (manual runs).
    pub fn spawn(
        queue: Option<Arc<dyn Queue>>,
        hooks: Arc<dyn Hooks>,
        visibility: Duration,
        stats: Arc<Stats>,
    ) -> Leases {
        let inner = Arc::new(Inner {
            entries: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            queue,
            hooks,
            visibility,
            stats,
        });
        tokio::spawn(tick_loop(Arc::downgrade(&inner)));
        Leases { inner }
    }

    /// Holds a message received at `received` (its visibility started then).
    pub fn hold(&self, receipt: Option<String>, received: Instant) -> Lease {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let beats = Arc::new(AtomicU32::new(0));
        let beat_at = Arc::new(AtomicU64::new(0));
        let gone = CancellationToken::new();
        self.inner.entries.lock().unwrap().insert(
            id,
            Entry {
                receipt,
                visible_until: received + self.inner.visibility,
                extending: false,
                extend_failures: 0,
                next_extend: received,
                action: None,
                every: Duration::MAX,
                next_beat: Instant::now() + Duration::from_secs(86_400 * 365),
                beating: false,
                beats: beats.clone(),
                beat_at: beat_at.clone(),
                gone: gone.clone(),
            },
        );
        Lease {
            id,
            inner: self.inner.clone(),
            beats,
            beat_at,
            gone,
        }
    }
}

async fn tick_loop(weak: Weak<Inner>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        tick(&inner);
    }
}

fn tick(inner: &Arc<Inner>) {
    let (extend, beat) = due(inner, Instant::now());
    if let Some(queue) = &inner.queue {
        for chunk in extend.chunks(10) {
            tokio::spawn(extend_visibility(
                inner.clone(),
                queue.clone(),
                chunk.to_vec(),
            ));
        }
    }
    for (id, action) in beat {
        tokio::spawn(heartbeat(inner.clone(), id, action));
    }
}

/// Messages whose visibility is half used, and actions due a heartbeat; each marked as
/// being worked on so the next tick does not send it again.
#[allow(clippy::type_complexity)]
fn due(inner: &Inner, now: Instant) -> (Vec<(u64, String)>, Vec<(u64, Action)>) {
    let mut extend = Vec::new();
    let mut beat = Vec::new();
    let mut entries = inner.entries.lock().unwrap();
    for (id, e) in entries.iter_mut() {
        if let Some(r) = &e.receipt {
            if !e.extending
                && e.next_extend <= now
                && e.visible_until.saturating_duration_since(now) <= inner.visibility / 2
            {
                e.extending = true;
                extend.push((*id, r.clone()));
            }
        }
        if let Some(a) = &e.action {
            if !e.beating && e.next_beat <= now {
                e.beating = true;
                beat.push((*id, a.clone()));
            }
        }
    }
    (extend, beat)
}

/// One ChangeMessageVisibilityBatch for up to ten held messages.
async fn extend_visibility(inner: Arc<Inner>, queue: Arc<dyn Queue>, chunk: Vec<(u64, String)>) {
    let entries: Vec<(String, Duration)> = chunk
        .iter()
        .map(|(_, r)| (r.clone(), inner.visibility))
        .collect();
    let at = Instant::now();
    let results: Vec<Result<(), (ErrorClass, String)>> =
        match queue.change_visibility_batch(&entries).await {
            Ok(r) => r
                .into_iter()
                .map(|r| r.map_err(|e| (e.class, e.to_string())))
                .collect(),
            Err(e) => vec![Err((e.class, e.to_string())); entries.len()],
        };
    let mut map = inner.entries.lock().unwrap();
    for ((id, _), r) in chunk.iter().zip(results) {
        if let Some(e) = map.get_mut(id) {
            e.extending = false;
            match r {
                Ok(()) => {
                    e.visible_until = at + inner.visibility;
                    e.extend_failures = 0;
                }
                Err((class, err)) if !class.is_transient() => {
                    // The receipt is no good any more (the message was deleted, or
                    // received again elsewhere): extending it again cannot help.
                    tracing::warn!(error = %err, %class, "cannot extend message visibility; no more tries for this receipt");
                    e.receipt = None;
                }
                Err((class, err)) => {
                    e.extend_failures += 1;
                    let delay = extend_backoff(e.extend_failures, inner.visibility);
                    e.next_extend = Instant::now() + delay;
                    tracing::warn!(error = %err, %class, failures = e.extend_failures, next_in = ?delay,
                        "could not extend message visibility; will retry");
                }
            }
        }
    }
}

/// The pause before extending again after `failures` failures in a row: from one tick,
/// doubling, at most a twentieth of the visibility timeout (extending starts with half of
/// it left, so ten tries fit before the message would show again).
fn extend_backoff(failures: u32, visibility: Duration) -> Duration {
    let cap = (visibility / 20).max(TICK);
    Backoff::doubling(TICK, cap)
        .full_jitter()
        .at_least(TICK)
        .delay(failures)
}

/// One heartbeat; schedules the next, or stops beating an action that is gone.
async fn heartbeat(inner: Arc<Inner>, id: u64, action: Action) {
    let r = inner.hooks.heartbeat(&action).await;
    let mut map = inner.entries.lock().unwrap();
    let Some(e) = map.get_mut(&id) else { return };
    e.beating = false;
    match r {
        Ok(ActionCall::Done) => {
            e.beats.fetch_add(1, Ordering::Relaxed);
            e.beat_at
                .store(crate::clock::now_ms().max(1) as u64, Ordering::Relaxed);
            Stats::inc(&inner.stats.heartbeats);
            e.next_beat = Instant::now() + jitter(e.every);
        }
        Ok(ActionCall::NotActive(msg)) => {
            tracing::warn!(instance_id = %action.instance_id, reason = %msg,
                "lifecycle action is no longer active (timed out or completed elsewhere); heartbeats stop");
            e.action = None;
            e.gone.cancel();
        }
        Err(err) if !err.retryable() => {
            tracing::warn!(instance_id = %action.instance_id, error = %err,
                "heartbeat refused for good; heartbeats stop (the action is completed as usual)");
            e.action = None;
        }
        Err(err) => {
            tracing::warn!(instance_id = %action.instance_id, error = %err, "heartbeat failed; will retry");
            e.next_beat = Instant::now() + (e.every / 4).max(Duration::from_millis(500));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_retries_back_off_within_the_visibility_timeout() {
        let visibility = Duration::from_secs(300);
        for failures in 1..50 {
            let d = extend_backoff(failures, visibility);
            assert!(d >= TICK && d <= Duration::from_secs(15), "{d:?}");
        }
        // Spaced out: on average far above the old fixed 250 ms tick.
        let mean: Duration = (0..200)
            .map(|_| extend_backoff(10, visibility))
            .sum::<Duration>()
            / 200;
        assert!(mean > Duration::from_secs(5), "{mean:?}");
    }
}
