//! The outbox in a PostgreSQL database.

use std::sync::Arc;

use idem_core::Key;
use idem_postgres::sqlx::{self, AssertSqlSafe, PgConnection, PgPool, Row};
use idem_postgres::TableName;

use crate::{stored_key, Backlog, OutboxError, OutboxStore, Outgoing, Pending};

/// The outbox table in a PostgreSQL database, and the relay's pool.
///
/// The operation enqueues through its own transaction ([`PgOutbox::enqueue`]); the relay
/// claims with one `UPDATE` over `SELECT … FOR UPDATE SKIP LOCKED`, so concurrent relays skip
/// each other's rows instead of waiting or publishing them twice.
///
/// Ordering is by `seq`, a sequence drawn at insert. Within one operation and one ordering
/// key that is enqueue order. Operations that share an ordering key (an aggregate's id) are
/// ordered by commit only if they serialise on the aggregate before enqueueing (they lock
/// its row), as their business writes must anyway.
#[derive(Clone, Debug)]
pub struct PgOutbox {
    pool: PgPool,
    sql: Arc<Sql>,
}

/// The statements of one table.
#[derive(Debug)]
struct Sql {
    migrate: String,
    insert: Arc<str>,
    claim: Arc<str>,
    mark_sent: Arc<str>,
    release: Arc<str>,
    purge: Arc<str>,
    backlog: Arc<str>,
}

impl Sql {
    fn new(table: &TableName, bare: &str) -> Sql {
        let t = table.quoted();
        Sql {
            // Concurrent migrations queue on one advisory lock instead of racing on the
            // catalogs (`t` is a validated, quoted identifier: no single quote in it).
            migrate: format!(
                "SELECT pg_advisory_xact_lock(hashtextextended('idem-outbox migrate {t}', 0));
                 CREATE TABLE IF NOT EXISTS {t} (
                    seq BIGSERIAL PRIMARY KEY,
                    scope TEXT NOT NULL,
                    id TEXT NOT NULL,
                    ordering TEXT NOT NULL,
                    subject TEXT NOT NULL,
                    payload BYTEA NOT NULL,
                    created_at BIGINT NOT NULL,
                    claimed_until BIGINT,
                    claim BIGINT,
                    sent_at BIGINT,
                    attempts INT NOT NULL DEFAULT 0,
                    last_error TEXT,
                    UNIQUE (scope, id)
                 );
                 CREATE INDEX IF NOT EXISTS \"{bare}_pending\" ON {t} (ordering, seq) WHERE sent_at IS NULL;
                 CREATE INDEX IF NOT EXISTS \"{bare}_sent\" ON {t} (sent_at) WHERE sent_at IS NOT NULL;"
            ),
            insert: format!(
                "INSERT INTO {t} (scope, id, ordering, subject, payload, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6)"
            )
            .into(),
            claim: format!(
                "UPDATE {t} SET claimed_until = $2, claim = $3
                  WHERE seq IN (
                    SELECT o.seq FROM {t} o
                     WHERE o.sent_at IS NULL
                       AND (o.claimed_until IS NULL OR o.claimed_until < $1)
                       AND NOT EXISTS (SELECT 1 FROM {t} p
                                        WHERE p.ordering = o.ordering AND p.sent_at IS NULL
                                          AND p.seq < o.seq)
                     ORDER BY o.seq LIMIT $4
                     FOR UPDATE SKIP LOCKED)
                 RETURNING seq, scope, id, subject, payload"
            )
            .into(),
            mark_sent: format!(
                "UPDATE {t} SET sent_at = $3, claimed_until = NULL, claim = NULL
                  WHERE seq = $1 AND claim = $2 AND sent_at IS NULL"
            )
            .into(),
            release: format!(
                "UPDATE {t} SET claimed_until = NULL, claim = NULL, attempts = attempts + 1,
                        last_error = $3
                  WHERE seq = $1 AND claim = $2"
            )
            .into(),
            purge: format!(
                "DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t}
                  WHERE sent_at IS NOT NULL AND sent_at < $1 LIMIT $2)"
            )
            .into(),
            backlog: format!("SELECT COUNT(*), MIN(created_at) FROM {t} WHERE sent_at IS NULL")
                .into(),
        }
    }
}

