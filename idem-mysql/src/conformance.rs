//! The conformance factory of this store (feature `conformance`): what the crate's own
//! tests and `idem check` run [`idem_conformance`]'s suite with.
//!
//! Every store it creates is a table `<prefix>_r<n>` of the connection's database, beside
//! the table `<prefix>_business` its transactional operations write to;
//! [`MySqlConformance::remove`] drops them all, and so does dropping the factory if that was
//! not done.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_conformance::{async_trait, StoreFactory, TxFactory, TxPlan};
use idem_core::{Error, Failure, Key};
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::OnceCell;

use crate::error::map_err;
use crate::{MySqlOperation, MySqlOptions, MySqlStore};

/// Connections of the pool that creates the business table and counts its rows.
const POOL_SIZE: u32 = 12;
/// Connections of each store's own pool.
const STORE_POOL_SIZE: u32 = 4;
/// How long a call waits for a pooled connection.
const WAIT: Duration = Duration::from_secs(30);
/// How long the availability probe waits for a connection.
const PROBE: Duration = Duration::from_secs(5);

/// A pool on `connect` of at most `max` connections, each of which runs `session` (session
/// settings, such as `SET SESSION sql_mode = …`) right after connecting. Connects lazily.
pub fn session_pool(connect: &MySqlConnectOptions, session: &str, max: u32) -> MySqlPool {
    let session: Arc<str> = session.into();
    MySqlPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(WAIT)
        .after_connect(move |conn, _| {
            let session = session.clone();
            Box::pin(async move {
                sqlx::raw_sql(AssertSqlSafe(session.to_string()))
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
        .connect_lazy_with(connect.clone())
}

/// Stores on tables of a scratch prefix in a MySQL or MariaDB database, for the
/// conformance suite.
pub struct MySqlConformance {
    connect: MySqlConnectOptions,
    prefix: String,
    session: String,
    pool: OnceCell<MySqlPool>,
    /// Whether tables may exist: something tried to create one and they were not removed.
    created: AtomicBool,
    next: AtomicU32,
}

impl MySqlConformance {
    /// A factory on the database of `connect` whose tables are named `<prefix>_…`
    /// (letters, digits and `_`; at most 48 bytes, so that every name fits). Nothing is
    /// connected yet.
    pub fn new(connect: MySqlConnectOptions, prefix: &str) -> Result<Self, Error> {
        let valid = !prefix.is_empty()
            && prefix.len() <= 48
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(Error::Config(format!(
                "scratch table prefix {prefix:?}: letters, digits and `_`, at most 48 bytes"
            )));
        }
        Ok(MySqlConformance {
            connect,
            prefix: prefix.to_string(),
            session: "DO 0".into(),
            pool: OnceCell::new(),
            created: AtomicBool::new(false),
            next: AtomicU32::new(0),
        })
    }

    /// Every connection of the factory's pools runs `session` right after connecting
    /// (default: nothing).
    pub fn with_session(mut self, session: &str) -> Self {
        self.session = session.to_string();
        self
    }

    /// The scratch prefix of the tables.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The business table transactional operations write to (`scope`, `id`, `n`).
    pub fn business(&self) -> String {
        format!("{}_business", self.prefix)
    }

    /// The factory's pool, once the business table exists.
    pub async fn pool(&self) -> Result<&MySqlPool, Error> {
        self.pool
            .get_or_try_init(|| async {
                let pool = session_pool(&self.connect, &self.session, POOL_SIZE);
                self.created.store(true, Ordering::SeqCst);
                sqlx::raw_sql(AssertSqlSafe(format!(
                    "CREATE TABLE IF NOT EXISTS {} (scope VARBINARY(255) NOT NULL, \
                     id VARBINARY(255) NOT NULL, n INT NOT NULL) ENGINE = InnoDB",
                    self.business()
                )))
                .execute(&pool)
                .await
                .map_err(map_err)?;
                Ok(pool)
            })
            .await
    }

    /// A migrated store on a fresh table, with a pool of its own: one shared pool would see
    /// a new set of statements per table, and sqlx-mysql's statement cache (100 per
    /// connection) would evict them, each eviction costing a delayed-ACK stall (see the
    /// crate docs' costs).
    pub async fn store(&self) -> Result<MySqlStore, Error> {
        let pool = session_pool(&self.connect, &self.session, STORE_POOL_SIZE);
        self.store_with(pool, MySqlOptions::default()).await
    }

    /// A migrated store on `pool` and a fresh table (the table in `options` is replaced).
    pub async fn store_with(
        &self,
        pool: MySqlPool,
        options: MySqlOptions,
    ) -> Result<MySqlStore, Error> {
        self.pool().await?;
        let options = options.with_table(&self.table())?;
        let store = MySqlStore::from_pool(pool, options);
        store.migrate().await?;
        Ok(store)
    }

    /// A fresh table name, removed with the factory's other tables.
    pub fn table(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        format!("{}_r{n}", self.prefix)
    }

    /// A handle on `store`'s table through a pool of its own, as another process opens it.
    async fn handle_on(&self, store: &MySqlStore) -> Result<MySqlStore, Error> {
        let options = MySqlOptions::default().with_table(store.options().table())?;
        let pool = session_pool(&self.connect, &self.session, STORE_POOL_SIZE);
        Ok(MySqlStore::from_pool(pool, options))
    }

    /// Drops every table of the factory, on a connection of its own.
    pub async fn remove(&self) -> Result<(), Error> {
        if !self.created.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut tables: Vec<String> = (0..self.next.load(Ordering::SeqCst))
            .map(|n| format!("{}_r{n}", self.prefix))
            .collect();
        tables.push(self.business());
        let mut conn = MySqlConnection::connect_with(&self.connect)
            .await
            .map_err(map_err)?;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            tables.join(", ")
        )))
        .execute(&mut conn)
        .await
        .map_err(map_err)?;
        self.created.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for MySqlConformance {
    fn drop(&mut self) {
        if self.created.load(Ordering::SeqCst) {
            let _ = idem_conformance::scratch::block_on_own_thread(self.remove());
        }
    }
}

#[async_trait]
impl StoreFactory for MySqlConformance {
    type Store = MySqlStore;

    fn name(&self) -> &str {
        "mysql"
    }

    async fn unavailable(&self) -> Option<String> {
        let at = format!("{}:{}", self.connect.get_host(), self.connect.get_port());
        match tokio::time::timeout(PROBE, MySqlConnection::connect_with(&self.connect)).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("cannot connect to MySQL at {at}: {e}")),
            Err(_) => Some(format!("connecting to MySQL at {at} timed out")),
        }
    }

    async fn create(&self) -> Result<MySqlStore, Error> {
        self.store().await
    }

    async fn reopen(&self, store: MySqlStore) -> Option<Result<MySqlStore, Error>> {
        // A MySqlStore keeps nothing in memory but its pool: a fresh pool on the same table
        // is what a restarted process opens.
        let reopened = self.handle_on(&store).await;
        drop(store);
        Some(reopened)
    }

    async fn second_handle(&self, store: &MySqlStore) -> Option<Result<MySqlStore, Error>> {
        Some(self.handle_on(store).await)
    }
}

