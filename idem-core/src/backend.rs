//! For store implementors: what a [`Store`](crate::Store) or
//! [`TransactionalStore`](crate::TransactionalStore) needs and an application does not.
//!
//! - [`model`]: the contract as pure functions, for stores that decide in Rust;
//! - [`codec`]: how outcomes are encoded;
//! - [`RecordRow`]: a record as flat columns, the one reading of stored columns (corrupt
//!   data becomes [`Error::Corrupt`] naming the key);
//! - [`TxRequest`], [`settle`] and [`Settled`]: what a transactional store receives and how
//!   it encodes the operation's result;
//! - [`step`]: the one place that turns a `begin` answer into the next step;
//! - [`detach`]: store calls that run to their end whatever happens to the caller's future;
//! - [`AsyncTxFn`]: the async closures a store's `operation()` helper accepts.

use serde::Serialize;

use crate::error::{Error, RunError};
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::outcome::{Failure, Outcome, Replay, Response};
use crate::policy::TxPolicy;
use crate::record::{Begin, Deadlines, Lease};
use crate::time::Timestamp;

pub mod codec;
pub mod detach;
pub mod model;
mod row;

pub use row::RecordRow;

/// An async function of a transaction's connection `C`, as a store's `operation()` helper
/// accepts it (for example `idem_postgres::operation`): implemented for every
/// `async |conn: &mut C| { … }` closure (Rust 1.85) and every closure returning a `Send`
/// future that borrows the connection. Never implement it by hand.
pub trait AsyncTxFn<'c, C: ?Sized + 'c, T, F, E>: FnOnce(&'c mut C) -> Self::Future {
    /// The future the function returns.
    type Future: std::future::Future<Output = Result<T, Failure<F, E>>> + Send + 'c;
}

impl<'c, C, Conn, Fut, T, F, E> AsyncTxFn<'c, Conn, T, F, E> for C
where
    Conn: ?Sized + 'c,
    C: FnOnce(&'c mut Conn) -> Fut,
    Fut: std::future::Future<Output = Result<T, Failure<F, E>>> + Send + 'c,
{
    type Future = Fut;
}

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

/// Where a `begin` answer leaves a request.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Step {
    /// The key is ours: run the operation with this lease.
    Acquired(Lease),
    /// The key has an outcome: answer with it, without running the operation.
    Replay(Replay),
}

/// Turns a `begin` answer into the next step: run, replay, or refuse
/// ([`Error::Mismatch`]; [`Error::InProgress`] with the holder's remaining lease as
/// `retry_after`). The one place this decision is written; the barrier and every
/// transactional store use it.
///
/// ```
/// use idem_core::backend::{step, Step};
/// use idem_core::{Begin, Error, Timestamp};
/// let now = Timestamp::from_millis(1_000);
/// let answer = Begin::Completed { response: idem_core::backend::codec::encode(&7u32)? };
/// let Step::Replay(replay) = step(answer, now)? else { unreachable!() };
/// assert_eq!(replay.decode::<u32, String>()?.outcome, idem_core::Outcome::Completed(7));
/// let busy = Begin::InProgress { lease_until: Timestamp::from_millis(3_500) };
/// assert!(matches!(step(busy, now), Err(Error::InProgress { retry_after })
///     if retry_after.as_millis() == 2_500));
/// # Ok::<(), Error>(())
/// ```
pub fn step(answer: Begin, now: Timestamp) -> Result<Step, Error> {
    match answer {
        Begin::Acquired(lease) => Ok(Step::Acquired(lease)),
        Begin::Completed { response } => Ok(Step::Replay(Replay {
            failed: false,
            response,
        })),
        Begin::Failed { response } => Ok(Step::Replay(Replay {
            failed: true,
            response,
        })),
        Begin::InProgress { lease_until } => Err(Error::InProgress {
            retry_after: lease_until.since(now),
        }),
        Begin::Mismatch => Err(Error::Mismatch),
    }
}
