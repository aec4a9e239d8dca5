//! Key layout and stored value format.
//!
//! Under the prefix `P` (default `idem/`), one record is two keys:
//!
//! - `P m/<NNN>/<scope>/<id>` → the record's metadata ([`encode_meta`]): state, token,
//!   lease deadline, timestamps, fingerprint and the claim id of the `begin` that wrote it;
//! - `P o/<NNN>/<scope>/<id>` → the stored outcome bytes (completed and failed records only).
//!
//! `NNN` is the scope's length in bytes as three decimal digits, so the scope ends at a known
//! byte and the id is the rest: two different `(scope, id)` pairs never share a key, whatever
//! bytes they hold (`("a/b", "c")` is `003/a/b/c`, `("a", "b/c")` is `001/a/b/c`). The keys
//! stay readable with `etcdctl get --prefix`. Metadata and outcomes live in two ranges so
//! that `purge` and `stats` scan only the small metadata values.

use idem_core::backend::RecordRow;
use idem_core::{Error, Key, Record};

/// The metadata format this crate writes (first byte of every metadata value).
const FORMAT: u8 = 1;
/// Fixed part of a metadata value: format, state, token, lease deadline, three timestamps,
/// claim id, fingerprint length.
const FIXED: usize = 1 + 1 + 8 * 6 + 1;

/// The state names of [`RecordRow::state`], by their stored byte.
const STATES: [(u8, &str); 3] = [(1, "in_progress"), (2, "completed"), (3, "failed")];

/// The keys of one store's namespace.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    meta: Vec<u8>,
    outcome: Vec<u8>,
}

impl Keys {
    /// The layout under `prefix` (already validated).
    pub(crate) fn new(prefix: &str) -> Self {
        Keys {
            meta: format!("{prefix}m/").into_bytes(),
            outcome: format!("{prefix}o/").into_bytes(),
        }
    }

    fn suffix(key: &Key) -> Vec<u8> {
        let mut out = format!("{:03}/", key.scope().len()).into_bytes();
        out.extend_from_slice(key.scope().as_bytes());
        out.push(b'/');
        out.extend_from_slice(key.id().as_bytes());
        out
    }

    /// The metadata key of `key`.
    pub(crate) fn meta(&self, key: &Key) -> Vec<u8> {
        [self.meta.as_slice(), &Self::suffix(key)].concat()
    }

    /// The outcome key of `key`.
    pub(crate) fn outcome(&self, key: &Key) -> Vec<u8> {
        [self.outcome.as_slice(), &Self::suffix(key)].concat()
    }

    /// The outcome key belonging to the metadata key `meta`.
    pub(crate) fn outcome_of(&self, meta: &[u8]) -> Vec<u8> {
        let rest = meta.get(self.meta.len()..).unwrap_or_default();
        [self.outcome.as_slice(), rest].concat()
    }

    /// `[start, end)` of every metadata key.
    pub(crate) fn meta_range(&self) -> (Vec<u8>, Vec<u8>) {
        below(self.meta.clone())
    }

    /// `[start, end)` of the metadata keys of `scope`'s records (`m/<NNN>/<scope>/…`), or
    /// of every record's with `None`.
    pub(crate) fn meta_range_of(&self, scope: Option<&str>) -> (Vec<u8>, Vec<u8>) {
        let Some(scope) = scope else {
            return self.meta_range();
        };
        let mut start = self.meta.clone();
        start.extend_from_slice(format!("{:03}/{scope}/", scope.len()).as_bytes());
        below(start)
    }

    /// The key a metadata key names; anything else under the prefix is [`Error::Corrupt`].
    pub(crate) fn parse_meta(&self, raw: &[u8]) -> Result<Key, Error> {
        let bad = || {
            Error::corrupt(format!(
                "etcd key {:?} is not an idem record key",
                String::from_utf8_lossy(raw)
            ))
        };
        let rest = raw.strip_prefix(self.meta.as_slice()).ok_or_else(bad)?;
        let digits = rest.get(..3).ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(digits)
            .ok()
            .filter(|d| d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
            .ok_or_else(bad)?;
        let body = rest.get(3..).ok_or_else(bad)?;
        let (scope, id) = match (body.first(), body.get(1..1 + len), body.get(1 + len..)) {
            (Some(b'/'), Some(scope), Some(tail)) if tail.first() == Some(&b'/') => {
                (scope, &tail[1..])
            }
            _ => return Err(bad()),
        };
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| bad());
        Key::new(text(scope)?, text(id)?).map_err(|_| bad())
    }
}

