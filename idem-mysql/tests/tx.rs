//! Transactional mode against the real server, beyond the shared suite: the no-wait
//! policy's lock wait, the savepoint of a permanent failure, nested transactions in the
//! operation, and a waiting duplicate that executes after the first rolled back.

mod common;

use std::sync::Arc;

use common::{lock_waiter, pool_with, MySqlFactory};
use idem_conformance::{available, TxFactory};
use idem_mysql::conformance::writing;
use std::time::Duration;

use idem_core::{
    Barrier, Clock, Error, Failure, Key, ManualClock, Outcome, Response, RunError, Started, Store,
    SystemClock, TxPolicy,
};
use idem_mysql::{MySqlOperation, MySqlOptions, MySqlStore};
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::oneshot;

/// An operation that writes one business row, says so on `entered`, waits for `release`,
/// then ends with `end`.
fn held(
    factory: &MySqlFactory,
    key: &Key,
    entered: oneshot::Sender<()>,
    release: oneshot::Receiver<()>,
    end: Result<u64, Failure<String, String>>,
) -> MySqlOperation<u64, String, String> {
    writing(&factory.business(), key, [0], move || async move {
        let _ = entered.send(());
        let _ = release.await;
        end
    })
}

type TxResult = Result<Response<u64, String>, RunError<String>>;

/// Runs a holder that ends with `end` and a waiting duplicate queued on its row lock
/// while it runs; returns both answers.
async fn holder_and_duplicate(
    factory: &MySqlFactory,
    store: &MySqlStore,
    key: &Key,
    end: Result<u64, Failure<String, String>>,
) -> (TxResult, TxResult) {
    let barrier = Barrier::new(Arc::new(store.clone()));
    let (entered_tx, entered) = oneshot::channel();
    let (release, release_rx) = oneshot::channel();
    let op = held(factory, key, entered_tx, release_rx, end);
    let holder = tokio::spawn({
        let (barrier, k) = (barrier.clone(), key.clone());
        async move { barrier.transaction(&k, None, TxPolicy::Wait, op).await }
    });
    entered.await.unwrap();
    let duplicate = tokio::spawn({
        let (barrier, k) = (barrier.clone(), key.clone());
        let op = factory.operation(key, plan());
        async move { barrier.transaction(&k, None, TxPolicy::Wait, op).await }
    });
    lock_waiter(store).await;
    release.send(()).unwrap();
    (holder.await.unwrap(), duplicate.await.unwrap())
}

/// An operation that answers the session's `innodb_lock_wait_timeout` as it sees it.
fn lock_wait_seen() -> MySqlOperation<u64, String, String> {
    Box::new(|conn| {
        Box::pin(async move {
            sqlx::query_scalar("SELECT @@SESSION.innodb_lock_wait_timeout")
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| Failure::Retryable(e.to_string()))
        })
    })
}

