//! The key layout: one Redis string per record (encoded by the `record` module), named
//! `<prefix>r:{<scope-hex>.<id-hex>}`.
//!
//! Scope and id are hex-encoded, so no scope or id can collide with another pair or break
//! out of the hash tag, and the tag (`{…}`, the only braces in the name because the prefix
//! may not hold any) is what Redis Cluster hashes: a record is one key in one slot, and
//! every script touches exactly that key.

use idem_core::{Error, Key};

/// A store's key layout under its prefix.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    prefix: String,
}

impl Layout {
    /// The layout under `prefix` (already validated by [`crate::RedisOptions`]).
    pub(crate) fn new(prefix: &str) -> Self {
        Layout {
            prefix: prefix.to_string(),
        }
    }

    /// The record's Redis key.
    pub(crate) fn record(&self, key: &Key) -> String {
        format!(
            "{}r:{{{}.{}}}",
            self.prefix,
            hex::encode(key.scope()),
            hex::encode(key.id())
        )
    }

    /// The key a record's Redis key names, or `None` if `redis_key` is not a record key of
    /// this layout.
    pub(crate) fn parse(&self, redis_key: &[u8]) -> Option<Key> {
        let inner = redis_key
            .strip_prefix(self.prefix.as_bytes())?
            .strip_prefix(b"r:{")?
            .strip_suffix(b"}")?;
        let dot = inner.iter().position(|&b| b == b'.')?;
        let part = |h: &[u8]| String::from_utf8(hex::decode(h).ok()?).ok();
        Key::new(part(&inner[..dot])?, part(&inner[dot + 1..])?).ok()
    }

    /// The `SCAN MATCH` pattern of every record key (of `scope`'s records only, if given):
    /// the prefix with its glob characters escaped, so that a prefix such as `a*` never
    /// matches another prefix's records.
    pub(crate) fn scan_pattern(&self, scope: Option<&str>) -> String {
        let mut pattern = glob_escape(&self.prefix);
        match scope {
            // Hex holds no glob characters.
            Some(scope) => pattern.push_str(&format!("r:{{{}.*}}", hex::encode(scope))),
            None => pattern.push_str("r:{*}"),
        }
        pattern
    }
}

/// `text` with the glob characters of a `SCAN MATCH` pattern escaped.
pub(crate) fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// A record key that belongs to no valid key: something else wrote under the prefix.
pub(crate) fn foreign(redis_key: &[u8]) -> Error {
    Error::corrupt(format!(
        "Redis key {:?} under the store's prefix is not a record key",
        String::from_utf8_lossy(redis_key)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_round_trip_and_stay_inside_their_tag() {
        let layout = Layout::new("p*[x]?:");
        let key = Key::new("tenant {a}", "id}.{").unwrap();
        let redis_key = layout.record(&key);
        assert_eq!(redis_key.matches('{').count(), 1, "{redis_key}");
        assert_eq!(layout.parse(redis_key.as_bytes()), Some(key));
        assert_eq!(layout.parse(b"p*[x]?:r:{zz.00}"), None);
        assert_eq!(layout.parse(b"other:r:{61.62}"), None);
        assert_eq!(layout.scan_pattern(None), "p\\*\\[x\\]\\?:r:{*}");
        assert_eq!(layout.scan_pattern(Some("ab")), "p\\*\\[x\\]\\?:r:{6162.*}");
    }
}