/// `[prefix, end)`: every key under `prefix`, which ends in `/` (`/` + 1 is `0`, the first
/// byte past every key under it).
fn below(prefix: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let mut end = prefix.clone();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    (prefix, end)
}

/// A record as stored, with the claim id of the `begin` that last claimed it (0 for
/// records written by anything else).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stored {
    pub record: Record,
    pub claim: u64,
}

/// The metadata value of `record` (its outcome goes to the outcome key).
pub(crate) fn encode_meta(record: &Record, claim: u64) -> Result<Vec<u8>, Error> {
    let row = RecordRow::from_record(record)?;
    let state = STATES
        .iter()
        .find(|(_, name)| *name == row.state)
        .map(|(b, _)| *b)
        .ok_or_else(|| Error::Encode(format!("unknown state {}", row.state).into()))?;
    let fingerprint = row.fingerprint.unwrap_or_default();
    let mut out = Vec::with_capacity(FIXED + fingerprint.len());
    out.push(FORMAT);
    out.push(state);
    for n in [
        row.token,
        row.lease_until.unwrap_or(0),
        row.created_at,
        row.updated_at,
        row.expires_at,
    ] {
        out.extend_from_slice(&n.to_be_bytes());
    }
    out.extend_from_slice(&claim.to_be_bytes());
    out.push(fingerprint.len() as u8);
    out.extend_from_slice(&fingerprint);
    Ok(out)
}

fn corrupt(key: &Key, what: String) -> Error {
    Error::corrupt_key(key, format!("etcd record: {what}"))
}

/// The state name of a stored metadata value (all `stats` reads).
pub(crate) fn decode_state(key: &Key, meta: &[u8]) -> Result<&'static str, Error> {
    match meta.first() {
        None => return Err(corrupt(key, "empty metadata".into())),
        Some(&FORMAT) => {}
        Some(other) => {
            return Err(Error::UnknownFormat {
                format: format!("etcd record format {other:#04x}"),
            })
        }
    }
    let byte = *meta
        .get(1)
        .ok_or_else(|| corrupt(key, "metadata has no state".into()))?;
    STATES
        .iter()
        .find(|(b, _)| *b == byte)
        .map(|(_, name)| *name)
        .ok_or_else(|| corrupt(key, format!("unknown state {byte:#04x}")))
}

/// The expiry of a stored metadata value, for `purge`.
pub(crate) fn decode_expires_at(key: &Key, meta: &[u8]) -> Result<i64, Error> {
    Ok(decode_meta(key, meta, None)?.2)
}

/// The fields of a metadata value: the row without its response, the claim id and the
/// expiry.
fn decode_meta(
    key: &Key,
    meta: &[u8],
    response: Option<Vec<u8>>,
) -> Result<(RecordRow, u64, i64), Error> {
    let state = decode_state(key, meta)?;
    if meta.len() < FIXED {
        return Err(corrupt(key, format!("metadata is {} bytes", meta.len())));
    }
    let int = |i: usize| {
        let start = 2 + 8 * i;
        let mut b = [0u8; 8];
        b.copy_from_slice(&meta[start..start + 8]);
        b
    };
    let fp_len = usize::from(meta[FIXED - 1]);
    let fingerprint = meta.get(FIXED..);
    if fingerprint.map(<[u8]>::len) != Some(fp_len) {
        return Err(corrupt(
            key,
            format!(
                "metadata is {} bytes for a {fp_len}-byte fingerprint",
                meta.len()
            ),
        ));
    }
    let expires_at = i64::from_be_bytes(int(4));
    let row = RecordRow {
        fingerprint: (fp_len > 0).then(|| meta[FIXED..].to_vec()),
        state: state.to_string(),
        token: i64::from_be_bytes(int(0)),
        lease_until: (state == "in_progress").then(|| i64::from_be_bytes(int(1))),
        response,
        created_at: i64::from_be_bytes(int(2)),
        updated_at: i64::from_be_bytes(int(3)),
        expires_at,
    };
    Ok((row, u64::from_be_bytes(int(5)), expires_at))
}

