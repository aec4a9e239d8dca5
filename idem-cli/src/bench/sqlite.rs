//! The SQLite benchmark: the store's table `idem_bench_records` and the business tables
//! `idem_bench_*` in one database file. The business statements run on a connection of
//! their own, opened with the store's settings (WAL, `synchronous = FULL`), one statement
//! at a time: SQLite has one writer, so that is the fastest plain way to write.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use idem::sqlite::{rusqlite, SqliteOperation, SqliteOptions, SqliteStore};
use idem::{Error, Failure};
use rusqlite::{Connection, OptionalExtension};

use super::sql::{Business, SqlBench};
use super::Call;

pub struct SqliteBench {
    store: SqliteStore,
    plain: Arc<Mutex<Connection>>,
}

const TABLES: &str = "DELETE FROM idem_bench_records;
    DROP TABLE IF EXISTS idem_bench_business;
    DROP TABLE IF EXISTS idem_bench_idempotency;
    CREATE TABLE idem_bench_business (k TEXT PRIMARY KEY, amount INTEGER NOT NULL);
    CREATE TABLE idem_bench_idempotency (
        user_id              TEXT NOT NULL,
        idempotency_key      TEXT NOT NULL,
        response_status_code INTEGER,
        response_body        BLOB,
        created_at           TEXT NOT NULL,
        PRIMARY KEY (user_id, idempotency_key));";

const INSERT: &str = "INSERT INTO idem_bench_business (k, amount) VALUES (?1, 100)";

impl SqliteBench {
    /// Opens `path` (creating it), migrates the store's table and creates the business
    /// tables afresh; nothing else in the file is touched.
    pub async fn setup(path: &Path) -> Result<Self, Error> {
        let options = SqliteOptions::default().with_table("idem_bench_records")?;
        let store = SqliteStore::connect_with(path, options).await?;
        let path = path.to_path_buf();
        let plain = blocking(move || {
            let conn = Connection::open(&path)?;
            conn.busy_timeout(Duration::from_secs(5))?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.execute_batch(TABLES)?;
            Ok(conn)
        })
        .await?;
        Ok(SqliteBench {
            store,
            plain: Arc::new(Mutex::new(plain)),
        })
    }

    /// Runs `f` on the plain connection, on the blocking pool.
    fn plain<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<R, Error>> + Send + 'static {
        let plain = Arc::clone(&self.plain);
        blocking(move || {
            // A panicked call left nothing half-done on the connection that SQLite would not
            // roll back itself: keep using it.
            let mut conn = plain.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
    }
}

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> rusqlite::Result<R> + Send + 'static,
) -> Result<R, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Config(format!("a benchmark call panicked: {e}")))?
        .map_err(Error::retryable)
}

impl Business for SqliteBench {
    fn insert(&self, k: String) -> Call {
        Box::pin(self.plain(move |conn| conn.execute(INSERT, [k]).map(drop)))
    }

    fn insert_in_transaction(&self, k: String) -> Call {
        Box::pin(self.plain(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute(INSERT, [k])?;
            tx.commit()
        }))
    }

    fn handrolled(&self, k: String) -> Call {
        Box::pin(self.plain(move |conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let claimed = tx.execute(
                "INSERT INTO idem_bench_idempotency (user_id, idempotency_key, created_at)
                 VALUES ('bench', ?1, datetime('now')) ON CONFLICT DO NOTHING",
                [&k],
            )?;
            if claimed == 0 {
                return Err(rusqlite::Error::StatementChangedRows(0));
            }
            tx.execute(INSERT, [&k])?;
            tx.execute(
                "UPDATE idem_bench_idempotency SET response_status_code = 200, response_body = ?2
                  WHERE user_id = 'bench' AND idempotency_key = ?1",
                rusqlite::params![k, &b"100"[..]],
            )?;
            tx.commit()
        }))
    }

    fn select(&self, k: String) -> Call {
        Box::pin(self.plain(move |conn| {
            conn.prepare_cached("SELECT amount FROM idem_bench_business WHERE k = ?1")?
                .query_row([k], |r| r.get::<_, i64>(0))
                .optional()
                .map(drop)
        }))
    }
}

impl SqlBench for SqliteBench {
    type Store = SqliteStore;
    const BACKEND: &'static str = "sqlite";

    fn store(&self) -> &SqliteStore {
        &self.store
    }

    fn business(&self) -> &dyn Business {
        self
    }

    fn operation(k: String) -> SqliteOperation<i64, String, String> {
        idem::sqlite::operation(move |tx| {
            tx.execute(INSERT, [k])
                .map_err(|e| Failure::Retryable(e.to_string()))?;
            Ok(100)
        })
    }

    fn prefill(&self, records: u64) -> Call {
        Box::pin(self.plain(move |conn| {
            conn.execute_batch(
                "DELETE FROM idem_bench_records; DELETE FROM idem_bench_business;
                 DELETE FROM idem_bench_idempotency;",
            )?;
            conn.execute(
                "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?1)
                 INSERT INTO idem_bench_records (scope, id, fingerprint, state, token, lease_until,
                                                 response, created_at, updated_at, expires_at)
                 SELECT 'prefill', 'p' || n, NULL, 'completed', 1, NULL, X'0131', 0, 0, 9000000000000
                   FROM g",
                [records as i64],
            )?;
            conn.execute_batch("ANALYZE idem_bench_records")
        }))
    }

    fn teardown(&self) -> Call {
        Box::pin(self.plain(|conn| {
            conn.execute_batch(
                "DELETE FROM idem_bench_records; DROP TABLE idem_bench_business;
                 DROP TABLE idem_bench_idempotency;",
            )
        }))
    }
}
