//! Retrying where the SDK gave up: exponential backoff with full jitter, up to a deadline.
//!
//! The SDK already retries each call (standard mode, `aws.max_attempts`). When a retryable
//! error still comes out (a long throttling episode), the calls that matter (completing a
//! hook, tagging) keep trying here for `aws.retry_for` before they count as failed.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::AwsError;

const FIRST_DELAY: Duration = Duration::from_millis(500);
const MAX_DELAY: Duration = Duration::from_secs(20);

/// Full-jitter backoff: a random delay in [0, min(cap, base * 2^attempt)].
pub fn backoff(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let exp = base.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
    let ceiling = exp.min(cap);
    ceiling.mul_f64(fastrand::f64())
}

/// Calls `f` until it succeeds, fails permanently, or `retry_for` has passed.
pub async fn with_backoff<T, F, Fut>(retry_for: Duration, mut f: F) -> Result<T, AwsError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AwsError>>,
{
    let deadline = Instant::now() + retry_for;
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if e.retryable() => {
                // At least a short pause, so a tight deadline still spaces out the calls.
                let delay = backoff(attempt, FIRST_DELAY, MAX_DELAY).max(Duration::from_millis(50));
                if Instant::now() + delay > deadline {
                    return Err(e);
                }
                tracing::warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64, "retrying after AWS error");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
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
    fn backoff_is_bounded() {
        for attempt in 0..40 {
            let d = backoff(attempt, Duration::from_millis(500), Duration::from_secs(20));
            assert!(d <= Duration::from_secs(20));
        }
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
}
