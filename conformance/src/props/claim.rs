//! Claiming and finishing: atomic claims, fencing, release, fingerprints, and the
//! concurrent-check and layer-mismatch failure modes.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_core::backend::codec;
use idem_core::{
    Begin, Clock, Error, Failure, Fingerprint, Key, Lease, RunError, State, Store, Timestamp, Token,
};

use crate::config::RACE_BEGINS;
use crate::factory::StoreFactory;
use crate::kit::{
    acquire, at_once, begin, charge, ensure, env, err, fenced, key, lease_lost, run_err, Charge,
    Check, Cx,
};

/// `RACE_BEGINS` simultaneous `begin`s on `k` at `now`: exactly one acquires (with a token
/// above `above`), every other one answers `InProgress`.
async fn one_winner<S: Store + 'static>(
    store: &Arc<S>,
    k: &Key,
    now: Timestamp,
    above: Token,
    cx: &Cx,
    what: &str,
) -> Check {
    let tasks = at_once((0..RACE_BEGINS).map(|_| {
        let (store, k, d) = (Arc::clone(store), k.clone(), cx.deadlines(now));
        async move { store.begin(&k, None, d, now).await }
    }));
    let (mut acquired, mut in_progress, mut errors) = (Vec::new(), 0, Vec::new());
    for t in tasks {
        match t.await.map_err(|e| e.to_string())? {
            Ok(Begin::Acquired(l)) => acquired.push(l),
            Ok(Begin::InProgress { .. }) => in_progress += 1,
            Ok(other) => return Err(format!("{what}: a begin answered {other:?}")),
            Err(e) => errors.push(err(e)),
        }
    }
    ensure!(
        acquired.len() <= 1,
        "{what}: {} of {RACE_BEGINS} simultaneous begins acquired the same key, e.g. {:?} and {:?}",
        acquired.len(),
        acquired[0],
        acquired[1]
    );
    ensure!(
        errors.is_empty() && acquired.len() == 1 && in_progress == RACE_BEGINS - 1,
        "{what}: {} acquired, {in_progress} in progress, {} errors: {:?}",
        acquired.len(),
        errors.len(),
        errors.first()
    );
    ensure!(
        acquired[0].token > above,
        "{what}: the winner's token {:?} is not above {above:?}",
        acquired[0].token
    );
    Ok(())
}

pub(crate) async fn race<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
    for round in 0..(4 * cx.scale()) {
        let t0 = env.clock.now();
        let fresh = key("race", &format!("fresh-{round}"))?;
        one_winner(&env.store, &fresh, t0, Token(0), cx, "fresh key").await?;

        // An expired lease: hundreds of reclaims, one winner.
        let expired = key("race", &format!("expired-{round}"))?;
        let old = acquire(&*env.store, &expired, None, t0, cx).await?;
        let later = t0.plus(cx.lease());
        one_winner(&env.store, &expired, later, old.token, cx, "expired lease").await?;

        // A released lease: the same.
        let released = key("race", &format!("released-{round}"))?;
        let old = acquire(&*env.store, &released, None, t0, cx).await?;
        env.store.release(&old, t0).await.map_err(err)?;
        one_winner(&env.store, &released, t0, old.token, cx, "released lease").await?;
    }
    Ok(())
}

pub(crate) async fn concurrent_check_race<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    const DUPLICATES: usize = 64;
    let env = env(f, cx).await?;
    for round in 0..(4 * cx.scale()) {
        let k = key("payments", &format!("double-tap-{round}"))?;
        let executions = Arc::new(AtomicU32::new(0));
        let tasks = at_once((0..DUPLICATES).map(|_| {
            let (barrier, k, ex) = (env.barrier.clone(), k.clone(), Arc::clone(&executions));
            async move { charge(&barrier, &k, None, &ex, Duration::from_millis(20)).await }
        }));
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

pub(crate) async fn layer_mismatch<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
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
    env.clock.advance(cx.lease() + Duration::from_secs(1));
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
    let ids = published.lock().unwrap_or_else(|p| p.into_inner()).clone();
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

pub(crate) async fn fencing<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
    let s = &*env.store;
    let k = key("fencing", "k")?;
    let t0 = env.clock.now();
    let zombie = acquire(s, &k, None, t0, cx).await?;
    let t1 = t0.plus(cx.lease() + Duration::from_millis(1));
    let successor = acquire(s, &k, None, t1, cx).await?;
    ensure!(
        successor.reclaimed && successor.token > zombie.token,
        "reclaim must raise the token and be marked: {successor:?} after {zombie:?}"
    );
    let before = s.get(&k).await.map_err(err)?;
    let resp = codec::encode(&"zombie").map_err(err)?;
    fenced(s, &zombie, &resp, t1, cx, "zombie").await?;
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
    s.complete(&successor, &ok, t1.plus(cx.retention()), t1)
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
    match begin(s, &k, None, t1, cx).await? {
        Begin::Completed { response } if response == ok => Ok(()),
        other => Err(format!(
            "after fencing, the successor's outcome must replay; got {other:?}"
        )),
    }
}

