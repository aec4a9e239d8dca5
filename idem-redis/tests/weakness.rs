//! The documented weakness, shown honestly: a Redis without persistence forgets every record
//! when it restarts, and the store's guarantees say so.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use idem_core::{Barrier, Failure, Key, Outcome, Store};
use idem_redis::RedisStore;
use tokio::process::{Child, Command};

async fn start_server(port: u16) -> Option<Child> {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let url = format!("redis://127.0.0.1:{port}/");
    for _ in 0..100 {
        if let Ok(client) = redis::Client::open(url.as_str()) {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
                {
                    return Some(child);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_persistence_forgets_completed_records() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Some(mut server) = start_server(port).await else {
        assert!(
            !idem_conformance::required("redis"),
            "IDEM_TEST_REQUIRE names redis but no redis-server could be started"
        );
        eprintln!("skipped: no redis-server binary to start a throwaway server");
        return;
    };
    let store = RedisStore::connect(&format!("redis://127.0.0.1:{port}/"))
        .await
        .unwrap();
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

    server.kill().await.unwrap();
    server.wait().await.unwrap();
    let _server = start_server(port)
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
