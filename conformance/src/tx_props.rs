//! The transactional-mode properties.

use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    Barrier, Begin, Clock, Error, Fingerprint, Key, Outcome, Response, RunError, State, Store,
    TransactionalStore, TxPolicy,
};

use crate::props::{deadlines, ensure, env, err, key, run_err, HOURS_26, LEASE, RETENTION};
use crate::{scale, verdict, TxEnd, TxFactory, TxPlan, TxProperty, Verdict};

type TxResult = Result<Response<u64, String>, RunError<String>>;

pub(crate) async fn run<F>(f: &F, p: TxProperty) -> Verdict
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    match f.create().await {
        Ok(store) if !store.guarantees().transactional => {
            return Verdict::Failed(
                "the store implements TransactionalStore but does not declare `transactional`"
                    .into(),
            )
        }
        Ok(_) => {}
        Err(e) => return Verdict::Failed(err(e)),
    }
    verdict(match p {
        TxProperty::CommitOnce => commit_once(f).await,
        TxProperty::PartialExecutionGhost => ghost(f).await,
        TxProperty::PermanentFailure => permanent_failure(f).await,
        TxProperty::ConcurrentDuplicates => concurrent_duplicates(f).await,
        TxProperty::MixedModes => mixed_modes(f).await,
    })
}

fn plan(rows: u32, end: TxEnd) -> TxPlan {
    TxPlan {
        rows,
        hold: Duration::ZERO,
        end,
    }
}

async fn tx<F>(
    f: &F,
    b: &Barrier<F::Store>,
    k: &Key,
    fp: Option<Fingerprint>,
    policy: TxPolicy,
    p: TxPlan,
) -> TxResult
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    b.transaction(k, fp, policy, f.operation(k, p)).await
}

async fn rows<F>(f: &F, store: &F::Store, k: &Key) -> Result<u64, String>
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    f.business_rows(store, k).await.map_err(err)
}

async fn commit_once<F>(f: &F) -> Result<(), String>
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f).await?;
    let k = key("tx", "commit-once")?;
    let fp = Some(Fingerprint::of_bytes(b"order=1"));
    let first = tx(
        f,
        &env.barrier,
        &k,
        fp,
        TxPolicy::Wait,
        plan(3, TxEnd::Commit),
    )
    .await
    .map_err(run_err)?;
    ensure!(
        first.outcome == Outcome::Completed(3) && !first.replayed,
        "first transaction answered {first:?}"
    );
    ensure!(
        rows(f, &env.store, &k).await? == 3,
        "business rows after commit: {}",
        rows(f, &env.store, &k).await?
    );
    env.clock.advance(HOURS_26);
    for _ in 0..3 {
        let again = tx(
            f,
            &env.barrier,
            &k,
            fp,
            TxPolicy::Wait,
            plan(3, TxEnd::Commit),
        )
        .await
        .map_err(run_err)?;
        ensure!(
            again.replayed && again.outcome == Outcome::Completed(3),
            "retry answered {again:?}"
        );
    }
    ensure!(
        rows(f, &env.store, &k).await? == 3,
        "retries wrote business rows again"
    );
    let rec = env.store.get(&k).await.map_err(err)?;
    ensure!(
        matches!(
            rec.as_ref().map(|r| &r.state),
            Some(State::Completed { .. })
        ) && rec.as_ref().and_then(|r| r.fingerprint) == fp,
        "the committed record is {rec:?}"
    );
    Ok(())
}

async fn ghost<F>(f: &F) -> Result<(), String>
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f).await?;
    let k = key("tx", "ghost")?;
    let r = tx(
        f,
        &env.barrier,
        &k,
        None,
        TxPolicy::Wait,
        plan(3, TxEnd::Retryable),
    )
    .await;
    ensure!(
        matches!(r, Err(RunError::Operation(_))),
        "a retryable failure answered {r:?}"
    );
    ensure!(
        rows(f, &env.store, &k).await? == 0,
        "a rolled-back transaction left business rows"
    );
    ensure!(
        env.store.get(&k).await.map_err(err)?.is_none(),
        "a rolled-back transaction left a claim"
    );

    // The worker dies mid-operation (a panic before commit).
    let (barrier, key2, op) = (
        env.barrier.clone(),
        k.clone(),
        f.operation(&k, plan(3, TxEnd::Panic)),
    );
    let crashed = tokio::spawn(async move {
        let _ = barrier.transaction(&key2, None, TxPolicy::Wait, op).await;
    })
    .await;
    ensure!(
        crashed.as_ref().is_err_and(|e| e.is_panic()),
        "the simulated crash did not happen: {crashed:?}"
    );
    ensure!(
        rows(f, &env.store, &k).await? == 0,
        "a crashed transaction left business rows"
    );
    let rec = env.store.get(&k).await.map_err(err)?;
    ensure!(
        rec.is_none(),
        "a crashed transaction left a record: {rec:?}"
    );

    let retry = tx(
        f,
        &env.barrier,
        &k,
        None,
        TxPolicy::NoWait,
        plan(3, TxEnd::Commit),
    )
    .await
    .map_err(run_err)?;
    ensure!(!retry.replayed, "the retry after a crash must execute");
    let again = tx(
        f,
        &env.barrier,
        &k,
        None,
        TxPolicy::Wait,
        plan(3, TxEnd::Commit),
    )
    .await
    .map_err(run_err)?;
    ensure!(again.replayed, "the second retry must replay");
    ensure!(
        rows(f, &env.store, &k).await? == 3,
        "after crash and retries: {} rows, expected 3",
        rows(f, &env.store, &k).await?
    );
    Ok(())
}

