//! Trying again: one backoff policy ([`Backoff`]) and one loop ([`Retry`]) for everything
//! that retries.
//!
//! The SDK already retries each call (standard mode, `aws.max_attempts`). What comes out of
//! it still failing for a transient reason (a long throttling episode, a claim store that
//! is briefly away) is tried again here: while the error is [`Transient`], until a deadline
//! or a cancellation, pausing as a [`Backoff`] says. The same [`Backoff`] paces the loops that
//! are not retries (polling in [`crate::poll`], visibility extensions and heartbeats in
//! [`crate::lease`], a released message's delay in [`crate::delivery`]), so there is one
//! formula for pauses in the program. What counts as transient is the error's own business.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::aws::AwsError;
use crate::claims::ClaimError;

/// Pauses that grow: attempt `n` (0, 1, ...) waits up to `first * 2^n`, at most `max`, with
/// a random share of that ceiling between `jitter.0` and `jitter.1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    jitter: (f64, f64),
    floor: Duration,
}

impl Backoff {
    /// `first`, twice that, and so on up to `max`, exactly (no jitter).
    pub const fn doubling(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            jitter: (1.0, 1.0),
            floor: Duration::ZERO,
        }
    }

    /// The same pause every time (a period; jitter it to spread a crowd out).
    pub const fn every(period: Duration) -> Backoff {
        Backoff::doubling(period, period)
    }

    /// Full jitter: anywhere from nothing to the ceiling (AWS's advice for many clients
    /// retrying one service).
    pub const fn full_jitter(self) -> Backoff {
        self.jitter(0.0, 1.0)
    }

    /// Half jitter: from half the ceiling to all of it (never much shorter than planned).
    pub const fn half_jitter(self) -> Backoff {
        self.jitter(0.5, 1.0)
    }

    /// A random share of the ceiling in `[low, high]`.
    pub const fn jitter(self, low: f64, high: f64) -> Backoff {
        Backoff {
            jitter: (low, high),
            ..self
        }
    }

    /// Never shorter than `floor`, whatever the jitter drew.
    pub const fn at_least(self, floor: Duration) -> Backoff {
        Backoff { floor, ..self }
    }

    /// The pause after attempt `attempt` (0 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.first.saturating_mul(factor).min(self.max);
        let (low, high) = self.jitter;
        let share = if low == high {
            low
        } else {
            low + fastrand::f64() * (high - low)
        };
        ceiling.mul_f64(share).max(self.floor)
    }
}

/// An error that may pass if the same call is made again.
pub trait Transient: Display {
    fn is_transient(&self) -> bool;
}

impl Transient for AwsError {
    fn is_transient(&self) -> bool {
        self.retryable()
    }
}

impl Transient for ClaimError {
    fn is_transient(&self) -> bool {
        self.transient
    }
}

/// How one retrying loop behaves: its pauses, when it gives up, what it says meanwhile.
#[derive(Clone, Copy)]
pub struct Retry<'a> {
    backoff: Backoff,
    deadline: Option<Instant>,
    cancel: Option<&'a CancellationToken>,
    /// The warning logged before each pause (the error, the attempt and the pause join it).
    says: &'static str,
}

impl<'a> Retry<'a> {
    /// Tries again as `backoff` says, forever unless told otherwise.
    pub fn new(backoff: Backoff, says: &'static str) -> Retry<'a> {
        Retry {
            backoff,
            deadline: None,
            cancel: None,
            says,
        }
    }

    /// Gives up (with the last error) when the next pause would end past `deadline`.
    pub fn until(self, deadline: Instant) -> Retry<'a> {
        Retry {
            deadline: Some(deadline),
            ..self
        }
    }

    /// Gives up within `d` from now.
    pub fn within(self, d: Duration) -> Retry<'a> {
        self.until(Instant::now() + d)
    }

    /// Gives up (with the last error) as soon as `cancel` fires, pauses included.
    pub fn unless(self, cancel: &'a CancellationToken) -> Retry<'a> {
        Retry {
            cancel: Some(cancel),
            ..self
        }
    }

    /// Calls `f` until it succeeds, fails for good, or the deadline or the cancellation
    /// comes; then the last error. (Which of those it was: ask the token, or the clock.)
    pub async fn run<T, E, F, Fut>(&self, mut f: F) -> Result<T, E>
    where
        E: Transient,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 0;
        loop {
            let e = match f().await {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => e,
            };
            let delay = self.backoff.delay(attempt);
            let late = self.deadline.is_some_and(|d| Instant::now() + delay > d);
            if late || self.cancel.is_some_and(|c| c.is_cancelled()) {
                return Err(e);
            }
            warn!(error = %e, attempt, next_in = ?delay, "{}", self.says);
            let pause = tokio::time::sleep(delay);
            match self.cancel {
                None => pause.await,
                Some(cancel) => tokio::select! {
                    _ = pause => {}
                    _ = cancel.cancelled() => return Err(e),
                },
            }
            attempt += 1;
        }
    }
}

