//! Cancellation: thousands of `Barrier::execute` calls dropped at random points (a
//! `tokio::time::timeout` around each), with concurrent retries of the same keys, against
//! the real server. Afterwards every key's operation has run at most once, every
//! acknowledged result is the stored one, and no key is left claimed unless a call on it was
//! dropped while its operation ran: what a cancelled call started is otherwise finished or
//! given back by the store and the barrier, never left to the lease. (A dropped operation
//! may have had an effect that still lands, so its key is held until the lease ends.)

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Shared;
use idem_core::backend::codec;
use idem_core::{Barrier, Error, Failure, Key, Outcome, RunError, State, Store, Timestamp};
use rand::Rng;

/// Each task draws its keys from a window of `WINDOW` keys that moves on by `STEP` every
/// `STEP * 2` calls: the tasks keep meeting on the same keys, and fresh keys keep coming
/// (a run on a fixed set of keys would soon only replay, and stop producing cancellations).
const WINDOW: usize = 30;
const STEP: usize = 10;
const KEYS: usize = MAX_CALLS_PER_TASK / (STEP * 2) * STEP + WINDOW;
const TASKS: usize = 12;
const MAX_CALLS_PER_TASK: usize = 8_000;
/// Calls stop once this many were cancelled.
const CANCELLATIONS: u64 = 2_000;

#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    cancelled: AtomicU64,
    cancelled_in_op: AtomicU64,
    executed: AtomicU64,
    replayed: AtomicU64,
    in_progress: AtomicU64,
    store_errors: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_cancellations_never_run_a_key_twice_or_strand_it() {
    let Some(shared) = Shared::open("cancel").await else {
        return;
    };
    let store = shared.store(shared.options("")).await;
    // A lease far longer than the test: no key may be freed by its lease running out.
    let barrier = Barrier::new(Arc::new(store)).with_lease(Duration::from_secs(600));
    let keys: Arc<Vec<Key>> = Arc::new(
        (0..KEYS)
            .map(|i| Key::new("cancel", format!("k{i}")).unwrap())
            .collect(),
    );
    // Per key: the values whose operation returned (the effect), and the values callers
    // were acknowledged.
    let effects: Arc<Mutex<HashMap<usize, Vec<u64>>>> = Arc::default();
    let acknowledged: Arc<Mutex<HashMap<usize, Vec<u64>>>> = Arc::default();
    // Keys on which a call was dropped while its operation ran.
    let interrupted: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let tally = Arc::new(Tally::default());
    let started = Instant::now();

    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (barrier, keys, effects, acknowledged, interrupted, tally) = (
            barrier.clone(),
            Arc::clone(&keys),
            Arc::clone(&effects),
            Arc::clone(&acknowledged),
            Arc::clone(&interrupted),
            Arc::clone(&tally),
        );
        tasks.push(tokio::spawn(async move {
            // Until enough calls were cancelled (how many a given number of calls gives
            // depends on the machine's speed), within a bound on the calls.
            for c in 0..MAX_CALLS_PER_TASK {
                if tally.cancelled.load(Ordering::Relaxed) >= CANCELLATIONS {
                    break;
                }
                let (k, patience, work) = {
                    let mut rng = rand::rng();
                    (
                        c / (STEP * 2) * STEP + rng.random_range(0..WINDOW),
                        Duration::from_micros(rng.random_range(0..2500)),
                        Duration::from_micros(rng.random_range(0..1500)),
                    )
                };
                let value = (t * MAX_CALLS_PER_TASK + c) as u64;
                let in_op = Arc::new(AtomicU64::new(0));
                let effects = Arc::clone(&effects);
                let in_op2 = Arc::clone(&in_op);
                let call = barrier.execute(&keys[k], None, move |_lease| async move {
                    in_op2.store(1, Ordering::SeqCst);
                    tokio::time::sleep(work).await;
                    // The effect happens as the operation returns: no await after it.
                    effects.lock().unwrap().entry(k).or_default().push(value);
                    Ok::<u64, Failure<String, String>>(value)
                });
                tally.calls.fetch_add(1, Ordering::Relaxed);
                match tokio::time::timeout(patience, call).await {
                    Err(_) => {
                        tally.cancelled.fetch_add(1, Ordering::Relaxed);
                        if in_op.load(Ordering::SeqCst) == 1 {
                            tally.cancelled_in_op.fetch_add(1, Ordering::Relaxed);
                            interrupted.lock().unwrap().insert(k);
                        }
                    }
                    Ok(Ok(response)) => {
                        let Outcome::Completed(v) = response.outcome else {
                            panic!("only completions are stored here")
                        };
                        let counter = if response.replayed {
                            &tally.replayed
                        } else {
                            &tally.executed
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        acknowledged.lock().unwrap().entry(k).or_default().push(v);
                    }
                    Ok(Err(RunError::Barrier(Error::InProgress { .. }))) => {
                        tally.in_progress.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(RunError::Barrier(e))) if e.is_retryable() => {
                        tally.store_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => panic!("unexpected answer: {e}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    // Let the spawned finishing writes and give-backs land.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let effects = effects.lock().unwrap().clone();
    let acknowledged = acknowledged.lock().unwrap().clone();
    let interrupted = interrupted.lock().unwrap().clone();
    let (mut stranded, mut held) = (Vec::new(), 0);
    for (k, key) in keys.iter().enumerate() {
        let ran = effects.get(&k).cloned().unwrap_or_default();
        assert!(ran.len() <= 1, "{key} ran {} times: {ran:?}", ran.len());
        let record = barrier.store().get(key).await.unwrap();
        if let Some(&v) = ran.first() {
            // An operation that returned has its outcome stored, whether or not its caller
            // waited for it, and every caller was acknowledged that value.
            let want = codec::encode(&v).unwrap();
            assert!(
                matches!(&record, Some(r) if r.state == State::Completed { response: want.clone() }),
                "{key}: ran with {v} but the record is {record:?}"
            );
            for a in acknowledged.get(&k).into_iter().flatten() {
                assert_eq!(*a, v, "{key}: acknowledged {a}, ran {v}");
            }
        } else {
            assert!(
                !acknowledged.contains_key(&k),
                "{key}: acknowledged, never ran"
            );
            if let Some(State::InProgress { lease_until, .. }) = record.map(|r| r.state) {
                if lease_until == Timestamp::MIN {
                    // Released.
                } else if interrupted.contains(&k) {
                    held += 1;
                } else {
                    stranded.push(key.to_string());
                }
            }
        }
    }
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "cancel: {} calls in {elapsed:.2?}: {} cancelled ({} while the operation ran), {} executed, \
         {} replayed, {} in progress, {} retryable store errors; {} of {KEYS} keys ran once, \
         {held} held by the lease of an interrupted operation, {} claims stranded",
        n(&tally.calls),
        n(&tally.cancelled),
        n(&tally.cancelled_in_op),
        n(&tally.executed),
        n(&tally.replayed),
        n(&tally.in_progress),
        n(&tally.store_errors),
        effects.len(),
        stranded.len(),
    );
    assert!(
        stranded.is_empty(),
        "claims only a lease could free: {stranded:?}"
    );
    assert!(
        n(&tally.cancelled) >= CANCELLATIONS,
        "too few cancellations to mean anything: {}",
        n(&tally.cancelled)
    );
    shared.cleanup().await;
}
