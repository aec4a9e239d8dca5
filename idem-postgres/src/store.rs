//! [`PgStore`]: constructors, migration, and the lease-mode [`Store`].

use std::sync::Arc;

use async_trait::async_trait;
use idem_core::backend::{model, RecordRow};
use idem_core::{
    Begin, Deadlines, Error, Fingerprint, Guarantees, Key, Lease, Record, Stats, Store, Timestamp,
    Token,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgRow};
use sqlx::{AssertSqlSafe, PgConnection, Row};
use tokio::runtime::Handle;

use crate::error::map_err;
use crate::options::{PgOptions, TableName};
use crate::sql::Sql;
use idem_core::backend::detach::{detached, forget};

/// How many times `begin`'s second statement re-reads a key whose conflicting row its
/// statement snapshot did not show yet (a concurrent transaction committed in between).
const CLAIM_ATTEMPTS: usize = 8;

/// A strict, durable, transactional idempotency store in a PostgreSQL table.
///
/// `begin` is one statement and one round trip for a fresh claim, a replay, a mismatch and a
/// live lease (a primary-key read of the row that, when there is no row, calls the table's
/// claim function: a plain `INSERT … ON CONFLICT DO NOTHING`); taking over an expired or
/// released lease takes a second statement that does it atomically. `complete`, `fail`,
/// `extend` and `release` are one fenced `UPDATE` each. Every call runs to its end, also
/// when its caller is dropped (see the crate docs on cancellation).
#[derive(Clone, Debug)]
pub struct PgStore {
    pub(crate) pool: PgPool,
    /// The statements and the table they are for: cloning a store is two `Arc` bumps.
    pub(crate) sql: Arc<Sql>,
}

