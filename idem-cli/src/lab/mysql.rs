//! The lab on MySQL or MariaDB: ledger and naive keys in `idem_lab_*` tables of the
//! database, beside the store's table `idem_lab_records`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem::mysql::sqlx::mysql::MySqlQueryResult;
use idem::mysql::sqlx::{self, MySql};
use idem::mysql::{MySqlOperation, MySqlOptions, MySqlStore};
use idem::{Barrier, DynStore, Error, Fingerprint, Key, ManualClock, TxPolicy};

use super::sql::{transact_legs, SqlLedger, Statements};
use super::{LabBackend, Ledger, TxAnswer, TxPayment};

pub struct MySqlLab {
    store: MySqlStore,
    ledger: SqlLedger<MySql>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS idem_lab_ledger (strategy VARCHAR(16) NOT NULL, payment VARCHAR(64) NOT NULL,
                                            leg VARCHAR(8) NOT NULL, amount BIGINT NOT NULL,
                                            dedup VARCHAR(255) UNIQUE, KEY (strategy, payment)) ENGINE = InnoDB;
CREATE TABLE IF NOT EXISTS idem_lab_naive_keys (k VARCHAR(128) PRIMARY KEY) ENGINE = InnoDB;
CREATE TABLE IF NOT EXISTS idem_lab_ttl_keys (k VARCHAR(128) PRIMARY KEY, expires_at BIGINT NOT NULL) ENGINE = InnoDB;
";

const INSERT: &str =
    "INSERT INTO idem_lab_ledger (strategy, payment, leg, amount, dedup) VALUES (?, ?, ?, ?, ?)
                      ON DUPLICATE KEY UPDATE dedup = dedup";

/// The TTL claim in one statement: an expired row takes the new expiry; a live one stays
/// and sets `LAST_INSERT_ID` to 1 (a fresh insert reports 0: the table has no
/// `AUTO_INCREMENT` column). Affected-row counts cannot tell, as sqlx asks for found rows.
const TTL_CLAIM: &str = "INSERT INTO idem_lab_ttl_keys (k, expires_at) VALUES (?, ?)
                         ON DUPLICATE KEY UPDATE
                            expires_at = IF(expires_at <= ?, ?, expires_at + LAST_INSERT_ID(1) * 0)";

impl MySqlLab {
    pub async fn connect(url: &str, pool_size: u32) -> Result<Self, Error> {
        let options = MySqlOptions::default()
            .with_table("idem_lab_records")?
            .with_max_connections(pool_size)
            .with_acquire_timeout(Duration::from_secs(60));
        let store = MySqlStore::connect_with(url, options).await?;
        sqlx::raw_sql(SCHEMA)
            .execute(store.pool())
            .await
            .map_err(Error::retryable)?;
        let sql = Statements {
            reset: "DELETE FROM idem_lab_ledger; DELETE FROM idem_lab_naive_keys;
                    DELETE FROM idem_lab_ttl_keys; DELETE FROM idem_lab_records;",
            insert: INSERT,
            naive_seen: "SELECT COUNT(*) FROM idem_lab_naive_keys WHERE k = ?",
            naive_mark: "INSERT INTO idem_lab_naive_keys (k) VALUES (?) ON DUPLICATE KEY UPDATE k = k",
            ttl_claim: TTL_CLAIM,
            claimed: |done: &MySqlQueryResult| done.last_insert_id() != 1,
            tally: "SELECT payment, CAST(SUM(leg = 'debit') AS SIGNED), CAST(SUM(leg = 'credit') AS SIGNED)
                      FROM idem_lab_ledger WHERE strategy = ? GROUP BY payment",
        };
        Ok(MySqlLab {
            ledger: SqlLedger {
                pool: store.pool().clone(),
                sql,
            },
            store,
        })
    }
}

#[async_trait]
impl LabBackend for MySqlLab {
    fn name(&self) -> &'static str {
        "mysql"
    }

    fn store(&self) -> DynStore {
        Arc::new(self.store.clone())
    }

    fn ledger(&self) -> &dyn Ledger {
        &self.ledger
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
        let op: MySqlOperation<i64, String, String> =
            Box::new(move |conn| Box::pin(transact_legs::<MySql>(conn, INSERT, p)));
        Some(barrier.transaction(key, Some(fp), policy, op).await)
    }
}
