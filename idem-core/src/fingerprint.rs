//! Request fingerprints: SHA-256 of the canonical request.

use std::fmt;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::Error;

/// A SHA-256 digest of the canonical request.
///
/// When a stored and an incoming fingerprint are both present and differ, every store
/// operation answers with a mismatch (HTTP 422): a client reused a key for a different
/// request. Build one from any `Serialize` value ([`Fingerprint::of_json`], object keys
/// sorted at every depth so field order never matters) or from the caller's own canonical
/// bytes ([`Fingerprint::of_bytes`]).
///
/// ```
/// use idem_core::Fingerprint;
/// let a = Fingerprint::of_json(&serde_json::json!({"amount": 100, "currency": "EUR"}))?;
/// let b = Fingerprint::of_json(&serde_json::json!({"currency": "EUR", "amount": 100}))?;
/// assert_eq!(a, b);
/// assert_ne!(a, Fingerprint::of_json(&serde_json::json!({"amount": 101, "currency": "EUR"}))?);
/// # Ok::<(), idem_core::Error>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// SHA-256 of the given canonical bytes.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Fingerprint(Sha256::digest(bytes).into())
    }

    /// SHA-256 of the sorted-key canonical JSON of `value`.
    ///
    /// Fails with [`Error::Encode`] when `value` cannot be serialized to JSON (a map with
    /// non-string keys, for example).
    pub fn of_json<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        let value = serde_json::to_value(value).map_err(|e| Error::Encode(Box::new(e)))?;
        let mut canonical = Vec::new();
        write_canonical(&value, &mut canonical);
        Ok(Self::of_bytes(&canonical))
    }

    /// Rebuilds a fingerprint from the 32 bytes a store kept.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// Rebuilds a fingerprint from a stored slice; `None` unless it is exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Fingerprint)
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &hex::encode(self.0)[..16])
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Writes `value` as JSON with object keys sorted at every depth, whatever map type
/// `serde_json` was built with (its `preserve_order` feature would otherwise keep
/// insertion order).
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // Serializing a string to JSON cannot fail.
                out.extend_from_slice(&serde_json::to_vec(k).unwrap_or_default());
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(&serde_json::to_vec(scalar).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn nested_key_order_does_not_matter() {
        let a = serde_json::json!({"b": {"y": 1, "x": [ {"q": 1, "p": 2} ]}, "a": null});
        let b = serde_json::json!({"a": null, "b": {"x": [ {"p": 2, "q": 1} ], "y": 1}});
        assert_eq!(
            Fingerprint::of_json(&a).unwrap(),
            Fingerprint::of_json(&b).unwrap()
        );
    }

    #[test]
    fn canonical_form_is_compact_sorted_json() {
        let v = serde_json::json!({"b": 1, "a": "x\"y"});
        assert_eq!(
            Fingerprint::of_json(&v).unwrap(),
            Fingerprint::of_bytes(br#"{"a":"x\"y","b":1}"#)
        );
    }

    #[test]
    fn array_order_matters_and_values_matter() {
        let a = Fingerprint::of_json(&[1, 2]).unwrap();
        assert_ne!(a, Fingerprint::of_json(&[2, 1]).unwrap());
        assert_ne!(a, Fingerprint::of_json(&["1", "2"]).unwrap());
    }

    #[test]
    fn non_string_map_keys_are_a_typed_error() {
        let mut m = HashMap::new();
        m.insert(vec![1u8], 1);
        assert!(matches!(Fingerprint::of_json(&m), Err(Error::Encode(_))));
    }

    #[test]
    fn bytes_round_trip() {
        let f = Fingerprint::of_bytes(b"abc");
        assert_eq!(
            f.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Fingerprint::from_slice(f.as_bytes()), Some(f));
        assert_eq!(Fingerprint::from_slice(&[0; 31]), None);
    }
}
