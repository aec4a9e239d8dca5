//! The outbox in a SQLite database.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::Key;
use idem_sqlite::rusqlite::{params, Connection, TransactionBehavior};
use idem_sqlite::SqliteOptions;

use crate::{stored_key, Backlog, OutboxError, OutboxStore, Outgoing, Pending};

/// How long the relay's connection waits for SQLite's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The outbox table in a SQLite database, and the relay's own connection to it.
///
/// The operation enqueues through its own transaction ([`SqliteOutbox::enqueue`]); the relay
/// claims, marks and purges through this outbox's connection, each step one short
/// transaction. Claims are `BEGIN IMMEDIATE` transactions, so relays on one database are
/// serialised by SQLite's single writer and never claim the same row twice.
#[derive(Clone, Debug)]
pub struct SqliteOutbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    conn: Mutex<Connection>,
    sql: Sql,
}

/// The statements of one table.
#[derive(Debug)]
struct Sql {
    schema: String,
    insert: String,
    claim: String,
    mark_sent: String,
    release: String,
    purge: String,
    backlog: String,
}

impl Sql {
    fn new(table: &str) -> Sql {
        let t = format!("\"{table}\"");
        Sql {
            schema: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    seq INTEGER PRIMARY KEY AUTOINCREMENT,
                    scope TEXT NOT NULL,
                    id TEXT NOT NULL,
                    ordering TEXT NOT NULL,
                    subject TEXT NOT NULL,
                    payload BLOB NOT NULL,
                    created_at INTEGER NOT NULL,
                    claimed_until INTEGER,
                    claim INTEGER,
                    sent_at INTEGER,
                    attempts INTEGER NOT NULL DEFAULT 0,
                    last_error TEXT,
                    UNIQUE (scope, id)
                 );
                 CREATE INDEX IF NOT EXISTS \"{table}_pending\" ON {t} (ordering, seq) WHERE sent_at IS NULL;
                 CREATE INDEX IF NOT EXISTS \"{table}_sent\" ON {t} (sent_at) WHERE sent_at IS NOT NULL;"
            ),
            insert: format!(
                "INSERT INTO {t} (scope, id, ordering, subject, payload, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ),
            claim: format!(
                "UPDATE {t} SET claimed_until = ?2, claim = ?3
                  WHERE seq IN (
                    SELECT o.seq FROM {t} o
                     WHERE o.sent_at IS NULL
                       AND (o.claimed_until IS NULL OR o.claimed_until < ?1)
                       AND NOT EXISTS (SELECT 1 FROM {t} p
                                        WHERE p.ordering = o.ordering AND p.sent_at IS NULL
                                          AND p.seq < o.seq)
                     ORDER BY o.seq LIMIT ?4)
                 RETURNING seq, scope, id, subject, payload"
            ),
            mark_sent: format!(
                "UPDATE {t} SET sent_at = ?3, claimed_until = NULL, claim = NULL
                  WHERE seq = ?1 AND claim = ?2 AND sent_at IS NULL"
            ),
            release: format!(
                "UPDATE {t} SET claimed_until = NULL, claim = NULL, attempts = attempts + 1,
                        last_error = ?3
                  WHERE seq = ?1 AND claim = ?2"
            ),
            purge: format!(
                "DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t}
                  WHERE sent_at IS NOT NULL AND sent_at < ?1 LIMIT ?2)"
            ),
            backlog: format!("SELECT COUNT(*), MIN(created_at) FROM {t} WHERE sent_at IS NULL"),
        }
    }
}

impl SqliteOutbox {
    /// Opens the outbox table `table` (validated like a store's table name; see
    /// [`SqliteOptions::with_table`]) in the database at `path`, creating it if needed.
    /// Use the database of the [`idem_sqlite::SqliteStore`] whose transactions enqueue.
    pub async fn open(path: impl AsRef<Path>, table: &str) -> Result<Self, OutboxError> {
        SqliteOptions::default()
            .with_table(table)
            .map_err(OutboxError::Config)?;
        let path = path.as_ref().to_owned();
        let sql = Sql::new(table);
        let inner = blocking(move || {
            let conn = Connection::open(path)?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            conn.execute_batch(&sql.schema)?;
            Ok(Inner {
                conn: Mutex::new(conn),
                sql,
            })
        })
        .await?;
        Ok(SqliteOutbox {
            inner: Arc::new(inner),
        })
    }

