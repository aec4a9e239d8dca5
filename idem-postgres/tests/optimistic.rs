//! `TxPolicy::Optimistic` where the business rows have a unique key of their own: a
//! duplicate's operation fails on that key before it reaches the claim, and the answer is
//! still the first request's outcome (a replay), never the operation's error.

mod common;

use std::sync::Arc;

use idem_core::{Barrier, Error, Failure, Fingerprint, Key, Outcome, RunError, TxPolicy};
use idem_postgres::{operation, sqlx::PgConnection, PgOperation};
use sqlx::AssertSqlSafe;

/// Inserts order `order-1` into `orders` (primary key `order_id`), holds the transaction
/// open for 50 ms so that duplicates overlap, and answers the amount.
fn place(orders: &str) -> PgOperation<u64, String, sqlx::Error> {
    let sql = format!(
        "INSERT INTO {orders} (order_id, amount) SELECT 'order-1', 100 FROM pg_sleep(0.05)"
    );
    operation(async move |conn: &mut PgConnection| {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await
            .map_err(Failure::Retryable)?;
        Ok::<_, Failure<String, sqlx::Error>>(100u64)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_that_collide_on_a_business_key_replay_the_first() {
    let factory = common::factory();
    if !idem_conformance::available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let pool = factory.pool().await.unwrap().clone();
    let orders = format!("{}.orders", factory.schema());
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {orders} (order_id TEXT PRIMARY KEY, amount BIGINT NOT NULL)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let barrier = Barrier::new(Arc::new(store));
    let key = Key::new("optimistic", "order-1").unwrap();
    let fp = Some(Fingerprint::of_bytes(b"order-1 100"));

    let calls: Vec<_> = (0..12)
        .map(|_| {
            let (barrier, key, op) = (barrier.clone(), key.clone(), place(&orders));
            tokio::spawn(async move {
                barrier
                    .transaction(&key, fp, TxPolicy::Optimistic, op)
                    .await
            })
        })
        .collect();
    let mut executed = 0;
    for call in calls {
        let r = call
            .await
            .unwrap()
            .expect("every duplicate answers the outcome");
        assert_eq!(r.outcome, Outcome::Completed(100));
        executed += usize::from(!r.replayed);
    }
    assert_eq!(executed, 1, "exactly one duplicate executes");

    // A retry long after: its insert fails on the order's key, and it replays.
    let r = barrier
        .transaction(&key, fp, TxPolicy::Optimistic, place(&orders))
        .await
        .unwrap();
    assert!(r.replayed);
    assert_eq!(r.outcome, Outcome::Completed(100));
    // Another payload on the same key is a mismatch, not the operation's error.
    let other = Some(Fingerprint::of_bytes(b"order-1 999"));
    let r = barrier
        .transaction(&key, other, TxPolicy::Optimistic, place(&orders))
        .await;
    assert!(
        matches!(r, Err(RunError::Barrier(Error::Mismatch))),
        "another payload answered {r:?}"
    );
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {orders}")))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn an_operation_error_on_a_free_key_is_the_answer_and_leaves_nothing() {
    let factory = common::factory();
    if !idem_conformance::available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let barrier = Barrier::new(Arc::new(store.clone()));
    let key = Key::new("optimistic", "missing-table").unwrap();
    // The operation writes to a table that does not exist: its own (retryable) error.
    let r = barrier
        .transaction(
            &key,
            None,
            TxPolicy::Optimistic,
            place("no_such_schema.orders"),
        )
        .await;
    assert!(matches!(r, Err(RunError::Operation(_))), "answered {r:?}");
    assert!(idem_core::Store::get(&store, &key).await.unwrap().is_none());
}
