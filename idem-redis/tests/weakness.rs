//! The documented weakness, shown honestly: a Redis without persistence forgets every record
//! when it restarts, and the store's guarantees say so.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::PrivateServer;
use idem_core::{Barrier, Failure, Key, Outcome, Store};
use idem_redis::RedisStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_persistence_forgets_completed_records() {
    let Some(server) = PrivateServer::start(26387, &[]).await else {
        return;
    };
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let guarantees = store.guarantees();
    assert!(
        !guarantees.durable && !guarantees.survives_failover,
        "Redis must not claim durability"
    );
    assert!(guarantees.atomic_claim && guarantees.fenced_completion);

    let barrier = Barrier::new(Arc::new(store));
    let keys: Vec<Key> = (0..10)
        .map(|i| Key::new("weakness", format!("k{i}")).unwrap())
        .collect();
    let charge = |n: u32| move |_lease| async move { Ok::<u32, Failure<String, String>>(n) };
    for (i, k) in keys.iter().enumerate() {
        barrier.execute(k, None, charge(i as u32)).await.unwrap();
        let replay = barrier.execute(k, None, charge(999)).await.unwrap();
        assert!(replay.replayed, "before the restart every key replays");
    }

    let _server = server
        .restart(&[])
        .await
        .expect("restart the throwaway server");

    // The same store reconnects by itself, and every key executes again: the records are gone.
    let mut reexecuted = 0;
    for k in &keys {
        for _ in 0..50 {
            match barrier.execute(k, None, charge(7)).await {
                Ok(r) => {
                    assert!(!r.replayed && r.outcome == Outcome::Completed(7));
                    reexecuted += 1;
                    break;
                }
                Err(e) => {
                    // Reconnecting after the restart: a retryable store error, never a replay.
                    assert!(
                        matches!(&e, idem_core::RunError::Barrier(b) if b.is_retryable()),
                        "{e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    assert_eq!(
        reexecuted,
        keys.len(),
        "a restart without persistence loses every record"
    );
}
