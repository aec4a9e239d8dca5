//! An edge-case auditor for any HTTP API's idempotency.
//!
//! "A unique key on a header" is not idempotency; the edge cases decide. [`Audit`] probes
//! one endpoint the way real clients and networks hit it — identical requests
//! milliseconds apart, a retry after completion and after delays, a connection dropped
//! while the request is in flight, the same key with a changed body, a missing or empty
//! key, the same key under two tenants, a retry after the retention period — and judges
//! each probe with an effect oracle: the resource ids in the responses (a JSON pointer,
//! default `/id`) and, optionally, an effect count read from an endpoint before and after.
//! It works on any HTTP API, whether or not it uses idem.
//!
//! The auditor only ever sends to the URL it was given: every request goes through one
//! function that takes the configured URL, redirects are not followed, and a count URL
//! must share the audited URL's scheme, host and port. Every request count and duration is
//! bounded ([`AuditConfig::max_requests`], [`AuditConfig::max_duration`], per-request
//! [`AuditConfig::timeout`]).
//!
//! ```
//! use idem_audit::{Audit, AuditConfig, ProbeKind};
//!
//! let mut config = AuditConfig::new("http://127.0.0.1:8080/payments");
//! config.body = br#"{"amount": 100}"#.to_vec();
//! config.count_url = Some("http://127.0.0.1:8080/payments/count".into());
//! config.burst = 20;
//! let audit = Audit::new(config)?; // checks everything, sends nothing
//! let plan = audit.plan();
//! assert_eq!(plan.len(), ProbeKind::ALL.len());
//! assert!(audit.plan_text().contains("burst"));
//!
//! // The count URL must be on the audited origin.
//! let mut elsewhere = AuditConfig::new("http://127.0.0.1:8080/payments");
//! elsewhere.count_url = Some("http://127.0.0.1:9090/count".into());
//! assert!(Audit::new(elsewhere).is_err());
//! # Ok::<(), idem_audit::AuditError>(())
//! ```
//!
//! Running it (`audit.run().await`) gives a [`Report`] with one [`ProbeReport`] per probe;
//! [`Report::to_table`], [`Report::to_json`] and [`Report::to_junit`] render it, and
//! [`Report::exit_code`] is the CLI's exit status. The probes, what a failure means and
//! how to fix it: `docs/audit.md` in the repository.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod audit;
mod config;
mod error;
mod report;
mod transport;

pub use audit::{Audit, PlannedProbe};
pub use config::{
    changed_body, parse_duration, parse_header, AuditConfig, MAX_BURST, MAX_RETRY_DELAYS, MAX_WAIT,
};
pub use error::{AuditError, SendError};
pub use report::{
    ProbeKind, ProbeReport, Report, Verdict, EXIT_ABORTED, EXIT_FAILED, EXIT_NOTHING_CHECKED,
    EXIT_OK, EXIT_USAGE,
};
