//! The broker-independent parts of a broker-restart run: a private broker is killed with
//! SIGKILL and started again, twice, while [`MESSAGES`] messages are published (at most
//! [`LEAD`] ahead of the consumer) and consumed behind the consumer barrier in
//! transactional mode, each writing a row into a ledger table without a unique
//! constraint. At the end every message must have exactly one row: a duplicate would show
//! as a second one, a lost message as a missing one.
//!
//! A broker's restart test keeps what is its own: starting the private broker
//! ([`Restartable`]), connecting, publishing and fetching, reconnecting after a failure,
//! and knowing when the consumer has drained.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use idem_core::{Failure, Key};
use idem_sqlite::{SqliteOperation, SqliteStore};

use super::{effects, wait_until, Progress, TempStore};
use crate::{ConsumeError, ConsumerBarrier, Delivery, Handled};

/// Messages published.
pub const MESSAGES: usize = 200;
/// How many messages the publisher may be ahead of the consumer.
pub const LEAD: usize = MESSAGES / 4;

/// A private broker that a run kills and starts again.
pub trait Restartable {
    /// Kills the broker with SIGKILL (no shutdown, no flush) and starts it again on the
    /// same ports and storage, waiting until it accepts connections.
    fn kill_and_restart(&mut self) -> impl Future<Output = ()>;

    /// The broker's log, across restarts (for a failure message).
    fn log(&self) -> String;
}

/// The key of message `i`: `producer/order-{i:03}`.
pub fn key(i: usize) -> Key {
    Key::new("producer", format!("order-{i:03}")).expect("a valid key")
}

/// The payload of message `i`.
pub fn payload(i: usize) -> Vec<u8> {
    format!("+{i}").into_bytes()
}

/// What the publisher and the consumer went through.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages the broker acknowledged.
    pub published: AtomicUsize,
    /// Publishes that failed and were tried again.
    pub publish_retries: AtomicUsize,
    /// Publishes the broker answered as duplicates (a retry of a publish whose
    /// acknowledgement was lost).
    pub dropped_duplicates: AtomicUsize,
    /// Connection attempts that failed (the broker was down or booting).
    pub reconnects: AtomicUsize,
    /// Setup steps (declaring, creating, reading the broker's state) tried again.
    pub setup_retries: AtomicUsize,
    /// Messages the consumer received.
    pub deliveries: AtomicUsize,
    /// Handled for the first time and acked (one whose ack failed is a settle error).
    pub applied: AtomicUsize,
    /// Redeliveries that replayed a recorded outcome.
    pub replayed: AtomicUsize,
    /// Deliveries naked (a retryable failure, a key another consumer holds).
    pub naked: AtomicUsize,
    /// Deliveries the broker refused to settle.
    pub settle_errors: AtomicUsize,
    /// Deliveries the barrier failed on (a store error, a lost lease).
    pub barrier_errors: AtomicUsize,
    /// Fetches (pulls, gets) that failed.
    pub fetch_errors: AtomicUsize,
    /// Outcomes that must not happen (a failure, a rejection), described.
    unexpected: Mutex<Vec<String>>,
}

impl Stats {
    /// Counts one more in `counter`.
    pub fn count(counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::SeqCst);
    }

    /// The count in `counter`.
    pub fn get(counter: &AtomicUsize) -> usize {
        counter.load(Ordering::SeqCst)
    }
}

impl Progress for Stats {
    fn summary(&self) -> String {
        format!(
            "{} published ({} publish retries, {} dropped by the broker as duplicates); \
             {} failed connection attempts, {} setup retries; {} deliveries: {} applied, \
             {} replayed, {} naked, {} settle errors, {} barrier errors; {} fetch errors",
            Self::get(&self.published),
            Self::get(&self.publish_retries),
            Self::get(&self.dropped_duplicates),
            Self::get(&self.reconnects),
            Self::get(&self.setup_retries),
            Self::get(&self.deliveries),
            Self::get(&self.applied),
            Self::get(&self.replayed),
            Self::get(&self.naked),
            Self::get(&self.settle_errors),
            Self::get(&self.barrier_errors),
            Self::get(&self.fetch_errors),
        )
    }

    fn assert_expected(&self) {
        let unexpected = self.unexpected.lock().unwrap();
        assert!(unexpected.is_empty(), "unexpected outcomes: {unexpected:?}");
    }
}

/// Waits until message `i` may be published: at most [`LEAD`] messages ahead of the
/// consumer, so that the publisher is still running when the broker is killed.
///
/// # Panics
///
/// On an unexpected outcome, or when the consumer does not catch up within the liveness
/// bound.
pub async fn wait_for_the_consumer(stats: &Stats, i: usize) {
    wait_until("the consumer catches up", stats, || {
        Stats::get(&stats.applied) + LEAD > i
    })
    .await;
}

