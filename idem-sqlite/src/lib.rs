#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use idem_core::{
    model, settle, tx_claim, Begin, Deadlines, Error, Failure, Fingerprint, Guarantees, Key, Lease,
    Record, RecordRow, Response, RunError, Stats, Store, Timestamp, TransactionalStore, TxClaim,
    TxPolicy, TxRequest, NO_WAIT_RETRY_AFTER,
};
pub use rusqlite;

use rusqlite::{
    params, Connection, ErrorCode, OptionalExtension, Transaction, TransactionBehavior,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The schema version this crate writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 1;

/// The schema, applied on open when the database is new.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS idem_records (
    scope       TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    fingerprint BLOB,
    state       TEXT    NOT NULL,
    token       INTEGER NOT NULL,
    lease_until INTEGER,
    response    BLOB,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (scope, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idem_records_expires_at ON idem_records (expires_at);
";

/// Options for [`SqliteStore::open_with`].
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// How long a writer waits for another connection's write lock before the call fails
    /// with a retryable store error. Default 5 s.
    pub busy_timeout: Duration,
    /// How many connections this store keeps open. Default 4.
    pub max_connections: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(5),
            max_connections: 4,
        }
    }
}

/// The operation [`SqliteStore`] runs in transactional mode: a closure that writes business
/// rows through the claim's transaction. It runs on a blocking thread.
pub type SqliteOperation<T, F, E> =
    Box<dyn FnOnce(&Transaction<'_>) -> Result<T, Failure<F, E>> + Send>;

/// A strict, durable, transactional idempotency store in one SQLite file.
///
/// Every operation is one `BEGIN IMMEDIATE` transaction that reads the record, applies
/// [`idem_core::model`] and writes the result, so claims are atomic across threads and
/// across processes sharing the file (WAL mode, busy timeout). Calls run on tokio's
/// blocking pool and never block a worker thread.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    options: SqliteOptions,
    idle: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("options", &self.inner.options)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` with default options, and creates
    /// or checks the schema.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// Opens the database at `path` with `options`.
    ///
    /// A database written by a newer schema version is [`Error::UnknownFormat`].
    pub async fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, Error> {
        if options.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        let store = SqliteStore {
            inner: Arc::new(Inner {
                path: path.as_ref().to_path_buf(),
                options,
                idle: Mutex::new(Vec::new()),
            }),
        };
        store.with_conn(migrate).await?;
        Ok(store)
    }

    /// Runs `f` with one of the store's connections on the blocking pool: for creating
    /// business tables and reading them outside the barrier.
    pub async fn with_connection<R, G>(&self, f: G) -> Result<R, Error>
    where
        R: Send + 'static,
        G: FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        self.with_conn(move |conn| f(conn).map_err(db_err)).await
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` with a connection on the blocking pool.
    async fn with_conn<R, G>(&self, f: G) -> Result<R, Error>
    where
        R: Send + 'static,
        G: FnOnce(&mut Connection) -> Result<R, Error> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let joined = tokio::task::spawn_blocking(move || {
            let mut conn = match inner.take() {
                Some(conn) => conn,
                None => inner.connect()?,
            };
            let result = f(&mut conn);
            inner.put(conn);
            result
        })
        .await;
        match joined {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Error::retryable(e)),
        }
    }

    /// Runs `f` inside one `BEGIN IMMEDIATE` transaction and commits it.
    async fn write<R, G>(&self, f: G) -> Result<R, Error>
    where
        R: Send + 'static,
        G: FnOnce(&Transaction<'_>) -> Result<R, Error> + Send + 'static,
    {
        self.with_conn(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let r = f(&tx)?;
            tx.commit().map_err(db_err)?;
            Ok(r)
        })
        .await
    }

    async fn finish(
        &self,
        lease: &Lease,
        failed: bool,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        let lease = lease.clone();
        let response = response.to_vec();
        self.write(move |tx| {
            let rec = read(tx, &lease.key)?;
            let next = model::finish(rec.as_ref(), &lease, failed, &response, expires_at, now)?;
            upsert(tx, &next)
        })
        .await
    }
}