async fn setup(
    factory: &MySqlFactory,
    setup_sql: &'static str,
) -> (MySqlStore, Barrier<MySqlStore>) {
    let pool = pool_with(setup_sql, 4).await;
    let store = factory
        .store_with(pool, MySqlOptions::default())
        .await
        .unwrap();
    let barrier = Barrier::new(Arc::new(store.clone()));
    (store, barrier)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_wait_answers_at_once_and_restores_the_session_lock_wait() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    // A session lock wait of 7 s: if NoWait did not lower it, the duplicate below would
    // wait 7 s and fail with a lock wait timeout (a Store error) instead of InProgress.
    let (store, barrier) = setup(&factory, "SET SESSION innodb_lock_wait_timeout = 7").await;
    let k = Key::new("tx", "held").unwrap();
    let (entered_tx, entered) = oneshot::channel();
    let (release, release_rx) = oneshot::channel();
    let holder = tokio::spawn({
        let (barrier, k) = (barrier.clone(), k.clone());
        let op = held(&factory, &k, entered_tx, release_rx, Ok(1));
        async move { barrier.transaction(&k, None, TxPolicy::Wait, op).await }
    });
    entered.await.unwrap();
    for _ in 0..3 {
        let busy = barrier
            .transaction(&k, None, TxPolicy::NoWait, factory.operation(&k, plan()))
            .await;
        assert!(
            matches!(busy, Err(RunError::Barrier(Error::InProgress { .. }))),
            "a no-wait duplicate of an open transaction answered {busy:?}"
        );
    }
    // The operation of a no-wait transaction runs with the session's own lock wait.
    let other = Key::new("tx", "other").unwrap();
    let seen = barrier
        .transaction(&other, None, TxPolicy::NoWait, lock_wait_seen())
        .await
        .unwrap();
    assert_eq!(seen.outcome, Outcome::Completed(7));

    release.send(()).unwrap();
    let first = holder.await.unwrap().unwrap();
    assert!(!first.replayed);
    let replay = barrier
        .transaction(&k, None, TxPolicy::NoWait, factory.operation(&k, plan()))
        .await
        .unwrap();
    assert!(replay.replayed && replay.outcome == Outcome::Completed(1));
    assert_eq!(factory.business_rows(&store, &k).await.unwrap(), 1);

    // Every pooled connection is outside a transaction with its lock wait restored.
    let mut conns = Vec::new();
    for _ in 0..store.pool().num_idle() {
        conns.push(store.pool().acquire().await.unwrap());
    }
    assert!(!conns.is_empty());
    for conn in &mut conns {
        let (lock_wait, in_tx): (u64, u64) =
            sqlx::query_as("SELECT @@SESSION.innodb_lock_wait_timeout, @@in_transaction")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
        assert_eq!((lock_wait, in_tx), (7, 0));
    }
}

