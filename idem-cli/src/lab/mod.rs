//! The phantom-write lab: the seeds' experiment, on a real backend, strategy by strategy.
//!
//! Every strategy replays the same planned payments from many concurrent clients. A client
//! behaves like a real one: it retries a retryable answer (in progress, lease lost, a store
//! or operation failure, a worker that died under it) with jittered exponential backoff,
//! never sooner than the server's `Retry-After`, until it gets a definitive answer
//! (executed, replayed, rejected as a mismatch, a permanent error) or its deadline passes.
//! The ledger is the ground truth; see [`report`] for how it is judged.
//!
//! One file per backend holds its [`LabBackend`]: where the ledger, the naive strategies'
//! keys and the barrier's records live. The lab's own statements (ledger rows, naive keys)
//! fail as a client sees a 503: with a retryable [`Error`]; the stores classify their own.

mod etcd;
#[cfg(feature = "fdb")]
mod fdb;
mod mysql;
mod postgres;
mod redis;
mod report;
mod sql;
mod sqlite;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use idem::{
    Barrier, Clock, DynStore, Error, Fingerprint, Key, ManualClock, Response, RunError, Started,
    SystemClock, TxPolicy,
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

pub use self::redis::unlink_matching;
use crate::error::CliError;
use crate::scratch::ScratchDb;
use crate::target::{BackendKind, Target};
use report::{Counts, StrategyReport};

/// The workload's knobs.
#[derive(clap::Args, Clone, Debug, Serialize)]
pub struct LabConfig {
    /// Payments in the workload.
    #[arg(long, default_value_t = 2000)]
    pub payments: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 500)]
    pub clients: usize,
    /// Share of responses lost after the server applied them: the client retries at once,
    /// while the original may still be running.
    #[arg(long, default_value_t = 0.10)]
    pub lost: f64,
    /// Share of workers that die between the debit and the credit.
    #[arg(long, default_value_t = 0.05)]
    pub crash: f64,
    /// Share of requests redelivered after a 26-hour clock jump.
    #[arg(long, default_value_t = 0.10)]
    pub late: f64,
    /// Share of keys reused with a different amount.
    #[arg(long, default_value_t = 0.02)]
    pub reuse: f64,
    /// Simulated latency of the payment network between the two legs, in ms.
    #[arg(long, default_value_t = 2)]
    pub latency_ms: u64,
    /// How long a client retries one request (with backoff) before it gives up; the
    /// request is then unresolved (shown, not a violation). In ms.
    #[arg(long, default_value_t = 2000)]
    pub deadline_ms: u64,
    /// Seed of the workload (the same seed gives the same requests).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl LabConfig {
    /// Refuses shares outside 0..=1.
    pub fn validate(&self) -> Result<(), Error> {
        for (name, share) in [
            ("lost", self.lost),
            ("crash", self.crash),
            ("late", self.late),
            ("reuse", self.reuse),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(Error::Config(format!(
                    "--{name} must be between 0 and 1, got {share}"
                )));
            }
        }
        Ok(())
    }
}

/// Runs every strategy on the backend of `target`, prints the table (or JSON), and answers
/// whether no barrier strategy violated exactly-once. Unresolved requests and the naive
/// strategies' duplicates are shown, never a failure.
pub async fn run(target: &Target, config: &LabConfig, json: bool) -> Result<bool, CliError> {
    config.validate()?;
    let backend = open(target).await?;
    let mut reports = Vec::new();
    let strategies = Strategy::ALL
        .into_iter()
        .filter(|s| *s != Strategy::BarrierOptimistic || backend.claims_at_commit());
    for strategy in strategies {
        backend.ledger().reset().await?;
        reports.push(run_strategy(Arc::clone(&backend), strategy, config, json).await?);
    }
    if json {
        let out = serde_json::json!({ "config": config, "results": reports });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).map_err(|e| Error::Encode(Box::new(e)))?
        );
    } else {
        report::print_table(&reports, config);
    }
    let violations = report::barrier_violations(&reports);
    for v in &violations {
        eprintln!("idem lab: BARRIER VIOLATION: {v}");
    }
    Ok(violations.is_empty())
}

