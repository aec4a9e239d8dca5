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
    /// An unknown name is [`Error::UnknownFormat`].
    pub fn add(&mut self, state: &str, n: u64) -> Result<(), Error> {
        match state {
            "in_progress" => self.in_progress += n,
            "completed" => self.completed += n,
            "failed" => self.failed += n,
            other => {
                return Err(Error::UnknownFormat {
                    format: format!("state {other:?}"),
                })
            }
        }
        Ok(())
    }

    /// All records.
    pub fn total(&self) -> u64 {
        self.in_progress + self.completed + self.failed
    }
}

/// A record as flat columns: the shape SQL tables and key-value stores keep. Converting
/// through it keeps every store's reading of stored data the same, including its errors.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RecordRow {
    /// The fingerprint's bytes, if any (must be 32 bytes).
    pub fingerprint: Option<Vec<u8>>,
    /// [`State::name`].
    pub state: String,
    /// The fencing token (a signed column in SQL; never negative).
    pub token: i64,
    /// The lease deadline in ms (in-progress records only).
    pub lease_until: Option<i64>,
    /// The stored outcome (completed and failed records only).
    pub response: Option<Vec<u8>>,
    /// Creation time in ms.
    pub created_at: i64,
    /// Last change in ms.
    pub updated_at: i64,
    /// Retention deadline in ms.
    pub expires_at: i64,
}

impl RecordRow {
    /// The columns of `record`.
    pub fn from_record(record: &Record) -> Result<Self, Error> {
        let (lease_until, response) = match &record.state {
            State::InProgress { lease_until, .. } => (Some(lease_until.as_millis()), None),
            State::Completed { response } | State::Failed { response } => {
                (None, Some(response.clone()))
            }
        };
        Ok(RecordRow {
            fingerprint: record.fingerprint.map(|f| f.as_bytes().to_vec()),
            state: record.state.name().to_string(),
            token: i64::try_from(record.token.0).map_err(|e| Error::Encode(Box::new(e)))?,
            lease_until,
            response,
            created_at: record.created_at.as_millis(),
            updated_at: record.updated_at.as_millis(),
            expires_at: record.expires_at.as_millis(),
        })
    }

    /// The record of `key` these columns describe: an unknown state is
    /// [`Error::UnknownFormat`]; a missing field, a negative token or a fingerprint that is
    /// not 32 bytes is [`Error::Corrupt`].
    pub fn into_record(self, key: &Key) -> Result<Record, Error> {
        let name = self.state;
        let corrupt = |what: String| Error::Corrupt(format!("{name} record {key}: {what}").into());
        let token = u64::try_from(self.token)
            .map(Token)
            .map_err(|_| corrupt(format!("negative token {}", self.token)))?;
        let fingerprint = match self.fingerprint {
            None => None,
            Some(bytes) => Some(
                Fingerprint::from_slice(&bytes)
                    .ok_or_else(|| corrupt(format!("fingerprint is {} bytes", bytes.len())))?,
            ),
        };
        let response = || {
            self.response
                .clone()
                .ok_or_else(|| corrupt("no response".into()))
        };
        let state = match name.as_str() {
            "in_progress" => State::InProgress {
                token,
                lease_until: Timestamp::from_millis(
                    self.lease_until
                        .ok_or_else(|| corrupt("no lease deadline".into()))?,
                ),
            },
            "completed" => State::Completed {
                response: response()?,
            },
            "failed" => State::Failed {
                response: response()?,
            },
            other => {
                return Err(Error::UnknownFormat {
                    format: format!("state {other:?}"),
                })
            }
        };
        Ok(Record {
            key: key.clone(),
            fingerprint,
            state,
            token,
            created_at: Timestamp::from_millis(self.created_at),
            updated_at: Timestamp::from_millis(self.updated_at),
            expires_at: Timestamp::from_millis(self.expires_at),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: State) -> Record {
        Record {
            key: Key::new("s", "k").unwrap(),
            fingerprint: Some(Fingerprint::of_bytes(b"x")),
            state,
            token: Token(3),
            created_at: Timestamp::from_millis(1),
            updated_at: Timestamp::from_millis(2),
            expires_at: Timestamp::from_millis(3),
        }
    }

    #[test]
    fn rows_round_trip_every_state() {
        for state in [
            State::InProgress {
                token: Token(3),
                lease_until: Timestamp::MIN,
            },
            State::Completed {
                response: vec![1, 0, 255],
            },
            State::Failed { response: vec![] },
        ] {
            let r = record(state);
            let key = r.key.clone();
            assert_eq!(
                RecordRow::from_record(&r)
                    .unwrap()
                    .into_record(&key)
                    .unwrap(),
                r
            );
        }
    }

    #[test]
    fn unreadable_rows_are_typed_errors() {
        let key = Key::new("s", "k").unwrap();
        let row = RecordRow::from_record(&record(State::Completed { response: vec![1] })).unwrap();
        let unknown = RecordRow {
            state: "archived".into(),
            ..row.clone()
        };
        assert!(matches!(
            unknown.into_record(&key),
            Err(Error::UnknownFormat { .. })
        ));
        let no_response = RecordRow {
            response: None,
            ..row.clone()
        };
        assert!(matches!(
            no_response.into_record(&key),
            Err(Error::Corrupt(_))
        ));
        let negative = RecordRow {
            token: -1,
            ..row.clone()
        };
        assert!(matches!(negative.into_record(&key), Err(Error::Corrupt(_))));
        let short = RecordRow {
            fingerprint: Some(vec![0; 31]),
            ..row
        };
        assert!(matches!(short.into_record(&key), Err(Error::Corrupt(_))));
    }
}
