//! Records, their three states, leases and the answers of `begin`.

use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::time::Timestamp;

/// A fencing token. Tokens of one key only grow while its record exists; every
/// write by a lease holder is checked against the record's current token.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Token(pub u64);

/// The state of a record.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum State {
    /// A worker holds (or held) the lease `token` until `lease_until`. A released lease has
    /// `lease_until == Timestamp::MIN`.
    InProgress {
        /// The current fencing token.
        token: Token,
        /// When the lease runs out; after that `begin` may reclaim it.
        lease_until: Timestamp,
    },
    /// The operation finished; `response` is replayed to every retry.
    Completed {
        /// The stored, encoded response.
        response: Vec<u8>,
    },
    /// The operation failed permanently; `response` is replayed to every retry.
    Failed {
        /// The stored, encoded failure.
        response: Vec<u8>,
    },
}

impl State {
    /// The state's name as stores write it: `in_progress`, `completed` or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            State::InProgress { .. } => "in_progress",
            State::Completed { .. } => "completed",
            State::Failed { .. } => "failed",
        }
    }
}

/// One key's stored record.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Record {
    /// The key.
    pub key: Key,
    /// The fingerprint of the request that created it, if one was given.
    pub fingerprint: Option<Fingerprint>,
    /// The state.
    pub state: State,
    /// The highest fencing token handed out for this key.
    pub token: Token,
    /// When the record was created.
    pub created_at: Timestamp,
    /// When the record last changed.
    pub updated_at: Timestamp,
    /// When `purge` may delete it. Never read by `begin`.
    pub expires_at: Timestamp,
}

/// The right to finish one execution of a key, fenced by `token`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Lease {
    /// The key the lease is on.
    pub key: Key,
    /// The fencing token every completion is checked against.
    pub token: Token,
    /// When the lease runs out.
    pub lease_until: Timestamp,
    /// Whether this lease took over an expired lease of another worker.
    pub reclaimed: bool,
}

impl Lease {
    /// A stable child key for a downstream call or outgoing message; see [`Key::derive`].
    pub fn derive(&self, label: &str) -> Key {
        self.key.derive(label)
    }
}

/// Lease deadline and retention for a claim or an extension.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Deadlines {
    /// When the lease runs out.
    pub lease_until: Timestamp,
    /// When `purge` may delete the record; at least `lease_until` plus retention.
    pub expires_at: Timestamp,
}

/// The answer of [`crate::Store::begin`].
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Begin {
    /// The caller now holds the key.
    Acquired(Lease),
    /// Another worker holds a live lease until `lease_until`.
    InProgress {
        /// The holder's lease deadline.
        lease_until: Timestamp,
    },
    /// The key completed before; replay `response`.
    Completed {
        /// The stored response.
        response: Vec<u8>,
    },
    /// The key failed permanently before; replay `response`.
    Failed {
        /// The stored failure.
        response: Vec<u8>,
    },
    /// Both fingerprints are present and differ.
    Mismatch,
}

/// Record counts per state (the status-distribution metric).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Stats {
    /// Records in progress (live, expired or released leases).
    pub in_progress: u64,
    /// Completed records.
    pub completed: u64,
    /// Permanently failed records.
    pub failed: u64,
}

impl Stats {
    /// Adds `n` records in the state named `state` (as [`State::name`] spells it).
    /// An unknown name is [`Error::Corrupt`] (no key: it names a count, not a record).
    pub fn add(&mut self, state: &str, n: u64) -> Result<(), Error> {
        match state {
            "in_progress" => self.in_progress += n,
            "completed" => self.completed += n,
            "failed" => self.failed += n,
            other => return Err(Error::corrupt(format!("unknown record state {other:?}"))),
        }
        Ok(())
    }

    /// All records.
    pub fn total(&self) -> u64 {
        self.in_progress + self.completed + self.failed
    }
}
