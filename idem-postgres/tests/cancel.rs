//! Thousands of barrier calls dropped at random points (`tokio::time::timeout` with tiny
//! random durations, and `select!`), with concurrent retries of the same keys, against the
//! real server; then: every business effect at most once, every acknowledged result in the
//! business table, no key stranded beyond what the crate docs promise, and a clean pool.

mod common;
mod support;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use idem_conformance::available;
use idem_core::{Barrier, Error, Failure, Key, Outcome, Response, RunError, TxPolicy};
use idem_postgres::{PgOperation, PgOptions, PgStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

const WORKERS: u64 = 16;
const ATTEMPTS_PER_WORKER: u64 = 160;
const KEYS: usize = 300;
/// Long enough that no lease expires during the test: a second execution could then only
/// come from a bug, never from a reclaim.
const LEASE: Duration = Duration::from_secs(600);

type Answer = Result<Response<u64, String>, RunError<String>>;

/// What the workers saw, per key index.
#[derive(Default)]
struct Seen {
    /// Acknowledged outcomes: `true` completed, `false` failed.
    acknowledged: HashMap<usize, bool>,
    cancelled: u64,
    answered: u64,
}

/// Counts of lease-mode operations that started and that returned, per key index.
#[derive(Default)]
struct Runs {
    entered: Mutex<HashMap<usize, u64>>,
    returned: Mutex<HashMap<usize, u64>>,
}

impl Runs {
    fn bump(map: &Mutex<HashMap<usize, u64>>, k: usize) {
        *map.lock().unwrap().entry(k).or_default() += 1;
    }
    fn unfinished(&self, k: usize) -> bool {
        let entered = self.entered.lock().unwrap().get(&k).copied().unwrap_or(0);
        let returned = self.returned.lock().unwrap().get(&k).copied().unwrap_or(0);
        entered > returned
    }
}

fn key(k: usize) -> Key {
    Key::new("cancel", format!("payment-{k}")).unwrap()
}

/// Every fifth key's operation fails permanently (after writing, in transactional mode).
fn declines(k: usize) -> bool {
    k % 5 == 0
}

struct Setup {
    _factory: common::PgFactory,
    store: PgStore,
    business: String,
}

async fn setup(mode: &str) -> Option<Setup> {
    let factory = common::factory();
    if !available(&factory).await {
        return None;
    }
    factory.pool().await.unwrap();
    let options = PgOptions::default()
        .with_table(&format!("{}.records_{mode}", factory.schema()))
        .unwrap()
        .with_max_connections(8)
        .with_connect_timeout(Duration::from_secs(60));
    let store = PgStore::connect_with(&common::url(), options)
        .await
        .unwrap();
    let business = format!("{}.business", factory.schema());
    Some(Setup {
        _factory: factory,
        store,
        business,
    })
}

/// Drops the call after it was polled `polls` times without finishing: whatever the timing,
/// the sweep reaches every await point the call has.
struct DropAfterPolls<Fut> {
    call: Pin<Box<Fut>>,
    polls: u32,
}

impl<Fut: Future> Future for DropAfterPolls<Fut> {
    type Output = Option<Fut::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.call.as_mut().poll(cx) {
            Poll::Ready(answer) => Poll::Ready(Some(answer)),
            Poll::Pending if self.polls <= 1 => Poll::Ready(None),
            Poll::Pending => {
                self.polls -= 1;
                Poll::Pending
            }
        }
    }
}