/// The record stored as `meta` plus `outcome` (the outcome key's value, if present).
pub(crate) fn decode(key: &Key, meta: &[u8], outcome: Option<Vec<u8>>) -> Result<Stored, Error> {
    let (row, claim, _) = decode_meta(key, meta, outcome)?;
    if row.state == "in_progress" && row.response.is_some() {
        return Err(corrupt(key, "an in-progress record has an outcome".into()));
    }
    Ok(Stored {
        record: row.into_record(key)?,
        claim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::{Fingerprint, State, Timestamp, Token};

    fn key(scope: &str, id: &str) -> Key {
        Key::new(scope, id).unwrap()
    }

    #[test]
    fn keys_never_collide_and_parse_back() {
        let keys = Keys::new("idem/");
        let pairs = [
            ("a/b", "c"),
            ("a", "b/c"),
            ("", "a/b/c"),
            ("a/b/c", "x"),
            ("é", "x"),
        ];
        let metas: Vec<Vec<u8>> = pairs.iter().map(|(s, i)| keys.meta(&key(s, i))).collect();
        for (i, a) in metas.iter().enumerate() {
            for b in &metas[i + 1..] {
                assert_ne!(a, b);
            }
        }
        for (m, (s, i)) in metas.iter().zip(pairs) {
            assert_eq!(keys.parse_meta(m).unwrap(), key(s, i));
            assert_eq!(keys.outcome_of(m), keys.outcome(&key(s, i)));
            let (start, end) = keys.meta_range();
            assert!(m.as_slice() >= start.as_slice() && m.as_slice() < end.as_slice());
        }
        assert!(keys.parse_meta(b"idem/m/9x9/a/b").is_err());
        assert!(keys.parse_meta(b"idem/m/005/a/b").is_err());
        assert!(keys.parse_meta(b"other/m/001/a/b").is_err());
    }

    #[test]
    fn values_round_trip_and_bad_ones_are_typed_errors() {
        let k = key("s", "k");
        let fp = Fingerprint::of_bytes(b"x");
        let rec = |state| Record {
            key: k.clone(),
            fingerprint: Some(fp),
            state,
            token: Token(7),
            created_at: Timestamp::from_millis(1),
            updated_at: Timestamp::from_millis(2),
            expires_at: Timestamp::from_millis(3),
        };
        let live = rec(State::InProgress {
            token: Token(7),
            lease_until: Timestamp::MIN,
        });
        let meta = encode_meta(&live, 99).unwrap();
        assert_eq!(
            decode(&k, &meta, None).unwrap(),
            Stored {
                record: live,
                claim: 99
            }
        );
        let done = rec(State::Completed {
            response: vec![1, 2],
        });
        let meta = encode_meta(&done, 0).unwrap();
        assert_eq!(decode(&k, &meta, Some(vec![1, 2])).unwrap().record, done);
        assert_eq!(decode_state(&k, &meta).unwrap(), "completed");
        assert_eq!(decode_expires_at(&k, &meta).unwrap(), 3);
        assert!(matches!(
            decode(&k, &meta, None),
            Err(Error::Corrupt { key: Some(_), .. })
        ));
        assert!(matches!(
            decode(&k, &meta[..20], None),
            Err(Error::Corrupt { key: Some(_), .. })
        ));
        let mut unknown = meta.clone();
        unknown[0] = 9;
        assert!(matches!(
            decode(&k, &unknown, None),
            Err(Error::UnknownFormat { .. })
        ));
        let mut state = meta;
        state[1] = 9;
        assert!(matches!(
            decode(&k, &state, None),
            Err(Error::Corrupt { key: Some(_), .. })
        ));
    }
}
