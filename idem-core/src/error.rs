//! Typed errors. Each variant maps to one answer a caller can give (see [`Error::http_status`]).

use std::time::Duration;

/// A boxed error source, kept whole (never flattened to a string).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a key was rejected. Returned inside [`Error::InvalidKey`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The id is empty.
    #[error("the key id is empty")]
    EmptyId,
    /// The id is longer than [`crate::MAX_ID_LEN`] bytes.
    #[error("the key id is {len} bytes long; at most 255 are allowed")]
    IdTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The id holds a byte outside visible ASCII (`0x21..=0x7e`).
    #[error("the key id has a byte outside visible ASCII at byte {position}")]
    IdNotVisibleAscii {
        /// Byte offset of the first offending byte.
        position: usize,
    },
    /// The scope is longer than [`crate::MAX_SCOPE_LEN`] bytes.
    #[error("the key scope is {len} bytes long; at most 255 are allowed")]
    ScopeTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The scope holds a control character.
    #[error("the key scope has a control character at byte {position}")]
    ScopeControlChar {
        /// Byte offset of the first control character.
        position: usize,
    },
}

/// Everything that can go wrong at the barrier or in a store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key is malformed (HTTP 400). No store was called.
    #[error("invalid idempotency key: {0}")]
    InvalidKey(#[from] KeyError),
    /// The key was used before for a request with a different fingerprint (HTTP 422).
    #[error("idempotency key reused with a different request payload")]
    Mismatch,
    /// Another worker holds a live lease on the key (HTTP 409 with `Retry-After`).
    #[error("a request with this idempotency key is in progress; retry after {retry_after:?}")]
    InProgress {
        /// How long until the holder's lease runs out.
        retry_after: Duration,
    },
    /// The lease this worker held is no longer the key's current lease: it was reclaimed,
    /// released, or the record completed. Nothing was written.
    #[error("the lease on this idempotency key was lost; nothing was written")]
    LeaseLost,
    /// The store failed. `retryable` says whether the same call may succeed later
    /// (a timeout, a dropped connection, a serialization conflict) or not (a closed pool,
    /// a missing table, a permission error).
    #[error("idempotency store error (retryable: {retryable})")]
    Store {
        /// Whether retrying the same call may succeed.
        retryable: bool,
        /// The store's own error.
        #[source]
        source: BoxError,
    },
    /// A stored record or outcome is in a format this version does not know.
    #[error("stored idempotency record has unknown format {format}")]
    UnknownFormat {
        /// The format tag or state name found.
        format: String,
    },
    /// A stored record or outcome could not be decoded.
    #[error("stored idempotency record is corrupt")]
    Corrupt(#[source] BoxError),
    /// A response or request could not be encoded for storage.
    #[error("could not encode a value for the idempotency store")]
    Encode(#[source] BoxError),
    /// A value exceeds a limit of the store (FoundationDB's 100 kB values, for example).
    #[error("{what} is {size} bytes; the store accepts at most {limit}")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The store or barrier was configured wrongly (an invalid table name, for example).
    #[error("invalid idempotency configuration: {0}")]
    Config(String),
}

impl Error {
    /// A retryable store error wrapping `source`.
    pub fn retryable(source: impl Into<BoxError>) -> Self {
        Error::Store {
            retryable: true,
            source: source.into(),
        }
    }

    /// A permanent store error wrapping `source`.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Error::Store {
            retryable: false,
            source: source.into(),
        }
    }

    /// Whether the caller may retry the same request later and expect progress.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::InProgress { .. }
                | Error::Store {
                    retryable: true,
                    ..
                }
        )
    }

    /// The HTTP status this error maps to in an API that honours `Idempotency-Key`.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::InvalidKey(_) => 400,
            Error::Mismatch => 422,
            Error::InProgress { .. } | Error::LeaseLost => 409,
            Error::TooLarge { .. } => 413,
            Error::Store { .. } => 503,
            _ => 500,
        }
    }
}
