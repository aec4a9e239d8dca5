//! Purge: exact counts and batches, judged by the final state's `expires_at`, and atomic
//! with every operation it can race.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idem_core::backend::codec;
use idem_core::{Begin, Clock, Deadlines, Error, State, Store, Timestamp, Token};

use crate::config::RACE_ROUNDS;
use crate::factory::StoreFactory;
use crate::kit::{acquire, acquire_with, ensure, env, err, key, record, Check, Cx};

pub(crate) async fn purge<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
    let s = &*env.store;
    let t = env.clock.now();
    let hour = Duration::from_secs(3600);
    let resp = codec::encode(&1).map_err(err)?;
    let done = key("purge", "completed")?;
    let l = acquire(s, &done, None, t, cx).await?;
    s.complete(&l, &resp, t.plus(hour), t).await.map_err(err)?;
    let failed = key("purge", "failed")?;
    let l = acquire(s, &failed, None, t, cx).await?;
    s.fail(&l, &resp, t.plus(hour * 2), t).await.map_err(err)?;
    let running = key("purge", "in-progress")?;
    let d = Deadlines {
        lease_until: t.plus(cx.lease()),
        expires_at: t.plus(cx.lease() + hour * 3),
    };
    acquire_with(s, &running, None, d, t).await?;

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
    let again = acquire(s, &done, None, t.plus(hour), cx).await?;
    ensure!(
        again.token == Token(1),
        "a purged key restarted at {:?}",
        again.token
    );

    // Batches: five expired records go two at a time.
    for i in 0..5 {
        let k = key("purge-batch", &format!("k{i}"))?;
        let l = acquire(s, &k, None, t, cx).await?;
        s.complete(&l, &resp, t, t).await.map_err(err)?;
    }
    let late = t.plus(hour * 24 * 40 + cx.lease() + cx.retention());
    let mut batches = Vec::new();
    loop {
        let n = s.purge(late, 2).await.map_err(err)?;
        batches.push(n);
        if n == 0 || batches.len() > 10 {
            break;
        }
    }
    // Everything left is expired by now (the in-progress records' retention included).
    let total: u64 = batches.iter().sum();
    ensure!(
        batches.iter().all(|&n| n <= 2) && total == 8,
        "purge in batches of 2 deleted {batches:?} (expected 8 records in batches of at most 2)"
    );
    ensure!(
        s.stats().await.map_err(err)?.total() == 0,
        "records remain after purging everything"
    );
    Ok(())
}

pub(crate) async fn purge_final_state<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let resp = codec::encode(&"late").map_err(err)?;
    for failed in [false, true] {
        let s = f.create().await.map_err(err)?;
        let k = key("purge-final", if failed { "failed" } else { "completed" })?;
        let t0 = cx.cfg.timing.start;
        let claim = cx.deadlines(t0);
        let l = acquire(&s, &k, None, t0, cx).await?;
        // A long operation: extended before its lease runs out, far past the claim's
        // expires_at.
        let until = claim
            .expires_at
            .plus(cx.lease() * 2 + Duration::from_secs(5));
        let extended = Deadlines {
            lease_until: until,
            expires_at: until.plus(cx.retention()),
        };
        let lease = s
            .extend(&l, extended, t0.plus(cx.lease() / 2))
            .await
            .map_err(err)?;
        let now = Timestamp::from_millis(until.as_millis() - 1);
        // At the claim's original expires_at the lease is live: purge keeps it.
        let n = s.purge(claim.expires_at, 100).await.map_err(err)?;
        ensure!(
            n == 0 && s.get(&k).await.map_err(err)?.is_some(),
            "purge at the first claim's expires_at {} deleted a live lease that was extended \
             until {}: extend must raise expires_at",
            claim.expires_at,
            lease.lease_until
        );
        // The outcome is written long after creation, with a retention shorter than the
        // claim's: purge follows the outcome's expires_at, not created_at, not the claim's.
        let done = now.plus(Duration::from_millis(1));
        let short = Duration::from_secs(1);
        let expires = done.plus(short);
        if failed {
            s.fail(&lease, &resp, expires, done).await.map_err(err)?;
        } else {
            s.complete(&lease, &resp, expires, done)
                .await
                .map_err(err)?;
        }
        let rec = record(&s, &k).await?;
        ensure!(
            rec.expires_at == expires && rec.created_at == t0,
            "after an outcome written at {done} with expires_at {expires}, the record is {rec:?}"
        );
        let early = Timestamp::from_millis(expires.as_millis() - 1);
        let n = s.purge(early, 100).await.map_err(err)?;
        ensure!(
            n == 0,
            "purge 1 ms before the outcome's expires_at deleted {n} (created_at {t0} is long \
             past: purge must judge expires_at)"
        );
        let n = s.purge(expires, 100).await.map_err(err)?;
        ensure!(
            n == 1 && s.get(&k).await.map_err(err)?.is_none(),
            "purge at the outcome's expires_at {expires} deleted {n}, expected the record"
        );
    }
    Ok(())
}

