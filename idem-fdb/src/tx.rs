//! Transactional mode: claim, business writes and outcome in one FoundationDB transaction.

use std::convert::Infallible;
use std::future::Future;

use foundationdb::{FdbError, Transaction};
use futures::future::BoxFuture;
use idem_core::backend::{model, settle, step, Step, TxRequest};
use idem_core::{Begin, Failure, Lease, Record, Response, RunError, State, TransactionalStore};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::keys::Stored;
use crate::store::{claim_id, Abort, Attempted, FdbStore};

/// The operation [`FdbStore`] runs in transactional mode.
///
/// **FoundationDB may run it more than once**: after a conflict or a retryable error the
/// whole transaction is retried, the operation included. It must touch nothing but the
/// transaction it is given (no HTTP calls, no e-mails, no counters in memory): only then is
/// every run but the committed one without effect.
pub type FdbOperation<T, F, E> =
    Box<dyn for<'t> Fn(&'t Transaction) -> BoxFuture<'t, Result<T, Failure<F, E>>> + Send + Sync>;

/// An async function of the transaction: what [`operation`] accepts. It is implemented for
/// every `async |tx: &Transaction| { … }` closure (Rust 1.85) that can be called more than
/// once, and every such closure returning a `Send` future that borrows the transaction;
/// never implement it by hand.
pub trait FdbTxFn<'t, T, F, E>: Fn(&'t Transaction) -> Self::Future {
    /// The future the function returns.
    type Future: Future<Output = Result<T, Failure<F, E>>> + Send + 't;
}

impl<'t, C, Fut, T, F, E> FdbTxFn<'t, T, F, E> for C
where
    C: Fn(&'t Transaction) -> Fut,
    Fut: Future<Output = Result<T, Failure<F, E>>> + Send + 't,
{
    type Future = Fut;
}

/// An [`FdbOperation`] from a plain async closure, without boxing by hand. FoundationDB may
/// run it more than once (see [`FdbOperation`]).
///
/// ```no_run
/// use idem_core::Failure;
/// use idem_fdb::{foundationdb::Transaction, operation, FdbOperation};
/// let op: FdbOperation<u64, String, std::convert::Infallible> =
///     operation(async |tx: &Transaction| {
///         tx.set(b"ledger/order-1", b"100");
///         Ok(100)
///     });
/// ```
pub fn operation<C, T, F, E>(op: C) -> FdbOperation<T, F, E>
where
    C: for<'t> FdbTxFn<'t, T, F, E> + Send + Sync + 'static,
{
    Box::new(move |tx| Box::pin(op(tx)))
}

impl TransactionalStore for FdbStore {
    type Operation<T, F, E> = FdbOperation<T, F, E>;

    /// Claim, business writes and outcome in one FoundationDB transaction.
    ///
    /// FoundationDB never blocks: a concurrent duplicate runs optimistically, exactly one of
    /// the conflicting transactions commits, and the others are retried, find the outcome and
    /// replay it. So [`idem_core::TxPolicy::Wait`] and `NoWait` behave the same here, and the
    /// operation may run more than once (see [`FdbOperation`]) while only one run commits.
    /// A permanent failure resets the transaction (dropping the business writes), claims
    /// again and records `Failed`. After `commit_unknown_result` the retry re-reads the
    /// record and, if its own outcome is there, returns it instead of writing again.
    async fn transact<T, F, E>(
        &self,
        request: TxRequest<'_>,
        op: FdbOperation<T, F, E>,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
    {
        let claim = claim_id();
        let TxRequest {
            key,
            fingerprint,
            deadlines,
            expires_at,
            now,
            ..
        } = request;
        let fp = fingerprint.as_ref();
        let op = &op;
        let fresh = Attempted {
            id: claim,
            maybe_committed: false,
        };
        self.run(Box::new(move |mut trx, maybe_committed| {
            Box::pin(async move {
                let result = async {
                    if maybe_committed {
                        if let Some(s) = self.read(&trx, key).await.map_err(lift_abort)? {
                            let mine = s.claim == claim;
                            match &s.record.state {
                                State::Completed { response } if mine => {
                                    return Ok(Response {
                                        replayed: false,
                                        ..Response::from_stored(false, response)?
                                    })
                                }
                                State::Failed { response } if mine => {
                                    return Ok(Response {
                                        replayed: false,
                                        ..Response::from_stored(true, response)?
                                    })
                                }
                                _ => {}
                            }
                        }
                    }
                    let (answer, _) = self
                        .claim_in(&trx, key, fp, deadlines, now, fresh)
                        .await
                        .map_err(lift_abort)?;
                    let lease = match step(answer, now)? {
                        Step::Acquired(lease) => lease,
                        Step::Replay(replay) => return Ok(replay.decode()?),
                    };
                    let settled = settle(op(&trx).await).map_err(Abort::Run)?;
                    let claimed = if settled.failed {
                        // Drop the business writes, then claim again in the clean transaction.
                        trx.reset();
                        match self
                            .claim_in(&trx, key, fp, deadlines, now, fresh)
                            .await
                            .map_err(lift_abort)?
                        {
                            (Begin::Acquired(_), Some(rec)) => rec,
                            _ => return Err(Abort::Fdb(FdbError::from_code(1020))),
                        }
                    } else {
                        match self.read(&trx, key).await.map_err(lift_abort)? {
                            Some(s) => s.record,
                            None => return Err(Abort::Fdb(FdbError::from_code(1020))),
                        }
                    };
                    let done = model::finish(
                        Some(&claimed),
                        &lease_for(&claimed, &lease),
                        settled.failed,
                        &settled.bytes,
                        expires_at,
                        now,
                    )?;
                    self.write(
                        &trx,
                        Some(&claimed),
                        &Stored {
                            record: done,
                            claim,
                            reclaimed: lease.reclaimed,
                        },
                    )?;
                    Ok(settled.into_response())
                }
                .await;
                (trx, result)
            })
        }))
        .await
    }
}

/// The lease as it stands in `claimed` (the token may differ after a re-claim).
fn lease_for(claimed: &Record, lease: &Lease) -> Lease {
    match claimed.state {
        State::InProgress { token, lease_until } => Lease {
            token,
            lease_until,
            ..lease.clone()
        },
        _ => lease.clone(),
    }
}

/// Widens an attempt's error from a lease-mode step (which has no operation error) to a
/// transactional one.
fn lift_abort<E>(a: Abort<Infallible>) -> Abort<E> {
    match a {
        Abort::Fdb(e) => Abort::Fdb(e),
        Abort::Run(RunError::Barrier(e)) => Abort::Run(RunError::Barrier(e)),
        Abort::Run(RunError::Operation(never)) => match never {},
    }
}