/// Applies one message in transactional mode (the ledger row, the key and the outcome
/// commit together) and counts what happened in `stats`. `false` when the broker refused to
/// settle the message: the outcome is recorded, the message comes back and is replayed, and
/// a consumer whose connection does not recover by itself opens a new one.
pub async fn handle<M: Delivery>(
    barrier: &ConsumerBarrier<SqliteStore, M>,
    message: &M,
    stats: &Stats,
) -> bool {
    let handled = barrier
        .handle_transaction(message, |incoming| {
            let id = incoming.key.id().to_owned();
            let op: SqliteOperation<(), String, String> = Box::new(move |tx| {
                tx.execute("INSERT INTO effects (id) VALUES (?1)", [&id])
                    .map_err(|e| Failure::Retryable(e.to_string()))?;
                Ok(())
            });
            op
        })
        .await;
    match handled {
        Ok(Handled::Completed {
            replayed: false, ..
        }) => Stats::count(&stats.applied),
        Ok(Handled::Completed { replayed: true, .. }) => Stats::count(&stats.replayed),
        // Naked: the broker delivers it again.
        Ok(Handled::Retry { .. } | Handled::Busy { .. }) => Stats::count(&stats.naked),
        // The outcome is recorded; the redelivery replays it.
        Err(ConsumeError::Settle { .. }) => {
            Stats::count(&stats.settle_errors);
            return false;
        }
        // Nothing new is recorded; the message is delivered again.
        Err(ConsumeError::Barrier(_)) => Stats::count(&stats.barrier_errors),
        Ok(other) => stats.unexpected.lock().unwrap().push(format!("{other:?}")),
    }
    true
}

/// The ids of the messages without an effect in `effects`.
pub fn lost(effects: &BTreeMap<String, u32>) -> Vec<String> {
    (0..MESSAGES)
        .map(|i| key(i).id().to_owned())
        .filter(|id| !effects.contains_key(id))
        .collect()
}

/// One restart run's counters, its ledger and when the broker was killed.
pub struct Run {
    stats: Arc<Stats>,
    ledger: TempStore,
    started: Instant,
    /// (published, applied) when the broker was killed.
    at_kill: Vec<(usize, usize)>,
}

impl Run {
    /// A run with fresh counters and a ledger: a store with a table `effects (id)` without
    /// a unique constraint.
    ///
    /// # Panics
    ///
    /// When the ledger cannot be created.
    pub async fn new() -> Run {
        let ledger = TempStore::new().await;
        // No unique constraint: a second effect of a message would be a second row.
        ledger
            .store()
            .with_connection(|c| c.execute_batch("CREATE TABLE effects (id TEXT NOT NULL)"))
            .await
            .expect("the effects table");
        Run {
            stats: Arc::default(),
            ledger,
            started: Instant::now(),
            at_kill: Vec::new(),
        }
    }

    /// The counters, to share with the publisher and the consumer.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The consumer barrier on the ledger's store.
    pub fn consumer_barrier<M: Delivery>(&self) -> ConsumerBarrier<SqliteStore, M> {
        self.ledger.consumer_barrier()
    }

    /// The effects in the ledger so far, counted per id.
    pub async fn effects(&self) -> BTreeMap<String, u32> {
        effects(self.ledger.store()).await
    }

    /// Kills the broker twice while the publisher and the consumer are running (a quarter
    /// and five eighths of the messages applied): the publisher is at most [`LEAD`]
    /// messages ahead of the consumer, so neither has finished.
    ///
    /// # Panics
    ///
    /// On an unexpected outcome, or when the run does not get that far within the liveness
    /// bound.
    pub async fn kill_twice(&mut self, broker: &mut impl Restartable) {
        for (restart, applied) in [MESSAGES / 4, MESSAGES * 5 / 8].into_iter().enumerate() {
            wait_until("the run under way", &self.stats, || {
                Stats::get(&self.stats.applied) >= applied
            })
            .await;
            self.at_kill.push((
                Stats::get(&self.stats.published),
                Stats::get(&self.stats.applied),
            ));
            broker.kill_and_restart().await;
            eprintln!("restart {}: {}", restart + 1, self.stats.summary());
        }
    }

    /// Asserts, once the consumer has stopped, that no unexpected outcome happened and that
    /// the ledger holds exactly one effect per published message, none lost; reports the
    /// run with the broker's `details`.
    ///
    /// # Panics
    ///
    /// When a check fails.
    pub async fn assert_one_effect_per_message(&self, details: &str) {
        self.stats.assert_expected();
        let effects = self.effects().await;
        let want: Vec<String> = (0..MESSAGES).map(|i| key(i).id().to_owned()).collect();
        let lost = lost(&effects);
        let duplicated: Vec<(&String, &u32)> = effects.iter().filter(|(_, n)| **n != 1).collect();
        eprintln!(
            "restart: {MESSAGES} messages, 2 SIGKILL restarts at (published, applied) {:?}; \
             {} effects for {} ids, {} duplicated, {} lost; {}; {details}; {:?}",
            self.at_kill,
            effects.values().sum::<u32>(),
            effects.len(),
            duplicated.len(),
            lost.len(),
            self.stats.summary(),
            self.started.elapsed(),
        );
        assert!(lost.is_empty(), "messages without an effect: {lost:?}");
        assert!(
            duplicated.is_empty(),
            "messages with more than one effect: {duplicated:?}"
        );
        assert_eq!(
            effects.keys().collect::<Vec<_>>(),
            want.iter().collect::<Vec<_>>(),
            "the ledger holds exactly the published messages"
        );
    }
}
