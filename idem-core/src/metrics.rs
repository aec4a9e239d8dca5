//! Metric names, emitted through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! - `idem_begin_total{result}`: every claim attempt, labelled `acquired`, `reclaimed`
//!   (a stale lease taken over: the stale-reclaim count), `replayed`, `in_progress`,
//!   `mismatch` or `error`. Hit rate = `replayed` / all.
//! - `idem_lease_lost_total`: fenced writes refused because the lease was lost.
//! - `idem_records{state}`: records per state, set by
//!   [`Barrier::observe_stats`](crate::Barrier::observe_stats) (status distribution).

use crate::record::Stats;

/// Counter of claim attempts, labelled `result`.
pub const BEGIN_TOTAL: &str = "idem_begin_total";
/// Counter of fenced writes refused with `LeaseLost`.
pub const LEASE_LOST_TOTAL: &str = "idem_lease_lost_total";
/// Gauge of records per state, labelled `state`.
pub const RECORDS: &str = "idem_records";

pub(crate) fn begin(result: &'static str) {
    metrics::counter!(BEGIN_TOTAL, "result" => result).increment(1);
}

pub(crate) fn lease_lost() {
    metrics::counter!(LEASE_LOST_TOTAL).increment(1);
}

pub(crate) fn records(stats: &Stats) {
    metrics::gauge!(RECORDS, "state" => "in_progress").set(stats.in_progress as f64);
    metrics::gauge!(RECORDS, "state" => "completed").set(stats.completed as f64);
    metrics::gauge!(RECORDS, "state" => "failed").set(stats.failed as f64);
}
