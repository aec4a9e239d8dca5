//! Every failure of the crate docs' error table that SQLite can be made to produce on
//! demand, provoked for real and checked for its class (the table's remaining rows are
//! checked code by code in `src/error.rs`).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    Barrier, Clock, Deadlines, Error, Failure, Key, RunError, Store, SystemClock, TxPolicy,
};
use idem_sqlite::rusqlite::{self, Connection, ErrorCode};
use idem_sqlite::{SqliteOperation, SqliteOptions, SqliteStore};

fn deadlines() -> (Deadlines, idem_core::Timestamp) {
    let now = SystemClock.now();
    let d = Deadlines {
        lease_until: now.plus(Duration::from_secs(60)),
        expires_at: now.plus(Duration::from_secs(3600)),
    };
    (d, now)
}

async fn begin(store: &SqliteStore, id: &str) -> Result<idem_core::Begin, Error> {
    let (d, now) = deadlines();
    store
        .begin(&Key::new("errors", id).unwrap(), None, d, now)
        .await
}

/// The SQLite result code inside a store error, if any.
fn code(e: &Error) -> Option<ErrorCode> {
    let source = match e {
        Error::Store { source, .. } | Error::Corrupt { source, .. } => source,
        _ => return None,
    };
    source
        .downcast_ref::<rusqlite::Error>()
        .and_then(rusqlite::Error::sqlite_error_code)
}

fn assert_class(e: &Error, retryable: bool, expected: ErrorCode) {
    assert!(
        matches!(e, Error::Store { retryable: r, .. } if *r == retryable),
        "expected a {} store error, got {e:?}",
        if retryable { "retryable" } else { "permanent" }
    );
    assert_eq!(code(e), Some(expected), "{e}");
}

fn op() -> SqliteOperation<u64, String, String> {
    Box::new(|_| Ok(1))
}

/// Another connection holds `BEGIN EXCLUSIVE`: a write waits out the busy timeout and fails
/// with a retryable `SQLITE_BUSY`; a transactional `NoWait` claim answers `InProgress` at
/// once; reads (WAL) go on.
#[tokio::test]
async fn busy_is_retryable_and_no_wait_is_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.db");
    let options = SqliteOptions::default().with_busy_timeout(Duration::from_millis(50));
    let store = SqliteStore::connect_with(&path, options).await.unwrap();
    let blocker = Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let e = begin(&store, "k").await.unwrap_err();
    assert_class(&e, true, ErrorCode::DatabaseBusy);
    assert_eq!(e.http_status(), 503);

    let barrier = Barrier::new(Arc::new(store.clone()));
    let key = Key::new("errors", "tx").unwrap();
    match barrier.transaction(&key, None, TxPolicy::Wait, op()).await {
        Err(RunError::Barrier(e)) => assert_class(&e, true, ErrorCode::DatabaseBusy),
        other => panic!("expected busy, got {other:?}"),
    }
    match barrier
        .transaction(&key, None, TxPolicy::NoWait, op())
        .await
    {
        Err(RunError::Barrier(Error::InProgress { .. })) => {}
        other => panic!("expected InProgress, got {other:?}"),
    }
    assert_eq!(store.get(&key).await.unwrap(), None);

    blocker.execute_batch("ROLLBACK").unwrap();
    let r = barrier
        .transaction(&key, None, TxPolicy::NoWait, op())
        .await
        .unwrap();
    assert!(!r.replayed);
    assert!(matches!(
        begin(&store, "k").await,
        Ok(idem_core::Begin::Acquired(_))
    ));
}

