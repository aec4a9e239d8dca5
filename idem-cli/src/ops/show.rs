//! How the operator commands print a record: a readable block (`--format table`) or one
//! JSON object per line (`--format json`) with stable field names.

use clap::ValueEnum;
use idem::backend::codec::FORMAT_JSON_V1;
use idem::{Record, State, Timestamp};
use serde_json::{json, Value};

/// Output format of `get` and `list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned fields for people.
    Table,
    /// One JSON object per record and line.
    Json,
}

/// A stored outcome, decoded as far as it goes: JSON (the library's tagged JSON, or
/// plain JSON), else UTF-8 text, else hex.
fn outcome(bytes: &[u8]) -> (&'static str, Value) {
    let tagged = match bytes.split_first() {
        Some((&FORMAT_JSON_V1, body)) => serde_json::from_slice::<Value>(body).ok(),
        _ => None,
    };
    if let Some(v) = tagged.or_else(|| serde_json::from_slice::<Value>(bytes).ok()) {
        return ("json", v);
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => ("utf8", Value::String(text.to_string())),
        Err(_) => ("hex", Value::String(hex(bytes))),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `ms` since the epoch as UTC date and time (`2026-12-01T04:58:00.000Z`).
fn utc(t: Timestamp) -> String {
    let ms = t.as_millis();
    let (days, rest) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000
    )
}

/// The record as one JSON object. Times are milliseconds since the epoch; `lease_until`
/// is `null` unless in progress, and for a released lease; `outcome_encoding` says how
/// `outcome` shows the stored bytes (`json`, `utf8`, `hex`), both `null` in progress.
pub fn json(r: &Record) -> Value {
    let (lease_until, released, response) = match &r.state {
        State::InProgress { lease_until, .. } if *lease_until == Timestamp::MIN => {
            (Value::Null, true, None)
        }
        State::InProgress { lease_until, .. } => (json!(lease_until.as_millis()), false, None),
        State::Completed { response } | State::Failed { response } => {
            (Value::Null, false, Some(response))
        }
    };
    let (encoding, outcome) = match response.map(|b| outcome(b)) {
        Some((e, v)) => (json!(e), v),
        None => (Value::Null, Value::Null),
    };
    json!({
        "scope": r.key.scope(),
        "id": r.key.id(),
        "state": r.state.name(),
        "token": r.token.0,
        "lease_until": lease_until,
        "released": released,
        "fingerprint": r.fingerprint.as_ref().map(|f| hex(f.as_bytes())),
        "outcome_encoding": encoding,
        "outcome": outcome,
        "created_at": r.created_at.as_millis(),
        "updated_at": r.updated_at.as_millis(),
        "expires_at": r.expires_at.as_millis(),
    })
}

/// The record as aligned `field value` lines.
pub fn table(r: &Record) -> String {
    let mut lines = vec![
        ("scope", r.key.scope().to_string()),
        ("id", r.key.id().to_string()),
        ("state", r.state.name().to_string()),
        ("token", r.token.0.to_string()),
    ];
    match &r.state {
        State::InProgress { lease_until, .. } if *lease_until == Timestamp::MIN => {
            lines.push(("lease", "released".into()))
        }
        State::InProgress { lease_until, .. } => lines.push(("lease until", utc(*lease_until))),
        State::Completed { response } | State::Failed { response } => {
            let (encoding, value) = outcome(response);
            let shown = match value {
                Value::String(s) => s,
                v => v.to_string(),
            };
            lines.push(("outcome", format!("({encoding}) {shown}")));
        }
    }
    let fingerprint = r.fingerprint.as_ref().map(|f| hex(f.as_bytes()));
    lines.push(("fingerprint", fingerprint.unwrap_or_else(|| "-".into())));
    lines.push(("created", utc(r.created_at)));
    lines.push(("updated", utc(r.updated_at)));
    lines.push(("expires", utc(r.expires_at)));
    lines
        .into_iter()
        .map(|(k, v)| format!("{k:<12}{v}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_json_then_text_then_hex() {
        assert_eq!(outcome(b"\x01{\"a\":1}"), ("json", json!({"a": 1})));
        assert_eq!(outcome(b"[1,2]"), ("json", json!([1, 2])));
        assert_eq!(outcome(b"paid"), ("utf8", json!("paid")));
        assert_eq!(outcome(&[0xff, 0x00]), ("hex", json!("ff00")));
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(utc(Timestamp::from_millis(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            utc(Timestamp::from_millis(1_764_565_080_123)),
            "2025-12-01T04:58:00.123Z"
        );
        assert_eq!(
            utc(Timestamp::from_millis(951_782_400_000)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
