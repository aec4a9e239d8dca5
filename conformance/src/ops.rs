//! One-key operations, applied to the sequential model or to a real store.

use idem_core::{
    model, Begin, Deadlines, Error, Fingerprint, Key, Lease, Record, Store, Timestamp,
};

/// An operation on one key, with every input the contract's answer depends on.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Op {
    /// `begin(key, fingerprint, deadlines, now)`.
    Begin {
        /// The incoming fingerprint.
        fingerprint: Option<Fingerprint>,
        /// Lease and retention.
        deadlines: Deadlines,
    },
    /// `complete(lease, response, expires_at, now)` or, with `failed`, `fail(…)`.
    Finish {
        /// The lease presented.
        lease: Lease,
        /// `fail` instead of `complete`.
        failed: bool,
        /// The response to store.
        response: Vec<u8>,
        /// Retention of the outcome.
        expires_at: Timestamp,
    },
    /// `extend(lease, deadlines, now)`.
    Extend {
        /// The lease presented.
        lease: Lease,
        /// The new deadlines.
        deadlines: Deadlines,
    },
    /// `release(lease, now)`.
    Release {
        /// The lease presented.
        lease: Lease,
    },
    /// `get(key)`.
    Get,
}

/// What an operation answered. Errors other than `LeaseLost` are not part of the model.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Ret {
    /// `begin`'s answer.
    Begin(Begin),
    /// `complete`, `fail` or `release`: `true` if accepted, `false` for `LeaseLost`.
    Fenced(bool),
    /// `extend`'s new lease, or `None` for `LeaseLost`.
    Extend(Option<Lease>),
    /// `get`'s record.
    Get(Option<Record>),
}

/// Applies `op` to the model state `rec`: the answer and the state after.
pub fn step(rec: Option<&Record>, key: &Key, op: &Op, now: Timestamp) -> (Ret, Option<Record>) {
    let same = rec.cloned();
    match op {
        Op::Begin {
            fingerprint,
            deadlines,
        } => {
            let (answer, next) = model::begin(rec, key, fingerprint.as_ref(), *deadlines, now);
            (Ret::Begin(answer), next.or(same))
        }
        Op::Finish {
            lease,
            failed,
            response,
            expires_at,
        } => match model::finish(rec, lease, *failed, response, *expires_at, now) {
            Ok(next) => (Ret::Fenced(true), Some(next)),
            Err(_) => (Ret::Fenced(false), same),
        },
        Op::Extend { lease, deadlines } => match model::extend(rec, lease, *deadlines, now) {
            Ok((lease, next)) => (Ret::Extend(Some(lease)), Some(next)),
            Err(_) => (Ret::Extend(None), same),
        },
        Op::Release { lease } => match model::release(rec, lease, now) {
            Ok(next) => (Ret::Fenced(true), Some(next)),
            Err(_) => (Ret::Fenced(false), same),
        },
        Op::Get => (Ret::Get(same.clone()), same),
    }
}

/// Applies `op` to a store. `Err` is anything but an answer of the model (a store error).
pub async fn apply<S: Store + ?Sized>(
    store: &S,
    key: &Key,
    op: &Op,
    now: Timestamp,
) -> Result<Ret, Error> {
    fn fenced(r: Result<(), Error>) -> Result<Ret, Error> {
        match r {
            Ok(()) => Ok(Ret::Fenced(true)),
            Err(Error::LeaseLost) => Ok(Ret::Fenced(false)),
            Err(e) => Err(e),
        }
    }
    match op {
        Op::Begin {
            fingerprint,
            deadlines,
        } => Ok(Ret::Begin(
            store
                .begin(key, fingerprint.as_ref(), *deadlines, now)
                .await?,
        )),
        Op::Finish {
            lease,
            failed: false,
            response,
            expires_at,
        } => fenced(store.complete(lease, response, *expires_at, now).await),
        Op::Finish {
            lease,
            failed: true,
            response,
            expires_at,
        } => fenced(store.fail(lease, response, *expires_at, now).await),
        Op::Extend { lease, deadlines } => match store.extend(lease, *deadlines, now).await {
            Ok(lease) => Ok(Ret::Extend(Some(lease))),
            Err(Error::LeaseLost) => Ok(Ret::Extend(None)),
            Err(e) => Err(e),
        },
        Op::Release { lease } => fenced(store.release(lease, now).await),
        Op::Get => Ok(Ret::Get(store.get(key).await?)),
    }
}
