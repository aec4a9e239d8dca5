#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use idem_core::{
    model, settle, tx_claim, Begin, Deadlines, Error, Failure, Fingerprint, Guarantees, Key, Lease,
    Record, RecordRow, Response, RunError, Stats, Store, Timestamp, Token, TransactionalStore,
    TxClaim, TxPolicy, TxRequest, NO_WAIT_RETRY_AFTER,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{AssertSqlSafe, PgConnection, Row};

pub use sqlx;

/// The default table.
pub const DEFAULT_TABLE: &str = "idem_records";

/// How many times `begin` re-reads a key whose conflicting row its statement snapshot did
/// not show yet (a concurrent transaction committed in between).
const CLAIM_ATTEMPTS: usize = 8;

/// The operation [`PgStore`] runs in transactional mode: it receives the claim's
/// transaction (as a connection inside it) and writes business rows through it.
///
/// ```
/// use idem_core::Failure;
/// use idem_postgres::PgOperation;
/// let op: PgOperation<u64, String, idem_postgres::sqlx::Error> = Box::new(|conn| {
///     Box::pin(async move {
///         sqlx::query("INSERT INTO ledger (amount) VALUES (100)")
///             .execute(&mut *conn)
///             .await
///             .map_err(Failure::Retryable)?;
///         Ok(100)
///     })
/// });
/// ```
pub type PgOperation<T, F, E> =
    Box<dyn for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, Result<T, Failure<F, E>>> + Send>;

/// A validated, quoted table name: `table` or `schema.table`, each part a lowercase SQL
/// identifier (`[a-z_][a-z0-9_]{0,62}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    quoted: String,
    index: String,
}

impl TableName {
    /// Validates `name`; anything else is [`Error::Config`].
    ///
    /// ```
    /// use idem_postgres::TableName;
    /// assert!(TableName::new("billing.idem_records").is_ok());
    /// assert!(TableName::new("idem; DROP TABLE users").is_err());
    /// assert!(TableName::new("a.b.c").is_err());
    /// ```
    pub fn new(name: &str) -> Result<Self, Error> {
        let parts: Vec<&str> = name.split('.').collect();
        let valid = |p: &str| {
            let mut chars = p.chars();
            matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_lowercase())
                && chars.all(|c| c == '_' || c.is_ascii_lowercase() || c.is_ascii_digit())
                && p.len() <= 63
        };
        if parts.is_empty() || parts.len() > 2 || !parts.iter().all(|p| valid(p)) {
            return Err(Error::Config(format!(
                "table name {name:?} is not `table` or `schema.table` of lowercase SQL identifiers"
            )));
        }
        Ok(TableName {
            quoted: parts
                .iter()
                .map(|p| format!("\"{p}\""))
                .collect::<Vec<_>>()
                .join("."),
            index: format!("{}_expires_at", parts[parts.len() - 1]),
        })
    }

    /// The quoted name, safe to put in SQL.
    pub fn quoted(&self) -> &str {
        &self.quoted
    }
}

/// The SQL statements of one table, built once from a validated name.
#[derive(Debug)]
struct Sql {
    schema: String,
    begin: Arc<str>,
    finish: Arc<str>,
    extend: Arc<str>,
    release: Arc<str>,
    get: Arc<str>,
    purge: Arc<str>,
    stats: Arc<str>,
}

/// Released leases carry this deadline (`Timestamp::MIN`).
const RELEASED: i64 = i64::MIN;

