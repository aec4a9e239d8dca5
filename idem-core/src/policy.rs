//! What a request does when another request holds its key.

use std::time::Duration;

/// What a concurrent duplicate does while the first request's transaction is open
/// (transactional mode).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum TxPolicy {
    /// Wait for the first transaction to end, then replay its outcome (or execute, if it
    /// rolled back).
    #[default]
    Wait,
    /// Answer [`crate::Error::InProgress`] at once. Its `retry_after` is the barrier's
    /// typical operation duration when it has measured one, capped at
    /// [`NO_WAIT_RETRY_AFTER`] (see [`crate::Barrier::typical_duration`]).
    NoWait,
    /// Run the operation first and claim the key together with its outcome, just before
    /// the commit: one statement fewer on a key never seen, the common case.
    ///
    /// The key's unique index still decides: a concurrent duplicate's claim waits for the
    /// first transaction, and if that one committed, the duplicate rolls its own work back
    /// and replays. No key ever commits twice. What changes: **the operation may run and be
    /// rolled back**. A duplicate of a key in flight, and a retry of a completed key, run
    /// the operation once more inside a transaction that never commits. Choose it only
    /// where the operation's effects are its writes in the transaction (as transactional
    /// mode assumes anyway) and retries are rare next to first attempts.
    ///
    /// If the key's record cannot be taken (an outcome to replay, a mismatching fingerprint,
    /// a live lease), the answer is what [`TxPolicy::Wait`] gives. If the record changed
    /// between the claim and that reading (a lease released or purged in between), the
    /// answer is [`crate::Error::InProgress`] with a zero `retry_after`: the operation
    /// already ran and cannot run again in this call, so the caller retries.
    ///
    /// A store that cannot claim at commit runs it as [`TxPolicy::Wait`]; its docs say
    /// which it does. PostgreSQL claims at commit.
    Optimistic,
}

/// The `Retry-After` a store answers a [`TxPolicy::NoWait`] duplicate with (an open
/// transaction has no lease deadline to report), and the longest the barrier passes on.
pub const NO_WAIT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// What a lease-mode request does when another worker holds a live lease on its key
/// ([`crate::Barrier::begin_with`], [`crate::Barrier::execute_with`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum InFlight {
    /// Answer [`crate::Error::InProgress`] at once (HTTP 409 with `Retry-After`).
    #[default]
    Reject,
    /// Ask the store again, with exponential backoff from 5 ms up to 250 ms between
    /// attempts, until the key has an outcome (replay), is free (acquire), or this much time
    /// has passed (then [`crate::Error::InProgress`]). Waiting affects liveness only: every
    /// attempt is an ordinary claim. Sleeps with `tokio::time::sleep`, so it needs a Tokio
    /// runtime with the time driver enabled.
    Wait(Duration),
}
