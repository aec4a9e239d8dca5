//! Retention clean-up on a schedule: a task that purges expired records in small batches.
//!
//! Every instance of a fleet can run it at once. Each round belongs to a time window of one
//! interval, and the instance that wants to purge first claims the window's key through the
//! barrier itself (scope [`SCOPE`]), so the store's own atomic claim decides which instance
//! purges in that window; the others find the window done (or in progress) and skip it. An
//! instance that dies mid-round leaves the window to its lease: the next window purges.
//! The window records are kept for two intervals and purged like any other record.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use idem_core::maintenance::Maintenance;
//! use idem_core::{Barrier, MemoryStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), idem_core::Error> {
//! let barrier = Barrier::new(Arc::new(MemoryStore::new()));
//! let maintenance = Maintenance::new().with_interval(Duration::from_secs(60));
//! // One round now (what the spawned task does every interval, with jitter):
//! let round = maintenance.run_once(&barrier).await?;
//! assert_eq!(round.purged, 0);
//! let task = maintenance.spawn(barrier); // runs until aborted
//! task.abort();
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::barrier::Barrier;
use crate::error::{Error, RunError};
use crate::key::Key;
use crate::outcome::{Failure, Outcome};
use crate::store::Store;

/// The key scope of the maintenance windows.
pub const SCOPE: &str = "idem.maintenance";

/// What one round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Records this instance purged (0 when another instance had the window).
    pub purged: u64,
    /// Batches this instance ran.
    pub batches: u32,
    /// Whether this instance did the window's work.
    pub ran: bool,
}

/// The schedule and size of the clean-up; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct Maintenance {
    interval: Duration,
    jitter: f64,
    batch: usize,
    max_batches: u32,
    stats: bool,
}

impl Default for Maintenance {
    fn default() -> Self {
        Self::new()
    }
}

impl Maintenance {
    /// Every 5 minutes with up to 20% jitter, batches of 500 records, at most 100 batches a
    /// round, publishing the `idem_records` gauges after each round that purged.
    pub fn new() -> Self {
        Maintenance {
            interval: Duration::from_secs(300),
            jitter: 0.2,
            batch: 500,
            max_batches: 100,
            stats: true,
        }
    }

    /// The time between rounds (at least one second).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_secs(1));
        self
    }

    /// The share of the interval (0 to 1) added at random to each pause, so a fleet
    /// started together does not purge in step.
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Records deleted per store call (at least 1): small batches keep locks short.
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Batches per round at most (at least 1); the rest waits for the next round.
    pub fn with_max_batches(mut self, max_batches: u32) -> Self {
        self.max_batches = max_batches.max(1);
        self
    }

    /// Whether a round that purged also publishes the record gauges
    /// ([`Barrier::observe_estimated_stats`]: the database's own estimate where the store
    /// has one, such as PostgreSQL's planner statistics, else a count).
    pub fn with_stats(mut self, stats: bool) -> Self {
        self.stats = stats;
        self
    }

    /// One round: claims the current window and, if this instance got it, purges expired
    /// records in batches until a batch comes back short or the round's batch limit is
    /// reached. Errors are the store's; a window another instance holds is not an error.
    pub async fn run_once<S: Store + ?Sized + 'static>(
        &self,
        barrier: &Barrier<S>,
    ) -> Result<Round, Error> {
        let now = barrier.clock().now();
        let millis = u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX);
        let window = u64::try_from(now.as_millis()).unwrap_or(0) / millis.max(1);
        let key = Key::new(SCOPE, format!("purge-{millis}ms-{window}"))?;
        let windows = barrier.clone().with_retention(self.interval * 2);
        let answer = windows
            .execute(&key, None, |_lease| async {
                let mut round = Round {
                    ran: true,
                    ..Round::default()
                };
                while round.batches < self.max_batches {
                    let now = barrier.clock().now();
                    let purged = barrier
                        .store()
                        .purge(now, self.batch)
                        .await
                        .map_err(Failure::Retryable)?;
                    round.purged += purged;
                    round.batches += 1;
                    if purged < self.batch as u64 {
                        break;
                    }
                }
                Ok::<_, Failure<(), Error>>((round.purged, round.batches))
            })
            .await;
        let round = match answer {
            Ok(r) if !r.replayed => match r.outcome {
                Outcome::Completed((purged, batches)) => Round {
                    purged,
                    batches,
                    ran: true,
                },
                Outcome::Failed(()) => Round::default(),
            },
            // Another instance did this window, or is doing it.
            Ok(_) | Err(RunError::Barrier(Error::InProgress { .. })) => Round::default(),
            Err(RunError::Barrier(e)) | Err(RunError::Operation(e)) => return Err(e),
        };
        if round.purged > 0 && self.stats {
            barrier.observe_estimated_stats().await?;
        }
        Ok(round)
    }

    /// Spawns the task on the current Tokio runtime: a round every interval (plus jitter),
    /// errors logged with `tracing` and retried next round. It runs until the handle is
    /// aborted or the runtime shuts down; aborting mid-round is safe (a purge deletes only
    /// expired records, and the window's claim runs out on its own).
    ///
    /// Panics outside a Tokio runtime, like [`tokio::spawn`].
    pub fn spawn<S: Store + ?Sized + 'static>(
        self,
        barrier: Barrier<S>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(self.pause()).await;
                match self.run_once(&barrier).await {
                    Ok(round) if round.ran => {
                        tracing::debug!(
                            purged = round.purged,
                            batches = round.batches,
                            "maintenance round"
                        )
                    }
                    Ok(_) => {}
                    Err(error) => {
                        tracing::warn!(%error, "maintenance round failed; retrying next round")
                    }
                }
            }
        })
    }

    /// The interval plus a random share of it, up to the jitter.
    fn pause(&self) -> Duration {
        self.interval.mul_f64(1.0 + self.jitter * unit_random())
    }
}

