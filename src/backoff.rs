//! Retry schedule of deliveries: exponential, capped, with full jitter.
//!
//! The capped exponential sequence comes from `backon`; full jitter (a delay
//! drawn uniformly from zero to the capped value, as in AWS's "Exponential
//! Backoff and Jitter") spreads a recovering billing core's load. Attempts
//! are persisted by the store, so the schedule is a pure function of the
//! attempt number and works across restarts and replicas.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use rand::Rng;

/// When to give up and how long to wait between attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Cap of the first retry's delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// Attempts before the event is dead-lettered.
    pub max_attempts: u32,
    /// Time since the first attempt after which the event is dead-lettered.
    pub give_up_after: Duration,
}

impl Schedule {
    /// The capped delay before retry number `attempt` (1-based), without jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let n = attempt.max(1) as usize;
        ExponentialBuilder::default()
            .with_min_delay(self.initial)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .without_max_times()
            .build()
            .nth(n - 1)
            .unwrap_or(self.max)
    }

    /// The delay before retry number `attempt`, with full jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
    }

    /// Should an event be dead-lettered after `attempts` failures, the first `since` ago?
    pub fn exhausted(&self, attempts: u32, since: Duration) -> bool {
        attempts >= self.max_attempts || since >= self.give_up_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Roughly 5 s → 1 h between attempts; giving up after 24 h or 40 attempts (the shape of the
    /// defaults, which live in `config`'s table: `KOOGATE_RETRY_*`).
    const SHIPPED: Schedule = Schedule {
        initial: Duration::from_secs(5),
        max: Duration::from_secs(3600),
        max_attempts: 40,
        give_up_after: Duration::from_secs(24 * 3600),
    };

    #[test]
    fn ceilings_double_and_cap() {
        let s = SHIPPED;
        let secs: Vec<u64> = (1..=12).map(|a| s.ceiling(a).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]);
        assert_eq!(s.ceiling(0), s.ceiling(1));
        assert_eq!(s.ceiling(1000), Duration::from_secs(3600));
    }

    #[test]
    fn jitter_stays_under_the_ceiling_and_varies() {
        let s = Schedule { initial: Duration::from_millis(100), ..SHIPPED };
        let delays: Vec<Duration> = (0..200).map(|_| s.delay(3)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 50, "full jitter spreads delays");
    }

    #[test]
    fn gives_up_on_attempts_or_age() {
        let s = Schedule { max_attempts: 3, give_up_after: Duration::from_secs(60), ..SHIPPED };
        assert!(!s.exhausted(2, Duration::from_secs(59)));
        assert!(s.exhausted(3, Duration::ZERO));
        assert!(s.exhausted(1, Duration::from_secs(60)));
    }
}
