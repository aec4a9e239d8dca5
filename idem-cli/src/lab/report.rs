//! How a strategy's run is judged, from the ledger (the ground truth) and from what its
//! clients were told, and how the results are printed.
//!
//! Three different things are reported separately:
//!
//! - violations: an effect executed twice (`duplicates`), a payment with one leg and not
//!   the other (`partial`), a payment a client was told succeeded that is not in the
//!   ledger (`acked-missing`). A barrier strategy with any of them fails the lab.
//! - unresolved requests: a client that got no definitive answer before its deadline.
//!   That is liveness, shown but not a violation; a payment whose clients all gave up is
//!   not judged partial in lease mode (its recovery is a retry that never came), while in
//!   transactional mode a half-written payment is a violation whatever the client saw.
//! - answers by class: executed, replayed, rejected (mismatch, 422), in progress (409),
//!   lease lost, retryable, permanent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::{Answer, LabConfig, Planned, Run, Strategy, Tally};

/// Answers served, by class, and requests that ended unresolved.
#[derive(Debug, Default)]
pub struct Counts {
    executed: AtomicU64,
    replayed: AtomicU64,
    mismatch: AtomicU64,
    in_progress: AtomicU64,
    lease_lost: AtomicU64,
    retryable: AtomicU64,
    permanent: AtomicU64,
    pub unresolved: AtomicU64,
}