/// A transaction that ran feeds the barrier's duration estimate, and a `NoWait` duplicate's
/// `Retry-After` comes from it rather than from a constant.
#[tokio::test]
async fn no_wait_retry_after_follows_observed_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("estimate.db");
    let store = SqliteStore::connect_with(&path, SqliteOptions::default())
        .await
        .unwrap();
    let barrier = Barrier::new(Arc::new(store));
    let blocker = Connection::open(&path).unwrap();
    let in_progress = |r: Result<_, RunError<String>>| match r {
        Err(RunError::Barrier(Error::InProgress { retry_after })) => retry_after,
        other => panic!("expected InProgress, got {other:?}"),
    };

    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let key = Key::new("errors", "estimate").unwrap();
    let before = barrier
        .transaction(&key, None, TxPolicy::NoWait, op())
        .await;
    assert_eq!(in_progress(before), idem_core::NO_WAIT_RETRY_AFTER);
    blocker.execute_batch("ROLLBACK").unwrap();

    assert_eq!(barrier.typical_duration(), None);
    barrier
        .transaction(&key, None, TxPolicy::NoWait, op())
        .await
        .unwrap();
    let typical = barrier
        .typical_duration()
        .expect("the transaction was measured");

    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let other = Key::new("errors", "estimate-2").unwrap();
    let after = barrier
        .transaction(&other, None, TxPolicy::NoWait, op())
        .await;
    blocker.execute_batch("ROLLBACK").unwrap();
    let retry_after = in_progress(after);
    assert!(
        retry_after
            == typical
                .max(Duration::from_millis(1))
                .min(idem_core::NO_WAIT_RETRY_AFTER),
        "Retry-After {retry_after:?} after transactions of {typical:?}"
    );
}

/// The store's own writers queue for the write lock instead of polling it: many
/// transactions that each hold it for a while all succeed, even when the queue is far
/// longer than the busy timeout. (Before the queue, SQLite's busy handler let some of them
/// starve past the timeout: a retryable error the lab counted as a lost payment.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_of_one_store_queue_instead_of_failing_busy() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions::default().with_busy_timeout(Duration::from_millis(20));
    let store = SqliteStore::connect_with(dir.path().join("queue.db"), options)
        .await
        .unwrap();
    let barrier = Arc::new(Barrier::new(Arc::new(store)));
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                let key = Key::new("queue", format!("k{i}")).unwrap();
                let op: SqliteOperation<u64, String, String> = Box::new(|_| {
                    std::thread::sleep(Duration::from_millis(10));
                    Ok(1)
                });
                barrier.transaction(&key, None, TxPolicy::Wait, op).await
            })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
    }
}

/// A table lock of a shared cache (`file:…?cache=shared`): `SQLITE_LOCKED`, retryable.
#[tokio::test]
async fn shared_cache_table_lock_is_retryable() {
    let dir = tempfile::tempdir().unwrap();
    let uri = format!(
        "file:{}?cache=shared",
        dir.path().join("shared.db").display()
    );
    let store = SqliteStore::connect(&uri).await.unwrap();
    begin(&store, "k").await.unwrap();
    let writer = Connection::open(&uri).unwrap();
    writer
        .execute_batch(
            "BEGIN IMMEDIATE; UPDATE idem_records SET updated_at = updated_at + 1 WHERE id = 'k'",
        )
        .unwrap();
    let e = store
        .get(&Key::new("errors", "k").unwrap())
        .await
        .unwrap_err();
    assert_class(&e, true, ErrorCode::DatabaseLocked);
    writer.execute_batch("ROLLBACK").unwrap();
    assert!(store
        .get(&Key::new("errors", "k").unwrap())
        .await
        .unwrap()
        .is_some());
}

/// The database reaches its size limit (`PRAGMA max_page_count`, the engine's own disk-full
/// path): `SQLITE_FULL`, retryable — space can be freed — and nothing is written.
#[tokio::test]
async fn disk_full_is_retryable() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions::default().with_max_connections(1);
    let store = SqliteStore::connect_with(dir.path().join("full.db"), options)
        .await
        .unwrap();
    store
        .with_connection(|c| {
            let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            c.pragma_update(None, "max_page_count", pages)
        })
        .await
        .unwrap();
    let big = vec![7u8; 64 * 1024];
    let (d, now) = deadlines();
    let key = Key::new("errors", "full").unwrap();
    let idem_core::Begin::Acquired(lease) = store.begin(&key, None, d, now).await.unwrap() else {
        panic!("fresh key")
    };
    let e = store
        .complete(&lease, &big, d.expires_at, now)
        .await
        .unwrap_err();
    assert_class(&e, true, ErrorCode::DiskFull);
    assert!(matches!(
        store.get(&key).await.unwrap().map(|r| r.state),
        Some(idem_core::State::InProgress { .. })
    ));
}

