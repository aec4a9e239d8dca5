//! [`map_err`]: the one place that classifies Redis errors (the table in the crate docs).

use idem_core::{Error, Key};
use redis::{ErrorKind, RedisError, RetryMethod, ServerErrorKind};

/// Classifies a Redis error into a retryable or permanent [`Error::Store`] (see the error
/// table in the crate docs; a test checks every row).
pub(crate) fn map_err(e: RedisError) -> Error {
    if e.kind() == ErrorKind::InvalidClientConfig {
        return Error::Config(format!("Redis client configuration: {e}"));
    }
    Error::Store {
        retryable: retryable(&e),
        source: Box::new(e),
    }
}

/// [`map_err`] for a call on `key`'s record: a record key holding another type
/// (`WRONGTYPE`) is that record's corruption.
pub(crate) fn map_key_err(key: &Key) -> impl Fn(RedisError) -> Error + '_ {
    move |e| {
        if e.code() == Some("WRONGTYPE") {
            Error::corrupt_key(key, e)
        } else {
            map_err(e)
        }
    }
}

/// Whether the same call may succeed later.
fn retryable(e: &RedisError) -> bool {
    match e.kind() {
        // Transient server states: loading a dataset, a replica that cannot serve writes
        // (failover), cluster redirections and reconfiguration, and a script that is not
        // loaded (`EVALSHA` loads it and retries; if that still fails, the next call loads
        // it again).
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::MasterDown
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask
            | ServerErrorKind::NoScript,
        ) => true,
        // `ERR …` (a script error, a syntax error), CROSSSLOT, NOPERM and the rest: the
        // same call fails the same way.
        ErrorKind::Server(_) => false,
        ErrorKind::Extension => matches!(
            e.code(),
            // A script or module is busy (`BUSY`, `BUSYKEY` aside), a write quorum or the
            // disk is missing for now, memory is full until something is purged.
            Some("BUSY" | "NOREPLICAS" | "MISCONF" | "OOM")
        ),
        // Lost, refused, reset or timed-out connections. The call may or may not have run;
        // retrying is safe because every script is fenced or recognises its own call.
        // (The redis crate answers `NoRetry` for permission-denied and unsupported I/O.)
        ErrorKind::Io => !matches!(e.retry_method(), RetryMethod::NoRetry),
        // A cluster node that is not reachable right now.
        ErrorKind::ClusterConnectionNotFound => true,
        // A reply that does not decode, a reply of the wrong type, wrong credentials, a
        // client-side misuse: retrying reads the same bytes or sends the same credentials.
        _ => false,
    }
}

/// Whether the call that failed with `e` may have run on the server although its reply
/// was lost (a timeout or a broken connection; not a refused one, which sent nothing):
/// such a call is reissued once, and a `begin` that is not answered in the end gives back
/// the claim it may have made.
pub(crate) fn outcome_unknown(e: &RedisError) -> bool {
    (e.kind() == ErrorKind::Io || e.is_timeout() || e.is_connection_dropped())
        && !e.is_connection_refusal()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn server_error(reply: &str) -> RedisError {
        match redis::parse_redis_value(reply.as_bytes()) {
            Ok(value) => match value.extract_error() {
                Err(e) => e,
                Ok(v) => panic!("{reply:?} parsed as {v:?}"),
            },
            Err(e) => e,
        }
    }

    #[test]
    fn every_row_of_the_table() {
        // (server reply, retryable)
        let table = [
            ("-LOADING Redis is loading the dataset in memory\r\n", true),
            ("-BUSY Redis is busy running a script.\r\n", true),
            (
                "-READONLY You can't write against a read only replica.\r\n",
                true,
            ),
            ("-MASTERDOWN Link with MASTER is down\r\n", true),
            (
                "-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
                true,
            ),
            ("-CLUSTERDOWN The cluster is down\r\n", true),
            ("-MOVED 3999 127.0.0.1:6381\r\n", true),
            ("-ASK 3999 127.0.0.1:6381\r\n", true),
            ("-NOSCRIPT No matching script.\r\n", true),
            ("-NOREPLICAS Not enough good replicas to write.\r\n", true),
            (
                "-MISCONF Redis is configured to save RDB snapshots\r\n",
                true,
            ),
            (
                "-OOM command not allowed when used memory > 'maxmemory'.\r\n",
                true,
            ),
            (
                "-ERR user_script:1: Script attempted to access a global\r\n",
                false,
            ),
            (
                "-WRONGTYPE Operation against a key holding the wrong kind\r\n",
                false,
            ),
            ("-NOAUTH Authentication required.\r\n", false),
            ("-WRONGPASS invalid username-password pair\r\n", false),
            (
                "-NOPERM this user has no permissions to run 'evalsha'\r\n",
                false,
            ),
            (
                "-CROSSSLOT Keys in request don't hash to the same slot\r\n",
                false,
            ),
        ];
        for (reply, retryable) in table {
            let e = map_err(server_error(reply));
            assert!(
                matches!(e, Error::Store { retryable: r, .. } if r == retryable),
                "{reply:?}: {e}"
            );
        }
        // The error a WAIT shortfall is reported as.
        let shortfall = redis::make_extension_error("NOREPLICAS".into(), None);
        assert!(map_err(shortfall).is_retryable());
        for (kind, unknown) in [
            (io::ErrorKind::TimedOut, true),
            (io::ErrorKind::ConnectionReset, true),
            (io::ErrorKind::BrokenPipe, true),
            (io::ErrorKind::UnexpectedEof, true),
            (io::ErrorKind::ConnectionRefused, false),
        ] {
            let e = RedisError::from(io::Error::from(kind));
            assert_eq!(outcome_unknown(&e), unknown, "{kind:?}");
            assert!(map_err(e).is_retryable(), "{kind:?}");
        }
        let denied = RedisError::from(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(!map_err(denied).is_retryable());
        // A reply that cannot be decoded, or decodes to the wrong type, is permanent.
        let garbage = server_error("?garbage\r\n");
        assert_eq!(garbage.kind(), ErrorKind::Parse, "{garbage}");
        assert!(!map_err(garbage).is_retryable());
        let wrong_type = redis::from_redis_value::<i64>(redis::Value::BulkString(b"x".to_vec()))
            .map_err(RedisError::from)
            .expect_err("a string is not an integer");
        assert!(!map_err(wrong_type).is_retryable());
        let key = Key::new("s", "k").expect("a valid key");
        let e = map_key_err(&key)(server_error(
            "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        ));
        assert!(
            matches!(&e, Error::Corrupt { key: Some(k), .. } if k == "s/k"),
            "{e}"
        );
        assert!(matches!(
            map_err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "bad url"
            ))),
            Error::Config(_)
        ));
    }
}
