//! Transactional mode, as thoroughly as lease mode: commit once, rollbacks leave nothing,
//! fingerprints on every path, fencing across modes, Wait and NoWait, retention.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    Barrier, Begin, Clock, Error, Fingerprint, Key, Outcome, Response, RunError, State, Store,
    TransactionalStore, TxPolicy,
};

use crate::config::{TTL_TRAP_JUMP, TX_DUPLICATES, TX_ROLLBACKS, TX_ROUNDS};
use crate::factory::{Gate, TxEnd, TxFactory, TxPlan};
use crate::kit::{
    acquire, charge, ensure, env, err, key, lease_lost, record, run_err, within, Check, Cx,
};

type TxResult = Result<Response<u64, String>, RunError<String>>;

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

pub(crate) async fn commit_once<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f, cx).await?;
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
    env.clock.advance(TTL_TRAP_JUMP);
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

pub(crate) async fn ghost<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f, cx).await?;
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

pub(crate) async fn permanent_failure<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f, cx).await?;
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

pub(crate) async fn concurrent_duplicates<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f, cx).await?;
    for round in 0..(TX_ROUNDS * cx.scale()) {
        for policy in [TxPolicy::Wait, TxPolicy::NoWait] {
            let k = key("tx-race", &format!("{policy:?}-{round}"))?;
            let start = Arc::new(tokio::sync::Barrier::new(TX_DUPLICATES));
            let tasks: Vec<_> = (0..TX_DUPLICATES)
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
                "{policy:?} round {round}: {TX_DUPLICATES} concurrent duplicates: {fresh} executed, \
                 {replays} replayed, {busy} in progress, {n} business rows"
            );
            if policy == TxPolicy::Wait {
                ensure!(
                    replays == TX_DUPLICATES - 1,
                    "Wait: every duplicate must replay ({replays} did)"
                );
            }
        }
    }
    Ok(())
}

pub(crate) async fn mixed_modes<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f, cx).await?;
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
        .begin(&live, None, cx.deadlines(now), now)
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
    env.clock.advance(cx.lease() + Duration::from_secs(1));
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
        .complete(&lease, b"\x01\"zombie\"", late.plus(cx.retention()), late)
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

fn gated(rows: u32, gate: &Gate) -> TxPlan {
    TxPlan {
        rows,
        hold: Duration::ZERO,
        end: gate.end(),
    }
}

