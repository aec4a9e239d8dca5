//! Time is a parameter: the store keeps the caller's lease and retention, acts exactly at
//! every deadline, and never treats an expired record as absent.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::backend::codec;
use idem_core::{
    Barrier, Begin, Deadlines, Fingerprint, Key, MemoryStore, State, Store, Timestamp, Token,
};

use crate::config::{DEADLINE_OFFSETS, TTL_TRAP_JUMP};
use crate::factory::StoreFactory;
use crate::kit::{
    acquire, begin, charge, ensure, env, err, key, lease_lost, record, run_err, Check, Cx, Env,
};
use crate::ops::{self, Op};

pub(crate) async fn ttl_trap<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
    // Retention longer than the jump: the contract keeps the record, a 24-hour TTL loses it.
    let barrier = env
        .barrier
        .clone()
        .with_retention(TTL_TRAP_JUMP + cx.retention());
    let k = key("payments", "ttl-trap")?;
    let fp = Some(Fingerprint::of_bytes(b"amount=100"));
    let executions = AtomicU32::new(0);
    let first = charge(&barrier, &k, fp, &executions, Duration::ZERO)
        .await
        .map_err(run_err)?;
    ensure!(!first.replayed, "the first request was a replay");
    env.clock.advance(TTL_TRAP_JUMP);
    // A clean-up job running now must not forget the key: its retention has not passed.
    env.store.purge(env.now(), 1000).await.map_err(err)?;
    let late = charge(&barrier, &k, fp, &executions, Duration::ZERO)
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

/// Applies `op` to the store and to the model; both answers and both records must agree.
async fn same<S: Store>(
    store: &S,
    model: &MemoryStore,
    k: &Key,
    op: Op,
    now: Timestamp,
    what: &str,
) -> Check {
    let got = ops::apply(store, k, &op, now).await.map_err(err)?;
    let want = ops::apply(model, k, &op, now).await.map_err(err)?;
    ensure!(
        got == want,
        "{what}: {op:?} at {now}\n store answered {got:?}\n model answered {want:?}"
    );
    let (got, want) = (
        store.get(k).await.map_err(err)?,
        model.get(k).await.map_err(err)?,
    );
    ensure!(
        got == want,
        "{what}: after {op:?} the store keeps\n {got:?}\n where the caller's deadlines give\n {want:?}"
    );
    Ok(())
}

