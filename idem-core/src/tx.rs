//! Transactional mode: the claim, the business writes and the outcome in one transaction.

use std::future::Future;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use crate::backend::TxRequest;
use crate::barrier::Barrier;
use crate::error::{Error, RunError};
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::metrics as m;
use crate::outcome::Response;
use crate::policy::TxPolicy;
use crate::store::Store;

/// A store that can run an operation inside its own transaction.
///
/// # Contract
///
/// `transact` claims the key exactly as [`Store::begin`] would (mismatch first, replay of a
/// stored outcome without running the operation, reclaim of an expired lease), runs the
/// operation with the store's transaction, and then, atomically with the claim:
/// - `Ok(value)`: the business writes and a `Completed` record with the encoded value
///   become visible together;
/// - `Err(Failure::Permanent(f))`: none of the operation's business writes remain; a
///   `Failed` record with the encoded failure becomes visible;
/// - `Err(Failure::Retryable(e))`, an encoding error, or a crash: nothing remains, neither
///   business writes nor a claim, and the next request with the key executes.
///
/// Dropping the returned future never leaves half a transaction: the transaction either commits
/// whole (claim, business writes and outcome) or leaves nothing. Which one depends on the store
/// (one that runs the transaction to its end, as `detached` does, lets it finish; one that stops
/// where the caller's future was dropped rolls it back); the store's docs say which. Either way the
/// next request with the key replays the committed outcome or executes, never both.
///
/// A concurrent `transact` on the same key never runs its operation while the first can
/// still commit: it waits and then replays or executes ([`TxPolicy::Wait`]) or returns
/// [`crate::Error::InProgress`] ([`TxPolicy::NoWait`]). The one exception is
/// [`TxPolicy::Optimistic`], which a store may honour by running the operation before it
/// claims the key; then a duplicate's operation may run, but its transaction never commits
/// when the key already has an outcome or a live claim (a store that does not claim at
/// commit runs it as [`TxPolicy::Wait`]). If the commit's result is unknown
/// (a dropped connection), the store answers a retryable [`crate::Error::Store`]; the
/// next request then replays or executes, never both.
pub trait TransactionalStore: Store {
    /// The operation this store accepts: a closure over the store's own transaction.
    type Operation<T, F, E>: Send;

    /// Whether the store honours [`TxPolicy::Optimistic`] by claiming the key at commit
    /// (after the operation). `false`, the default: it runs `Optimistic` as
    /// [`TxPolicy::Wait`].
    const CLAIMS_AT_COMMIT: bool = false;

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

impl<S: TransactionalStore> Barrier<S> {
    /// Runs `op` inside the store's transaction together with the claim and the outcome
    /// (transactional mode).
    ///
    /// The operation's type is the store's own ([`TransactionalStore::Operation`]): it
    /// receives the store's transaction and writes business data through it. `Ok` commits
    /// the business writes with a `Completed` record; [`Failure::Permanent`](crate::Failure::Permanent) rolls the
    /// business writes back and commits a `Failed` record; [`Failure::Retryable`](crate::Failure::Retryable) or a
    /// crash roll everything back and leave no record behind. A dropped future leaves the
    /// whole transaction committed or nothing (see [`TransactionalStore`]'s contract): a retry
    /// replays or executes, never both. A concurrent
    /// duplicate waits for the first and replays it ([`TxPolicy::Wait`]) or gets
    /// [`Error::InProgress`] at once ([`TxPolicy::NoWait`]); it never executes twice.
    /// [`TxPolicy::Optimistic`] trades that last promise for one statement fewer: the
    /// operation may run and be rolled back, and the key still never commits twice.
    pub async fn transaction<T, F, E>(
        &self,
        key: &Key,
        fingerprint: Option<Fingerprint>,
        policy: TxPolicy,
        op: S::Operation<T, F, E>,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
    {
        let span = tracing::info_span!(
            "idem.transaction",
            scope = key.scope(),
            id = key.id(),
            result = tracing::field::Empty
        );
        let now = self.clock.now();
        let request = TxRequest {
            key,
            fingerprint,
            deadlines: self.deadlines(now),
            expires_at: self.expiry(now),
            now,
            policy,
        };
        let started = std::time::Instant::now();
        let mut result = self
            .store
            .transact(request, op)
            .instrument(span.clone())
            .await;
        match &mut result {
            Ok(r) if !r.replayed => self.observe_duration(started.elapsed()),
            // The store knows the key is held, not for how long the work takes: no later
            // than the store says, sooner if this process's operations are faster.
            Err(RunError::Barrier(Error::InProgress { retry_after })) => {
                *retry_after = self.retry_after(*retry_after);
            }
            _ => {}
        }
        let label = m::call_result(&result);
        // The claim counter sees an operation that ran, however it ended, as an acquisition.
        m::begin(match label {
            "executed" | "operation_error" => "acquired",
            other => other,
        });
        span.record("result", label);
        m::call("transactional", label, started.elapsed());
        result
    }
}