/// A database opened read-only (`?mode=ro`): opening and reading work (the migration only
/// reads when the schema is complete); a write is a permanent `SQLITE_READONLY`.
#[tokio::test]
async fn read_only_is_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro.db");
    let writable = SqliteStore::connect(&path).await.unwrap();
    begin(&writable, "k").await.unwrap();
    let store = SqliteStore::connect(format!("file:{}?mode=ro", path.display()))
        .await
        .unwrap();
    assert!(store
        .get(&Key::new("errors", "k").unwrap())
        .await
        .unwrap()
        .is_some());
    let e = begin(&store, "other").await.unwrap_err();
    assert_class(&e, false, ErrorCode::ReadOnly);
    assert_eq!(e.http_status(), 500);
}

/// `PRAGMA query_only` (a read-only connection): the same class.
#[tokio::test]
async fn query_only_is_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions::default().with_max_connections(1);
    let store = SqliteStore::connect_with(dir.path().join("q.db"), options)
        .await
        .unwrap();
    store
        .with_connection(|c| c.pragma_update(None, "query_only", true))
        .await
        .unwrap();
    let e = begin(&store, "k").await.unwrap_err();
    assert_class(&e, false, ErrorCode::ReadOnly);
}

/// A file that is not a SQLite database: permanent `SQLITE_NOTADB`, at connect.
#[tokio::test]
async fn not_a_database_is_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(
        &path,
        "these are not the pages you are looking for\n".repeat(200),
    )
    .unwrap();
    let e = SqliteStore::connect(&path).await.unwrap_err();
    assert_class(&e, false, ErrorCode::NotADatabase);
}

/// A database whose table pages were overwritten: [`Error::Corrupt`] (no key: the damage is
/// in the file), permanent.
#[tokio::test]
async fn corrupt_database_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corrupt.db");
    let store = SqliteStore::connect(&path).await.unwrap();
    for i in 0..200 {
        begin(&store, &format!("k{i}")).await.unwrap();
    }
    store
        .with_connection(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)"))
        .await
        .unwrap();
    drop(store);
    let page_size: i64 = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    let page_size = usize::try_from(page_size).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 3 * page_size, "{} bytes", bytes.len());
    for b in &mut bytes[page_size..] {
        *b = 0xA5;
    }
    std::fs::write(&path, bytes).unwrap();
    let e = match SqliteStore::connect(&path).await {
        Err(e) => e,
        Ok(store) => store.stats().await.unwrap_err(),
    };
    assert!(matches!(e, Error::Corrupt { key: None, .. }), "{e:?}");
    assert_eq!(code(&e), Some(ErrorCode::DatabaseCorrupt), "{e}");
    assert!(!e.is_retryable());
}

/// The table was dropped under the store (`SQLITE_ERROR`, no such table): permanent.
#[tokio::test]
async fn missing_table_is_permanent() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(dir.path().join("t.db")).await.unwrap();
    store
        .with_connection(|c| c.execute_batch("DROP TABLE idem_records"))
        .await
        .unwrap();
    let e = begin(&store, "k").await.unwrap_err();
    assert_class(&e, false, ErrorCode::Unknown);
    assert!(e.to_string().contains("no such table"), "{e}");
}

/// A path that cannot be opened (`SQLITE_CANTOPEN`): permanent.
#[tokio::test]
async fn cannot_open_is_permanent() {
    let e = SqliteStore::connect("/proc/idem/cannot/exist.db")
        .await
        .unwrap_err();
    assert_class(&e, false, ErrorCode::CannotOpen);
}

const CHILD: &str = "IDEM_SQLITE_ERRORS_CHILD_DB";

