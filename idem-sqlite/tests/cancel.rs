//! Cancellation: barrier calls dropped at random points — after a random number of polls, or
//! by a `tokio::time::timeout` of a random millisecond or two — with several clients retrying
//! each key at once, in both modes, against a real database file. Afterwards:
//!
//! - every key's operation ran at most once (transactional mode: no run of a key ever
//!   followed another, and its business row exists at most once; lease mode: its effect
//!   happened at most once);
//! - every response a client received is the key's stored outcome, and (transactional mode)
//!   its business row exists;
//! - no key is claimed by a claim nobody received: transactional mode never leaves a claim
//!   at all; in lease mode a key without an outcome is free, or held by a claim whose
//!   operation started (its caller was dropped while it ran: the documented case);
//! - no pooled connection is left inside a transaction, and the store still answers.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use idem_core::{
    Barrier, Failure, Key, Outcome, Response, RunError, State, Store, Timestamp, TxPolicy,
};
use idem_sqlite::rusqlite::Connection;
use idem_sqlite::{SqliteOperation, SqliteOptions, SqliteStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const ROUNDS: usize = 8;
const KEYS: usize = 40;
const CLIENTS_PER_KEY: usize = 3;
/// Calls per client; a client goes on after its first answer (a retry then replays).
const ATTEMPTS: usize = 12;

/// What the clients saw and did, per key.
#[derive(Default)]
struct Ledger {
    /// Runs of the operation (transactional: run ids; lease: tokens).
    runs: HashMap<Key, Vec<u64>>,
    /// Lease mode: effects that happened.
    effects: HashMap<Key, u32>,
    /// Responses clients received.
    answers: HashMap<Key, Vec<u64>>,
}

fn lock(l: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// Cancellation points from `seed`: they only need to vary, and repeat with the seed.
fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    move |n| rng.random_range(0..n)
}

/// Polls `fut` at most `polls` times: `None` if it was still pending (it is then dropped).
async fn within_polls<F: Future>(polls: u64, fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    let mut left = polls;
    std::future::poll_fn(move |cx| match fut.as_mut().poll(cx) {
        Poll::Ready(out) => Poll::Ready(Some(out)),
        Poll::Pending if left <= 1 => Poll::Ready(None),
        Poll::Pending => {
            left -= 1;
            Poll::Pending
        }
    })
    .await
}

/// Runs `call` under a random cancellation: mostly cut short, now and then left to finish.
async fn cancellable<F: Future>(next: &mut impl FnMut(u64) -> u64, call: F) -> Option<F::Output> {
    match next(8) {
        0 => tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .ok(),
        1 => tokio::time::timeout(Duration::from_millis(next(3)), call)
            .await
            .ok(),
        _ => within_polls(1 + next(5), call).await,
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    store: SqliteStore,
    path: std::path::PathBuf,
    keys: Vec<Key>,
    ledger: Arc<Mutex<Ledger>>,
    cancelled: Arc<AtomicU64>,
}

async fn setup(scope: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cancel.db");
    // A small pool, so that a connection handed back inside a transaction would be met again
    // soon.
    let options = SqliteOptions::default().with_max_connections(2);
    let store = SqliteStore::connect_with(&path, options).await.unwrap();
    store
        .with_connection(|c| {
            c.execute_batch("CREATE TABLE ledger (scope TEXT, id TEXT, run INTEGER NOT NULL)")
        })
        .await
        .unwrap();
    Setup {
        _dir: dir,
        store,
        path,
        keys: (0..ROUNDS * KEYS)
            .map(|i| Key::new(scope, format!("k{i}")).unwrap())
            .collect(),
        ledger: Arc::default(),
        cancelled: Arc::default(),
    }
}

/// Runs `client` for every key, `CLIENTS_PER_KEY` at once, round by round.
async fn storm<C, Fut>(setup: &Setup, client: C)
where
    C: Fn(Key, u64) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    for (round, batch) in setup.keys.chunks(KEYS).enumerate() {
        let mut clients = Vec::new();
        for (i, key) in batch.iter().enumerate() {
            for c in 0..CLIENTS_PER_KEY {
                let seed = 0x5e1f_ca9c ^ ((round as u64) << 24) ^ ((i as u64) << 8) ^ c as u64;
                clients.push(tokio::spawn(client(key.clone(), seed)));
            }
        }
        for c in clients {
            c.await.expect("client task").expect("client");
        }
    }
}

/// No pooled connection holds a transaction: another connection gets the write lock (it
/// waits for work still running on the blocking pool, which ends by itself), and the store
/// still answers a fresh key in both modes.
async fn assert_still_serves(setup: &Setup) {
    let path = setup.path.clone();
    tokio::task::spawn_blocking(move || {
        let conn = Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(30)).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK").unwrap();
    })
    .await
    .unwrap();
    let barrier = Barrier::new(Arc::new(setup.store.clone()));
    let probe = Key::new("cancel", "probe").unwrap();
    let op: SqliteOperation<u64, String, String> = Box::new(|_| Ok(7));
    let r = barrier
        .transaction(&probe, None, TxPolicy::NoWait, op)
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Completed(7));
    let lease_probe = Key::new("cancel", "lease-probe").unwrap();
    let r = barrier
        .execute(&lease_probe, None, |_| async {
            Ok::<u64, Failure<String, String>>(8)
        })
        .await
        .unwrap();
    assert_eq!(r.outcome, Outcome::Completed(8));
}