/// Runs `call` under a random cancellation: a `timeout` of zero (the call is dropped at its
/// first await) or of 1 µs–3 ms, a `select!` against a sleep, a drop after 1–24 polls, or
/// no cancellation at all. `None` if it was dropped.
async fn maybe_cancel<Fut: Future<Output = Answer>>(rng: &mut StdRng, call: Fut) -> Option<Answer> {
    match rng.random_range(0..7) {
        0 => tokio::time::timeout(Duration::ZERO, call).await.ok(),
        1 => {
            let polls = rng.random_range(1..25);
            DropAfterPolls {
                call: Box::pin(call),
                polls,
            }
            .await
        }
        2 | 3 => {
            let within = Duration::from_micros(rng.random_range(1..3_000));
            tokio::time::timeout(within, call).await.ok()
        }
        4 | 5 => {
            let within = Duration::from_micros(rng.random_range(1..3_000));
            tokio::select! {
                answer = call => Some(answer),
                _ = tokio::time::sleep(within) => None,
            }
        }
        _ => Some(call.await),
    }
}

/// `WORKERS` tasks, each making `ATTEMPTS_PER_WORKER` calls through `call` on random keys,
/// retrying the same key at once after half of the cancellations.
async fn hammer<C, Fut>(call: C) -> Seen
where
    C: Fn(usize, u64, StdRng) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = (Option<Answer>, StdRng)> + Send,
{
    let seed: u64 = rand::random();
    eprintln!("cancel: seed {seed}");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (call, seen) = (call.clone(), Arc::clone(&seen));
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ w);
            let mut k = rng.random_range(0..KEYS);
            for attempt in 0..ATTEMPTS_PER_WORKER {
                let (answer, back) = call(k, w * ATTEMPTS_PER_WORKER + attempt, rng).await;
                rng = back;
                let cancelled = answer.is_none();
                if let Some(Err(e)) = &answer {
                    assert!(
                        matches!(e, RunError::Barrier(Error::InProgress { .. })),
                        "key {k}: unexpected error {e}"
                    );
                }
                let mut seen = seen.lock().unwrap();
                match answer {
                    None => seen.cancelled += 1,
                    Some(answer) => {
                        seen.answered += 1;
                        if let Ok(r) = answer {
                            let completed = matches!(r.outcome, Outcome::Completed(_));
                            let before = seen.acknowledged.insert(k, completed);
                            assert!(
                                before.is_none_or(|b| b == completed),
                                "key {k}: two different outcomes acknowledged"
                            );
                        }
                    }
                }
                // After a cancellation, half the time the same key at once, while the
                // dropped call may still be running.
                if !(cancelled && rng.random_bool(0.5)) {
                    k = rng.random_range(0..KEYS);
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    Arc::try_unwrap(seen)
        .ok()
        .expect("workers are done")
        .into_inner()
        .unwrap()
}

/// One key as a single consistent snapshot shows it.
#[derive(Clone, Debug, Default)]
struct Observed {
    /// The record's state and lease deadline, if there is a record.
    record: Option<(String, Option<i64>)>,
    /// Business rows (executions that committed an effect).
    effects: i64,
}

/// Records and business rows of every key, read in one `REPEATABLE READ` snapshot (calls
/// dropped earlier may still be finishing in the background).
async fn snapshot(s: &Setup) -> Vec<Observed> {
    let mut conn = PgConnection::connect(&common::url()).await.unwrap();
    let mut tx = conn
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .unwrap();
    let records: Vec<(String, String, Option<i64>)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, state, lease_until FROM {} WHERE scope = 'cancel'",
        s.store.table().quoted()
    )))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    let effects: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, count(*) FROM {} WHERE scope = 'cancel' GROUP BY id",
        s.business
    )))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let index = |id: &str| -> usize { id.trim_start_matches("payment-").parse().unwrap() };
    let mut seen = vec![Observed::default(); KEYS];
    for (id, state, lease_until) in records {
        seen[index(&id)].record = Some((state, lease_until));
    }
    for (id, n) in effects {
        seen[index(&id)].effects = n;
    }
    seen
}