fn millis(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(crate) async fn time_parameters<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let store = f.create().await.map_err(err)?;
    let model = MemoryStore::new();
    let mut rng = cx.rng("time_parameters");
    let t0 = cx.cfg.timing.start;
    let span =
        |rng: &mut crate::config::Rng, d: Duration| millis(1 + rng.below(3 * d.as_millis() as u64));
    let begin_op = |deadlines| Op::Begin {
        fingerprint: None,
        deadlines,
    };
    for i in 0..(8 * cx.scale()) {
        let k = key("time", &format!("k{i}"))?;
        let now = t0.plus(millis(rng.below(10_000)));
        let (lease, retention) = (span(&mut rng, cx.lease()), span(&mut rng, cx.retention()));
        let d = Deadlines {
            lease_until: now.plus(lease),
            expires_at: now.plus(lease + retention),
        };
        let what = format!("lease {lease:?}, retention {retention:?}");
        same(&store, &model, &k, begin_op(d), now, &what).await?;
        let lease_of = match model.get(&k).await.map_err(err)?.map(|r| r.state) {
            Some(State::InProgress { token, .. }) => token,
            other => return Err(format!("the model holds {other:?}")),
        };
        // A duplicate just before the deadline sees the holder's deadline, exactly.
        let before = minus(d.lease_until, millis(1));
        let other = Deadlines {
            lease_until: before.plus(cx.lease()),
            expires_at: before.plus(cx.lease() + cx.retention()),
        };
        same(&store, &model, &k, begin_op(other), before, &what).await?;
        // Extend to a new random deadline, then complete with a random retention.
        let (lease2, retention2) = (span(&mut rng, cx.lease()), span(&mut rng, cx.retention()));
        let d2 = Deadlines {
            lease_until: before.plus(lease2),
            expires_at: before.plus(lease2 + retention2),
        };
        let held = idem_core::Lease {
            key: k.clone(),
            token: lease_of,
            lease_until: d.lease_until,
            reclaimed: false,
        };
        let what2 = format!("extend by {lease2:?}, retention {retention2:?}");
        same(
            &store,
            &model,
            &k,
            Op::Extend {
                lease: held.clone(),
                deadlines: d2,
            },
            before,
            &what2,
        )
        .await?;
        let retention3 = span(&mut rng, cx.retention());
        let done_at = before.plus(millis(rng.below(lease2.as_millis() as u64)));
        let finish = Op::Finish {
            lease: held,
            failed: i % 3 == 2,
            response: codec::encode(&i).map_err(err)?,
            expires_at: done_at.plus(retention3),
        };
        same(
            &store,
            &model,
            &k,
            finish,
            done_at,
            &format!("outcome retention {retention3:?}"),
        )
        .await?;
    }
    // Through the barrier: its lease and retention reach the record unchanged.
    let lease = span(&mut rng, cx.lease());
    let retention = span(&mut rng, cx.retention());
    let env = Env::over(Arc::new(store), cx);
    let barrier = env
        .barrier
        .clone()
        .with_lease(lease)
        .with_retention(retention);
    let k = key("time", "barrier")?;
    let now = env.now();
    let started = barrier.begin(&k, None).await.map_err(err)?;
    let rec = record(&*env.store, &k).await?;
    ensure!(
        matches!(rec.state, State::InProgress { lease_until, .. } if lease_until == now.plus(lease))
            && rec.expires_at == now.plus(lease + retention),
        "a barrier with lease {lease:?} and retention {retention:?} at {now} stored {rec:?}"
    );
    match started {
        idem_core::Started::Acquired(handle) => {
            env.clock.advance(millis(7));
            handle.complete(&1u8).await.map_err(err)?;
        }
        idem_core::Started::Replay(r) => return Err(format!("a fresh key replayed {r:?}")),
    }
    let rec = record(&*env.store, &k).await?;
    ensure!(
        rec.expires_at == now.plus(millis(7) + retention),
        "an outcome written at {} with retention {retention:?} expires at {} instead of {}",
        now.plus(millis(7)),
        rec.expires_at,
        now.plus(millis(7) + retention)
    );
    Ok(())
}

/// The offsets probed around a deadline of a `duration`: a tick, a second (when shorter than
/// the duration) and half the duration.
fn offsets(duration: Duration) -> Vec<Duration> {
    let mut v: Vec<Duration> = DEADLINE_OFFSETS
        .iter()
        .copied()
        .filter(|&o| o < duration)
        .collect();
    v.push(duration / 2);
    v.retain(|o| !o.is_zero());
    v
}

fn minus(t: Timestamp, d: Duration) -> Timestamp {
    Timestamp::from_millis(t.as_millis() - d.as_millis() as i64)
}

