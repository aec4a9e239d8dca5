//! Crash points: a failure injected at every step of an operation (before the claim, after
//! it, inside the work, between the work and the outcome, at the outcome or commit), and
//! the caller's future dropped at every await point. Afterwards nothing is partial, and
//! retries reach the one correct final state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::backend::codec;
use idem_core::{
    Barrier, Error, Failure, Key, Outcome, RunError, State, Store, TransactionalStore, TxPolicy,
};

use crate::config::MAX_DROP_POLLS;
use crate::factory::{Gate, StoreFactory, TxEnd, TxFactory, TxPlan};
use crate::kit::{
    ensure, env, err, key, poll_then_drop, run_err, within, Check, Cx, Env, Fault, Faulty,
};

/// A downstream service that deduplicates on the derived key it is handed, as the
/// layer-mismatch defence asks: it counts attempts and effects per key.
#[derive(Default)]
struct Downstream {
    effects: Mutex<HashMap<Key, u32>>,
}

impl Downstream {
    fn apply(&self, derived: Key) {
        *self
            .effects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(derived)
            .or_default() += 1;
    }

    fn effects(&self, k: &Key) -> u32 {
        self.effects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&k.derive("charge"))
            .copied()
            .unwrap_or(0)
    }
}

/// What the operation of the lease-mode crash scenarios returns.
const VALUE: u64 = 7;

/// How the operation behaves in one scenario.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Work {
    Succeed,
    PanicAfterEffect,
    Retryable,
}

async fn run<S: Store + 'static>(
    barrier: &Barrier<S>,
    k: &Key,
    down: &Arc<Downstream>,
    work: Work,
) -> Result<idem_core::Response<u64, String>, RunError<String>> {
    let down = Arc::clone(down);
    barrier
        .execute(k, None, move |lease| async move {
            // Every attempt hands the downstream the same derived key, so it can apply
            // the effect once however often the work runs.
            down.apply(lease.derive("charge"));
            tokio::task::yield_now().await;
            match work {
                Work::Succeed => Ok(VALUE),
                Work::PanicAfterEffect => panic!("idem-conformance: simulated crash in the work"),
                Work::Retryable => Err(Failure::Retryable("network".to_string())),
            }
        })
        .await
}

/// Retries `k` until it has an outcome (advancing past leases a crash left behind) and
/// checks the final state: completed with [`VALUE`], one effect downstream.
async fn settle<S: Store + 'static>(
    env: &Env<Faulty<S>>,
    k: &Key,
    down: &Arc<Downstream>,
    cx: &Cx,
    what: &str,
) -> Check {
    for _ in 0..4 {
        match within(cx, what, run(&env.barrier, k, down, Work::Succeed)).await? {
            Ok(r) => {
                ensure!(
                    r.outcome == Outcome::Completed(VALUE),
                    "{what}: the retry answered {r:?}"
                );
                let again = run(&env.barrier, k, down, Work::Succeed)
                    .await
                    .map_err(run_err)?;
                ensure!(again.replayed, "{what}: the key did not settle: {again:?}");
                let rec = env.store.inner.get(k).await.map_err(err)?;
                let want = codec::encode(&VALUE).map_err(err)?;
                ensure!(
                    matches!(rec.as_ref().map(|r| &r.state), Some(State::Completed { response }) if *response == want),
                    "{what}: the final record is {rec:?}"
                );
                ensure!(
                    down.effects(k) >= 1,
                    "{what}: completed without the work ever running"
                );
                return Ok(());
            }
            Err(RunError::Barrier(Error::InProgress { .. })) => {
                // A claim the crash left behind: only its lease can free it.
                env.clock.advance(cx.lease() + Duration::from_millis(1));
            }
            Err(RunError::Barrier(Error::LeaseLost)) => {}
            Err(e) => return Err(format!("{what}: the retry failed: {}", run_err(e))),
        }
    }
    Err(format!("{what}: no retry reached an outcome"))
}

