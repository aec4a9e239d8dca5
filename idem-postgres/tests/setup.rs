//! Set-up under concurrency and odd input: `migrate` from a fleet at once, and names
//! validated up to PostgreSQL's identifier limit.

mod common;
mod support;

use std::sync::Arc;
use std::time::Duration;

use common::url;
use idem_conformance::available;
use idem_core::{Error, Key, Store};
use idem_postgres::{PgOptions, PgStore, TableName};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// Processes of a fleet deploying together.
const FLEET: usize = 80;

#[test]
fn migrate_from_a_whole_fleet_at_once_succeeds_everywhere() {
    idem_conformance::__block_on(async {
        let factory = common::factory();
        if !available(&factory).await {
            return;
        }
        factory.pool().await.unwrap();
        let options = PgOptions::default()
            .with_table(&format!("{}.fleet", factory.schema()))
            .unwrap();
        // Each process has its own pool (one session), opened before anyone migrates.
        let mut stores = Vec::new();
        for _ in 0..FLEET {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(120))
                .connect(&url())
                .await
                .unwrap();
            stores.push(PgStore::from_pool(pool, options.clone()).unwrap());
        }
        for round in ["creating", "already created"] {
            let start = Arc::new(tokio::sync::Barrier::new(FLEET));
            let calls: Vec<_> = stores
                .iter()
                .cloned()
                .map(|store| {
                    let start = Arc::clone(&start);
                    tokio::spawn(async move {
                        start.wait().await;
                        store.migrate().await
                    })
                })
                .collect();
            let mut failed = Vec::new();
            for call in calls {
                if let Err(e) = call.await.unwrap() {
                    failed.push(e.to_string());
                }
            }
            assert!(
                failed.is_empty(),
                "{round}: {} of {FLEET} concurrent migrations failed: {failed:?}",
                failed.len()
            );
        }
        let key = Key::new("fleet", "k").unwrap();
        assert!(stores[FLEET - 1].get(&key).await.unwrap().is_none());
        for store in &stores {
            store.pool().close().await;
        }
    });
}

#[test]
fn names_are_validated_up_to_the_identifier_limit() {
    let refused = [
        ("Idem", "lowercase"),
        ("idem-records", "lowercase"),
        ("a.b.c", "schema.table"),
        ("", "lowercase"),
        ("x; DROP TABLE y", "lowercase"),
        ("1abc", "lowercase"),
        ("a.", "lowercase"),
        (".a", "lowercase"),
        ("\"quoted\"", "lowercase"),
        ("pg_temp.idem", "temporary"),
        ("pg_temp_3.idem", "temporary"),
        ("pg_catalog.idem", "system"),
        ("pg_toast.idem", "system"),
        ("information_schema.idem", "system"),
    ];
    for (name, why) in refused {
        match TableName::new(name) {
            Err(Error::Config(message)) => {
                assert!(message.contains(why), "{name:?}: {message}")
            }
            other => panic!("{name:?} was accepted: {other:?}"),
        }
    }
    // The index `<table>_expires_at` must fit in 63 bytes: 52 for the table part.
    let longest = "t".repeat(52);
    assert!(TableName::new(&longest).is_ok());
    match TableName::new(&format!("{longest}x")) {
        Err(Error::Config(message)) => assert!(message.contains("63-byte"), "{message}"),
        other => panic!("a 53-byte table name was accepted: {other:?}"),
    }
    let schema = "s".repeat(63);
    assert!(TableName::new(&format!("{schema}.{longest}")).is_ok());
    assert!(TableName::new(&format!("{schema}s.idem")).is_err());
    assert_eq!(
        TableName::new("billing.idem_records").unwrap().quoted(),
        "\"billing\".\"idem_records\""
    );
    assert!(PgOptions::default().with_table("pg_temp.idem").is_err());
}