impl Inner {
    fn take(&self) -> Option<Connection> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.options.max_connections {
            idle.push(conn);
        }
    }

    fn connect(&self) -> Result<Connection, Error> {
        let conn = Connection::open(&self.path).map_err(db_err)?;
        conn.busy_timeout(self.options.busy_timeout)
            .map_err(db_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_err)?;
        Ok(conn)
    }
}

fn migrate(conn: &mut Connection) -> Result<(), Error> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db_err)?;
    if version > SCHEMA_VERSION {
        return Err(Error::UnknownFormat {
            format: format!("SQLite schema version {version} (this build knows {SCHEMA_VERSION})"),
        });
    }
    tx.execute_batch(SCHEMA).map_err(db_err)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(db_err)?;
    tx.commit().map_err(db_err)
}

/// Maps a SQLite error: lock contention is retryable, everything else is not.
fn db_err(e: rusqlite::Error) -> Error {
    let retryable = matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    );
    Error::Store {
        retryable,
        source: Box::new(e),
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy)
}

const SELECT: &str =
    "SELECT fingerprint, state, token, lease_until, response, created_at, updated_at, expires_at
     FROM idem_records WHERE scope = ?1 AND id = ?2";

fn read(tx: &Connection, key: &Key) -> Result<Option<Record>, Error> {
    tx.query_row(SELECT, params![key.scope(), key.id()], |r| {
        Ok(RecordRow {
            fingerprint: r.get(0)?,
            state: r.get(1)?,
            token: r.get(2)?,
            lease_until: r.get(3)?,
            response: r.get(4)?,
            created_at: r.get(5)?,
            updated_at: r.get(6)?,
            expires_at: r.get(7)?,
        })
    })
    .optional()
    .map_err(db_err)?
    .map(|row| row.into_record(key))
    .transpose()
}

fn upsert(tx: &Connection, rec: &Record) -> Result<(), Error> {
    let row = RecordRow::from_record(rec)?;
    tx.execute(
        "INSERT INTO idem_records (scope, id, fingerprint, state, token, lease_until, response,
                                   created_at, updated_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (scope, id) DO UPDATE SET
            fingerprint = excluded.fingerprint, state = excluded.state, token = excluded.token,
            lease_until = excluded.lease_until, response = excluded.response,
            updated_at = excluded.updated_at, expires_at = excluded.expires_at",
        params![
            rec.key.scope(),
            rec.key.id(),
            row.fingerprint,
            row.state,
            row.token,
            row.lease_until,
            row.response,
            row.created_at,
            row.updated_at,
            row.expires_at,
        ],
    )
    .map_err(db_err)?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
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
        let key = key.clone();
        let fingerprint = fingerprint.copied();
        self.write(move |tx| {
            let rec = read(tx, &key)?;
            let (answer, next) =
                model::begin(rec.as_ref(), &key, fingerprint.as_ref(), deadlines, now);
            if let Some(next) = next {
                upsert(tx, &next)?;
            }
            Ok(answer)
        })
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
        let lease = lease.clone();
        self.write(move |tx| {
            let rec = read(tx, &lease.key)?;
            let (lease, next) = model::extend(rec.as_ref(), &lease, deadlines, now)?;
            upsert(tx, &next)?;
            Ok(lease)
        })
        .await
    }

    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        let lease = lease.clone();
        self.write(move |tx| {
            let rec = read(tx, &lease.key)?;
            upsert(tx, &model::release(rec.as_ref(), &lease, now)?)
        })
        .await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
        let key = key.clone();
        self.with_conn(move |conn| read(conn, &key)).await
    }

    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        let batch = i64::try_from(batch).unwrap_or(i64::MAX);
        self.write(move |tx| {
            let n = tx
                .execute(
                    "DELETE FROM idem_records WHERE (scope, id) IN
                        (SELECT scope, id FROM idem_records WHERE expires_at <= ?1 LIMIT ?2)",
                    params![now.as_millis(), batch],
                )
                .map_err(db_err)?;
            Ok(n as u64)
        })
        .await
    }

    async fn stats(&self) -> Result<Stats, Error> {
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT state, COUNT(*) FROM idem_records GROUP BY state")
                .map_err(db_err)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(db_err)?;
            let mut stats = Stats::default();
            for row in rows {
                let (state, n) = row.map_err(db_err)?;
                stats.add(&state, n.max(0) as u64)?;
            }
            Ok(stats)
        })
        .await
    }
}

