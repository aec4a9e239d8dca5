//! [`MySqlStore`]: constructors, migration, and lease mode ([`Store`]).

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use idem_core::backend::detach::{detached, forget};
use idem_core::backend::{model, RecordRow};
use idem_core::{
    Begin, Deadlines, Error, Fingerprint, Guarantees, Key, Lease, Record, Stats, Store, Timestamp,
    Token,
};
use sqlx::mysql::{MySql, MySqlPool, MySqlPoolOptions, MySqlRow};
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, MySqlConnection, Row};

use crate::error::{map_err, number, DEADLOCK};
use crate::options::MySqlOptions;
use crate::sql::{Sql, EXPECTED_COLUMNS, EXPECTED_ENGINE, NOT_CLAIMED};

/// How many times a claim is tried again when a concurrent writer got in the way: a
/// deadlock victim, or a row that changed between the claim statement and the read of
/// the answer.
pub(crate) const CLAIM_ATTEMPTS: usize = 8;

/// A strict, durable, transactional idempotency store in a MySQL or MariaDB (InnoDB)
/// table; see the crate docs for the design.
///
/// `begin` is one `INSERT … ON DUPLICATE KEY UPDATE` for a fresh claim or a reclaim, and one more
/// `SELECT` for a replay; `complete`, `fail`, `extend` and `release` are one fenced `UPDATE` each.
/// Every call that writes runs to its end (a dropped caller's call moves onto a task of its own),
/// so a dropped caller never interrupts it half-way, and a claim whose caller is gone is released
/// at once.
#[derive(Clone, Debug)]
pub struct MySqlStore {
    pool: MySqlPool,
    sql: Arc<Sql>,
    options: MySqlOptions,
}