fn plan() -> idem_conformance::TxPlan {
    idem_conformance::TxPlan {
        rows: 1,
        hold: std::time::Duration::ZERO,
        end: idem_conformance::TxEnd::Commit,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_permanent_failure_keeps_the_key_until_failed_is_recorded() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let k = Key::new("tx", "declined").unwrap();
    let (first, second) = holder_and_duplicate(
        &factory,
        &store,
        &k,
        Err(Failure::Permanent("declined".into())),
    )
    .await;
    let first = first.unwrap();
    assert_eq!(first.outcome, Outcome::Failed("declined".to_string()));
    assert!(!first.replayed);
    let second = second.unwrap();
    assert!(
        second.replayed && second.outcome == Outcome::Failed("declined".to_string()),
        "the duplicate must replay the failure, never execute: {second:?}"
    );
    assert_eq!(factory.business_rows(&store, &k).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_duplicate_executes_once_after_the_first_rolls_back() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let k = Key::new("tx", "rolled-back").unwrap();
    let (first, second) = holder_and_duplicate(
        &factory,
        &store,
        &k,
        Err(Failure::Retryable("timeout".into())),
    )
    .await;
    assert!(matches!(first, Err(RunError::Operation(e)) if e == "timeout"));
    let second = second.unwrap();
    assert!(!second.replayed && second.outcome == Outcome::Completed(1));
    assert_eq!(factory.business_rows(&store, &k).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nested_transactions_in_the_operation_are_savepoints() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let barrier = Barrier::new(Arc::new(store.clone()));
    let insert = format!(
        "INSERT INTO {} (scope, id, n) VALUES ('tx', 'nested', 1)",
        factory.business()
    );
    let k = Key::new("tx", "nested").unwrap();
    let nested =
        |end: Result<u64, Failure<String, String>>| -> MySqlOperation<u64, String, String> {
            let insert = insert.clone();
            Box::new(move |conn| {
                Box::pin(async move {
                    let fail = |e: sqlx::Error| Failure::Retryable(e.to_string());
                    // Committed inner transaction, then a rolled-back one.
                    let mut inner = conn.begin().await.map_err(fail)?;
                    sqlx::query(AssertSqlSafe(insert.clone()))
                        .execute(&mut *inner)
                        .await
                        .map_err(fail)?;
                    inner.commit().await.map_err(fail)?;
                    let mut inner = conn.begin().await.map_err(fail)?;
                    sqlx::query(AssertSqlSafe(insert))
                        .execute(&mut *inner)
                        .await
                        .map_err(fail)?;
                    inner.rollback().await.map_err(fail)?;
                    end
                })
            })
        };
    // A retryable end rolls back the outer transaction, inner "commits" included.
    let r = barrier
        .transaction(
            &k,
            None,
            TxPolicy::Wait,
            nested(Err(Failure::Retryable("x".into()))),
        )
        .await;
    assert!(matches!(r, Err(RunError::Operation(_))), "{r:?}");
    assert_eq!(factory.business_rows(&store, &k).await.unwrap(), 0);
    assert!(store.get(&k).await.unwrap().is_none());
    // A successful end commits what the inner transactions kept.
    let r = barrier
        .transaction(&k, None, TxPolicy::Wait, nested(Ok(1)))
        .await
        .unwrap();
    assert!(!r.replayed);
    assert_eq!(factory.business_rows(&store, &k).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purging_never_makes_a_fresh_key_look_busy() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    // Expired records only: a purge scans up to the end of the retention index.
    let table = store.options().table().to_string();
    for chunk in 0..10 {
        let values: Vec<String> = (0..500)
            .map(|i| {
                let n = chunk * 500 + i + 1;
                format!("('old', 'k{n}', NULL, 'completed', 1, NULL, 'x', 0, 0, {n})")
            })
            .collect();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "INSERT INTO {table} (scope, id, fingerprint, state, token, lease_until, response, \
             created_at, updated_at, expires_at) VALUES {}",
            values.join(", ")
        )))
        .execute(store.pool())
        .await
        .unwrap();
    }
    let purger = tokio::spawn({
        let store = store.clone();
        async move {
            let now = idem_core::Timestamp::from_millis(1_000_000);
            let mut purged = 0;
            while purged < 5000 {
                purged += store.purge(now, 50).await.unwrap();
            }
        }
    });
    let barrier = Barrier::new(Arc::new(store.clone()));
    let mut claims = Vec::new();
    for t in 0..4 {
        let (barrier, factory_business) = (barrier.clone(), factory.business());
        claims.push(tokio::spawn(async move {
            let mut busy = 0;
            for i in 0..60 {
                let k = Key::new("fresh", format!("t{t}-{i}")).unwrap();
                let op = writing(&factory_business, &k, [0], || async { Ok(1u64) });
                match barrier.transaction(&k, None, TxPolicy::NoWait, op).await {
                    Ok(r) => assert!(!r.replayed),
                    Err(RunError::Barrier(Error::InProgress { .. })) => busy += 1,
                    Err(e) => panic!("{k}: {e}"),
                }
            }
            busy
        }));
    }
    let mut busy = 0;
    for c in claims {
        busy += c.await.unwrap();
    }
    purger.await.unwrap();
    assert_eq!(busy, 0, "fresh keys answered InProgress while purge ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_transaction_locks_its_own_key_and_no_gap() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let barrier = Barrier::new(Arc::new(store.clone())).with_clock(clock.clone());
    // Two held keys: one fresh (an insert), one taken over from an expired lease-mode
    // claim (the claim statement's duplicate-key path locks the existing row).
    let expired = Key::new("gap", "m").unwrap();
    let Started::Acquired(_zombie) = barrier.begin(&expired, None).await.unwrap() else {
        panic!("fresh key not acquired");
    };
    clock.advance(barrier.lease() + Duration::from_secs(1));
    let mut releases = Vec::new();
    let mut holders = Vec::new();
    for held_key in [Key::new("gap", "g").unwrap(), expired] {
        let (entered_tx, entered) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        let op = held(&factory, &held_key, entered_tx, release_rx, Ok(1));
        let barrier = barrier.clone();
        holders.push(tokio::spawn(async move {
            barrier
                .transaction(&held_key, None, TxPolicy::Wait, op)
                .await
        }));
        entered.await.unwrap();
        releases.push(release);
    }
    // Keys on both sides of each held key in primary-key order are free.
    for id in ["a", "f", "fz", "g0", "h", "l", "lz", "m0", "n", "z"] {
        let k = Key::new("gap", id).unwrap();
        let r = barrier
            .transaction(&k, None, TxPolicy::NoWait, factory.operation(&k, plan()))
            .await;
        assert!(
            matches!(&r, Ok(r) if !r.replayed),
            "{k} next to a held key: {r:?}"
        );
    }
    for release in releases {
        release.send(()).unwrap();
    }
    for h in holders {
        assert!(!h.await.unwrap().unwrap().replayed);
    }
}
