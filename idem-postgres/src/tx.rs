//! Transactional mode: claim, business writes and outcome in one PostgreSQL transaction.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use idem_core::backend::detach::{detached, forget};
use idem_core::backend::{model, settle, step, AsyncTxFn, Step, TxRequest};
use idem_core::{
    Begin, Deadlines, Error, Failure, Fingerprint, Key, Lease, Response, RunError, Timestamp,
    TransactionalStore, TxPolicy, NO_WAIT_RETRY_AFTER,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, Connection, PgConnection, Postgres, Transaction};

use crate::error::{is_lock_timeout, map_err};
use crate::store::{Finish, PgStore};

/// The operation [`PgStore`] runs in transactional mode: it receives the claim's
/// transaction (as a connection inside it) and writes business rows through it.
///
/// If its caller is dropped, it goes on running on a task of its own, so it is `'static`:
/// move what it needs into it.
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

/// A [`PgOperation`] from a plain async closure, without boxing by hand:
///
/// ```
/// use idem_core::Failure;
/// use idem_postgres::{operation, sqlx::PgConnection};
/// let op = operation(async |conn: &mut PgConnection| {
///     sqlx::query("INSERT INTO ledger (amount) VALUES (100)")
///         .execute(&mut *conn)
///         .await
///         .map_err(Failure::Retryable)?;
///     Ok::<_, Failure<String, sqlx::Error>>(100u64)
/// });
/// # let _: idem_postgres::PgOperation<u64, String, sqlx::Error> = op;
/// ```
pub fn operation<C, T, F, E>(op: C) -> PgOperation<T, F, E>
where
    C: for<'c> AsyncTxFn<'c, PgConnection, T, F, E> + Send + 'static,
{
    Box::new(move |conn| Box::pin(op(conn)))
}

const BEGIN: &str = "BEGIN";
/// A `TxPolicy::NoWait` claim gives up on a held row lock at once; the timeout is reset
/// before the operation runs.
const BEGIN_NO_WAIT: &str = "BEGIN; SET LOCAL lock_timeout = '1ms'";
const RESET_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout TO DEFAULT";
/// Rolls a permanent failure's business writes back and opens, in the same message, the
/// transaction that records it (sqlx's transaction goes on).
const ROLLBACK_AND_CHAIN: &str = "ROLLBACK AND CHAIN";

impl TransactionalStore for PgStore {
    type Operation<T, F, E> = PgOperation<T, F, E>;
    const CLAIMS_AT_COMMIT: bool = true;

    /// Claim, business writes and outcome in one PostgreSQL transaction, run to its end:
    /// dropping the returned future does not interrupt it, the rest moves onto a task of its
    /// own (see the crate docs on cancellation).
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
        let store = self.clone();
        let optimistic = request.policy == TxPolicy::Optimistic;
        let request = Request {
            key: request.key.clone(),
            fingerprint: request.fingerprint,
            deadlines: request.deadlines,
            expires_at: request.expires_at,
            now: request.now,
            no_wait: request.policy == TxPolicy::NoWait,
        };
        if optimistic {
            return detached(async move { store.speculate(request, op).await }, forget).await;
        }
        detached(async move { store.run(request, op).await }, forget).await
    }
}

/// A [`TxRequest`] the transaction's task owns.
struct Request {
    key: Key,
    fingerprint: Option<Fingerprint>,
    deadlines: Deadlines,
    expires_at: Timestamp,
    now: Timestamp,
    no_wait: bool,
}

/// A pooled connection that goes back to the pool only when no transaction is open on it.
///
/// `open` is set before `BEGIN` is sent and cleared once a `COMMIT` or `ROLLBACK` was
/// acknowledged. Dropped while `open` (a statement failed mid-transaction, the task
/// panicked or its runtime is shutting down), the connection is closed instead of returned:
/// the server then rolls back whatever the transaction did, and no later user of the pool
/// finds itself inside it.
struct Session {
    conn: PoolConnection<Postgres>,
    open: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}

/// A transactional request's answer.
type Answer<T, F, E> = Result<Response<T, F>, RunError<E>>;

