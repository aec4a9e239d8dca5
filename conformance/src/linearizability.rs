//! Linearizability: a concurrent runner that records histories against a real store, and a
//! Wing–Gong checker with Lowe's memoization over one key's history.
//!
//! The `linearizability` property uses both; so can a backend's own fault tests (a failover
//! while the run goes on): call [`run`] with the store and keys, inject the fault meanwhile,
//! then [`History::check`] it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::{
    Begin, Clock, Deadlines, Key, Lease, Record, Store, SystemClock, Timestamp, DEFAULT_LEASE,
    DEFAULT_RETENTION,
};

use crate::kit::{err, fingerprint};
use crate::ops::{self, outcomes, step, Op, Ret};

/// One call in a history.
#[derive(Clone, Debug)]
pub struct Event {
    /// The operation.
    pub op: Op,
    /// The `now` it was called with.
    pub now: Timestamp,
    /// When it was invoked (any monotonic tick shared by all events of the history).
    pub invoke: u64,
    /// When it returned and what it answered; `None` if the outcome is unknown (a timeout,
    /// a connection error): it may have taken effect at any point after `invoke`, or never.
    pub returned: Option<(u64, Ret)>,
}

/// The most events one key's history may have.
pub const MAX_EVENTS: usize = 128;

/// The shape of a concurrent run.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// Concurrent tasks.
    pub tasks: usize,
    /// Calls per task.
    pub ops_per_task: usize,
    /// A call that takes longer is dropped and recorded as unanswered.
    pub call_timeout: Duration,
    /// Seed of the tasks' random choices.
    pub seed: u64,
}

/// The time of a concurrent run: where the clock starts, the lease and retention every call
/// passes, and whether purges take part.
#[derive(Clone, Copy, Debug)]
pub struct Times {
    /// The clock's start.
    pub start: Timestamp,
    /// The lease of every claim and extension; the clock jumps by it now and then.
    pub lease: Duration,
    /// The retention of every claim and outcome.
    pub retention: Duration,
    /// Whether `purge` calls are in the mix (one event in every key's history).
    pub purges: bool,
}

impl Default for Times {
    /// The real time, the barrier's default lease and retention, no purges.
    fn default() -> Self {
        Times {
            start: SystemClock.now(),
            lease: DEFAULT_LEASE,
            retention: DEFAULT_RETENTION,
            purges: false,
        }
    }
}

/// A finished run: every call with the index of its key, and the errors that left calls
/// unanswered.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// The keys of the run.
    pub keys: Vec<Key>,
    /// `(key index, event)` in the order the calls returned.
    pub events: Vec<(usize, Event)>,
    /// Retryable errors and timeouts, one line each.
    pub errors: Vec<String>,
}

impl History {
    /// Calls without an answer (timeouts and retryable errors).
    pub fn unknown(&self) -> usize {
        self.events
            .iter()
            .filter(|(_, e)| e.returned.is_none())
            .count()
    }

    /// Checks every key's history with [`check`].
    pub fn check(&self) -> Result<(), String> {
        for (k, key) in self.keys.iter().enumerate() {
            let events: Vec<Event> = self
                .events
                .iter()
                .filter(|(i, _)| *i == k)
                .map(|(_, e)| e.clone())
                .collect();
            check(key, &events).map_err(|why| format!("key {key}: {why}\nhistory: {events:#?}"))?;
        }
        Ok(())
    }
}

/// Runs `run.tasks` tasks of random operations (begin, complete, fail, extend, release,
/// get; with and without fingerprints; now and then jumping the clock past the lease) on
/// `keys` of `store`, all starting together, and records the history. A permanent error is
/// `Err`; a retryable error or a timeout records the call as unanswered.
///
/// Needs a multi-threaded tokio runtime. Keep `keys.len() * MAX_EVENTS` above
/// `tasks * ops_per_task` so that every key's history stays checkable.
pub async fn run<S: Store + ?Sized + 'static>(
    store: Arc<S>,
    keys: Vec<Key>,
    run: Run,
) -> Result<History, String> {
    run_with(store, keys, run, Times::default()).await
}