/// The record after a crash: none, a claim, or exactly the outcome an attempt wrote.
async fn nothing_partial<S: Store>(store: &S, k: &Key, what: &str) -> Check {
    let want = codec::encode(&VALUE).map_err(err)?;
    match store.get(k).await.map_err(err)? {
        None
        | Some(idem_core::Record {
            state: State::InProgress { .. },
            ..
        }) => Ok(()),
        Some(idem_core::Record {
            state: State::Completed { response },
            ..
        }) if response == want => Ok(()),
        other => Err(format!(
            "{what}: the crash left a record no complete call wrote: {other:?}"
        )),
    }
}

pub(crate) async fn crash_points<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let base = env(f, cx).await?;
    let faulty = Arc::new(Faulty::new(Arc::clone(&base.store)));
    let env = Env::over(faulty, cx);
    env.clock.set(base.now());
    let down = Arc::new(Downstream::default());
    // (what, store call to fault: 0 = begin, 1 = complete/release, the work, how many times
    // the work may run in all: a retry re-runs it only when no outcome was stored)
    let scenarios = [
        (
            "fault before the claim",
            Some((0, Fault::Before)),
            Work::Succeed,
            1,
        ),
        (
            "the claim's reply lost",
            Some((0, Fault::ReplyLost)),
            Work::Succeed,
            1,
        ),
        (
            "crash inside the work, after its effect",
            None,
            Work::PanicAfterEffect,
            2,
        ),
        (
            "fault between the work and the outcome write",
            Some((1, Fault::Before)),
            Work::Succeed,
            2,
        ),
        (
            "the outcome write's reply lost",
            Some((1, Fault::ReplyLost)),
            Work::Succeed,
            1,
        ),
        (
            "a retryable failure whose release is lost",
            Some((1, Fault::Before)),
            Work::Retryable,
            2,
        ),
    ];
    for (n, (what, fault, work, runs)) in scenarios.into_iter().enumerate() {
        let k = key("crash", &format!("point-{n}"))?;
        if let Some((call, fault)) = fault {
            env.store.arm(call, fault);
        }
        let first = if work == Work::PanicAfterEffect {
            let (b, k2, d) = (env.barrier.clone(), k.clone(), Arc::clone(&down));
            let crashed = tokio::spawn(async move { run(&b, &k2, &d, work).await }).await;
            ensure!(
                crashed.as_ref().is_err_and(|e| e.is_panic()),
                "{what}: the simulated crash did not happen: {crashed:?}"
            );
            None
        } else {
            Some(within(cx, what, run(&env.barrier, &k, &down, work)).await?)
        };
        if let Some(Ok(r)) = &first {
            return Err(format!("{what}: the faulted call answered {r:?}"));
        }
        nothing_partial(&*env.store.inner, &k, what).await?;
        settle(&env, &k, &down, cx, what).await?;
        ensure!(
            down.effects(&k) == runs,
            "{what}: the work ran {} times, expected {runs}",
            down.effects(&k)
        );
    }
    // The caller's future dropped at every await point of `execute`.
    for polls in 1..=MAX_DROP_POLLS {
        let k = key("crash", &format!("dropped-{polls}"))?;
        let done = poll_then_drop(run(&env.barrier, &k, &down, Work::Succeed), polls).await;
        let what = format!("execute dropped after {polls} polls");
        nothing_partial(&*env.store.inner, &k, &what).await?;
        settle(&env, &k, &down, cx, &what).await?;
        if done.is_some() {
            break;
        }
    }
    Ok(())
}

/// Retries a transactional key with `Wait` until it has an outcome and checks the final
/// state: completed, `rows` business rows exactly, replayed from then on.
async fn tx_settle<F>(
    f: &F,
    env: &Env<Faulty<F::Store>>,
    k: &Key,
    rows: u32,
    cx: &Cx,
    what: &str,
) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let plan = TxPlan {
        rows,
        hold: Duration::ZERO,
        end: TxEnd::Commit,
    };
    let mut answered = None;
    for _ in 0..4 {
        let r = within(
            cx,
            what,
            env.barrier
                .transaction(k, None, TxPolicy::Wait, f.operation(k, plan)),
        )
        .await?;
        match r {
            Ok(r) => {
                answered = Some(r);
                break;
            }
            Err(RunError::Barrier(e)) if e.is_retryable() => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(format!("{what}: the retry failed: {}", run_err(e))),
        }
    }
    let first = answered.ok_or_else(|| format!("{what}: no retry reached an outcome"))?;
    ensure!(
        first.outcome == Outcome::Completed(u64::from(rows)),
        "{what}: the retry answered {first:?}"
    );
    let again = env
        .barrier
        .transaction(k, None, TxPolicy::Wait, f.operation(k, plan))
        .await
        .map_err(run_err)?;
    ensure!(again.replayed, "{what}: the key did not settle: {again:?}");
    let n = f.business_rows(&env.store.inner, k).await.map_err(err)?;
    ensure!(
        n == u64::from(rows),
        "{what}: {n} business rows after the retries, expected {rows}: an attempt left rows \
         without its outcome, or ran twice"
    );
    Ok(())
}

