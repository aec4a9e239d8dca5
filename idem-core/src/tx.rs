//! Transactional mode: the claim, the business writes and the outcome in one transaction.

use std::future::Future;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::barrier::{Failure, Outcome, Response, RunError};
use crate::codec;
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::record::{Begin, Deadlines, Lease};
use crate::store::Store;
use crate::time::Timestamp;

/// What a concurrent duplicate does while the first request's transaction is open.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum TxPolicy {
    /// Wait for the first transaction to end, then replay its outcome (or execute, if it
    /// rolled back).
    #[default]
    Wait,
    /// Answer [`crate::Error::InProgress`] at once with [`NO_WAIT_RETRY_AFTER`].
    NoWait,
}

/// The `Retry-After` a [`TxPolicy::NoWait`] duplicate gets: an open transaction has no
/// lease deadline to report.
pub const NO_WAIT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// One transactional-mode request, as the barrier hands it to the store.
#[derive(Clone, Copy, Debug)]
pub struct TxRequest<'a> {
    /// The key.
    pub key: &'a Key,
    /// The request's fingerprint, if any.
    pub fingerprint: Option<Fingerprint>,
    /// Lease and retention of the claim; the claim is only visible to others if the store
    /// cannot hide uncommitted rows, and then it is fenced and expires like any lease.
    pub deadlines: Deadlines,
    /// When the outcome may be purged.
    pub expires_at: Timestamp,
    /// The current time.
    pub now: Timestamp,
    /// What a concurrent duplicate does.
    pub policy: TxPolicy,
}

/// A store that can run an operation inside its own transaction.
///
/// # Contract
///
/// `transact` opens one transaction and in it: claims the key exactly as
/// [`Store::begin`] would (mismatch first, replay of a stored outcome, reclaim of an expired
/// lease); runs the operation with the transaction; then
/// - `Ok(value)`: writes `Completed` with the encoded value and commits everything;
/// - `Err(Failure::Permanent(f))`: rolls back the business writes (a savepoint), writes
///   `Failed` with the encoded failure, commits;
/// - `Err(Failure::Retryable(e))`, an encoding error, or the future being dropped: rolls
///   back everything, so no business row and no claim remain.
///
/// A concurrent `transact` on the same key never runs its operation while the first is
/// open: it waits and then replays ([`TxPolicy::Wait`]) or returns
/// [`crate::Error::InProgress`] ([`TxPolicy::NoWait`]). If the commit's result is unknown
/// (a dropped connection), the store answers a retryable [`crate::Error::Store`]; the
/// next request then replays or executes, never both.
pub trait TransactionalStore: Store {
    /// The operation this store accepts: a closure over the store's own transaction.
    type Operation<T, F, E>: Send;

    /// Runs `op` in one transaction with the claim and the outcome.
    fn transact<T, F, E>(
        &self,
        request: TxRequest<'_>,
        op: Self::Operation<T, F, E>,
    ) -> impl Future<Output = Result<Response<T, F>, RunError<E>>> + Send
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static;
}

/// An operation's result, ready to commit: the outcome to return and the bytes to store.
#[derive(Debug)]
pub struct Settled<T, F> {
    /// The outcome to hand back to the caller.
    pub outcome: Outcome<T, F>,
    /// `true` if it is a permanent failure (roll back business writes, store `Failed`).
    pub failed: bool,
    /// The encoded outcome.
    pub bytes: Vec<u8>,
}

impl<T, F> Settled<T, F> {
    /// The fresh (not replayed) response.
    pub fn into_response(self) -> Response<T, F> {
        Response {
            outcome: self.outcome,
            replayed: false,
        }
    }
}

/// Encodes an operation's result for a transactional store: `Err` means roll back
/// everything and return the error.
pub fn settle<T: Serialize, F: Serialize, E>(
    result: Result<T, Failure<F, E>>,
) -> Result<Settled<T, F>, RunError<E>> {
    match result {
        Ok(value) => Ok(Settled {
            bytes: codec::encode(&value)?,
            outcome: Outcome::Completed(value),
            failed: false,
        }),
        Err(Failure::Permanent(failure)) => Ok(Settled {
            bytes: codec::encode(&failure)?,
            outcome: Outcome::Failed(failure),
            failed: true,
        }),
        Err(Failure::Retryable(e)) => Err(RunError::Operation(e)),
    }
}

/// Where a claim leaves a transactional-mode request.
#[derive(Debug)]
pub enum TxClaim<T, F> {
    /// The key is ours: run the operation with this lease.
    Acquired(Lease),
    /// The key has an outcome: answer with it, without running the operation.
    Replay(Response<T, F>),
}

/// Turns a claim's answer into the next step of transactional mode: run, replay, or
/// refuse ([`Error::InProgress`] with the holder's remaining lease, [`Error::Mismatch`]).
pub fn tx_claim<T: DeserializeOwned, F: DeserializeOwned>(
    answer: Begin,
    now: Timestamp,
) -> Result<TxClaim<T, F>, Error> {
    match answer {
        Begin::Acquired(lease) => Ok(TxClaim::Acquired(lease)),
        Begin::Completed { response } => {
            Ok(TxClaim::Replay(Response::from_stored(false, &response)?))
        }
        Begin::Failed { response } => Ok(TxClaim::Replay(Response::from_stored(true, &response)?)),
        Begin::InProgress { lease_until } => Err(Error::InProgress {
            retry_after: lease_until.since(now),
        }),
        Begin::Mismatch => Err(Error::Mismatch),
    }
}
