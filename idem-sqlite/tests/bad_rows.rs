//! Rows this version does not understand are typed errors, never panics or wrong replays;
//! the schema version is idem's own.

use idem_core::{Error, Key, Store};
use idem_sqlite::SqliteStore;

async fn store_with(sql: &'static str) -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(dir.path().join("t.db")).await.unwrap();
    store
        .with_connection(move |c| c.execute_batch(sql))
        .await
        .unwrap();
    (dir, store)
}

#[tokio::test]
async fn unknown_state_is_corrupt() {
    let (_dir, store) = store_with(
        "INSERT INTO idem_records VALUES ('s', 'k', NULL, 'archived', 1, NULL, x'01', 0, 0, 0)",
    )
    .await;
    let err = store.get(&Key::new("s", "k").unwrap()).await.unwrap_err();
    assert!(
        matches!(&err, Error::Corrupt { key: Some(k), .. } if k == "s/k"),
        "{err:?}"
    );
    let err = store.stats().await.unwrap_err();
    assert!(err.is_corrupt(), "{err:?}");
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
        assert!(matches!(err, Error::Corrupt { .. }), "{id}: {err:?}");
    }
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store = SqliteStore::connect(&path).await.unwrap();
    store
        .with_connection(|c| {
            c.execute(
                "UPDATE idem_schema_versions SET version = 99 WHERE table_name = 'idem_records'",
                [],
            )
        })
        .await
        .unwrap();
    drop(store);
    let err = SqliteStore::connect(&path).await.unwrap_err();
    assert!(matches!(err, Error::UnknownFormat { .. }), "{err:?}");
}

#[tokio::test]
async fn columns_of_the_wrong_type_are_corrupt_naming_the_key() {
    let (_dir, store) = store_with(
        "INSERT INTO idem_records VALUES ('s', 'fp', 'text, not bytes', 'completed', 1, NULL, x'01', 0, 0, 0);
         INSERT INTO idem_records VALUES ('s', 'tok', NULL, 'completed', 'one', NULL, x'01', 0, 0, 0);
         INSERT INTO idem_records VALUES ('s', 'at', NULL, 'completed', 1, NULL, x'01', 1.5, 0, 0);",
    )
    .await;
    for id in ["fp", "tok", "at"] {
        let key = Key::new("s", id).unwrap();
        let err = store.get(&key).await.unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { key: Some(k), .. } if *k == key.to_string()),
            "{id}: {err:?}"
        );
        let (d, now) = (
            idem_core::Deadlines {
                lease_until: idem_core::Timestamp::from_millis(10),
                expires_at: idem_core::Timestamp::from_millis(20),
            },
            idem_core::Timestamp::from_millis(1),
        );
        let err = store.begin(&key, None, d, now).await.unwrap_err();
        assert!(err.is_corrupt(), "{id}: begin: {err:?}");
    }
}

#[tokio::test]
async fn the_applications_user_version_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    idem_sqlite::rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 7)
        .unwrap();
    let store = SqliteStore::connect(&path).await.unwrap();
    let version: i64 = store
        .with_connection(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(version, 7);
}
