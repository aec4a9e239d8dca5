//! The stored record: one Redis string, a fixed 60-byte header followed by the
//! fingerprint, the too-large note and the outcome. Integers are big-endian.
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 1 | encoding version, [`VERSION`] |
//! | 1 | 1 | fingerprint length: 0 (none) or 32 |
//! | 2 | 8 | fencing token (1 ..= `i64::MAX`) |
//! | 10 | 8 | lease deadline, ms (`i64::MIN` once released) |
//! | 18 | 8 | created, ms |
//! | 26 | 1 | state: `p` in progress, `c` completed, `f` failed |
//! | 27 | 1 | how the last call changed the record: 0 plainly, `r` by reclaiming an expired lease, `x` by abandoning its claim |
//! | 28 | 8 | updated, ms |
//! | 36 | 8 | retention deadline, ms |
//! | 44 | 8 | nonce of the call that last changed the record |
//! | 52 | 4 | too-large note length |
//! | 56 | 4 | outcome length |
//! | 60 | … | fingerprint, note, outcome |
//!
//! The fields the finishing scripts rewrite (state to outcome length) are contiguous, so a
//! script splices its caller's bytes in without parsing anything. Every reader validates the
//! whole layout ([`decode`]), so a damaged record is reported as corrupt, never guessed at.

use idem_core::backend::RecordRow;
use idem_core::{Error, Key, Record, Timestamp};

/// The encoding version in byte 0.
pub(crate) const VERSION: u8 = 1;
/// Header length.
pub(crate) const HEADER: usize = 60;
/// A fingerprint's length.
const FINGERPRINT: usize = 32;

/// A record's state byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    InProgress,
    Completed,
    Failed,
}

impl Status {
    pub(crate) fn byte(self) -> u8 {
        match self {
            Status::InProgress => b'p',
            Status::Completed => b'c',
            Status::Failed => b'f',
        }
    }

    /// The state's name (`idem_core::State::name`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }
}

/// How the call named by the nonce changed the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// Claimed a fresh or released key, finished, or released.
    Plain,
    /// Claimed the key by reclaiming an expired lease.
    Reclaimed,
    /// Gave back its unanswered claim (a late copy of that call is refused).
    Abandoned,
}

impl Change {
    fn byte(self) -> u8 {
        match self {
            Change::Plain => 0,
            Change::Reclaimed => b'r',
            Change::Abandoned => b'x',
        }
    }
}

/// The header's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) token: u64,
    pub(crate) lease_until: Timestamp,
    pub(crate) created_at: Timestamp,
    pub(crate) status: Status,
    pub(crate) change: Change,
    pub(crate) updated_at: Timestamp,
    pub(crate) expires_at: Timestamp,
    pub(crate) nonce: [u8; 8],
}

/// A decoded record, borrowing its variable parts.
#[derive(Debug)]
pub(crate) struct Stored<'a> {
    pub(crate) header: Header,
    pub(crate) fingerprint: Option<&'a [u8]>,
    pub(crate) note: &'a [u8],
    pub(crate) response: &'a [u8],
}

/// An in-progress record (no note, no outcome).
pub(crate) fn encode_claim(header: &Header, fingerprint: Option<&[u8]>) -> Vec<u8> {
    let fingerprint = fingerprint.unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + fingerprint.len());
    out.push(VERSION);
    out.push(fingerprint.len() as u8);
    out.extend_from_slice(&header.token.to_be_bytes());
    out.extend_from_slice(&header.lease_until.as_millis().to_be_bytes());
    out.extend_from_slice(&header.created_at.as_millis().to_be_bytes());
    out.extend_from_slice(&tail(header, 0, 0));
    out.extend_from_slice(fingerprint);
    out
}

/// Bytes 26..60 of a finished record, written by `complete` or `fail` (the call named by
/// `nonce`) at `updated_at`: what the finish script splices in.
pub(crate) fn finish_fields(
    status: Status,
    updated_at: Timestamp,
    expires_at: Timestamp,
    nonce: [u8; 8],
    note_len: u32,
    response_len: u32,
) -> [u8; 34] {
    let header = Header {
        token: 0,
        lease_until: Timestamp::MIN,
        created_at: Timestamp::MIN,
        status,
        change: Change::Plain,
        updated_at,
        expires_at,
        nonce,
    };
    tail(&header, note_len, response_len)
}