/// The lab backend of `target`, with its tables or key spaces created.
async fn open(target: &Target) -> Result<Arc<dyn LabBackend>, CliError> {
    Ok(match target.backend {
        BackendKind::Sqlite => {
            let db = ScratchDb::new(target.db.as_deref(), "idem-lab.db")?;
            Arc::new(sqlite::SqliteLab::open(db).await?)
        }
        BackendKind::Postgres => Arc::new(postgres::PgLab::connect(&target.url()?, 32).await?),
        BackendKind::Mysql => Arc::new(mysql::MySqlLab::connect(&target.url()?, 32).await?),
        BackendKind::Redis => Arc::new(redis::RedisLab::connect(&target.url()?).await?),
        BackendKind::Etcd => Arc::new(etcd::EtcdLab::connect(&target.url()?).await?),
        #[cfg(feature = "fdb")]
        BackendKind::Fdb => Arc::new(fdb::FdbLab::open(target.cluster_file.as_deref())?),
    })
}

// ------------------------------------------------------------------ the backends' interface

/// A leg of a payment: the debit of the customer and the credit of the merchant.
#[derive(Clone, Copy, Debug)]
pub enum Leg {
    Debit,
    Credit,
}

impl Leg {
    pub fn name(self) -> &'static str {
        match self {
            Leg::Debit => "debit",
            Leg::Credit => "credit",
        }
    }
}

/// Rows per payment found in a strategy's ledger.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub payment: String,
    pub debits: u64,
    pub credits: u64,
}

/// What the transactional strategy does inside the store's transaction.
#[derive(Clone, Debug)]
pub struct TxPayment {
    pub strategy: &'static str,
    pub payment: String,
    pub amount: i64,
    pub latency: Duration,
    /// The worker dies between the two legs: the transaction never commits.
    pub crash: bool,
    /// Counts every start of the operation's body (FoundationDB may run it more than once).
    pub executions: Arc<AtomicU64>,
}

impl TxPayment {
    /// Counts one start of the operation's body.
    pub fn started(&self) {
        self.executions.fetch_add(1, Ordering::Relaxed);
    }
}

/// The retryable failure of a transactional operation whose worker died before commit.
pub const WORKER_DIED: &str = "worker died before commit";

pub type TxAnswer = Result<Response<i64, String>, RunError<String>>;

