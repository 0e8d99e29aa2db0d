//! The wall clock, read in one place and under one name: [`now_unix`]; and the clock that
//! counts from boot, [`since_boot_ms`], for how long something lasts.
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

/// Milliseconds since boot, suspended time included, and never stepped (the wall clock is:
/// time synchronisation may set it back or forth); the monotonic clock's where there is no
/// such clock. For how long something lasts, counted from when it began.
pub fn since_boot_ms() -> i64 {
    use nix::time::{ClockId, clock_gettime};
    let ms = |t: nix::sys::time::TimeSpec| {
        t.tv_sec()
            .saturating_mul(1000)
            .saturating_add(t.tv_nsec() / 1_000_000)
    };
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(t) => ms(t),
        Err(_) => clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_clock_moves_on_with_time() {
        let began = since_boot_ms();
        assert!(began > 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(since_boot_ms() - began >= 20);
    }

    #[test]
    fn now_is_after_this_code_was_written() {
        // 2025-01-01T00:00:00Z
        assert!(now_unix() > 1_735_689_600);
    }
}
