//! Clocks. Lease decisions use only the local monotonic clock ([`Instant`]);
//! the wall clock is read only for timestamps written into lease items for
//! people to read. `CLOCK_OFFSET` shifts that wall clock, so tests can show that
//! a replica whose clock is minutes off neither steals nor keeps a lease.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The wall clock as shard-sd reads it: the system clock plus a fixed offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WallClock {
    offset_ms: i64,
}

impl WallClock {
    pub fn with_offset_ms(offset_ms: i64) -> Self {
        WallClock { offset_ms }
    }

    /// Milliseconds since the Unix epoch, offset included.
    pub fn now_ms(&self) -> i64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis() as i64;
        real.saturating_add(self.offset_ms)
    }
}

/// Parses a signed offset such as `+5m`, `-90s` or `0`.
pub fn parse_offset(raw: &str) -> Result<i64, String> {
    let raw = raw.trim();
    let (sign, rest) = match raw.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, raw.strip_prefix('+').unwrap_or(raw)),
    };
    if rest == "0" {
        return Ok(0);
    }
    humantime::parse_duration(rest)
        .map(|d| sign * d.as_millis() as i64)
        .map_err(|e| format!("{e}: expected a signed duration such as +5m or -90s"))
}

/// Completes at `deadline`, or never without one: a timer branch for `select!`
/// that is off when nothing is due.
pub async fn sleep_until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets() {
        assert_eq!(parse_offset("+5m"), Ok(300_000));
        assert_eq!(parse_offset("-90s"), Ok(-90_000));
        assert_eq!(parse_offset("0"), Ok(0));
        assert!(parse_offset("later").is_err());
        let skewed = WallClock::with_offset_ms(600_000).now_ms();
        let real = WallClock::default().now_ms();
        assert!((skewed - real - 600_000).abs() < 1_000);
    }
}