impl TransactionalStore for SqliteStore {
    type Operation<T, F, E> = SqliteOperation<T, F, E>;

    /// Runs the operation in the claim's `BEGIN IMMEDIATE` transaction.
    ///
    /// SQLite has one writer at a time, so a concurrent duplicate cannot see the first
    /// one's claim: with [`TxPolicy::Wait`] it waits on the write lock (up to the busy
    /// timeout) and then replays; with [`TxPolicy::NoWait`] a held write lock, which may be
    /// another key's, answers `InProgress` at once. The transaction runs on a blocking
    /// thread: once started it finishes (and stores its outcome) even if the caller stops
    /// waiting; a crash of the process rolls it back.
    async fn transact<T, F, E>(
        &self,
        request: TxRequest<'_>,
        op: SqliteOperation<T, F, E>,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
    {
        let key = request.key.clone();
        let busy_timeout = self.inner.options.busy_timeout;
        let TxRequest {
            fingerprint,
            deadlines,
            expires_at,
            now,
            policy,
            ..
        } = request;
        let result = self
            .with_conn(move |conn| {
                if policy == TxPolicy::NoWait {
                    conn.busy_timeout(Duration::ZERO).map_err(db_err)?;
                }
                let no_wait = policy == TxPolicy::NoWait;
                let tx = match Transaction::new_unchecked(conn, TransactionBehavior::Immediate) {
                    Ok(tx) => tx,
                    Err(e) => {
                        if no_wait {
                            conn.busy_timeout(busy_timeout).map_err(db_err)?;
                            if is_busy(&e) {
                                return Ok(Err(RunError::Barrier(Error::InProgress {
                                    retry_after: NO_WAIT_RETRY_AFTER,
                                })));
                            }
                        }
                        return Err(db_err(e));
                    }
                };
                if no_wait {
                    tx.busy_timeout(busy_timeout).map_err(db_err)?;
                }
                Ok(
                    run_in_tx(&tx, &key, fingerprint, deadlines, expires_at, now, op).and_then(
                        |response| {
                            tx.commit().map_err(db_err)?;
                            Ok(response)
                        },
                    ),
                )
            })
            .await;
        result.map_err(RunError::Barrier).and_then(|r| r)
    }
}

/// The transactional-mode steps inside an open transaction; any `Err` rolls it back.
fn run_in_tx<T, F, E>(
    tx: &Transaction<'_>,
    key: &Key,
    fingerprint: Option<Fingerprint>,
    deadlines: Deadlines,
    expires_at: Timestamp,
    now: Timestamp,
    op: SqliteOperation<T, F, E>,
) -> Result<Response<T, F>, RunError<E>>
where
    T: Serialize + DeserializeOwned,
    F: Serialize + DeserializeOwned,
{
    let rec = read(tx, key)?;
    let (answer, claimed) = model::begin(rec.as_ref(), key, fingerprint.as_ref(), deadlines, now);
    let lease = match tx_claim(answer, now)? {
        TxClaim::Acquired(lease) => lease,
        TxClaim::Replay(response) => return Ok(response),
    };
    tx.execute_batch("SAVEPOINT idem_operation")
        .map_err(db_err)?;
    let settled = settle(op(tx))?;
    let undo = if settled.failed {
        "ROLLBACK TO idem_operation; "
    } else {
        ""
    };
    tx.execute_batch(&format!("{undo}RELEASE idem_operation"))
        .map_err(db_err)?;
    let done = model::finish(
        claimed.as_ref(),
        &lease,
        settled.failed,
        &settled.bytes,
        expires_at,
        now,
    )?;
    upsert(tx, &done)?;
    Ok(settled.into_response())
}
