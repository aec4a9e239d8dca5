//! The conformance suite, lease and transactional mode, against SQLite files.

use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use idem_conformance::{StoreFactory, TxFactory, TxPlan};
use idem_core::{Error, Key};
use idem_sqlite::{SqliteOperation, SqliteStore};

/// One temporary directory per test; one database file per store.
struct SqliteFactory {
    dir: tempfile::TempDir,
    next: AtomicU32,
}

impl SqliteFactory {
    fn new() -> Self {
        SqliteFactory {
            dir: tempfile::tempdir().expect("temporary directory"),
            next: AtomicU32::new(0),
        }
    }
}

#[async_trait]
impl StoreFactory for SqliteFactory {
    type Store = SqliteStore;

    fn name(&self) -> &str {
        "sqlite"
    }

    async fn create(&self) -> Result<SqliteStore, Error> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let store = SqliteStore::open(self.dir.path().join(format!("store-{n}.db"))).await?;
        store
            .with_connection(|c| {
                c.execute_batch("CREATE TABLE business (scope TEXT NOT NULL, id TEXT NOT NULL, n INTEGER NOT NULL)")
            })
            .await?;
        Ok(store)
    }
}

#[async_trait]
impl TxFactory for SqliteFactory {
    fn operation(&self, key: &Key, plan: TxPlan) -> SqliteOperation<u64, String, String> {
        let key = key.clone();
        Box::new(move |tx| {
            for n in 0..plan.rows {
                tx.execute(
                    "INSERT INTO business (scope, id, n) VALUES (?1, ?2, ?3)",
                    (key.scope(), key.id(), n),
                )
                .map_err(|e| idem_core::Failure::Retryable(e.to_string()))?;
            }
            std::thread::sleep(plan.hold);
            plan.finish()
        })
    }

    async fn business_rows(&self, store: &SqliteStore, key: &Key) -> Result<u64, Error> {
        let (scope, id) = (key.scope().to_string(), key.id().to_string());
        store
            .with_connection(move |c| {
                c.query_row(
                    "SELECT COUNT(*) FROM business WHERE scope = ?1 AND id = ?2",
                    (scope, id),
                    |r| r.get::<_, i64>(0),
                )
            })
            .await
            .map(|n| n as u64)
    }
}

idem_conformance::conformance_tests!(sqlite, SqliteFactory::new());
idem_conformance::transactional_tests!(sqlite_tx, SqliteFactory::new());
