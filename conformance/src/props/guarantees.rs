//! Declared guarantees, checked: the minimum every store keeps, and durability, sharing
//! and fail-over through the factory's hooks.

use std::sync::Arc;

use idem_core::backend::codec;
use idem_core::{Begin, Fingerprint, Key, Lease, Record, State, Store, Timestamp};

use crate::factory::StoreFactory;
use crate::kit::{acquire, begin, ensure, err, key, lease_lost, Check, Cx};
use crate::SKIP;

pub(crate) async fn minimum<F: StoreFactory>(f: &F, _cx: &Cx) -> Check {
    let g = f.create().await.map_err(err)?.guarantees();
    ensure!(
        g.atomic_claim && g.fenced_completion,
        "every store must provide an atomic exclusive claim and fenced completion; this one \
         declares {g:?}"
    );
    ensure!(
        !g.survives_failover || g.durable,
        "a store that survives fail-over but is not durable contradicts itself: {g:?}"
    );
    Ok(())
}

/// Records in every state, written through `s` at `t0`, with what each must answer later.
struct Written {
    keys: Vec<Key>,
    records: Vec<Record>,
    live: Lease,
    zombie: Lease,
    successor: Lease,
    outcome: Vec<u8>,
}

async fn write_every_state<S: Store>(s: &S, t0: Timestamp, cx: &Cx) -> Result<Written, String> {
    let fp = Fingerprint::of_bytes(b"payload");
    let outcome = codec::encode(&"kept").map_err(err)?;
    let done = key("kept", "completed")?;
    let l = acquire(s, &done, Some(&fp), t0, cx).await?;
    s.complete(&l, &outcome, cx.expiry(t0), t0)
        .await
        .map_err(err)?;
    let failed = key("kept", "failed")?;
    let l = acquire(s, &failed, None, t0, cx).await?;
    s.fail(&l, &outcome, cx.expiry(t0), t0).await.map_err(err)?;
    let live_key = key("kept", "live")?;
    let live = acquire(s, &live_key, Some(&fp), t0, cx).await?;
    let released = key("kept", "released")?;
    let l = acquire(s, &released, None, t0, cx).await?;
    s.release(&l, t0).await.map_err(err)?;
    let reclaimed = key("kept", "reclaimed")?;
    let zombie = acquire(s, &reclaimed, None, t0, cx).await?;
    let successor = acquire(s, &reclaimed, None, t0.plus(cx.lease()), cx).await?;
    let keys = vec![done, failed, live_key, released, reclaimed];
    let mut records = Vec::new();
    for k in &keys {
        records.push(
            s.get(k)
                .await
                .map_err(err)?
                .ok_or_else(|| format!("{k} was acknowledged but cannot be read back"))?,
        );
    }
    Ok(Written {
        keys,
        records,
        live,
        zombie,
        successor,
        outcome,
    })
}

/// What `s` (another handle, or the reopened store) must answer about `w`.
async fn check_every_state<S: Store>(
    s: &S,
    w: &Written,
    t0: Timestamp,
    cx: &Cx,
    how: &str,
) -> Check {
    for (k, want) in w.keys.iter().zip(&w.records) {
        let got = s.get(k).await.map_err(err)?;
        ensure!(
            got.as_ref() == Some(want),
            "{how}: {k} reads {got:?}, but {want:?} was acknowledged"
        );
    }
    let now = t0.plus(cx.lease() / 2);
    match begin(s, &w.keys[0], None, now, cx).await? {
        Begin::Completed { response } if response == w.outcome => {}
        other => return Err(format!("{how}: the completed key answered {other:?}")),
    }
    let other = Fingerprint::of_bytes(b"other");
    match begin(s, &w.keys[0], Some(&other), now, cx).await? {
        Begin::Mismatch => {}
        other => return Err(format!("{how}: the stored fingerprint is gone: {other:?}")),
    }
    match begin(s, &w.keys[2], None, now, cx).await? {
        Begin::InProgress { lease_until } if lease_until == w.live.lease_until => {}
        other => {
            return Err(format!(
                "{how}: the live claim answered {other:?}: its holder's work can run twice"
            ))
        }
    }
    lease_lost(
        &format!("{how}: the reclaimed key's zombie"),
        s.complete(&w.zombie, &w.outcome, now, now).await,
    )?;
    match begin(s, &w.keys[3], None, now, cx).await? {
        Begin::Acquired(l) if l.token > w.records[3].token => {}
        other => {
            return Err(format!(
                "{how}: the released key must be acquired with a new token, got {other:?}"
            ))
        }
    }
    s.complete(&w.successor, &w.outcome, cx.expiry(now), now)
        .await
        .map_err(|e| format!("{how}: the successor's completion: {}", err(e)))?;
    s.complete(&w.live, &w.outcome, cx.expiry(now), now)
        .await
        .map_err(|e| format!("{how}: the live holder's completion: {}", err(e)))?;
    Ok(())
}