/// Where a lab keeps the business side: the ledger, and the naive strategies' keys.
#[async_trait]
pub trait Ledger: Send + Sync {
    /// Clears everything the lab wrote before, the store's records included.
    async fn reset(&self) -> Result<(), Error>;
    /// Writes one ledger row; with `dedup`, a second row with the same dedup key is ignored
    /// (how a downstream system deduplicates on an idempotency key).
    async fn insert(
        &self,
        strategy: &str,
        payment: &str,
        leg: Leg,
        amount: i64,
        dedup: Option<&str>,
    ) -> Result<(), Error>;
    /// Check-then-insert: is the key recorded?
    async fn naive_seen(&self, strategy: &str, key: &str) -> Result<bool, Error>;
    /// Check-then-insert: record the key.
    async fn naive_mark(&self, strategy: &str, key: &str) -> Result<(), Error>;
    /// TTL cache: set the key if it is absent or expired (`SET NX EX`), atomically.
    async fn ttl_claim(
        &self,
        strategy: &str,
        key: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<bool, Error>;
    /// The ledger, per payment.
    async fn tally(&self, strategy: &str) -> Result<Vec<Tally>, Error>;
}

/// A backend the lab runs on: its store, its ledger, its transactional barrier.
#[async_trait]
pub trait LabBackend: Send + Sync {
    /// The backend's name in the report.
    fn name(&self) -> &'static str;
    /// The barrier's store (lease mode).
    fn store(&self) -> DynStore;
    /// The ledger and the naive strategies' keys.
    fn ledger(&self) -> &dyn Ledger;
    /// The transactional barrier with `policy`; `None` (the default) if the backend has
    /// none (its store does not declare `transactional`).
    async fn transactional(
        &self,
        _clock: &ManualClock,
        _key: &Key,
        _fp: Fingerprint,
        _p: TxPayment,
        _policy: TxPolicy,
    ) -> Option<TxAnswer> {
        None
    }
    /// Whether the store claims at commit under [`TxPolicy::Optimistic`] (the default: no,
    /// it runs it as `Wait`, so the optimistic strategy would repeat the transactional one
    /// and is left out).
    fn claims_at_commit(&self) -> bool {
        false
    }
}

/// Counts ledger rows given as (payment, leg name) pairs, for the stores that keep one key
/// per row.
pub fn tally_rows<P: AsRef<str>, L: AsRef<str>>(
    rows: impl IntoIterator<Item = (P, L)>,
) -> Vec<Tally> {
    let mut tally: std::collections::BTreeMap<String, Tally> = Default::default();
    for (payment, leg) in rows {
        let payment = payment.as_ref();
        let t = tally.entry(payment.to_string()).or_insert_with(|| Tally {
            payment: payment.to_string(),
            ..Tally::default()
        });
        if leg.as_ref() == Leg::Debit.name() {
            t.debits += 1;
        } else {
            t.credits += 1;
        }
    }
    tally.into_values().collect()
}

/// The key of a naive strategy's record of `key`.
pub fn lab_key(strategy: &str, key: &str) -> String {
    format!("{strategy}/{key}")
}

// ------------------------------------------------------------------ the workload

/// One planned payment request; every strategy replays the same plan.
#[derive(Clone, Debug)]
struct Planned {
    index: usize,
    payment: String,
    amount: i64,
    lost: bool,
    crash: bool,
    late: bool,
    reuse: bool,
}

fn plan(c: &LabConfig) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(c.seed);
    (0..c.payments)
        .map(|index| Planned {
            index,
            payment: format!("pay-{index:06}"),
            amount: rng.random_range(100..100_000),
            lost: rng.random_bool(c.lost),
            crash: rng.random_bool(c.crash),
            late: rng.random_bool(c.late),
            reuse: rng.random_bool(c.reuse),
        })
        .collect()
}

/// The strategies compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    CheckThenInsert,
    TtlCache,
    BarrierLease,
    BarrierTransactional,
    /// The transactional barrier with `TxPolicy::Optimistic`, on stores that claim at
    /// commit.
    BarrierOptimistic,
}

impl Strategy {
    pub const ALL: [Strategy; 5] = [
        Strategy::CheckThenInsert,
        Strategy::TtlCache,
        Strategy::BarrierLease,
        Strategy::BarrierTransactional,
        Strategy::BarrierOptimistic,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::CheckThenInsert => "check-then-insert",
            Strategy::TtlCache => "ttl-cache (24h)",
            Strategy::BarrierLease => "barrier (lease)",
            Strategy::BarrierTransactional => "barrier (transactional)",
            Strategy::BarrierOptimistic => "barrier (optimistic tx)",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Strategy::CheckThenInsert => "naive",
            Strategy::TtlCache => "ttl",
            Strategy::BarrierLease => "lease",
            Strategy::BarrierTransactional => "tx",
            Strategy::BarrierOptimistic => "opt",
        }
    }

    /// The barrier's strategies, whose violations fail the lab.
    pub fn is_barrier(self) -> bool {
        matches!(
            self,
            Strategy::BarrierLease | Strategy::BarrierTransactional | Strategy::BarrierOptimistic
        )
    }
}

/// How one request (one attempt) was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The operation ran and its result was stored.
    Executed,
    /// The stored result of an earlier execution.
    Replayed,
    /// The key was reused with another amount: refused (422).
    Mismatch,
    /// Another worker holds the key (409, retry after the given time).
    InProgress(Duration),
    /// The worker's lease ran out before it stored the result.
    LeaseLost,
    /// A retryable failure: the store's, the operation's (rolled back), a dead worker.
    Retryable,
    /// A permanent failure: retrying cannot help.
    Permanent,
}