impl PgStore {
    /// Connects a pool to `url` with [`PgOptions::default`] and migrates the table.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, PgOptions::default()).await
    }

    /// Connects a pool to `url` with `options` (table, session timeouts, pool size) and
    /// migrates the table ([`PgStore::migrate`]).
    pub async fn connect_with(url: &str, options: PgOptions) -> Result<Self, Error> {
        let connect: PgConnectOptions = url.parse().map_err(map_err)?;
        let pool = options
            .pool_options()
            .connect_with(options.connect_options(connect)?)
            .await
            .map_err(map_err)?;
        let store = Self::build(pool, &options);
        store.migrate().await?;
        Ok(store)
    }

    /// A store on `pool`, used as it is: `options` may choose the table, but timeouts and
    /// pool settings belong to the pool and are refused here with [`Error::Config`]. Call
    /// [`PgStore::migrate`] once (or create the table by hand) before use.
    pub fn from_pool(pool: PgPool, options: PgOptions) -> Result<Self, Error> {
        options.check_no_pool_settings()?;
        Ok(Self::build(pool, &options))
    }

    fn build(pool: PgPool, options: &PgOptions) -> Self {
        PgStore {
            pool,
            sql: Arc::new(Sql::new(options.table())),
        }
    }

    /// Creates the table, its index and its claim function (`<table>_claim`, PL/pgSQL) if
    /// they do not exist. Idempotent and safe when many processes run it at once: if all
    /// three exist nothing is locked or created (so a role without `CREATE` can run it);
    /// otherwise the DDL runs under a transaction-scoped advisory lock of the table's name,
    /// one migration at a time. A table made by an earlier version, without the function,
    /// gets it. The schema must exist.
    pub async fn migrate(&self) -> Result<(), Error> {
        let store = self.clone();
        detached(
            async move {
                let [table, index, function] = &store.sql.objects;
                let exists: bool = sqlx::query_scalar(store.sql.exists)
                    .bind(table)
                    .bind(index)
                    .bind(function)
                    .fetch_one(&store.pool)
                    .await
                    .map_err(map_err)?;
                if !exists {
                    sqlx::raw_sql(AssertSqlSafe(store.sql.migrate.clone()))
                        .execute(&store.pool)
                        .await
                        .map_err(map_err)?;
                }
                Ok(())
            },
            forget,
        )
        .await
    }

    /// The DDL [`PgStore::migrate`] runs, for teams that migrate by hand.
    pub fn schema_sql(&self) -> &str {
        &self.sql.schema
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The table.
    pub fn table(&self) -> &TableName {
        &self.sql.table
    }

    /// Claims `key` on `conn` (autocommit in lease mode, inside the transaction in
    /// transactional mode).
    pub(crate) async fn claim(
        &self,
        conn: &mut PgConnection,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        let corrupt = |e: sqlx::Error| Error::corrupt_key(key, e);
        // First the cheap statement: the row to judge, or else a fresh claim.
        let row = self
            .claim_statement(&self.sql.claim_or_read, key, fingerprint, deadlines, now)
            .fetch_one(&mut *conn)
            .await
            .map_err(map_err)?;
        if row.try_get::<Option<bool>, _>("claimed").map_err(corrupt)? == Some(true) {
            // The function inserted the fresh claim the model describes for no record.
            return Ok(model::begin(None, key, fingerprint, deadlines, now).0);
        }
        if row
            .try_get::<Option<&str>, _>("state")
            .map_err(corrupt)?
            .is_some()
        {
            // A row that could be taken over goes on to `begin`, which does that atomically.
            if let Some(answer) = judge(key, &row, fingerprint, deadlines, now)? {
                return Ok(answer);
            }
        }
        // Then the statement that can also take over an expired lease, again while the
        // conflicting row it meets is one its snapshot does not show yet.
        for _ in 0..CLAIM_ATTEMPTS {
            let row = self
                .claim_statement(&self.sql.begin, key, fingerprint, deadlines, now)
                .fetch_optional(&mut *conn)
                .await
                .map_err(map_err)?;
            let Some(row) = row else {
                // The insert conflicted with a row this statement's snapshot predates.
                continue;
            };
            if row.try_get::<bool, _>("claimed").map_err(corrupt)? {
                let token: i64 = row.try_get("token").map_err(corrupt)?;
                return Ok(Begin::Acquired(Lease {
                    key: key.clone(),
                    token: u64::try_from(token).map(Token).map_err(|_| {
                        Error::corrupt_key(key, format!("token {token} out of range"))
                    })?,
                    lease_until: deadlines.lease_until,
                    reclaimed: row.try_get("reclaimed").map_err(corrupt)?,
                }));
            }
            // `None`: the snapshot showed a row that could be taken, but its latest version
            // (which the insert saw) could not be: read again.
            if let Some(answer) = judge(key, &row, fingerprint, deadlines, now)? {
                return Ok(answer);
            }
        }
        Err(Error::retryable(format!(
            "claim of {key} kept conflicting with concurrent writers ({} statements)",
            CLAIM_ATTEMPTS + 1
        )))
    }

    /// `statement` (`claim_or_read` or `begin`) with its parameters bound.
    fn claim_statement<'q>(
        &self,
        statement: &Arc<str>,
        key: &'q Key,
        fingerprint: Option<&'q Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(AssertSqlSafe(Arc::clone(statement)))
            .bind(key.scope())
            .bind(key.id())
            .bind(fingerprint.map(|f| f.as_bytes().as_slice()))
            .bind(deadlines.lease_until.as_millis())
            .bind(now.as_millis())
            .bind(deadlines.expires_at.as_millis())
    }

    /// Transactional mode's fast claim inside the open transaction on `conn`: inserts a
    /// fresh claim (token 1) whose retention is already the final `expires_at`, or returns
    /// `None` when the key has a row (then [`PgStore::claim`] judges it). The row is
    /// invisible to everyone else until the transaction commits, and it commits only
    /// completed or failed, with exactly that retention.
    pub(crate) async fn claim_fresh(
        &self,
        conn: &mut PgConnection,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        lease_until: Timestamp,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<Option<Lease>, Error> {
        let inserted = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.claim_fresh)))
            .bind(key.scope())
            .bind(key.id())
            .bind(fingerprint.map(|f| f.as_bytes().as_slice()))
            .bind(lease_until.as_millis())
            .bind(now.as_millis())
            .bind(expires_at.as_millis())
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        Ok((inserted.rows_affected() == 1).then(|| Lease {
            key: key.clone(),
            token: Token(1),
            lease_until,
            reclaimed: false,
        }))
    }

    /// The record of `key`, read through `executor` (the pool, or a connection outside any
    /// transaction).
    pub(crate) async fn read<'e, X>(&self, executor: X, key: &Key) -> Result<Option<Record>, Error>
    where
        X: sqlx::Executor<'e, Database = sqlx::Postgres>,
    {
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.get)))
            .bind(key.scope())
            .bind(key.id())
            .fetch_optional(executor)
            .await
            .map_err(map_err)?;
        row.map(|r| record(key, &r)).transpose()
    }

    /// The fenced `complete`/`fail` on `conn`.
    pub(crate) async fn finish_on(
        &self,
        conn: &mut PgConnection,
        lease: &Lease,
        outcome: Finish<'_>,
        now: Timestamp,
    ) -> Result<(), Error> {
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.finish)))
            .bind(lease.key.scope())
            .bind(lease.key.id())
            .bind(signed(lease.token)?)
            .bind(outcome.state())
            .bind(outcome.response)
            .bind(outcome.expires_at.as_millis())
            .bind(now.as_millis())
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
                let mut conn = store.pool.acquire().await.map_err(map_err)?;
                let outcome = Finish {
                    failed,
                    response: &response,
                    expires_at,
                };
                store.finish_on(&mut conn, &lease, outcome, now).await
            },
            forget,
        )
        .await
    }

    async fn release_now(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.release)))
            .bind(lease.key.scope())
            .bind(lease.key.id())
            .bind(signed(lease.token)?)
            .bind(now.as_millis())
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        fenced(done.rows_affected())
    }

    /// Releases a claim whose `begin` caller was dropped before it received the lease: no
    /// operation can run under it, and the next request should not wait for its lease.
    fn release_orphan(&self, answer: Begin, now: Timestamp, runtime: &Handle) {
        let Begin::Acquired(lease) = answer else {
            return;
        };
        let store = self.clone();
        runtime.spawn(async move {
            match store.release_now(&lease, now).await {
                Ok(()) => tracing::debug!(key = %lease.key, "released the claim of a dropped begin"),
                Err(error) => tracing::warn!(
                    key = %lease.key, %error,
                    "could not release the claim of a dropped begin; it frees itself when its lease ends"
                ),
            }
        });
    }
}