async fn permanent_failure<F>(f: &F) -> Result<(), String>
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f).await?;
    let k = key("tx", "declined")?;
    let r = tx(
        f,
        &env.barrier,
        &k,
        None,
        TxPolicy::Wait,
        plan(2, TxEnd::Permanent),
    )
    .await
    .map_err(run_err)?;
    ensure!(
        r.outcome == Outcome::Failed("declined".into()) && !r.replayed,
        "permanent failure answered {r:?}"
    );
    ensure!(
        rows(f, &env.store, &k).await? == 0,
        "a permanent failure kept its business rows"
    );
    let again = tx(
        f,
        &env.barrier,
        &k,
        None,
        TxPolicy::Wait,
        plan(2, TxEnd::Commit),
    )
    .await
    .map_err(run_err)?;
    ensure!(
        again.replayed && again.outcome == Outcome::Failed("declined".into()),
        "the retry of a permanent failure answered {again:?}"
    );
    ensure!(
        rows(f, &env.store, &k).await? == 0,
        "the retry of a permanent failure wrote rows"
    );
    Ok(())
}

async fn concurrent_duplicates<F>(f: &F) -> Result<(), String>
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    const DUPLICATES: usize = 16;
    let env = env(f).await?;
    for round in 0..(4 * scale()) {
        for policy in [TxPolicy::Wait, TxPolicy::NoWait] {
            let k = key("tx-race", &format!("{policy:?}-{round}"))?;
            let start = Arc::new(tokio::sync::Barrier::new(DUPLICATES));
            let tasks: Vec<_> = (0..DUPLICATES)
                .map(|_| {
                    let op = f.operation(
                        &k,
                        TxPlan {
                            rows: 1,
                            hold: Duration::from_millis(30),
                            end: TxEnd::Commit,
                        },
                    );
                    let (barrier, k, start) = (env.barrier.clone(), k.clone(), Arc::clone(&start));
                    tokio::spawn(async move {
                        start.wait().await;
                        barrier.transaction(&k, None, policy, op).await
                    })
                })
                .collect();
            let (mut fresh, mut replays, mut busy) = (0, 0, 0);
            for t in tasks {
                match t.await.map_err(|e| e.to_string())? {
                    Ok(r) if r.replayed => replays += 1,
                    Ok(_) => fresh += 1,
                    Err(RunError::Barrier(Error::InProgress { .. }))
                        if policy == TxPolicy::NoWait =>
                    {
                        busy += 1
                    }
                    Err(e) => return Err(format!("{policy:?}: {}", run_err(e))),
                }
            }
            let n = rows(f, &env.store, &k).await?;
            ensure!(
                fresh == 1 && n == 1,
                "{policy:?} round {round}: {DUPLICATES} concurrent duplicates: {fresh} executed, \
                 {replays} replayed, {busy} in progress, {n} business rows"
            );
            if policy == TxPolicy::Wait {
                ensure!(
                    replays == DUPLICATES - 1,
                    "Wait: every duplicate must replay ({replays} did)"
                );
            }
        }
    }
    Ok(())
}

async fn mixed_modes<F>(f: &F) -> Result<(), String>
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f).await?;
    let (a, b) = (Fingerprint::of_bytes(b"a"), Fingerprint::of_bytes(b"b"));
    let k = key("tx-mixed", "mismatch")?;
    tx(
        f,
        &env.barrier,
        &k,
        Some(a),
        TxPolicy::Wait,
        plan(1, TxEnd::Commit),
    )
    .await
    .map_err(run_err)?;
    let r = tx(
        f,
        &env.barrier,
        &k,
        Some(b),
        TxPolicy::Wait,
        plan(1, TxEnd::Commit),
    )
    .await;
    ensure!(
        matches!(r, Err(RunError::Barrier(Error::Mismatch))),
        "mismatch in a transaction answered {r:?}"
    );
    ensure!(
        rows(f, &env.store, &k).await? == 1,
        "a mismatched transaction wrote rows"
    );

    // A live lease-mode claim on the key: the transaction must not run.
    let live = key("tx-mixed", "live-lease")?;
    let now = env.clock.now();
    let lease = match env
        .store
        .begin(&live, None, deadlines(now), now)
        .await
        .map_err(err)?
    {
        Begin::Acquired(l) => l,
        other => return Err(format!("begin answered {other:?}")),
    };
    let r = tx(
        f,
        &env.barrier,
        &live,
        None,
        TxPolicy::Wait,
        plan(1, TxEnd::Commit),
    )
    .await;
    ensure!(
        matches!(r, Err(RunError::Barrier(Error::InProgress { .. }))),
        "a live lease answered {r:?}"
    );
    ensure!(
        rows(f, &env.store, &live).await? == 0,
        "the transaction ran beside a live lease"
    );

    // Once that lease expires the transaction reclaims the key, and the zombie is fenced.
    env.clock.advance(LEASE + Duration::from_secs(1));
    let r = tx(
        f,
        &env.barrier,
        &live,
        None,
        TxPolicy::Wait,
        plan(1, TxEnd::Commit),
    )
    .await
    .map_err(run_err)?;
    ensure!(
        !r.replayed,
        "the transaction did not reclaim an expired lease: {r:?}"
    );
    let late = env.clock.now();
    match env
        .store
        .complete(&lease, b"\x01\"zombie\"", late.plus(RETENTION), late)
        .await
    {
        Err(Error::LeaseLost) => {}
        other => {
            return Err(format!(
                "the zombie's complete after a transactional reclaim: {other:?}"
            ))
        }
    }
    ensure!(
        rows(f, &env.store, &live).await? == 1,
        "rows after reclaim: expected 1"
    );
    Ok(())
}