impl Answer {
    fn of(e: &Error) -> Answer {
        match e {
            Error::Mismatch => Answer::Mismatch,
            Error::InProgress { retry_after } => Answer::InProgress(*retry_after),
            Error::LeaseLost => Answer::LeaseLost,
            e if e.is_retryable() => Answer::Retryable,
            _ => Answer::Permanent,
        }
    }

    fn of_result<T>(r: Result<T, Error>, ok: Answer) -> Answer {
        r.map_or_else(|e| Answer::of(&e), |_| ok)
    }
}

/// How a client's request ended, after its retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// Told that the payment succeeded (executed or replayed).
    Acknowledged,
    /// Told that it was refused (a mismatch or a permanent error).
    Refused,
    /// No definitive answer before the deadline.
    Unresolved,
}

const TTL: Duration = Duration::from_secs(24 * 3600);
const LEASE: Duration = Duration::from_secs(30);
/// A client's first backoff; it doubles up to [`MAX_BACKOFF`], and each wait is jittered.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(250);

struct Run {
    backend: Arc<dyn LabBackend>,
    strategy: Strategy,
    clock: ManualClock,
    barrier: Barrier<dyn idem::Store>,
    latency: Duration,
    deadline: Duration,
    /// Operation bodies started (the transactional operations count themselves).
    executions: Arc<AtomicU64>,
    counts: Counts,
    /// Per planned payment: a client was told it succeeded.
    acknowledged: Vec<AtomicBool>,
    /// Per planned payment: a client got a definitive answer for its own amount.
    settled: Vec<AtomicBool>,
}

impl Run {
    fn fp(amount: i64) -> Fingerprint {
        Fingerprint::of_bytes(format!("amount={amount}").as_bytes())
    }

    /// The two legs of a payment, as the lease-mode and naive operations perform them;
    /// `Ok(false)` if the worker died after the debit.
    async fn legs(
        &self,
        payment: &str,
        amount: i64,
        crash: bool,
        dedup: Option<(&Key, &Key)>,
    ) -> Result<bool, Error> {
        self.executions.fetch_add(1, Ordering::Relaxed);
        let tag = self.strategy.tag();
        self.backend
            .ledger()
            .insert(tag, payment, Leg::Debit, amount, dedup.map(|d| d.0.id()))
            .await?;
        tokio::time::sleep(self.latency).await;
        if crash {
            return Ok(false);
        }
        self.backend
            .ledger()
            .insert(tag, payment, Leg::Credit, amount, dedup.map(|d| d.1.id()))
            .await?;
        Ok(true)
    }

