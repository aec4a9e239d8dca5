//! What an operation ends with, and what the barrier answers.

use serde::de::DeserializeOwned;

use crate::backend::codec;
use crate::error::Error;

/// How an operation ended.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Outcome<T, F> {
    /// It succeeded with `T`.
    Completed(T),
    /// It failed permanently with `F` (a declined card, a validation error).
    Failed(F),
}

/// What the barrier answers: the outcome, and whether it was replayed from the store.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Response<T, F> {
    /// The operation's outcome, fresh or replayed.
    pub outcome: Outcome<T, F>,
    /// `true` when the outcome came from the store and the operation did not run.
    pub replayed: bool,
}

impl<T: DeserializeOwned, F: DeserializeOwned> Response<T, F> {
    /// Decodes a stored outcome for replay.
    pub fn from_stored(failed: bool, bytes: &[u8]) -> Result<Self, Error> {
        let outcome = if failed {
            Outcome::Failed(codec::decode(bytes)?)
        } else {
            Outcome::Completed(codec::decode(bytes)?)
        };
        Ok(Response {
            outcome,
            replayed: true,
        })
    }
}

/// How an operation failed.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Failure<F, E> {
    /// A permanent failure: stored as `Failed` and replayed to every retry.
    Permanent(F),
    /// A retryable failure: nothing is stored, the key is released, and the next
    /// request with the key executes.
    Retryable(E),
}

/// A stored outcome found by a claim, not yet decoded.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Replay {
    /// `true` for a permanent failure, `false` for a completion.
    pub failed: bool,
    /// The encoded outcome.
    pub response: Vec<u8>,
}

impl Replay {
    /// Decodes the stored outcome.
    pub fn decode<T: DeserializeOwned, F: DeserializeOwned>(
        &self,
    ) -> Result<Response<T, F>, Error> {
        Response::from_stored(self.failed, &self.response)
    }
}