impl Counts {
    pub fn add(&self, a: Answer) {
        let counter = match a {
            Answer::Executed => &self.executed,
            Answer::Replayed => &self.replayed,
            Answer::Mismatch => &self.mismatch,
            Answer::InProgress(_) => &self.in_progress,
            Answer::LeaseLost => &self.lease_lost,
            Answer::Retryable => &self.retryable,
            Answer::Permanent => &self.permanent,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// One strategy's results.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StrategyReport {
    pub strategy: String,
    pub backend: String,
    /// False if the backend has no such mode (the transactional barrier on Redis, etcd).
    pub applicable: bool,
    pub payments: usize,
    /// Attempts served, retries included.
    pub requests: u64,
    pub executions: u64,
    // Violations (for a barrier strategy).
    pub duplicate_effects: u64,
    pub payments_duplicated: u64,
    pub duplicate_rate: f64,
    pub partial_writes: u64,
    pub acknowledged_missing: u64,
    // Liveness.
    pub unresolved_requests: u64,
    pub unresolved_payments: u64,
    // Answers by class.
    pub executed: u64,
    pub replays: u64,
    pub mismatches_rejected: u64,
    pub in_progress: u64,
    pub lease_lost: u64,
    pub retryable_errors: u64,
    pub permanent_errors: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
}

impl StrategyReport {
    /// The row of a strategy the backend cannot run.
    pub fn not_applicable(strategy: Strategy, backend: &str) -> Self {
        StrategyReport {
            strategy: strategy.name().to_string(),
            backend: backend.to_string(),
            applicable: false,
            ..StrategyReport::default()
        }
    }

    /// Judges a finished run against its ledger.
    pub(super) fn judge(
        run: &Run,
        planned: &[Planned],
        tally: &[Tally],
        backend: &str,
        seconds: f64,
    ) -> Self {
        let ledger: HashMap<&str, (u64, u64)> = tally
            .iter()
            .map(|t| (t.payment.as_str(), (t.debits, t.credits)))
            .collect();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counts = &run.counts;
        let mut r = StrategyReport {
            strategy: run.strategy.name().to_string(),
            backend: backend.to_string(),
            applicable: true,
            payments: planned.len(),
            executions: get(&run.executions),
            unresolved_requests: get(&counts.unresolved),
            executed: get(&counts.executed),
            replays: get(&counts.replayed),
            mismatches_rejected: get(&counts.mismatch),
            in_progress: get(&counts.in_progress),
            lease_lost: get(&counts.lease_lost),
            retryable_errors: get(&counts.retryable),
            permanent_errors: get(&counts.permanent),
            seconds,
            ..StrategyReport::default()
        };
        r.requests = r.executed
            + r.replays
            + r.mismatches_rejected
            + r.in_progress
            + r.lease_lost
            + r.retryable_errors
            + r.permanent_errors;
        let atomic = matches!(
            run.strategy,
            Strategy::BarrierTransactional | Strategy::BarrierOptimistic
        );
        for p in planned {
            let (d, c) = ledger.get(p.payment.as_str()).copied().unwrap_or((0, 0));
            let settled = run.settled[p.index].load(Ordering::Relaxed);
            let acknowledged = run.acknowledged[p.index].load(Ordering::Relaxed);
            r.duplicate_effects += d.saturating_sub(1) + c.saturating_sub(1);
            r.payments_duplicated += u64::from(d > 1 || c > 1);
            r.partial_writes += u64::from(d != c && (settled || atomic));
            r.acknowledged_missing += u64::from(acknowledged && d == 0 && c == 0);
            r.unresolved_payments += u64::from(!settled);
        }
        r.duplicate_rate = r.payments_duplicated as f64 / planned.len().max(1) as f64;
        r.requests_per_second = r.requests as f64 / seconds.max(1e-9);
        r
    }
}

/// Prints the side-by-side table.
pub fn print_table(reports: &[StrategyReport], config: &LabConfig) {
    println!(
        "\nphantom-write lab: {} payments, {} clients, {:.0}% lost responses, {:.0}% worker crashes, \
         {:.0}% redelivered 26 h late, {:.0}% keys reused with another amount, client deadline {} ms, \
         seed {}",
        config.payments,
        config.clients,
        config.lost * 100.0,
        config.crash * 100.0,
        config.late * 100.0,
        config.reuse * 100.0,
        config.deadline_ms,
        config.seed
    );
    println!(
        "{:<8} {:<23} {:>8} {:>5} | {:>5} {:>6} {:>7} {:>6} | {:>10} | {:>5} {:>6} {:>8} {:>5} {:>5} {:>5} {:>4} | {:>6}",
        "backend",
        "strategy",
        "requests",
        "execs",
        "dups",
        "dup%",
        "partial",
        "ackmis",
        "unresolved",
        "exec",
        "replay",
        "rejected",
        "409",
        "lease",
        "retry",
        "perm",
        "req/s"
    );
    for r in reports {
        if !r.applicable {
            println!(
                "{:<8} {:<23} not applicable: {} has no transactional mode",
                r.backend, r.strategy, r.backend
            );
            continue;
        }
        println!(
            "{:<8} {:<23} {:>8} {:>5} | {:>5} {:>5.1}% {:>7} {:>6} | {:>10} | {:>5} {:>6} {:>8} {:>5} {:>5} {:>5} {:>4} | {:>6.0}",
            r.backend,
            r.strategy,
            r.requests,
            r.executions,
            r.duplicate_effects,
            r.duplicate_rate * 100.0,
            r.partial_writes,
            r.acknowledged_missing,
            r.unresolved_requests,
            r.executed,
            r.replays,
            r.mismatches_rejected,
            r.in_progress,
            r.lease_lost,
            r.retryable_errors,
            r.permanent_errors,
            r.requests_per_second
        );
    }
    println!(
        "\nViolations (a barrier strategy with any fails the lab): dups = ledger rows beyond one debit \
         and one credit per payment; partial = payments whose debits and credits differ (in lease \
         mode only once a client got a definitive answer); ackmis = payments a client was told \
         succeeded that are not in the ledger. Liveness, not a violation: unresolved = requests with \
         no definitive answer before the client's deadline. Answers by class: exec, replay, rejected \
         (key reused with another amount, 422), 409 (in progress), lease (lease lost), retry \
         (retryable error, dead worker), perm (permanent error). Ground truth is the ledger."
    );
}

/// The failure check: a barrier strategy must show no duplicate, no partial write and no
/// acknowledged payment missing from the ledger. Unresolved requests are not violations.
pub fn barrier_violations(reports: &[StrategyReport]) -> Vec<String> {
    reports
        .iter()
        .filter(|r| r.applicable && is_barrier(&r.strategy))
        .filter(|r| r.duplicate_effects > 0 || r.partial_writes > 0 || r.acknowledged_missing > 0)
        .map(|r| {
            format!(
                "{} on {}: {} duplicates, {} partial, {} acknowledged but missing \
                 ({} unresolved requests, not a violation)",
                r.strategy,
                r.backend,
                r.duplicate_effects,
                r.partial_writes,
                r.acknowledged_missing,
                r.unresolved_requests
            )
        })
        .collect()
}

fn is_barrier(name: &str) -> bool {
    Strategy::ALL
        .iter()
        .any(|s| s.is_barrier() && s.name() == name)
}
