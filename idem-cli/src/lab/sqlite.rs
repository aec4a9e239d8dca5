//! The lab on embedded SQLite: ledger and naive keys in tables beside the store's.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem::sqlite::{rusqlite, SqliteStore};
use idem::{Barrier, DynStore, Error, Failure, Fingerprint, Key, ManualClock, TxPolicy};

use crate::scratch::ScratchDb;

use super::{lab_key, LabBackend, Ledger, Leg, Tally, TxAnswer, TxPayment, WORKER_DIED};

pub struct SqliteLab {
    store: SqliteStore,
    /// The lab's own file, kept (and, if temporary, removed) with the lab.
    _db: ScratchDb,
}

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS lab_ledger (strategy TEXT NOT NULL, payment TEXT NOT NULL, leg TEXT NOT NULL,
                                       amount INTEGER NOT NULL, dedup TEXT UNIQUE);
CREATE TABLE IF NOT EXISTS lab_naive_keys (k TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS lab_ttl_keys (k TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
";

impl SqliteLab {
    pub async fn open(db: ScratchDb) -> Result<Self, Error> {
        let store = SqliteStore::connect(db.path()).await?;
        store
            .with_connection(|c| c.execute_batch(SQLITE_SCHEMA))
            .await?;
        Ok(SqliteLab { store, _db: db })
    }
}

fn sqlite_insert(
    c: &rusqlite::Connection,
    strategy: &str,
    payment: &str,
    leg: Leg,
    amount: i64,
    dedup: Option<&str>,
) -> rusqlite::Result<usize> {
    c.execute(
        "INSERT INTO lab_ledger (strategy, payment, leg, amount, dedup) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (dedup) DO NOTHING",
        rusqlite::params![strategy, payment, leg.name(), amount, dedup],
    )
}

#[async_trait]
impl Ledger for SqliteLab {
    async fn reset(&self) -> Result<(), Error> {
        self.store
            .with_connection(|c| c.execute_batch("DELETE FROM lab_ledger; DELETE FROM lab_naive_keys; DELETE FROM lab_ttl_keys; DELETE FROM idem_records;"))
            .await
    }

    async fn insert(
        &self,
        strategy: &str,
        payment: &str,
        leg: Leg,
        amount: i64,
        dedup: Option<&str>,
    ) -> Result<(), Error> {
        let (s, p, d) = (
            strategy.to_string(),
            payment.to_string(),
            dedup.map(str::to_string),
        );
        self.store
            .with_connection(move |c| sqlite_insert(c, &s, &p, leg, amount, d.as_deref()).map(drop))
            .await
    }

    async fn naive_seen(&self, strategy: &str, key: &str) -> Result<bool, Error> {
        let k = lab_key(strategy, key);
        self.store
            .with_connection(move |c| {
                c.query_row(
                    "SELECT COUNT(*) FROM lab_naive_keys WHERE k = ?1",
                    [k],
                    |r| r.get::<_, i64>(0),
                )
            })
            .await
            .map(|n| n > 0)
    }

    async fn naive_mark(&self, strategy: &str, key: &str) -> Result<(), Error> {
        let k = lab_key(strategy, key);
        self.store
            .with_connection(move |c| {
                c.execute("INSERT OR IGNORE INTO lab_naive_keys (k) VALUES (?1)", [k])
                    .map(drop)
            })
            .await
    }

    async fn ttl_claim(
        &self,
        strategy: &str,
        key: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<bool, Error> {
        let k = lab_key(strategy, key);
        let until = now_ms + ttl.as_millis() as i64;
        self.store
            .with_connection(move |c| {
                c.execute(
                    "INSERT INTO lab_ttl_keys (k, expires_at) VALUES (?1, ?2)
                     ON CONFLICT (k) DO UPDATE SET expires_at = excluded.expires_at
                     WHERE lab_ttl_keys.expires_at <= ?3",
                    rusqlite::params![k, until, now_ms],
                )
            })
            .await
            .map(|n| n == 1)
    }

    async fn tally(&self, strategy: &str) -> Result<Vec<Tally>, Error> {
        let s = strategy.to_string();
        self.store
            .with_connection(move |c| {
                let mut stmt = c.prepare(
                    "SELECT payment, SUM(leg = 'debit'), SUM(leg = 'credit') FROM lab_ledger
                      WHERE strategy = ?1 GROUP BY payment",
                )?;
                let rows = stmt.query_map([s], |r| {
                    Ok(Tally {
                        payment: r.get(0)?,
                        debits: r.get::<_, i64>(1)? as u64,
                        credits: r.get::<_, i64>(2)? as u64,
                    })
                })?;
                rows.collect()
            })
            .await
    }
}

#[async_trait]
impl LabBackend for SqliteLab {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn store(&self) -> DynStore {
        Arc::new(self.store.clone())
    }

    fn ledger(&self) -> &dyn Ledger {
        self
    }

    async fn transactional(
        &self,
        clock: &ManualClock,
        key: &Key,
        fp: Fingerprint,
        p: TxPayment,
        policy: TxPolicy,
    ) -> Option<TxAnswer> {
        let barrier =
            Barrier::new(Arc::new(self.store.clone())).with_clock(Arc::new(clock.clone()));
        let op = Box::new(move |tx: &rusqlite::Transaction<'_>| {
            p.started();
            let fail = |e: rusqlite::Error| Failure::Retryable(e.to_string());
            sqlite_insert(tx, p.strategy, &p.payment, Leg::Debit, p.amount, None).map_err(fail)?;
            std::thread::sleep(p.latency);
            if p.crash {
                return Err(Failure::Retryable(WORKER_DIED.to_string()));
            }
            sqlite_insert(tx, p.strategy, &p.payment, Leg::Credit, p.amount, None).map_err(fail)?;
            Ok(p.amount)
        });
        Some(barrier.transaction(key, Some(fp), policy, op).await)
    }
}
