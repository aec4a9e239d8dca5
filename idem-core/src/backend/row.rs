//! [`RecordRow`]: a record as flat columns, and the one reading of stored columns.

use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::record::{Record, State, Token};
use crate::time::Timestamp;

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
    /// The columns of `record`. A token beyond `i64::MAX` is [`Error::Encode`].
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

    /// The record of `key` these columns describe. An unknown state, a missing field, a
    /// token below 1 or a fingerprint that is not 32 bytes is [`Error::Corrupt`] naming
    /// `key`: permanent, never a panic.
    pub fn into_record(self, key: &Key) -> Result<Record, Error> {
        let name = self.state;
        let corrupt = |what: String| Error::corrupt_key(key, format!("{name} record: {what}"));
        let token = u64::try_from(self.token)
            .ok()
            .filter(|t| *t >= 1)
            .map(Token)
            .ok_or_else(|| corrupt(format!("token {} out of range", self.token)))?;
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
            other => return Err(corrupt(format!("unknown state {other:?}"))),
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
    fn unreadable_rows_are_corrupt_and_name_the_key() {
        let key = Key::new("s", "k").unwrap();
        let row = RecordRow::from_record(&record(State::Completed { response: vec![1] })).unwrap();
        let bad = [
            RecordRow {
                state: "archived".into(),
                ..row.clone()
            },
            RecordRow {
                response: None,
                ..row.clone()
            },
            RecordRow {
                token: -1,
                ..row.clone()
            },
            RecordRow {
                token: 0,
                ..row.clone()
            },
            RecordRow {
                fingerprint: Some(vec![0; 31]),
                ..row.clone()
            },
            RecordRow {
                state: "in_progress".into(),
                lease_until: None,
                ..row
            },
        ];
        for row in bad {
            let err = row.clone().into_record(&key).unwrap_err();
            assert!(err.is_corrupt(), "{row:?}: {err:?}");
            assert!(!err.is_retryable(), "{row:?}: {err:?}");
            assert!(
                matches!(&err, Error::Corrupt { key: Some(k), .. } if k == "s/k"),
                "{err:?}"
            );
            assert!(err.to_string().contains("s/k"), "{err}");
        }
    }

    #[test]
    fn a_token_too_large_for_a_column_is_an_encode_error() {
        let mut r = record(State::Failed { response: vec![] });
        r.token = Token(u64::MAX);
        assert!(matches!(RecordRow::from_record(&r), Err(Error::Encode(_))));
    }
}