/// Bytes 26..60 of `header`'s record.
fn tail(header: &Header, note_len: u32, response_len: u32) -> [u8; 34] {
    let mut out = [0u8; 34];
    out[0] = header.status.byte();
    out[1] = header.change.byte();
    out[2..10].copy_from_slice(&header.updated_at.as_millis().to_be_bytes());
    out[10..18].copy_from_slice(&header.expires_at.as_millis().to_be_bytes());
    out[18..26].copy_from_slice(&header.nonce);
    out[26..30].copy_from_slice(&note_len.to_be_bytes());
    out[30..34].copy_from_slice(&response_len.to_be_bytes());
    out
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn i64_at(bytes: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// The header of `bytes` (at least its first [`HEADER`] bytes), validated; the reason it
/// cannot be read otherwise.
pub(crate) fn decode_header(bytes: &[u8]) -> Result<Header, String> {
    if bytes.len() < HEADER {
        return Err(format!(
            "the record is {} bytes, shorter than its {HEADER}-byte header",
            bytes.len()
        ));
    }
    if bytes[0] != VERSION {
        return Err(format!("unknown record encoding version {}", bytes[0]));
    }
    let fingerprint = usize::from(bytes[1]);
    if fingerprint != 0 && fingerprint != FINGERPRINT {
        return Err(format!("fingerprint is {fingerprint} bytes"));
    }
    let token = i64_at(bytes, 2);
    if token < 1 {
        return Err(format!("token {token} is not a positive integer"));
    }
    let status = match bytes[26] {
        b'p' => Status::InProgress,
        b'c' => Status::Completed,
        b'f' => Status::Failed,
        other => return Err(format!("unknown state byte {other:#04x}")),
    };
    let change = match bytes[27] {
        0 => Change::Plain,
        b'r' => Change::Reclaimed,
        b'x' => Change::Abandoned,
        other => return Err(format!("unknown change byte {other:#04x}")),
    };
    Ok(Header {
        token: token as u64,
        lease_until: Timestamp::from_millis(i64_at(bytes, 10)),
        created_at: Timestamp::from_millis(i64_at(bytes, 18)),
        status,
        change,
        updated_at: Timestamp::from_millis(i64_at(bytes, 28)),
        expires_at: Timestamp::from_millis(i64_at(bytes, 36)),
        nonce: bytes[44..52].try_into().expect("8 bytes"),
    })
}

/// The whole record in `bytes`, validated; the reason it cannot be read otherwise.
pub(crate) fn decode(bytes: &[u8]) -> Result<Stored<'_>, String> {
    let header = decode_header(bytes)?;
    let fingerprint = usize::from(bytes[1]);
    let note = u32_at(bytes, 52) as usize;
    let response = u32_at(bytes, 56) as usize;
    let expected = HEADER as u64 + fingerprint as u64 + note as u64 + response as u64;
    if bytes.len() as u64 != expected {
        return Err(format!(
            "the record is {} bytes, its header says {expected}",
            bytes.len()
        ));
    }
    if header.status == Status::InProgress && note + response != 0 {
        return Err("an in-progress record holds an outcome".into());
    }
    let rest = &bytes[HEADER..];
    let (fp, rest) = rest.split_at(fingerprint);
    let (note, response) = rest.split_at(note);
    Ok(Stored {
        header,
        fingerprint: (fingerprint != 0).then_some(fp),
        note,
        response,
    })
}

/// The record of `key` stored as `bytes`, or [`Error::Corrupt`] if they cannot be read.
pub(crate) fn to_record(key: &Key, bytes: &[u8]) -> Result<Record, Error> {
    let stored = decode(bytes).map_err(|why| Error::corrupt_key(key, why))?;
    let h = &stored.header;
    let in_progress = h.status == Status::InProgress;
    RecordRow {
        fingerprint: stored.fingerprint.map(<[u8]>::to_vec),
        state: h.status.name().to_string(),
        // `decode` checked it is within 1..=i64::MAX.
        token: h.token as i64,
        lease_until: in_progress.then_some(h.lease_until.as_millis()),
        response: (!in_progress).then(|| stored.response.to_vec()),
        created_at: h.created_at.as_millis(),
        updated_at: h.updated_at.as_millis(),
        expires_at: h.expires_at.as_millis(),
    }
    .into_record(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            token: 7,
            lease_until: Timestamp::from_millis(1_700_000_060_000),
            created_at: Timestamp::from_millis(1_700_000_000_000),
            status: Status::InProgress,
            change: Change::Reclaimed,
            updated_at: Timestamp::from_millis(1_700_000_000_001),
            expires_at: Timestamp::from_millis(1_700_003_660_000),
            nonce: *b"nonce-01",
        }
    }

    /// A completed record, as the finish script writes it.
    fn completed(fingerprint: Option<&[u8]>, note: &[u8], response: &[u8]) -> Vec<u8> {
        let claim = encode_claim(&header(), fingerprint);
        let mut out = claim[..26].to_vec();
        out.extend_from_slice(&finish_fields(
            Status::Completed,
            header().updated_at,
            header().expires_at,
            *b"nonce-02",
            note.len() as u32,
            response.len() as u32,
        ));
        out.extend_from_slice(&claim[HEADER..]);
        out.extend_from_slice(note);
        out.extend_from_slice(response);
        out
    }

    #[test]
    fn round_trips() {
        let fp = [9u8; 32];
        for fingerprint in [None, Some(&fp[..])] {
            let bytes = encode_claim(&header(), fingerprint);
            assert_eq!(bytes.len(), HEADER + fingerprint.map_or(0, <[u8]>::len));
            let stored = decode(&bytes).unwrap();
            assert_eq!(stored.header, header());
            assert_eq!(stored.fingerprint, fingerprint);
            assert!(stored.note.is_empty() && stored.response.is_empty());

            let bytes = completed(fingerprint, b"12:10:completed", b"\x01ok");
            let stored = decode(&bytes).unwrap();
            assert_eq!(stored.header.status, Status::Completed);
            assert_eq!(stored.header.created_at, header().created_at);
            assert_eq!(stored.header.nonce, *b"nonce-02");
            assert_eq!(stored.fingerprint, fingerprint);
            assert_eq!(stored.note, b"12:10:completed");
            assert_eq!(stored.response, b"\x01ok");
        }
        let released = Header {
            lease_until: Timestamp::MIN,
            ..header()
        };
        let bytes = encode_claim(&released, None);
        assert_eq!(decode(&bytes).unwrap().header.lease_until, Timestamp::MIN);
    }

    #[test]
    fn damage_is_reported() {
        let good = completed(Some(&[3u8; 32]), b"", b"\x01ok");
        let damaged = |at: usize, bytes: &[u8]| {
            let mut d = good.clone();
            d[at..at + bytes.len()].copy_from_slice(bytes);
            decode(&d).unwrap_err()
        };
        assert!(decode(&good[..59]).unwrap_err().contains("shorter"));
        assert!(decode(b"").unwrap_err().contains("shorter"));
        assert!(damaged(0, &[2]).contains("version 2"));
        assert!(damaged(1, &[31]).contains("fingerprint is 31 bytes"));
        assert!(damaged(2, &[0; 8]).contains("token 0"));
        assert!(damaged(2, &[0xff; 8]).contains("token -1"));
        assert!(damaged(26, b"a").contains("state"));
        assert!(damaged(27, b"?").contains("change"));
        assert!(damaged(56, &[0, 0, 0, 9]).contains("header says"));
        assert!(decode(&good[..good.len() - 1])
            .unwrap_err()
            .contains("header says"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(decode(&longer).unwrap_err().contains("header says"));
        let mut in_progress = good.clone();
        in_progress[26] = b'p';
        assert!(decode(&in_progress)
            .unwrap_err()
            .contains("holds an outcome"));
        // The header alone is enough for `stats`.
        assert_eq!(
            decode_header(&good[..HEADER]).unwrap().status,
            Status::Completed
        );
    }
}