    /// Enqueues `message` through `tx`, the transaction of the operation whose key is
    /// `operation` (inside an [`idem_sqlite::SqliteOperation`]); returns the message's key.
    /// It commits with the operation's writes or not at all. A label used twice in one
    /// operation is a unique-constraint error.
    pub fn enqueue(
        &self,
        tx: &Connection,
        operation: &Key,
        message: &Outgoing,
    ) -> Result<Key, OutboxError> {
        let (key, ordering) = message.keys(operation);
        tx.prepare_cached(&self.inner.sql.insert)
            .and_then(|mut stmt| {
                stmt.execute(params![
                    key.scope(),
                    key.id(),
                    ordering,
                    message.subject,
                    message.payload,
                    crate::now_ms()
                ])
            })
            .map_err(OutboxError::Sqlite)?;
        Ok(key)
    }

    /// Runs `f` with the relay's connection on the blocking pool.
    async fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, &Sql) -> Result<R, idem_sqlite::rusqlite::Error>
            + Send
            + 'static,
    ) -> Result<R, OutboxError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || {
            let mut conn = inner.conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn, &inner.sql)
        })
        .await
    }
}

/// Runs a SQLite call on the blocking pool.
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, idem_sqlite::rusqlite::Error> + Send + 'static,
) -> Result<R, OutboxError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OutboxError::Task(Box::new(e)))?
        .map_err(OutboxError::Sqlite)
}

impl OutboxStore for SqliteOutbox {
    async fn claim(
        &self,
        now_ms: i64,
        until_ms: i64,
        token: i64,
        batch: usize,
    ) -> Result<Vec<Pending>, OutboxError> {
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        let rows = self
            .with(move |conn, sql| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let rows = {
                    let mut stmt = tx.prepare_cached(&sql.claim)?;
                    let rows = stmt.query_map(params![now_ms, until_ms, token, limit], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, Vec<u8>>(4)?,
                        ))
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()?
                };
                tx.commit()?;
                Ok(rows)
            })
            .await?;
        let mut pending = rows
            .into_iter()
            .map(|(seq, scope, id, subject, payload)| {
                Ok(Pending {
                    seq,
                    key: stored_key(seq, scope, id)?,
                    subject,
                    payload,
                })
            })
            .collect::<Result<Vec<_>, OutboxError>>()?;
        pending.sort_by_key(|p| p.seq);
        Ok(pending)
    }

    async fn mark_sent(&self, seq: i64, token: i64, now_ms: i64) -> Result<bool, OutboxError> {
        self.with(move |conn, sql| {
            conn.prepare_cached(&sql.mark_sent)?
                .execute(params![seq, token, now_ms])
                .map(|n| n == 1)
        })
        .await
    }

    async fn release(&self, seq: i64, token: i64, error: &str) -> Result<(), OutboxError> {
        let error = error.to_owned();
        self.with(move |conn, sql| {
            conn.prepare_cached(&sql.release)?
                .execute(params![seq, token, error])
                .map(drop)
        })
        .await
    }

    async fn purge(&self, before_ms: i64, batch: usize) -> Result<u64, OutboxError> {
        let limit = i64::try_from(batch).unwrap_or(i64::MAX);
        self.with(move |conn, sql| {
            conn.prepare_cached(&sql.purge)?
                .execute(params![before_ms, limit])
                .map(|n| n as u64)
        })
        .await
    }

    async fn backlog(&self) -> Result<Backlog, OutboxError> {
        self.with(|conn, sql| {
            conn.prepare_cached(&sql.backlog)?.query_row([], |r| {
                Ok(Backlog {
                    pending: r.get::<_, i64>(0)?.max(0) as u64,
                    oldest_ms: r.get(1)?,
                })
            })
        })
        .await
    }
}