/// [`run`] with the given [`Times`].
pub async fn run_with<S: Store + ?Sized + 'static>(
    store: Arc<S>,
    keys: Vec<Key>,
    run: Run,
    times: Times,
) -> Result<History, String> {
    let n_keys = keys.len() as u64;
    let tick = Arc::new(AtomicU64::new(0));
    let base = times.start;
    let deadlines = move |now: Timestamp| Deadlines {
        lease_until: now.plus(times.lease),
        expires_at: now.plus(times.lease + times.retention),
    };
    let offset = Arc::new(AtomicU64::new(0));
    let leases: Arc<Mutex<Vec<Lease>>> = Arc::default();
    let history: Arc<Mutex<History>> = Arc::new(Mutex::new(History {
        keys: keys.clone(),
        ..History::default()
    }));
    let start = Arc::new(tokio::sync::Barrier::new(run.tasks));
    let mut tasks = Vec::new();
    for t in 0..run.tasks {
        let (store, keys, tick, offset, leases, history, start) = (
            Arc::clone(&store),
            keys.clone(),
            Arc::clone(&tick),
            Arc::clone(&offset),
            Arc::clone(&leases),
            Arc::clone(&history),
            Arc::clone(&start),
        );
        let seed = run.seed ^ ((t as u64) << 40) ^ t as u64;
        tasks.push(tokio::spawn(async move {
            let mut rng = seed | 1;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            start.wait().await;
            for _ in 0..run.ops_per_task {
                let k = next(n_keys) as usize;
                if next(10) == 0 {
                    offset.fetch_add(times.lease.as_millis() as u64 + 1, Ordering::SeqCst);
                }
                let now = base.plus(Duration::from_millis(offset.load(Ordering::SeqCst)));
                let known: Vec<Lease> = lock(&leases)
                    .iter()
                    .filter(|l| l.key == keys[k])
                    .cloned()
                    .collect();
                let lease =
                    (!known.is_empty()).then(|| known[next(known.len() as u64) as usize].clone());
                let op = match (next(if times.purges { 7 } else { 6 }), lease) {
                    (6, _) => Op::Purge { batch: 10_000 },
                    (0..=1, _) | (_, None) => Op::Begin {
                        fingerprint: fingerprint(next(2) as u8),
                        deadlines: deadlines(now),
                    },
                    (2, Some(lease)) => Op::Finish {
                        lease,
                        failed: next(3) == 0,
                        response: vec![1, next(200) as u8],
                        expires_at: now.plus(times.retention),
                    },
                    (3, Some(lease)) => Op::Extend {
                        lease,
                        deadlines: deadlines(now),
                    },
                    (4, Some(lease)) => Op::Release { lease },
                    _ => Op::Get,
                };
                let invoke = tick.fetch_add(1, Ordering::SeqCst);
                let result =
                    tokio::time::timeout(run.call_timeout, ops::apply(&*store, &keys[k], &op, now))
                        .await;
                let returned = match result {
                    Ok(Ok(ret)) => Some((tick.fetch_add(1, Ordering::SeqCst), ret)),
                    // A timeout or a retryable error: the call may or may not have taken
                    // effect.
                    Err(_) => {
                        lock(&history)
                            .errors
                            .push(format!("timeout after {:?}", run.call_timeout));
                        None
                    }
                    Ok(Err(e)) if e.is_retryable() => {
                        lock(&history).errors.push(err(e));
                        None
                    }
                    Ok(Err(e)) => return Err(err(e)),
                };
                if let Some((_, Ret::Begin(Begin::Acquired(l)) | Ret::Extend(Some(l)))) = &returned
                {
                    lock(&leases).push(l.clone());
                }
                // A purge acts on every key: it is one event in each key's history.
                let touched: Vec<usize> = match op {
                    Op::Purge { .. } => (0..keys.len()).collect(),
                    _ => vec![k],
                };
                let mut history = lock(&history);
                for k in touched {
                    history.events.push((
                        k,
                        Event {
                            op: op.clone(),
                            now,
                            invoke,
                            returned: returned.clone(),
                        },
                    ));
                }
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| format!("a linearizability task panicked: {e}"))??;
    }
    let history = std::mem::take(&mut *lock(&history));
    Ok(history)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Checks that `history` (all on `key`, starting from no record) is linearizable against
/// the sequential model. `Err` explains the first call that no order can account for.
///
/// An unanswered call may have taken effect at any point after its invocation, or never.
/// An unanswered `begin` that acquired may also have been undone later — its claim released
/// by the store, at any later point — because the contract asks a store to free a claim whose
/// caller never received it when it can.
pub fn check(key: &Key, history: &[Event]) -> Result<(), String> {
    if history.len() > MAX_EVENTS {
        return Err(format!(
            "history of {} events exceeds {MAX_EVENTS}",
            history.len()
        ));
    }
    let mut search = Search {
        key,
        history,
        seen: HashSet::new(),
        deepest: (0, None),
    };
    if search.dfs(0, None, Vec::new()) {
        Ok(())
    } else {
        let (depth, stuck) = search.deepest;
        Err(format!(
            "not linearizable: no order explains the history; the longest linearizable prefix has \
             {depth} calls, after which none of the pending calls fits, e.g. {stuck:?}"
        ))
    }
}

/// Claims of unanswered `begin`s placed so far (with the `now` of their call) that the
/// store may still release.
type Undo = Vec<(Lease, Timestamp)>;

struct Search<'a> {
    key: &'a Key,
    history: &'a [Event],
    seen: HashSet<(u128, Option<Record>, Undo)>,
    deepest: (u32, Option<Event>),
}

impl Search<'_> {
    fn dfs(&mut self, done: u128, rec: Option<Record>, undo: Undo) -> bool {
        let pending = |i: usize| done & (1u128 << i) == 0;
        // Finished when every call with a known answer is placed; unknown ones may be dropped.
        if (0..self.history.len()).all(|i| !pending(i) || self.history[i].returned.is_none()) {
            return true;
        }
        if !self.seen.insert((done, rec.clone(), undo.clone())) {
            return false;
        }
        for (j, (lease, now)) in undo.iter().enumerate() {
            let op = Op::Release {
                lease: lease.clone(),
            };
            if let (Ret::Fenced(true), next) = step(rec.as_ref(), self.key, &op, *now) {
                let mut rest = undo.clone();
                rest.remove(j);
                if self.dfs(done, next, rest) {
                    return true;
                }
            }
        }
        let horizon = (0..self.history.len())
            .filter(|&i| pending(i))
            .filter_map(|i| self.history[i].returned.as_ref().map(|(t, _)| *t))
            .min()
            .unwrap_or(u64::MAX);
        let depth = done.count_ones();
        for i in (0..self.history.len()).filter(|&i| pending(i)) {
            let e = &self.history[i];
            if e.invoke > horizon {
                continue;
            }
            let mark = done | (1u128 << i);
            for (answer, next) in outcomes(rec.as_ref(), self.key, &e.op, e.now) {
                match &e.returned {
                    Some((_, got)) if Ret::matches(&e.op, got, &answer) => {
                        if self.dfs(mark, next, undo.clone()) {
                            return true;
                        }
                    }
                    Some(_) => {
                        if depth >= self.deepest.0 {
                            self.deepest = (depth, Some(e.clone()));
                        }
                    }
                    None => {
                        let mut with_undo = undo.clone();
                        if let Ret::Begin(Begin::Acquired(lease)) = &answer {
                            with_undo.push((lease.clone(), e.now));
                        }
                        if self.dfs(mark, next, with_undo)
                            || self.dfs(mark, rec.clone(), undo.clone())
                        {
                            return true;
                        }
                    }
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idem_core::{Begin, Deadlines, Lease, Token};

    fn key() -> Key {
        Key::new("s", "k").unwrap()
    }

    fn begin() -> Op {
        Op::Begin {
            fingerprint: None,
            deadlines: Deadlines {
                lease_until: Timestamp::from_millis(100),
                expires_at: Timestamp::from_millis(1000),
            },
        }
    }

    fn lease(token: u64) -> Lease {
        Lease {
            key: key(),
            token: Token(token),
            lease_until: Timestamp::from_millis(100),
            reclaimed: false,
        }
    }

    fn ev(op: Op, invoke: u64, ret: u64, answer: Ret) -> Event {
        Event {
            op,
            now: Timestamp::from_millis(0),
            invoke,
            returned: Some((ret, answer)),
        }
    }

    fn acquired(token: u64) -> Ret {
        Ret::Begin(Begin::Acquired(lease(token)))
    }

    fn in_progress() -> Ret {
        Ret::Begin(Begin::InProgress {
            lease_until: Timestamp::from_millis(100),
        })
    }

    #[test]
    fn overlapping_begins_one_winner_is_linearizable() {
        // The second call returned first but with InProgress: the first linearizes before it.
        let h = [
            ev(begin(), 0, 5, acquired(1)),
            ev(begin(), 1, 3, in_progress()),
        ];
        assert!(check(&key(), &h).is_ok());
    }

    #[test]
    fn two_winners_are_not_linearizable() {
        let h = [
            ev(begin(), 0, 5, acquired(1)),
            ev(begin(), 1, 3, acquired(1)),
        ];
        assert!(check(&key(), &h).is_err());
    }

    #[test]
    fn real_time_order_is_respected() {
        // A begin that returned before another was invoked must come first: the later one
        // cannot be the winner while the earlier saw InProgress.
        let h = [
            ev(begin(), 0, 1, in_progress()),
            ev(begin(), 2, 3, acquired(1)),
        ];
        assert!(check(&key(), &h).is_err());
    }

    #[test]
    fn indeterminate_calls_may_or_may_not_take_effect() {
        let lost = Event {
            op: begin(),
            now: Timestamp::from_millis(0),
            invoke: 0,
            returned: None,
        };
        // It took effect: the next begin sees InProgress.
        let took = [lost.clone(), ev(begin(), 1, 2, in_progress())];
        assert!(check(&key(), &took).is_ok());
        // It did not: the next begin acquires.
        let didnt = [lost, ev(begin(), 1, 2, acquired(1))];
        assert!(check(&key(), &didnt).is_ok());
    }

    #[test]
    fn an_unanswered_claim_may_be_undone_later_but_an_answered_one_may_not() {
        let lost = Event {
            op: begin(),
            now: Timestamp::from_millis(0),
            invoke: 0,
            returned: None,
        };
        let seen = ev(begin(), 1, 2, in_progress());
        // Token 2, not a reclaim: the lost claim landed, was seen, then was released.
        let after_undo = ev(
            begin(),
            3,
            4,
            Ret::Begin(Begin::Acquired(Lease {
                token: Token(2),
                ..lease(2)
            })),
        );
        assert!(check(&key(), &[lost.clone(), seen.clone(), after_undo.clone()]).is_ok());
        let answered = ev(begin(), 0, 1, acquired(1));
        assert!(check(&key(), &[answered, seen, after_undo]).is_err());
    }

    #[test]
    fn completion_after_reclaim_is_fenced() {
        let finish = |token| Op::Finish {
            lease: lease(token),
            failed: false,
            response: b"r".to_vec(),
            expires_at: Timestamp::from_millis(1000),
        };
        let late = Event {
            op: begin(),
            now: Timestamp::from_millis(200),
            invoke: 2,
            returned: Some((
                3,
                Ret::Begin(Begin::Acquired(Lease {
                    token: Token(2),
                    reclaimed: true,
                    ..lease(2)
                })),
            )),
        };
        let ok = [
            ev(begin(), 0, 1, acquired(1)),
            late.clone(),
            ev(finish(1), 4, 5, Ret::Fenced(false)),
        ];
        assert!(check(&key(), &ok).is_ok());
        let zombie_wins = [
            ev(begin(), 0, 1, acquired(1)),
            late,
            ev(finish(1), 4, 5, Ret::Fenced(true)),
        ];
        assert!(check(&key(), &zombie_wins).is_err());
    }
}
