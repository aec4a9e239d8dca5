//! Cancellation against the real server: thousands of dropped calls with concurrent
//! retries of the same keys, a runtime torn down while transactions are open, and
//! dropped lease-mode claims. Afterwards every business effect exists at most once, every
//! acknowledged result is the stored one, no claim is left that only a lease could free,
//! and the pool's connections are all outside a transaction and keep serving.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{url, MySqlFactory};
use idem_conformance::available;
use idem_core::{
    Barrier, Begin, Clock, Deadlines, Error, Key, Outcome, RunError, State, Store, SystemClock,
    TxPolicy,
};
use idem_mysql::conformance::writing;
use idem_mysql::{MySqlOperation, MySqlOptions, MySqlStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};
use sqlx::AssertSqlSafe;

/// The run's seed: `IDEM_CANCEL_SEED` or the clock, printed so that a failure can be
/// replayed.
fn seed() -> u64 {
    let seed = std::env::var("IDEM_CANCEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    eprintln!("IDEM_CANCEL_SEED={seed}");
    seed
}

/// Writes the worker's business row, pauses (an await point inside the transaction),
/// and answers the worker's number.
fn payment(
    business: &str,
    key: &Key,
    worker: u32,
    pause_us: u64,
) -> MySqlOperation<u32, String, String> {
    writing(business, key, [worker as i32], move || async move {
        tokio::time::sleep(Duration::from_micros(pause_us)).await;
        Ok(worker)
    })
}

/// How many attempts of each client are dropped right after their first poll.
const FIRST_POLL_DROPS: u64 = 5;

/// What the clients were told, per key.
type Acks = Arc<Mutex<HashMap<Key, Vec<u32>>>>;

/// Retries `key` until it gets a definitive answer, dropping attempts at random points;
/// returns how many attempts it dropped.
async fn client(
    barrier: Barrier<MySqlStore>,
    business: String,
    key: Key,
    worker: u32,
    acks: Acks,
    seed: u64,
) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut dropped = 0;
    for attempt in 0u64.. {
        let policy = if rng.random_bool(0.5) {
            TxPolicy::Wait
        } else {
            TxPolicy::NoWait
        };
        let op = payment(&business, &key, worker, rng.random_range(0..3_000));
        let call = barrier.transaction(&key, None, policy, op);
        // The first attempts are dropped after their first poll (an answer needs the
        // server, so they are always dropped), the next after a random budget that
        // doubles with each attempt; after them a client waits for its answer.
        let budget = match attempt {
            0..FIRST_POLL_DROPS => Duration::ZERO,
            FIRST_POLL_DROPS..=11 if rng.random_bool(0.3) => Duration::ZERO,
            FIRST_POLL_DROPS..=11 => Duration::from_micros(rng.random_range(0..=250 << attempt)),
            _ => Duration::MAX,
        };
        match tokio::time::timeout(budget, call).await {
            Err(_) => dropped += 1,
            Ok(Ok(response)) => {
                let Outcome::Completed(value) = response.outcome else {
                    panic!("{key}: unexpected outcome {response:?}");
                };
                acks.lock()
                    .unwrap()
                    .entry(key.clone())
                    .or_default()
                    .push(value);
                return dropped;
            }
            Ok(Err(RunError::Barrier(Error::InProgress { .. }))) => {
                tokio::time::sleep(Duration::from_millis(1)).await
            }
            Ok(Err(RunError::Barrier(e))) if e.is_retryable() => {}
            Ok(Err(e)) => panic!("{key}: attempt {attempt} failed: {e}"),
        }
    }
    unreachable!("the loop only ends by returning")
}

/// Every key's business row exists exactly once, its record is completed with the
/// value of that row, and every acknowledgement is that value.
async fn check_effects(factory: &MySqlFactory, store: &MySqlStore, keys: &[Key], acks: &Acks) {
    let acks = acks.lock().unwrap().clone();
    for k in keys {
        let rows: Vec<i32> = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT n FROM {} WHERE scope = ? AND id = ?",
            factory.business()
        )))
        .bind(k.scope().as_bytes())
        .bind(k.id().as_bytes())
        .fetch_all(store.pool())
        .await
        .unwrap();
        assert_eq!(rows.len(), 1, "{k}: business rows {rows:?}");
        let record = store.get(k).await.unwrap().expect("a completed record");
        let State::Completed { response } = &record.state else {
            panic!("{k}: {record:?}");
        };
        let stored: u32 = idem_core::backend::codec::decode(response).unwrap();
        assert_eq!(
            stored, rows[0] as u32,
            "{k}: stored outcome vs business row"
        );
        for ack in acks.get(k).into_iter().flatten() {
            assert_eq!(
                *ack, stored,
                "{k}: a client was told {ack}, the store holds {stored}"
            );
        }
    }
}