impl Sql {
    fn new(table: &TableName) -> Self {
        let t = table.quoted();
        let fenced = format!(
            "scope = $1 AND id = $2 AND state = 'in_progress' AND token = $3 AND lease_until <> {RELEASED}"
        );
        let columns =
            "fingerprint, state, token, lease_until, response, created_at, updated_at, expires_at";
        Sql {
            schema: schema_sql(table),
            // One statement, one round trip. `existing` reads the row; the insert runs only if
            // that row could be claimed (absent, or an expired lease with agreeing
            // fingerprints), so a replay or a live lease writes nothing and commits without
            // WAL. Otherwise: insert a fresh claim, or take over an expired lease, judged again
            // on the row's latest version by ON CONFLICT.
            begin: format!(
                "WITH existing AS (
                    SELECT token, reclaimed, fingerprint, state, lease_until, response,
                           created_at, updated_at, expires_at
                      FROM {t} WHERE scope = $1 AND id = $2
                 ), claimed AS (
                    INSERT INTO {t} AS r (scope, id, fingerprint, state, token, lease_until, response,
                                         reclaimed, created_at, updated_at, expires_at)
                    SELECT $1, $2, $3, 'in_progress', 1, $4, NULL, false, $5, $5, $6
                     WHERE NOT EXISTS (
                        SELECT 1 FROM existing e
                         WHERE e.state <> 'in_progress' OR e.lease_until > $5
                            OR (e.fingerprint IS NOT NULL AND $3::bytea IS NOT NULL AND e.fingerprint <> $3))
                    ON CONFLICT (scope, id) DO UPDATE SET
                        token = r.token + 1,
                        lease_until = EXCLUDED.lease_until,
                        reclaimed = r.lease_until <> {RELEASED},
                        fingerprint = COALESCE(r.fingerprint, EXCLUDED.fingerprint),
                        updated_at = EXCLUDED.updated_at,
                        expires_at = GREATEST(r.expires_at, EXCLUDED.expires_at)
                    WHERE r.state = 'in_progress' AND r.lease_until <= $5
                      AND (r.fingerprint IS NULL OR $3::bytea IS NULL OR r.fingerprint = $3)
                    RETURNING r.token, r.reclaimed
                 )
                 SELECT true AS claimed, token, reclaimed,
                        NULL::bytea AS fingerprint, NULL::text AS state, NULL::bigint AS lease_until,
                        NULL::bytea AS response, NULL::bigint AS created_at,
                        NULL::bigint AS updated_at, NULL::bigint AS expires_at
                   FROM claimed
                 UNION ALL
                 SELECT false, token, reclaimed, fingerprint, state, lease_until, response,
                        created_at, updated_at, expires_at
                   FROM existing WHERE NOT EXISTS (SELECT 1 FROM claimed)"
            )
            .into(),
            finish: format!(
                "UPDATE {t} SET state = $4, response = $5, lease_until = NULL, expires_at = $6, updated_at = $7
                  WHERE {fenced}"
            )
            .into(),
            extend: format!(
                "UPDATE {t} SET lease_until = $4, expires_at = GREATEST(expires_at, $5), updated_at = $6
                  WHERE {fenced}"
            )
            .into(),
            release: format!(
                "UPDATE {t} SET lease_until = {RELEASED}, updated_at = $4 WHERE {fenced}"
            )
            .into(),
            get: format!("SELECT {columns} FROM {t} WHERE scope = $1 AND id = $2").into(),
            // Small batches of rows nobody holds: never a long lock.
            purge: format!(
                "DELETE FROM {t} WHERE (scope, id) IN (
                    SELECT scope, id FROM {t} WHERE expires_at <= $1
                     LIMIT $2 FOR UPDATE SKIP LOCKED)"
            )
            .into(),
            stats: format!("SELECT state, COUNT(*) FROM {t} GROUP BY state").into(),
        }
    }
}

/// The schema for `table`, as [`PgStore::migrate`] runs it. Teams that migrate by hand can
/// print it with `PgStore::schema_sql`.
fn schema_sql(table: &TableName) -> String {
    let t = table.quoted();
    let index = &table.index;
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (
    scope       TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    fingerprint BYTEA,
    state       TEXT    NOT NULL,
    token       BIGINT  NOT NULL,
    lease_until BIGINT,
    response    BYTEA,
    reclaimed   BOOLEAN NOT NULL DEFAULT false,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    expires_at  BIGINT  NOT NULL,
    PRIMARY KEY (scope, id)
);
CREATE INDEX IF NOT EXISTS \"{index}\" ON {t} (expires_at);
"
    )
}

/// A strict, durable, transactional idempotency store in a PostgreSQL table.
///
/// `begin` is one statement and one round trip on every path (fresh claim, reclaim,
/// replay); `complete`, `fail`, `extend` and `release` are one fenced `UPDATE` each.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    sql: Arc<Sql>,
}

impl PgStore {
    /// A store on `pool` using the table [`DEFAULT_TABLE`]. Call [`PgStore::migrate`]
    /// once (or create the table by hand) before use.
    pub fn new(pool: PgPool) -> Self {
        let table = TableName::new(DEFAULT_TABLE).unwrap_or_else(|_| unreachable!("valid default"));
        Self::build(pool, &table)
    }

    /// A store on `pool` using `table` (`table` or `schema.table`, validated).
    pub fn with_table(pool: PgPool, table: &str) -> Result<Self, Error> {
        Ok(Self::build(pool, &TableName::new(table)?))
    }

    fn build(pool: PgPool, table: &TableName) -> Self {
        PgStore {
            pool,
            sql: Arc::new(Sql::new(table)),
        }
    }

