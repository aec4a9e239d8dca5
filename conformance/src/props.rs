//! The lease-mode properties.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::{
    codec, Barrier, Begin, Clock, Deadlines, Error, Failure, Fingerprint, Key, Lease, ManualClock,
    MemoryStore, Response, RunError, State, Store, SystemClock, Timestamp, Token,
};
use proptest::prelude::*;

use crate::linearizability::{self, Event};
use crate::ops::{self, Op, Ret};
use crate::{driver, scale, verdict, Property, StoreFactory, Verdict};

pub(crate) const LEASE: Duration = Duration::from_secs(30);
pub(crate) const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
pub(crate) const HOURS_26: Duration = Duration::from_secs(26 * 3600);

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}
pub(crate) use ensure;

/// Formats a store error with its source chain.
pub(crate) fn err(e: Error) -> String {
    let mut msg = format!("unexpected store error: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

pub(crate) fn run_err<E: std::fmt::Debug>(e: RunError<E>) -> String {
    match e {
        RunError::Barrier(e) => err(e),
        RunError::Operation(e) => format!("unexpected operation error: {e:?}"),
    }
}

pub(crate) fn key(scope: &str, id: &str) -> Result<Key, String> {
    Key::new(scope, id).map_err(err)
}

pub(crate) fn deadlines(now: Timestamp) -> Deadlines {
    let lease_until = now.plus(LEASE);
    Deadlines {
        lease_until,
        expires_at: lease_until.plus(RETENTION),
    }
}

/// A fresh store, a manual clock at the current time, and a barrier over both.
pub(crate) struct Env<S> {
    pub store: Arc<S>,
    pub clock: ManualClock,
    pub barrier: Barrier<S>,
}

pub(crate) async fn env<F: StoreFactory>(f: &F) -> Result<Env<F::Store>, String> {
    let store = Arc::new(f.create().await.map_err(err)?);
    let clock = ManualClock::new(SystemClock.now());
    let barrier = Barrier::new(Arc::clone(&store))
        .with_clock(Arc::new(clock.clone()))
        .with_lease(LEASE)
        .with_retention(RETENTION);
    Ok(Env {
        store,
        clock,
        barrier,
    })
}

pub(crate) async fn run<F: StoreFactory>(f: &F, p: Property) -> Verdict {
    let guarantees = match f.create().await {
        Ok(store) => store.guarantees(),
        Err(e) => return Verdict::Failed(err(e)),
    };
    let needs = match p {
        Property::Race | Property::ConcurrentCheckRace => {
            Some(("atomic_claim", guarantees.atomic_claim))
        }
        Property::Fencing => Some(("fenced_completion", guarantees.fenced_completion)),
        Property::Linearizability | Property::ReclaimRace => {
            Some(("linearizable", guarantees.linearizable))
        }
        _ => None,
    };
    if let Some((name, false)) = needs {
        return Verdict::Skipped(format!("the store does not claim `{name}`"));
    }
    verdict(match p {
        Property::ModelCheck => model_check(f).await,
        Property::Linearizability => linearizability(f).await,
        Property::Race => race(f).await,
        Property::TtlTrap => ttl_trap(f).await,
        Property::ConcurrentCheckRace => concurrent_check_race(f).await,
        Property::LayerMismatch => layer_mismatch(f).await,
        Property::Fencing => fencing(f).await,
        Property::ReclaimRace => reclaim_race(f).await,
        Property::MismatchEveryPath => mismatch_every_path(f).await,
        Property::Release => release(f).await,
        Property::Purge => purge(f).await,
        Property::ScopeIsolation => scope_isolation(f).await,
        Property::BadInput => bad_input(f).await,
    })
}

// ---------------------------------------------------------------- model check

#[derive(Clone, Debug)]
enum Step {
    Begin {
        key: usize,
        fp: u8,
    },
    Finish {
        key: usize,
        lease: usize,
        failed: bool,
        response: u8,
    },
    Extend {
        key: usize,
        lease: usize,
    },
    Release {
        key: usize,
        lease: usize,
    },
    Get {
        key: usize,
    },
    Purge,
    Stats,
    Advance {
        by: usize,
    },
}

const ADVANCES: [Duration; 4] = [
    Duration::from_millis(1),
    Duration::from_secs(10),
    LEASE,
    HOURS_26,
];

fn step_strategy() -> impl Strategy<Value = Step> {
    let k = 0..3usize;
    prop_oneof![
        4 => (k.clone(), 0..3u8).prop_map(|(key, fp)| Step::Begin { key, fp }),
        2 => (k.clone(), 0..4usize, any::<bool>(), any::<u8>())
            .prop_map(|(key, lease, failed, response)| Step::Finish { key, lease, failed, response }),
        1 => (k.clone(), 0..4usize).prop_map(|(key, lease)| Step::Extend { key, lease }),
        1 => (k.clone(), 0..4usize).prop_map(|(key, lease)| Step::Release { key, lease }),
        1 => k.prop_map(|key| Step::Get { key }),
        1 => Just(Step::Purge),
        1 => Just(Step::Stats),
        2 => (0..ADVANCES.len()).prop_map(|by| Step::Advance { by }),
    ]
}

fn model_keys() -> Result<[Key; 3], String> {
    Ok([
        key("tenant-a", "k0")?,
        key("tenant-a", "k1")?,
        key("tenant-b", "k0")?,
    ])
}

fn fingerprint(fp: u8) -> Option<Fingerprint> {
    (fp > 0).then(|| Fingerprint::of_bytes(&[fp]))
}

/// The lease a step presents: one this key was handed, or a token never issued.
fn pick_lease(leases: &[Lease], key: &Key, i: usize, now: Timestamp) -> Lease {
    if leases.is_empty() || i == 3 {
        Lease {
            key: key.clone(),
            token: Token(u64::from(u32::MAX)),
            lease_until: now.plus(LEASE),
            reclaimed: false,
        }
    } else {
        leases[leases.len() - 1 - (i % leases.len())].clone()
    }
}

async fn model_check<F: StoreFactory>(f: &F) -> Result<(), String> {
    let cases = 192 * scale();
    let keys = model_keys()?;
    driver::check(
        prop::collection::vec(step_strategy(), 1..40),
        cases,
        |steps| {
            let keys = keys.clone();
            async move {
                let store = f.create().await.map_err(err)?;
                let model = MemoryStore::new();
                let mut now = SystemClock.now();
                let mut leases: BTreeMap<usize, Vec<Lease>> = BTreeMap::new();
                for (i, step) in steps.iter().enumerate() {
                    let presented = |key: usize, choice: usize| {
                        pick_lease(leases.get(&key).map_or(&[], |v| v), &keys[key], choice, now)
                    };
                    let (k, op) = match *step {
                        Step::Advance { by } => {
                            now = now.plus(ADVANCES[by]);
                            continue;
                        }
                        Step::Purge => {
                            let got = store.purge(now, 10_000).await.map_err(err)?;
                            let want = model.purge(now, 10_000).await.map_err(err)?;
                            ensure!(
                                got == want,
                                "step {i} purge: store deleted {got}, model {want}"
                            );
                            continue;
                        }
                        Step::Stats => {
                            let got = store.stats().await.map_err(err)?;
                            let want = model.stats().await.map_err(err)?;
                            ensure!(got == want, "step {i} stats: store {got:?}, model {want:?}");
                            continue;
                        }
                        Step::Begin { key, fp } => (
                            key,
                            Op::Begin {
                                fingerprint: fingerprint(fp),
                                deadlines: deadlines(now),
                            },
                        ),
                        Step::Finish {
                            key,
                            lease,
                            failed,
                            response,
                        } => (
                            key,
                            Op::Finish {
                                lease: presented(key, lease),
                                failed,
                                response: codec::encode(&response).map_err(err)?,
                                expires_at: now.plus(RETENTION),
                            },
                        ),
                        Step::Extend { key, lease } => (
                            key,
                            Op::Extend {
                                lease: presented(key, lease),
                                deadlines: deadlines(now),
                            },
                        ),
                        Step::Release { key, lease } => (
                            key,
                            Op::Release {
                                lease: presented(key, lease),
                            },
                        ),
                        Step::Get { key } => (key, Op::Get),
                    };
                    let got = ops::apply(&store, &keys[k], &op, now).await.map_err(err)?;
                    let want = ops::apply(&model, &keys[k], &op, now).await.map_err(err)?;
                    ensure!(
                        got == want,
                        "step {i} on {}: {op:?}\n store answered {got:?}\n model answered {want:?}",
                        keys[k]
                    );
                    match want {
                        Ret::Begin(Begin::Acquired(lease)) | Ret::Extend(Some(lease)) => {
                            leases.entry(k).or_default().push(lease)
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
        },
    )
    .await
}

// ---------------------------------------------------------------- linearizability

async fn linearizability<F: StoreFactory>(f: &F) -> Result<(), String> {
    const TASKS: usize = 6;
    const OPS_PER_TASK: usize = 14;
    for round in 0..(24 * scale()) {
        let store = Arc::new(f.create().await.map_err(err)?);
        let keys = [key("lin", "a")?, key("lin", "b")?];
        let tick = Arc::new(AtomicU64::new(0));
        let base = SystemClock.now();
        let offset = Arc::new(AtomicU64::new(0));
        let leases: Arc<Mutex<Vec<Lease>>> = Arc::default();
        let history: Arc<Mutex<Vec<(usize, Event)>>> = Arc::default();
        let start = Arc::new(tokio::sync::Barrier::new(TASKS));
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (store, keys, tick, offset, leases, history, start) = (
                Arc::clone(&store),
                keys.clone(),
                Arc::clone(&tick),
                Arc::clone(&offset),
                Arc::clone(&leases),
                Arc::clone(&history),
                Arc::clone(&start),
            );
            let seed = driver::seed() ^ ((round as u64) << 32) ^ t as u64;
            tasks.push(tokio::spawn(async move {
                let mut rng = seed;
                let mut next = move |n: u64| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % n
                };
                start.wait().await;
                for _ in 0..OPS_PER_TASK {
                    let k = next(2) as usize;
                    if next(10) == 0 {
                        offset.fetch_add(LEASE.as_millis() as u64 + 1, Ordering::SeqCst);
                    }
                    let now = base.plus(Duration::from_millis(offset.load(Ordering::SeqCst)));
                    let known: Vec<Lease> = leases
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|l| l.key == keys[k])
                        .cloned()
                        .collect();
                    let lease = (!known.is_empty())
                        .then(|| known[next(known.len() as u64) as usize].clone());
                    let op = match (next(6), lease) {
                        (0..=1, _) | (_, None) => Op::Begin {
                            fingerprint: fingerprint(next(2) as u8),
                            deadlines: deadlines(now),
                        },
                        (2, Some(lease)) => Op::Finish {
                            lease,
                            failed: next(3) == 0,
                            response: vec![1, next(200) as u8],
                            expires_at: now.plus(RETENTION),
                        },
                        (3, Some(lease)) => Op::Extend {
                            lease,
                            deadlines: deadlines(now),
                        },
                        (4, Some(lease)) => Op::Release { lease },
                        _ => Op::Get,
                    };
                    let invoke = tick.fetch_add(1, Ordering::SeqCst);
                    let result = tokio::time::timeout(
                        Duration::from_secs(10),
                        ops::apply(&*store, &keys[k], &op, now),
                    )
                    .await;
                    let returned = match result {
                        Ok(Ok(ret)) => Some((tick.fetch_add(1, Ordering::SeqCst), ret)),
                        // A timeout or a retryable error: the call may or may not have
                        // taken effect.
                        Err(_) => None,
                        Ok(Err(e)) if e.is_retryable() => None,
                        Ok(Err(e)) => return Err(err(e)),
                    };
                    if let Some((_, Ret::Begin(Begin::Acquired(l)) | Ret::Extend(Some(l)))) =
                        &returned
                    {
                        leases.lock().unwrap().push(l.clone());
                    }
                    history.lock().unwrap().push((
                        k,
                        Event {
                            op,
                            now,
                            invoke,
                            returned,
                        },
                    ));
                }
                Ok::<(), String>(())
            }));
        }
        for t in tasks {
            t.await
                .map_err(|e| format!("a linearizability task panicked: {e}"))??;
        }
        let history = std::mem::take(&mut *history.lock().unwrap());
        let unknown = history.iter().filter(|(_, e)| e.returned.is_none()).count();
        ensure!(
            unknown * 10 <= history.len(),
            "round {round}: {unknown} of {} calls ended without an answer (timeouts or retryable errors)",
            history.len()
        );
        for (k, key) in keys.iter().enumerate() {
            let events: Vec<Event> = history
                .iter()
                .filter(|(i, _)| *i == k)
                .map(|(_, e)| e.clone())
                .collect();
            linearizability::check(key, &events)
                .map_err(|why| format!("round {round}, key {key}: {why}\nhistory: {events:#?}"))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- race

async fn race<F: StoreFactory>(f: &F) -> Result<(), String> {
    const CONTENDERS: usize = 200;
    let env = env(f).await?;
    for round in 0..(8 * scale()) {
        let k = key("race", &format!("fresh-{round}"))?;
        let now = env.clock.now();
        let start = Arc::new(tokio::sync::Barrier::new(CONTENDERS));
        let tasks: Vec<_> = (0..CONTENDERS)
            .map(|_| {
                let (store, k, start) = (Arc::clone(&env.store), k.clone(), Arc::clone(&start));
                tokio::spawn(async move {
                    start.wait().await;
                    store.begin(&k, None, deadlines(now), now).await
                })
            })
            .collect();
        let (mut acquired, mut in_progress, mut errors) = (0, 0, Vec::new());
        for t in tasks {
            match t.await.map_err(|e| e.to_string())? {
                Ok(Begin::Acquired(_)) => acquired += 1,
                Ok(Begin::InProgress { .. }) => in_progress += 1,
                Ok(other) => return Err(format!("round {round}: a fresh key answered {other:?}")),
                Err(e) => errors.push(err(e)),
            }
        }
        ensure!(
            acquired <= 1,
            "round {round}: {acquired} of {CONTENDERS} simultaneous begins acquired the same fresh key"
        );
        ensure!(
            errors.is_empty() && acquired == 1 && in_progress == CONTENDERS - 1,
            "round {round}: {acquired} acquired, {in_progress} in progress, {} errors: {:?}",
            errors.len(),
            errors.first()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- the four failure modes

type Charge = Result<Response<u64, String>, RunError<String>>;

async fn charge<S: Store + ?Sized + 'static>(
    barrier: &Barrier<S>,
    k: &Key,
    fp: Option<Fingerprint>,
    executions: &AtomicU32,
    hold: Duration,
) -> Charge {
    barrier
        .execute(k, fp, |_lease| async move {
            let n = executions.fetch_add(1, Ordering::SeqCst) + 1;
            if !hold.is_zero() {
                tokio::time::sleep(hold).await;
            }
            Ok::<u64, Failure<String, String>>(u64::from(n) * 100)
        })
        .await
}

async fn ttl_trap<F: StoreFactory>(f: &F) -> Result<(), String> {
    let env = env(f).await?;
    let k = key("payments", "ttl-trap")?;
    let fp = Some(Fingerprint::of_bytes(b"amount=100"));
    let executions = AtomicU32::new(0);
    let first = charge(&env.barrier, &k, fp, &executions, Duration::ZERO)
        .await
        .map_err(run_err)?;
    ensure!(!first.replayed, "the first request was a replay");
    env.clock.advance(HOURS_26);
    // A clean-up job running now must not forget the key: retention is 7 days.
    env.store.purge(env.clock.now(), 1000).await.map_err(err)?;
    let late = charge(&env.barrier, &k, fp, &executions, Duration::ZERO)
        .await
        .map_err(run_err)?;
    ensure!(
        late.replayed && late.outcome == first.outcome,
        "a retry 26 hours later was not replayed: {late:?} (first: {first:?})"
    );
    ensure!(
        executions.load(Ordering::SeqCst) == 1,
        "the charge ran {} times",
        executions.load(Ordering::SeqCst)
    );
    Ok(())
}

async fn concurrent_check_race<F: StoreFactory>(f: &F) -> Result<(), String> {
    const DUPLICATES: usize = 64;
    let env = env(f).await?;
    for round in 0..(4 * scale()) {
        let k = key("payments", &format!("double-tap-{round}"))?;
        let executions = Arc::new(AtomicU32::new(0));
        let start = Arc::new(tokio::sync::Barrier::new(DUPLICATES));
        let tasks: Vec<_> = (0..DUPLICATES)
            .map(|_| {
                let (barrier, k, ex, start) = (
                    env.barrier.clone(),
                    k.clone(),
                    Arc::clone(&executions),
                    Arc::clone(&start),
                );
                tokio::spawn(async move {
                    start.wait().await;
                    charge(&barrier, &k, None, &ex, Duration::from_millis(20)).await
                })
            })
            .collect();
        let (mut fresh, mut replays, mut busy, mut lost) = (0, 0, 0, 0);
        for t in tasks {
            match t.await.map_err(|e| e.to_string())? {
                Ok(r) if r.replayed => replays += 1,
                Ok(_) => fresh += 1,
                Err(RunError::Barrier(Error::InProgress { .. })) => busy += 1,
                // A duplicate that ran and was then fenced: counted through `executions`.
                Err(RunError::Barrier(Error::LeaseLost)) => lost += 1,
                Err(e) => return Err(run_err(e)),
            }
        }
        let ran = executions.load(Ordering::SeqCst);
        ensure!(
            ran == 1 && fresh == 1,
            "round {round}: {DUPLICATES} simultaneous duplicates executed {ran} times \
             ({fresh} fresh, {replays} replays, {busy} in progress, {lost} lost their lease)"
        );
        let after = charge(&env.barrier, &k, None, &executions, Duration::ZERO)
            .await
            .map_err(run_err)?;
        ensure!(
            after.replayed,
            "round {round}: the retry after the burst was not a replay"
        );
    }
    Ok(())
}

async fn layer_mismatch<F: StoreFactory>(f: &F) -> Result<(), String> {
    let env = env(f).await?;
    let api_key = key("api/orders", "order-17")?;
    let published: Arc<Mutex<Vec<String>>> = Arc::default();

    // The producer publishes, then dies before completing; its lease is reclaimed and the
    // retry publishes again. Both messages must carry the same derived id.
    let started = env.barrier.begin(&api_key, None).await.map_err(err)?;
    let idem_core::Started::Acquired(zombie) = started else {
        return Err("a fresh API key was not acquired".into());
    };
    published
        .lock()
        .unwrap()
        .push(zombie.derive("publish").id().to_string());
    env.clock.advance(LEASE + Duration::from_secs(1));
    let publish = Arc::clone(&published);
    env.barrier
        .execute(&api_key, None, |lease| async move {
            publish
                .lock()
                .unwrap()
                .push(lease.derive("publish").id().to_string());
            Ok::<_, Failure<String, String>>(1u64)
        })
        .await
        .map_err(run_err)?;
    let ids = published.lock().unwrap().clone();
    ensure!(
        ids.len() == 2 && ids[0] == ids[1],
        "derived ids differ across executions: {ids:?}"
    );
    ensure!(
        api_key.derive("publish") != api_key.derive("email"),
        "different labels derived the same key"
    );

    // The broker delivers each message at least once: here three times. The consumer runs its
    // own barrier on the header in its own scope and applies the message once.
    let applied = AtomicU32::new(0);
    for (delivery, id) in ids.iter().chain(ids.iter().take(1)).enumerate() {
        let consumer_key = key("consumer/ledger", id)?;
        let r = charge(&env.barrier, &consumer_key, None, &applied, Duration::ZERO)
            .await
            .map_err(run_err)?;
        ensure!(
            (delivery == 0) != r.replayed,
            "delivery {delivery} of the same message: replayed = {}",
            r.replayed
        );
    }
    ensure!(
        applied.load(Ordering::SeqCst) == 1,
        "a redelivered message was applied {} times",
        applied.load(Ordering::SeqCst)
    );
    Ok(())
}

// ---------------------------------------------------------------- fencing and friends

async fn acquire<S: Store + ?Sized>(
    store: &S,
    k: &Key,
    fp: Option<&Fingerprint>,
    now: Timestamp,
) -> Result<Lease, String> {
    match store.begin(k, fp, deadlines(now), now).await.map_err(err)? {
        Begin::Acquired(lease) => Ok(lease),
        other => Err(format!("begin on {k} should acquire, answered {other:?}")),
    }
}

fn lease_lost<T: std::fmt::Debug>(what: &str, r: Result<T, Error>) -> Result<(), String> {
    match r {
        Err(Error::LeaseLost) => Ok(()),
        other => Err(format!("{what}: expected LeaseLost, got {other:?}")),
    }
}

async fn fencing<F: StoreFactory>(f: &F) -> Result<(), String> {
    let env = env(f).await?;
    let s = &*env.store;
    let k = key("fencing", "k")?;
    let t0 = env.clock.now();
    let zombie = acquire(s, &k, None, t0).await?;
    let t1 = t0.plus(LEASE + Duration::from_millis(1));
    let successor = acquire(s, &k, None, t1).await?;
    ensure!(
        successor.reclaimed && successor.token > zombie.token,
        "reclaim must raise the token and be marked: {successor:?} after {zombie:?}"
    );
    let before = s.get(&k).await.map_err(err)?;
    let resp = codec::encode(&"zombie").map_err(err)?;
    lease_lost(
        "zombie complete",
        s.complete(&zombie, &resp, t1.plus(RETENTION), t1).await,
    )?;
    lease_lost(
        "zombie fail",
        s.fail(&zombie, &resp, t1.plus(RETENTION), t1).await,
    )?;
    lease_lost("zombie extend", s.extend(&zombie, deadlines(t1), t1).await)?;
    lease_lost("zombie release", s.release(&zombie, t1).await)?;
    let after = s.get(&k).await.map_err(err)?;
    ensure!(
        before == after,
        "zombie writes changed the record: {before:?} -> {after:?}"
    );
    let never_issued = Lease {
        token: Token(successor.token.0 + 7),
        ..successor.clone()
    };
    lease_lost(
        "never-issued token",
        s.complete(&never_issued, &resp, t1, t1).await,
    )?;
    let other_key = Lease {
        key: key("fencing", "no-record")?,
        ..successor.clone()
    };
    lease_lost(
        "lease on a key without record",
        s.complete(&other_key, &resp, t1, t1).await,
    )?;

    let ok = codec::encode(&"successor").map_err(err)?;
    s.complete(&successor, &ok, t1.plus(RETENTION), t1)
        .await
        .map_err(err)?;
    lease_lost(
        "zombie after completion",
        s.complete(&zombie, &resp, t1, t1).await,
    )?;
    lease_lost(
        "successor twice",
        s.complete(&successor, &resp, t1, t1).await,
    )?;
    lease_lost(
        "fail after completion",
        s.fail(&successor, &resp, t1, t1).await,
    )?;
    match s.begin(&k, None, deadlines(t1), t1).await.map_err(err)? {
        Begin::Completed { response } if response == ok => Ok(()),
        other => Err(format!(
            "after fencing, the successor's outcome must replay; got {other:?}"
        )),
    }
}

async fn reclaim_race<F: StoreFactory>(f: &F) -> Result<(), String> {
    let env = env(f).await?;
    for round in 0..(100 * scale()) {
        let k = key("reclaim-race", &format!("k{round}"))?;
        let t0 = env.clock.now();
        let old = acquire(&*env.store, &k, None, t0).await?;
        let t1 = t0.plus(LEASE + Duration::from_millis(1));
        let resp = codec::encode(&round).map_err(err)?;
        let (store_a, store_b) = (Arc::clone(&env.store), Arc::clone(&env.store));
        let (old2, resp2, k2) = (old.clone(), resp.clone(), k.clone());
        // Both calls start together; the completion is staggered by a few scheduler turns
        // from round to round, so it lands before, inside and after the reclaim's window.
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let (start_a, start_b) = (Arc::clone(&start), start);
        let finish = tokio::spawn(async move {
            start_a.wait().await;
            for _ in 0..round % 4 {
                tokio::task::yield_now().await;
            }
            store_a
                .complete(&old2, &resp2, t1.plus(RETENTION), t1)
                .await
        });
        let reclaim = tokio::spawn(async move {
            start_b.wait().await;
            store_b.begin(&k2, None, deadlines(t1), t1).await
        });
        let finished = finish.await.map_err(|e| e.to_string())?;
        let reclaimed = reclaim.await.map_err(|e| e.to_string())?.map_err(err)?;
        match (&finished, &reclaimed) {
            (Ok(()), Begin::Completed { response }) if *response == resp => {}
            (Err(Error::LeaseLost), Begin::Acquired(l)) if l.reclaimed => {}
            (Ok(()), Begin::Acquired(_)) => {
                return Err(format!(
                    "round {round}: the old holder's complete succeeded AND a reclaim acquired the key: \
                     the completed outcome was overwritten"
                ))
            }
            other => return Err(format!("round {round}: impossible pair {other:?}")),
        }
        let rec = env.store.get(&k).await.map_err(err)?;
        let consistent = match (&finished, rec.as_ref().map(|r| &r.state)) {
            (Ok(()), Some(State::Completed { response })) => *response == resp,
            (Err(_), Some(State::InProgress { token, .. })) => *token > old.token,
            _ => false,
        };
        ensure!(
            consistent,
            "round {round}: record {rec:?} contradicts {finished:?}"
        );
    }
    Ok(())
}

async fn mismatch_every_path<F: StoreFactory>(f: &F) -> Result<(), String> {
    let env = env(f).await?;
    let s = &*env.store;
    let (a, b) = (
        Fingerprint::of_bytes(b"amount=100"),
        Fingerprint::of_bytes(b"amount=999"),
    );
    let now = env.clock.now();
    let resp = codec::encode(&"ok").map_err(err)?;
    let expect_mismatch = |path: &str, got: Begin| -> Result<(), String> {
        ensure!(
            got == Begin::Mismatch,
            "{path}: a different fingerprint answered {got:?}"
        );
        Ok(())
    };

    let in_flight = key("mismatch", "in-flight")?;
    acquire(s, &in_flight, Some(&a), now).await?;
    expect_mismatch(
        "in flight",
        s.begin(&in_flight, Some(&b), deadlines(now), now)
            .await
            .map_err(err)?,
    )?;

    let completed = key("mismatch", "completed")?;
    let l = acquire(s, &completed, Some(&a), now).await?;
    s.complete(&l, &resp, now.plus(RETENTION), now)
        .await
        .map_err(err)?;
    expect_mismatch(
        "completed",
        s.begin(&completed, Some(&b), deadlines(now), now)
            .await
            .map_err(err)?,
    )?;
    let same = s
        .begin(&completed, Some(&a), deadlines(now), now)
        .await
        .map_err(err)?;
    ensure!(
        same == Begin::Completed {
            response: resp.clone()
        },
        "an identical retry after completion must replay, got {same:?}"
    );
    let bare = s
        .begin(&completed, None, deadlines(now), now)
        .await
        .map_err(err)?;
    ensure!(
        matches!(bare, Begin::Completed { .. }),
        "a retry without fingerprint must replay, got {bare:?}"
    );

    let failed = key("mismatch", "failed")?;
    let l = acquire(s, &failed, Some(&a), now).await?;
    s.fail(&l, &resp, now.plus(RETENTION), now)
        .await
        .map_err(err)?;
    expect_mismatch(
        "failed",
        s.begin(&failed, Some(&b), deadlines(now), now)
            .await
            .map_err(err)?,
    )?;

    let stale = key("mismatch", "reclaim")?;
    acquire(s, &stale, Some(&a), now).await?;
    let later = now.plus(LEASE + Duration::from_secs(1));
    let before = s.get(&stale).await.map_err(err)?;
    expect_mismatch(
        "reclaim",
        s.begin(&stale, Some(&b), deadlines(later), later)
            .await
            .map_err(err)?,
    )?;
    ensure!(
        s.get(&stale).await.map_err(err)? == before,
        "a mismatched reclaim attempt changed the record"
    );

    let released = key("mismatch", "released")?;
    let l = acquire(s, &released, Some(&a), now).await?;
    s.release(&l, now).await.map_err(err)?;
    expect_mismatch(
        "released",
        s.begin(&released, Some(&b), deadlines(now), now)
            .await
            .map_err(err)?,
    )?;

    // Through the barrier: the stored digest survives completion and still guards replays.
    let via = key("mismatch", "barrier")?;
    let ex = AtomicU32::new(0);
    charge(&env.barrier, &via, Some(a), &ex, Duration::ZERO)
        .await
        .map_err(run_err)?;
    match charge(&env.barrier, &via, Some(b), &ex, Duration::ZERO).await {
        Err(RunError::Barrier(Error::Mismatch)) => {}
        other => return Err(format!("barrier replay with another payload: {other:?}")),
    }
    let again = charge(&env.barrier, &via, Some(a), &ex, Duration::ZERO)
        .await
        .map_err(run_err)?;
    ensure!(
        again.replayed,
        "identical retry through the barrier must replay"
    );
    Ok(())
}

async fn release<F: StoreFactory>(f: &F) -> Result<(), String> {
    let env = env(f).await?;
    let s = &*env.store;
    let k = key("release", "k")?;
    let now = env.clock.now();
    let mut last = Token(0);
    for cycle in 0..5 {
        let l = acquire(s, &k, None, now).await?;
        ensure!(
            l.token > last,
            "cycle {cycle}: token {:?} did not grow past {last:?}",
            l.token
        );
        ensure!(
            !l.reclaimed || cycle == 0,
            "cycle {cycle}: acquiring a released key is not a stale reclaim"
        );
        last = l.token;
        s.release(&l, now).await.map_err(err)?;
        lease_lost("double release", s.release(&l, now).await)?;
        lease_lost(
            "complete after release",
            s.complete(&l, b"\x01\"x\"", now, now).await,
        )?;
        lease_lost(
            "extend after release",
            s.extend(&l, deadlines(now), now).await,
        )?;
    }
    let ex = AtomicU32::new(0);
    let failed: Charge = env
        .barrier
        .execute(&k, None, |_| async {
            Err(Failure::Retryable("network".to_string()))
        })
        .await;
    ensure!(
        matches!(failed, Err(RunError::Operation(_))),
        "retryable failure: {failed:?}"
    );
    let next = charge(&env.barrier, &k, None, &ex, Duration::ZERO)
        .await
        .map_err(run_err)?;
    ensure!(
        !next.replayed && ex.load(Ordering::SeqCst) == 1,
        "after a retryable failure the next request must execute"
    );
    Ok(())
}

async fn purge<F: StoreFactory>(f: &F) -> Result<(), String> {
    let env = env(f).await?;
    let s = &*env.store;
    let t = env.clock.now();
    let hour = Duration::from_secs(3600);
    let resp = codec::encode(&1).map_err(err)?;
    let done = key("purge", "completed")?;
    let l = acquire(s, &done, None, t).await?;
    s.complete(&l, &resp, t.plus(hour), t).await.map_err(err)?;
    let failed = key("purge", "failed")?;
    let l = acquire(s, &failed, None, t).await?;
    s.fail(&l, &resp, t.plus(hour * 2), t).await.map_err(err)?;
    let running = key("purge", "in-progress")?;
    acquire(s, &running, None, t).await?;

    let keys = [done.clone(), failed.clone(), running.clone()];
    let mut before = Vec::new();
    for k in &keys {
        before.push(s.get(k).await.map_err(err)?);
    }
    let deleted = s.purge(t.plus(hour / 2), 100).await.map_err(err)?;
    let mut after = Vec::new();
    for k in &keys {
        after.push(s.get(k).await.map_err(err)?);
    }
    ensure!(
        deleted == 0 && before == after,
        "purge inside retention deleted {deleted} records"
    );

    let deleted = s.purge(t.plus(hour), 100).await.map_err(err)?;
    ensure!(
        deleted == 1,
        "purge at the first expiry deleted {deleted}, expected exactly the completed record"
    );
    ensure!(
        s.get(&done).await.map_err(err)?.is_none(),
        "the expired record is still there"
    );
    ensure!(
        s.get(&failed).await.map_err(err)?.is_some(),
        "a record inside retention was purged"
    );
    let stats = s.stats().await.map_err(err)?;
    ensure!(
        (stats.in_progress, stats.completed, stats.failed) == (1, 0, 1),
        "stats after purge: {stats:?}"
    );
    // A forgotten key is a new key: only purge forgets.
    let again = acquire(s, &done, None, t.plus(hour)).await?;
    ensure!(
        again.token == Token(1),
        "a purged key restarted at {:?}",
        again.token
    );

    // Batches: five expired records go two at a time.
    for i in 0..5 {
        let k = key("purge-batch", &format!("k{i}"))?;
        let l = acquire(s, &k, None, t).await?;
        s.complete(&l, &resp, t, t).await.map_err(err)?;
    }
    let late = t.plus(hour * 24 * 30);
    let mut batches = Vec::new();
    loop {
        let n = s.purge(late, 2).await.map_err(err)?;
        batches.push(n);
        if n == 0 || batches.len() > 10 {
            break;
        }
    }
    // Everything left is expired by now (the in-progress record's retention included).
    let total: u64 = batches.iter().sum();
    ensure!(
        batches.iter().all(|&n| n <= 2) && total == 8,
        "purge in batches of 2 deleted {batches:?} (expected 8 records in batches of at most 2)"
    );
    Ok(())
}

async fn scope_isolation<F: StoreFactory>(f: &F) -> Result<(), String> {
    let env = env(f).await?;
    let ex = AtomicU32::new(0);
    let pairs = [
        (key("tenant-a", "same-id")?, key("tenant-b", "same-id")?),
        (key("a", "b/c")?, key("a/b", "c")?),
        (key("", "k")?, key(" ", "k")?),
    ];
    for (x, y) in &pairs {
        let rx = charge(&env.barrier, x, None, &ex, Duration::ZERO)
            .await
            .map_err(run_err)?;
        let ry = charge(&env.barrier, y, None, &ex, Duration::ZERO)
            .await
            .map_err(run_err)?;
        ensure!(!rx.replayed && !ry.replayed, "{y} replayed {x}'s response");
        let rx2 = charge(&env.barrier, x, None, &ex, Duration::ZERO)
            .await
            .map_err(run_err)?;
        ensure!(
            rx2.replayed && rx2.outcome == rx.outcome,
            "{x} lost its own outcome"
        );
    }
    Ok(())
}

async fn bad_input<F: StoreFactory>(f: &F) -> Result<(), String> {
    let env = env(f).await?;
    let s = &*env.store;
    let now = env.clock.now();
    // Responses are opaque bytes and come back exactly.
    let samples: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0xff, 0, 0xfe],
        (0..=255u8).cycle().take(64 * 1024).collect(),
    ];
    for (i, bytes) in samples.iter().enumerate() {
        let k = key("bytes", &format!("k{i}"))?;
        let l = acquire(s, &k, None, now).await?;
        s.complete(&l, bytes, now.plus(RETENTION), now)
            .await
            .map_err(err)?;
        match s.begin(&k, None, deadlines(now), now).await.map_err(err)? {
            Begin::Completed { response } if response == *bytes => {}
            other => {
                return Err(format!(
                    "{} bytes did not round-trip: {:?}",
                    bytes.len(),
                    other
                ))
            }
        }
    }
    // Unknown and corrupt stored formats are typed errors at replay, never a wrong answer.
    for (id, stored, want) in [
        ("unknown", b"\x09{}".to_vec(), "UnknownFormat"),
        ("corrupt", b"\x01{\"amou".to_vec(), "Corrupt"),
    ] {
        let k = key("formats", id)?;
        let l = acquire(s, &k, None, now).await?;
        s.complete(&l, &stored, now.plus(RETENTION), now)
            .await
            .map_err(err)?;
        let r: Result<Response<u64, String>, RunError<String>> =
            env.barrier.execute(&k, None, |_| async { Ok(1) }).await;
        let ok = matches!(
            (&r, want),
            (
                Err(RunError::Barrier(Error::UnknownFormat { .. })),
                "UnknownFormat"
            ) | (Err(RunError::Barrier(Error::Corrupt(_))), "Corrupt")
        );
        ensure!(ok, "stored {id} outcome: expected {want}, got {r:?}");
    }
    // Invalid keys never reach a store.
    for (scope, id) in [("s", ""), ("s", "has space"), ("s", "ключ"), ("a\nb", "k")] {
        ensure!(
            Key::new(scope, id).is_err(),
            "key ({scope:?}, {id:?}) was accepted"
        );
    }
    ensure!(
        Key::new("s", "x".repeat(256)).is_err(),
        "a 256-byte id was accepted"
    );
    let stats = s.stats().await.map_err(err)?;
    ensure!(
        stats.total() == (samples.len() + 2) as u64,
        "stats count {stats:?}"
    );
    Ok(())
}
