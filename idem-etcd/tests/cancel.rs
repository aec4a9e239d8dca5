//! Cancellation: barrier calls dropped at random points (a `tokio::time::timeout` of a
//! random few milliseconds around most calls), with several clients retrying each key at
//! once, against the real cluster. Afterwards:
//!
//! - every key's operation took effect at most once;
//! - every response a client received is the key's stored outcome;
//! - a key without an outcome is held only by a claim that an operation received (its caller
//!   was cancelled while it ran: the documented case, freed when the lease runs out) — never
//!   by a claim whose `begin` was cancelled before it answered (the store undoes those);
//! - the store still answers at once.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem_conformance::{available, StoreFactory};
use idem_core::{Barrier, Error, Failure, Key, Outcome, RunError, State, Store};
use idem_etcd::EtcdStore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Rounds of fresh keys run until [`CANCELLATIONS`] calls were cancelled (how many a round
/// gives depends on the machine's speed), at most this many.
const MAX_ROUNDS: usize = 40;
const CANCELLATIONS: u64 = 1_000;
const KEYS: usize = 60;
const CLIENTS_PER_KEY: usize = 3;
const ATTEMPTS: usize = 40;

#[derive(Default)]
struct Ledger {
    /// Tokens whose operation started, per key.
    started: HashMap<Key, HashSet<u64>>,
    /// Effects per key.
    effects: HashMap<Key, u32>,
    /// Responses clients received, per key.
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

async fn client(
    barrier: Barrier<EtcdStore>,
    key: Key,
    ledger: Arc<Mutex<Ledger>>,
    cancelled: Arc<AtomicU64>,
    seed: u64,
) -> Result<(), String> {
    let mut next = rng(seed);
    for _ in 0..ATTEMPTS {
        // Mostly a few milliseconds (cancelled somewhere inside), now and then long enough
        // to finish even on a loaded machine.
        let budget = Duration::from_millis(match next(3) {
            0 => 3000,
            _ => 1 + next(200),
        });
        let hold = Duration::from_millis(next(8));
        let (k, l) = (key.clone(), Arc::clone(&ledger));
        let call = barrier.execute(&key, None, move |lease| async move {
            let token = lease.lease().token.0;
            lock(&l).started.entry(k.clone()).or_default().insert(token);
            tokio::time::sleep(hold).await;
            *lock(&l).effects.entry(k).or_default() += 1;
            Ok::<u64, Failure<String, String>>(token)
        });
        match tokio::time::timeout(budget, call).await {
            Err(_) => {
                cancelled.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(response)) => {
                let Outcome::Completed(token) = response.outcome else {
                    return Err(format!("{key}: unexpected outcome {:?}", response.outcome));
                };
                lock(&ledger).answers.entry(key).or_default().push(token);
                return Ok(());
            }
            Ok(Err(RunError::Barrier(e))) if e.is_retryable() => {}
            Ok(Err(e)) => return Err(format!("{key}: {e:?}")),
        }
        tokio::time::sleep(Duration::from_millis(next(5))).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_cancellation_never_runs_a_key_twice_nor_strands_an_unreceived_claim() {
    let factory = common::factory();
    if !available(&factory).await {
        return;
    }
    let store = Arc::new(factory.create().await.expect("store"));
    let barrier = Barrier::new(Arc::clone(&store)).with_lease(Duration::from_secs(60));
    let mut keys: Vec<Key> = Vec::new();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let cancelled = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut rounds = 0;
    while rounds < MAX_ROUNDS && cancelled.load(Ordering::Relaxed) < CANCELLATIONS {
        let round = rounds;
        rounds += 1;
        let batch: Vec<Key> = (round * KEYS..(round + 1) * KEYS)
            .map(|i| Key::new("cancel", format!("k{i}")).expect("key"))
            .collect();
        keys.extend(batch.iter().cloned());
        let mut clients = Vec::new();
        for (i, key) in batch.iter().enumerate() {
            for c in 0..CLIENTS_PER_KEY {
                clients.push(tokio::spawn(client(
                    barrier.clone(),
                    key.clone(),
                    Arc::clone(&ledger),
                    Arc::clone(&cancelled),
                    0xca9c_e100 ^ ((round as u64) << 24) ^ ((i as u64) << 8) ^ c as u64,
                )));
            }
        }
        for c in clients {
            c.await.expect("client task").expect("client");
        }
    }
    let ran_for = started.elapsed();
    let ledger = std::mem::take(&mut *lock(&ledger));

    // Undoing abandoned claims happens in the background: give it a moment to finish.
    let mut verdict = Err(String::from("not checked"));
    for _ in 0..50 {
        verdict = check(&store, &keys, &ledger).await;
        if verdict.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let summary = verdict.unwrap_or_else(|why| panic!("{why}"));

    // The store still answers at once after thousands of dropped calls.
    let probe = Key::new("cancel", "probe").expect("key");
    let answered = tokio::time::timeout(
        Duration::from_secs(10),
        barrier.execute(&probe, None, |_| async {
            Ok::<u32, Failure<String, String>>(1)
        }),
    )
    .await;
    assert!(
        matches!(answered, Ok(Ok(_))),
        "the store stopped answering: {answered:?}"
    );
    let n = cancelled.load(Ordering::Relaxed);
    println!(
        "{n} cancellations over {rounds} rounds of {KEYS} keys × {CLIENTS_PER_KEY} clients in \
         {ran_for:.2?}: {summary}"
    );
    assert!(
        n >= CANCELLATIONS,
        "only {n} calls were cancelled; the test did not exercise cancellation"
    );
}

/// The checks of the module docs; `Ok` summarizes the keys' end states.
async fn check(store: &EtcdStore, keys: &[Key], ledger: &Ledger) -> Result<String, String> {
    let (mut completed, mut held_by_started, mut free) = (0, 0, 0);
    for key in keys {
        let effects = ledger.effects.get(key).copied().unwrap_or(0);
        if effects > 1 {
            return Err(format!("{key} took effect {effects} times"));
        }
        let record = store.get(key).await.map_err(|e: Error| e.to_string())?;
        let answers = ledger.answers.get(key).cloned().unwrap_or_default();
        match record.as_ref().map(|r| &r.state) {
            Some(State::Completed { response }) => {
                let stored: u64 =
                    idem_core::backend::codec::decode(response).map_err(|e| e.to_string())?;
                if let Some(bad) = answers.iter().find(|&&a| a != stored) {
                    return Err(format!("{key}: a client got {bad}, the store has {stored}"));
                }
                completed += 1;
            }
            Some(State::InProgress { token, lease_until }) => {
                if !answers.is_empty() {
                    return Err(format!("{key}: answered {answers:?} but has no outcome"));
                }
                let received = ledger
                    .started
                    .get(key)
                    .is_some_and(|s| s.contains(&token.0));
                if *lease_until == idem_core::Timestamp::MIN {
                    free += 1;
                } else if received {
                    held_by_started += 1;
                } else {
                    return Err(format!(
                        "{key}: claim {} is live but no operation received it (a stranded claim)",
                        token.0
                    ));
                }
            }
            Some(State::Failed { .. }) => return Err(format!("{key} failed")),
            None => {
                if !answers.is_empty() || effects > 0 {
                    return Err(format!("{key}: answered or took effect, but has no record"));
                }
                free += 1;
            }
        }
    }
    Ok(format!(
        "{completed} completed, {held_by_started} held by a cancelled operation (lease), \
         {free} free, 0 duplicate effects, 0 stranded claims"
    ))
}
