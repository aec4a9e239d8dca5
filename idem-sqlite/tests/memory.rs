//! `:memory:`: an in-memory database of the store's own, shared by its connections.

use std::sync::Arc;
use std::time::Duration;

use idem_core::{Barrier, Begin, Clock, Deadlines, Key, Outcome, Store, SystemClock, TxPolicy};
use idem_sqlite::{SqliteOperation, SqliteOptions, SqliteStore};

fn deadlines() -> (Deadlines, idem_core::Timestamp) {
    let now = SystemClock.now();
    let d = Deadlines {
        lease_until: now.plus(Duration::from_secs(60)),
        expires_at: now.plus(Duration::from_secs(3600)),
    };
    (d, now)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_is_one_database_for_all_of_the_stores_calls() {
    let options = SqliteOptions::default().with_max_connections(8);
    let store = SqliteStore::connect_with(":memory:", options)
        .await
        .unwrap();
    let guarantees = store.guarantees();
    assert!(guarantees.atomic_claim && guarantees.transactional);
    assert!(!guarantees.durable && !guarantees.shared_across_processes);

    // Many simultaneous claims of one key: exactly one acquires.
    let key = Key::new("memory", "race").unwrap();
    let (d, now) = deadlines();
    let claims: Vec<_> = (0..64)
        .map(|_| {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move { store.begin(&key, None, d, now).await })
        })
        .collect();
    let mut acquired = 0;
    for c in claims {
        match c.await.unwrap().unwrap() {
            Begin::Acquired(_) => acquired += 1,
            Begin::InProgress { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(acquired, 1);

    // Business tables and the barrier's records live in the same database.
    store
        .with_connection(|c| c.execute_batch("CREATE TABLE ledger (id TEXT, amount INTEGER)"))
        .await
        .unwrap();
    let barrier = Barrier::new(Arc::new(store.clone()));
    let pay = Key::new("memory", "pay").unwrap();
    for _ in 0..3 {
        let op: SqliteOperation<i64, String, String> = Box::new(|tx| {
            tx.execute("INSERT INTO ledger VALUES ('pay', 100)", [])
                .map_err(|e| idem_core::Failure::Retryable(e.to_string()))?;
            Ok(100)
        });
        let r = barrier
            .transaction(&pay, None, TxPolicy::Wait, op)
            .await
            .unwrap();
        assert_eq!(r.outcome, Outcome::Completed(100));
    }
    // A connection left inside a transaction is closed; the database outlives it.
    store
        .with_connection(|c| c.execute_batch("BEGIN; INSERT INTO ledger VALUES ('ghost', 1)"))
        .await
        .unwrap();
    let rows: Vec<String> = store
        .with_connection(|c| {
            let mut stmt = c.prepare("SELECT id FROM ledger ORDER BY id")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect()
        })
        .await
        .unwrap();
    assert_eq!(rows, vec!["pay".to_string()]);
    assert!(store.get(&pay).await.unwrap().is_some());

    // Another `:memory:` store is another database.
    let other = SqliteStore::connect(":memory:").await.unwrap();
    assert_eq!(other.get(&pay).await.unwrap(), None);
}