/// Runs `op` in `tx` and gives both back. If it panics (the worker "died" before commit),
/// rolls everything back and clears `open` before the panic goes on, so a retry finds the
/// key free at once rather than locked by a transaction the server has not yet seen end.
async fn operate<'c, T, F, E>(
    mut tx: Transaction<'c, Postgres>,
    open: &mut bool,
    op: PgOperation<T, F, E>,
) -> Result<(Transaction<'c, Postgres>, Result<T, Failure<F, E>>), Error> {
    match AssertUnwindSafe(op(&mut tx)).catch_unwind().await {
        Ok(result) => Ok((tx, result)),
        Err(panic) => {
            tx.rollback().await.map_err(map_err)?;
            *open = false;
            std::panic::resume_unwind(panic);
        }
    }
}

/// Rolls `tx` back, marks the session out of its transaction, and gives `answer`.
async fn rolled_back<T, F, E>(
    tx: Transaction<'_, Postgres>,
    open: &mut bool,
    answer: Answer<T, F, E>,
) -> Answer<T, F, E> {
    tx.rollback().await.map_err(map_err)?;
    *open = false;
    answer
}

impl PgStore {
    /// A pooled connection for one transactional request, marked open: its `BEGIN` is
    /// sent next.
    async fn session(&self) -> Result<Session, Error> {
        let conn = self.pool.acquire().await.map_err(map_err)?;
        Ok(Session { conn, open: true })
    }

