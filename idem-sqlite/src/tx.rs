//! Transactional mode: the claim, the operation's business writes and the outcome in one
//! `BEGIN IMMEDIATE` transaction.

use std::sync::Arc;
use std::time::Duration;

use idem_core::backend::{model, settle, step, Step, TxRequest};
use idem_core::{
    Error, Failure, Fingerprint, Key, Response, RunError, TransactionalStore, TxPolicy,
    NO_WAIT_RETRY_AFTER,
};
use rusqlite::{Connection, Transaction, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{is_busy, map_err};
use idem_core::backend::detach::forget;

use crate::pool::Gate;
use crate::sql::Sql;
use crate::store::{read, upsert, SqliteStore};

/// The operation [`SqliteStore`] runs in transactional mode: a closure that writes business
/// rows through the claim's transaction. It runs on a blocking thread, and always to its end
/// (see the crate docs on cancellation). It must leave the transaction to the barrier: if it
/// ends the transaction itself (`COMMIT`, `ROLLBACK`), the call fails with a permanent
/// [`Error::Store`].
///
/// ```
/// use idem_core::Failure;
/// use idem_sqlite::SqliteOperation;
/// let op: SqliteOperation<u64, String, idem_sqlite::rusqlite::Error> = Box::new(|tx| {
///     tx.execute("INSERT INTO ledger (amount) VALUES (100)", [])
///         .map_err(Failure::Retryable)?;
///     Ok(100)
/// });
/// ```
pub type SqliteOperation<T, F, E> =
    Box<dyn FnOnce(&Transaction<'_>) -> Result<T, Failure<F, E>> + Send>;

/// A [`SqliteOperation`] from a plain closure, without boxing by hand:
///
/// ```
/// use idem_core::Failure;
/// use idem_sqlite::{operation, rusqlite};
/// let op = operation(|tx: &rusqlite::Transaction<'_>| {
///     tx.execute("INSERT INTO ledger (amount) VALUES (100)", [])
///         .map_err(Failure::Retryable)?;
///     Ok::<_, Failure<String, rusqlite::Error>>(100u64)
/// });
/// # let _: idem_sqlite::SqliteOperation<u64, String, rusqlite::Error> = op;
/// ```
pub fn operation<C, T, F, E>(op: C) -> SqliteOperation<T, F, E>
where
    C: FnOnce(&Transaction<'_>) -> Result<T, Failure<F, E>> + Send + 'static,
{
    Box::new(op)
}

/// One transactional request, owned by the blocking task that runs it.
struct Request {
    key: Key,
    fingerprint: Option<Fingerprint>,
    deadlines: idem_core::Deadlines,
    expires_at: idem_core::Timestamp,
    now: idem_core::Timestamp,
    no_wait: bool,
    busy_timeout: Duration,
}

impl TransactionalStore for SqliteStore {
    type Operation<T, F, E> = SqliteOperation<T, F, E>;

    /// Runs the operation in the claim's `BEGIN IMMEDIATE` transaction.
    ///
    /// SQLite has one writer at a time, so a concurrent duplicate cannot see the first
    /// one's claim: with [`TxPolicy::Wait`] it waits for the write lock (at this store's
    /// write gate, then up to the busy timeout for other processes) and then replays; with
    /// [`TxPolicy::NoWait`] a held write lock, which may be another key's, answers
    /// `InProgress` at once. The transaction runs on a blocking thread: once started it
    /// finishes (and stores its outcome) even if the caller stops waiting; a crash of the
    /// process rolls it back.
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
        let no_wait = request.policy == TxPolicy::NoWait;
        let request = Request {
            key: request.key.clone(),
            fingerprint: request.fingerprint,
            deadlines: request.deadlines,
            expires_at: request.expires_at,
            now: request.now,
            no_wait,
            busy_timeout: self.inner.options.busy_timeout,
        };
        let inner = Arc::clone(&self.inner);
        let gate = if no_wait { Gate::TryWrite } else { Gate::Write };
        let result = self
            .inner
            .pool
            .run(
                gate,
                move |conn| transaction(conn, &inner.sql, &request, op),
                forget,
            )
            .await;
        result.map_err(RunError::Barrier).and_then(|r| r)
    }
}

/// Opens the transaction (at once or not at all under `NoWait`), runs the steps, commits.
fn transaction<T, F, E>(
    conn: &Connection,
    sql: &Sql,
    request: &Request,
    op: SqliteOperation<T, F, E>,
) -> Result<Result<Response<T, F>, RunError<E>>, Error>
where
    T: Serialize + DeserializeOwned,
    F: Serialize + DeserializeOwned,
{
    if request.no_wait {
        conn.busy_timeout(Duration::ZERO).map_err(map_err)?;
    }
    let begun = Transaction::new_unchecked(conn, TransactionBehavior::Immediate);
    let tx = match begun {
        Ok(tx) => tx,
        Err(e) => {
            if request.no_wait {
                conn.busy_timeout(request.busy_timeout).map_err(map_err)?;
                if is_busy(&e) {
                    return Ok(Err(RunError::Barrier(Error::InProgress {
                        retry_after: NO_WAIT_RETRY_AFTER,
                    })));
                }
            }
            return Err(map_err(e));
        }
    };
    if request.no_wait {
        tx.busy_timeout(request.busy_timeout).map_err(map_err)?;
    }
    Ok(steps(&tx, sql, request, op).and_then(|response| {
        tx.commit().map_err(map_err)?;
        Ok(response)
    }))
}

/// The transactional-mode steps inside an open transaction; any `Err` rolls it back.
fn steps<T, F, E>(
    tx: &Transaction<'_>,
    sql: &Sql,
    request: &Request,
    op: SqliteOperation<T, F, E>,
) -> Result<Response<T, F>, RunError<E>>
where
    T: Serialize + DeserializeOwned,
    F: Serialize + DeserializeOwned,
{
    let Request {
        key,
        fingerprint,
        deadlines,
        expires_at,
        now,
        ..
    } = request;
    let rec = read(tx, sql, key)?;
    let (answer, claimed) = model::begin(rec.as_ref(), key, fingerprint.as_ref(), *deadlines, *now);
    let lease = match step(answer, *now)? {
        Step::Acquired(lease) => lease,
        Step::Replay(replay) => return Ok(replay.decode()?),
    };
    execute(tx, "SAVEPOINT idem_operation")?;
    let result = op(tx);
    if tx.is_autocommit() {
        // The transaction is gone: the operation ended it, or SQLite rolled it back after an
        // error (disk full, I/O) that the operation returned — or swallowed.
        return Err(match result {
            Err(Failure::Retryable(e)) => RunError::Operation(e),
            _ => RunError::Barrier(Error::permanent(format!(
                "the transaction of key {key} ended during the operation (a COMMIT, END or \
                 ROLLBACK of the operation's own, or a rollback by SQLite after an error the \
                 operation did not return); its writes may have been committed without an \
                 outcome. The operation must leave the transaction to the barrier and return \
                 its errors"
            ))),
        });
    }
    let settled = settle(result)?;
    if settled.failed {
        execute(tx, "ROLLBACK TO idem_operation")?;
    }
    execute(tx, "RELEASE idem_operation")?;
    let done = model::finish(
        claimed.as_ref(),
        &lease,
        settled.failed,
        &settled.bytes,
        *expires_at,
        *now,
    )?;
    upsert(tx, sql, &done)?;
    Ok(settled.into_response())
}

/// Runs one cached statement without parameters.
fn execute(tx: &Transaction<'_>, statement: &str) -> Result<(), Error> {
    tx.prepare_cached(statement)
        .and_then(|mut stmt| stmt.execute([]))
        .map(drop)
        .map_err(map_err)
}