fn missing(hook: &str, guarantee: &str) -> String {
    format!(
        "the store declares `{guarantee}`, but the factory does not implement \
         `StoreFactory::{hook}`, so the suite cannot check it: implement the hook"
    )
}

pub(crate) async fn durable<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let t0 = cx.cfg.timing.start;
    let s = f.create().await.map_err(err)?;
    let w = write_every_state(&s, t0, cx).await?;
    let stats = s.stats().await.map_err(err)?;
    let reopened = f
        .reopen(s)
        .await
        .ok_or_else(|| missing("reopen", "durable"))?
        .map_err(err)?;
    ensure!(
        reopened.stats().await.map_err(err)? == stats,
        "after a reopen the store counts {:?}, before it {stats:?}",
        reopened.stats().await.map_err(err)?
    );
    check_every_state(&reopened, &w, t0, cx, "after a reopen").await?;
    // Writes made after the reopen survive the next one too.
    let again = f
        .reopen(reopened)
        .await
        .ok_or_else(|| missing("reopen", "durable"))?
        .map_err(err)?;
    for k in &w.keys[2..] {
        let rec = again.get(k).await.map_err(err)?;
        ensure!(
            rec.is_some(),
            "after a second reopen {k} is gone though its last write was acknowledged"
        );
    }
    Ok(())
}

pub(crate) async fn shared_handles<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let t0 = cx.cfg.timing.start;
    let a = Arc::new(f.create().await.map_err(err)?);
    let b = Arc::new(
        f.second_handle(&a)
            .await
            .ok_or_else(|| missing("second_handle", "shared_across_processes"))?
            .map_err(err)?,
    );
    let w = write_every_state(&*a, t0, cx).await?;
    check_every_state(&*b, &w, t0, cx, "through a second handle").await?;
    // Races across handles have one winner.
    for round in 0..(4 * cx.scale()) {
        let k = key("shared", &format!("race-{round}"))?;
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let s = if i % 2 == 0 {
                    Arc::clone(&a)
                } else {
                    Arc::clone(&b)
                };
                let (k, d) = (k.clone(), cx.deadlines(t0));
                tokio::spawn(async move { s.begin(&k, None, d, t0).await })
            })
            .collect();
        let mut won = 0;
        for t in tasks {
            if let Begin::Acquired(_) = t.await.map_err(|e| e.to_string())?.map_err(err)? {
                won += 1;
            }
        }
        ensure!(
            won == 1,
            "round {round}: {won} begins across two handles acquired one key"
        );
    }
    // A reclaim through B fences the holder on A; purge through B removes A's records.
    let k = key("shared", "fenced")?;
    let holder = acquire(&*a, &k, None, t0, cx).await?;
    let later = t0.plus(cx.lease());
    let successor = acquire(&*b, &k, None, later, cx).await?;
    lease_lost(
        "a holder fenced through another handle",
        a.complete(&holder, b"\x01\"x\"", later, later).await,
    )?;
    a.complete(&successor, b"\x01\"y\"", cx.expiry(later), later)
        .await
        .map_err(err)?;
    match b.get(&k).await.map_err(err)?.map(|r| r.state) {
        Some(State::Completed { response }) if response == b"\x01\"y\"" => {}
        other => {
            return Err(format!(
                "a completion through one handle reads {other:?} through the other"
            ))
        }
    }
    let far = later.plus(cx.lease() * 3 + cx.retention() * 3);
    let purged = b.purge(far, 10_000).await.map_err(err)?;
    let (sa, sb) = (a.stats().await.map_err(err)?, b.stats().await.map_err(err)?);
    ensure!(
        purged > 0 && sa == sb && sa.total() == 0,
        "purge through one handle deleted {purged}; the handles now count {sa:?} and {sb:?}"
    );
    Ok(())
}

pub(crate) async fn failover<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let t0 = cx.cfg.timing.start;
    let s = f.create().await.map_err(err)?;
    let w = write_every_state(&s, t0, cx).await?;
    let Some(moved) = f.fail_over(s).await else {
        return Err(format!(
            "{SKIP}the store declares `survives_failover`, but the factory has no \
             `StoreFactory::fail_over` hook to exercise it"
        ));
    };
    let moved = moved.map_err(err)?;
    check_every_state(&moved, &w, t0, cx, "after a fail-over").await
}