impl MySqlStore {
    /// Connects a pool to `url` (`mysql://user:password@host:3306/database`) with default
    /// [`MySqlOptions`] and returns a migrated store.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, MySqlOptions::default()).await
    }

    /// Connects a pool to `url` as `options` say and returns a migrated store.
    pub async fn connect_with(url: &str, options: MySqlOptions) -> Result<Self, Error> {
        let pool = MySqlPoolOptions::new()
            .max_connections(options.max_connections())
            .acquire_timeout(options.acquire_timeout())
            .connect(url)
            .await
            .map_err(map_err)?;
        let store = Self::from_pool(pool, options);
        store.migrate().await?;
        Ok(store)
    }

    /// A store on an existing pool, using the table of `options` (its pool settings are
    /// not used). Call [`MySqlStore::migrate`] once, or create the table by hand from
    /// [`MySqlStore::schema_sql`], before use.
    pub fn from_pool(pool: MySqlPool, options: MySqlOptions) -> Self {
        MySqlStore {
            sql: Arc::new(Sql::new(options.table_name())),
            pool,
            options,
        }
    }

    /// Creates the table with its index if it does not exist, then checks that the table
    /// found is one this crate can rely on: InnoDB, binary keys and fingerprint (a table
    /// made by hand with a case-insensitive collation would merge distinct keys, so it is
    /// refused with [`Error::Config`]). Idempotent, and safe when many processes run it
    /// at once: the DDL is a single `CREATE TABLE IF NOT EXISTS`, which the server
    /// serialises on the table's metadata lock.
    pub async fn migrate(&self) -> Result<(), Error> {
        sqlx::raw_sql(AssertSqlSafe(self.sql.schema.clone()))
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        let table = self.options.table_name();
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.verify)))
            .bind(table.database.as_deref())
            .bind(&table.bare)
            .bind(table.database.as_deref())
            .bind(&table.bare)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        let engine: Option<String> = row.try_get("engine").map_err(map_err)?;
        let columns: Option<String> = row.try_get("columns").map_err(map_err)?;
        let columns = columns.map(|c| c.to_lowercase());
        if engine.as_deref() != Some(EXPECTED_ENGINE)
            || columns.as_deref() != Some(EXPECTED_COLUMNS)
        {
            return Err(Error::Config(format!(
                "table {} exists but is not the idem schema: engine {engine:?}, key columns \
                 {columns:?}; expected {EXPECTED_ENGINE} with `{EXPECTED_COLUMNS}` (see \
                 MySqlStore::schema_sql)",
                table.name
            )));
        }
        Ok(())
    }

    /// The DDL [`MySqlStore::migrate`] runs, for teams that migrate by hand.
    pub fn schema_sql(&self) -> &str {
        &self.sql.schema
    }

    /// The pool.
    pub fn pool(&self) -> &MySqlPool {
        &self.pool
    }

    /// The options the store was built with.
    pub fn options(&self) -> &MySqlOptions {
        &self.options
    }

    /// One claim statement, then (if the row could not be claimed) one read of the
    /// answer: `Ok(None)` if the row changed in between and the claim must be tried
    /// again. `locked` reads with `FOR UPDATE` (transactional mode, where the claim
    /// statement's row lock is still held and the read must see the row it locked).
    pub(crate) async fn claim_once(
        &self,
        conn: &mut MySqlConnection,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
        locked: bool,
    ) -> Result<Option<Begin>, Error> {
        let fp = fingerprint.map(|f| f.as_bytes().to_vec());
        let (lease_until, expires_at, now_ms) = (
            deadlines.lease_until.as_millis(),
            deadlines.expires_at.as_millis(),
            now.as_millis(),
        );
        let claimable = |q: Query<'static>| q.bind(now_ms).bind(fp.clone()).bind(fp.clone());
        let mut q = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.claim)))
            .bind(key.scope().as_bytes())
            .bind(key.id().as_bytes())
            .bind(fp.clone())
            .bind(lease_until)
            .bind(now_ms)
            .bind(now_ms)
            .bind(expires_at);
        q = claimable(q);
        q = claimable(q).bind(now_ms);
        q = claimable(q).bind(expires_at);
        q = claimable(q).bind(fp.clone());
        q = claimable(q).bind(lease_until);
        let done = q.execute(&mut *conn).await.map_err(map_err)?;
        let lease = |token: u64, reclaimed: bool| {
            Some(Begin::Acquired(Lease {
                key: key.clone(),
                token: Token(token),
                lease_until: deadlines.lease_until,
                reclaimed,
            }))
        };
        // With CLIENT_FOUND_ROWS (sqlx always sets it) an insert reports 1 row, an
        // unchanged row 1, an updated row 2. Anything else means the marker did not come
        // back as written (a proxy rewriting OK packets, say): refuse to guess a token.
        match (done.last_insert_id(), done.rows_affected()) {
            (0, 1) => return Ok(lease(1, false)),
            (NOT_CLAIMED, 0 | 1) => {}
            (code, 2) if code > NOT_CLAIMED => return Ok(lease(code / 2, code % 2 == 1)),
            (code, rows) => {
                return Err(Error::permanent(format!(
                    "the claim of {key} reported last_insert_id {code} and {rows} rows, \
                     which no claim produces"
                )))
            }
        }
        let read = if locked {
            &self.sql.get_locked
        } else {
            &self.sql.get
        };
        let Some(existing) = self.read(conn, read, key).await? else {
            // Purged between the claim and the read.
            return Ok(None);
        };
        Ok(
            match model::begin(Some(&existing), key, fingerprint, deadlines, now).0 {
                // Released or expired between the claim and the read: claim it properly.
                Begin::Acquired(_) => None,
                answer => Some(answer),
            },
        )
    }

    /// Lease mode's claim: [`MySqlStore::claim_once`] in autocommit until it answers.
    async fn claim(
        &self,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        for _ in 0..CLAIM_ATTEMPTS {
            match self
                .claim_once(&mut conn, key, fingerprint, deadlines, now, false)
                .await
            {
                Ok(Some(answer)) => return Ok(answer),
                Ok(None) => continue,
                // InnoDB rolled the statement's transaction back whole: nothing happened.
                Err(e) if server_error(&e) == Some(DEADLOCK) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::retryable(format!(
            "claim of {key} kept conflicting with concurrent writers ({CLAIM_ATTEMPTS} attempts)"
        )))
    }

    async fn read(
        &self,
        conn: &mut MySqlConnection,
        statement: &Arc<str>,
        key: &Key,
    ) -> Result<Option<Record>, Error> {
        let row = sqlx::query(AssertSqlSafe(Arc::clone(statement)))
            .bind(key.scope().as_bytes())
            .bind(key.id().as_bytes())
            .fetch_optional(&mut *conn)
            .await
            .map_err(map_err)?;
        row.map(|r| record(key, &r)).transpose()
    }

    /// `complete` or `fail` on `conn`: one fenced `UPDATE`.
    pub(crate) async fn finish_on(
        &self,
        conn: &mut MySqlConnection,
        lease: &Lease,
        failed: bool,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        let limit = self.options.max_outcome_bytes();
        if response.len() > limit {
            return Err(Error::TooLarge {
                what: "outcome",
                size: response.len(),
                limit,
            });
        }
        let state = if failed { "failed" } else { "completed" };
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.finish)))
            .bind(state)
            .bind(response)
            .bind(expires_at.as_millis())
            .bind(now.as_millis())
            .bind(lease.key.scope().as_bytes())
            .bind(lease.key.id().as_bytes())
            .bind(signed(lease.token)?)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        fenced(done.rows_affected())
    }

    async fn finish(
        &self,
        lease: &Lease,
        failed: bool,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        let (store, lease, response) = (self.clone(), lease.clone(), response.to_vec());
        detached(
            async move {
                let (store, lease, response) = (&store, &lease, &response);
                retry_deadlocks(|| async move {
                    let mut conn = store.pool.acquire().await.map_err(map_err)?;
                    store
                        .finish_on(&mut conn, lease, failed, response, expires_at, now)
                        .await
                })
                .await
            },
            forget,
        )
        .await
    }

    /// Releases the claim of a caller that was dropped before it saw it.
    async fn release_orphan(self, lease: Lease, now: Timestamp) {
        if let Err(e) = self.release_now(&lease, now).await {
            tracing::warn!(key = %lease.key, error = %e,
                "could not release the claim of a dropped caller; its lease will expire");
        }
    }

    async fn release_now(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        retry_deadlocks(|| async {
            let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.release)))
                .bind(now.as_millis())
                .bind(lease.key.scope().as_bytes())
                .bind(lease.key.id().as_bytes())
                .bind(signed(lease.token)?)
                .execute(&self.pool)
                .await
                .map_err(map_err)?;
            fenced(done.rows_affected())
        })
        .await
    }
}

