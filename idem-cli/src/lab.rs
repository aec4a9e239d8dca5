//! The phantom-write lab: the seeds' experiment, on a real backend, strategy by strategy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem::{Barrier, Clock, Error, Fingerprint, Key, ManualClock, RunError, Started, SystemClock};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::backend::{LabBackend, Leg, TxPayment};

/// The workload's knobs.
#[derive(Clone, Debug, Serialize)]
pub struct LabConfig {
    pub payments: usize,
    pub clients: usize,
    /// Share of requests whose response is lost after the server applied it: the client
    /// retries at once, while the original may still be running.
    pub lost: f64,
    /// Share of requests whose worker dies between the debit and the credit.
    pub crash: f64,
    /// Share of requests redelivered after a 26-hour clock jump.
    pub late: f64,
    /// Share of keys reused later with a different amount.
    pub reuse: f64,
    /// Simulated latency of the payment network between the two legs.
    pub latency_ms: u64,
    pub seed: u64,
}

/// One planned payment request; every strategy replays the same plan.
#[derive(Clone, Debug)]
struct Planned {
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
        .map(|i| Planned {
            payment: format!("pay-{i:06}"),
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
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::CheckThenInsert,
        Strategy::TtlCache,
        Strategy::BarrierLease,
        Strategy::BarrierTransactional,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::CheckThenInsert => "check-then-insert",
            Strategy::TtlCache => "ttl-cache (24h)",
            Strategy::BarrierLease => "barrier (lease)",
            Strategy::BarrierTransactional => "barrier (transactional)",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Strategy::CheckThenInsert => "naive",
            Strategy::TtlCache => "ttl",
            Strategy::BarrierLease => "lease",
            Strategy::BarrierTransactional => "tx",
        }
    }
}

/// How far an operation got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Legs {
    /// Both legs are written.
    Written,
    /// The worker died after the debit.
    WorkerDied,
}

/// How one request was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Executed,
    Replayed,
    Conflict,
    Mismatch,
    Failed,
}

/// One strategy's results, from the ledger (ground truth) and from the answers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StrategyReport {
    pub strategy: String,
    pub backend: String,
    pub payments: usize,
    pub requests: u64,
    pub executions: u64,
    pub duplicate_effects: u64,
    pub payments_duplicated: u64,
    pub duplicate_rate: f64,
    pub partial_writes: u64,
    pub missing_payments: u64,
    pub replays: u64,
    pub conflicts: u64,
    pub mismatches_rejected: u64,
    pub errors: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
}

const TTL: Duration = Duration::from_secs(24 * 3600);
const LEASE: Duration = Duration::from_secs(30);

struct Run {
    backend: Arc<dyn LabBackend>,
    strategy: Strategy,
    clock: ManualClock,
    barrier: Barrier<dyn idem::Store>,
    latency: Duration,
    /// Operation bodies started (the transactional operations count themselves).
    executions: Arc<AtomicU64>,
}

impl Run {
    fn fp(amount: i64) -> Fingerprint {
        Fingerprint::of_bytes(format!("amount={amount}").as_bytes())
    }

    /// The two legs of a payment, as the strategy's operation performs them.
    async fn legs(
        &self,
        payment: &str,
        amount: i64,
        crash: bool,
        dedup: Option<(&Key, &Key)>,
    ) -> Result<Legs, Error> {
        self.executions.fetch_add(1, Ordering::Relaxed);
        let tag = self.strategy.tag();
        self.backend
            .insert(tag, payment, Leg::Debit, amount, dedup.map(|d| d.0.id()))
            .await?;
        tokio::time::sleep(self.latency).await;
        if crash {
            return Ok(Legs::WorkerDied);
        }
        self.backend
            .insert(tag, payment, Leg::Credit, amount, dedup.map(|d| d.1.id()))
            .await?;
        Ok(Legs::Written)
    }

