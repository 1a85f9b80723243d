//! Wall-clock time as the history, the metrics and the result events write it.
//!
//! Owns only conversions of `SystemTime`; timers and deadlines use tokio's `Instant`, which
//! tests can pause.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `ms` since the epoch as RFC 3339 with milliseconds (UTC).
pub fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_milliseconds() {
        assert_eq!(rfc3339(1_500), "1970-01-01T00:00:01.500Z");
        assert!(now_ms() > 1_700_000_000_000);
    }
}