    /// Connects a pool to `url` and returns a migrated store on the default table.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let pool = PgPool::connect(url).await.map_err(db_err)?;
        let store = Self::new(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// Creates the table and its index if they do not exist.
    pub async fn migrate(&self) -> Result<(), Error> {
        sqlx::raw_sql(AssertSqlSafe(self.sql.schema.clone()))
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(())
    }

    /// The DDL [`PgStore::migrate`] runs, for teams that migrate by hand.
    pub fn schema_sql(&self) -> &str {
        &self.sql.schema
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn claim(
        &self,
        conn: &mut PgConnection,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        for _ in 0..CLAIM_ATTEMPTS {
            let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.begin)))
                .bind(key.scope())
                .bind(key.id())
                .bind(fingerprint.map(|f| f.as_bytes().as_slice()))
                .bind(deadlines.lease_until.as_millis())
                .bind(now.as_millis())
                .bind(deadlines.expires_at.as_millis())
                .fetch_optional(&mut *conn)
                .await
                .map_err(db_err)?;
            let Some(row) = row else {
                // The insert conflicted with a row this statement's snapshot predates.
                continue;
            };
            if row.try_get::<bool, _>("claimed").map_err(db_err)? {
                return Ok(Begin::Acquired(Lease {
                    key: key.clone(),
                    token: token(row.try_get("token").map_err(db_err)?)?,
                    lease_until: deadlines.lease_until,
                    reclaimed: row.try_get("reclaimed").map_err(db_err)?,
                }));
            }
            let existing = record(key, &row)?;
            match model::begin(Some(&existing), key, fingerprint, deadlines, now).0 {
                // The snapshot shows a row the insert could have taken over, but the latest
                // version (which the insert saw) could not be: read again.
                Begin::Acquired(_) => continue,
                answer => return Ok(answer),
            }
        }
        Err(Error::retryable(format!(
            "claim of {key} kept conflicting with concurrent writers ({CLAIM_ATTEMPTS} attempts)"
        )))
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish_on(
        &self,
        conn: &mut PgConnection,
        lease: &Lease,
        failed: bool,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        let state = if failed { "failed" } else { "completed" };
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.finish)))
            .bind(lease.key.scope())
            .bind(lease.key.id())
            .bind(signed(lease.token)?)
            .bind(state)
            .bind(response)
            .bind(expires_at.as_millis())
            .bind(now.as_millis())
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
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
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        self.finish_on(&mut conn, lease, failed, response, expires_at, now)
            .await
    }
}

fn fenced(rows: u64) -> Result<(), Error> {
    if rows == 1 {
        Ok(())
    } else {
        Err(Error::LeaseLost)
    }
}

fn token(raw: i64) -> Result<Token, Error> {
    u64::try_from(raw)
        .map(Token)
        .map_err(|e| Error::Corrupt(Box::new(e)))
}

fn signed(token: Token) -> Result<i64, Error> {
    i64::try_from(token.0).map_err(|e| Error::Encode(Box::new(e)))
}

fn record(key: &Key, row: &PgRow) -> Result<Record, Error> {
    let get = |c: &str| row.try_get::<i64, _>(c).map_err(db_err);
    RecordRow {
        fingerprint: row.try_get("fingerprint").map_err(db_err)?,
        state: row.try_get("state").map_err(db_err)?,
        token: get("token")?,
        lease_until: row.try_get("lease_until").map_err(db_err)?,
        response: row.try_get("response").map_err(db_err)?,
        created_at: get("created_at")?,
        updated_at: get("updated_at")?,
        expires_at: get("expires_at")?,
    }
    .into_record(key)
}

/// Maps a sqlx error to a store error: connection loss, timeouts, serialization failures,
/// deadlocks and lock timeouts are retryable; a closed pool or a schema problem is not.
pub fn db_err(e: sqlx::Error) -> Error {
    let retryable = match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            // 40001 serialization, 40P01 deadlock, 55P03 lock timeout, 57P01..03 shutdown and
            // terminated backends, 08xxx connection exceptions, 53300 too many connections.
            matches!(
                &*c,
                "40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03" | "53300"
            ) || c.starts_with("08")
        }),
        _ => false,
    };
    Error::Store {
        retryable,
        source: Box::new(e),
    }
}

fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("55P03"))
}

#[async_trait]
impl Store for PgStore {
    fn guarantees(&self) -> Guarantees {
        Guarantees::single_node_sql()
    }

    async fn begin(
        &self,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        let mut conn = self.pool.acquire().await.map_err(db_err)?;
        self.claim(&mut conn, key, fingerprint, deadlines, now)
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
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.extend)))
            .bind(lease.key.scope())
            .bind(lease.key.id())
            .bind(signed(lease.token)?)
            .bind(deadlines.lease_until.as_millis())
            .bind(deadlines.expires_at.as_millis())
            .bind(now.as_millis())
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        fenced(done.rows_affected())?;
        Ok(Lease {
            lease_until: deadlines.lease_until,
            ..lease.clone()
        })
    }

    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.release)))
            .bind(lease.key.scope())
            .bind(lease.key.id())
            .bind(signed(lease.token)?)
            .bind(now.as_millis())
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        fenced(done.rows_affected())
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.get)))
            .bind(key.scope())
            .bind(key.id())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_err)?;
        row.map(|r| record(key, &r)).transpose()
    }

    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.purge)))
            .bind(now.as_millis())
            .bind(i64::try_from(batch).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
        Ok(done.rows_affected())
    }

    async fn stats(&self) -> Result<Stats, Error> {
        let rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.stats)))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
        let mut stats = Stats::default();
        for row in rows {
            let state: String = row.try_get(0).map_err(db_err)?;
            let n: i64 = row.try_get(1).map_err(db_err)?;
            stats.add(&state, n.max(0) as u64)?;
        }
        Ok(stats)
    }
}

