//! Counters of what the service did, shared by every part of it.
//!
//! Owns only the numbers; logging them (the worker's summary) and exposing them are callers'.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub skipped: AtomicU64,
    pub rejected: AtomicU64,
    pub unmatched: AtomicU64,
    pub duplicates: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub released: AtomicU64,
    pub heartbeats: AtomicU64,
    pub receive_errors: AtomicU64,
}

impl Stats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