    async fn request(&self, p: &Planned, amount: i64, crash: bool) -> Answer {
        let tag = self.strategy.tag();
        match self.strategy {
            Strategy::CheckThenInsert => {
                match self.backend.naive_seen(tag, &p.payment).await {
                    Ok(true) => return Answer::Replayed,
                    Ok(false) => {}
                    Err(_) => return Answer::Failed,
                }
                if self.legs(&p.payment, amount, crash, None).await.ok() != Some(Legs::Written) {
                    return Answer::Failed;
                }
                match self.backend.naive_mark(tag, &p.payment).await {
                    Ok(()) => Answer::Executed,
                    Err(_) => Answer::Failed,
                }
            }
            Strategy::TtlCache => {
                let now = self.clock.now().as_millis();
                match self.backend.ttl_claim(tag, &p.payment, now, TTL).await {
                    Ok(false) => return Answer::Replayed,
                    Ok(true) => {}
                    Err(_) => return Answer::Failed,
                }
                match self.legs(&p.payment, amount, crash, None).await {
                    Ok(Legs::Written) => Answer::Executed,
                    Ok(Legs::WorkerDied) | Err(_) => Answer::Failed,
                }
            }
            Strategy::BarrierLease => {
                let Ok(key) = Key::new("lab/payments", p.payment.clone()) else {
                    return Answer::Failed;
                };
                let handle = match self.barrier.begin(&key, Some(Self::fp(amount))).await {
                    Ok(Started::Acquired(handle)) => handle,
                    Ok(Started::Replay(_)) => return Answer::Replayed,
                    Err(Error::InProgress { .. }) => return Answer::Conflict,
                    Err(Error::Mismatch) => return Answer::Mismatch,
                    Err(_) => return Answer::Failed,
                };
                let (debit, credit) = (handle.derive("debit"), handle.derive("credit"));
                if self
                    .legs(&p.payment, amount, crash, Some((&debit, &credit)))
                    .await
                    .ok()
                    != Some(Legs::Written)
                {
                    // The worker is gone: its lease stays until it expires.
                    return Answer::Failed;
                }
                match handle.complete(&amount).await {
                    Ok(()) => Answer::Executed,
                    Err(_) => Answer::Failed,
                }
            }
            Strategy::BarrierTransactional => {
                let Ok(key) = Key::new("lab/payments-tx", p.payment.clone()) else {
                    return Answer::Failed;
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
                    .transactional(&self.clock, &key, Self::fp(amount), payment)
                    .await
                {
                    Some(Ok(r)) if r.replayed => Answer::Replayed,
                    Some(Ok(_)) => Answer::Executed,
                    Some(Err(RunError::Barrier(Error::Mismatch))) => Answer::Mismatch,
                    Some(Err(RunError::Barrier(Error::InProgress { .. }))) => Answer::Conflict,
                    _ => Answer::Failed,
                }
            }
        }
    }
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

/// Runs the plan once with `strategy` and reads the ledger.
pub async fn run_strategy(
    backend: Arc<dyn LabBackend>,
    strategy: Strategy,
    config: &LabConfig,
    quiet: bool,
) -> Result<Option<StrategyReport>, Error> {
    let store = backend.store();
    let clock = ManualClock::new(SystemClock.now());
    let planned = plan(config);
    if strategy == Strategy::BarrierTransactional && !store.guarantees().transactional {
        return Ok(None);
    }
    let run = Arc::new(Run {
        backend: Arc::clone(&backend),
        strategy,
        clock: clock.clone(),
        barrier: Barrier::new(Arc::clone(&store))
            .with_clock(Arc::new(clock.clone()))
            .with_lease(LEASE),
        latency: Duration::from_millis(config.latency_ms),
        executions: Arc::default(),
    });
    let answers: Arc<std::sync::Mutex<Vec<Answer>>> = Arc::default();
    let pb = bar(planned.len() as u64 * 2, quiet, strategy.name());
    let started = Instant::now();

    // Phase 1: concurrent clients; lost responses are retried at once, while the original
    // still runs; some workers die mid-operation; some keys come back with another amount.
    let planned = Arc::new(planned);
    let clients = config.clients.max(1);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (run, planned, answers, pb) = (
            Arc::clone(&run),
            Arc::clone(&planned),
            Arc::clone(&answers),
            pb.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for p in planned.iter().skip(c).step_by(clients) {
                let mut got = Vec::new();
                if p.lost {
                    let (a, b) = tokio::join!(run.request(p, p.amount, p.crash), async {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        run.request(p, p.amount, false).await
                    });
                    got.extend([a, b]);
                } else {
                    got.push(run.request(p, p.amount, p.crash).await);
                }
                if p.reuse {
                    got.push(run.request(p, p.amount + 1, false).await);
                }
                answers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(got);
                pb.inc(1);
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::Config(format!("a lab client panicked: {e}")))?;
    }

    // Phase 2: the lease of every dead worker expires; the clients retry every request.
    run.clock.advance(LEASE + Duration::from_secs(1));
    retry_all(&run, &planned, &answers, clients, &pb, |_| true).await?;

    // Phase 3: 26 hours later the broker redelivers a share of the messages.
    run.clock.advance(Duration::from_secs(26 * 3600));
    retry_all(&run, &planned, &answers, clients, &pb, |p| p.late).await?;
    pb.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    let tally: HashMap<String, (u64, u64)> = backend
        .tally(strategy.tag())
        .await?
        .into_iter()
        .map(|t| (t.payment, (t.debits, t.credits)))
        .collect();
    let answers = answers.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let count = |a: Answer| answers.iter().filter(|&&x| x == a).count() as u64;
    let mut r = StrategyReport {
        strategy: strategy.name().to_string(),
        backend: backend.name().to_string(),
        payments: planned.len(),
        requests: answers.len() as u64,
        executions: run.executions.load(Ordering::Relaxed),
        replays: count(Answer::Replayed),
        conflicts: count(Answer::Conflict),
        mismatches_rejected: count(Answer::Mismatch),
        errors: count(Answer::Failed),
        seconds,
        ..StrategyReport::default()
    };
    for p in planned.iter() {
        let (d, c) = tally.get(&p.payment).copied().unwrap_or((0, 0));
        r.duplicate_effects += d.saturating_sub(1) + c.saturating_sub(1);
        r.payments_duplicated += u64::from(d > 1 || c > 1);
        r.partial_writes += u64::from(d != c);
        r.missing_payments += u64::from(d == 0 && c == 0);
    }
    r.duplicate_rate = r.payments_duplicated as f64 / planned.len().max(1) as f64;
    r.requests_per_second = r.requests as f64 / seconds.max(1e-9);
    Ok(Some(r))
}

async fn retry_all(
    run: &Arc<Run>,
    planned: &Arc<Vec<Planned>>,
    answers: &Arc<std::sync::Mutex<Vec<Answer>>>,
    clients: usize,
    pb: &ProgressBar,
    which: fn(&Planned) -> bool,
) -> Result<(), Error> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (run, planned, answers, pb) = (
            Arc::clone(run),
            Arc::clone(planned),
            Arc::clone(answers),
            pb.clone(),
        );
        tasks.push(tokio::spawn(async move {
            for p in planned.iter().skip(c).step_by(clients).filter(|p| which(p)) {
                let a = run.request(p, p.amount, false).await;
                answers.lock().unwrap_or_else(|e| e.into_inner()).push(a);
                pb.inc(1);
            }
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| Error::Config(format!("a lab client panicked: {e}")))?;
    }
    Ok(())
}

/// Prints the side-by-side table.
pub fn print_table(reports: &[StrategyReport], config: &LabConfig) {
    println!(
        "\nphantom-write lab: {} payments, {} clients, {:.0}% lost responses, {:.0}% worker crashes, \
         {:.0}% redelivered 26 h late, {:.0}% keys reused with another amount, seed {}",
        config.payments,
        config.clients,
        config.lost * 100.0,
        config.crash * 100.0,
        config.late * 100.0,
        config.reuse * 100.0,
        config.seed
    );
    println!(
        "{:<9} {:<24} {:>8} {:>6} {:>10} {:>9} {:>8} {:>7} {:>7} {:>9} {:>8} {:>8} {:>8}",
        "backend",
        "strategy",
        "requests",
        "execs",
        "duplicates",
        "dup rate",
        "partial",
        "missing",
        "replays",
        "conflicts",
        "rejected",
        "errors",
        "req/s"
    );
    for r in reports {
        println!(
            "{:<9} {:<24} {:>8} {:>6} {:>10} {:>8.2}% {:>8} {:>7} {:>7} {:>9} {:>8} {:>8} {:>8.0}",
            r.backend,
            r.strategy,
            r.requests,
            r.executions,
            r.duplicate_effects,
            r.duplicate_rate * 100.0,
            r.partial_writes,
            r.missing_payments,
            r.replays,
            r.conflicts,
            r.mismatches_rejected,
            r.errors,
            r.requests_per_second
        );
    }
    println!(
        "\nduplicates: extra ledger rows beyond one debit and one credit per payment; partial: payments \
         whose debits and credits differ; missing: payments never written; rejected: reused keys \
         refused with 422. Ground truth is the ledger."
    );
}

/// For the failure check: a barrier strategy must show no duplicate and no partial write.
pub fn barrier_violations(reports: &[StrategyReport]) -> Vec<String> {
    reports
        .iter()
        .filter(|r| r.strategy.starts_with("barrier"))
        .filter(|r| r.duplicate_effects > 0 || r.partial_writes > 0 || r.missing_payments > 0)
        .map(|r| {
            format!(
                "{} on {}: {} duplicates, {} partial, {} missing",
                r.strategy, r.backend, r.duplicate_effects, r.partial_writes, r.missing_payments
            )
        })
        .collect()
}
