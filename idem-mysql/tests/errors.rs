//! Error classification through the store's public API against the real server: each
//! failure the crate docs' table names that can be provoked on the shared server (the
//! ones that need a server of their own are in `faults.rs`, the rest in `src/error.rs`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{pool_with, url};
use idem_conformance::{available, TxFactory, TxPlan};
use idem_core::{
    Barrier, Begin, Clock, Deadlines, Error, Failure, Key, RunError, Store, SystemClock, Timestamp,
    TxPolicy,
};
use idem_mysql::{MySqlOperation, MySqlOptions, MySqlStore};
use sqlx::mysql::MySqlPoolOptions;
use sqlx::AssertSqlSafe;
use tokio::sync::oneshot;

fn deadlines(now: Timestamp) -> Deadlines {
    Deadlines {
        lease_until: now.plus(Duration::from_secs(30)),
        expires_at: now.plus(Duration::from_secs(3600)),
    }
}

fn retryable_with(e: &Error, needle: &str) -> bool {
    matches!(
        e,
        Error::Store {
            retryable: true,
            ..
        }
    ) && e.to_string().contains(needle)
}

/// Holds `key`'s transactional claim open (on `store`) until the returned sender fires.
async fn hold(store: &MySqlStore, key: &Key) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (entered_tx, entered) = oneshot::channel::<()>();
    let (release, release_rx) = oneshot::channel::<()>();
    let op: MySqlOperation<u64, String, String> = Box::new(move |_conn| {
        Box::pin(async move {
            let _ = entered_tx.send(());
            let _ = release_rx.await;
            Ok(1)
        })
    });
    let barrier = Barrier::new(Arc::new(store.clone()));
    let k = key.clone();
    let task = tokio::spawn(async move {
        barrier
            .transaction(&k, None, TxPolicy::Wait, op)
            .await
            .unwrap();
    });
    entered.await.unwrap();
    (release, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_closed_pool_is_permanent() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    store.pool().close().await;
    let now = SystemClock.now();
    let k = Key::new("err", "closed").unwrap();
    match store.begin(&k, None, deadlines(now), now).await {
        Err(e @ Error::Store { .. }) => assert!(!e.is_retryable(), "{e}"),
        other => panic!("a closed pool must be a permanent store error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_timeout_is_retryable() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let pool = MySqlPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(200))
        .connect(&url())
        .await
        .unwrap();
    let store = factory
        .store_with(pool.clone(), MySqlOptions::default())
        .await
        .unwrap();
    let _held = pool.acquire().await.unwrap();
    let k = Key::new("err", "pool").unwrap();
    let e = store.get(&k).await.unwrap_err();
    assert!(retryable_with(&e, "timed out"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_connection_is_retryable_and_a_missing_database_permanent() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = MySqlOptions::default().with_acquire_timeout(Duration::from_secs(2));
    let e = MySqlStore::connect_with(&format!("mysql://root@127.0.0.1:{port}/test"), options)
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "refused: {e}");
    let missing = url().rsplit_once('/').unwrap().0.to_string() + "/idem_no_such_database";
    let e = MySqlStore::connect(&missing).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Store {
                retryable: false,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("1049"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lock_wait_timeout_of_a_waiting_duplicate_is_retryable() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let waiting = MySqlStore::from_pool(
        pool_with("SET SESSION innodb_lock_wait_timeout = 1", 2).await,
        MySqlOptions::default()
            .with_table(store.options().table())
            .unwrap(),
    );
    let k = Key::new("err", "lock-wait").unwrap();
    let (release, holder) = hold(&store, &k).await;
    let r = Barrier::new(Arc::new(waiting.clone()))
        .transaction(
            &k,
            None,
            TxPolicy::Wait,
            factory.operation(
                &k,
                TxPlan {
                    rows: 1,
                    hold: Duration::ZERO,
                    end: idem_conformance::TxEnd::Commit,
                },
            ),
        )
        .await;
    match r {
        Err(RunError::Barrier(e)) => assert!(retryable_with(&e, "1205"), "{e}"),
        other => panic!("expected a lock wait timeout, got {other:?}"),
    }
    // Lease mode waits on the same lock.
    let now = SystemClock.now();
    let e = waiting
        .begin(&k, None, deadlines(now), now)
        .await
        .unwrap_err();
    assert!(retryable_with(&e, "1205"), "{e}");
    release.send(()).unwrap();
    holder.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_statement_timeout_is_retryable() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let limited = MySqlStore::from_pool(
        pool_with("SET SESSION max_statement_time = 0.3", 2).await,
        MySqlOptions::default()
            .with_table(store.options().table())
            .unwrap(),
    );
    let k = Key::new("err", "statement-time").unwrap();
    let (release, holder) = hold(&store, &k).await;
    let now = SystemClock.now();
    let e = limited
        .begin(&k, None, deadlines(now), now)
        .await
        .unwrap_err();
    assert!(retryable_with(&e, "1969"), "{e}");
    release.send(()).unwrap();
    holder.await.unwrap();
    // Once the holder committed, the same store replays.
    let now = SystemClock.now();
    assert!(matches!(
        limited.begin(&k, None, deadlines(now), now).await,
        Ok(Begin::Completed { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_connection_mid_transaction_is_retryable_and_nothing_duplicates() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let barrier = Barrier::new(Arc::new(store.clone()));
    let k = Key::new("kill", "order-2").unwrap();
    let (id_tx, id_rx) = oneshot::channel::<u64>();
    let insert = format!(
        "INSERT INTO {} (scope, id, n) VALUES ('kill', 'order-2', 1)",
        factory.business()
    );
    let op: MySqlOperation<u64, String, String> = Box::new(move |conn| {
        Box::pin(async move {
            let fail = |e: sqlx::Error| Failure::Retryable(e.to_string());
            let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                .fetch_one(&mut *conn)
                .await
                .map_err(fail)?;
            sqlx::query(AssertSqlSafe(insert.clone()))
                .execute(&mut *conn)
                .await
                .map_err(fail)?;
            let _ = id_tx.send(id);
            tokio::time::sleep(Duration::from_millis(500)).await;
            sqlx::query(AssertSqlSafe(insert))
                .execute(&mut *conn)
                .await
                .map_err(fail)?;
            Ok(2)
        })
    });
    let running = tokio::spawn({
        let (barrier, k) = (barrier.clone(), k.clone());
        async move { barrier.transaction(&k, None, TxPolicy::Wait, op).await }
    });
    let id = id_rx.await.unwrap();
    sqlx::query(AssertSqlSafe(format!("KILL CONNECTION {id}")))
        .execute(store.pool())
        .await
        .unwrap();
    match running.await.unwrap() {
        Err(RunError::Operation(_)) => {}
        Err(RunError::Barrier(e @ Error::Store { .. })) => assert!(e.is_retryable(), "{e}"),
        other => panic!("a killed connection must surface as a retryable error, got {other:?}"),
    }
    assert_eq!(factory.business_rows(&store, &k).await.unwrap(), 0);
    assert!(
        store.get(&k).await.unwrap().is_none(),
        "no claim survives the killed transaction"
    );
    let plan = TxPlan {
        rows: 2,
        hold: Duration::ZERO,
        end: idem_conformance::TxEnd::Commit,
    };
    let retry = barrier
        .transaction(&k, None, TxPolicy::Wait, factory.operation(&k, plan))
        .await
        .unwrap();
    assert!(!retry.replayed);
    let again = barrier
        .transaction(&k, None, TxPolicy::Wait, factory.operation(&k, plan))
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(
        factory.business_rows(&store, &k).await.unwrap(),
        2,
        "executed exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_records_are_permanent_errors_naming_the_key() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let table = store.options().table().to_string();
    let good_fp = "REPEAT('f', 32)";
    // (id, fingerprint, state, token, lease_until, response)
    let rows = [
        (
            "negative-token",
            good_fp,
            "'completed'",
            "-1",
            "NULL",
            "'x'",
        ),
        ("zero-token", good_fp, "'completed'", "0", "NULL", "'x'"),
        (
            "short-fingerprint",
            "REPEAT('f', 31)",
            "'completed'",
            "1",
            "NULL",
            "'x'",
        ),
        ("unknown-state", good_fp, "'archived'", "1", "NULL", "'x'"),
        ("no-lease", good_fp, "'in_progress'", "1", "NULL", "NULL"),
        (
            "expired-negative-token",
            good_fp,
            "'in_progress'",
            "-5",
            "0",
            "NULL",
        ),
        ("no-response", good_fp, "'failed'", "1", "NULL", "NULL"),
    ];
    for (id, fp, state, token, lease, response) in rows {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {table} (scope, id, fingerprint, state, token, lease_until, response, \
             created_at, updated_at, expires_at) \
             VALUES ('corrupt', '{id}', {fp}, {state}, {token}, {lease}, {response}, 0, 0, 0)"
        )))
        .execute(store.pool())
        .await
        .unwrap();
        let k = Key::new("corrupt", id).unwrap();
        let now = SystemClock.now();
        for e in [
            store.get(&k).await.unwrap_err(),
            store
                .begin(&k, None, deadlines(now), now)
                .await
                .unwrap_err(),
        ] {
            assert!(e.is_corrupt() && !e.is_retryable(), "{id}: {e}");
            assert!(
                e.to_string().contains(&format!("corrupt/{id}")),
                "{id}: {e}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outcome_over_the_limit_is_refused_before_it_is_sent() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let pool = factory.pool().await.unwrap().clone();
    let store = factory
        .store_with(pool, MySqlOptions::default().with_max_outcome_bytes(64))
        .await
        .unwrap();
    // Lease mode: refused, permanent, nothing written, the lease still holds.
    let k = Key::new("big", "lease").unwrap();
    let now = SystemClock.now();
    let Begin::Acquired(lease) = store.begin(&k, None, deadlines(now), now).await.unwrap() else {
        panic!("fresh key not acquired");
    };
    let e = store
        .complete(&lease, &[7; 65], now.plus(Duration::from_secs(60)), now)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooLarge {
                size: 65,
                limit: 64,
                ..
            }
        ) && !e.is_retryable(),
        "{e}"
    );
    store
        .complete(&lease, &[7; 64], now.plus(Duration::from_secs(60)), now)
        .await
        .unwrap();

    // Transactional mode: everything rolls back.
    let k = Key::new("big", "tx").unwrap();
    let op: MySqlOperation<String, String, String> =
        Box::new(|_conn| Box::pin(async move { Ok("x".repeat(100)) }));
    let r = Barrier::new(Arc::new(store.clone()))
        .transaction(&k, None, TxPolicy::Wait, op)
        .await;
    assert!(
        matches!(r, Err(RunError::Barrier(Error::TooLarge { .. }))),
        "{r:?}"
    );
    assert!(store.get(&k).await.unwrap().is_none());
}