pub(crate) async fn exact_deadlines<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let t0 = cx.cfg.timing.start;
    let resp = codec::encode(&"done").map_err(err)?;
    for delta in offsets(cx.lease()) {
        let s = f.create().await.map_err(err)?;
        // Lease expiry: live just before, reclaimable at and after the deadline.
        let k = key("deadline", "lease")?;
        let first = acquire(&s, &k, None, t0, cx).await?;
        let deadline = first.lease_until;
        match begin(&s, &k, None, minus(deadline, delta), cx).await? {
            Begin::InProgress { lease_until } if lease_until == deadline => {}
            other => {
                return Err(format!(
                    "{delta:?} before the lease deadline {deadline}, begin answered {other:?} \
                     (expected InProgress until {deadline}): the store reclaims early"
                ))
            }
        }
        let at = match begin(&s, &k, None, deadline, cx).await? {
            Begin::Acquired(l) if l.reclaimed && l.token > first.token => l,
            other => {
                return Err(format!(
                    "at the lease deadline {deadline} (lease_until <= now), begin answered \
                     {other:?}: the store reclaims late"
                ))
            }
        };
        let after = key("deadline", "after")?;
        acquire(&s, &after, None, t0, cx).await?;
        match begin(&s, &after, None, deadline.plus(delta), cx).await? {
            Begin::Acquired(l) if l.reclaimed => {}
            other => {
                return Err(format!(
                    "{delta:?} after the lease deadline, begin answered {other:?}"
                ))
            }
        }
        // An extended lease: its new deadline, exactly.
        let extended_until = at.lease_until.plus(delta);
        let d = Deadlines {
            lease_until: extended_until,
            expires_at: extended_until.plus(cx.retention()),
        };
        let ext = s.extend(&at, d, deadline).await.map_err(err)?;
        ensure!(
            ext.lease_until == extended_until,
            "extend to {extended_until} returned a lease until {}",
            ext.lease_until
        );
        let just_before = minus(extended_until, delta.min(Duration::from_millis(1)));
        match begin(&s, &k, None, just_before, cx).await? {
            Begin::InProgress { lease_until } if lease_until == extended_until => {}
            other => {
                return Err(format!(
                    "just before the extended deadline {extended_until}, begin answered {other:?}"
                ))
            }
        }
        match begin(&s, &k, None, extended_until, cx).await? {
            Begin::Acquired(l) if l.token > at.token => {}
            other => {
                return Err(format!(
                    "at the extended deadline {extended_until}, begin answered {other:?}"
                ))
            }
        }
    }
    for delta in offsets(cx.retention()) {
        // Retention of an outcome: kept just before, purged at and after `expires_at`.
        for (probe, expect) in [("before", 0u64), ("at", 1), ("after", 1)] {
            let s = f.create().await.map_err(err)?;
            let k = key("deadline", "retention")?;
            let l = acquire(&s, &k, None, t0, cx).await?;
            let done = t0.plus(Duration::from_millis(3));
            let expires = cx.expiry(done);
            s.complete(&l, &resp, expires, done).await.map_err(err)?;
            let when = match probe {
                "before" => minus(expires, delta),
                "at" => expires,
                _ => expires.plus(delta),
            };
            let n = s.purge(when, 100).await.map_err(err)?;
            let left = s.get(&k).await.map_err(err)?;
            ensure!(
                n == expect && left.is_some() == (expect == 0),
                "purge {probe} the outcome's expires_at {expires} (by {delta:?}) deleted {n} \
                 record(s) and left {left:?}; expected {expect} deletion(s)"
            );
        }
        // Retention of a claim: its expires_at too.
        let s = f.create().await.map_err(err)?;
        let k = key("deadline", "claim")?;
        let l = acquire(&s, &k, None, t0, cx).await?;
        let expires = cx.deadlines(t0).expires_at;
        let n = s.purge(minus(expires, delta), 100).await.map_err(err)?;
        ensure!(
            n == 0,
            "purge {delta:?} before a claim's expires_at deleted {n} record(s)"
        );
        let n = s.purge(expires, 100).await.map_err(err)?;
        ensure!(
            n == 1,
            "purge at a claim's expires_at {expires} deleted {n} record(s), expected 1"
        );
        lease_lost(
            "complete after the claim was purged",
            s.complete(&l, &resp, expires, expires).await,
        )?;
    }
    Ok(())
}

