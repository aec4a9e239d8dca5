//! Typed errors. Each variant maps to one answer a caller can give (see [`Error::http_status`]).

use std::fmt;
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
///
/// `Display` shows the whole cause chain once (`idempotency store error (retryable):
/// connection refused: os error 111`); [`std::error::Error::source`] still returns each
/// cause, so a reporter that walks the chain itself can use the first line alone via
/// [`Error::headline`].
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
        /// When to try again: see [`crate::Barrier::begin`] for how it is estimated.
        retry_after: Duration,
    },
    /// The lease this worker held is no longer the key's current lease: it was reclaimed,
    /// released, or the record completed. Nothing was written.
    #[error("the lease on this idempotency key was lost; nothing was written")]
    LeaseLost,
    /// The store failed. `retryable` says whether the same call may succeed later
    /// (a timeout, a dropped connection, a serialization conflict) or not (a closed pool,
    /// a missing table, a permission error).
    #[error("{}: {}", self.headline(), ErrorChain(.source.as_ref()))]
    Store {
        /// Whether retrying the same call may succeed.
        retryable: bool,
        /// The store's own error.
        #[source]
        source: BoxError,
    },
    /// A stored record or outcome is in a format this version does not know (an outcome
    /// format tag or a schema version written by a newer release). Permanent.
    #[error("stored idempotency record has unknown format {format}")]
    UnknownFormat {
        /// The format tag or version found.
        format: String,
    },
    /// A stored record or outcome could not be decoded: an unknown state, a bad token, a
    /// fingerprint of the wrong length, an out-of-range number, an outcome that is not the
    /// expected type. Permanent: retrying reads the same bytes.
    #[error("{}: {}", self.headline(), ErrorChain(.source.as_ref()))]
    Corrupt {
        /// The key whose record is corrupt, in its display form (`scope/id`); `None` when
        /// the bytes belong to no single key (a counter) or the key is not known where the
        /// error arises (an outcome decoded after it was read).
        key: Option<String>,
        /// What is wrong with it.
        #[source]
        source: BoxError,
    },
    /// A response or request could not be encoded for storage.
    #[error("{}: {}", self.headline(), ErrorChain(.0.as_ref()))]
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

    /// A corrupt stored value that belongs to no known key.
    pub fn corrupt(source: impl Into<BoxError>) -> Self {
        Error::Corrupt {
            key: None,
            source: source.into(),
        }
    }

    /// The corrupt record of `key` (a [`crate::Key`], or any value displayed the same way).
    pub fn corrupt_key(key: impl fmt::Display, source: impl Into<BoxError>) -> Self {
        Error::Corrupt {
            key: Some(key.to_string()),
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

    /// Whether a stored record or outcome could not be decoded ([`Error::Corrupt`]).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }

    /// This error's own message, without its causes.
    pub fn headline(&self) -> String {
        match self {
            Error::Store { retryable, .. } => format!(
                "idempotency store error ({})",
                if *retryable { "retryable" } else { "permanent" }
            ),
            Error::Corrupt { key: Some(key), .. } => {
                format!("stored idempotency record of key {key} is corrupt")
            }
            Error::Corrupt { key: None, .. } => "stored idempotency record is corrupt".into(),
            Error::Encode(_) => "could not encode a value for the idempotency store".into(),
            other => other.to_string(),
        }
    }

    /// The HTTP status this error maps to in an API that honours `Idempotency-Key`.
    ///
    /// | error | status |
    /// |---|---|
    /// | [`Error::InvalidKey`] | 400 Bad Request |
    /// | [`Error::Mismatch`] | 422 Unprocessable Content |
    /// | [`Error::InProgress`] | 409 Conflict, with `Retry-After: retry_after` |
    /// | [`Error::LeaseLost`] | 409 Conflict (the key was taken over; the retry replays or runs) |
    /// | [`Error::TooLarge`] | 413 Content Too Large |
    /// | [`Error::Store`] retryable | 503 Service Unavailable (send `Retry-After`) |
    /// | [`Error::Store`] permanent | 500 Internal Server Error |
    /// | [`Error::Corrupt`], [`Error::UnknownFormat`], [`Error::Encode`], [`Error::Config`] | 500 Internal Server Error |
    pub fn http_status(&self) -> u16 {
        match self {
            Error::InvalidKey(_) => 400,
            Error::Mismatch => 422,
            Error::InProgress { .. } | Error::LeaseLost => 409,
            Error::TooLarge { .. } => 413,
            Error::Store {
                retryable: true, ..
            } => 503,
            _ => 500,
        }
    }
}

/// Displays an error and each of its causes, separated by `: `. A cause whose message the
/// previous one already contains is skipped, so a chain is shown once (as [`Error`]'s own
/// `Display` does; use it for errors that wrap one).
///
/// ```
/// use idem_core::{Error, ErrorChain};
/// let e = Error::retryable("connection refused");
/// assert_eq!(ErrorChain(&e).to_string().matches("connection refused").count(), 1);
/// ```
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.to_string();
        f.write_str(&shown)?;
        let mut next = self.0.source();
        while let Some(cause) = next {
            let msg = cause.to_string();
            if !shown.contains(&msg) {
                write!(f, ": {msg}")?;
                shown = msg;
            }
            next = cause.source();
        }
        Ok(())
    }
}

