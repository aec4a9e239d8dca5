//! The SQL stores' workloads, shared by SQLite, PostgreSQL and MySQL.
//!
//! - `insert`: the business insert, autocommit.
//! - `insert-own-txn`: the same insert in an explicit transaction (`BEGIN; INSERT; COMMIT`),
//!   as business code that already uses a transaction runs it: the transactional barrier's
//!   baseline.
//! - `handrolled`: the zero2prod / Stripe pattern in one transaction: insert the
//!   idempotency row (`ON CONFLICT DO NOTHING`), the business insert, save the response
//!   with an `UPDATE`, commit.
//! - `barrier-tx`: the business insert inside [`Barrier::transaction`].
//! - `barrier-tx-optimistic` (stores that claim at commit): the same with
//!   [`TxPolicy::Optimistic`], the operation first and the key claimed with its outcome.
//! - `barrier-lease`: lease mode's `begin` + `complete` on fresh keys, no business write.
//! - `pk-select`: a primary-key `SELECT` of a business row.
//! - `replay`: `begin` on a completed key (the barrier's answer to a retry).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use idem::{Barrier, Error, Key, Store, TransactionalStore, TxPolicy};
use tokio::sync::Mutex;

use super::measure::{lease_pairs, measure, replays};
use super::report::Comparison;
use super::{Call, Measured, Suite};

/// The business calls of a SQL benchmark, without the barrier.
pub trait Business: Send + Sync {
    /// The bare business insert of row `k`.
    fn insert(&self, k: String) -> Call;
    /// The same insert in an explicit transaction.
    fn insert_in_transaction(&self, k: String) -> Call;
    /// The hand-rolled pattern around the same insert, on idempotency key `k`.
    fn handrolled(&self, k: String) -> Call;
    /// A primary-key SELECT of row `k`.
    fn select(&self, k: String) -> Call;
}

/// A SQL store's benchmark: its business statements beside its transactional store.
pub trait SqlBench: Send + Sync + 'static {
    /// The store under test.
    type Store: TransactionalStore + Clone + Send + Sync + 'static;
    /// The backend's name in the output.
    const BACKEND: &'static str;
    /// The store, on the tables `setup` created.
    fn store(&self) -> &Self::Store;
    /// The business calls the barrier is compared with.
    fn business(&self) -> &dyn Business;
    /// The business insert of row `k` as the store's transactional operation.
    fn operation(k: String) -> <Self::Store as TransactionalStore>::Operation<i64, String, String>;
    /// Empties the store and business tables, then stores `records` completed records.
    fn prefill(&self, records: u64) -> Call;
    /// Drops the tables `setup` created.
    fn teardown(&self) -> Call;
}

const WORKLOADS: &[&str] = &[
    "insert",
    "insert-own-txn",
    "handrolled",
    "barrier-tx",
    OPTIMISTIC,
    "barrier-lease",
    "pk-select",
    "replay",
];

/// The workload only stores that claim at commit run
/// ([`TransactionalStore::CLAIMS_AT_COMMIT`]): elsewhere `Optimistic` runs as `Wait`, and it
/// would measure `barrier-tx` again.
const OPTIMISTIC: &str = "barrier-tx-optimistic";

const SCALE: &[&str] = &["insert-own-txn", "barrier-tx", "pk-select", "replay"];

const COMPARISONS: &[Comparison] = &[
    Comparison {
        with: "barrier-tx",
        without: "insert-own-txn",
        what: "the transactional barrier vs the same insert in its own transaction",
    },
    Comparison {
        with: "barrier-tx",
        without: "handrolled",
        what: "the transactional barrier vs the hand-rolled pattern",
    },
    Comparison {
        with: OPTIMISTIC,
        without: "insert-own-txn",
        what: "the optimistic transactional barrier vs the same insert in its own transaction",
    },
    Comparison {
        with: OPTIMISTIC,
        without: "handrolled",
        what: "the optimistic transactional barrier vs the hand-rolled pattern",
    },
    Comparison {
        with: "barrier-tx",
        without: "insert",
        what: "the transactional barrier vs the bare insert",
    },
    Comparison {
        with: "barrier-lease",
        without: "insert",
        what: "lease begin + complete vs the bare insert",
    },
    Comparison {
        with: "replay",
        without: "pk-select",
        what: "a replay vs a primary-key SELECT",
    },
];

/// The completed keys `replay` begins on; `pk-select` reads their business rows.
const REPLAY_KEYS: usize = 256;

/// [`Suite`] for any [`SqlBench`].
pub struct SqlSuite<B: SqlBench> {
    bench: Arc<B>,
    barrier: Barrier<B::Store>,
    /// Numbers each measurement, so every one writes keys of its own.
    round: AtomicU64,
    /// The replay keys, once stored (cleared by `prefill`, which empties the tables).
    replay_keys: Mutex<Option<Arc<Vec<Key>>>>,
}

impl<B: SqlBench> SqlSuite<B> {
    pub fn new(bench: B) -> Self {
        let barrier = Barrier::new(Arc::new(bench.store().clone()));
        SqlSuite {
            bench: Arc::new(bench),
            barrier,
            round: AtomicU64::new(0),
            replay_keys: Mutex::new(None),
        }
    }

