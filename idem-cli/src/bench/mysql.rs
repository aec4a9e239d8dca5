//! The MySQL/MariaDB benchmark's statements, in `idem_bench_*` tables of the database.

use idem::mysql::sqlx::mysql::MySqlQueryResult;
use idem::mysql::sqlx::{self, MySql, MySqlPool};
use idem::mysql::{MySqlOperation, MySqlOptions, MySqlStore};
use idem::Error;

use super::sql::{Business, SqlBench};
use super::sqlx_calls::{insert_on, SqlxCalls, Statements};
use super::Call;

pub struct MySqlBench {
    store: MySqlStore,
    calls: SqlxCalls<MySql>,
}

impl MySqlBench {
    /// Creates the tables afresh.
    pub async fn setup(url: &str) -> Result<Self, Error> {
        let options = MySqlOptions::default()
            .with_table("idem_bench_records")?
            .with_max_connections(64);
        let store = MySqlStore::connect_with(url, options).await?;
        sqlx::raw_sql(
            "DELETE FROM idem_bench_records;
             DROP TABLE IF EXISTS idem_bench_business, idem_bench_idempotency;
             CREATE TABLE idem_bench_business (k VARCHAR(64) PRIMARY KEY, amount BIGINT NOT NULL)
                 ENGINE = InnoDB;
             CREATE TABLE idem_bench_idempotency (
                 user_id              VARCHAR(64) NOT NULL,
                 idempotency_key      VARCHAR(64) NOT NULL,
                 response_status_code SMALLINT,
                 response_body        BLOB,
                 created_at           TIMESTAMP(6) NOT NULL,
                 PRIMARY KEY (user_id, idempotency_key)) ENGINE = InnoDB;",
        )
        .execute(store.pool())
        .await
        .map_err(Error::retryable)?;
        let calls = SqlxCalls {
            pool: store.pool().clone(),
            sql: &STATEMENTS,
        };
        Ok(MySqlBench { store, calls })
    }

    fn pool(&self) -> MySqlPool {
        self.store.pool().clone()
    }
}

const INSERT: &str = "INSERT INTO idem_bench_business (k, amount) VALUES (?, 100)";

static STATEMENTS: Statements<MySql> = Statements {
    insert: INSERT,
    select: "SELECT amount FROM idem_bench_business WHERE k = ?",
    claim_key: "INSERT IGNORE INTO idem_bench_idempotency (user_id, idempotency_key, created_at)
                VALUES ('bench', ?, NOW(6))",
    save_response: "UPDATE idem_bench_idempotency SET response_status_code = 200, response_body = ?
                     WHERE user_id = 'bench' AND idempotency_key = ?",
    rows_affected: MySqlQueryResult::rows_affected,
};

/// Ten digits, to number up to a million rows with a join (no `generate_series`).
const DIGITS: &str = "(SELECT 0 n UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL \
     SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9)";

impl SqlBench for MySqlBench {
    type Store = MySqlStore;
    const BACKEND: &'static str = "mysql";

    fn store(&self) -> &MySqlStore {
        &self.store
    }

    fn business(&self) -> &dyn Business {
        &self.calls
    }

    fn operation(k: String) -> MySqlOperation<i64, String, String> {
        Box::new(move |conn| insert_on::<MySql>(conn, INSERT, k))
    }

    fn prefill(&self, records: u64) -> Call {
        let pool = self.pool();
        Box::pin(async move {
            sqlx::raw_sql("DELETE FROM idem_bench_records; DELETE FROM idem_bench_business; DELETE FROM idem_bench_idempotency;")
                .execute(&pool)
                .await
                .map_err(Error::retryable)?;
            let numbered = format!(
                "INSERT IGNORE INTO idem_bench_records (scope, id, fingerprint, state, token, lease_until,
                                                       response, created_at, updated_at, expires_at)
                 SELECT 'prefill', CONCAT('p', g), NULL, 'completed', 1, NULL, X'0131', 0, 0, 9000000000000
                   FROM (SELECT a.n + 10 * b.n + 100 * c.n + 1000 * d.n + 10000 * e.n + 100000 * f.n AS g
                           FROM {DIGITS} a, {DIGITS} b, {DIGITS} c, {DIGITS} d, {DIGITS} e, {DIGITS} f) numbers
                  WHERE g < ?"
            );
            sqlx::query(sqlx::AssertSqlSafe(numbered))
                .bind(records as i64)
                .execute(&pool)
                .await
                .map_err(Error::retryable)?;
            sqlx::raw_sql("ANALYZE TABLE idem_bench_records")
                .execute(&pool)
                .await
                .map_err(Error::retryable)
                .map(drop)
        })
    }

    fn teardown(&self) -> Call {
        let pool = self.pool();
        Box::pin(async move {
            sqlx::raw_sql(
                "DROP TABLE idem_bench_business, idem_bench_idempotency, idem_bench_records;",
            )
            .execute(&pool)
            .await
            .map_err(Error::retryable)
            .map(drop)
        })
    }
}