/// A pooled connection that goes back to the pool only after [`Session::release`], which
/// is called once the connection is known to be outside any transaction. Dropped
/// otherwise (a panic, a runtime shutting down, an error that left the state unknown), it
/// is closed instead: the server then rolls back whatever it had open.
pub(crate) struct Session {
    pub(crate) conn: PoolConnection<MySql>,
    pub(crate) clean: bool,
}

impl Session {
    pub(crate) fn release(mut self) {
        self.clean = true;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.clean {
            self.conn.close_on_drop();
        }
    }
}

type Query<'q> = sqlx::query::Query<'q, sqlx::MySql, sqlx::mysql::MySqlArguments>;

/// The server error number inside a store error, if it has one.
pub(crate) fn server_error(e: &Error) -> Option<u16> {
    match e {
        Error::Store { source, .. } => source.downcast_ref::<sqlx::Error>().and_then(number),
        _ => None,
    }
}

/// Runs `attempt` again while InnoDB picks its statement as a deadlock victim, at most
/// [`CLAIM_ATTEMPTS`] times. A victim's transaction is rolled back whole, so for the
/// single-statement writes of lease mode and `purge` nothing happened and trying again is
/// safe. (`purge` locks a retention index entry and then its row; a fenced write locks the
/// row and then the index entry it moves: when both meet on one expired record, InnoDB
/// rolls one of them back.)
async fn retry_deadlocks<T, F, Fut>(mut attempt: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(e) if tries < CLAIM_ATTEMPTS && server_error(&e) == Some(DEADLOCK) => tries += 1,
            answer => return answer,
        }
    }
}

fn fenced(rows: u64) -> Result<(), Error> {
    // The connection reports rows matched (CLIENT_FOUND_ROWS), not rows changed.
    if rows == 1 {
        Ok(())
    } else {
        Err(Error::LeaseLost)
    }
}

fn signed(token: Token) -> Result<i64, Error> {
    i64::try_from(token.0).map_err(|e| Error::Encode(Box::new(e)))
}