pub(crate) async fn reclaim_race<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
    for round in 0..(100 * cx.scale()) {
        let k = key("reclaim-race", &format!("k{round}"))?;
        let t0 = env.clock.now();
        let old = acquire(&*env.store, &k, None, t0, cx).await?;
        let t1 = t0.plus(cx.lease() + Duration::from_millis(1));
        let resp = codec::encode(&round).map_err(err)?;
        let (store_a, store_b) = (Arc::clone(&env.store), Arc::clone(&env.store));
        let (old2, resp2, k2) = (old.clone(), resp.clone(), k.clone());
        // Both calls start together; the completion is staggered by a few scheduler turns
        // from round to round, so it lands before, inside and after the reclaim's window.
        let start = Arc::new(tokio::sync::Barrier::new(2));
        let (start_a, start_b) = (Arc::clone(&start), start);
        let expires = t1.plus(cx.retention());
        let finish = tokio::spawn(async move {
            start_a.wait().await;
            for _ in 0..round % 4 {
                tokio::task::yield_now().await;
            }
            store_a.complete(&old2, &resp2, expires, t1).await
        });
        let d = cx.deadlines(t1);
        let reclaim = tokio::spawn(async move {
            start_b.wait().await;
            store_b.begin(&k2, None, d, t1).await
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

pub(crate) async fn mismatch_every_path<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
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
    acquire(s, &in_flight, Some(&a), now, cx).await?;
    expect_mismatch("in flight", begin(s, &in_flight, Some(&b), now, cx).await?)?;

    let completed = key("mismatch", "completed")?;
    let l = acquire(s, &completed, Some(&a), now, cx).await?;
    s.complete(&l, &resp, now.plus(cx.retention()), now)
        .await
        .map_err(err)?;
    expect_mismatch("completed", begin(s, &completed, Some(&b), now, cx).await?)?;
    let same = begin(s, &completed, Some(&a), now, cx).await?;
    ensure!(
        same == Begin::Completed {
            response: resp.clone()
        },
        "an identical retry after completion must replay, got {same:?}"
    );
    let bare = begin(s, &completed, None, now, cx).await?;
    ensure!(
        matches!(bare, Begin::Completed { .. }),
        "a retry without fingerprint must replay, got {bare:?}"
    );

    let failed = key("mismatch", "failed")?;
    let l = acquire(s, &failed, Some(&a), now, cx).await?;
    s.fail(&l, &resp, now.plus(cx.retention()), now)
        .await
        .map_err(err)?;
    expect_mismatch("failed", begin(s, &failed, Some(&b), now, cx).await?)?;

    let stale = key("mismatch", "reclaim")?;
    acquire(s, &stale, Some(&a), now, cx).await?;
    let later = now.plus(cx.lease() + Duration::from_secs(1));
    let before = s.get(&stale).await.map_err(err)?;
    expect_mismatch("reclaim", begin(s, &stale, Some(&b), later, cx).await?)?;
    ensure!(
        s.get(&stale).await.map_err(err)? == before,
        "a mismatched reclaim attempt changed the record"
    );
    // A reclaim without a fingerprint keeps the stored one, which still guards the key.
    acquire(s, &stale, None, later, cx).await?;
    let after = later.plus(cx.lease());
    expect_mismatch(
        "after a reclaim without fingerprint",
        begin(s, &stale, Some(&b), after, cx).await?,
    )?;

    let released = key("mismatch", "released")?;
    let l = acquire(s, &released, Some(&a), now, cx).await?;
    s.release(&l, now).await.map_err(err)?;
    expect_mismatch("released", begin(s, &released, Some(&b), now, cx).await?)?;

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

pub(crate) async fn release<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
    let s = &*env.store;
    let k = key("release", "k")?;
    let now = env.clock.now();
    let mut last = Token(0);
    for cycle in 0..5 {
        let l = acquire(s, &k, None, now, cx).await?;
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
            s.extend(&l, cx.deadlines(now), now).await,
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