/// Waits until every connection of `pool` is idle, then checks each is outside a
/// transaction and answers.
async fn check_pool(pool: &MySqlPool) {
    for _ in 0..3000 {
        if pool.num_idle() == pool.size() as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut conns = Vec::new();
    for _ in 0..pool.size() {
        conns.push(pool.acquire().await.unwrap());
    }
    for conn in &mut conns {
        let in_tx: u64 = sqlx::query_scalar("SELECT @@in_transaction")
            .fetch_one(&mut **conn)
            .await
            .unwrap();
        assert_eq!(in_tx, 0, "a pooled connection is inside a transaction");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_transactions_with_concurrent_retries_execute_once() {
    const KEYS: usize = 60;
    const CLIENTS_PER_KEY: u32 = 4;
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let barrier = Barrier::new(Arc::new(store.clone()));
    let keys: Vec<Key> = (0..KEYS)
        .map(|i| Key::new("cancel", format!("payment-{i}")).unwrap())
        .collect();
    let acks: Acks = Arc::default();
    let seed = seed();
    let mut tasks = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        for worker in 0..CLIENTS_PER_KEY {
            tasks.push(tokio::spawn(client(
                barrier.clone(),
                factory.business(),
                k.clone(),
                worker,
                Arc::clone(&acks),
                seed ^ ((i as u64) << 8) ^ u64::from(worker),
            )));
        }
    }
    let started = std::time::Instant::now();
    let mut dropped = 0;
    for t in tasks {
        dropped += t.await.unwrap();
    }
    eprintln!("{dropped} calls dropped in {:?}", started.elapsed());
    let clients = KEYS * CLIENTS_PER_KEY as usize;
    assert!(
        dropped >= clients * FIRST_POLL_DROPS as usize,
        "{dropped} calls dropped"
    );
    check_effects(&factory, &store, &keys, &acks).await;
    check_pool(store.pool()).await;
}

#[test]
fn a_runtime_torn_down_mid_transaction_leaves_nothing_half_done() {
    const KEYS: usize = 24;
    const ROUNDS: u64 = 6;
    let factory = common::factory();
    let main = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let Some((store, table)) = main.block_on(async {
        if !available(&factory).await {
            return None;
        }
        let store = factory.store().await.unwrap();
        let table = store.options().table().to_string();
        Some((store, table))
    }) else {
        return;
    };
    let keys: Vec<Key> = (0..KEYS)
        .map(|i| Key::new("teardown", format!("payment-{i}")).unwrap())
        .collect();
    let seed = seed();
    let threads: Arc<Mutex<Vec<u64>>> = Arc::default();
    let acks: Acks = Arc::default();
    for round in 0..ROUNDS {
        // A runtime of its own with a pool of its own: dropping the runtime drops every
        // task wherever it is (opening, claiming, in the operation, committing).
        let doomed = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (keys, threads, acks, business, table) = (
            keys.clone(),
            Arc::clone(&threads),
            Arc::clone(&acks),
            factory.business(),
            table.clone(),
        );
        doomed.block_on(async move {
            let pool = MySqlPoolOptions::new()
                .max_connections(6)
                .after_connect(move |conn, _| {
                    let threads = Arc::clone(&threads);
                    Box::pin(async move {
                        let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                            .fetch_one(conn)
                            .await?;
                        threads.lock().unwrap().push(id);
                        Ok(())
                    })
                })
                .connect(&url())
                .await
                .unwrap();
            let store =
                MySqlStore::from_pool(pool, MySqlOptions::default().with_table(&table).unwrap());
            let barrier = Barrier::new(Arc::new(store));
            let mut rng = StdRng::seed_from_u64(seed ^ round);
            for (i, k) in keys.iter().enumerate() {
                let (barrier, k, acks) = (barrier.clone(), k.clone(), Arc::clone(&acks));
                let policy = if rng.random_bool(0.5) {
                    TxPolicy::Wait
                } else {
                    TxPolicy::NoWait
                };
                let op = payment(&business, &k, 100 + i as u32, rng.random_range(0..20_000));
                tokio::spawn(async move {
                    if let Ok(r) = barrier.transaction(&k, None, policy, op).await {
                        if let Outcome::Completed(v) = r.outcome {
                            acks.lock().unwrap().entry(k).or_default().push(v);
                        }
                    }
                });
            }
            // One transaction is surely inside its operation when the runtime goes.
            let held = Key::new("teardown", format!("held-{round}")).unwrap();
            let (entered_tx, entered) = tokio::sync::oneshot::channel::<()>();
            let op = writing(&business, &held, [0], move || async move {
                let _ = entered_tx.send(());
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(0)
            });
            tokio::spawn(async move { barrier.transaction(&held, None, TxPolicy::Wait, op).await });
            entered.await.unwrap();
            tokio::time::sleep(Duration::from_micros(rng.random_range(0..30_000))).await;
        });
        drop(doomed);
    }
    main.block_on(async {
        // The server rolls back each closed session; wait until all of them are gone.
        let ids = threads.lock().unwrap().clone();
        assert!(!ids.is_empty());
        let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let mut gone = false;
        for _ in 0..6000 {
            let alive: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN ({list})"
            )))
            .fetch_one(store.pool())
            .await
            .unwrap();
            if alive == 0 {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(gone, "sessions of the dropped runtimes are still open");
        // Everything committed is whole; everything else is gone. Finish every key.
        let barrier = Barrier::new(Arc::new(store.clone()));
        for (i, k) in keys.iter().enumerate() {
            let op = payment(&factory.business(), k, 100 + i as u32, 0);
            let r = barrier
                .transaction(k, None, TxPolicy::Wait, op)
                .await
                .unwrap();
            if let Outcome::Completed(v) = r.outcome {
                acks.lock().unwrap().entry(k.clone()).or_default().push(v);
            }
        }
        check_effects(&factory, &store, &keys, &acks).await;
        // The transactions held open at each teardown left nothing behind.
        for round in 0..ROUNDS {
            let held = Key::new("teardown", format!("held-{round}")).unwrap();
            assert!(store.get(&held).await.unwrap().is_none(), "{held}");
            let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                "SELECT COUNT(*) FROM {} WHERE scope = 'teardown' AND id = ?",
                factory.business()
            )))
            .bind(held.id().as_bytes())
            .fetch_one(store.pool())
            .await
            .unwrap();
            assert_eq!(rows, 0, "{held}");
        }
        check_pool(store.pool()).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_claim_is_released_at_once() {
    const CALLS: usize = 1500;
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = factory.store().await.unwrap();
    let mut rng = StdRng::seed_from_u64(seed());
    let now = SystemClock.now();
    let deadlines = Deadlines {
        lease_until: now.plus(Duration::from_secs(3600)),
        expires_at: now.plus(Duration::from_secs(7200)),
    };
    let dropped = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..CALLS {
        let (store, dropped) = (store.clone(), Arc::clone(&dropped));
        let budget = if rng.random_bool(0.5) {
            Duration::ZERO
        } else {
            Duration::from_micros(rng.random_range(0..20_000))
        };
        tasks.push(tokio::spawn(async move {
            let k = Key::new("claims", format!("k{i}")).unwrap();
            match tokio::time::timeout(budget, store.begin(&k, None, deadlines, now)).await {
                Err(_) => {
                    dropped.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Ok(Begin::Acquired(lease))) => store
                    .complete(&lease, b"done", deadlines.expires_at, now)
                    .await
                    .unwrap(),
                Ok(other) => panic!("{k}: {other:?}"),
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let dropped = dropped.load(Ordering::SeqCst);
    assert!(dropped >= CALLS / 3, "only {dropped} claims were dropped");
    // Releases of dropped callers run on their own tasks: wait until none is held.
    let live = format!(
        "SELECT COUNT(*) FROM {} WHERE state = 'in_progress' AND lease_until > {}",
        store.options().table(),
        i64::MIN
    );
    let mut held = i64::MAX;
    for _ in 0..6000 {
        held = sqlx::query_scalar(AssertSqlSafe(live.clone()))
            .fetch_one(store.pool())
            .await
            .unwrap();
        if held == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(held, 0, "claims of dropped callers are still held");
    // Every call claimed its key once; exactly the dropped ones were released.
    let stats = store.stats().await.unwrap();
    assert_eq!(
        (stats.completed as usize, stats.in_progress as usize),
        (CALLS - dropped, dropped),
        "{stats:?}"
    );
    // Released keys are free: the next begin acquires.
    for i in 0..CALLS {
        let k = Key::new("claims", format!("k{i}")).unwrap();
        if let Some(idem_core::Record {
            state: State::InProgress { .. },
            ..
        }) = store.get(&k).await.unwrap()
        {
            assert!(matches!(
                store.begin(&k, None, deadlines, now).await.unwrap(),
                Begin::Acquired(_)
            ));
            break;
        }
    }
    check_pool(store.pool()).await;
}
