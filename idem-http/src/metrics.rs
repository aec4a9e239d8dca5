//! Metric names of the layer, emitted through the [`metrics`](https://docs.rs/metrics)
//! facade (the barrier's own `idem_*` metrics come on top, see [`idem_core::metrics`]).
//!
//! - `idem_http_requests_total{outcome}`: every request the layer saw, labelled `executed`
//!   (the handler ran and its response was stored), `replayed`, `released` (the handler ran
//!   and the policy released the key), `unguarded` (no key on an optional route),
//!   `service-error`, or a problem name (`idempotency-key-missing`,
//!   `idempotency-key-malformed`, `idempotency-key-reused` for mismatches,
//!   `idempotency-key-in-flight` for conflicts, `request-too-large`,
//!   `request-body-unreadable`, `response-body-failed`, `idempotency-store`).
//! - `idem_http_request_duration_seconds{outcome}`: histogram of the time spent in the
//!   layer, the handler and any wait for an in-flight duplicate included.
//! - `idem_http_heartbeats_total`: lease extensions made for long-running handlers.
//! - `idem_http_stored_body_omitted_total`: responses whose body was too large to store.
//!
//! Waits of duplicates for an in-flight request ([`idem_core::InFlight::Wait`]) are measured
//! by the barrier: `idem_wait_seconds{result}`, with `result` `replayed`, `acquired` or
//! `in_progress` (the wait ran out: 409); see [`idem_core::metrics`].

use std::time::Instant;

/// Counter of requests, labelled `outcome`.
pub const REQUESTS_TOTAL: &str = "idem_http_requests_total";
/// Histogram of request durations in seconds, labelled `outcome`.
pub const REQUEST_DURATION_SECONDS: &str = "idem_http_request_duration_seconds";
/// Counter of lease extensions.
pub const HEARTBEATS_TOTAL: &str = "idem_http_heartbeats_total";
/// Counter of responses stored without their body.
pub const STORED_BODY_OMITTED_TOTAL: &str = "idem_http_stored_body_omitted_total";

pub(crate) fn request(outcome: &'static str, started: Instant) {
    metrics::counter!(REQUESTS_TOTAL, "outcome" => outcome).increment(1);
    metrics::histogram!(REQUEST_DURATION_SECONDS, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

pub(crate) fn heartbeat() {
    metrics::counter!(HEARTBEATS_TOTAL).increment(1);
}

pub(crate) fn body_omitted() {
    metrics::counter!(STORED_BODY_OMITTED_TOTAL).increment(1);
}
