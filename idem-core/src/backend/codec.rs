//! Stored outcomes: serde JSON behind a one-byte format tag.
//!
//! An outcome written by this version starts with [`FORMAT_JSON_V1`]. A record whose first
//! byte is anything else is [`Error::UnknownFormat`]; bytes that do not decode as the
//! expected type are [`Error::Corrupt`]. Neither is ever a panic or a wrong replay.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::Error;

/// The format tag of serde-JSON outcomes.
pub const FORMAT_JSON_V1: u8 = 1;

/// Encodes a value for storage.
///
/// ```
/// let bytes = idem_core::backend::codec::encode(&("paid", 100))?;
/// assert_eq!(bytes[0], idem_core::backend::codec::FORMAT_JSON_V1);
/// let back: (String, i32) = idem_core::backend::codec::decode(&bytes)?;
/// assert_eq!(back, ("paid".to_string(), 100));
/// assert!(idem_core::backend::codec::decode::<(String, i32)>(b"\x07{}").is_err());
/// # Ok::<(), idem_core::Error>(())
/// ```
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    let mut out = vec![FORMAT_JSON_V1];
    serde_json::to_writer(&mut out, value).map_err(|e| Error::Encode(Box::new(e)))?;
    Ok(out)
}

/// Decodes a stored value.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    match bytes.split_first() {
        Some((&FORMAT_JSON_V1, body)) => serde_json::from_slice(body).map_err(Error::corrupt),
        Some((tag, _)) => Err(Error::UnknownFormat {
            format: format!("outcome tag {tag:#04x}"),
        }),
        None => Err(Error::corrupt("empty stored outcome")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Charge {
        id: u64,
        amount: i64,
    }

    #[test]
    fn round_trip() {
        let c = Charge { id: 7, amount: -3 };
        assert_eq!(decode::<Charge>(&encode(&c).unwrap()).unwrap(), c);
    }

    #[test]
    fn unknown_tag_empty_and_garbage_are_typed_errors() {
        assert!(matches!(
            decode::<Charge>(b"\x02{}"),
            Err(Error::UnknownFormat { .. })
        ));
        assert!(matches!(decode::<Charge>(b""), Err(Error::Corrupt { .. })));
        assert!(matches!(
            decode::<Charge>(b"\x01{\"id\":"),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            decode::<Charge>(b"\x01{\"id\":\"x\",\"amount\":1}"),
            Err(Error::Corrupt { .. })
        ));
    }
}