/// An outcome to store: `Failed` if `failed`, else `Completed`.
pub(crate) struct Finish<'a> {
    pub failed: bool,
    pub response: &'a [u8],
    pub expires_at: Timestamp,
}

impl Finish<'_> {
    /// The stored state's name.
    pub(crate) fn state(&self) -> &'static str {
        if self.failed {
            "failed"
        } else {
            "completed"
        }
    }
}

fn fenced(rows: u64) -> Result<(), Error> {
    if rows == 1 {
        Ok(())
    } else {
        Err(Error::LeaseLost)
    }
}

fn signed(token: Token) -> Result<i64, Error> {
    i64::try_from(token.0).map_err(|e| Error::Encode(Box::new(e)))
}

/// The answer the record of `key` in `row` gives to a claim, or `None` if the row could be
/// taken over (which only `begin`'s statement does, atomically).
fn judge(
    key: &Key,
    row: &PgRow,
    fingerprint: Option<&Fingerprint>,
    deadlines: Deadlines,
    now: Timestamp,
) -> Result<Option<Begin>, Error> {
    let existing = record(key, row)?;
    Ok(
        match model::begin(Some(&existing), key, fingerprint, deadlines, now).0 {
            Begin::Acquired(_) => None,
            answer => Some(answer),
        },
    )
}