/// Why [`crate::Barrier::execute`] or [`crate::Barrier::transaction`] did not return an
/// outcome.
#[derive(Debug)]
pub enum RunError<E> {
    /// The barrier refused or failed: invalid key, mismatch, in progress, lease lost, store.
    Barrier(Error),
    /// The operation failed with a retryable error; the key was released (or, in
    /// transactional mode, everything was rolled back).
    Operation(E),
}

impl<E> From<Error> for RunError<E> {
    fn from(e: Error) -> Self {
        RunError::Barrier(e)
    }
}

impl<E: fmt::Display> fmt::Display for RunError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Barrier(e) => e.fmt(f),
            RunError::Operation(e) => write!(f, "operation failed and may be retried: {e}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for RunError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RunError::Barrier(e) => Some(e),
            RunError::Operation(e) => Some(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[derive(Debug)]
    struct Wrapper(std::io::Error);

    impl fmt::Display for Wrapper {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("connection refused")
        }
    }

    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn display_shows_the_cause_chain_once_and_source_keeps_it() {
        let io = std::io::Error::from_raw_os_error(111);
        let io_text = io.to_string();
        let e = Error::retryable(Wrapper(io));
        assert_eq!(
            e.to_string(),
            format!("idempotency store error (retryable): connection refused: {io_text}")
        );
        let first = e.source().expect("the store error is kept");
        assert_eq!(first.to_string(), "connection refused");
        assert_eq!(first.source().map(|s| s.to_string()), Some(io_text));

        // A cause whose text is already shown is not repeated.
        #[derive(Debug)]
        struct Echo(std::io::Error);
        impl fmt::Display for Echo {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "query failed: {}", self.0)
            }
        }
        impl std::error::Error for Echo {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Error::permanent(Echo(std::io::Error::other("disk full")));
        assert_eq!(
            e.to_string(),
            "idempotency store error (permanent): query failed: disk full"
        );

        let c = Error::corrupt_key("s/k", "unknown state \"archived\"");
        assert_eq!(
            c.to_string(),
            "stored idempotency record of key s/k is corrupt: unknown state \"archived\""
        );
        assert!(c.is_corrupt() && !c.is_retryable());
        assert_eq!(
            RunError::<std::io::Error>::Barrier(c).to_string(),
            "stored idempotency record of key s/k is corrupt: unknown state \"archived\""
        );
    }

    #[test]
    fn http_status_follows_the_contract() {
        let cases = [
            (Error::from(KeyError::EmptyId), 400),
            (Error::Mismatch, 422),
            (
                Error::InProgress {
                    retry_after: Duration::from_secs(1),
                },
                409,
            ),
            (Error::LeaseLost, 409),
            (
                Error::TooLarge {
                    what: "outcome",
                    size: 2,
                    limit: 1,
                },
                413,
            ),
            (Error::retryable("timeout"), 503),
            (Error::permanent("no such table"), 500),
            (Error::corrupt("bad"), 500),
            (
                Error::UnknownFormat {
                    format: "tag 0x09".into(),
                },
                500,
            ),
            (Error::Encode("nan".into()), 500),
            (Error::Config("bad table".into()), 500),
        ];
        for (e, status) in cases {
            assert_eq!(e.http_status(), status, "{e:?}");
        }
    }
}
