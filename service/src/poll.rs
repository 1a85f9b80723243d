//! Polling until a deadline: try, and while the answer is "not yet", pause a growing delay
//! (never past the deadline) and try again; at the deadline, give up with the last "not yet".
//!
//! Owns only the pacing ([`Pace`]: a [`Backoff`] bounded by a deadline) and the loop around
//! an attempt ([`until`]). What an attempt asks, what counts as done or as a failure that
//! should not wait, and the words of the timeout belong to the caller (reaching an instance
//! over SSH, SSM command results, OpsWorks registration). Retrying a failed call is
//! [`crate::retry`], not this.

use std::future::Future;
use std::ops::ControlFlow;
use std::time::Duration;

use tokio::time::Instant;

use crate::retry::Backoff;

/// The pauses between attempts, bounded by a deadline.
pub struct Pace {
    deadline: Instant,
    attempt: u32,
    backoff: Backoff,
}

impl Pace {
    /// Pauses of `first`, twice that, and so on, up to `max`.
    pub fn doubling(deadline: Instant, first: Duration, max: Duration) -> Pace {
        Pace::new(deadline, Backoff::doubling(first, max))
    }

    /// Pauses as `backoff` says after the n-th attempt (0, 1, ...).
    pub fn new(deadline: Instant, backoff: Backoff) -> Pace {
        Pace {
            deadline,
            attempt: 0,
            backoff,
        }
    }

    /// Whether the deadline has come.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Sleeps the next pause, cut short at the deadline.
    pub async fn pause(&mut self) {
        let delay = self.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        tokio::time::sleep(delay.min(self.deadline.saturating_duration_since(Instant::now())))
            .await;
    }
}

/// Calls `attempt` until it breaks with an answer (`Ok`), pausing by `pace` while it
/// continues with a reason to wait; when the deadline has passed after an attempt, that
/// attempt's reason comes back as `Err`. The first attempt is made at once.
pub async fn until<T, W, F, Fut>(mut pace: Pace, mut attempt: F) -> Result<T, W>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ControlFlow<T, W>>,
{
    loop {
        match attempt().await {
            ControlFlow::Break(answer) => return Ok(answer),
            ControlFlow::Continue(why) if pace.expired() => return Err(why),
            ControlFlow::Continue(_) => pace.pause().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// When each attempt was made, in whole seconds after the start (the paused clock
    /// rounds each sleep up to the next millisecond).
    fn seconds(start: Instant, at: &Mutex<Vec<Instant>>) -> Vec<u64> {
        at.lock()
            .unwrap()
            .iter()
            .map(|t| (*t - start).as_secs())
            .collect()
    }

    #[tokio::test]
    async fn pauses_double_up_to_the_cap_and_the_last_attempt_is_at_the_deadline() {
        tokio::time::pause();
        let start = Instant::now();
        let at = Mutex::new(Vec::new());
        let pace = Pace::doubling(
            start + Duration::from_secs(30),
            Duration::from_secs(1),
            Duration::from_secs(10),
        );
        let r: Result<(), String> = until(pace, || async {
            at.lock().unwrap().push(Instant::now());
            ControlFlow::Continue(format!("try {}", at.lock().unwrap().len()))
        })
        .await;
        assert_eq!(seconds(start, &at), [0, 1, 3, 7, 15, 25, 30]);
        assert_eq!(
            r,
            Err("try 7".to_string()),
            "the last reason to wait comes back"
        );
    }

    #[tokio::test]
    async fn an_answer_ends_the_wait_at_once() {
        tokio::time::pause();
        let start = Instant::now();
        let at = Mutex::new(Vec::new());
        let pace = Pace::doubling(
            start + Duration::from_secs(60),
            Duration::from_secs(2),
            Duration::from_secs(15),
        );
        let r: Result<u32, ()> = until(pace, || async {
            let mut at = at.lock().unwrap();
            at.push(Instant::now());
            match at.len() {
                3 => ControlFlow::Break(7),
                _ => ControlFlow::Continue(()),
            }
        })
        .await;
        assert_eq!(r, Ok(7));
        assert_eq!(seconds(start, &at), [0, 2, 6]);
    }

    #[tokio::test]
    async fn a_past_deadline_still_gets_one_attempt_and_no_pause() {
        tokio::time::pause();
        let start = Instant::now();
        let pace = Pace::new(start, Backoff::every(Duration::from_secs(5)));
        let mut calls = 0;
        let r: Result<(), &str> = until(pace, || {
            calls += 1;
            async { ControlFlow::Continue("not yet") }
        })
        .await;
        assert_eq!((r, calls), (Err("not yet"), 1));
        assert_eq!(Instant::now(), start);
    }

    #[tokio::test]
    async fn a_pause_never_sleeps_past_the_deadline() {
        tokio::time::pause();
        let start = Instant::now();
        let mut pace = Pace::doubling(
            start + Duration::from_secs(3),
            Duration::from_secs(2),
            Duration::from_secs(4),
        );
        // (The paused clock rounds each sleep up to the next millisecond.)
        pace.pause().await;
        assert_eq!((Instant::now() - start).as_secs(), 2);
        assert!(!pace.expired());
        pace.pause().await;
        assert_eq!((Instant::now() - start).as_secs(), 3);
        assert!(pace.expired());
    }
}
