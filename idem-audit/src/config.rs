//! What to audit and the bounds of the audit.

use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};

use crate::error::AuditError;

/// Largest burst.
pub const MAX_BURST: usize = 200;
/// Largest number of retries after completion.
pub const MAX_RETRY_DELAYS: usize = 20;
/// Longest single wait (a retry delay, the retention probe) and longest audit: 7 days.
pub const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The audit's settings. [`AuditConfig::new`] gives the defaults for a URL; change the
/// public fields, then build an [`Audit`](crate::Audit), which checks them all.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// The endpoint under audit; the only URL requests are sent to.
    pub url: String,
    /// The request method (default `POST`).
    pub method: String,
    /// The request body (default `{}`). Sent with `Content-Type: application/json` when it
    /// is JSON and no `Content-Type` header is given.
    pub body: Vec<u8>,
    /// The body for the changed-payload probe; default: [`changed_body`] of `body`.
    pub changed_body: Option<Vec<u8>>,
    /// Extra headers, as `Name: value` lines (`-H`).
    pub headers: Vec<String>,
    /// The header naming the key (default `Idempotency-Key`).
    pub key_header: String,
    /// A tenant or auth header: enables the scope probe.
    pub tenant_header: Option<String>,
    /// The second tenant's value for the scope probe (the first is the `-H` value of the
    /// tenant header, or `idem-audit-tenant-a`).
    pub second_tenant: String,
    /// JSON pointer to the resource id in responses (default `/id`).
    pub id_field: String,
    /// A `GET` endpoint counting effects, read before and after each probe; same scheme,
    /// host and port as `url`.
    pub count_url: Option<String>,
    /// JSON pointer to the count in the count endpoint's answer when it is an object
    /// (default `/count`; a bare number or an array's length are read as they are).
    pub count_field: String,
    /// Requests in the burst (default 10, 2 to [`MAX_BURST`]).
    pub burst: usize,
    /// Delays before each retry after completion (default `0`, `1s`).
    pub retry_delays: Vec<Duration>,
    /// A retry after this delay must still replay (the key-expiry probe; off by default).
    pub retention_probe: Option<Duration>,
    /// How long after sending the request the lost-response probe drops the connection
    /// (default 50 ms).
    pub drop_after: Duration,
    /// How long after the first request the changed payload is sent while it is in flight
    /// (default 20 ms).
    pub in_flight_delay: Duration,
    /// Per-request timeout (default 10 s).
    pub timeout: Duration,
    /// How long a probe keeps retrying a `409` in-progress answer (default 60 s).
    pub max_wait: Duration,
    /// Most requests the whole audit may send (default 500).
    pub max_requests: usize,
    /// Longest the whole audit may run (default 10 min).
    pub max_duration: Duration,
}

impl AuditConfig {
    /// The defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        AuditConfig {
            url: url.into(),
            method: "POST".into(),
            body: b"{}".to_vec(),
            changed_body: None,
            headers: Vec::new(),
            key_header: "Idempotency-Key".into(),
            tenant_header: None,
            second_tenant: "idem-audit-tenant-b".into(),
            id_field: "/id".into(),
            count_url: None,
            count_field: "/count".into(),
            burst: 10,
            retry_delays: vec![Duration::ZERO, Duration::from_secs(1)],
            retention_probe: None,
            drop_after: Duration::from_millis(50),
            in_flight_delay: Duration::from_millis(20),
            timeout: Duration::from_secs(10),
            max_wait: Duration::from_secs(60),
            max_requests: 500,
            max_duration: Duration::from_secs(600),
        }
    }
}

/// Parses a duration: a number followed by `ms`, `s`, `m` or `h` (`500ms`, `2s`, `1.5s`,
/// `5m`); a bare `0` is zero.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(idem_audit::parse_duration("1500ms").unwrap(), Duration::from_millis(1500));
/// assert_eq!(idem_audit::parse_duration("2m").unwrap(), Duration::from_secs(120));
/// assert!(idem_audit::parse_duration("soon").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, AuditError> {
    let bad = || AuditError::BadDuration(text.to_string());
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| bad())
}

/// Parses a `Name: value` header line.
///
/// ```
/// let (name, value) = idem_audit::parse_header("X-Tenant: acme").unwrap();
/// assert_eq!(name.as_str(), "x-tenant");
/// assert_eq!(value, "acme");
/// assert!(idem_audit::parse_header("no colon").is_err());
/// ```
pub fn parse_header(line: &str) -> Result<(HeaderName, HeaderValue), AuditError> {
    let bad = |reason: String| AuditError::BadHeader {
        line: line.to_string(),
        reason,
    };
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| bad("expected `Name: value`".into()))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| bad(format!("bad name: {e}")))?;
    let value = HeaderValue::from_str(value.trim()).map_err(|e| bad(format!("bad value: {e}")))?;
    Ok((name, value))
}

/// The default changed payload: the first top-level number of a JSON object plus one, or
/// else its first string with `-changed` appended, or else the object with an added field
/// `"idem_audit_changed": true`; a body that is not a JSON object gets `-changed` appended.
///
/// ```
/// assert_eq!(idem_audit::changed_body(br#"{"amount":100,"to":"bob"}"#), br#"{"amount":101,"to":"bob"}"#);
/// assert_eq!(idem_audit::changed_body(br#"{"to":"bob"}"#), br#"{"to":"bob-changed"}"#);
/// ```
pub fn changed_body(body: &[u8]) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_slice(body) else {
        let mut changed = body.to_vec();
        changed.extend_from_slice(b"-changed");
        return changed;
    };
    let number = object.iter_mut().find(|(_, v)| v.is_number());
    if let Some((_, value)) = number {
        *value = match (value.as_i64(), value.as_f64()) {
            (Some(i), _) => serde_json::json!(i.wrapping_add(1)),
            (None, Some(f)) => serde_json::json!(f + 1.0),
            (None, None) => serde_json::json!(1),
        };
    } else if let Some((_, value)) = object.iter_mut().find(|(_, v)| v.is_string()) {
        *value = serde_json::Value::String(format!("{}-changed", value.as_str().unwrap_or("")));
    } else {
        object.insert("idem_audit_changed".into(), serde_json::Value::Bool(true));
    }
    serde_json::Value::Object(object).to_string().into_bytes()
}

/// A duration as the report writes it: `0`, `250ms`, `2s`, `1.5s`, `25h`.
pub(crate) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        "0".into()
    } else if ms < 1000 {
        format!("{ms}ms")
    } else if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