    /// One attempt of a request. A worker that died answers [`Answer::Retryable`]: its
    /// client sees the connection drop.
    async fn attempt(&self, p: &Planned, amount: i64, crash: bool) -> Answer {
        let tag = self.strategy.tag();
        let written = |r: Result<bool, Error>| match r {
            Ok(true) => None,
            Ok(false) => Some(Answer::Retryable),
            Err(e) => Some(Answer::of(&e)),
        };
        match self.strategy {
            Strategy::CheckThenInsert => {
                match self.backend.ledger().naive_seen(tag, &p.payment).await {
                    Ok(true) => return Answer::Replayed,
                    Ok(false) => {}
                    Err(e) => return Answer::of(&e),
                }
                if let Some(a) = written(self.legs(&p.payment, amount, crash, None).await) {
                    return a;
                }
                Answer::of_result(
                    self.backend.ledger().naive_mark(tag, &p.payment).await,
                    Answer::Executed,
                )
            }
            Strategy::TtlCache => {
                let now = self.clock.now().as_millis();
                match self
                    .backend
                    .ledger()
                    .ttl_claim(tag, &p.payment, now, TTL)
                    .await
                {
                    Ok(false) => return Answer::Replayed,
                    Ok(true) => {}
                    Err(e) => return Answer::of(&e),
                }
                written(self.legs(&p.payment, amount, crash, None).await)
                    .unwrap_or(Answer::Executed)
            }
            Strategy::BarrierLease => {
                let key = match Key::new("lab/payments", p.payment.clone()) {
                    Ok(key) => key,
                    Err(e) => return Answer::of(&e),
                };
                let handle = match self.barrier.begin(&key, Some(Self::fp(amount))).await {
                    Ok(Started::Acquired(handle)) => handle,
                    Ok(Started::Replay(_)) => return Answer::Replayed,
                    Err(e) => return Answer::of(&e),
                };
                let (debit, credit) = (handle.derive("debit"), handle.derive("credit"));
                let legs = self
                    .legs(&p.payment, amount, crash, Some((&debit, &credit)))
                    .await;
                if let Some(a) = written(legs) {
                    // The worker is gone (or its write failed): its lease stays until it
                    // expires, and the client's retries are told "in progress" meanwhile.
                    return a;
                }
                Answer::of_result(handle.complete(&amount).await, Answer::Executed)
            }
            Strategy::BarrierTransactional | Strategy::BarrierOptimistic => {
                let policy = if self.strategy == Strategy::BarrierOptimistic {
                    TxPolicy::Optimistic
                } else {
                    TxPolicy::Wait
                };
                let key = match Key::new(format!("lab/payments-{tag}"), p.payment.clone()) {
                    Ok(key) => key,
                    Err(e) => return Answer::of(&e),
                };
                let payment = TxPayment {
                    strategy: tag,
                    payment: p.payment.clone(),
                    amount,
                    latency: self.latency,
                    crash,
                    executions: Arc::clone(&self.executions),
                };
                match self
                    .backend
                    .transactional(&self.clock, &key, Self::fp(amount), payment, policy)
                    .await
                {
                    Some(Ok(r)) if r.replayed => Answer::Replayed,
                    Some(Ok(_)) => Answer::Executed,
                    Some(Err(RunError::Barrier(e))) => Answer::of(&e),
                    // The operation failed retryably and was rolled back.
                    Some(Err(RunError::Operation(_))) => Answer::Retryable,
                    None => Answer::Permanent,
                }
            }
        }
    }

    /// One attempt whose answer is counted but never reaches the client (a lost response).
    async fn unheard(&self, p: &Planned, crash: bool) {
        let a = self.attempt(p, p.amount, crash).await;
        self.counts.add(a);
    }

    /// A client's request: attempts with backoff until a definitive answer or the deadline,
    /// and what the client was told. The worker of the first attempt dies mid-operation if
    /// `crash`.
    async fn client(&self, p: &Planned, amount: i64, crash: bool) {
        let deadline = Instant::now() + self.deadline;
        let mut backoff = FIRST_BACKOFF;
        let mut crash = crash;
        let ended = loop {
            let a = self.attempt(p, amount, std::mem::take(&mut crash)).await;
            self.counts.add(a);
            let wait = match a {
                Answer::Executed | Answer::Replayed => break Ended::Acknowledged,
                Answer::Mismatch | Answer::Permanent => break Ended::Refused,
                // Not before the server's Retry-After.
                Answer::InProgress(retry_after) => retry_after.max(jitter(backoff)),
                Answer::LeaseLost | Answer::Retryable => jitter(backoff),
            };
            if Instant::now() + wait >= deadline {
                break Ended::Unresolved;
            }
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        };
        if ended == Ended::Unresolved {
            self.counts.unresolved.fetch_add(1, Ordering::Relaxed);
        }
        if amount == p.amount {
            if ended != Ended::Unresolved {
                self.settled[p.index].store(true, Ordering::Relaxed);
            }
            if ended == Ended::Acknowledged {
                self.acknowledged[p.index].store(true, Ordering::Relaxed);
            }
        }
    }

