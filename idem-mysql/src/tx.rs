//! Transactional mode ([`TransactionalStore`]): claim, business writes and outcome in one
//! InnoDB transaction, run to its end even if its caller is dropped.

use std::any::Any;
use std::panic::AssertUnwindSafe;

use futures::future::BoxFuture;
use futures::FutureExt;
use idem_core::backend::detach::{detached, forget};
use idem_core::backend::{settle, step, AsyncTxFn, Step, TxRequest};
use idem_core::{
    Deadlines, Error, Failure, Fingerprint, Key, Response, RunError, Timestamp, TransactionalStore,
    TxPolicy, NO_WAIT_RETRY_AFTER,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::{AssertSqlSafe, Connection, MySqlConnection};

use crate::error::{map_err, DEADLOCK, LOCK_WAIT_TIMEOUT};
use crate::store::{server_error, MySqlStore, Session, CLAIM_ATTEMPTS};

/// The operation [`MySqlStore`] runs in transactional mode: it receives the connection
/// inside the claim's transaction and writes business rows through it. It must not
/// commit, roll back or end the transaction itself (nested `begin()` is fine: sqlx makes
/// it a savepoint).
///
/// ```
/// use idem_core::Failure;
/// use idem_mysql::MySqlOperation;
/// let op: MySqlOperation<u64, String, idem_mysql::sqlx::Error> = Box::new(|conn| {
///     Box::pin(async move {
///         sqlx::query("INSERT INTO ledger (amount) VALUES (100)")
///             .execute(&mut *conn)
///             .await
///             .map_err(Failure::Retryable)?;
///         Ok(100)
///     })
/// });
/// ```
pub type MySqlOperation<T, F, E> = Box<
    dyn for<'c> FnOnce(&'c mut MySqlConnection) -> BoxFuture<'c, Result<T, Failure<F, E>>> + Send,
>;

/// A [`MySqlOperation`] from a plain async closure, without boxing by hand:
///
/// ```
/// use idem_core::Failure;
/// use idem_mysql::{operation, sqlx::MySqlConnection};
/// let op = operation(async |conn: &mut MySqlConnection| {
///     sqlx::query("INSERT INTO ledger (amount) VALUES (100)")
///         .execute(&mut *conn)
///         .await
///         .map_err(Failure::Retryable)?;
///     Ok::<_, Failure<String, sqlx::Error>>(100u64)
/// });
/// # let _: idem_mysql::MySqlOperation<u64, String, sqlx::Error> = op;
/// ```
pub fn operation<C, T, F, E>(op: C) -> MySqlOperation<T, F, E>
where
    C: for<'c> AsyncTxFn<'c, MySqlConnection, T, F, E> + Send + 'static,
{
    Box::new(move |conn| Box::pin(op(conn)))
}

/// The savepoint taken right after the claim; a permanent failure rolls back to it.
const SAVEPOINT: &str = "SAVEPOINT idem_claim";
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT idem_claim";
/// [`TxPolicy::NoWait`]: the claim gives up on a locked row at once. The session's own
/// value is kept in a user variable and put back before the operation runs.
const NO_WAIT_BEGIN: &str = "SET @idem_lock_wait = @@SESSION.innodb_lock_wait_timeout, \
     SESSION innodb_lock_wait_timeout = 0; BEGIN";
const RESTORE_LOCK_WAIT: &str = "SET SESSION innodb_lock_wait_timeout = @idem_lock_wait";

/// A transactional request with its key owned, to move onto the transaction's task.
struct Request {
    key: Key,
    fingerprint: Option<Fingerprint>,
    deadlines: Deadlines,
    expires_at: Timestamp,
    now: Timestamp,
    policy: TxPolicy,
}

/// How a transaction ended, once its connection is outside any transaction again.
enum Ended<T, F, E> {
    /// What to answer.
    Answer(Result<Response<T, F>, RunError<E>>),
    /// The operation panicked; everything was rolled back. The panic continues in the
    /// caller.
    Panicked(Box<dyn Any + Send>),
}

impl TransactionalStore for MySqlStore {
    type Operation<T, F, E> = MySqlOperation<T, F, E>;

