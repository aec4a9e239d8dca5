//! The measured loop: concurrent clients, throughput, and latency percentiles from one HDR
//! histogram.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use idem::{Barrier, Error, Key, Started, Store};

/// One call of a measured loop.
pub type Call = Pin<Box<dyn Future<Output = Result<(), Error>> + Send>>;

/// Throughput and latencies of one measured loop.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Completed calls per second of wall time.
    pub ops_per_s: f64,
    /// Every call's latency, in microseconds.
    pub latencies: Histogram<u64>,
    /// The server's microseconds per call of each command it ran, where the server reports
    /// them (Redis).
    pub server_us_per_call: Option<BTreeMap<String, f64>>,
}

/// Several rounds of one measurement: the median throughput (so a load spike from another
/// process moves one round, not the figure) and the percentiles of all rounds' calls.
#[derive(Clone, Debug)]
pub struct Summary {
    /// The median of the rounds' calls per second.
    pub ops_per_s: f64,
    /// Median call latency over all rounds, in microseconds.
    pub p50_us: u64,
    /// 99th-percentile call latency over all rounds, in microseconds.
    pub p99_us: u64,
    /// The last round's server time per call of each command, where reported.
    pub server_us_per_call: Option<BTreeMap<String, f64>>,
}

impl Summary {
    /// Summarises `rounds` (at least one).
    pub fn of(rounds: &[Measured]) -> Result<Summary, Error> {
        let mut all = histogram()?;
        let mut rates: Vec<f64> = Vec::with_capacity(rounds.len());
        for round in rounds {
            all.add(&round.latencies)
                .map_err(|e| Error::Config(format!("latency histogram: {e}")))?;
            rates.push(round.ops_per_s);
        }
        rates.sort_by(f64::total_cmp);
        Ok(Summary {
            ops_per_s: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
            p50_us: all.value_at_quantile(0.50),
            p99_us: all.value_at_quantile(0.99),
            server_us_per_call: rounds
                .iter()
                .rev()
                .find_map(|r| r.server_us_per_call.clone()),
        })
    }
}

/// Latencies from 1 µs to an hour, to three significant digits; longer calls count as an
/// hour.
fn histogram() -> Result<Histogram<u64>, Error> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| Error::Config(format!("latency histogram: {e}")))
}

/// Runs `op` from `clients` concurrent tasks for `seconds`; `op(client, n)` is the n-th call
/// of a client.
pub async fn measure<F, Fut>(clients: usize, seconds: f64, op: F) -> Result<Measured, Error>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (op, stop) = (Arc::clone(&op), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut latencies = histogram()?;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    op(c, n).await?;
                    latencies.saturating_record(t.elapsed().as_micros().max(1) as u64);
                    n += 1;
                }
                Ok::<_, Error>(latencies)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = histogram()?;
    for t in tasks {
        let task = t
            .await
            .map_err(|e| Error::Config(format!("a benchmark client panicked: {e}")))??;
        all.add(&task)
            .map_err(|e| Error::Config(format!("latency histogram: {e}")))?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Measured {
        ops_per_s: all.len() as f64 / elapsed,
        latencies: all,
        server_us_per_call: None,
    })
}

/// Lease mode's begin + complete on fresh keys; client `c` calls `barriers[c % len]`.
pub async fn lease_pairs<S: Store + ?Sized + 'static>(
    barriers: Vec<Barrier<S>>,
    clients: usize,
    seconds: f64,
    round: u64,
) -> Result<Measured, Error> {
    let barriers = Arc::new(barriers);
    measure(clients, seconds, move |c, n| {
        let barrier = barriers[c % barriers.len()].clone();
        async move {
            let key = Key::new("bench-lease", format!("{round}-{c}-{n}"))?;
            match barrier.begin(&key, None).await? {
                Started::Acquired(handle) => handle.complete(&1u8).await,
                Started::Replay(_) => Err(Error::Config("a fresh key replayed".into())),
            }
        }
    })
    .await
}

/// `begin` on completed keys, spread over `keys`; client `c` calls `barriers[c % len]`.
pub async fn replays<S: Store + ?Sized + 'static>(
    barriers: Vec<Barrier<S>>,
    keys: Arc<Vec<Key>>,
    clients: usize,
    seconds: f64,
) -> Result<Measured, Error> {
    let barriers = Arc::new(barriers);
    measure(clients, seconds, move |c, n| {
        let barrier = barriers[c % barriers.len()].clone();
        let keys = Arc::clone(&keys);
        async move {
            match barrier
                .begin(&keys[(c * 31 + n as usize) % keys.len()], None)
                .await?
            {
                Started::Replay(_) => Ok(()),
                Started::Acquired(_) => Err(Error::Config("a completed key was acquired".into())),
            }
        }
    })
    .await
}