/// Runs in a child whose file-size limit (`ulimit -f`) is smaller than the outcome it
/// writes: the operating system refuses the write (`EFBIG`), SQLite reports an I/O error.
#[test]
#[ignore = "helper: run as a child process by `io_error_is_retryable`"]
fn io_error_child() {
    let Ok(path) = std::env::var(CHILD) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = SqliteStore::connect(&path).await.unwrap();
        let (d, now) = deadlines();
        let key = Key::new("errors", "io").unwrap();
        let idem_core::Begin::Acquired(lease) = store.begin(&key, None, d, now).await.unwrap()
        else {
            panic!("fresh key")
        };
        let e = store
            .complete(&lease, &vec![1u8; 1 << 20], d.expires_at, now)
            .await
            .unwrap_err();
        println!(
            "class={} code={:?} error={e}",
            if e.is_retryable() {
                "retryable"
            } else {
                "permanent"
            },
            code(&e)
        );
    });
}

#[test]
fn io_error_is_retryable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("io.db");
    let exe = std::env::current_exe().unwrap();
    // An ignored SIGXFSZ is inherited across exec, so the write fails instead of killing.
    // The limit is where a WAL frame's header write starts exactly (32 + 84 × (24 + 4096) =
    // 338 × 1024 bytes), so the write fails whole (`EFBIG`, an I/O error); a limit inside a
    // write would make it short, which SQLite reports as `SQLITE_FULL` instead.
    let out = Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 338; exec \"$0\" --exact io_error_child --ignored --nocapture --test-threads=1")
        .arg(&exe)
        .env(CHILD, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("class=").map(|(_, result)| result))
        .unwrap_or_else(|| panic!("no result in the child's output: {stdout}"));
    assert!(
        line.starts_with("retryable code=Some(SystemIoFailure)"),
        "{line}"
    );
}

/// Options and paths that cannot work are [`Error::Config`], before any file is touched.
#[tokio::test]
async fn bad_options_and_private_databases_are_config_errors() {
    for table in [
        "Idem",
        "idem-records",
        "main.idem_records",
        "sqlite_idem",
        "idem_schema_versions",
        "",
    ] {
        let e = SqliteOptions::default().with_table(table).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{table:?}: {e:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    for options in [
        SqliteOptions::default().with_max_connections(0),
        SqliteOptions::default().with_busy_timeout(Duration::from_secs(1 << 32)),
    ] {
        let e = SqliteStore::connect_with(dir.path().join("c.db"), options)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e:?}");
    }
    assert!(!dir.path().join("c.db").exists());
    for path in ["", "file:private?mode=memory", "file::memory:"] {
        let e = SqliteStore::connect(path).await.unwrap_err();
        assert!(
            matches!(&e, Error::Config(m) if m.contains("private to one connection")),
            "{path:?}: {e:?}"
        );
    }
}

/// An operation that ends the barrier's transaction itself gets a permanent error, and the
/// key is not marked done.
#[tokio::test]
async fn an_operation_that_commits_by_itself_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(dir.path().join("t.db")).await.unwrap();
    let barrier = Barrier::new(Arc::new(store.clone()));
    let key = Key::new("errors", "rogue").unwrap();
    let rogue: SqliteOperation<u64, String, String> = Box::new(|tx| {
        tx.execute_batch("COMMIT")
            .map_err(|e| Failure::Retryable(e.to_string()))?;
        Ok(1)
    });
    match barrier.transaction(&key, None, TxPolicy::Wait, rogue).await {
        Err(RunError::Barrier(e)) => {
            assert!(
                matches!(
                    e,
                    Error::Store {
                        retryable: false,
                        ..
                    }
                ),
                "{e:?}"
            );
        }
        other => panic!("expected a permanent error, got {other:?}"),
    }
    assert_eq!(store.get(&key).await.unwrap(), None);
    let r = barrier
        .transaction(&key, None, TxPolicy::Wait, op())
        .await
        .unwrap();
    assert!(!r.replayed);
}
