//! The key-value stores' workloads, shared by Redis and etcd.
//!
//! - `set` / `put`: a plain write of a fresh key, one connection per client.
//! - `get`: a plain read of one key, one connection per client.
//! - `set-multiplexed`: the plain write, every client sharing one multiplexed connection.
//! - `barrier-lease`: lease mode's `begin` + `complete` on fresh keys, one store (and
//!   connection) per client.
//! - `barrier-lease-multiplexed`: the same, every client sharing one store.
//! - `replay`: `begin` on a completed key, one store per client.
//!
//! Where the server reports its time per command (Redis), each measurement also records
//! the server's microseconds per call of every command it ran, from the difference of two
//! readings (other clients of the server are counted too).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use idem::{Barrier, Error, Key, Started, Store};

use super::measure::{lease_pairs, measure, replays};
use super::report::Comparison;
use super::{Call, Measured, Suite};

/// The server's time per command so far: name -> (calls, microseconds).
pub type CommandTimes = BTreeMap<String, (u64, u64)>;

/// [`CommandTimes`] being read.
pub type ReadingTimes<'a> =
    Pin<Box<dyn Future<Output = Result<Option<CommandTimes>, Error>> + Send + 'a>>;

/// A [`KvClient`] being connected.
pub type Connecting<'a> = Pin<Box<dyn Future<Output = Result<KvClient, Error>> + Send + 'a>>;

/// One client of a key-value store's benchmark: its barrier and its plain commands.
pub struct KvClient {
    pub barrier: Barrier<dyn Store>,
    /// Writes the plain key `k`.
    pub write: Box<dyn Fn(String) -> Call + Send + Sync>,
    /// Reads the plain key `k`.
    pub read: Box<dyn Fn(String) -> Call + Send + Sync>,
}

/// A key-value store's benchmark: the barrier against the store's plain write and read.
pub trait KvBench: Send + Sync + 'static {
    /// The backend's name in the output.
    const BACKEND: &'static str;
    /// The workloads it runs (see the module docs), the plain write named as the store
    /// names it (`set`, `put`).
    const WORKLOADS: &'static [&'static str];
    /// The ratios the table prints.
    const COMPARISONS: &'static [Comparison];
    /// A client with a connection of its own.
    fn client(&self) -> Connecting<'_>;
    /// Deletes everything the benchmark wrote.
    fn cleanup(&self) -> Call;
    /// The server's cumulative time per command, where the server reports it (Redis:
    /// `INFO commandstats`); `None` elsewhere.
    fn command_times(&self) -> ReadingTimes<'_>;
}

/// [`Suite`] for any [`KvBench`].
pub struct KvSuite<B: KvBench> {
    bench: B,
    round: AtomicU64,
}

impl<B: KvBench> KvSuite<B> {
    pub fn new(bench: B) -> Self {
        KvSuite {
            bench,
            round: AtomicU64::new(0),
        }
    }
}

#[async_trait]
impl<B: KvBench> Suite for KvSuite<B> {
    fn backend(&self) -> &'static str {
        B::BACKEND
    }

    fn workloads(&self) -> Vec<&'static str> {
        B::WORKLOADS.to_vec()
    }

    fn comparisons(&self) -> Vec<Comparison> {
        B::COMPARISONS.to_vec()
    }

    fn scale_workloads(&self) -> &'static [&'static str] {
        &[]
    }

    /// Runs `workload` (see the module docs), reading the server's command times around
    /// the measured loop only (after the clients connected and the keys were prepared).
    async fn measure(
        &self,
        workload: &'static str,
        clients: usize,
        seconds: f64,
    ) -> Result<Measured, Error> {
        let round = self.round.fetch_add(1, Ordering::Relaxed);
        let mut all = Vec::with_capacity(clients);
        for _ in 0..clients {
            all.push(self.bench.client().await?);
        }
        let all = Arc::new(all);
        let shared = workload.ends_with("-multiplexed");
        let job: Pin<Box<dyn Future<Output = Result<Measured, Error>> + Send>> = match workload {
            "set" | "put" | "set-multiplexed" => {
                Box::pin(measure(clients, seconds, move |c, n| {
                    (all[if shared { 0 } else { c }].write)(format!("{round}-{c}-{n}"))
                }))
            }
            "get" => {
                (all[0].write)("get".into()).await?;
                Box::pin(measure(clients, seconds, move |c, _| {
                    (all[c].read)("get".into())
                }))
            }
            "barrier-lease" | "barrier-lease-multiplexed" => {
                let barriers = if shared {
                    vec![all[0].barrier.clone()]
                } else {
                    all.iter().map(|client| client.barrier.clone()).collect()
                };
                Box::pin(lease_pairs(barriers, clients, seconds, round))
            }
            "replay" => {
                let key = Key::new("bench-replay", "k")?;
                if let Started::Acquired(h) = all[0].barrier.begin(&key, None).await? {
                    h.complete(&1u8).await?;
                }
                let barriers = all.iter().map(|client| client.barrier.clone()).collect();
                Box::pin(replays(barriers, Arc::new(vec![key]), clients, seconds))
            }
            other => {
                return Err(Error::Config(format!(
                    "no {} workload named {other}",
                    B::BACKEND
                )))
            }
        };
        let before = self.bench.command_times().await?;
        let mut measured = job.await?;
        let after = self.bench.command_times().await?;
        measured.server_us_per_call = before
            .zip(after)
            .map(|(before, after)| per_call(&before, &after));
        Ok(measured)
    }

    async fn prefill(&self, _records: u64) -> Result<u64, Error> {
        Err(Error::Config(format!(
            "the {} benchmark has no stored-record measurements",
            B::BACKEND
        )))
    }

    async fn teardown(&self) -> Result<(), Error> {
        self.bench.cleanup().await
    }
}

/// Microseconds per call of each command called between `before` and `after`, but for the
/// `INFO` that took the second reading.
fn per_call(before: &CommandTimes, after: &CommandTimes) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(name, &(calls, usec))| {
            let (calls_before, usec_before) = before.get(name).copied().unwrap_or((0, 0));
            let calls = calls
                .checked_sub(calls_before)
                .filter(|&n| n > 0 && name != "info")?;
            let usec = usec.saturating_sub(usec_before);
            Some((
                name.clone(),
                (usec as f64 / calls as f64 * 100.0).round() / 100.0,
            ))
        })
        .collect()
}
