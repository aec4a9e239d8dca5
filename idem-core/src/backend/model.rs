//! The contract as pure functions: the reference model of one key's record.
//!
//! [`crate::MemoryStore`] is these functions behind a mutex; stores that decide in Rust
//! inside a database transaction (SQLite, FoundationDB) call them too, so the rules are
//! written once. The conformance suite compares every store's answers with them.

use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::record::{Begin, Deadlines, Lease, Record, State, Token};
use crate::time::Timestamp;

/// The answer to `begin` on `existing`, and the record to write (if it changes).
pub fn begin(
    existing: Option<&Record>,
    key: &Key,
    fingerprint: Option<&Fingerprint>,
    deadlines: Deadlines,
    now: Timestamp,
) -> (Begin, Option<Record>) {
    let Some(rec) = existing else {
        let lease = Lease {
            key: key.clone(),
            token: Token(1),
            lease_until: deadlines.lease_until,
            reclaimed: false,
        };
        let rec = Record {
            key: key.clone(),
            fingerprint: fingerprint.copied(),
            state: State::InProgress {
                token: Token(1),
                lease_until: deadlines.lease_until,
            },
            token: Token(1),
            created_at: now,
            updated_at: now,
            expires_at: deadlines.expires_at,
        };
        return (Begin::Acquired(lease), Some(rec));
    };
    if mismatch(rec.fingerprint.as_ref(), fingerprint) {
        return (Begin::Mismatch, None);
    }
    match &rec.state {
        State::Completed { response } => (
            Begin::Completed {
                response: response.clone(),
            },
            None,
        ),
        State::Failed { response } => (
            Begin::Failed {
                response: response.clone(),
            },
            None,
        ),
        State::InProgress { lease_until, .. } if *lease_until > now => (
            Begin::InProgress {
                lease_until: *lease_until,
            },
            None,
        ),
        State::InProgress { lease_until, .. } => {
            let token = Token(rec.token.0 + 1);
            let lease = Lease {
                key: key.clone(),
                token,
                lease_until: deadlines.lease_until,
                reclaimed: *lease_until != Timestamp::MIN,
            };
            let next = Record {
                fingerprint: rec.fingerprint.or(fingerprint.copied()),
                state: State::InProgress {
                    token,
                    lease_until: deadlines.lease_until,
                },
                token,
                updated_at: now,
                expires_at: rec.expires_at.max(deadlines.expires_at),
                ..rec.clone()
            };
            (Begin::Acquired(lease), Some(next))
        }
    }
}

/// Whether two fingerprints are both present and differ.
pub fn mismatch(stored: Option<&Fingerprint>, incoming: Option<&Fingerprint>) -> bool {
    matches!((stored, incoming), (Some(a), Some(b)) if a != b)
}

/// Checks that `lease` is the live lease of `existing` (right token, not released).
pub fn fence(existing: Option<&Record>, lease: &Lease) -> Result<(), Error> {
    match existing.map(|r| &r.state) {
        Some(State::InProgress { token, lease_until })
            if *token == lease.token && *lease_until != Timestamp::MIN =>
        {
            Ok(())
        }
        _ => Err(Error::LeaseLost),
    }
}

/// The record after a fenced `complete` (`failed == false`) or `fail` (`failed == true`).
pub fn finish(
    existing: Option<&Record>,
    lease: &Lease,
    failed: bool,
    response: &[u8],
    expires_at: Timestamp,
    now: Timestamp,
) -> Result<Record, Error> {
    fence(existing, lease)?;
    let rec = existing.ok_or(Error::LeaseLost)?;
    let response = response.to_vec();
    Ok(Record {
        state: if failed {
            State::Failed { response }
        } else {
            State::Completed { response }
        },
        updated_at: now,
        expires_at,
        ..rec.clone()
    })
}

/// The lease and record after a fenced `extend`.
pub fn extend(
    existing: Option<&Record>,
    lease: &Lease,
    deadlines: Deadlines,
    now: Timestamp,
) -> Result<(Lease, Record), Error> {
    fence(existing, lease)?;
    let rec = existing.ok_or(Error::LeaseLost)?;
    let next = Record {
        state: State::InProgress {
            token: lease.token,
            lease_until: deadlines.lease_until,
        },
        updated_at: now,
        expires_at: rec.expires_at.max(deadlines.expires_at),
        ..rec.clone()
    };
    let lease = Lease {
        lease_until: deadlines.lease_until,
        ..lease.clone()
    };
    Ok((lease, next))
}

/// The record after a fenced `release`.
pub fn release(existing: Option<&Record>, lease: &Lease, now: Timestamp) -> Result<Record, Error> {
    fence(existing, lease)?;
    let rec = existing.ok_or(Error::LeaseLost)?;
    Ok(Record {
        state: State::InProgress {
            token: lease.token,
            lease_until: Timestamp::MIN,
        },
        updated_at: now,
        ..rec.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(lease: i64) -> Deadlines {
        Deadlines {
            lease_until: Timestamp::from_millis(lease),
            expires_at: Timestamp::from_millis(lease + 1000),
        }
    }

    fn key() -> Key {
        Key::new("s", "k").unwrap()
    }

    fn acquire(rec: Option<&Record>, now: i64) -> (Lease, Record) {
        match begin(rec, &key(), None, d(now + 10), Timestamp::from_millis(now)) {
            (Begin::Acquired(l), Some(r)) => (l, r),
            other => panic!("expected acquire, got {other:?}"),
        }
    }

    #[test]
    fn release_then_begin_gives_a_new_token_that_is_not_a_reclaim() {
        let (l1, r1) = acquire(None, 0);
        let r2 = release(Some(&r1), &l1, Timestamp::from_millis(1)).unwrap();
        assert!(matches!(
            release(Some(&r2), &l1, Timestamp::from_millis(1)),
            Err(Error::LeaseLost)
        ));
        let (l2, _) = acquire(Some(&r2), 2);
        assert_eq!(l2.token, Token(2));
        assert!(!l2.reclaimed);
    }

    #[test]
    fn expired_lease_is_reclaimed_and_zombie_is_fenced() {
        let (l1, r1) = acquire(None, 0);
        let (l2, r2) = acquire(Some(&r1), 10);
        assert!(l2.reclaimed);
        assert!(matches!(
            finish(
                Some(&r2),
                &l1,
                false,
                b"x",
                Timestamp::from_millis(99),
                Timestamp::from_millis(11)
            ),
            Err(Error::LeaseLost)
        ));
        let done = finish(
            Some(&r2),
            &l2,
            false,
            b"y",
            Timestamp::from_millis(99),
            Timestamp::from_millis(11),
        )
        .unwrap();
        assert_eq!(
            done.state,
            State::Completed {
                response: b"y".to_vec()
            }
        );
    }

    #[test]
    fn mismatch_is_checked_before_replay_and_in_flight() {
        let fa = Fingerprint::of_bytes(b"a");
        let fb = Fingerprint::of_bytes(b"b");
        let (ans, rec) = begin(None, &key(), Some(&fa), d(10), Timestamp::from_millis(0));
        assert!(matches!(ans, Begin::Acquired(_)));
        let rec = rec.unwrap();
        let (ans, _) = begin(
            Some(&rec),
            &key(),
            Some(&fb),
            d(10),
            Timestamp::from_millis(1),
        );
        assert_eq!(ans, Begin::Mismatch);
        let (ans, _) = begin(Some(&rec), &key(), None, d(10), Timestamp::from_millis(1));
        assert!(matches!(ans, Begin::InProgress { .. }));
    }
}
