//! The one place that classifies driver errors; the crate docs carry the same table.

use idem_core::Error;
use sqlx::mysql::MySqlDatabaseError;

/// `ER_LOCK_WAIT_TIMEOUT`: a row lock was not granted within `innodb_lock_wait_timeout`
/// (also MariaDB's answer to `NOWAIT` and to a lock wait timeout of 0).
pub(crate) const LOCK_WAIT_TIMEOUT: u16 = 1205;
/// `ER_LOCK_DEADLOCK`: InnoDB chose this transaction as a deadlock victim and rolled it
/// back whole.
pub(crate) const DEADLOCK: u16 = 1213;

/// Server error numbers after which the same call may succeed later.
const RETRYABLE: &[u16] = &[
    LOCK_WAIT_TIMEOUT,
    DEADLOCK,
    1040, // ER_CON_COUNT_ERROR: too many connections
    1203, // ER_TOO_MANY_USER_CONNECTIONS: max_user_connections
    1226, // ER_USER_LIMIT_REACHED: max_queries/updates/connections per hour
    1037, // ER_OUTOFMEMORY
    1038, // ER_OUT_OF_SORTMEMORY
    1041, // ER_OUT_OF_RESOURCES
    1021, // ER_DISK_FULL
    1114, // ER_RECORD_FILE_FULL: the table is full
    1053, // ER_SERVER_SHUTDOWN: shutdown in progress
    1152, // ER_ABORTING_CONNECTION
    1184, // ER_NEW_ABORTING_CONNECTION
    1158, // ER_NET_READ_ERROR
    1159, // ER_NET_READ_INTERRUPTED
    1160, // ER_NET_ERROR_ON_WRITE
    1161, // ER_NET_WRITE_INTERRUPTED
    1180, // ER_ERROR_DURING_COMMIT: the commit failed and was rolled back
    1317, // ER_QUERY_INTERRUPTED: KILL QUERY
    1927, // ER_CONNECTION_KILLED (MariaDB): KILL CONNECTION
    1969, // ER_STATEMENT_TIMEOUT (MariaDB): max_statement_time
    3024, // ER_QUERY_TIMEOUT (MySQL): max_execution_time
    1290, // ER_OPTION_PREVENTS_STATEMENT: read_only / super_read_only (a failover)
    1836, // ER_READ_ONLY_MODE (MariaDB)
    1412, // ER_TABLE_DEF_CHANGED: retry the transaction
    1615, // ER_NEED_REPREPARE: a concurrent DDL invalidated a prepared statement
    1637, // ER_TOO_MANY_CONCURRENT_TRXS
    1689, // ER_LOCK_ABORTED (MariaDB): a lock wait aborted by a pending DDL lock
    3572, // ER_LOCK_NOWAIT (MySQL): NOWAIT found the row locked
];

/// Maps a sqlx error to a store error. Retryable: a lost, refused or reset connection
/// ([`sqlx::Error::Io`]), a pool timeout, a crashed pool worker, and the server errors in
/// `RETRYABLE` (deadlock, lock wait timeout, too many connections, statement timeout,
/// killed query or connection, shutdown, read-only server, ...). Everything else is
/// permanent: a closed pool, a TLS or configuration error, a missing table, a denied
/// privilege, a value the server refuses (a packet over `max_allowed_packet`).
pub(crate) fn map_err(e: sqlx::Error) -> Error {
    let retryable = match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(_) => number(&e).is_some_and(|n| RETRYABLE.contains(&n)),
        _ => false,
    };
    Error::Store {
        retryable,
        source: Box::new(e),
    }
}

