//! The wall clock, read in one place and under one name: [`now_unix`].
//!
//! Decisions never call it: they take `now` as an argument, so that tests pass the time they
//! mean. Only the daemons' edges (a request arriving, a credential issued, a stream opened)
//! read it and hand it down.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now (0 for a clock set before 1970).
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn now_is_after_this_code_was_written() {
        // 2025-01-01T00:00:00Z
        assert!(now_unix() > 1_735_689_600);
    }
}
