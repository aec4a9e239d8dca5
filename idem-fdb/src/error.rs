//! The one classification of FoundationDB errors into retryable and permanent store errors;
//! the crate docs carry the same table.

use foundationdb::FdbError;
use idem_core::Error;

/// Error codes after which the same call may succeed: a conflict, a stale or future read
/// version, a timeout, a cluster that is recovering, busy or throttling.
///
/// The store's own retry loop (FoundationDB's `on_error`) retries these within the
/// transaction's timeout and retry limit; one reaches the caller only when those run out.
pub(crate) const RETRYABLE_CODES: &[(i32, &str)] = &[
    (1004, "timed_out"),
    (1007, "transaction_too_old"),
    (1009, "future_version"),
    (1020, "not_committed"),
    (1021, "commit_unknown_result"),
    (1025, "transaction_cancelled"),
    (1031, "transaction_timed_out"),
    (1037, "process_behind"),
    (1038, "database_locked"),
    (1039, "cluster_version_changed"),
    (1040, "proxy_memory_limit_exceeded"),
    (1042, "batch_transaction_throttled"),
    (1078, "grv_proxy_memory_limit_exceeded"),
    (1101, "operation_cancelled"),
    (1213, "tag_throttled"),
];

/// Codes the store answers as permanent although the request is well-formed: FoundationDB
/// will refuse it again (sizes are limits of the database, not of the moment).
pub(crate) const PERMANENT_CODES: &[(i32, &str)] = &[
    (2101, "transaction_too_large"),
    (2102, "key_too_large"),
    (2103, "value_too_large"),
];

/// FoundationDB's error code for a transaction over its 10 MB limit.
pub(crate) const TRANSACTION_TOO_LARGE: i32 = 2101;

/// Maps a FoundationDB error to a store error, keeping it as the source.
///
/// Retryable: the codes in [`RETRYABLE_CODES`], and any other code FoundationDB's own
/// `retryable` predicate accepts (codes added by later client versions). Permanent:
/// everything else — the size limits in [`PERMANENT_CODES`], client misuse (codes 2000–2099:
/// invalid option, key outside the legal range, network not set up, …), a bad cluster file
/// or connection string (2104 and up), `unknown_error` (4100) and `internal_error` (4200).
pub(crate) fn map_err(e: FdbError) -> Error {
    let code = e.code();
    let retryable = !PERMANENT_CODES.iter().any(|(c, _)| *c == code)
        && (RETRYABLE_CODES.iter().any(|(c, _)| *c == code) || e.is_retryable());
    Error::Store {
        retryable,
        source: Box::new(e),
    }
}
