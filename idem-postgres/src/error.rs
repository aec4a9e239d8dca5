//! The one classification of sqlx errors into retryable and permanent store errors; the
//! crate docs carry the same table.

use idem_core::Error;

/// SQLSTATEs after which the same call may succeed: the conflict, timeout or outage is
/// over, or the retry runs on a fresh connection.
///
/// Class 08 (connection exceptions) is retryable as a whole and is not listed.
const RETRYABLE_CODES: &[(&str, &str)] = &[
    ("40001", "serialization_failure"),
    ("40P01", "deadlock_detected"),
    ("40003", "statement_completion_unknown"),
    ("55P03", "lock_not_available"),
    ("57014", "query_canceled"),
    ("25P03", "idle_in_transaction_session_timeout"),
    ("57P01", "admin_shutdown"),
    ("57P02", "crash_shutdown"),
    ("57P03", "cannot_connect_now"),
    ("57P05", "idle_session_timeout"),
    ("53000", "insufficient_resources"),
    ("53100", "disk_full"),
    ("53200", "out_of_memory"),
    ("53300", "too_many_connections"),
];

/// Whether a SQLSTATE is retryable (see [`RETRYABLE_CODES`]).
fn retryable_code(code: &str) -> bool {
    code.starts_with("08") || RETRYABLE_CODES.iter().any(|(c, _)| *c == code)
}

/// Maps a sqlx error to a store error. Retryable: any I/O error (connection refused,
/// reset, closed), a pool timeout, a crashed sqlx worker, and the SQLSTATEs in
/// [`RETRYABLE_CODES`] plus class 08. Permanent: everything else, notably a closed pool,
/// bad configuration, a missing table or schema, a permission error, a protocol error.
///
/// Records that are read but do not decode are [`Error::Corrupt`]; that happens where the
/// key is known (`store::record`), not here.
pub(crate) fn map_err(e: sqlx::Error) -> Error {
    let retryable = match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| retryable_code(&c)),
        _ => false,
    };
    Error::Store {
        retryable,
        source: Box::new(e),
    }
}

/// Whether `e` is a lock timeout (SQLSTATE 55P03), which a `TxPolicy::NoWait` claim turns
/// into `InProgress`.
pub(crate) fn is_lock_timeout(e: &Error) -> bool {
    matches!(e, Error::Store { source, .. }
        if matches!(source.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(db)) if db.code().as_deref() == Some("55P03")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_table_is_what_the_docs_say() {
        for (code, name) in RETRYABLE_CODES {
            assert!(retryable_code(code), "{code} {name}");
        }
        for code in ["08000", "08006", "08001", "08P01"] {
            assert!(retryable_code(code), "{code}: connection exception");
        }
        for (code, name) in [
            ("42P01", "undefined_table"),
            ("3F000", "invalid_schema_name"),
            ("42501", "insufficient_privilege"),
            ("28P01", "invalid_password"),
            ("3D000", "invalid_catalog_name"),
            ("23505", "unique_violation"),
            ("22003", "numeric_value_out_of_range"),
            ("53400", "configuration_limit_exceeded"),
            ("57P04", "database_dropped"),
            ("XX000", "internal_error"),
        ] {
            assert!(!retryable_code(code), "{code} {name} must be permanent");
        }
    }

    #[test]
    fn driver_errors_without_a_server_are_classified() {
        let io = map_err(sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()));
        assert!(io.is_retryable(), "{io}");
        assert!(map_err(sqlx::Error::PoolTimedOut).is_retryable());
        assert!(map_err(sqlx::Error::WorkerCrashed).is_retryable());
        for permanent in [
            sqlx::Error::PoolClosed,
            sqlx::Error::Configuration("bad url".into()),
            sqlx::Error::Protocol("unexpected message".into()),
            sqlx::Error::RowNotFound,
        ] {
            let e = map_err(permanent);
            assert!(
                matches!(
                    e,
                    Error::Store {
                        retryable: false,
                        ..
                    }
                ),
                "{e}"
            );
        }
    }
}