pub(crate) async fn retention_is_not_absence<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let env = env(f, cx).await?;
    let s = &*env.store;
    let (a, b) = (Fingerprint::of_bytes(b"a"), Fingerprint::of_bytes(b"b"));
    let t0 = env.now();
    let ok = codec::encode(&"ok").map_err(err)?;
    let no = codec::encode(&"declined").map_err(err)?;

    let done = key("retention", "completed")?;
    let l = acquire(s, &done, Some(&a), t0, cx).await?;
    s.complete(&l, &ok, cx.expiry(t0), t0).await.map_err(err)?;
    let failed = key("retention", "failed")?;
    let l = acquire(s, &failed, Some(&a), t0, cx).await?;
    s.fail(&l, &no, cx.expiry(t0), t0).await.map_err(err)?;
    let held = key("retention", "held")?;
    let zombie = acquire(s, &held, Some(&a), t0, cx).await?;
    let released = key("retention", "released")?;
    let l = acquire(s, &released, None, t0, cx).await?;
    s.release(&l, t0).await.map_err(err)?;

    let keys = [&done, &failed, &held, &released];
    let mut before = Vec::new();
    for k in keys {
        before.push(record(s, k).await?);
    }
    let stats = s.stats().await.map_err(err)?;
    // Far past every expires_at, with no purge in between.
    let late = before
        .iter()
        .map(|r| r.expires_at)
        .max()
        .unwrap_or(t0)
        .plus(TTL_TRAP_JUMP + cx.retention());
    for (k, rec) in keys.iter().zip(&before) {
        let now = s.get(k).await.map_err(err)?;
        ensure!(
            now.as_ref() == Some(rec),
            "{k} past its retention but not purged reads {now:?}, was {rec:?}"
        );
    }
    ensure!(
        s.stats().await.map_err(err)? == stats,
        "stats changed with time alone"
    );
    let replay = begin(s, &done, Some(&a), late, cx).await?;
    ensure!(
        replay == Begin::Completed { response: ok.clone() },
        "a completed record past its retention, not purged, answered {replay:?} instead of its replay"
    );
    let mismatch = begin(s, &done, Some(&b), late, cx).await?;
    ensure!(
        mismatch == Begin::Mismatch,
        "a completed record past its retention answered {mismatch:?} to another payload"
    );
    let replay = begin(s, &failed, None, late, cx).await?;
    ensure!(
        replay == Begin::Failed { response: no },
        "a failed record past its retention answered {replay:?}"
    );
    match begin(s, &held, Some(&b), late, cx).await? {
        Begin::Mismatch => {}
        other => {
            return Err(format!(
                "an expired claim answered {other:?} to another payload"
            ))
        }
    }
    match begin(s, &held, Some(&a), late, cx).await? {
        Begin::Acquired(l) if l.token > zombie.token && l.reclaimed => {
            lease_lost(
                "the expired claim's holder",
                s.complete(&zombie, &ok, late, late).await,
            )?;
        }
        other => {
            return Err(format!(
                "an expired claim past its retention must be reclaimed with a token above {:?}, \
                 got {other:?}",
                zombie.token
            ))
        }
    }
    match begin(s, &released, None, late, cx).await? {
        Begin::Acquired(l) if l.token > Token(1) && !l.reclaimed => {}
        other => {
            return Err(format!(
                "a released claim past its retention must be acquired with token 2, got {other:?}"
            ))
        }
    }
    // Only purge forgets: the two outcomes go, the two fresh claims stay.
    let n = s.purge(late, 100).await.map_err(err)?;
    ensure!(
        n == 2,
        "purge after retention deleted {n} records, expected the 2 outcomes"
    );
    // And a forgotten key is a new key.
    let executions = AtomicU32::new(0);
    let barrier: Barrier<F::Store> = env.barrier.clone();
    env.clock.set(late);
    let again = charge(&barrier, &done, None, &executions, Duration::ZERO)
        .await
        .map_err(run_err)?;
    ensure!(!again.replayed, "a purged key replayed {again:?}");
    Ok(())
}
