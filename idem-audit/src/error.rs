//! Typed errors: a configuration the auditor refuses, and a request that got no answer.

use std::time::Duration;

/// Why an audit cannot be configured. Nothing has been sent when one of these is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The URL does not parse.
    #[error("invalid URL {url:?}: {source}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it does not parse.
        #[source]
        source: url::ParseError,
    },
    /// The URL's scheme is not `http` (this build has no TLS).
    #[error("unsupported scheme {scheme:?} in {url:?}: only http:// URLs are supported (this build has no TLS)")]
    UnsupportedScheme {
        /// The URL as given.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// `--count-url` points somewhere else than `--url`.
    #[error("--count-url {count_url:?} must have the same scheme, host and port as --url {url:?}: the auditor only sends to the URL it was given")]
    ForeignCountUrl {
        /// The count URL as given.
        count_url: String,
        /// The audited URL.
        url: String,
    },
    /// A `-H` argument is not `Name: value`, or its name or value is not valid in HTTP.
    #[error("invalid header {line:?}: {reason}")]
    BadHeader {
        /// The argument as given.
        line: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The method is not a valid HTTP method.
    #[error("invalid method {0:?}")]
    BadMethod(String),
    /// A JSON pointer (`--id-field`, `--count-field`) does not start with `/`.
    #[error("invalid JSON pointer {0:?}: it must be empty or start with '/' (for example /id or /data/id)")]
    BadPointer(String),
    /// A duration does not parse (`500ms`, `2s`, `5m`, `1h`).
    #[error(
        "invalid duration {0:?}: write a number with ms, s, m or h (for example 500ms, 30s, 5m)"
    )]
    BadDuration(String),
    /// A count or duration is outside the auditor's bounds.
    #[error("{what} is {value}; it must be {bound}")]
    OutOfBounds {
        /// The setting.
        what: &'static str,
        /// Its value.
        value: String,
        /// The bound it breaks.
        bound: String,
    },
    /// The planned requests exceed `max_requests`.
    #[error("the plan needs up to {planned} requests but at most {max} are allowed (raise --max-requests or lower --burst / --retry-delays)")]
    PlanTooLarge {
        /// Requests the plan may send.
        planned: usize,
        /// The bound.
        max: usize,
    },
    /// The plan's waits alone exceed `max_duration`.
    #[error("the plan waits at least {planned:?} but the audit may last at most {max:?} (raise --max-duration)")]
    PlanTooLong {
        /// The waits of the plan.
        planned: Duration,
        /// The bound.
        max: Duration,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
}

/// Why one request of a probe got no answer. It becomes a probe's evidence (or stops the
/// audit, for the bounds).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The request failed: connection refused, timeout, reset.
    #[error("no answer: {0}")]
    Http(#[source] reqwest::Error),
    /// A raw connection (used to drop a request in flight) failed.
    #[error("no answer: {0}")]
    Io(#[source] std::io::Error),
    /// The answer to a raw request could not be read as HTTP.
    #[error("unreadable answer: {0}")]
    Malformed(String),
    /// The request would exceed `max_requests`.
    #[error("request budget of {0} exhausted")]
    Budget(usize),
    /// The audit ran past `max_duration`.
    #[error("audit duration bound of {0:?} reached")]
    Deadline(Duration),
}

impl SendError {
    /// Whether this error is a bound of the audit (it stops the audit) rather than the
    /// API's answer.
    pub fn is_bound(&self) -> bool {
        matches!(self, SendError::Budget(_) | SendError::Deadline(_))
    }
}
