//! The conformance factory of this store (feature `conformance`): what the crate's own
//! tests and `idem check` run [`idem_conformance`]'s suite with.
//!
//! Every store it creates is a table `records_<n>` of one scratch schema, beside the
//! `business` table its transactional operations write to; [`PgConformance::remove`] drops
//! the schema, and so does dropping the factory if that was not done.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use idem_conformance::{async_trait, StoreFactory, TxFactory, TxPlan};
use idem_core::{Error, Failure, Key};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::OnceCell;

use crate::error::map_err;
use crate::{PgOperation, PgOptions, PgStore};

/// Connections of the pool the factory's stores share: the suite's races queue hundreds
/// of calls on a few connections.
const POOL_SIZE: u32 = 12;
/// Connections of a handle opened as another process would ([`StoreFactory::reopen`],
/// [`StoreFactory::second_handle`]).
const HANDLE_POOL_SIZE: u32 = 4;
/// How long a call waits for a pooled connection, and the probe for the server.
const WAIT: Duration = Duration::from_secs(30);
const PROBE: Duration = Duration::from_secs(5);

/// Stores in a scratch schema of a PostgreSQL database, for the conformance suite.
pub struct PgConformance {
    connect: PgConnectOptions,
    schema: String,
    pool: PgPool,
    /// Set once the schema and the business table exist.
    ready: OnceCell<()>,
    /// Whether the schema may exist: something tried to create it and it was not removed.
    created: AtomicBool,
    next: AtomicU32,
}

impl PgConformance {
    /// A factory on the server of `connect` whose stores live in the schema `schema`
    /// (created on first use; lowercase letters, digits and `_`, not starting with a digit,
    /// at most 63 bytes). Nothing is connected yet.
    pub fn new(connect: PgConnectOptions, schema: &str) -> Result<Self, Error> {
        let valid = !schema.is_empty()
            && schema.len() <= 63
            && !schema.starts_with(|c: char| c.is_ascii_digit())
            && schema
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(Error::Config(format!(
                "scratch schema {schema:?}: lowercase letters, digits and `_`, not starting \
                 with a digit, at most 63 bytes"
            )));
        }
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(WAIT)
            .connect_lazy_with(connect.clone());
        Ok(PgConformance {
            connect,
            schema: schema.to_string(),
            pool,
            ready: OnceCell::new(),
            created: AtomicBool::new(false),
            next: AtomicU32::new(0),
        })
    }

    /// The scratch schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The pool the factory's stores share, once the schema and its `business` table
    /// (`scope TEXT, id TEXT, n INT`) exist.
    pub async fn pool(&self) -> Result<&PgPool, Error> {
        self.ready
            .get_or_try_init(|| async {
                self.created.store(true, Ordering::SeqCst);
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "CREATE SCHEMA IF NOT EXISTS {0};
                     CREATE TABLE IF NOT EXISTS {0}.business
                         (scope TEXT NOT NULL, id TEXT NOT NULL, n INT NOT NULL)",
                    self.schema
                )))
                .execute(&self.pool)
                .await
                .map(drop)
                .map_err(map_err)
            })
            .await?;
        Ok(&self.pool)
    }

    /// A migrated store on a fresh table of the schema, on the shared pool.
    pub async fn store(&self) -> Result<PgStore, Error> {
        let pool = self.pool().await?.clone();
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let options = PgOptions::default().with_table(&format!("{}.records_{n}", self.schema))?;
        let store = PgStore::from_pool(pool, options)?;
        store.migrate().await?;
        Ok(store)
    }

    /// A handle on `store`'s table through a pool of its own, as another process opens it.
    async fn handle_on(&self, store: &PgStore) -> Result<PgStore, Error> {
        let table = PgOptions::default().with_table(&store.table().quoted().replace('"', ""))?;
        let sized = table.clone().with_max_connections(HANDLE_POOL_SIZE);
        let pool = sized
            .pool_options()
            .connect_with(sized.connect_options(self.connect.clone())?)
            .await
            .map_err(map_err)?;
        PgStore::from_pool(pool, table)
    }

    /// Drops the schema and everything in it, on a connection of its own.
    pub async fn remove(&self) -> Result<(), Error> {
        if !self.created.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut conn = PgConnection::connect_with(&self.connect)
            .await
            .map_err(map_err)?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.schema
        )))
        .execute(&mut conn)
        .await
        .map_err(map_err)?;
        self.created.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for PgConformance {
    fn drop(&mut self) {
        if self.created.load(Ordering::SeqCst) {
            let _ = idem_conformance::scratch::block_on_own_thread(self.remove());
        }
    }
}

#[async_trait]
impl StoreFactory for PgConformance {
    type Store = PgStore;

    fn name(&self) -> &str {
        "postgres"
    }

    async fn unavailable(&self) -> Option<String> {
        let at = format!("{}:{}", self.connect.get_host(), self.connect.get_port());
        match tokio::time::timeout(PROBE, PgConnection::connect_with(&self.connect)).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("cannot connect to PostgreSQL at {at}: {e}")),
            Err(_) => Some(format!("connecting to PostgreSQL at {at} timed out")),
        }
    }

    async fn create(&self) -> Result<PgStore, Error> {
        self.store().await
    }

    async fn reopen(&self, store: PgStore) -> Option<Result<PgStore, Error>> {
        // A PgStore keeps nothing in memory but its pool (shared with the factory's other
        // stores): a fresh pool on the same table is what a restarted process opens.
        let reopened = self.handle_on(&store).await;
        drop(store);
        Some(reopened)
    }

    async fn second_handle(&self, store: &PgStore) -> Option<Result<PgStore, Error>> {
        Some(self.handle_on(store).await)
    }
}

#[async_trait]
impl TxFactory for PgConformance {
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
        .map_err(map_err)?;
        Ok(n as u64)
    }
}