/// Runs `a` and `b` at once, `b` a few scheduler turns later in some rounds.
async fn together<A, B>(round: u32, a: A, b: B) -> Result<(A::Output, B::Output), String>
where
    A: Future + Send + 'static,
    B: Future + Send + 'static,
    A::Output: Send + 'static,
    B::Output: Send + 'static,
{
    let start = Arc::new(tokio::sync::Barrier::new(2));
    let (sa, sb) = (Arc::clone(&start), start);
    let ta = tokio::spawn(async move {
        sa.wait().await;
        a.await
    });
    let tb = tokio::spawn(async move {
        sb.wait().await;
        for _ in 0..round % 4 {
            tokio::task::yield_now().await;
        }
        b.await
    });
    let ra = ta.await.map_err(|e| e.to_string())?;
    let rb = tb.await.map_err(|e| e.to_string())?;
    Ok((ra, rb))
}

/// A racing call's answer: `None` for a retryable error (a deadlock, a timeout), which
/// leaves that call's effect unknown and its round's check inconclusive.
fn answered<T>(r: Result<T, Error>, inconclusive: &mut u32) -> Result<Option<T>, String> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_retryable() => {
            *inconclusive += 1;
            Ok(None)
        }
        Err(e) => Err(err(e)),
    }
}

pub(crate) async fn purge_race<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
    // Checks whose racing call ended in a retryable error (its effect unknown). A purge's
    // own error changes nothing: whatever it did, it may only have deleted expired records.
    let mut inconclusive = 0u32;
    let s = &env.store;
    let resp = codec::encode(&"raced").map_err(err)?;
    for round in 0..(RACE_ROUNDS * cx.scale()) {
        let t0 = cx
            .cfg
            .timing
            .start
            .plus(Duration::from_secs(u64::from(round) * 10));
        // A claim whose lease and retention have both run out.
        let spent = Deadlines {
            lease_until: t0.plus(cx.lease()),
            expires_at: t0.plus(cx.lease()),
        };
        let late = t0.plus(cx.lease() + Duration::from_millis(1));

        // Purge against a reclaim: the reclaimed claim (or a fresh one, if purge won) stays.
        let k = key("purge-race", &format!("reclaim-{round}"))?;
        acquire_with(&**s, &k, None, spent, t0).await?;
        let (s1, s2, k2, d) = (Arc::clone(s), Arc::clone(s), k.clone(), cx.deadlines(late));
        let (purged, claimed) = together(
            round,
            async move { s1.purge(late, 10_000).await },
            async move { s2.begin(&k2, None, d, late).await },
        )
        .await?;
        answered(purged, &mut inconclusive)?;
        match answered(claimed, &mut inconclusive)? {
            Some(Begin::Acquired(lease)) => match s.get(&k).await.map_err(err)?.map(|r| r.state) {
                Some(State::InProgress { token, .. }) if token == lease.token => {}
                other => {
                    return Err(format!(
                        "round {round}: purge racing a reclaim left {other:?} although {lease:?} \
                         was acquired: the live claim was deleted and the key can execute twice"
                    ))
                }
            },
            Some(other) => return Err(format!("round {round}: the reclaim answered {other:?}")),
            None => {}
        }

        // Purge against the holder's completion: an acknowledged completion is never lost.
        let k = key("purge-race", &format!("complete-{round}"))?;
        let holder = acquire_with(&**s, &k, None, spent, t0).await?;
        let (s1, s2, r2) = (Arc::clone(s), Arc::clone(s), resp.clone());
        let expires = cx.expiry(late);
        let (purged, completed) = together(
            round,
            async move { s1.purge(late, 10_000).await },
            async move { s2.complete(&holder, &r2, expires, late).await },
        )
        .await?;
        answered(purged, &mut inconclusive)?;
        let left = s.get(&k).await.map_err(err)?.map(|r| r.state);
        match (&completed, &left) {
            (Ok(()), Some(State::Completed { response })) if *response == resp => {}
            (Err(Error::LeaseLost), None) => {}
            (Err(e), _) if e.is_retryable() => inconclusive += 1,
            _ => {
                return Err(format!(
                    "round {round}: purge racing a completion: complete answered {completed:?} \
                     and the record is {left:?} (an acknowledged completion must stay; a \
                     refused one must leave nothing)"
                ))
            }
        }

        // Purge against an extension: an extended lease is live and stays.
        let k = key("purge-race", &format!("extend-{round}"))?;
        let holder = acquire_with(&**s, &k, None, spent, t0).await?;
        let (s1, s2, d) = (Arc::clone(s), Arc::clone(s), cx.deadlines(late));
        let (purged, extended) = together(
            round,
            async move { s1.purge(late, 10_000).await },
            async move { s2.extend(&holder, d, late).await },
        )
        .await?;
        answered(purged, &mut inconclusive)?;
        let left = s.get(&k).await.map_err(err)?.map(|r| r.state);
        match (&extended, &left) {
            (Ok(l), Some(State::InProgress { token, lease_until }))
                if *token == l.token && *lease_until == l.lease_until => {}
            (Err(Error::LeaseLost), None) => {}
            (Err(e), _) if e.is_retryable() => inconclusive += 1,
            _ => {
                return Err(format!(
                    "round {round}: purge racing an extension: extend answered {extended:?} and \
                     the record is {left:?}"
                ))
            }
        }

        // Purge against a replay: the outcome replays, or the key is new; never both lost.
        let k = key("purge-race", &format!("replay-{round}"))?;
        let holder = acquire(&**s, &k, None, t0, cx).await?;
        s.complete(&holder, &resp, t0, t0).await.map_err(err)?;
        let (s1, s2, k2, d) = (Arc::clone(s), Arc::clone(s), k.clone(), cx.deadlines(late));
        let (purged, replayed) = together(
            round,
            async move { s1.purge(late, 10_000).await },
            async move { s2.begin(&k2, None, d, late).await },
        )
        .await?;
        answered(purged, &mut inconclusive)?;
        let left = s.get(&k).await.map_err(err)?.map(|r| r.state);
        let Some(answer) = answered(replayed, &mut inconclusive)? else {
            continue;
        };
        match (answer, &left) {
            (Begin::Completed { response }, _) if response == resp => {}
            (Begin::Acquired(l), Some(State::InProgress { token, .. }))
                if l.token == Token(1) && *token == l.token => {}
            (answer, left) => {
                return Err(format!(
                    "round {round}: purge racing a replay: begin answered {answer:?}, record \
                     {left:?}"
                ))
            }
        }
    }
    let checks = 4 * RACE_ROUNDS * cx.scale();
    ensure!(
        inconclusive * 10 <= checks,
        "{inconclusive} of {checks} racing calls ended in retryable errors (deadlocks, \
         timeouts): too many to judge purge's atomicity"
    );
    Ok(())
}
