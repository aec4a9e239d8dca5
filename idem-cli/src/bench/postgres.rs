//! The PostgreSQL benchmark's statements, in the schema `idem_bench`.

use idem::postgres::sqlx::postgres::PgQueryResult;
use idem::postgres::sqlx::{self, PgPool, Postgres};
use idem::postgres::{PgOperation, PgOptions, PgStore};
use idem::Error;

use super::sql::{Business, SqlBench};
use super::sqlx_calls::{insert_on, SqlxCalls, Statements};
use super::Call;

pub struct PgBench {
    pool: PgPool,
    store: PgStore,
    calls: SqlxCalls<Postgres>,
}

impl PgBench {
    /// Creates the schema afresh, with the store's table in it.
    pub async fn setup(url: &str) -> Result<Self, Error> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(64)
            .connect(url)
            .await
            .map_err(Error::retryable)?;
        sqlx::raw_sql(
            "DROP SCHEMA IF EXISTS idem_bench CASCADE;
             CREATE SCHEMA idem_bench;
             CREATE TABLE idem_bench.business (k TEXT PRIMARY KEY, amount BIGINT NOT NULL);
             CREATE TABLE idem_bench.idempotency (
                 user_id              TEXT NOT NULL,
                 idempotency_key      TEXT NOT NULL,
                 response_status_code SMALLINT,
                 response_body        BYTEA,
                 created_at           TIMESTAMPTZ NOT NULL,
                 PRIMARY KEY (user_id, idempotency_key));",
        )
        .execute(&pool)
        .await
        .map_err(Error::retryable)?;
        let options = PgOptions::default().with_table("idem_bench.idem_records")?;
        let store = PgStore::from_pool(pool.clone(), options)?;
        store.migrate().await?;
        let calls = SqlxCalls {
            pool: pool.clone(),
            sql: &STATEMENTS,
        };
        Ok(PgBench { pool, store, calls })
    }
}

const INSERT: &str = "INSERT INTO idem_bench.business (k, amount) VALUES ($1, 100)";

static STATEMENTS: Statements<Postgres> = Statements {
    insert: INSERT,
    select: "SELECT amount FROM idem_bench.business WHERE k = $1",
    claim_key: "INSERT INTO idem_bench.idempotency (user_id, idempotency_key, created_at)
                VALUES ('bench', $1, now()) ON CONFLICT DO NOTHING",
    save_response:
        "UPDATE idem_bench.idempotency SET response_status_code = 200, response_body = $1
                     WHERE user_id = 'bench' AND idempotency_key = $2",
    rows_affected: PgQueryResult::rows_affected,
};

impl SqlBench for PgBench {
    type Store = PgStore;
    const BACKEND: &'static str = "postgres";

    fn store(&self) -> &PgStore {
        &self.store
    }

    fn business(&self) -> &dyn Business {
        &self.calls
    }

    fn operation(k: String) -> PgOperation<i64, String, String> {
        Box::new(move |conn| insert_on::<Postgres>(conn, INSERT, k))
    }

    fn prefill(&self, records: u64) -> Call {
        let pool = self.pool.clone();
        Box::pin(async move {
            sqlx::raw_sql(
                "TRUNCATE idem_bench.idem_records, idem_bench.business, idem_bench.idempotency",
            )
            .execute(&pool)
            .await
            .map_err(Error::retryable)?;
            sqlx::query(
                "INSERT INTO idem_bench.idem_records (scope, id, fingerprint, state, token, lease_until, response,
                                                      created_at, updated_at, expires_at)
                 SELECT 'prefill', 'p' || g, NULL, 'completed', 1, NULL, '\\x0131'::bytea, 0, 0, 9000000000000
                   FROM generate_series(1, $1) g ON CONFLICT DO NOTHING",
            )
            .bind(records as i64)
            .execute(&pool)
            .await
            .map_err(Error::retryable)?;
            sqlx::raw_sql("ANALYZE idem_bench.idem_records")
                .execute(&pool)
                .await
                .map_err(Error::retryable)
                .map(drop)
        })
    }

    fn teardown(&self) -> Call {
        let pool = self.pool.clone();
        Box::pin(async move {
            sqlx::raw_sql("DROP SCHEMA idem_bench CASCADE")
                .execute(&pool)
                .await
                .map_err(Error::retryable)
                .map(drop)
        })
    }
}