pub(crate) async fn mismatch_every_path<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f, cx).await?;
    let b = &env.barrier;
    let (fa, fb) = (Fingerprint::of_bytes(b"a"), Fingerprint::of_bytes(b"b"));
    let mismatch = |path: &str, r: TxResult| -> Check {
        ensure!(
            matches!(r, Err(RunError::Barrier(Error::Mismatch))),
            "{path}: a transaction with another payload answered {r:?}"
        );
        Ok(())
    };
    // A fresh claim stores the fingerprint; replays of its completion check it.
    let k = key("tx-mismatch", "completed")?;
    tx(f, b, &k, Some(fa), TxPolicy::Wait, plan(1, TxEnd::Commit))
        .await
        .map_err(run_err)?;
    ensure!(
        record(&*env.store, &k).await?.fingerprint == Some(fa),
        "a transactional claim did not keep its fingerprint"
    );
    for policy in [TxPolicy::Wait, TxPolicy::NoWait] {
        mismatch(
            "completed",
            tx(f, b, &k, Some(fb), policy, plan(1, TxEnd::Commit)).await,
        )?;
    }
    for fp in [Some(fa), None] {
        let r = tx(f, b, &k, fp, TxPolicy::Wait, plan(1, TxEnd::Commit))
            .await
            .map_err(run_err)?;
        ensure!(r.replayed, "an identical retry did not replay: {r:?}");
    }
    // A permanent failure's replay.
    let k = key("tx-mismatch", "failed")?;
    tx(
        f,
        b,
        &k,
        Some(fa),
        TxPolicy::Wait,
        plan(1, TxEnd::Permanent),
    )
    .await
    .map_err(run_err)?;
    mismatch(
        "failed",
        tx(f, b, &k, Some(fb), TxPolicy::Wait, plan(1, TxEnd::Commit)).await,
    )?;
    // A live lease-mode claim: mismatch comes before "in progress".
    let k = key("tx-mismatch", "live-lease")?;
    let now = env.clock.now();
    acquire(&*env.store, &k, Some(&fa), now, cx).await?;
    for policy in [TxPolicy::Wait, TxPolicy::NoWait] {
        mismatch(
            "live lease",
            tx(f, b, &k, Some(fb), policy, plan(1, TxEnd::Commit)).await,
        )?;
    }
    // An expired lease-mode claim: no reclaim for another payload, and nothing changes.
    let before = record(&*env.store, &k).await?;
    env.clock.advance(cx.lease());
    mismatch(
        "reclaim",
        tx(f, b, &k, Some(fb), TxPolicy::Wait, plan(1, TxEnd::Commit)).await,
    )?;
    ensure!(
        record(&*env.store, &k).await? == before,
        "a mismatched transactional reclaim changed the record"
    );
    let r = tx(f, b, &k, Some(fa), TxPolicy::Wait, plan(1, TxEnd::Commit))
        .await
        .map_err(run_err)?;
    ensure!(!r.replayed, "the matching reclaim did not execute: {r:?}");
    // A transaction still open: a Wait duplicate with another payload waits, then mismatches.
    let k = key("tx-mismatch", "open")?;
    let gate = Gate::new();
    let (b1, k1, op) = (b.clone(), k.clone(), f.operation(&k, gated(1, &gate)));
    let holder =
        tokio::spawn(async move { b1.transaction(&k1, Some(fa), TxPolicy::Wait, op).await });
    within(cx, "the holder reaching its gate", gate.entered(1)).await?;
    let (b2, k2, op) = (
        b.clone(),
        k.clone(),
        f.operation(&k, plan(1, TxEnd::Commit)),
    );
    let waiter =
        tokio::spawn(async move { b2.transaction(&k2, Some(fb), TxPolicy::Wait, op).await });
    let no_wait = within(
        cx,
        "a NoWait duplicate",
        tx(f, b, &k, Some(fb), TxPolicy::NoWait, plan(1, TxEnd::Commit)),
    )
    .await?;
    ensure!(
        matches!(
            no_wait,
            Err(RunError::Barrier(
                Error::InProgress { .. } | Error::Mismatch
            ))
        ),
        "NoWait with another payload beside an open transaction answered {no_wait:?}"
    );
    gate.open(TxEnd::Commit);
    within(cx, "the holder", holder)
        .await?
        .map_err(|e| e.to_string())?
        .map_err(run_err)?;
    let waited = within(cx, "the waiting duplicate", waiter)
        .await?
        .map_err(|e| e.to_string())?;
    mismatch("after waiting for an open transaction", waited)?;
    ensure!(
        rows(f, &env.store, &k).await? == 1,
        "mismatched duplicates wrote rows"
    );
    Ok(())
}

pub(crate) async fn reclaim_fencing<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f, cx).await?;
    let s = &*env.store;
    let k = key("tx-fencing", "expired")?;
    let zombie = acquire(s, &k, None, env.clock.now(), cx).await?;
    env.clock.advance(cx.lease() + Duration::from_millis(1));
    let r = tx(
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
        !r.replayed,
        "the transaction did not reclaim the expired lease: {r:?}"
    );
    let rec = record(s, &k).await?;
    ensure!(
        rec.token > zombie.token && matches!(rec.state, State::Completed { .. }),
        "after a transactional reclaim the record is {rec:?} (the zombie held {:?})",
        zombie.token
    );
    let now = env.clock.now();
    let resp = b"\x01\"zombie\"";
    lease_lost(
        "the zombie's complete",
        s.complete(&zombie, resp, cx.expiry(now), now).await,
    )?;
    lease_lost(
        "the zombie's fail",
        s.fail(&zombie, resp, cx.expiry(now), now).await,
    )?;
    lease_lost(
        "the zombie's extend",
        s.extend(&zombie, cx.deadlines(now), now).await,
    )?;
    lease_lost("the zombie's release", s.release(&zombie, now).await)?;
    ensure!(
        record(s, &k).await? == rec,
        "the zombie's writes changed the record"
    );
    ensure!(
        rows(f, s, &k).await? == 2,
        "rows after the reclaim: expected 2"
    );

    // A released lease-mode claim: the transaction acquires with a new token.
    let k = key("tx-fencing", "released")?;
    let l = acquire(s, &k, None, now, cx).await?;
    s.release(&l, now).await.map_err(err)?;
    tx(
        f,
        &env.barrier,
        &k,
        None,
        TxPolicy::NoWait,
        plan(1, TxEnd::Commit),
    )
    .await
    .map_err(run_err)?;
    ensure!(
        record(s, &k).await?.token > l.token,
        "a transaction after a release reused the token"
    );
    lease_lost(
        "complete after release",
        s.complete(&l, resp, cx.expiry(now), now).await,
    )?;

    // A rolled-back transaction, then lease mode: the lease-mode outcome is the key's one.
    let k = key("tx-fencing", "after-rollback")?;
    let r = tx(
        f,
        &env.barrier,
        &k,
        None,
        TxPolicy::Wait,
        plan(1, TxEnd::Retryable),
    )
    .await;
    ensure!(
        matches!(r, Err(RunError::Operation(_))),
        "a retryable failure answered {r:?}"
    );
    let executions = AtomicU32::new(0);
    charge(&env.barrier, &k, None, &executions, Duration::ZERO)
        .await
        .map_err(run_err)?;
    let r = tx(
        f,
        &env.barrier,
        &k,
        None,
        TxPolicy::Wait,
        plan(1, TxEnd::Commit),
    )
    .await
    .map_err(run_err)?;
    ensure!(
        r.replayed && r.outcome == Outcome::Completed(100) && rows(f, s, &k).await? == 0,
        "a transaction after a lease-mode completion answered {r:?}"
    );
    Ok(())
}

