//! [`SqliteStore`]: constructors, migration, and the lease-mode [`Store`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use idem_core::backend::{model, RecordRow};
use idem_core::{
    Begin, Deadlines, Error, Fingerprint, Guarantees, Key, Lease, Record, Stats, Store, Timestamp,
};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use crate::error::map_err;
use crate::options::SqliteOptions;
use idem_core::backend::detach::forget;

use crate::pool::{Gate, Pool};
use crate::sql::{Sql, SCHEMA_VERSION};

/// A strict, durable, transactional idempotency store in a table of one SQLite file.
///
/// Every write is one `BEGIN IMMEDIATE` transaction that reads the record, applies
/// [`idem_core::backend::model`] and writes the result, so claims are atomic across threads and
/// across processes sharing the file (WAL mode, busy timeout). Calls run on tokio's blocking
/// pool and never block a worker thread; each runs to its end even if its caller's future is
/// dropped (see the crate docs on cancellation).
#[derive(Clone)]
pub struct SqliteStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) sql: Sql,
    pub(crate) options: SqliteOptions,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` with [`SqliteOptions::default`] and
    /// migrates the table ([`SqliteStore::migrate`]).
    ///
    /// `path` is a file path, a `file:` URI (`file:idem.db?mode=ro` opens it read-only), or
    /// `:memory:` for an in-memory database of this store's own.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::connect_with(path, SqliteOptions::default()).await
    }

    /// Opens the database at `path` with `options` (table, busy timeout, pool size,
    /// durability) and migrates the table ([`SqliteStore::migrate`]). Bad options are
    /// [`Error::Config`]; a table written by a newer schema version is
    /// [`Error::UnknownFormat`].
    pub async fn connect_with(
        path: impl AsRef<Path>,
        options: SqliteOptions,
    ) -> Result<Self, Error> {
        let store = Self::open_with(path, options).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Opens the database at `path` with `options` like [`SqliteStore::connect_with`], but
    /// runs no DDL: for tools that must not create anything (call
    /// [`SqliteStore::migrate`] before writing). SQLite still creates a missing file, so a
    /// caller that must not create one checks for it first, or passes a `file:` URI with
    /// `mode=rw`.
    pub async fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, Error> {
        options.validate()?;
        let path = path.as_ref().to_path_buf();
        let pool = Pool::open(&path, &options).await?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                pool,
                sql: Sql::new(options.table()),
                options,
                path,
            }),
        })
    }

    /// Creates the table, its index and its schema-version row if they do not exist.
    ///
    /// Idempotent, and safe when many tasks and processes run it at once: when the schema is
    /// complete it only reads (so a read-only database can be opened); otherwise the DDL
    /// runs in one `BEGIN IMMEDIATE` transaction, one migration at a time. A table recorded
    /// with a newer schema version than [`SCHEMA_VERSION`](crate::SCHEMA_VERSION) is
    /// [`Error::UnknownFormat`]. The version is kept in the table `idem_schema_versions`,
    /// one row per idem table, never in `PRAGMA user_version`, which the application's own
    /// migrations may use.
    pub async fn migrate(&self) -> Result<(), Error> {
        let inner = Arc::clone(&self.inner);
        self.inner
            .pool
            .run(Gate::Write, move |conn| migrate(conn, &inner.sql), forget)
            .await
    }

    /// The DDL [`SqliteStore::migrate`] runs, for teams that migrate by hand.
    pub fn schema_sql(&self) -> &str {
        &self.inner.sql.schema
    }

    /// Runs `f` with one of the store's connections on the blocking pool: for creating
    /// business tables and reading them outside the barrier. A connection that `f` leaves
    /// inside a transaction is closed (rolling it back), not reused.
    pub async fn with_connection<R, G>(&self, f: G) -> Result<R, Error>
    where
        R: Send + 'static,
        G: FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        self.inner
            .pool
            .run(Gate::Read, move |conn| f(conn).map_err(map_err), forget)
            .await
    }

    /// The database path, as given.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &SqliteOptions {
        &self.inner.options
    }

    /// The table.
    pub fn table(&self) -> &str {
        self.inner.options.table()
    }

    /// Runs `f` inside one `BEGIN IMMEDIATE` transaction and commits it; `orphan` receives
    /// the output if the caller is gone.
    async fn write<R, G, O>(&self, f: G, orphan: O) -> Result<R, Error>
    where
        R: Send + 'static,
        G: FnOnce(&Transaction<'_>, &Sql) -> Result<R, Error> + Send + 'static,
        O: Fn(R, &tokio::runtime::Handle) + Clone + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        self.inner
            .pool
            .run(
                Gate::Write,
                move |conn| {
                    let tx = conn
                        .transaction_with_behavior(TransactionBehavior::Immediate)
                        .map_err(map_err)?;
                    let r = f(&tx, &inner.sql)?;
                    tx.commit().map_err(map_err)?;
                    Ok(r)
                },
                orphan,
            )
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
        self.write(
            move |tx, sql| {
                let rec = read(tx, sql, &lease.key)?;
                let next = model::finish(rec.as_ref(), &lease, failed, &response, expires_at, now)?;
                upsert(tx, sql, &next)
            },
            forget,
        )
        .await
    }
}

/// The schema's state, then (if incomplete) the DDL under the write lock.
fn migrate(conn: &mut Connection, sql: &Sql) -> Result<(), Error> {
    let complete = |conn: &Connection| -> Result<bool, Error> {
        let objects: i64 = conn
            .query_row(&sql.exists, [], |r| r.get(0))
            .map_err(map_err)?;
        if objects < 3 {
            return Ok(false);
        }
        let version: Option<i64> = conn
            .query_row(&sql.version, [], |r| r.get(0))
            .optional()
            .map_err(map_err)?;
        check_version(sql, version)?;
        Ok(version == Some(SCHEMA_VERSION))
    };
    if complete(conn)? {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(map_err)?;
    tx.execute_batch(&sql.schema).map_err(map_err)?;
    if !complete(&tx)? {
        return Err(Error::Config(format!(
            "the SQLite schema of table {} is incomplete after migrating",
            sql.table
        )));
    }
    tx.commit().map_err(map_err)
}

fn check_version(sql: &Sql, version: Option<i64>) -> Result<(), Error> {
    match version {
        Some(v) if v > SCHEMA_VERSION => Err(Error::UnknownFormat {
            format: format!(
                "SQLite schema version {v} of table {} (this build knows {SCHEMA_VERSION})",
                sql.table
            ),
        }),
        _ => Ok(()),
    }
}

/// Reads `key`'s record; columns that do not decode are [`Error::Corrupt`] naming the key.
pub(crate) fn read(conn: &Connection, sql: &Sql, key: &Key) -> Result<Option<Record>, Error> {
    let mut stmt = conn.prepare_cached(&sql.select).map_err(map_err)?;
    let row = stmt
        .query_row(params![key.scope(), key.id()], |r| Ok(columns(r, 0)))
        .optional()
        .map_err(map_err)?;
    match row {
        None => Ok(None),
        Some(Err(e)) => Err(Error::corrupt_key(key, e)),
        Some(Ok(row)) => row.into_record(key).map(Some),
    }
}

/// The record columns of a row, `fingerprint` at index `first` and the others after it in
/// the table's order.
pub(crate) fn columns(r: &Row<'_>, first: usize) -> rusqlite::Result<RecordRow> {
    Ok(RecordRow {
        fingerprint: r.get(first)?,
        state: r.get(first + 1)?,
        token: r.get(first + 2)?,
        lease_until: r.get(first + 3)?,
        response: r.get(first + 4)?,
        created_at: r.get(first + 5)?,
        updated_at: r.get(first + 6)?,
        expires_at: r.get(first + 7)?,
    })
}

/// Writes `rec` whole (insert or replace).
pub(crate) fn upsert(conn: &Connection, sql: &Sql, rec: &Record) -> Result<(), Error> {
    let row = RecordRow::from_record(rec)?;
    conn.prepare_cached(&sql.upsert)
        .and_then(|mut stmt| {
            stmt.execute(params![
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
            ])
        })
        .map_err(map_err)?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    /// Strict, transactional and shared across processes; durable unless opened with
    /// [`Synchronous::Normal`](crate::Synchronous::Normal). An in-memory store (`:memory:`)
    /// is neither durable nor shared.
    fn guarantees(&self) -> Guarantees {
        let mut guarantees = Guarantees::single_node_sql();
        if self.inner.pool.is_memory() {
            guarantees.durable = false;
            guarantees.shared_across_processes = false;
        }
        guarantees.durable &= self.inner.options.synchronous.durable();
        guarantees
    }

    /// Claims in one `BEGIN IMMEDIATE` transaction. If the caller's future is dropped and
    /// the claim acquired the key, nobody received the lease: the claim is released at once.
    async fn begin(
        &self,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        let key = key.clone();
        let fingerprint = fingerprint.copied();
        let store = self.clone();
        let release_unreceived = move |answer: Begin, runtime: &tokio::runtime::Handle| {
            if let Begin::Acquired(lease) = answer {
                let store = store.clone();
                // Best effort: if it fails, the lease ends at its deadline.
                runtime.spawn(async move { store.release(&lease, now).await });
            }
        };
        self.write(
            move |tx, sql| {
                let rec = read(tx, sql, &key)?;
                let (answer, next) =
                    model::begin(rec.as_ref(), &key, fingerprint.as_ref(), deadlines, now);
                if let Some(next) = next {
                    upsert(tx, sql, &next)?;
                }
                Ok(answer)
            },
            release_unreceived,
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
        let lease = lease.clone();
        self.write(
            move |tx, sql| {
                let rec = read(tx, sql, &lease.key)?;
                let (lease, next) = model::extend(rec.as_ref(), &lease, deadlines, now)?;
                upsert(tx, sql, &next)?;
                Ok(lease)
            },
            forget,
        )
        .await
    }

    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        let lease = lease.clone();
        self.write(
            move |tx, sql| {
                let rec = read(tx, sql, &lease.key)?;
                upsert(tx, sql, &model::release(rec.as_ref(), &lease, now)?)
            },
            forget,
        )
        .await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
        let key = key.clone();
        let inner = Arc::clone(&self.inner);
        self.inner
            .pool
            .run(Gate::Read, move |conn| read(conn, &inner.sql, &key), forget)
            .await
    }

    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        let batch = i64::try_from(batch).unwrap_or(i64::MAX);
        self.write(
            move |tx, sql| {
                let n = tx
                    .prepare_cached(&sql.purge)
                    .and_then(|mut stmt| stmt.execute(params![now.as_millis(), batch]))
                    .map_err(map_err)?;
                Ok(n as u64)
            },
            forget,
        )
        .await
    }

    /// In key order (bytewise), along the primary key.
    async fn list(
        &self,
        scope: Option<&str>,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Option<Vec<Record>>, Error> {
        let (scope, after) = (scope.map(str::to_string), after.cloned());
        let inner = Arc::clone(&self.inner);
        self.inner
            .pool
            .run(
                Gate::Read,
                move |conn| {
                    crate::list::page(conn, &inner.sql, scope.as_deref(), after.as_ref(), limit)
                },
                forget,
            )
            .await
            .map(Some)
    }

    async fn stats(&self) -> Result<Stats, Error> {
        let inner = Arc::clone(&self.inner);
        self.inner
            .pool
            .run(
                Gate::Read,
                move |conn| {
                    let mut stmt = conn.prepare_cached(&inner.sql.stats).map_err(map_err)?;
                    let rows = stmt
                        .query_map([], |r| Ok((r.get::<_, String>(0), r.get::<_, i64>(1)?)))
                        .map_err(map_err)?;
                    let mut stats = Stats::default();
                    for row in rows {
                        let (state, n) = row.map_err(map_err)?;
                        let state = state.map_err(Error::corrupt)?;
                        stats.add(&state, n.max(0) as u64)?;
                    }
                    Ok(stats)
                },
                forget,
            )
            .await
    }
}
