//! Failover under load: while concurrent tasks run random operations on a few keys, one
//! member of the local 3-member cluster is killed (`SIGKILL`) — the leader in one run, a
//! follower in the other. Every key's history, with a final read of each key appended, must
//! be linearizable (the conformance crate's checker), and every error a retryable one.
//!
//! The conformance suite's `failover` property runs here too, with a `fail_over` hook that
//! kills the leader and opens the store again on the two surviving members (the shared
//! conformance binary has no such hook: killing a member there would disturb the properties
//! running beside it).
//!
//! Skipped (with a note) when `IDEM_ETCD_ENDPOINTS` names another cluster: only the local
//! one can be killed.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{kill, leader, local, member_endpoint, start, EtcdFactory, MEMBERS};
use idem_conformance::linearizability::{self, Event, History, Run};
use idem_conformance::ops::{Op, Ret};
use idem_conformance::{Property, StoreFactory, Verdict};
use idem_core::{Clock, Error, Key, Store, SystemClock};
use idem_etcd::EtcdStore;

/// The tests of this binary kill members: one at a time, so the cluster keeps its quorum.
static FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Copy, Debug)]
enum Victim {
    Leader,
    Follower,
}

/// One run: the history, its checked verdict, and what the fault looked like.
async fn run_with_fault(factory: &EtcdFactory, victim: Victim, round: u64) -> Result<(), String> {
    let store = Arc::new(factory.create().await.map_err(chain)?);
    let keys: Vec<Key> = (0..16)
        .map(|i| Key::new("failover", format!("k{i}")).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let shape = Run {
        tasks: 8,
        ops_per_task: 150,
        // Longer than any call can take (request timeout 5 s): nothing is dropped.
        call_timeout: Duration::from_secs(30),
        seed: 0xfa11_0000 ^ round,
    };
    let started = Instant::now();
    let running = tokio::spawn(linearizability::run(Arc::clone(&store), keys, shape));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lead = leader().await?;
    let member = match victim {
        Victim::Leader => lead,
        Victim::Follower => MEMBERS
            .into_iter()
            .find(|&m| m != lead)
            .ok_or("no follower")?,
    };
    let killed_at = started.elapsed();
    tokio::task::spawn_blocking(move || kill(member))
        .await
        .map_err(|e| e.to_string())?;
    let result = running.await.map_err(|e| e.to_string())?;
    let ran_for = started.elapsed();
    let new_leader = leader().await;
    tokio::task::spawn_blocking(move || start(member))
        .await
        .map_err(|e| e.to_string())?;
    let mut history = result.map_err(|e| format!("a permanent error during failover: {e}"))?;
    append_final_reads(&*store, &mut history).await?;
    let checked = Instant::now();
    history.check()?;
    println!(
        "{victim:?} m{member} killed at {killed_at:.2?} (new leader {new_leader:?}): {} calls in \
         {ran_for:.2?}, {} unanswered, {} retryable errors, 0 violations (checked in {:.2?}); \
         errors: {:?}",
        history.events.len(),
        history.unknown(),
        history.errors.len(),
        checked.elapsed(),
        summarize(&history.errors),
    );
    Ok(())
}

/// A read of every key after the run, so that a write acknowledged during the failover and
/// lost afterwards shows up as a violation.
async fn append_final_reads<S: Store>(store: &S, history: &mut History) -> Result<(), String> {
    let mut tick = history
        .events
        .iter()
        .map(|(_, e)| e.returned.as_ref().map_or(e.invoke, |(t, _)| *t))
        .max()
        .unwrap_or(0)
        + 1;
    for (k, key) in history.keys.clone().iter().enumerate() {
        let record = store.get(key).await.map_err(chain)?;
        history.events.push((
            k,
            Event {
                op: Op::Get,
                now: SystemClock.now(),
                invoke: tick,
                returned: Some((tick + 1, Ret::Get(record))),
            },
        ));
        tick += 2;
    }
    Ok(())
}

fn chain(e: idem_core::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// Error messages with their counts.
fn summarize(errors: &[String]) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for e in errors {
        // The driver's message, without the wrapping every error shares.
        let message = e.split("message: ").nth(1).unwrap_or(e);
        let short: String = message.chars().take(70).collect();
        match counts.iter_mut().find(|(m, _)| *m == short) {
            Some((_, n)) => *n += 1,
            None => counts.push((short, 1)),
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_and_follower_failover_keep_every_history_linearizable() {
    let _faults = FAULTS.lock().await;
    if !local() {
        eprintln!(
            "skipped: IDEM_ETCD_ENDPOINTS names another cluster; only the local one can be killed"
        );
        return;
    }
    let factory = common::factory();
    if !idem_conformance::available(&factory).await {
        return;
    }
    for (round, victim) in [Victim::Leader, Victim::Follower, Victim::Leader]
        .into_iter()
        .enumerate()
    {
        if let Err(why) = run_with_fault(&factory, victim, round as u64).await {
            panic!("{victim:?} failover, round {round}: {why}");
        }
    }
}

/// The conformance factory with a `fail_over` hook: the leader is killed, a new one is
/// elected among the survivors, and the store is opened again on the survivors alone. The
/// test starts the killed member again once the property has run.
struct Failover {
    factory: EtcdFactory,
    /// The member the hook killed.
    killed: Mutex<Option<u32>>,
}

impl Failover {
    async fn kill_leader_and_reopen(&self, store: EtcdStore) -> Result<EtcdStore, Error> {
        let options = store.options().clone();
        drop(store);
        let lead = leader().await.map_err(Error::Config)?;
        tokio::task::spawn_blocking(move || kill(lead))
            .await
            .map_err(|e| Error::Config(format!("killing the leader: {e}")))?;
        *self.killed.lock().unwrap_or_else(|p| p.into_inner()) = Some(lead);
        // Liveness bound for the election, not a performance assertion.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match leader().await {
                Ok(new) if new != lead => break,
                _ if Instant::now() > deadline => {
                    return Err(Error::Config(format!(
                        "no new leader among the survivors of m{lead} after 60 s"
                    )))
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let survivors: Vec<String> = MEMBERS
            .into_iter()
            .filter(|&m| m != lead)
            .map(member_endpoint)
            .collect();
        EtcdStore::connect_with(&survivors.join(","), options).await
    }
}

#[async_trait]
impl StoreFactory for Failover {
    type Store = EtcdStore;

    fn name(&self) -> &str {
        self.factory.name()
    }

    async fn unavailable(&self) -> Option<String> {
        self.factory.unavailable().await
    }

    async fn create(&self) -> Result<EtcdStore, Error> {
        self.factory.create().await
    }

    async fn fail_over(&self, store: EtcdStore) -> Option<Result<EtcdStore, Error>> {
        Some(self.kill_leader_and_reopen(store).await)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_failover_property_passes_when_the_leader_dies() {
    let _faults = FAULTS.lock().await;
    if !local() {
        eprintln!(
            "skipped: IDEM_ETCD_ENDPOINTS names another cluster; only the local one can be killed"
        );
        return;
    }
    let failover = Failover {
        factory: common::factory(),
        killed: Mutex::new(None),
    };
    if !idem_conformance::available(&failover).await {
        return;
    }
    let result = idem_conformance::run_property(&failover, Property::Failover).await;
    tokio::task::spawn_blocking({
        let killed = failover
            .killed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        move || killed.into_iter().for_each(start)
    })
    .await
    .unwrap();
    println!("{} in {:.2?}", result.name, result.elapsed);
    assert_eq!(
        result.verdict,
        Verdict::Passed,
        "the failover property must run and pass here"
    );
}