pub(crate) async fn interleaving<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f, cx).await?;
    for round in 0..(TX_ROUNDS * cx.scale()) {
        let k = key("tx-interleaving", &format!("k{round}"))?;
        let executions = Arc::new(AtomicU32::new(0));
        let start = Arc::new(tokio::sync::Barrier::new(TX_DUPLICATES));
        let tasks: Vec<_> = (0..TX_DUPLICATES)
            .map(|i| {
                let (b, k, ex, start) = (
                    env.barrier.clone(),
                    k.clone(),
                    Arc::clone(&executions),
                    Arc::clone(&start),
                );
                let policy = if i % 4 < 2 {
                    TxPolicy::Wait
                } else {
                    TxPolicy::NoWait
                };
                let op = f.operation(
                    &k,
                    TxPlan {
                        rows: 1,
                        hold: Duration::from_millis(5),
                        end: TxEnd::Commit,
                    },
                );
                tokio::spawn(async move {
                    start.wait().await;
                    if i % 2 == 0 {
                        charge(&b, &k, None, &ex, Duration::from_millis(5)).await
                    } else {
                        b.transaction(&k, None, policy, op).await
                    }
                })
            })
            .collect();
        let (mut fresh, mut replays, mut busy) = (0, 0, 0);
        for t in tasks {
            match within(cx, "an interleaved call", t)
                .await?
                .map_err(|e| e.to_string())?
            {
                Ok(r) if r.replayed => replays += 1,
                Ok(_) => fresh += 1,
                Err(RunError::Barrier(Error::InProgress { .. })) => busy += 1,
                Err(e) => return Err(format!("round {round}: {}", run_err(e))),
            }
        }
        let (ran, n) = (
            executions.load(Ordering::SeqCst),
            rows(f, &env.store, &k).await?,
        );
        ensure!(
            fresh == 1 && u64::from(ran) + n == 1,
            "round {round}: lease-mode and transactional duplicates: {fresh} fresh outcomes, \
             {replays} replays, {busy} in progress; {ran} lease-mode executions and {n} \
             transactional rows (exactly one effect expected)"
        );
    }
    Ok(())
}

