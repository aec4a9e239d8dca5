//! Rows this version does not understand are typed errors, never panics or wrong replays.

use idem_core::{Error, Key, Store};
use idem_sqlite::SqliteStore;

async fn store_with(sql: &'static str) -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("t.db")).await.unwrap();
    store
        .with_connection(move |c| c.execute_batch(sql))
        .await
        .unwrap();
    (dir, store)
}

#[tokio::test]
async fn unknown_state_is_unknown_format() {
    let (_dir, store) = store_with(
        "INSERT INTO idem_records VALUES ('s', 'k', NULL, 'archived', 1, NULL, x'01', 0, 0, 0)",
    )
    .await;
    let err = store.get(&Key::new("s", "k").unwrap()).await.unwrap_err();
    assert!(matches!(err, Error::UnknownFormat { .. }), "{err:?}");
    let err = store.stats().await.unwrap_err();
    assert!(matches!(err, Error::UnknownFormat { .. }), "{err:?}");
}

#[tokio::test]
async fn short_fingerprint_and_missing_response_are_corrupt() {
    let (_dir, store) = store_with(
        "INSERT INTO idem_records VALUES ('s', 'fp', x'0102', 'completed', 1, NULL, x'01', 0, 0, 0);
         INSERT INTO idem_records VALUES ('s', 'resp', NULL, 'completed', 1, NULL, NULL, 0, 0, 0);
         INSERT INTO idem_records VALUES ('s', 'tok', NULL, 'in_progress', -5, 10, NULL, 0, 0, 0);",
    )
    .await;
    for id in ["fp", "resp", "tok"] {
        let err = store.get(&Key::new("s", id).unwrap()).await.unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{id}: {err:?}");
    }
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store = SqliteStore::open(&path).await.unwrap();
    store
        .with_connection(|c| c.pragma_update(None, "user_version", 99))
        .await
        .unwrap();
    drop(store);
    let err = SqliteStore::open(&path).await.unwrap_err();
    assert!(matches!(err, Error::UnknownFormat { .. }), "{err:?}");
}

#[tokio::test]
async fn an_unwritable_path_is_a_store_error() {
    let err = SqliteStore::open("/proc/idem/cannot/exist.db")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Store {
                retryable: false,
                ..
            }
        ),
        "{err:?}"
    );
}
