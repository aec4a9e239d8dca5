//! The table: concurrent migrations, names, a hand-made table that would merge keys, and
//! keys that must stay distinct byte for byte.

mod common;

use std::time::Duration;

use common::url;
use idem_conformance::available;
use idem_core::{Begin, Clock, Deadlines, Error, Key, Store, SystemClock};
use idem_mysql::{MySqlOptions, MySqlStore};
use sqlx::AssertSqlSafe;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eighty_concurrent_migrations_all_succeed() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let pool = factory.pool().await.unwrap().clone();
    let table = factory.table();
    let options = MySqlOptions::default().with_table(&table).unwrap();
    // A fleet deploying together: each process has its own connection.
    let tasks: Vec<_> = (0..80)
        .map(|_| {
            let options = options.clone();
            tokio::spawn(async move {
                let store =
                    MySqlStore::connect_with(&url(), options.with_max_connections(1)).await?;
                store.pool().close().await;
                Ok::<_, Error>(())
            })
        })
        .collect();
    let mut failed = Vec::new();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            failed.push(e.to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 80 failed: {failed:?}",
        failed.len()
    );
    let store = MySqlStore::from_pool(pool, options);
    store.migrate().await.unwrap();
    let now = SystemClock.now();
    let k = Key::new("migrate", "k").unwrap();
    assert!(matches!(
        store.begin(&k, None, deadlines(now), now).await.unwrap(),
        Begin::Acquired(_)
    ));
}

fn deadlines(now: idem_core::Timestamp) -> Deadlines {
    Deadlines {
        lease_until: now.plus(Duration::from_secs(30)),
        expires_at: now.plus(Duration::from_secs(3600)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_that_would_merge_keys_is_refused() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let pool = factory.pool().await.unwrap().clone();
    let table = factory.table();
    // Made by hand with case-insensitive text keys: 'A' = 'a' and 'a ' = 'a' there.
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {table} (
            scope VARCHAR(255) COLLATE utf8mb4_general_ci NOT NULL,
            id VARCHAR(255) COLLATE utf8mb4_general_ci NOT NULL,
            fingerprint VARBINARY(32), state VARCHAR(16) NOT NULL, token BIGINT NOT NULL,
            lease_until BIGINT, response LONGBLOB, created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL, expires_at BIGINT NOT NULL,
            PRIMARY KEY (scope, id), KEY {table}_expires_at (expires_at)) ENGINE = InnoDB"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let store = MySqlStore::from_pool(pool, MySqlOptions::default().with_table(&table).unwrap());
    match store.migrate().await {
        Err(Error::Config(why)) => assert!(why.contains("varchar"), "{why}"),
        other => panic!("a case-insensitive key table must be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_qualified_table_works_and_the_schema_is_printable() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let pool = factory.pool().await.unwrap().clone();
    let database: String = sqlx::query_scalar("SELECT DATABASE()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let table = factory.table();
    let options = MySqlOptions::default()
        .with_table(&format!("{database}.{table}"))
        .unwrap();
    let store = MySqlStore::from_pool(pool, options);
    assert!(store.schema_sql().starts_with(&format!(
        "CREATE TABLE IF NOT EXISTS `{database}`.`{table}`"
    )));
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    let now = SystemClock.now();
    let k = Key::new("qualified", "k").unwrap();
    assert!(matches!(
        store.begin(&k, None, deadlines(now), now).await.unwrap(),
        Begin::Acquired(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_distinct_byte_for_byte() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let long = "s".repeat(255);
    let keys = [
        ("a", "x"),
        ("A", "x"),
        ("a ", "x"),
        ("a", "X"),
        ("", "x"),
        ("a/b", "c"),
        ("a", "b/c"),
        ("é", "x"),
        ("e\u{301}", "x"),
        (long.as_str(), "x"),
        ("a", &"i".repeat(255)),
    ];
    let now = SystemClock.now();
    for (scope, id) in keys {
        let k = Key::new(scope, id).unwrap();
        match store.begin(&k, None, deadlines(now), now).await.unwrap() {
            Begin::Acquired(lease) => store
                .complete(
                    &lease,
                    k.to_string().as_bytes(),
                    deadlines(now).expires_at,
                    now,
                )
                .await
                .unwrap(),
            other => panic!("({scope:?}, {id:?}) collided with an earlier key: {other:?}"),
        }
    }
    for (scope, id) in keys {
        let k = Key::new(scope, id).unwrap();
        match store.begin(&k, None, deadlines(now), now).await.unwrap() {
            Begin::Completed { response } => assert_eq!(response, k.to_string().into_bytes()),
            other => panic!("({scope:?}, {id:?}): {other:?}"),
        }
    }
    assert_eq!(store.stats().await.unwrap().completed, keys.len() as u64);
}