impl PgOutbox {
    /// The outbox table `table` (`table` or `schema.table`, validated like a store's; see
    /// [`TableName::new`]) reached through `pool`, created if needed. Use the database of
    /// the [`idem_postgres::PgStore`] whose transactions enqueue.
    pub async fn open(pool: PgPool, table: &str) -> Result<Self, OutboxError> {
        let name = TableName::new(table).map_err(OutboxError::Config)?;
        let bare = table.rsplit('.').next().unwrap_or(table);
        let sql = Sql::new(&name, bare);
        sqlx::raw_sql(AssertSqlSafe(sql.migrate.clone()))
            .execute(&pool)
            .await
            .map_err(OutboxError::Postgres)?;
        Ok(PgOutbox {
            pool,
            sql: Arc::new(sql),
        })
    }

    /// Enqueues `message` through `tx`, the transaction of the operation whose key is
    /// `operation` (inside an [`idem_postgres::PgOperation`]); returns the message's key.
    /// It commits with the operation's writes or not at all. A label used twice in one
    /// operation is a unique-constraint error.
    pub async fn enqueue(
        &self,
        tx: &mut PgConnection,
        operation: &Key,
        message: &Outgoing,
    ) -> Result<Key, OutboxError> {
        let (key, ordering) = message.keys(operation);
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.insert)))
            .bind(key.scope())
            .bind(key.id())
            .bind(ordering)
            .bind(&message.subject)
            .bind(&message.payload)
            .bind(crate::now_ms())
            .execute(tx)
            .await
            .map_err(OutboxError::Postgres)?;
        Ok(key)
    }
}

impl OutboxStore for PgOutbox {
    async fn claim(
        &self,
        now_ms: i64,
        until_ms: i64,
        token: i64,
        batch: usize,
    ) -> Result<Vec<Pending>, OutboxError> {
        let rows = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.claim)))
            .bind(now_ms)
            .bind(until_ms)
            .bind(token)
            .bind(i64::try_from(batch).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(OutboxError::Postgres)?;
        let mut pending = rows
            .into_iter()
            .map(|row| {
                let seq: i64 = row.try_get(0).map_err(OutboxError::Postgres)?;
                Ok(Pending {
                    seq,
                    key: stored_key(
                        seq,
                        row.try_get(1).map_err(OutboxError::Postgres)?,
                        row.try_get(2).map_err(OutboxError::Postgres)?,
                    )?,
                    subject: row.try_get(3).map_err(OutboxError::Postgres)?,
                    payload: row.try_get(4).map_err(OutboxError::Postgres)?,
                })
            })
            .collect::<Result<Vec<_>, OutboxError>>()?;
        pending.sort_by_key(|p| p.seq);
        Ok(pending)
    }

    async fn mark_sent(&self, seq: i64, token: i64, now_ms: i64) -> Result<bool, OutboxError> {
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.mark_sent)))
            .bind(seq)
            .bind(token)
            .bind(now_ms)
            .execute(&self.pool)
            .await
            .map_err(OutboxError::Postgres)?;
        Ok(done.rows_affected() == 1)
    }

    async fn release(&self, seq: i64, token: i64, error: &str) -> Result<(), OutboxError> {
        sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.release)))
            .bind(seq)
            .bind(token)
            .bind(error)
            .execute(&self.pool)
            .await
            .map_err(OutboxError::Postgres)?;
        Ok(())
    }

    async fn purge(&self, before_ms: i64, batch: usize) -> Result<u64, OutboxError> {
        let done = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.purge)))
            .bind(before_ms)
            .bind(i64::try_from(batch).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await
            .map_err(OutboxError::Postgres)?;
        Ok(done.rows_affected())
    }

    async fn backlog(&self) -> Result<Backlog, OutboxError> {
        let row = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.backlog)))
            .fetch_one(&self.pool)
            .await
            .map_err(OutboxError::Postgres)?;
        let pending: i64 = row.try_get(0).map_err(OutboxError::Postgres)?;
        Ok(Backlog {
            pending: pending.max(0) as u64,
            oldest_ms: row.try_get(1).map_err(OutboxError::Postgres)?,
        })
    }
}