pub(crate) fn record(key: &Key, row: &MySqlRow) -> Result<Record, Error> {
    let corrupt = |e: sqlx::Error| Error::corrupt_key(key, e);
    let get = |c: &str| row.try_get::<i64, _>(c).map_err(corrupt);
    RecordRow {
        fingerprint: row.try_get("fingerprint").map_err(corrupt)?,
        state: row.try_get("state").map_err(corrupt)?,
        token: get("token")?,
        lease_until: row.try_get("lease_until").map_err(corrupt)?,
        response: row.try_get("response").map_err(corrupt)?,
        created_at: get("created_at")?,
        updated_at: get("updated_at")?,
        expires_at: get("expires_at")?,
    }
    .into_record(key)
}

#[async_trait]
impl Store for MySqlStore {
    fn guarantees(&self) -> Guarantees {
        Guarantees::single_node_sql()
    }

    /// Claims to the end, also if the caller is dropped: then the rest of the claim runs on
    /// a task of its own, and a claim it acquired is released at once (nobody will run the
    /// operation).
    async fn begin(
        &self,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        let (store, key, fingerprint) = (self.clone(), key.clone(), fingerprint.copied());
        let releaser = self.clone();
        detached(
            async move {
                store
                    .claim(&key, fingerprint.as_ref(), deadlines, now)
                    .await
            },
            // Acquired for a caller that is gone: nobody can run under the claim.
            move |answer, runtime: &tokio::runtime::Handle| {
                if let Begin::Acquired(lease) = answer {
                    runtime.spawn(releaser.clone().release_orphan(lease, now));
                }
            },
        )
        .await
    }

    async fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.finish(lease, false, response, expires_at, now).await
    }

    async fn fail(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.finish(lease, true, response, expires_at, now).await
    }

    async fn extend(
        &self,
        lease: &Lease,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Lease, Error> {
        let (store, lease) = (self.clone(), lease.clone());
        detached(
            async move {
                let (store, lease) = (&store, &lease);
                retry_deadlocks(|| async move {
                    let done = sqlx::query(AssertSqlSafe(Arc::clone(&store.sql.extend)))
                        .bind(deadlines.lease_until.as_millis())
                        .bind(deadlines.expires_at.as_millis())
                        .bind(now.as_millis())
                        .bind(lease.key.scope().as_bytes())
                        .bind(lease.key.id().as_bytes())
                        .bind(signed(lease.token)?)
                        .execute(&store.pool)
                        .await
                        .map_err(map_err)?;
                    fenced(done.rows_affected())
                })
                .await?;
                Ok(Lease {
                    lease_until: deadlines.lease_until,
                    ..lease.clone()
                })
            },
            forget,
        )
        .await
    }

    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        let (store, lease) = (self.clone(), lease.clone());
        detached(async move { store.release_now(&lease, now).await }, forget).await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        self.read(&mut conn, &self.sql.get, key).await
    }

    /// One `DELETE` of at most `batch` records, oldest first, in a READ COMMITTED
    /// transaction: it locks only the rows it deletes, never a gap of the retention index
    /// that a concurrent claim would have to insert into.
    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        let store = self.clone();
        let statement = store
            .sql
            .purge(now.as_millis(), u64::try_from(batch).unwrap_or(u64::MAX));
        detached(
            async move {
                let (store, statement) = (&store, &statement);
                retry_deadlocks(|| async move {
                    let conn = store.pool.acquire().await.map_err(map_err)?;
                    let mut session = Session { conn, clean: false };
                    let done = sqlx::raw_sql(AssertSqlSafe(statement.clone()))
                        .execute(&mut *session.conn)
                        .await
                        // The transaction may still be open: `session` closes the connection.
                        .map_err(map_err)?;
                    session.release();
                    Ok(done.rows_affected())
                })
                .await
            },
            forget,
        )
        .await
    }

    /// In primary-key order.
    async fn list(
        &self,
        scope: Option<&str>,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Option<Vec<Record>>, Error> {
        self.list_page(scope, after, limit).await.map(Some)
    }

    async fn stats(&self) -> Result<Stats, Error> {
        let rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.stats)))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        let mut stats = Stats::default();
        for row in rows {
            let state: String = row.try_get(0).map_err(map_err)?;
            let n: i64 = row.try_get(1).map_err(map_err)?;
            stats.add(&state, u64::try_from(n).unwrap_or(0))?;
        }
        Ok(stats)
    }
}