#[test]
fn the_longest_names_migrate_without_truncation() {
    idem_conformance::__block_on(async {
        let factory = common::factory();
        if !available(&factory).await {
            return;
        }
        // A schema name of exactly 63 bytes, unique to this test.
        let mut schema = support::unique("idem_long");
        schema.push_str(&"s".repeat(63 - schema.len()));
        let table = "t".repeat(52);
        let mut conn = PgConnection::connect(&url()).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let options = PgOptions::default()
            .with_table(&format!("{schema}.{table}"))
            .unwrap();
        let result = PgStore::connect_with(&url(), options).await;
        let names: Vec<(String,)> = sqlx::query_as(
            "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 ORDER BY 1",
        )
        .bind(&schema)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let functions: Vec<(String,)> = sqlx::query_as(
            "SELECT p.proname::text FROM pg_proc p
               JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1",
        )
        .bind(&schema)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&mut conn)
            .await
            .unwrap();
        let store = result.unwrap();
        store.pool().close().await;
        assert_eq!(
            names,
            vec![(format!("{table}_expires_at"),), (format!("{table}_pkey"),)],
            "every derived name kept whole"
        );
        assert_eq!(functions, vec![(format!("{table}_claim"),)]);
    });
}

/// `estimated_stats` reads the planner's statistics, never the table: after `ANALYZE` of a
/// small table (sampled whole) it equals the exact count, and the barrier publishes it.
#[tokio::test]
async fn estimated_stats_come_from_the_planner_statistics() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let barrier = idem_core::Barrier::new(Arc::new(store.clone()));
    for (state, n) in [("completed", 6), ("failed", 3), ("in_progress", 2)] {
        for i in 0..n {
            let key = Key::new("estimate", format!("{state}-{i}")).unwrap();
            let idem_core::Started::Acquired(lease) = barrier.begin(&key, None).await.unwrap()
            else {
                panic!("fresh key");
            };
            match state {
                "completed" => lease.complete(&i).await.unwrap(),
                "failed" => lease.fail(&"declined").await.unwrap(),
                _ => {}
            }
        }
    }
    sqlx::raw_sql(AssertSqlSafe(format!("ANALYZE {}", store.table().quoted())))
        .execute(store.pool())
        .await
        .unwrap();
    let exact = store.stats().await.unwrap();
    let estimate = store.estimated_stats().await.unwrap();
    assert_eq!(estimate, Some(exact), "exact {exact:?}");
    assert_eq!(barrier.observe_estimated_stats().await.unwrap(), exact);
}

/// A table made before the claim function existed (or whose function was dropped): `begin`
/// fails with a permanent error until `migrate` runs, which adds the function and leaves the
/// rows alone.
#[tokio::test]
async fn migrate_adds_the_claim_function_to_a_table_without_it() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let (key, kept) = (
        Key::new("upgrade", "fresh").unwrap(),
        Key::new("upgrade", "kept").unwrap(),
    );
    let (deadlines, now) = common::deadlines();
    assert!(matches!(
        store.begin(&kept, None, deadlines, now).await.unwrap(),
        idem_core::Begin::Acquired(_)
    ));
    // `"schema"."records_n"` names the function `"schema"."records_n_claim"`.
    let table = store.table().quoted();
    let function = format!(
        "{}_claim\"(text, text, bytea, bigint, bigint, bigint)",
        &table[..table.len() - 1]
    );
    sqlx::raw_sql(AssertSqlSafe(format!("DROP FUNCTION {function}")))
        .execute(store.pool())
        .await
        .unwrap();
    let e = store.begin(&key, None, deadlines, now).await.unwrap_err();
    assert!(!e.is_retryable(), "a missing function is permanent: {e}");
    store.migrate().await.unwrap();
    assert!(matches!(
        store.begin(&key, None, deadlines, now).await.unwrap(),
        idem_core::Begin::Acquired(_)
    ));
    assert!(matches!(
        store.begin(&kept, None, deadlines, now).await.unwrap(),
        idem_core::Begin::InProgress { .. }
    ));
}
