//! Idempotency keys: a client-supplied id inside a scope, validated before any store call.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::error::{Error, KeyError};

/// Longest accepted [`Key::id`], in bytes.
pub const MAX_ID_LEN: usize = 255;
/// Longest accepted [`Key::scope`], in bytes.
pub const MAX_SCOPE_LEN: usize = 255;

/// Prefix of every id made by [`Key::derive`]; it versions the derivation.
const DERIVED_PREFIX: &str = "idem1-";

/// An idempotency key: `(scope, id)`.
///
/// `id` is what the client sent (an `Idempotency-Key` header, a message id): 1 to 255 bytes
/// of visible ASCII (`0x21..=0x7e`). `scope` isolates tenants, principals and operations so
/// that one client's key can never replay another client's stored response: at most 255
/// bytes of UTF-8 without control characters (it may be empty).
///
/// ```
/// use idem_core::Key;
/// let key = Key::new("tenant-42/charges", "5f1c0b7e-key")?;
/// assert_eq!(key.id(), "5f1c0b7e-key");
/// assert!(Key::new("tenant-42/charges", "has space").is_err());
/// # Ok::<(), idem_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    scope: String,
    id: String,
}

impl Key {
    /// Validates and builds a key. Invalid input is [`Error::InvalidKey`], never a panic.
    pub fn new(scope: impl Into<String>, id: impl Into<String>) -> Result<Self, Error> {
        let scope = scope.into();
        let id = id.into();
        validate_id(&id)?;
        validate_scope(&scope)?;
        Ok(Key { scope, id })
    }

    /// The isolation scope (tenant, principal, operation).
    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The client-supplied id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A stable child key for a downstream call or an outgoing message.
    ///
    /// The child keeps this key's scope; its id is `idem1-` followed by the hex SHA-256 of
    /// the length-prefixed scope, id and `label`. The same inputs give the same id on every
    /// machine and every release of this crate, so a retry of the parent sends the same child
    /// id downstream, and a consumer running its own barrier on it applies a redelivered
    /// message once (the layer-mismatch failure mode).
    ///
    /// ```
    /// use idem_core::Key;
    /// let key = Key::new("shop", "order-17")?;
    /// let charge = key.derive("charge");
    /// assert_eq!(charge, Key::new("shop", "order-17")?.derive("charge"));
    /// assert_ne!(charge, key.derive("email"));
    /// assert_eq!(charge.id().len(), 6 + 64);
    /// # Ok::<(), idem_core::Error>(())
    /// ```
    pub fn derive(&self, label: &str) -> Key {
        let mut hasher = Sha256::new();
        for part in [self.scope.as_bytes(), self.id.as_bytes(), label.as_bytes()] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        let id = format!("{DERIVED_PREFIX}{}", hex::encode(hasher.finalize()));
        Key {
            scope: self.scope.clone(),
            id,
        }
    }

    /// The same id in another scope, for a consumer that receives a derived id on a message
    /// and checks it in its own scope.
    pub fn with_scope(&self, scope: impl Into<String>) -> Result<Key, Error> {
        Key::new(scope, self.id.clone())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?}, {:?})", self.scope, self.id)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.scope, self.id)
    }
}

fn validate_id(id: &str) -> Result<(), Error> {
    if id.is_empty() {
        return Err(KeyError::EmptyId.into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(KeyError::IdTooLong { len: id.len() }.into());
    }
    if let Some(position) = id.bytes().position(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(KeyError::IdNotVisibleAscii { position }.into());
    }
    Ok(())
}

fn validate_scope(scope: &str) -> Result<(), Error> {
    if scope.len() > MAX_SCOPE_LEN {
        return Err(KeyError::ScopeTooLong { len: scope.len() }.into());
    }
    if let Some(position) = scope
        .char_indices()
        .find(|(_, c)| c.is_control())
        .map(|(i, _)| i)
    {
        return Err(KeyError::ScopeControlChar { position }.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_error(result: Result<Key, Error>) -> KeyError {
        match result {
            Err(Error::InvalidKey(e)) => e,
            other => panic!("expected InvalidKey, got {other:?}"),
        }
    }

    #[test]
    fn accepts_visible_ascii_up_to_255_bytes() {
        let id = "a".repeat(255);
        assert_eq!(Key::new("s", id.clone()).unwrap().id(), id);
        assert!(Key::new("", "!~").is_ok());
    }

    #[test]
    fn rejects_empty_long_and_invisible_ids() {
        assert_eq!(key_error(Key::new("s", "")), KeyError::EmptyId);
        assert_eq!(
            key_error(Key::new("s", "a".repeat(256))),
            KeyError::IdTooLong { len: 256 }
        );
        assert_eq!(
            key_error(Key::new("s", "ab c")),
            KeyError::IdNotVisibleAscii { position: 2 }
        );
        assert_eq!(
            key_error(Key::new("s", "é")),
            KeyError::IdNotVisibleAscii { position: 0 }
        );
        assert_eq!(
            key_error(Key::new("s", "a\u{7f}")),
            KeyError::IdNotVisibleAscii { position: 1 }
        );
    }

    #[test]
    fn rejects_long_scopes_and_control_characters() {
        assert!(Key::new("ü".repeat(127), "k").is_ok());
        assert_eq!(
            key_error(Key::new("ü".repeat(128), "k")),
            KeyError::ScopeTooLong { len: 256 }
        );
        assert_eq!(
            key_error(Key::new("a\nb", "k")),
            KeyError::ScopeControlChar { position: 1 }
        );
    }

    #[test]
    fn derivation_is_stable_and_injective_on_boundaries() {
        let key = Key::new("shop", "order-17").unwrap();
        // Pinned: changing the derivation would break every in-flight downstream key.
        assert_eq!(
            key.derive("charge").id(),
            "idem1-8ad812ac9db996b445051161da7a71896caaed95fc04d9dff199955a6ee15a5b"
        );
        let a = Key::new("ab", "c").unwrap().derive("d");
        let b = Key::new("a", "bc").unwrap().derive("d");
        assert_ne!(a, b, "length prefixes keep field boundaries apart");
        let derived = key.derive("charge");
        assert!(Key::new(derived.scope(), derived.id()).is_ok());
    }
}
