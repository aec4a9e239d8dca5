//! How long operations take, as this process has seen them: the base of an honest
//! `Retry-After`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// An exponentially weighted moving average of operation durations (weight 1/4 for each new
/// sample), shared by clones. Kept in microseconds; 0 means "no sample yet".
#[derive(Clone, Debug, Default)]
pub(crate) struct Estimate(Arc<AtomicU64>);

/// The weight of the previous average, out of 4.
const KEEP: u64 = 3;

impl Estimate {
    /// Adds one observed duration.
    pub(crate) fn observe(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        // The closure always returns `Some`, so `fetch_update` cannot fail.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample
                } else {
                    ((u128::from(old) * u128::from(KEEP) + u128::from(sample)) / 4)
                        .clamp(1, u128::from(u64::MAX)) as u64
                })
            });
    }

    /// The current average, if any operation has finished yet.
    pub(crate) fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sample_then_weighted_average_shared_by_clones() {
        let e = Estimate::default();
        assert_eq!(e.get(), None);
        let clone = e.clone();
        clone.observe(Duration::from_millis(100));
        assert_eq!(e.get(), Some(Duration::from_millis(100)));
        e.observe(Duration::from_millis(500));
        assert_eq!(clone.get(), Some(Duration::from_millis(200)));
        e.observe(Duration::ZERO);
        assert_eq!(e.get(), Some(Duration::from_micros(150_000)));
        e.observe(Duration::MAX);
        assert!(e.get().is_some());
    }
}