    /// A [`TxPolicy::Optimistic`] request, run to its end (`detached`): the operation
    /// first, then the claim with the outcome, then the commit.
    async fn speculate<T, F, E>(
        &self,
        request: Request,
        op: PgOperation<T, F, E>,
    ) -> Answer<T, F, E>
    where
        T: Serialize + DeserializeOwned,
        F: Serialize + DeserializeOwned,
    {
        let mut session = self.session().await?;
        let tx = begin(&mut session.conn, false).await?;
        let (mut tx, result) = operate(tx, &mut session.open, op).await?;
        let settled = match settle(result) {
            Ok(settled) => settled,
            Err(error) => {
                tx.rollback().await.map_err(map_err)?;
                session.open = false;
                // A duplicate's operation can fail only because the first one's writes
                // committed (a unique business key): if the key has an answer, that is it.
                return match self.judge(&mut session.conn, &request).await? {
                    Some(answer) => answer,
                    None => Err(error),
                };
            }
        };
        if settled.failed {
            // The business writes go; the transaction goes on, to record `Failed`.
            sqlx::raw_sql(ROLLBACK_AND_CHAIN)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        let outcome = Finish {
            failed: settled.failed,
            response: &settled.bytes,
            expires_at: request.expires_at,
        };
        let claimed = sqlx::query(AssertSqlSafe(Arc::clone(&self.sql.claim_outcome)))
            .bind(request.key.scope())
            .bind(request.key.id())
            .bind(
                request
                    .fingerprint
                    .as_ref()
                    .map(|f| f.as_bytes().as_slice()),
            )
            .bind(outcome.state())
            .bind(outcome.response)
            .bind(request.now.as_millis())
            .bind(outcome.expires_at.as_millis())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if claimed.rows_affected() == 1 {
            // If the connection drops here the commit's fate is unknown: the retryable
            // error sends the client back, and its retry replays or executes, never both.
            tx.commit().await.map_err(map_err)?;
            session.open = false;
            return Ok(settled.into_response());
        }
        // The key has a record this request may not take: nothing of the operation stays.
        tx.rollback().await.map_err(map_err)?;
        session.open = false;
        match self.judge(&mut session.conn, &request).await? {
            Some(answer) => answer,
            // Free again (released, expired or purged since the claim): the operation has
            // run and cannot run again in this call.
            None => Err(Error::InProgress {
                retry_after: Duration::ZERO,
            }
            .into()),
        }
    }

    /// Reads the key's record on `conn` (outside any transaction) and judges it as `begin`
    /// would: the answer (a replay or a refusal), or `None` if the request could take the
    /// key (no record, or a lease expired or released).
    async fn judge<T, F, E>(
        &self,
        conn: &mut PgConnection,
        request: &Request,
    ) -> Result<Option<Answer<T, F, E>>, Error>
    where
        T: DeserializeOwned,
        F: DeserializeOwned,
    {
        let existing = self.read(&mut *conn, &request.key).await?;
        let (answer, _) = model::begin(
            existing.as_ref(),
            &request.key,
            request.fingerprint.as_ref(),
            request.deadlines,
            request.now,
        );
        Ok(match step(answer, request.now) {
            Ok(Step::Acquired(_)) => None,
            Ok(Step::Replay(replay)) => Some(replay.decode().map_err(RunError::from)),
            Err(refused) => Some(Err(refused.into())),
        })
    }

    /// The whole transactional request, run to its end (`detached`).
    async fn run<T, F, E>(
        &self,
        request: Request,
        op: PgOperation<T, F, E>,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: Serialize + DeserializeOwned,
    {
        let mut session = self.session().await?;
        let mut tx = begin(&mut session.conn, request.no_wait).await?;
        let lease = match self.claim_in(&mut tx, &request).await {
            Ok(lease) => lease,
            Err(answer) => return rolled_back(tx, &mut session.open, answer).await,
        };
        let (mut tx, result) = operate(tx, &mut session.open, op).await?;
        let settled = match settle(result) {
            Ok(settled) => settled,
            Err(retryable) => return rolled_back(tx, &mut session.open, Err(retryable)).await,
        };
        let lease = if settled.failed {
            // Roll the business writes back and record `Failed` in a fresh transaction.
            tx.rollback().await.map_err(map_err)?;
            tx = begin(&mut session.conn, request.no_wait).await?;
            match self.claim_in(&mut tx, &request).await {
                Ok(lease) => lease,
                Err(answer) => return rolled_back(tx, &mut session.open, answer).await,
            }
        } else {
            lease
        };
        let outcome = Finish {
            failed: settled.failed,
            response: &settled.bytes,
            expires_at: request.expires_at,
        };
        self.finish_on(&mut tx, &lease, outcome, request.now)
            .await?;
        // If the connection drops here the commit's fate is unknown: the retryable error
        // sends the client back, and its retry replays or executes, never both.
        tx.commit().await.map_err(map_err)?;
        session.open = false;
        Ok(settled.into_response())
    }

    /// Claims the request's key inside `tx` (opened by [`begin`]): the lease, or the
    /// request's answer (a replay or a refusal) if it ends here.
    async fn claim_in<T, F, E>(
        &self,
        tx: &mut PgConnection,
        request: &Request,
    ) -> Result<Lease, Answer<T, F, E>>
    where
        T: DeserializeOwned,
        F: DeserializeOwned,
    {
        let fresh = self
            .claim_fresh(
                tx,
                &request.key,
                request.fingerprint.as_ref(),
                request.deadlines.lease_until,
                request.now,
                request.expires_at,
            )
            .await;
        let claimed = match fresh {
            Ok(Some(lease)) => Ok(Begin::Acquired(lease)),
            Ok(None) => {
                self.claim(
                    tx,
                    &request.key,
                    request.fingerprint.as_ref(),
                    request.deadlines,
                    request.now,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match claimed.map(|answer| step(answer, request.now)) {
            Ok(Ok(Step::Acquired(lease))) => {
                if request.no_wait {
                    sqlx::raw_sql(RESET_LOCK_TIMEOUT)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| Err(map_err(e).into()))?;
                }
                Ok(lease)
            }
            Ok(Ok(Step::Replay(replay))) => Err(replay.decode().map_err(RunError::from)),
            Ok(Err(refused)) => Err(Err(refused.into())),
            Err(e) if request.no_wait && is_lock_timeout(&e) => Err(Err(Error::InProgress {
                retry_after: NO_WAIT_RETRY_AFTER,
            }
            .into())),
            Err(e) => Err(Err(e.into())),
        }
    }
}

/// Opens the transaction (sqlx tracks it, so an operation's own `begin` is a savepoint).
async fn begin(conn: &mut PgConnection, no_wait: bool) -> Result<Transaction<'_, Postgres>, Error> {
    conn.begin_with(if no_wait { BEGIN_NO_WAIT } else { BEGIN })
        .await
        .map_err(map_err)
}
