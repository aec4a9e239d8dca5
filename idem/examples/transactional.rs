//! Transactional mode around a block of SQL: the ledger rows, the claim and the outcome
//! commit in one SQLite transaction, so a crash can never leave one without the other.
//!
//! `cargo run -p idem-barrier --example transactional`

use std::sync::Arc;

use idem::prelude::*;
use idem::sqlite::{operation, rusqlite, SqliteStore};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::connect(dir.path().join("shop.db")).await?;
    store
        .with_connection(|c| c.execute_batch("CREATE TABLE ledger (entry TEXT, cents INTEGER)"))
        .await?;
    let barrier = Barrier::new(Arc::new(store.clone()));
    let key = Key::new("merchant-7", "order-1002")?;

    let transfer = || {
        operation(|tx: &rusqlite::Transaction<'_>| {
            tx.execute_batch(
                "INSERT INTO ledger VALUES ('debit', -1250); INSERT INTO ledger VALUES ('credit', 1250);",
            )
            .map_err(Failure::Retryable)?;
            Ok::<_, Failure<String, rusqlite::Error>>("transfer-1002".to_string())
        })
    };
    let first = barrier
        .transaction(&key, None, TxPolicy::Wait, transfer())
        .await?;
    let retry = barrier
        .transaction(&key, None, TxPolicy::Wait, transfer())
        .await?;
    let rows: i64 = store
        .with_connection(|c| c.query_row("SELECT count(*) FROM ledger", [], |r| r.get(0)))
        .await?;
    println!(
        "first: {:?}, retry replayed: {}, ledger rows: {rows}",
        first.outcome, retry.replayed
    );
    assert!(retry.replayed);
    assert_eq!(rows, 2);
    Ok(())
}