/// Checks `check` on snapshots until it finds nothing still settling (`Ok(false)` for a
/// key: a background call may still change it), or panics on a violation (`Err`).
async fn settled(s: &Setup, check: impl Fn(usize, &Observed) -> Result<bool, String>) {
    // A liveness bound for background calls, not a performance assertion.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut pending = Vec::new();
        for (k, observed) in snapshot(s).await.iter().enumerate() {
            match check(k, observed) {
                Ok(true) => {}
                Ok(false) => pending.push((k, observed.clone())),
                Err(violation) => panic!("key {k}: {violation} ({observed:?})"),
            }
        }
        if pending.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "keys never settled: {pending:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The checks every snapshot must pass in both modes; `Ok(false)` if the record is a live
/// claim (the caller decides whether that is allowed).
fn consistent(seen: &Seen, k: usize, o: &Observed) -> Result<bool, String> {
    if o.effects > 1 {
        return Err(format!("the effect happened {} times", o.effects));
    }
    if let Some(&completed) = seen.acknowledged.get(&k) {
        if o.effects != i64::from(completed) {
            return Err(format!(
                "acknowledged completed={completed}, effects {}",
                o.effects
            ));
        }
    }
    match &o.record {
        Some((state, _)) if state == "completed" && o.effects != 1 => {
            Err("completed without its effect".into())
        }
        Some((state, _)) if state == "failed" && o.effects != 0 => {
            Err("failed, yet an effect exists".into())
        }
        Some((state, Some(lease_until))) if state == "in_progress" && *lease_until > 0 => Ok(false),
        Some((state, _)) if state == "in_progress" && o.effects != 0 => {
            Err("released, yet an effect exists".into())
        }
        None if o.effects != 0 => Err("an effect without a record".into()),
        _ => Ok(true),
    }
}

/// Even keys run in lease mode, odd keys in transactional mode, on one pool: a connection
/// a dropped call left inside a transaction would swallow the other mode's statements.
fn leased(k: usize) -> bool {
    k % 2 == 0
}

#[test]
fn cancelled_calls_never_execute_twice_nor_dirty_the_pool() {
    idem_conformance::__block_on(async {
        let Some(s) = setup("mixed").await else {
            return;
        };
        let barrier = Barrier::new(Arc::new(s.store.clone())).with_lease(LEASE);
        let runs = Arc::new(Runs::default());
        let insert = format!(
            "INSERT INTO {} (scope, id, n) VALUES ('cancel', $1, $2)",
            s.business
        );
        let pool = s.store.pool().clone();
        // Lease mode: the effect is a write of its own, outside the store.
        let lease_call = {
            let (barrier, runs, insert) = (barrier.clone(), Arc::clone(&runs), insert.clone());
            move |k: usize, attempt: u64, hold: Duration| {
                let (barrier, runs, insert, pool) = (
                    barrier.clone(),
                    Arc::clone(&runs),
                    insert.clone(),
                    pool.clone(),
                );
                async move {
                    barrier
                        .execute(&key(k), None, |_lease| async move {
                            Runs::bump(&runs.entered, k);
                            let result = if declines(k) {
                                Err(Failure::Permanent("declined".to_string()))
                            } else {
                                sqlx::query(AssertSqlSafe(insert))
                                    .bind(key(k).id())
                                    .bind(attempt as i32)
                                    .execute(&pool)
                                    .await
                                    .map_err(|e| Failure::Retryable(e.to_string()))?;
                                tokio::time::sleep(hold).await;
                                Ok(attempt)
                            };
                            Runs::bump(&runs.returned, k);
                            result
                        })
                        .await
                }
            }
        };
        // Transactional mode: the effect is written in the claim's transaction; a declined
        // payment writes it too, and the barrier must roll it back.
        let executions = Arc::new(AtomicU64::new(0));
        let tx_op = {
            let executions = Arc::clone(&executions);
            move |k: usize, attempt: u64, hold: Duration| -> PgOperation<u64, String, String> {
                let (insert, executions) = (insert.clone(), Arc::clone(&executions));
                Box::new(move |conn| {
                    Box::pin(async move {
                        executions.fetch_add(1, Ordering::Relaxed);
                        sqlx::query(AssertSqlSafe(insert))
                            .bind(key(k).id())
                            .bind(attempt as i32)
                            .execute(&mut *conn)
                            .await
                            .map_err(|e| Failure::Retryable(e.to_string()))?;
                        tokio::time::sleep(hold).await;
                        if declines(k) {
                            return Err(Failure::Permanent("declined".to_string()));
                        }
                        Ok(attempt)
                    })
                })
            }
        };
        let seen = hammer({
            let (barrier, lease_call, tx_op) = (barrier.clone(), lease_call.clone(), tx_op.clone());
            move |k, attempt, mut rng| {
                let (barrier, lease_call, tx_op) =
                    (barrier.clone(), lease_call.clone(), tx_op.clone());
                async move {
                    let hold = Duration::from_micros(rng.random_range(0..2_000));
                    let answer = if leased(k) {
                        maybe_cancel(&mut rng, lease_call(k, attempt, hold)).await
                    } else {
                        let policy = match rng.random_range(0..3) {
                            0 => TxPolicy::Wait,
                            1 => TxPolicy::NoWait,
                            _ => TxPolicy::Optimistic,
                        };
                        let the_key = key(k);
                        let call =
                            barrier.transaction(&the_key, None, policy, tx_op(k, attempt, hold));
                        maybe_cancel(&mut rng, call).await
                    };
                    (answer, rng)
                }
            }
        })
        .await;
        eprintln!(
            "{} calls cancelled, {} answered; {} transactional operation runs",
            seen.cancelled,
            seen.answered,
            executions.load(Ordering::Relaxed)
        );
        assert!(
            seen.cancelled >= 1_000,
            "the test must cancel thousands of calls"
        );

        // Lease mode: a live claim is allowed only where the crate docs say: a call dropped
        // while its operation ran keeps its claim until the lease ends (the effect may have
        // happened). A live claim whose operation returned is a `complete` still landing, or
        // a dropped `begin` whose claim is still being released: it must settle.
        // Transactional mode never commits a claim without its outcome.
        let check = |k: usize, o: &Observed| match consistent(&seen, k, o)? {
            false if !leased(k) => {
                Err("a transactional claim was committed without an outcome".to_string())
            }
            false if !runs.unfinished(k) => Ok(false),
            _ => Ok(true),
        };
        settled(&s, check).await;
        support::assert_pool_healthy(&s.store).await;
        let held: Vec<usize> = snapshot(&s)
            .await
            .iter()
            .enumerate()
            .filter(
                |(_, o)| matches!(&o.record, Some((st, Some(l))) if st == "in_progress" && *l > 0),
            )
            .map(|(k, _)| k)
            .collect();
        eprintln!(
            "{} keys held by the lease of an interrupted operation",
            held.len()
        );

        // Every key not held reaches one outcome, and it is the one acknowledged before.
        for k in (0..KEYS).filter(|k| !held.contains(k)) {
            let r = if leased(k) {
                lease_call(k, u64::MAX, Duration::ZERO).await
            } else {
                let op = tx_op(k, u64::MAX, Duration::ZERO);
                barrier.transaction(&key(k), None, TxPolicy::Wait, op).await
            };
            let r = r.unwrap_or_else(|e| panic!("key {k}: {e}"));
            if let Some(&completed) = seen.acknowledged.get(&k) {
                assert!(r.replayed, "key {k}: acknowledged before, executed again");
                assert_eq!(matches!(r.outcome, Outcome::Completed(_)), completed);
            }
        }
        settled(&s, |k, o| {
            check(k, o)?;
            match &o.record {
                None => Err("no outcome after a final, uncancelled call".to_string()),
                Some(_) => Ok(true),
            }
        })
        .await;
        support::assert_pool_healthy(&s.store).await;
    });
}
