//! Metric names, emitted through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! | name | kind | unit | labels | what |
//! |---|---|---|---|---|
//! | `idem_begin_total` | counter | count | `result` | every claim attempt: `acquired`, `reclaimed` (a stale lease taken over), `replayed`, `in_progress`, `mismatch` or `error`. Hit rate = `replayed` / all |
//! | `idem_lease_lost_total` | counter | count | — | fenced writes refused because the lease was lost (a zombie worker fenced off) |
//! | `idem_records` | gauge | count | `state`, `source` | records per state, set by [`Barrier::observe_stats`](crate::Barrier::observe_stats) (`source="count"`) or [`Barrier::observe_estimated_stats`](crate::Barrier::observe_estimated_stats) (`source="estimate"` where the store has a cheap estimate) |
//! | `idem_call_seconds` | histogram | seconds | `mode`, `result` | a whole barrier call ([`Barrier::execute`](crate::Barrier::execute) `mode="lease"`, [`Barrier::transaction`](crate::Barrier::transaction) `mode="transactional"`), by how it ended: `executed`, `replayed`, `in_progress`, `mismatch`, `operation_error` (the operation's retryable failure) or `error` |
//! | `idem_store_seconds` | histogram | seconds | `op` | one store round trip made by the barrier: `begin`, `complete`, `fail`, `release`, `extend` |
//! | `idem_wait_seconds` | histogram | seconds | `result` | a duplicate's wait for the key's holder ([`InFlight::Wait`](crate::InFlight::Wait)), by how it ended: `replayed`, `acquired` (the holder released the key) or `in_progress` (the wait ran out); only calls that waited |
//!
//! Call [`describe`] once at start-up to register descriptions and units with the installed
//! recorder (a Prometheus exporter shows them as `# HELP` lines). Labels never carry keys,
//! payloads or outcome bytes.

use std::future::Future;
use std::time::{Duration, Instant};

use metrics::Unit;

use crate::error::{Error, RunError};
use crate::outcome::Response;
use crate::record::Stats;

/// Counter of claim attempts, labelled `result`.
pub const BEGIN_TOTAL: &str = "idem_begin_total";
/// Counter of fenced writes refused with `LeaseLost`.
pub const LEASE_LOST_TOTAL: &str = "idem_lease_lost_total";
/// Gauge of records per state, labelled `state`.
pub const RECORDS: &str = "idem_records";
/// Histogram of whole barrier calls in seconds, labelled `mode` and `result`.
pub const CALL_SECONDS: &str = "idem_call_seconds";
/// Histogram of the barrier's store round trips in seconds, labelled `op`.
pub const STORE_SECONDS: &str = "idem_store_seconds";
/// Histogram of duplicates' waits for the key's holder in seconds, labelled `result`.
pub const WAIT_SECONDS: &str = "idem_wait_seconds";

/// Registers every metric's description and unit with the installed recorder.
///
/// ```
/// idem_core::metrics::describe(); // a no-op without a recorder
/// ```
pub fn describe() {
    metrics::describe_counter!(
        BEGIN_TOTAL,
        Unit::Count,
        "Claim attempts by result: acquired, reclaimed, replayed, in_progress, mismatch, error."
    );
    metrics::describe_counter!(
        LEASE_LOST_TOTAL,
        Unit::Count,
        "Fenced writes refused because the lease had been lost to another worker."
    );
    metrics::describe_gauge!(
        RECORDS,
        Unit::Count,
        "Stored idempotency records by state (as of the last observe_stats)."
    );
    metrics::describe_histogram!(
        CALL_SECONDS,
        Unit::Seconds,
        "Duration of whole barrier calls by mode (lease, transactional) and result."
    );
    metrics::describe_histogram!(
        WAIT_SECONDS,
        Unit::Seconds,
        "Duration of duplicates' waits for the key's holder, by result."
    );
    metrics::describe_histogram!(
        STORE_SECONDS,
        Unit::Seconds,
        "Duration of the barrier's store round trips by operation."
    );
}

pub(crate) fn begin(result: &'static str) {
    metrics::counter!(BEGIN_TOTAL, "result" => result).increment(1);
}

pub(crate) fn lease_lost() {
    metrics::counter!(LEASE_LOST_TOTAL).increment(1);
}

pub(crate) fn records(stats: &Stats, source: &'static str) {
    for (state, n) in [
        ("in_progress", stats.in_progress),
        ("completed", stats.completed),
        ("failed", stats.failed),
    ] {
        metrics::gauge!(RECORDS, "state" => state, "source" => source).set(n as f64);
    }
}

/// How a barrier call ended, as the `result` label of [`CALL_SECONDS`].
pub(crate) fn call_result<T, F, E>(result: &Result<Response<T, F>, RunError<E>>) -> &'static str {
    match result {
        Ok(r) if r.replayed => "replayed",
        Ok(_) => "executed",
        Err(RunError::Operation(_)) => "operation_error",
        Err(RunError::Barrier(Error::InProgress { .. })) => "in_progress",
        Err(RunError::Barrier(Error::Mismatch)) => "mismatch",
        Err(RunError::Barrier(_)) => "error",
    }
}

pub(crate) fn call(mode: &'static str, result: &'static str, took: Duration) {
    metrics::histogram!(CALL_SECONDS, "mode" => mode, "result" => result)
        .record(took.as_secs_f64());
}

pub(crate) fn wait(result: &'static str, took: Duration) {
    metrics::histogram!(WAIT_SECONDS, "result" => result).record(took.as_secs_f64());
}

/// Awaits one store round trip and records its duration under `op`.
pub(crate) async fn store<T>(op: &'static str, call: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let output = call.await;
    metrics::histogram!(STORE_SECONDS, "op" => op).record(started.elapsed().as_secs_f64());
    output
}