pub(crate) async fn wait_and_no_wait<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = env(f, cx).await?;
    // Wait, through several attempts that roll back: the attempts run one at a time, no
    // duplicate gives up, and exactly one commits.
    let k = key("tx-wait", "rollbacks")?;
    let gate = Gate::new();
    let mut tasks = Vec::new();
    for i in 0..TX_DUPLICATES {
        let (b, k2, op) = (
            env.barrier.clone(),
            k.clone(),
            f.operation(&k, gated(1, &gate)),
        );
        tasks.push(tokio::spawn(async move {
            b.transaction(&k2, None, TxPolicy::Wait, op).await
        }));
        if i == 0 {
            within(cx, "the first attempt reaching its gate", gate.entered(1)).await?;
        }
    }
    for attempt in 1..=TX_ROLLBACKS {
        gate.open(TxEnd::Retryable);
        within(
            cx,
            "the next waiting duplicate taking over after a rollback",
            gate.entered(attempt + 1),
        )
        .await?;
    }
    gate.open(TxEnd::Commit);
    let (mut fresh, mut replays, mut rolled_back, mut other) = (0, 0, 0, Vec::new());
    for t in tasks {
        match within(cx, "a waiting duplicate", t)
            .await?
            .map_err(|e| e.to_string())?
        {
            Ok(r) if r.replayed => replays += 1,
            Ok(_) => fresh += 1,
            Err(RunError::Operation(_)) => rolled_back += 1,
            Err(e) => other.push(run_err(e)),
        }
    }
    ensure!(
        gate.most_inside() == 1,
        "{} attempts ran inside the same key at once",
        gate.most_inside()
    );
    ensure!(
        fresh == 1 && rolled_back == TX_ROLLBACKS as usize && other.is_empty(),
        "Wait through {TX_ROLLBACKS} rollbacks: {fresh} committed, {rolled_back} rolled back, \
         {replays} replayed, others: {other:?}"
    );
    ensure!(
        gate.total_entered() == TX_ROLLBACKS + 1,
        "{} attempts executed, expected {}",
        gate.total_entered(),
        TX_ROLLBACKS + 1
    );
    ensure!(
        rows(f, &env.store, &k).await? == 1,
        "Wait: rows after the rollbacks: expected 1"
    );

    // NoWait beside an open transaction answers at once: the holder stays at its gate until
    // every NoWait duplicate has answered, so one that waited would never answer.
    let k = key("tx-wait", "no-wait")?;
    let gate = Gate::new();
    let (b, k2, op) = (
        env.barrier.clone(),
        k.clone(),
        f.operation(&k, gated(1, &gate)),
    );
    let holder = tokio::spawn(async move { b.transaction(&k2, None, TxPolicy::NoWait, op).await });
    within(cx, "the holder reaching its gate", gate.entered(1)).await?;
    for i in 0..3 {
        let r = within(
            cx,
            "a NoWait duplicate beside an open transaction (NoWait must not wait)",
            tx(
                f,
                &env.barrier,
                &k,
                None,
                TxPolicy::NoWait,
                plan(1, TxEnd::Commit),
            ),
        )
        .await?;
        ensure!(
            matches!(r, Err(RunError::Barrier(Error::InProgress { .. }))),
            "NoWait duplicate {i} beside an open transaction answered {r:?}"
        );
    }
    gate.open(TxEnd::Commit);
    within(cx, "the holder", holder)
        .await?
        .map_err(|e| e.to_string())?
        .map_err(run_err)?;
    let r = tx(
        f,
        &env.barrier,
        &k,
        None,
        TxPolicy::NoWait,
        plan(1, TxEnd::Commit),
    )
    .await
    .map_err(run_err)?;
    ensure!(r.replayed, "NoWait after the commit answered {r:?}");
    ensure!(
        rows(f, &env.store, &k).await? == 1,
        "NoWait: rows: expected 1"
    );
    Ok(())
}

pub(crate) async fn retention<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    for end in [TxEnd::Commit, TxEnd::Permanent] {
        let env = env(f, cx).await?;
        let k = key("tx-retention", &format!("{end:?}"))?;
        let at = env.clock.now();
        tx(f, &env.barrier, &k, None, TxPolicy::Wait, plan(1, end))
            .await
            .map_err(run_err)?;
        let expires = cx.expiry(at);
        let rec = record(&*env.store, &k).await?;
        ensure!(
            rec.expires_at == expires,
            "a transactional {end:?} at {at} with retention {:?} expires at {}, not {expires}",
            cx.retention(),
            rec.expires_at
        );
        let early = idem_core::Timestamp::from_millis(expires.as_millis() - 1);
        ensure!(
            env.store.purge(early, 100).await.map_err(err)? == 0,
            "purge before a transactional outcome's expires_at deleted it"
        );
        env.clock.set(early);
        let r = tx(
            f,
            &env.barrier,
            &k,
            None,
            TxPolicy::Wait,
            plan(1, TxEnd::Commit),
        )
        .await
        .map_err(run_err)?;
        ensure!(
            r.replayed,
            "a transactional outcome inside its retention did not replay: {r:?}"
        );
        // Past retention but not purged: still replays.
        env.clock.set(expires.plus(TTL_TRAP_JUMP));
        let r = tx(
            f,
            &env.barrier,
            &k,
            None,
            TxPolicy::Wait,
            plan(1, TxEnd::Commit),
        )
        .await
        .map_err(run_err)?;
        ensure!(
            r.replayed,
            "a transactional outcome past retention, not purged, answered {r:?}"
        );
        ensure!(
            env.store.purge(expires, 100).await.map_err(err)? == 1,
            "purge at a transactional outcome's expires_at did not delete it"
        );
        let r = tx(
            f,
            &env.barrier,
            &k,
            None,
            TxPolicy::Wait,
            plan(1, TxEnd::Commit),
        )
        .await
        .map_err(run_err)?;
        ensure!(!r.replayed, "a purged transactional key replayed {r:?}");
        let want = if end == TxEnd::Commit { 2 } else { 1 };
        ensure!(
            rows(f, &env.store, &k).await? == want,
            "rows after purge and re-execution: expected {want}"
        );
    }
    Ok(())
}