#[async_trait]
impl TxFactory for MySqlConformance {
    fn operation(&self, key: &Key, plan: TxPlan) -> MySqlOperation<u64, String, String> {
        writing(
            &self.business(),
            key,
            0..plan.rows as i32,
            move || async move {
                tokio::time::sleep(plan.hold).await;
                plan.finish()
            },
        )
    }

    async fn business_rows(&self, store: &MySqlStore, key: &Key) -> Result<u64, Error> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {} WHERE scope = ? AND id = ?",
            self.business()
        )))
        .bind(key.scope().as_bytes())
        .bind(key.id().as_bytes())
        .fetch_one(store.pool())
        .await
        .map_err(map_err)?;
        Ok(n as u64)
    }
}

/// An operation that writes one row of the table `business` tagged with `key` for each of
/// `ns`, then ends as `then` says (still inside the transaction).
pub fn writing<T, Fut>(
    business: &str,
    key: &Key,
    ns: impl IntoIterator<Item = i32, IntoIter: Send> + Send + 'static,
    then: impl FnOnce() -> Fut + Send + 'static,
) -> MySqlOperation<T, String, String>
where
    Fut: Future<Output = Result<T, Failure<String, String>>> + Send,
{
    let insert = format!("INSERT INTO {business} (scope, id, n) VALUES (?, ?, ?)");
    let (scope, id) = (key.scope().to_string(), key.id().to_string());
    Box::new(move |conn| {
        Box::pin(async move {
            for n in ns {
                sqlx::query(AssertSqlSafe(insert.clone()))
                    .bind(scope.as_bytes())
                    .bind(id.as_bytes())
                    .bind(n)
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| Failure::Retryable(e.to_string()))?;
            }
            then().await
        })
    })
}
