//! The lab on PostgreSQL: ledger and naive keys in the schema `idem_lab`, beside the
//! store's table.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem::postgres::sqlx::postgres::PgQueryResult;
use idem::postgres::sqlx::{self, Postgres};
use idem::postgres::{PgOperation, PgOptions, PgStore};
use idem::{Barrier, DynStore, Error, Fingerprint, Key, ManualClock, TransactionalStore, TxPolicy};

use super::sql::{transact_legs, SqlLedger, Statements};
use super::{LabBackend, Ledger, TxAnswer, TxPayment};

pub struct PgLab {
    store: PgStore,
    ledger: SqlLedger<Postgres>,
}

const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS idem_lab;
CREATE TABLE IF NOT EXISTS idem_lab.ledger (strategy TEXT NOT NULL, payment TEXT NOT NULL, leg TEXT NOT NULL,
                                            amount BIGINT NOT NULL, dedup TEXT UNIQUE);
CREATE TABLE IF NOT EXISTS idem_lab.naive_keys (k TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS idem_lab.ttl_keys (k TEXT PRIMARY KEY, expires_at BIGINT NOT NULL);
";

const INSERT: &str = "INSERT INTO idem_lab.ledger (strategy, payment, leg, amount, dedup) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (dedup) DO NOTHING";

impl PgLab {
    pub async fn connect(url: &str, pool_size: u32) -> Result<Self, Error> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(Duration::from_secs(60))
            .connect(url)
            .await
            .map_err(Error::retryable)?;
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(Error::retryable)?;
        let options = PgOptions::default().with_table("idem_lab.idem_records")?;
        let store = PgStore::from_pool(pool.clone(), options)?;
        store.migrate().await?;
        let sql = Statements {
            reset: "TRUNCATE idem_lab.ledger, idem_lab.naive_keys, idem_lab.ttl_keys, idem_lab.idem_records",
            insert: INSERT,
            naive_seen: "SELECT COUNT(*) FROM idem_lab.naive_keys WHERE k = $1",
            naive_mark: "INSERT INTO idem_lab.naive_keys (k) VALUES ($1) ON CONFLICT DO NOTHING",
            ttl_claim: "INSERT INTO idem_lab.ttl_keys AS t (k, expires_at) VALUES ($1, $2)
                        ON CONFLICT (k) DO UPDATE SET expires_at = $4 WHERE t.expires_at <= $3",
            claimed: |done: &PgQueryResult| done.rows_affected() == 1,
            tally: "SELECT payment, COUNT(*) FILTER (WHERE leg = 'debit'), COUNT(*) FILTER (WHERE leg = 'credit')
                      FROM idem_lab.ledger WHERE strategy = $1 GROUP BY payment",
        };
        Ok(PgLab {
            store,
            ledger: SqlLedger { pool, sql },
        })
    }
}

#[async_trait]
impl LabBackend for PgLab {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn store(&self) -> DynStore {
        Arc::new(self.store.clone())
    }

    fn ledger(&self) -> &dyn Ledger {
        &self.ledger
    }

    fn claims_at_commit(&self) -> bool {
        <PgStore as TransactionalStore>::CLAIMS_AT_COMMIT
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
        let op: PgOperation<i64, String, String> =
            Box::new(move |conn| Box::pin(transact_legs::<Postgres>(conn, INSERT, p)));
        Some(barrier.transaction(key, Some(fp), policy, op).await)
    }
}