/// The record of `key` in `row`; a column that does not decode is [`Error::Corrupt`].
pub(crate) fn record(key: &Key, row: &PgRow) -> Result<Record, Error> {
    let corrupt = |e: sqlx::Error| Error::corrupt_key(key, e);
    RecordRow {
        fingerprint: row.try_get("fingerprint").map_err(corrupt)?,
        state: row.try_get("state").map_err(corrupt)?,
        token: row.try_get("token").map_err(corrupt)?,
        lease_until: row.try_get("lease_until").map_err(corrupt)?,
        response: row.try_get("response").map_err(corrupt)?,
        created_at: row.try_get("created_at").map_err(corrupt)?,
        updated_at: row.try_get("updated_at").map_err(corrupt)?,
        expires_at: row.try_get("expires_at").map_err(corrupt)?,
    }
    .into_record(key)
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
        let (store, key, fingerprint) = (self.clone(), key.clone(), fingerprint.copied());
        let releaser = self.clone();
        detached(
            async move {
                let mut conn = store.pool.acquire().await.map_err(map_err)?;
                store
                    .claim(&mut conn, &key, fingerprint.as_ref(), deadlines, now)
                    .await
            },
            move |answer, runtime| releaser.release_orphan(answer, now, runtime),
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
                let done = sqlx::query(AssertSqlSafe(Arc::clone(&store.sql.extend)))
                    .bind(lease.key.scope())
                    .bind(lease.key.id())
                    .bind(signed(lease.token)?)
                    .bind(deadlines.lease_until.as_millis())
                    .bind(deadlines.expires_at.as_millis())
                    .bind(now.as_millis())
                    .execute(&store.pool)
                    .await
                    .map_err(map_err)?;
                fenced(done.rows_affected())?;
                Ok(Lease {
                    lease_until: deadlines.lease_until,
                    ..lease
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
        let (store, key) = (self.clone(), key.clone());
        detached(async move { store.read(&store.pool, &key).await }, forget).await
    }

    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        let store = self.clone();
        detached(
            async move {
                let done = sqlx::query(AssertSqlSafe(Arc::clone(&store.sql.purge)))
                    .bind(now.as_millis())
                    .bind(i64::try_from(batch).unwrap_or(i64::MAX))
                    .execute(&store.pool)
                    .await
                    .map_err(map_err)?;
                Ok(done.rows_affected())
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
        let store = self.clone();
        detached(
            async move {
                let rows = sqlx::query(AssertSqlSafe(Arc::clone(&store.sql.stats)))
                    .fetch_all(&store.pool)
                    .await
                    .map_err(map_err)?;
                let mut stats = Stats::default();
                for row in rows {
                    let state: String = row.try_get(0).map_err(map_err)?;
                    let n: i64 = row.try_get(1).map_err(map_err)?;
                    stats.add(&state, n.max(0) as u64)?;
                }
                Ok(stats)
            },
            forget,
        )
        .await
    }

    /// The planner's statistics (`pg_class.reltuples` and the `state` column's most common
    /// values in `pg_stats`), as of the last `ANALYZE` or autovacuum: no scan. `None` before
    /// the table was ever analyzed.
    async fn estimated_stats(&self) -> Result<Option<Stats>, Error> {
        let store = self.clone();
        detached(
            async move {
                type Row = (Option<f64>, Option<Vec<String>>, Option<Vec<f64>>);
                let row: Option<Row> = sqlx::query_as(store.sql.estimate)
                    .bind(store.sql.table.quoted())
                    .fetch_optional(&store.pool)
                    .await
                    .map_err(map_err)?;
                let Some((Some(rows), Some(states), Some(freqs))) = row else {
                    return Ok(None);
                };
                if rows < 0.0 {
                    return Ok(None);
                }
                let mut stats = Stats::default();
                for (state, freq) in states.iter().zip(freqs) {
                    stats.add(state, (freq * rows).round().max(0.0) as u64)?;
                }
                Ok(Some(stats))
            },
            forget,
        )
        .await
    }
}
