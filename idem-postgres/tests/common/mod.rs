//! A PostgreSQL test schema per factory, dropped when the factory is.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use idem_conformance::{StoreFactory, TxFactory, TxPlan};
use idem_core::{Error, Failure, Key};
use idem_postgres::{db_err, PgOperation, PgStore};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::OnceCell;

/// The server under test: `IDEM_POSTGRES_URL`, default the local `test` database.
pub fn url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

pub struct PgFactory {
    pub schema: String,
    next: AtomicU32,
    pool: OnceCell<PgPool>,
}

impl PgFactory {
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        PgFactory {
            schema: format!("idem_test_{}_{nanos}", std::process::id()),
            next: AtomicU32::new(0),
            pool: OnceCell::new(),
        }
    }

    pub async fn pool(&self) -> Result<&PgPool, Error> {
        self.pool
            .get_or_try_init(|| async {
                let pool = PgPoolOptions::new()
                    .max_connections(12)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect(&url())
                    .await
                    .map_err(db_err)?;
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "CREATE SCHEMA IF NOT EXISTS {0};
                     CREATE TABLE IF NOT EXISTS {0}.business (scope TEXT NOT NULL, id TEXT NOT NULL, n INT NOT NULL)",
                    self.schema
                )))
                .execute(&pool)
                .await
                .map_err(db_err)?;
                Ok(pool)
            })
            .await
    }

    /// A migrated store on a fresh table of this factory's schema.
    pub async fn store(&self) -> Result<PgStore, Error> {
        let pool = self.pool().await?.clone();
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let store = PgStore::with_table(pool, &format!("{}.records_{n}", self.schema))?;
        store.migrate().await?;
        Ok(store)
    }
}

impl Drop for PgFactory {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        // The test's runtime may be shutting down: drop the schema from a thread of our own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&url()).await.ok()?;
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE"
                )))
                .execute(&mut conn)
                .await
                .ok()
            })
        })
        .join();
    }
}

#[async_trait]
impl StoreFactory for PgFactory {
    type Store = PgStore;

    fn name(&self) -> &str {
        "postgres"
    }

    async fn unavailable(&self) -> Option<String> {
        match tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&url())).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("cannot connect to {}: {e}", url())),
            Err(_) => Some(format!("connecting to {} timed out", url())),
        }
    }

    async fn create(&self) -> Result<PgStore, Error> {
        self.store().await
    }
}

#[async_trait]
impl TxFactory for PgFactory {
    fn operation(&self, key: &Key, plan: TxPlan) -> PgOperation<u64, String, String> {
        let (scope, id) = (key.scope().to_string(), key.id().to_string());
        let insert = format!(
            "INSERT INTO {}.business (scope, id, n) VALUES ($1, $2, $3)",
            self.schema
        );
        Box::new(move |conn| {
            Box::pin(async move {
                for n in 0..plan.rows as i32 {
                    sqlx::query(AssertSqlSafe(insert.clone()))
                        .bind(&scope)
                        .bind(&id)
                        .bind(n)
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| Failure::Retryable(e.to_string()))?;
                }
                tokio::time::sleep(plan.hold).await;
                plan.finish()
            })
        })
    }

    async fn business_rows(&self, store: &PgStore, key: &Key) -> Result<u64, Error> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {}.business WHERE scope = $1 AND id = $2",
            self.schema
        )))
        .bind(key.scope())
        .bind(key.id())
        .fetch_one(store.pool())
        .await
        .map_err(db_err)?;
        Ok(n as u64)
    }
}