    /// The completed replay keys, stored through the barrier on first use.
    async fn replay_keys(&self) -> Result<Arc<Vec<Key>>, Error> {
        let mut slot = self.replay_keys.lock().await;
        if let Some(keys) = slot.as_ref() {
            return Ok(Arc::clone(keys));
        }
        let keys: Vec<Key> = (0..REPLAY_KEYS)
            .map(|i| Key::new("bench-replay", format!("k{i}")))
            .collect::<Result<_, _>>()?;
        for k in &keys {
            self.barrier
                .transaction(
                    k,
                    None,
                    TxPolicy::Wait,
                    B::operation(format!("replay-{}", k.id())),
                )
                .await
                .map_err(|e| Error::Config(format!("storing replay key {k}: {e}")))?;
        }
        let keys = Arc::new(keys);
        *slot = Some(Arc::clone(&keys));
        Ok(keys)
    }

    /// The business insert of a fresh row in [`Barrier::transaction`] with `policy`.
    async fn transactions(
        &self,
        policy: TxPolicy,
        clients: usize,
        seconds: f64,
    ) -> Result<Measured, Error> {
        let (barrier, round) = (
            self.barrier.clone(),
            self.round.fetch_add(1, Ordering::Relaxed),
        );
        measure(clients, seconds, move |c, n| {
            let barrier = barrier.clone();
            async move {
                let id = format!("tx-{round}-{c}-{n}");
                let key = Key::new("bench", id.clone())?;
                barrier
                    .transaction(&key, None, policy, B::operation(id))
                    .await
                    .map_err(|e| Error::Config(format!("transaction ({policy:?}): {e}")))
                    .map(drop)
            }
        })
        .await
    }

    /// `call` on a fresh row `{name}-{round}-{client}-{n}` each time.
    async fn fresh(
        &self,
        name: &'static str,
        clients: usize,
        seconds: f64,
        call: fn(&dyn Business, String) -> Call,
    ) -> Result<Measured, Error> {
        let (b, round) = (
            Arc::clone(&self.bench),
            self.round.fetch_add(1, Ordering::Relaxed),
        );
        measure(clients, seconds, move |c, n| {
            call(b.business(), format!("{name}-{round}-{c}-{n}"))
        })
        .await
    }
}

#[async_trait]
impl<B: SqlBench> Suite for SqlSuite<B> {
    fn backend(&self) -> &'static str {
        B::BACKEND
    }

    fn workloads(&self) -> Vec<&'static str> {
        let optimistic = <B::Store as TransactionalStore>::CLAIMS_AT_COMMIT;
        WORKLOADS
            .iter()
            .copied()
            .filter(|w| optimistic || *w != OPTIMISTIC)
            .collect()
    }

    fn comparisons(&self) -> Vec<Comparison> {
        let optimistic = <B::Store as TransactionalStore>::CLAIMS_AT_COMMIT;
        COMPARISONS
            .iter()
            .copied()
            .filter(|c| optimistic || c.with != OPTIMISTIC)
            .collect()
    }

    fn scale_workloads(&self) -> &'static [&'static str] {
        SCALE
    }

    async fn measure(
        &self,
        workload: &'static str,
        clients: usize,
        seconds: f64,
    ) -> Result<Measured, Error> {
        let round = self.round.fetch_add(1, Ordering::Relaxed);
        match workload {
            "insert" => {
                self.fresh(workload, clients, seconds, |b, k| b.insert(k))
                    .await
            }
            "insert-own-txn" => {
                let call = |b: &dyn Business, k| b.insert_in_transaction(k);
                self.fresh(workload, clients, seconds, call).await
            }
            "handrolled" => {
                self.fresh(workload, clients, seconds, |b, k| b.handrolled(k))
                    .await
            }
            "barrier-tx" => self.transactions(TxPolicy::Wait, clients, seconds).await,
            OPTIMISTIC if <B::Store as TransactionalStore>::CLAIMS_AT_COMMIT => {
                self.transactions(TxPolicy::Optimistic, clients, seconds)
                    .await
            }
            "barrier-lease" => {
                lease_pairs(vec![self.barrier.clone()], clients, seconds, round).await
            }
            "pk-select" => {
                self.replay_keys().await?;
                let b = Arc::clone(&self.bench);
                measure(clients, seconds, move |c, n| {
                    b.business()
                        .select(format!("replay-k{}", (c * 31 + n as usize) % REPLAY_KEYS))
                })
                .await
            }
            "replay" => {
                let keys = self.replay_keys().await?;
                replays(vec![self.barrier.clone()], keys, clients, seconds).await
            }
            other => Err(Error::Config(format!("no SQL workload named {other}"))),
        }
    }

    async fn prefill(&self, records: u64) -> Result<u64, Error> {
        *self.replay_keys.lock().await = None;
        self.bench.prefill(records).await?;
        Ok(self.bench.store().stats().await?.total())
    }

    async fn teardown(&self) -> Result<(), Error> {
        self.bench.teardown().await
    }
}
