//! One-key operations, applied to the sequential model or to a real store.

use idem_core::{
    backend::model, Begin, Deadlines, Error, Fingerprint, Key, Lease, Record, Store, Timestamp,
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
    /// `purge(now, batch)`, seen from one key: it deletes the record if its `expires_at` has
    /// passed, or may leave it (the batch was full of other records, or the row was busy).
    Purge {
        /// The batch size passed.
        batch: usize,
    },
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
    /// `purge`'s count (over all keys, so a per-key history does not compare it).
    Purged(u64),
}

impl Ret {
    /// Whether `got`, returned by a store for `op`, is the answer `want` of the model.
    pub fn matches(op: &Op, got: &Ret, want: &Ret) -> bool {
        match op {
            Op::Purge { .. } => matches!(got, Ret::Purged(_)),
            _ => got == want,
        }
    }
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
        Op::Purge { .. } => match rec {
            Some(r) if r.expires_at <= now => (Ret::Purged(1), None),
            _ => (Ret::Purged(0), same),
        },
    }
}

/// Every answer and state the model allows for `op`: one, except for a purge of an expired
/// record, which may delete it or (batch full, row busy) leave it.
pub fn outcomes(
    rec: Option<&Record>,
    key: &Key,
    op: &Op,
    now: Timestamp,
) -> Vec<(Ret, Option<Record>)> {
    let first = step(rec, key, op, now);
    match op {
        Op::Purge { .. } if first.1.is_none() && rec.is_some() => {
            vec![first, (Ret::Purged(0), rec.cloned())]
        }
        _ => vec![first],
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
        Op::Purge { batch } => Ok(Ret::Purged(store.purge(now, *batch).await?)),
    }
}
