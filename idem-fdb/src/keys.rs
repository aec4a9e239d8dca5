//! The key layout inside the store's subspace, and the encoding of a record's value.

use foundationdb::tuple::Subspace;
use idem_core::backend::RecordRow;
use idem_core::{Error, Key, Record, Timestamp};

/// FoundationDB's largest value: a record (with its response) must fit in it.
pub const MAX_VALUE_BYTES: usize = 100_000;

/// The record format this crate writes (first element of the packed value).
const FORMAT: i64 = 1;

/// The keys of one store:
/// - `("rec", scope, id)` → the record (see [`encode`]);
/// - `("exp", expires_at, scope, id)` → empty: the purge index;
/// - `("count", state)` → a little-endian `i64` counter maintained with atomic adds.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    pub(crate) space: Subspace,
}

impl Keys {
    pub(crate) fn record(&self, key: &Key) -> Vec<u8> {
        self.space.pack(&("rec", key.scope(), key.id()))
    }

    pub(crate) fn expiry(&self, expires_at: Timestamp, key: &Key) -> Vec<u8> {
        self.space
            .pack(&("exp", expires_at.as_millis(), key.scope(), key.id()))
    }

    /// The purge index up to and including `now`.
    pub(crate) fn expired(&self, now: Timestamp) -> (Vec<u8>, Vec<u8>) {
        (
            self.space.pack(&("exp",)),
            self.space.pack(&("exp", now.as_millis().saturating_add(1))),
        )
    }

    /// The key named by an entry of the purge index.
    pub(crate) fn expiry_entry(&self, index_key: &[u8]) -> Result<Key, Error> {
        let (_, _, scope, id): (String, i64, String, String) =
            self.space.unpack(index_key).map_err(Error::corrupt)?;
        Key::new(scope, id)
    }

    pub(crate) fn count(&self, state: &str) -> Vec<u8> {
        self.space.pack(&("count", state))
    }
}

/// A record as stored, with the bookkeeping only FoundationDB needs.
pub(crate) struct Stored {
    pub(crate) record: Record,
    /// The claim attempt that wrote the current lease (see `store::claim_id`).
    pub(crate) claim: u64,
    pub(crate) reclaimed: bool,
}

impl Stored {
    /// `next`, keeping the claim bookkeeping of the record it replaces.
    pub(crate) fn after(next: Record, prev: Option<&Stored>) -> Stored {
        let (claim, reclaimed) = prev.map_or((0, false), |s| (s.claim, s.reclaimed));
        Stored {
            record: next,
            claim,
            reclaimed,
        }
    }
}

/// `(1, state, token, lease_until?, created_at, updated_at, expires_at, claim_id, reclaimed,
/// fingerprint?, response?)`, packed as a tuple.
type Packed = (
    i64,
    String,
    i64,
    Option<i64>,
    i64,
    i64,
    i64,
    u64,
    bool,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
);

/// The value of a record; over [`MAX_VALUE_BYTES`] it is [`Error::TooLarge`], before anything
/// is written.
pub(crate) fn encode(s: &Stored) -> Result<Vec<u8>, Error> {
    let row = RecordRow::from_record(&s.record)?;
    let packed: Packed = (
        FORMAT,
        row.state,
        row.token,
        row.lease_until,
        row.created_at,
        row.updated_at,
        row.expires_at,
        s.claim,
        s.reclaimed,
        row.fingerprint,
        row.response,
    );
    let bytes = foundationdb::tuple::pack(&packed);
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(Error::TooLarge {
            what: "stored record (response included)",
            size: bytes.len(),
            limit: MAX_VALUE_BYTES,
        });
    }
    Ok(bytes)
}

/// Reads a record's value: another format is [`Error::UnknownFormat`]; bytes that do not
/// unpack, or fields out of range, are [`Error::Corrupt`] naming the key.
pub(crate) fn decode(key: &Key, raw: &[u8]) -> Result<Stored, Error> {
    if raw.first() != Some(&0x15) || raw.get(1) != Some(&1) {
        // A packed tuple starting with the integer 1 begins 0x15 0x01.
        return Err(Error::UnknownFormat {
            format: format!(
                "FoundationDB record of {key} starting {:02x?}",
                &raw[..raw.len().min(2)]
            ),
        });
    }
    let (
        _,
        state,
        token,
        lease_until,
        created_at,
        updated_at,
        expires_at,
        claim,
        reclaimed,
        fingerprint,
        response,
    ): Packed = foundationdb::tuple::unpack(raw).map_err(|e| Error::corrupt_key(key, e))?;
    let record = RecordRow {
        fingerprint,
        state,
        token,
        lease_until,
        response,
        created_at,
        updated_at,
        expires_at,
    }
    .into_record(key)?;
    Ok(Stored {
        record,
        claim,
        reclaimed,
    })
}
