//! Lease mode around an async function: a charge on a card network that must happen once
//! per idempotency key, however often the caller retries.
//!
//! `cargo run -p idem-barrier --example lease`

use std::sync::Arc;

use idem::prelude::*;
use idem::sqlite::SqliteStore;

/// The side effect: in real life an HTTP call that takes the derived key as its own
/// idempotency key.
async fn charge_card(downstream_key: &Key, cents: u64) -> Result<String, std::io::Error> {
    Ok(format!("ch_{}_{cents}", downstream_key.id().len()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::connect(dir.path().join("idem.db")).await?;
    let barrier = Barrier::new(Arc::new(store));
    let key = Key::new("merchant-7", "order-1001")?;

    for attempt in 1..=3 {
        let response = barrier
            .execute(&key, None, |lease| async move {
                let downstream = lease.derive("card-network");
                charge_card(&downstream, 1250)
                    .await
                    .map_err(Failure::<String, _>::Retryable)
            })
            .await?;
        println!(
            "attempt {attempt}: {:?} (replayed: {})",
            response.outcome, response.replayed
        );
        assert_eq!(response.replayed, attempt > 1);
    }
    Ok(())
}
