//! Client-side pacing of the Cloud Map calls. The applications' own service
//! discovery shares the account's `DiscoverInstances` quota (a bucket of 2,000
//! tokens refilled at 1,000 per second per account and Region), so shard-sd must
//! never take a large share of it: at most `AWS_MAX_RPS` calls a second in all,
//! and less while AWS throttles. The rate follows AIMD, as TCP does: halved on
//! every throttled answer seen (the SDK's own retries included), raised by one
//! call a second for every second without one, up to `AWS_MAX_RPS`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::RequestStats;

/// The rate never drops below this, so that discovery always makes progress.
pub const MIN_RPS: f64 = 1.0;
/// Additive increase, in calls per second gained per second without throttling.
const INCREASE_PER_S: f64 = 1.0;

#[derive(Debug)]
struct State {
    rate: f64,
    /// When the next call may start.
    next: Instant,
    /// When the rate was last raised.
    raised: Instant,
    /// Throttled Cloud Map attempts seen so far (from the request counters).
    throttles: u64,
}

#[derive(Debug)]
pub struct Pacer {
    /// `None`: no pacing at all (tests).
    max_rps: Option<f64>,
    stats: Arc<RequestStats>,
    state: Mutex<State>,
}

impl Pacer {
    /// At most `max_rps` calls a second (`None`: unpaced); `stats` counts
    /// throttled attempts.
    pub fn new(max_rps: Option<f64>, stats: Arc<RequestStats>) -> Self {
        let max_rps = max_rps.map(|r| r.max(MIN_RPS));
        let now = Instant::now();
        Pacer {
            max_rps,
            state: Mutex::new(State {
                rate: max_rps.unwrap_or(f64::INFINITY),
                next: now,
                raised: now,
                throttles: stats.cloud_map_throttled(),
            }),
            stats,
        }
    }

    /// The pace now, in calls per second.
    pub fn rate(&self) -> f64 {
        self.lock().rate
    }

    pub fn max_rps(&self) -> Option<f64> {
        self.max_rps
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for this call's turn.
    pub async fn wait(&self) {
        if self.max_rps.is_none() {
            return;
        }
        let at = self.reserve(Instant::now());
        tokio::time::sleep_until(at.into()).await;
    }

    /// Adjusts the rate and books the next slot at or after `now`.
    fn reserve(&self, now: Instant) -> Instant {
        let max_rps = self.max_rps.unwrap_or(f64::INFINITY);
        let throttles = self.stats.cloud_map_throttled();
        let mut s = self.lock();
        if throttles > s.throttles {
            let before = s.rate;
            s.rate = (s.rate / 2.0).max(MIN_RPS);
            s.raised = now;
            if before > s.rate {
                tracing::info!(
                    rate = s.rate,
                    "Cloud Map throttled shard-sd: slowing down to {:.1} calls per second",
                    s.rate
                );
            }
        } else if s.rate < max_rps {
            let gained = now.saturating_duration_since(s.raised).as_secs_f64() * INCREASE_PER_S;
            s.rate = (s.rate + gained).min(max_rps);
            s.raised = now;
        } else {
            s.raised = now;
        }
        s.throttles = throttles;
        let at = s.next.max(now);
        s.next = at + Duration::from_secs_f64(1.0 / s.rate);
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_spaced_at_the_rate_and_throttling_halves_it() {
        let stats = Arc::new(RequestStats::default());
        let pacer = Pacer::new(Some(10.0), stats.clone());
        let t0 = Instant::now();
        let slots: Vec<Duration> = (0..5).map(|_| pacer.reserve(t0) - t0).collect();
        assert_eq!(
            slots,
            (0..5)
                .map(|i| Duration::from_millis(100 * i))
                .collect::<Vec<_>>()
        );
        throttled(&stats, true);
        pacer.reserve(t0);
        assert_eq!(pacer.rate(), 5.0);
        throttled(&stats, true);
        pacer.reserve(t0);
        assert_eq!(pacer.rate(), 2.5);
        // One call a second more for each second without throttling, up to the cap.
        let later = t0 + Duration::from_secs(3);
        pacer.reserve(later);
        assert_eq!(pacer.rate(), 5.5);
        pacer.reserve(later + Duration::from_secs(60));
        assert_eq!(pacer.rate(), 10.0);
    }

    fn throttled(stats: &RequestStats, cloud_map: bool) {
        let op = if cloud_map {
            "DiscoverInstances"
        } else {
            "UpdateItem"
        };
        stats.record("any", op, super::super::Outcome::Throttled, cloud_map);
    }

    #[test]
    fn a_throttled_lease_table_does_not_slow_cloud_map_calls() {
        let stats = Arc::new(RequestStats::default());
        let pacer = Pacer::new(Some(10.0), stats.clone());
        throttled(&stats, false);
        pacer.reserve(Instant::now());
        assert_eq!(pacer.rate(), 10.0);
        assert_eq!(stats.throttled(), 1, "still counted on /metrics");
    }

    #[test]
    fn the_rate_never_drops_below_the_floor() {
        let stats = Arc::new(RequestStats::default());
        let pacer = Pacer::new(Some(2.0), stats.clone());
        for _ in 0..10 {
            throttled(&stats, true);
            pacer.reserve(Instant::now());
        }
        assert_eq!(pacer.rate(), MIN_RPS);
    }
}
