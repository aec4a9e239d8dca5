//! The store against the reference model: sequentially (proptest) and concurrently
//! (linearizability, purge included).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use idem_core::backend::codec;
use idem_core::{Begin, Deadlines, Key, Lease, MemoryStore, Store, Timestamp, Token};
use proptest::prelude::*;

use crate::config::{LIN_OPS_PER_TASK, LIN_ROUNDS, LIN_TASKS, MODEL_CASES, MODEL_STEPS};
use crate::driver;
use crate::factory::StoreFactory;
use crate::kit::{ensure, err, fingerprint, key, Check, Cx};
use crate::linearizability::{run_with, Run, Times};
use crate::ops::{self, Op, Ret};

#[derive(Clone, Debug)]
enum Step {
    Begin {
        key: usize,
        fp: u8,
        time: usize,
    },
    Finish {
        key: usize,
        lease: usize,
        failed: bool,
        response: u8,
        time: usize,
    },
    Extend {
        key: usize,
        lease: usize,
        time: usize,
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

/// The durations a step may pass or jump by: the run's lease and retention, one clock tick,
/// a second, and the 26-hour jump. Lease and retention of every call are drawn from these,
/// so a store that assumes one value of its own answers differently from the model.
fn durations(cx: &Cx) -> [Duration; 6] {
    [
        cx.lease(),
        Duration::from_millis(1),
        Duration::from_secs(1),
        cx.retention(),
        cx.lease() + cx.retention(),
        crate::config::TTL_TRAP_JUMP,
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let k = 0..3usize;
    let t = 0..36usize;
    prop_oneof![
        4 => (k.clone(), 0..3u8, t.clone()).prop_map(|(key, fp, time)| Step::Begin { key, fp, time }),
        2 => (k.clone(), 0..4usize, any::<bool>(), any::<u8>(), t.clone())
            .prop_map(|(key, lease, failed, response, time)| Step::Finish { key, lease, failed, response, time }),
        1 => (k.clone(), 0..4usize, t).prop_map(|(key, lease, time)| Step::Extend { key, lease, time }),
        1 => (k.clone(), 0..4usize).prop_map(|(key, lease)| Step::Release { key, lease }),
        1 => k.prop_map(|key| Step::Get { key }),
        1 => Just(Step::Purge),
        1 => Just(Step::Stats),
        3 => (0..6usize).prop_map(|by| Step::Advance { by }),
    ]
}

fn model_keys() -> Result<[Key; 3], String> {
    Ok([
        key("tenant-a", "k0")?,
        key("tenant-a", "k1")?,
        key("tenant-b", "k0")?,
    ])
}

/// The deadlines of choice `time` (6 × 6 lease × retention combinations) at `now`.
fn deadlines_of(cx: &Cx, time: usize, now: Timestamp) -> Deadlines {
    let d = durations(cx);
    let lease_until = now.plus(d[time % 6]);
    Deadlines {
        lease_until,
        expires_at: lease_until.plus(d[(time / 6) % 6]),
    }
}

/// The lease a step presents: one this key was handed, or a token never issued.
fn pick_lease(leases: &[Lease], key: &Key, i: usize, now: Timestamp, cx: &Cx) -> Lease {
    if leases.is_empty() || i == 3 {
        Lease {
            key: key.clone(),
            token: Token(u64::from(u32::MAX)),
            lease_until: now.plus(cx.lease()),
            reclaimed: false,
        }
    } else {
        leases[leases.len() - 1 - (i % leases.len())].clone()
    }
}

pub(crate) async fn model_check<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    let keys = model_keys()?;
    let d = durations(cx);
    driver::check(
        prop::collection::vec(step_strategy(), 1..MODEL_STEPS),
        MODEL_CASES * cx.scale(),
        cx.cfg.seed,
        |steps| {
            let keys = keys.clone();
            async move {
                let store = f.create().await.map_err(err)?;
                let model = MemoryStore::new();
                let mut now = cx.cfg.timing.start;
                let mut leases: BTreeMap<usize, Vec<Lease>> = BTreeMap::new();
                for (i, step) in steps.iter().enumerate() {
                    let presented = |key: usize, choice: usize| {
                        pick_lease(leases.get(&key).map_or(&[], |v| v), &keys[key], choice, now, cx)
                    };
                    let (k, op) = match *step {
                        Step::Advance { by } => {
                            now = now.plus(d[by]);
                            continue;
                        }
                        Step::Stats => {
                            let got = store.stats().await.map_err(err)?;
                            let want = model.stats().await.map_err(err)?;
                            ensure!(got == want, "step {i} stats: store {got:?}, model {want:?}");
                            continue;
                        }
                        Step::Purge => {
                            // A batch that covers everything: which records a smaller batch
                            // picks first is the store's choice.
                            let got = store.purge(now, 10_000).await.map_err(err)?;
                            let want = model.purge(now, 10_000).await.map_err(err)?;
                            ensure!(
                                got == want,
                                "step {i} purge at {now}: store deleted {got}, model {want}"
                            );
                            continue;
                        }
                        Step::Begin { key, fp, time } => (
                            key,
                            Op::Begin {
                                fingerprint: fingerprint(fp),
                                deadlines: deadlines_of(cx, time, now),
                            },
                        ),
                        Step::Finish {
                            key,
                            lease,
                            failed,
                            response,
                            time,
                        } => (
                            key,
                            Op::Finish {
                                lease: presented(key, lease),
                                failed,
                                response: codec::encode(&response).map_err(err)?,
                                expires_at: now.plus(d[time % 6]),
                            },
                        ),
                        Step::Extend { key, lease, time } => (
                            key,
                            Op::Extend {
                                lease: presented(key, lease),
                                deadlines: deadlines_of(cx, time, now),
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
                        "step {i} on {} at {now}: {op:?}\n store answered {got:?}\n model answered {want:?}",
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

pub(crate) async fn linearizability<F: StoreFactory>(f: &F, cx: &Cx) -> Check {
    // Retention as long as the lease, so that purges in the mix really delete records.
    let times = Times {
        start: cx.cfg.timing.start,
        lease: cx.lease(),
        retention: cx.lease(),
        purges: true,
    };
    for round in 0..(LIN_ROUNDS * cx.scale()) {
        let store = Arc::new(f.create().await.map_err(err)?);
        let keys = vec![key("lin", "a")?, key("lin", "b")?];
        let shape = Run {
            tasks: LIN_TASKS,
            ops_per_task: LIN_OPS_PER_TASK,
            call_timeout: Duration::from_secs(10),
            seed: cx.cfg.seed ^ (u64::from(round) << 32),
        };
        let history = run_with(store, keys, shape, times).await?;
        let unknown = history.unknown();
        ensure!(
            unknown * 10 <= history.events.len(),
            "round {round}: {unknown} of {} calls ended without an answer (timeouts or retryable errors)",
            history.events.len()
        );
        history
            .check()
            .map_err(|why| format!("round {round}, {why}"))?;
    }
    Ok(())
}
