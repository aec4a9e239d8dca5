//! The one classification of SQLite errors into retryable, permanent and corrupt; the crate
//! docs carry the same table.

use idem_core::Error;
use rusqlite::ErrorCode;

/// Maps a rusqlite error to a store error, keeping it as the source.
///
/// Retryable ([`Error::Store`] with `retryable: true`): the lock, the resource or the I/O
/// failure may be gone on the next try —
/// `SQLITE_BUSY` (another connection held the write lock past the busy timeout, a stale
/// WAL snapshot, WAL recovery), `SQLITE_LOCKED` (a table lock of a shared cache),
/// `SQLITE_IOERR` (the operating system failed a read, write or sync; a commit that fails
/// this way may or may not have reached the disk, and the retry learns which),
/// `SQLITE_FULL` (disk full: space can be freed), `SQLITE_NOMEM`, `SQLITE_INTERRUPT`,
/// `SQLITE_ABORT`, `SQLITE_PROTOCOL` (a WAL locking race) and `SQLITE_SCHEMA`.
///
/// Corrupt ([`Error::Corrupt`], no key: the damage is in the file, not in one record):
/// `SQLITE_CORRUPT`.
///
/// Permanent (`retryable: false`): the same call fails again until someone changes the
/// file or the configuration — `SQLITE_NOTADB` (the path is not a SQLite database),
/// `SQLITE_READONLY`, `SQLITE_CANTOPEN`, `SQLITE_PERM`, `SQLITE_AUTH`, `SQLITE_ERROR`
/// (a missing table, bad SQL), constraint violations, `SQLITE_TOOBIG`, misuse, and every
/// error of rusqlite itself (conversions, parameters). A stored record whose columns do not
/// decode is [`Error::Corrupt`] naming its key; that is decided where the key is known.
pub(crate) fn map_err(e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt) => Error::corrupt(e),
        Some(code) if retryable(code) => Error::retryable(e),
        _ => Error::permanent(e),
    }
}

/// Whether a SQLite primary result code is retryable (see [`map_err`]).
fn retryable(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::OutOfMemory
            | ErrorCode::OperationInterrupted
            | ErrorCode::OperationAborted
            | ErrorCode::FileLockingProtocolFailed
            | ErrorCode::SchemaChanged
    )
}

/// Whether `e` is `SQLITE_BUSY`: another connection holds the write lock.
pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DatabaseBusy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::ffi;

    fn sqlite(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
    }

    /// The whole code table, including the codes no test can provoke on demand
    /// (`SQLITE_NOMEM`, `SQLITE_PROTOCOL`, an I/O error of the disk itself).
    #[test]
    fn the_code_table_is_what_the_docs_say() {
        for (code, name) in [
            (ffi::SQLITE_BUSY, "busy"),
            (ffi::SQLITE_BUSY_SNAPSHOT, "busy snapshot"),
            (ffi::SQLITE_BUSY_RECOVERY, "busy recovery"),
            (ffi::SQLITE_BUSY_TIMEOUT, "busy timeout"),
            (ffi::SQLITE_LOCKED, "locked"),
            (ffi::SQLITE_LOCKED_SHAREDCACHE, "locked shared cache"),
            (ffi::SQLITE_IOERR, "I/O error"),
            (ffi::SQLITE_IOERR_FSYNC, "fsync failed"),
            (ffi::SQLITE_IOERR_WRITE, "write failed"),
            (ffi::SQLITE_FULL, "disk full"),
            (ffi::SQLITE_NOMEM, "out of memory"),
            (ffi::SQLITE_INTERRUPT, "interrupted"),
            (ffi::SQLITE_ABORT, "aborted"),
            (ffi::SQLITE_PROTOCOL, "lock protocol"),
            (ffi::SQLITE_SCHEMA, "schema changed"),
        ] {
            let e = map_err(sqlite(code));
            assert!(e.is_retryable(), "{name} must be retryable: {e}");
        }
        for (code, name) in [
            (ffi::SQLITE_CORRUPT, "corrupt"),
            (ffi::SQLITE_CORRUPT_INDEX, "corrupt index"),
        ] {
            let e = map_err(sqlite(code));
            assert!(
                matches!(e, Error::Corrupt { key: None, .. }),
                "{name} must be corrupt: {e}"
            );
        }
        for (code, name) in [
            (ffi::SQLITE_NOTADB, "not a database"),
            (ffi::SQLITE_READONLY, "read-only"),
            (ffi::SQLITE_READONLY_DBMOVED, "read-only, file moved"),
            (ffi::SQLITE_CANTOPEN, "cannot open"),
            (ffi::SQLITE_PERM, "permission"),
            (ffi::SQLITE_AUTH, "authorization"),
            (ffi::SQLITE_ERROR, "SQL error"),
            (ffi::SQLITE_CONSTRAINT_PRIMARYKEY, "constraint"),
            (ffi::SQLITE_TOOBIG, "too big"),
            (ffi::SQLITE_MISUSE, "misuse"),
            (ffi::SQLITE_INTERNAL, "internal"),
        ] {
            let e = map_err(sqlite(code));
            assert!(
                matches!(
                    e,
                    Error::Store {
                        retryable: false,
                        ..
                    }
                ),
                "{name} must be permanent: {e}"
            );
        }
        let conversion = map_err(rusqlite::Error::IntegralValueOutOfRange(0, -1));
        assert!(
            matches!(
                conversion,
                Error::Store {
                    retryable: false,
                    ..
                }
            ),
            "{conversion}"
        );
    }
}