    /// Claim, business writes and outcome in one InnoDB transaction, run to its end: a dropped
    /// caller does not stop it (the rest moves onto a task of its own), so it commits (and a retry
    /// replays it) or rolls back (and a retry executes); its connection goes back to the pool only
    /// outside a transaction, and is closed otherwise.
    ///
    /// A concurrent duplicate's claim waits on the first one's row lock. With
    /// [`TxPolicy::Wait`] it waits (up to the session's `innodb_lock_wait_timeout`, then
    /// a retryable error) and replays, or executes if the first rolled back. With
    /// [`TxPolicy::NoWait`] the claim runs with `innodb_lock_wait_timeout = 0` and answers
    /// `InProgress` at once; the session's value is restored before the operation runs.
    ///
    /// After the claim a savepoint is taken; a permanent failure rolls back to it (the
    /// business writes go, the claim and its row lock stay) and records `Failed` in the
    /// same transaction, so no duplicate can run in between.
    async fn transact<T, F, E>(
        &self,
        request: TxRequest<'_>,
        op: MySqlOperation<T, F, E>,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
    {
        let request = Request {
            key: request.key.clone(),
            fingerprint: request.fingerprint,
            deadlines: request.deadlines,
            expires_at: request.expires_at,
            now: request.now,
            policy: request.policy,
        };
        let store = self.clone();
        detached(
            async move {
                let conn = store.pool().acquire().await.map_err(map_err)?;
                let mut session = Session { conn, clean: false };
                // On `Err` the transaction's state is unknown: `session` closes the connection.
                let ended = store.transaction(&mut session.conn, &request, op).await?;
                session.release();
                match ended {
                    Ended::Answer(answer) => answer,
                    Ended::Panicked(panic) => std::panic::resume_unwind(panic),
                }
            },
            forget,
        )
        .await
    }
}

impl MySqlStore {
    /// The whole transaction on `conn`. `Ok` means the connection is outside any
    /// transaction again (committed or rolled back); `Err` means its state is unknown and
    /// it must not be reused.
    async fn transaction<T, F, E>(
        &self,
        conn: &mut MySqlConnection,
        request: &Request,
        op: MySqlOperation<T, F, E>,
    ) -> Result<Ended<T, F, E>, Error>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
    {
        let no_wait = request.policy == TxPolicy::NoWait;
        let mut attempt = 0;
        let (mut tx, lease) = loop {
            attempt += 1;
            let mut tx = if no_wait {
                conn.begin_with(NO_WAIT_BEGIN).await
            } else {
                conn.begin().await
            }
            .map_err(map_err)?;
            let claimed = self
                .claim_once(
                    &mut tx,
                    &request.key,
                    request.fingerprint.as_ref(),
                    request.deadlines,
                    request.now,
                    true,
                )
                .await
                .and_then(|answer| answer.map(|a| step(a, request.now)).transpose());
            let claimed = match claimed {
                Ok(Some(Step::Acquired(lease))) => break (tx, lease),
                Ok(Some(Step::Replay(replay))) => Ok(Some(replay)),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            // Nothing was written (a deadlock victim's transaction is already gone).
            tx.rollback().await.map_err(map_err)?;
            if no_wait {
                sqlx::raw_sql(RESTORE_LOCK_WAIT)
                    .execute(&mut *conn)
                    .await
                    .map_err(map_err)?;
            }
            let answer = match claimed {
                Ok(Some(replay)) => replay.decode(),
                // The row changed between the claim and the read, or a deadlock victim.
                Ok(None) if attempt < CLAIM_ATTEMPTS => continue,
                Err(e) if attempt < CLAIM_ATTEMPTS && server_error(&e) == Some(DEADLOCK) => {
                    continue
                }
                Err(e) if no_wait && server_error(&e) == Some(LOCK_WAIT_TIMEOUT) => {
                    Err(Error::InProgress {
                        retry_after: NO_WAIT_RETRY_AFTER,
                    })
                }
                Err(e) => Err(e),
                Ok(None) => Err(Error::retryable(format!(
                    "claim of {} kept conflicting with concurrent writers \
                     ({CLAIM_ATTEMPTS} attempts)",
                    request.key
                ))),
            };
            return Ok(Ended::Answer(answer.map_err(RunError::from)));
        };
        let savepoint = if no_wait {
            format!("{RESTORE_LOCK_WAIT}; {SAVEPOINT}")
        } else {
            SAVEPOINT.to_string()
        };
        sqlx::raw_sql(AssertSqlSafe(savepoint))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;

        let result = AssertUnwindSafe(op(&mut tx)).catch_unwind().await;
        let settled = match result {
            Ok(result) => settle(result),
            Err(panic) => {
                // The worker "died" before commit: roll everything back first.
                tx.rollback().await.map_err(map_err)?;
                return Ok(Ended::Panicked(panic));
            }
        };
        let settled = match settled {
            Ok(settled) => settled,
            Err(retryable) => {
                tx.rollback().await.map_err(map_err)?;
                return Ok(Ended::Answer(Err(retryable)));
            }
        };
        if settled.failed {
            sqlx::raw_sql(ROLLBACK_TO_SAVEPOINT)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
        }
        let finished = self
            .finish_on(
                &mut tx,
                &lease,
                settled.failed,
                &settled.bytes,
                request.expires_at,
                request.now,
            )
            .await;
        if let Err(e) = finished {
            tx.rollback().await.map_err(map_err)?;
            return Ok(Ended::Answer(Err(e.into())));
        }
        // If the connection drops during COMMIT its fate is unknown: the retryable error
        // sends the client back, and its retry replays or executes, never both.
        tx.commit().await.map_err(map_err)?;
        Ok(Ended::Answer(Ok(settled.into_response())))
    }
}