/// A number in [0, 1), different for each call and each process (jitter needs no more).
fn unit_random() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, MemoryStore, Timestamp};
    use std::sync::Arc;

    #[tokio::test]
    async fn one_instance_per_window_purges_expired_records_in_batches() {
        let clock = ManualClock::new(Timestamp::from_millis(1_000_000));
        let store = Arc::new(MemoryStore::new());
        let barrier = Barrier::new(Arc::clone(&store))
            .with_clock(Arc::new(clock.clone()))
            .with_retention(Duration::from_secs(60));
        for i in 0..25 {
            let key = Key::new("orders", format!("o-{i}")).unwrap();
            barrier
                .execute(&key, None, |_| async { Ok::<_, Failure<(), ()>>(i) })
                .await
                .unwrap();
        }
        clock.advance(Duration::from_secs(120));
        let maintenance = Maintenance::new()
            .with_interval(Duration::from_secs(600))
            .with_batch(10)
            .with_max_batches(2);
        let first = maintenance.run_once(&barrier).await.unwrap();
        assert_eq!(
            first,
            Round {
                purged: 20,
                batches: 2,
                ran: true
            }
        );
        // Another instance (a clone sharing the store) in the same window: skipped.
        let other = maintenance.run_once(&barrier.clone()).await.unwrap();
        assert_eq!(other, Round::default());
        // The next window purges the rest, short batch first.
        clock.advance(Duration::from_secs(600));
        let next = maintenance.run_once(&barrier).await.unwrap();
        assert!(next.ran && next.batches == 1, "{next:?}");
        assert_eq!(next.purged, 5, "{next:?}");
        let stats = store.stats().await.unwrap();
        assert_eq!(
            stats.completed, 2,
            "only the two window records remain: {stats:?}"
        );
    }

    #[test]
    fn settings_are_clamped_and_pauses_stay_within_the_jitter() {
        let m = Maintenance::new()
            .with_interval(Duration::ZERO)
            .with_jitter(f64::NAN)
            .with_batch(0)
            .with_max_batches(0);
        assert_eq!(
            (m.interval, m.jitter, m.batch, m.max_batches),
            (Duration::from_secs(1), 0.0, 1, 1)
        );
        let m = Maintenance::new()
            .with_interval(Duration::from_secs(10))
            .with_jitter(0.5);
        for _ in 0..100 {
            let p = m.pause();
            assert!(
                p >= Duration::from_secs(10) && p < Duration::from_secs(15),
                "{p:?}"
            );
        }
    }
}