impl TransactionalStore for PgStore {
    type Operation<T, F, E> = PgOperation<T, F, E>;

    /// Claim, business writes and outcome in one PostgreSQL transaction.
    ///
    /// A concurrent duplicate's claim `INSERT` conflicts with the first one's uncommitted
    /// row. With [`TxPolicy::Wait`] it blocks until the first commits, then replays (or
    /// executes, if the first rolled back). With [`TxPolicy::NoWait`] the claim runs under
    /// `SET LOCAL lock_timeout = '1ms'`, so it gives up on that row lock at once and answers
    /// `InProgress`; the timeout is reset before the operation runs, so the operation's own
    /// writes wait normally. (A lock timeout was chosen over advisory locks: it waits on
    /// exactly the conflicting row, with no hash collisions and no second lock namespace
    /// that every writer would have to honour.)
    ///
    /// A permanent failure rolls the whole transaction back and records `Failed` in a second
    /// one, claiming the key again first; that keeps a savepoint off the common path. If a
    /// duplicate finished the key in between, its outcome is the key's one outcome and is
    /// returned instead.
    async fn transact<T, F, E>(
        &self,
        request: TxRequest<'_>,
        op: PgOperation<T, F, E>,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
    {
        let (mut tx, mut lease) = match self.open_claim(&request).await? {
            Claimed::Acquired(tx, lease) => (tx, lease),
            Claimed::Answered(response) => return Ok(response),
        };
        let settled = settle(op(&mut tx).await)?;
        if settled.failed {
            tx.rollback().await.map_err(db_err)?;
            (tx, lease) = match self.open_claim(&request).await? {
                Claimed::Acquired(tx, lease) => (tx, lease),
                Claimed::Answered(response) => return Ok(response),
            };
        }
        self.finish_on(
            &mut tx,
            &lease,
            settled.failed,
            &settled.bytes,
            request.expires_at,
            request.now,
        )
        .await?;
        // If the connection drops here the commit's fate is unknown: the retryable error
        // sends the client back, and its retry replays or executes, never both.
        tx.commit().await.map_err(db_err)?;
        Ok(settled.into_response())
    }
}

/// A transaction that holds a fresh claim, or the answer that ends the request.
enum Claimed<T, F> {
    Acquired(sqlx::Transaction<'static, sqlx::Postgres>, Lease),
    Answered(Response<T, F>),
}

impl PgStore {
    /// Opens a transaction and claims the request's key in it (transactional mode).
    async fn open_claim<T, F, E>(
        &self,
        request: &TxRequest<'_>,
    ) -> Result<Claimed<T, F>, RunError<E>>
    where
        T: DeserializeOwned,
        F: DeserializeOwned,
    {
        let no_wait = request.policy == TxPolicy::NoWait;
        let mut tx = if no_wait {
            self.pool
                .begin_with("BEGIN; SET LOCAL lock_timeout = '1ms'")
                .await
        } else {
            self.pool.begin().await
        }
        .map_err(db_err)?;
        let claimed = self
            .claim(
                &mut tx,
                request.key,
                request.fingerprint.as_ref(),
                request.deadlines,
                request.now,
            )
            .await;
        match claimed.map(|answer| tx_claim(answer, request.now)) {
            Ok(Ok(TxClaim::Acquired(lease))) => {
                if no_wait {
                    sqlx::raw_sql("SET LOCAL lock_timeout TO DEFAULT")
                        .execute(&mut *tx)
                        .await
                        .map_err(db_err)?;
                }
                Ok(Claimed::Acquired(tx, lease))
            }
            Ok(Ok(TxClaim::Replay(response))) => Ok(Claimed::Answered(response)),
            Ok(Err(refused)) => Err(refused.into()),
            Err(Error::Store { source, .. })
                if no_wait
                    && source
                        .downcast_ref::<sqlx::Error>()
                        .is_some_and(is_lock_timeout) =>
            {
                Err(Error::InProgress {
                    retry_after: NO_WAIT_RETRY_AFTER,
                }
                .into())
            }
            Err(e) => Err(e.into()),
        }
    }
}
