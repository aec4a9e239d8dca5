//! Transactional operations written as plain async closures ([`idem_postgres::operation`]):
//! the business row, the claim and the outcome commit together, and a retry replays.

mod common;

use std::sync::Arc;

use idem_core::{Barrier, Failure, Key, Outcome, TxPolicy};
use idem_postgres::{operation, sqlx::PgConnection};
use sqlx::AssertSqlSafe;

#[tokio::test]
async fn an_async_closure_is_an_operation() {
    let factory = common::factory();
    if !idem_conformance::available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let barrier = Barrier::new(Arc::new(store));
    let key = Key::new("ergonomics", "order-1").unwrap();
    let insert = format!(
        "INSERT INTO {}.business (scope, id, n) VALUES ('ergonomics', 'order-1', 7)",
        factory.schema()
    );
    for attempt in 0..2 {
        let sql = insert.clone();
        let op = operation(async move |conn: &mut PgConnection| {
            sqlx::query(AssertSqlSafe(sql))
                .execute(&mut *conn)
                .await
                .map_err(Failure::Retryable)?;
            Ok::<_, Failure<String, sqlx::Error>>(7u64)
        });
        let r = barrier
            .transaction(&key, None, TxPolicy::Wait, op)
            .await
            .unwrap();
        assert_eq!(
            (r.outcome, r.replayed),
            (Outcome::Completed(7), attempt == 1)
        );
    }
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.business WHERE scope = 'ergonomics'",
        factory.schema()
    )))
    .fetch_one(factory.pool().await.unwrap())
    .await
    .unwrap();
    assert_eq!(rows, 1);
}