    /// Phase 1 for one payment: a lost response is retried at once while the original
    /// still runs; some workers die mid-operation; some keys come back with another amount.
    async fn first_delivery(&self, p: &Planned) {
        if p.lost {
            tokio::join!(self.unheard(p, p.crash), async {
                tokio::time::sleep(Duration::from_millis(1)).await;
                self.client(p, p.amount, false).await
            });
        } else {
            self.client(p, p.amount, p.crash).await;
        }
        if p.reuse {
            self.client(p, p.amount + 1, false).await;
        }
    }
}

/// A backoff with full jitter: uniformly between half and all of it.
fn jitter(backoff: Duration) -> Duration {
    backoff.mul_f64(rand::rng().random_range(0.5..=1.0))
}

fn bar(total: u64, quiet: bool, label: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>26} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    pb
}

/// Which phase the clients play.
#[derive(Clone, Copy)]
enum Phase {
    /// Every payment, with lost responses, crashes and reused keys.
    First,
    /// Every payment again, once every dead worker's lease has expired.
    Redelivery,
    /// The late share, 26 hours later.
    Late,
}

/// Runs the plan once with `strategy` and judges the ledger.
async fn run_strategy(
    backend: Arc<dyn LabBackend>,
    strategy: Strategy,
    config: &LabConfig,
    quiet: bool,
) -> Result<StrategyReport, Error> {
    let store = backend.store();
    let transactional = matches!(
        strategy,
        Strategy::BarrierTransactional | Strategy::BarrierOptimistic
    );
    if transactional && !store.guarantees().transactional {
        return Ok(StrategyReport::not_applicable(strategy, backend.name()));
    }
    let planned = Arc::new(plan(config));
    let clock = ManualClock::new(SystemClock.now());
    let run = Arc::new(Run {
        backend: Arc::clone(&backend),
        strategy,
        clock: clock.clone(),
        barrier: Barrier::new(Arc::clone(&store))
            .with_clock(Arc::new(clock))
            .with_lease(LEASE),
        latency: Duration::from_millis(config.latency_ms),
        deadline: Duration::from_millis(config.deadline_ms),
        executions: Arc::default(),
        counts: Counts::default(),
        acknowledged: planned.iter().map(|_| AtomicBool::new(false)).collect(),
        settled: planned.iter().map(|_| AtomicBool::new(false)).collect(),
    });
    let late = planned.iter().filter(|p| p.late).count() as u64;
    let pb = bar(planned.len() as u64 * 2 + late, quiet, strategy.name());
    let started = Instant::now();
    let clients = config.clients.max(1);
    play(&run, &planned, clients, &pb, Phase::First).await?;
    run.clock.advance(LEASE + Duration::from_secs(1));
    play(&run, &planned, clients, &pb, Phase::Redelivery).await?;
    run.clock.advance(Duration::from_secs(26 * 3600));
    play(&run, &planned, clients, &pb, Phase::Late).await?;
    // Every planned delivery ticked the bar: it ends full, and stays on screen at 100%.
    pb.finish();
    let seconds = started.elapsed().as_secs_f64();
    let tally = backend.ledger().tally(strategy.tag()).await?;
    Ok(StrategyReport::judge(
        &run,
        &planned,
        &tally,
        backend.name(),
        seconds,
    ))
}

/// `clients` concurrent clients play `phase` over their share of the plan.
async fn play(
    run: &Arc<Run>,
    planned: &Arc<Vec<Planned>>,
    clients: usize,
    pb: &ProgressBar,
    phase: Phase,
) -> Result<(), Error> {
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (run, planned, pb) = (Arc::clone(run), Arc::clone(planned), pb.clone());
            tokio::spawn(async move {
                for p in planned.iter().skip(c).step_by(clients) {
                    match phase {
                        Phase::First => run.first_delivery(p).await,
                        Phase::Redelivery => run.client(p, p.amount, false).await,
                        Phase::Late if p.late => run.client(p, p.amount, false).await,
                        Phase::Late => continue,
                    }
                    pb.inc(1);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await
            .map_err(|e| Error::Config(format!("a lab client panicked: {e}")))?;
    }
    Ok(())
}