/// The server's error number, if `e` is an error the server sent.
pub(crate) fn number(e: &sqlx::Error) -> Option<u16> {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    //! Each server error the table names that one connection can provoke on the shared
    //! server, classified by [`map_err`]. Errors that need a server of their own (too many
    //! connections, read-only, shutdown, refused connections) are in `tests/faults.rs`.

    use std::time::Duration;

    use sqlx::{AssertSqlSafe, Connection, Executor, MySqlConnection};

    use super::*;

    fn url() -> String {
        std::env::var("IDEM_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_string())
    }

    async fn connect() -> Option<MySqlConnection> {
        match MySqlConnection::connect(&url()).await {
            Ok(conn) => Some(conn),
            Err(e) if idem_conformance::required("mysql") => {
                panic!(
                    "IDEM_TEST_REQUIRE names `mysql` but {} is unavailable: {e}",
                    url()
                )
            }
            Err(e) => {
                eprintln!("skipped: `mysql` unavailable at {}: {e}", url());
                None
            }
        }
    }

    fn table() -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        format!("idem_err_{}_{nanos}", std::process::id())
    }

    /// A statement that runs for minutes unless interrupted (`BENCHMARK` and `SLEEP` end
    /// quietly when interrupted; a join does not).
    const SLOW: &str = "SELECT COUNT(*) FROM information_schema.COLLATIONS a, \
         information_schema.COLLATIONS b, information_schema.COLLATIONS c, \
         information_schema.COLLATIONS d";

    fn classified(e: sqlx::Error, want: u16) -> bool {
        assert_eq!(number(&e), Some(want), "{e}");
        map_err(e).is_retryable()
    }

    async fn run<F: std::future::Future<Output = ()>>(f: impl FnOnce(MySqlConnection) -> F) {
        let Some(conn) = connect().await else { return };
        f(conn).await;
    }

    fn block_on<F: std::future::Future<Output = ()>>(f: F) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    /// Two transactions lock two rows in opposite orders: InnoDB rolls one back with 1213.
    #[test]
    fn deadlock_is_retryable() {
        block_on(run(|mut a| async move {
            let t = table();
            a.execute(AssertSqlSafe(format!(
                "CREATE TABLE {t} (k INT PRIMARY KEY, v INT) ENGINE = InnoDB"
            )))
            .await
            .unwrap();
            a.execute(AssertSqlSafe(format!(
                "INSERT INTO {t} VALUES (1, 0), (2, 0)"
            )))
            .await
            .unwrap();
            let mut b = MySqlConnection::connect(&url()).await.unwrap();
            a.execute("BEGIN").await.unwrap();
            b.execute("BEGIN").await.unwrap();
            a.execute(AssertSqlSafe(format!("UPDATE {t} SET v = 1 WHERE k = 1")))
                .await
                .unwrap();
            b.execute(AssertSqlSafe(format!("UPDATE {t} SET v = 1 WHERE k = 2")))
                .await
                .unwrap();
            let sql_a = format!("UPDATE {t} SET v = 2 WHERE k = 2");
            let sql_b = format!("UPDATE {t} SET v = 2 WHERE k = 1");
            let (ra, rb) = tokio::join!(a.execute(AssertSqlSafe(sql_a)), async {
                // Let `a` wait on `b`'s row first, so that `b` closes the cycle.
                tokio::time::sleep(Duration::from_millis(200)).await;
                b.execute(AssertSqlSafe(sql_b)).await
            });
            let victim = match (ra, rb) {
                (Err(e), Ok(_)) | (Ok(_), Err(e)) => e,
                other => panic!("expected exactly one deadlock victim, got {other:?}"),
            };
            assert!(classified(victim, DEADLOCK));
            let _ = a.execute("ROLLBACK").await;
            let _ = b.execute("ROLLBACK").await;
            a.execute(AssertSqlSafe(format!("DROP TABLE {t}")))
                .await
                .unwrap();
        }));
    }

    /// A row lock held past the session's `innodb_lock_wait_timeout`: 1205.
    #[test]
    fn lock_wait_timeout_is_retryable() {
        block_on(run(|mut a| async move {
            let t = table();
            a.execute(AssertSqlSafe(format!(
                "CREATE TABLE {t} (k INT PRIMARY KEY) ENGINE = InnoDB"
            )))
            .await
            .unwrap();
            a.execute(AssertSqlSafe(format!("INSERT INTO {t} VALUES (1)")))
                .await
                .unwrap();
            let mut b = MySqlConnection::connect(&url()).await.unwrap();
            a.execute("BEGIN").await.unwrap();
            a.execute(AssertSqlSafe(format!("SELECT * FROM {t} FOR UPDATE")))
                .await
                .unwrap();
            b.execute("SET SESSION innodb_lock_wait_timeout = 1")
                .await
                .unwrap();
            let e = b
                .execute(AssertSqlSafe(format!("UPDATE {t} SET k = 2")))
                .await
                .unwrap_err();
            assert!(classified(e, LOCK_WAIT_TIMEOUT));
            // MariaDB's NOWAIT answers with the same error.
            let e = b
                .execute(AssertSqlSafe(format!(
                    "SELECT * FROM {t} FOR UPDATE NOWAIT"
                )))
                .await
                .unwrap_err();
            assert!(classified(e, LOCK_WAIT_TIMEOUT));
            a.execute("ROLLBACK").await.unwrap();
            a.execute(AssertSqlSafe(format!("DROP TABLE {t}")))
                .await
                .unwrap();
        }));
    }

    /// MariaDB's `max_statement_time` interrupts a statement with 1969.
    #[test]
    fn statement_timeout_is_retryable() {
        block_on(run(|mut a| async move {
            a.execute("SET SESSION max_statement_time = 0.05")
                .await
                .unwrap();
            let e = a.execute(SLOW).await.unwrap_err();
            assert!(classified(e, 1969));
        }));
    }

    /// `KILL QUERY` from another session interrupts a statement with 1317; `KILL
    /// CONNECTION` ends the session, and its next statement fails on the dead socket.
    #[test]
    fn killed_query_and_connection_are_retryable() {
        block_on(run(|mut a| async move {
            let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                .fetch_one(&mut a)
                .await
                .unwrap();
            let mut killer = MySqlConnection::connect(&url()).await.unwrap();
            let (slow, kill) = tokio::join!(a.execute(SLOW), async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                killer
                    .execute(AssertSqlSafe(format!("KILL QUERY {id}")))
                    .await
            });
            kill.unwrap();
            assert!(classified(slow.unwrap_err(), 1317));

            killer
                .execute(AssertSqlSafe(format!("KILL CONNECTION {id}")))
                .await
                .unwrap();
            let e = a.execute("SELECT 1").await.unwrap_err();
            assert!(
                matches!(e, sqlx::Error::Io(_)) || number(&e) == Some(1927),
                "{e}"
            );
            assert!(map_err(e).is_retryable());
        }));
    }

    /// Schema and privilege problems are permanent: retrying reads the same catalog.
    #[test]
    fn schema_errors_are_permanent() {
        block_on(run(|mut a| async move {
            let e = a
                .execute(AssertSqlSafe(format!("SELECT * FROM {}", table())))
                .await
                .unwrap_err();
            assert_eq!(number(&e), Some(1146), "{e}");
            assert!(!map_err(e).is_retryable());
            let e = a
                .execute("SELECT no_such_column FROM DUAL")
                .await
                .unwrap_err();
            assert!(!map_err(e).is_retryable());
        }));
    }
}
