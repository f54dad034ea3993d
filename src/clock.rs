//! Time behind a seam. Every rule that depends on time — the grace period
//! of garbage collection, the freshness and deadline of uploads and copies,
//! the age of leftover temporary files — reads it from a [`Clock`], so
//! tests drive those rules with a [`ManualClock`] instead of sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;

    /// Milliseconds elapsed since `start_ms` (zero if the clock went back).
    fn since(&self, start_ms: i64) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(start_ms).max(0) as u64)
    }

    /// How old something last modified at `modified` is now (zero if it
    /// lies in the future).
    fn age_of(&self, modified: SystemTime) -> Duration {
        let m = modified
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        self.since(m)
    }
}

/// The system's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to: for tests of time-based rules.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now_ms: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock reading the current system time, frozen there.
    pub fn new() -> Self {
        Self::at_ms(SystemClock.now_ms())
    }

    /// A clock frozen at `now_ms` milliseconds since the epoch.
    pub fn at_ms(now_ms: i64) -> Self {
        ManualClock {
            now_ms: Arc::new(AtomicI64::new(now_ms)),
        }
    }

    /// Move the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now_ms
            .fetch_add(d.as_millis() as i64, Ordering::SeqCst);
    }

    /// Set the clock to `now_ms`.
    pub fn set_ms(&self, now_ms: i64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// The clock handle stores keep: shared, swappable in tests.
pub type SharedClock = Arc<dyn Clock>;

/// The default clock: the system's.
pub fn system_clock() -> SharedClock {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::at_ms(1_000);
        assert_eq!(c.now_ms(), 1_000);
        c.advance(Duration::from_secs(2));
        assert_eq!(c.now_ms(), 3_000);
        assert_eq!(c.since(500), Duration::from_millis(2_500));
        assert_eq!(c.since(10_000), Duration::ZERO);
        let modified = UNIX_EPOCH + Duration::from_millis(1_000);
        assert_eq!(c.age_of(modified), Duration::from_secs(2));
    }
}