fn stored_value(record: Option<&idem_core::Record>) -> Option<u64> {
    match record.map(|r| &r.state) {
        Some(State::Completed { response }) => {
            Some(idem_core::backend::codec::decode(response).expect("stored outcome decodes"))
        }
        _ => None,
    }
}

fn report(setup: &Setup, mode: &str, summary: &str) {
    let n = setup.cancelled.load(Ordering::Relaxed);
    println!(
        "{mode}: {n} cancellations over {ROUNDS} rounds of {KEYS} keys × {CLIENTS_PER_KEY} \
         clients: {summary}"
    );
    assert!(
        n >= 1000,
        "only {n} calls were cancelled; the test did not exercise cancellation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactional_mode_under_random_cancellation() {
    let setup = setup("tx").await;
    let barrier = Barrier::new(Arc::new(setup.store.clone()));
    let run_ids = Arc::new(AtomicU64::new(1));
    storm(&setup, |key, seed| {
        let (barrier, ledger, cancelled, run_ids) = (
            barrier.clone(),
            Arc::clone(&setup.ledger),
            Arc::clone(&setup.cancelled),
            Arc::clone(&run_ids),
        );
        async move {
            let mut next = rng(seed);
            for _ in 0..ATTEMPTS {
                let hold = Duration::from_micros(next(1500));
                let policy = if next(2) == 0 {
                    TxPolicy::Wait
                } else {
                    TxPolicy::NoWait
                };
                let (k, l, ids) = (key.clone(), Arc::clone(&ledger), Arc::clone(&run_ids));
                let op: SqliteOperation<u64, String, String> = Box::new(move |tx| {
                    let run = ids.fetch_add(1, Ordering::Relaxed);
                    lock(&l).runs.entry(k.clone()).or_default().push(run);
                    tx.execute(
                        "INSERT INTO ledger (scope, id, run) VALUES (?1, ?2, ?3)",
                        (k.scope(), k.id(), run as i64),
                    )
                    .map_err(|e| Failure::Retryable(e.to_string()))?;
                    std::thread::sleep(hold);
                    Ok(run)
                });
                match cancellable(&mut next, barrier.transaction(&key, None, policy, op)).await {
                    None => {
                        cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(Response {
                        outcome: Outcome::Completed(run),
                        ..
                    })) => {
                        lock(&ledger)
                            .answers
                            .entry(key.clone())
                            .or_default()
                            .push(run);
                    }
                    Some(Err(RunError::Barrier(e))) if e.is_retryable() => {}
                    Some(other) => return Err(format!("{key}: {other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(next(3))).await;
            }
            Ok(())
        }
    })
    .await;
    assert_still_serves(&setup).await;

    let ledger = std::mem::take(&mut *lock(&setup.ledger));
    let (mut completed, mut free) = (0, 0);
    for key in &setup.keys {
        let runs = ledger.runs.get(key).cloned().unwrap_or_default();
        if runs.len() > 1 {
            panic!("{key} ran {} times: {runs:?}", runs.len());
        }
        let (scope, id) = (key.scope().to_string(), key.id().to_string());
        let rows: Vec<i64> = setup
            .store
            .with_connection(move |c| {
                let mut stmt = c.prepare("SELECT run FROM ledger WHERE scope = ?1 AND id = ?2")?;
                let rows = stmt.query_map((scope, id), |r| r.get(0))?;
                rows.collect()
            })
            .await
            .unwrap();
        let record = setup.store.get(key).await.unwrap();
        let answers = ledger.answers.get(key).cloned().unwrap_or_default();
        match stored_value(record.as_ref()) {
            Some(stored) => {
                assert_eq!(rows, vec![stored as i64], "{key}: business rows");
                assert!(
                    answers.iter().all(|&a| a == stored),
                    "{key}: clients got {answers:?}, the store has {stored}"
                );
                completed += 1;
            }
            None => {
                assert_eq!(
                    record, None,
                    "{key}: transactional mode left a claim behind"
                );
                assert!(rows.is_empty(), "{key}: business rows without an outcome");
                assert!(
                    answers.is_empty(),
                    "{key}: answered {answers:?} without an outcome"
                );
                free += 1;
            }
        }
    }
    report(
        &setup,
        "transactional",
        &format!("{completed} completed, {free} never ran; every key ran at most once"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_mode_under_random_cancellation() {
    let setup = setup("lease").await;
    let barrier = Barrier::new(Arc::new(setup.store.clone())).with_lease(Duration::from_secs(600));
    storm(&setup, |key, seed| {
        let (barrier, ledger, cancelled) = (
            barrier.clone(),
            Arc::clone(&setup.ledger),
            Arc::clone(&setup.cancelled),
        );
        async move {
            let mut next = rng(seed);
            for _ in 0..ATTEMPTS {
                let hold = Duration::from_micros(next(1500));
                let (k, l) = (key.clone(), Arc::clone(&ledger));
                let call = barrier.execute(&key, None, move |lease| async move {
                    let token = lease.lease().token.0;
                    lock(&l).runs.entry(k.clone()).or_default().push(token);
                    tokio::time::sleep(hold).await;
                    // The effect and the result, with no await point between them.
                    *lock(&l).effects.entry(k).or_default() += 1;
                    Ok::<u64, Failure<String, String>>(token)
                });
                match cancellable(&mut next, call).await {
                    None => {
                        cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(Response {
                        outcome: Outcome::Completed(token),
                        ..
                    })) => {
                        lock(&ledger)
                            .answers
                            .entry(key.clone())
                            .or_default()
                            .push(token);
                    }
                    Some(Err(RunError::Barrier(e))) if e.is_retryable() => {}
                    Some(other) => return Err(format!("{key}: {other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(next(3))).await;
            }
            Ok(())
        }
    })
    .await;
    assert_still_serves(&setup).await;

    let ledger = std::mem::take(&mut *lock(&setup.ledger));
    let (mut completed, mut held, mut free) = (0, 0, 0);
    for key in &setup.keys {
        let effects = ledger.effects.get(key).copied().unwrap_or(0);
        assert!(effects <= 1, "{key} took effect {effects} times");
        let record = setup.store.get(key).await.unwrap();
        let answers = ledger.answers.get(key).cloned().unwrap_or_default();
        if let Some(stored) = stored_value(record.as_ref()) {
            assert!(
                answers.iter().all(|&a| a == stored),
                "{key}: clients got {answers:?}, the store has {stored}"
            );
            completed += 1;
            continue;
        }
        assert!(
            answers.is_empty(),
            "{key}: answered {answers:?} without an outcome"
        );
        match record.map(|r| r.state) {
            None => free += 1,
            Some(State::InProgress { lease_until, .. }) if lease_until == Timestamp::MIN => {
                free += 1
            }
            Some(State::InProgress { token, .. }) => {
                let received: HashSet<u64> = ledger
                    .runs
                    .get(key)
                    .map(|r| r.iter().copied().collect())
                    .unwrap_or_default();
                assert!(
                    received.contains(&token.0),
                    "{key}: claim {} is live but no operation received it (a stranded claim)",
                    token.0
                );
                held += 1;
            }
            Some(other) => panic!("{key}: unexpected state {other:?}"),
        }
    }
    report(
        &setup,
        "lease",
        &format!(
            "{completed} completed, {held} held by an operation whose caller was dropped, \
             {free} free; no key took effect twice, no stranded claim"
        ),
    );
}