/// One AWS call's own retries after the SDK's: full jitter from half a second up to 20 s
/// between attempts, at least 50 ms so that a tight deadline still spaces the calls out.
pub const AWS_CALL: Backoff =
    Backoff::doubling(Duration::from_millis(500), Duration::from_secs(20))
        .full_jitter()
        .at_least(Duration::from_millis(50));

/// Calls `f` until it succeeds, fails permanently, or `retry_for` has passed.
pub async fn with_backoff<T, F, Fut>(retry_for: Duration, f: F) -> Result<T, AwsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AwsError>>,
{
    Retry::new(AWS_CALL, "retrying after AWS error")
        .within(retry_for)
        .run(f)
        .await
}

/// The pauses of a message kept in flight while something it needs fails for a transient
/// reason (completing, verifying, claiming): the first between a quarter and a half of
/// `aws.retry_for` (at least 250 ms), doubling each round up to 5 minutes, half jittered.
pub fn in_flight_rounds(retry_for: Duration) -> Backoff {
    let first = (retry_for / 2).max(Duration::from_millis(500));
    Backoff::doubling(first, Duration::from_secs(300)).half_jitter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn throttled() -> AwsError {
        AwsError {
            operation: "Op",
            code: Some("Throttling".into()),
            message: "Rate exceeded".into(),
            class: crate::aws::ErrorClass::Throttled,
        }
    }

    #[test]
    fn pauses_grow_to_their_cap_within_their_jitter() {
        let exact = Backoff::doubling(Duration::from_secs(1), Duration::from_secs(10));
        let seen: Vec<u64> = (0..6).map(|n| exact.delay(n).as_secs()).collect();
        assert_eq!(seen, [1, 2, 4, 8, 10, 10]);
        assert_eq!(exact.delay(u32::MAX), Duration::from_secs(10));
        let half = exact.half_jitter();
        for n in 0..40 {
            let d = half.delay(n);
            let ceiling = exact.delay(n);
            assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} for {ceiling:?}");
        }
        for n in 0..40 {
            let d = AWS_CALL.delay(n);
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_secs(20));
        }
        let spread = Backoff::every(Duration::from_secs(10)).jitter(0.9, 1.1);
        for n in 0..40 {
            let d = spread.delay(n);
            assert!(
                d >= Duration::from_secs(9) && d <= Duration::from_secs(11),
                "{d:?}"
            );
        }
    }

    #[test]
    fn in_flight_rounds_start_at_half_the_retry_budget_and_stay_under_five_minutes() {
        let rounds = in_flight_rounds(Duration::from_secs(120));
        let first = rounds.delay(0);
        assert!(first >= Duration::from_secs(30) && first <= Duration::from_secs(60));
        for n in 0..100 {
            let d = rounds.delay(n);
            assert!(
                d >= Duration::from_secs(30) && d <= Duration::from_secs(300),
                "{d:?}"
            );
        }
        assert!(in_flight_rounds(Duration::ZERO).delay(0) >= Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_retryable_until_success() {
        let calls = AtomicU32::new(0);
        let r = with_backoff(Duration::from_secs(60), || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(throttled())
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(r, Ok(7));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = with_backoff(Duration::from_secs(60), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(AwsError::permanent("Op", "no"))
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline() {
        let start = Instant::now();
        let r: Result<(), _> =
            with_backoff(Duration::from_secs(30), || async { Err(throttled()) }).await;
        assert!(r.unwrap_err().retryable());
        assert!(start.elapsed() <= Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancellation_ends_the_pause_with_the_last_error() {
        let cancel = CancellationToken::new();
        let fire = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            fire.cancel();
        });
        let start = Instant::now();
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = Retry::new(Backoff::every(Duration::from_secs(60)), "again")
            .unless(&cancel)
            .run(|| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(throttled())
            })
            .await;
        assert!(r.unwrap_err().retryable());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed().as_secs(), 5);
    }
}