pub(crate) async fn tx_crash_points<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let base = env(f, cx).await?;
    let env = Env::over(Arc::new(Faulty::new(Arc::clone(&base.store))), cx);
    let rows = 3;
    let plan = |end| TxPlan {
        rows,
        hold: Duration::ZERO,
        end,
    };
    // Faults around the whole transaction.
    for (n, (what, fault)) in [
        ("fault before the transaction", Fault::Before),
        ("the commit's reply lost", Fault::ReplyLost),
    ]
    .into_iter()
    .enumerate()
    {
        let k = key("tx-crash", &format!("fault-{n}"))?;
        env.store.arm(0, fault);
        let r = env
            .barrier
            .transaction(
                &k,
                None,
                TxPolicy::Wait,
                f.operation(&k, plan(TxEnd::Commit)),
            )
            .await;
        ensure!(r.is_err(), "{what}: the faulted call answered {r:?}");
        tx_settle(f, &env, &k, rows, cx, what).await?;
    }
    // Crashes inside the operation: before any write, and after the writes.
    for (n, written) in [0, rows].into_iter().enumerate() {
        let what = format!("crash in the work after {written} rows");
        let k = key("tx-crash", &format!("panic-{n}"))?;
        let (b, k2, op) = (
            env.barrier.clone(),
            k.clone(),
            f.operation(
                &k,
                TxPlan {
                    rows: written,
                    ..plan(TxEnd::Panic)
                },
            ),
        );
        let crashed = tokio::spawn(async move {
            b.transaction(&k2, None, TxPolicy::Wait, op)
                .await
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        })
        .await;
        ensure!(
            !matches!(crashed, Ok(Ok(()))),
            "{what}: a panicking body answered an outcome"
        );
        let left = f.business_rows(&env.store.inner, &k).await.map_err(err)?;
        let rec = env.store.inner.get(&k).await.map_err(err)?;
        ensure!(
            left == 0 && rec.is_none(),
            "{what}: the crash left {left} rows and the record {rec:?}"
        );
        tx_settle(f, &env, &k, rows, cx, &what).await?;
    }
    // The caller gone while the work is inside the transaction, between its writes and the
    // outcome: the store commits all of it or none of it.
    let k = key("tx-crash", "abandoned")?;
    let gate = Gate::new();
    let (b, k2, op) = (
        env.barrier.clone(),
        k.clone(),
        f.operation(&k, plan(gate.end())),
    );
    let task = tokio::spawn(async move { b.transaction(&k2, None, TxPolicy::Wait, op).await });
    within(cx, "the operation reaching its gate", gate.entered(1)).await?;
    task.abort();
    gate.open(TxEnd::Commit);
    let _ = task.await;
    tx_settle(
        f,
        &env,
        &k,
        rows,
        cx,
        "a transaction abandoned inside its work",
    )
    .await?;
    // The caller's future dropped at every await point of `transaction`.
    for polls in 1..=MAX_DROP_POLLS {
        let k = key("tx-crash", &format!("dropped-{polls}"))?;
        let fut = env.barrier.transaction(
            &k,
            None,
            TxPolicy::Wait,
            f.operation(&k, plan(TxEnd::Commit)),
        );
        let done = poll_then_drop(fut, polls).await;
        tx_settle(
            f,
            &env,
            &k,
            rows,
            cx,
            &format!("transaction dropped after {polls} polls"),
        )
        .await?;
        if done.is_some() {
            break;
        }
    }
    Ok(())
}
