//! The report: one row per probe, as a table, JSON or JUnit XML.

use std::fmt::Write as _;

use serde::Serialize;

/// A probe's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The API behaved as an idempotent endpoint should.
    Pass,
    /// The probe found a defect; the evidence says which.
    Fail,
    /// The probe could not judge (not configured, or the API refused the request itself).
    NotApplicable,
}

impl Verdict {
    /// `pass`, `FAIL` or `n/a`.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "FAIL",
            Verdict::NotApplicable => "n/a",
        }
    }
}

/// The probes the auditor runs, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeKind {
    /// A request without the key.
    MissingKey,
    /// A request with an empty key.
    MalformedKey,
    /// The same request again after it completed, immediately and after delays.
    RetryAfterCompletion,
    /// Identical requests with one key, sent concurrently.
    Burst,
    /// The connection dropped while the first request is in flight, then a retry.
    LostResponse,
    /// The same key with a different body, in flight and after completion.
    ChangedPayload,
    /// The same key under two tenants.
    Scope,
    /// A retry after the retention delay.
    KeyExpiry,
}

impl ProbeKind {
    /// Every probe, in the order they run.
    pub const ALL: [ProbeKind; 8] = [
        ProbeKind::MissingKey,
        ProbeKind::MalformedKey,
        ProbeKind::RetryAfterCompletion,
        ProbeKind::Burst,
        ProbeKind::LostResponse,
        ProbeKind::ChangedPayload,
        ProbeKind::Scope,
        ProbeKind::KeyExpiry,
    ];

    /// The probe's name, as in the report (`retry-after-completion`).
    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::MissingKey => "missing-key",
            ProbeKind::MalformedKey => "malformed-key",
            ProbeKind::RetryAfterCompletion => "retry-after-completion",
            ProbeKind::Burst => "burst",
            ProbeKind::LostResponse => "lost-response",
            ProbeKind::ChangedPayload => "changed-payload",
            ProbeKind::Scope => "scope",
            ProbeKind::KeyExpiry => "key-expiry",
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    /// The probe.
    pub probe: ProbeKind,
    /// Its verdict.
    pub verdict: Verdict,
    /// What was seen: statuses, ids, counts.
    pub evidence: Vec<String>,
    /// Requests the probe sent (count reads included).
    pub requests: usize,
    /// How long it ran, in milliseconds.
    pub millis: u64,
}

/// The audit's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The audited URL.
    pub url: String,
    /// One row per probe.
    pub probes: Vec<ProbeReport>,
    /// Why the audit stopped early (a bound was reached), if it did.
    pub aborted: Option<String>,
    /// Requests sent in all.
    pub requests: usize,
    /// How long the audit ran, in milliseconds.
    pub millis: u64,
}

/// Exit status: no probe failed and at least one passed.
pub const EXIT_OK: u8 = 0;
/// Exit status: at least one probe failed.
pub const EXIT_FAILED: u8 = 1;
/// Exit status: the arguments were refused; nothing was sent.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the audit stopped at a bound (request count or duration).
pub const EXIT_ABORTED: u8 = 3;
/// Exit status: no probe could judge anything (every probe not applicable).
pub const EXIT_NOTHING_CHECKED: u8 = 4;

impl Report {
    /// The row of `probe`, if it ran.
    pub fn probe(&self, probe: ProbeKind) -> Option<&ProbeReport> {
        self.probes.iter().find(|p| p.probe == probe)
    }

    /// The verdict of `probe` (not applicable when it did not run).
    pub fn verdict(&self, probe: ProbeKind) -> Verdict {
        self.probe(probe)
            .map_or(Verdict::NotApplicable, |p| p.verdict)
    }

    /// The probes that failed.
    pub fn failures(&self) -> Vec<ProbeKind> {
        self.probes
            .iter()
            .filter(|p| p.verdict == Verdict::Fail)
            .map(|p| p.probe)
            .collect()
    }

    /// The process exit status: [`EXIT_FAILED`] when a probe failed, else [`EXIT_ABORTED`]
    /// when a bound stopped the audit, else [`EXIT_NOTHING_CHECKED`] when no probe passed,
    /// else [`EXIT_OK`].
    pub fn exit_code(&self) -> u8 {
        if !self.failures().is_empty() {
            EXIT_FAILED
        } else if self.aborted.is_some() {
            EXIT_ABORTED
        } else if self.probes.iter().all(|p| p.verdict != Verdict::Pass) {
            EXIT_NOTHING_CHECKED
        } else {
            EXIT_OK
        }
    }

    /// A plain-text table, one row per probe, evidence indented below.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "idem audit of {}", self.url);
        let _ = writeln!(
            out,
            "{:<24} {:<7} {:>8} {:>9}",
            "probe", "verdict", "requests", "ms"
        );
        for p in &self.probes {
            let _ = writeln!(
                out,
                "{:<24} {:<7} {:>8} {:>9}",
                p.probe.name(),
                p.verdict.label(),
                p.requests,
                p.millis
            );
            for line in &p.evidence {
                let _ = writeln!(out, "    {line}");
            }
        }
        if let Some(why) = &self.aborted {
            let _ = writeln!(out, "stopped early: {why}");
        }
        let count = |v: Verdict| self.probes.iter().filter(|p| p.verdict == v).count();
        let _ = writeln!(
            out,
            "{} passed, {} failed, {} not applicable; {} requests in {} ms",
            count(Verdict::Pass),
            count(Verdict::Fail),
            count(Verdict::NotApplicable),
            self.requests,
            self.millis
        );
        out
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The report as a JUnit XML test suite: a test case per probe, a `<failure>` for a
    /// failed one, `<skipped>` for one not applicable.
    pub fn to_junit(&self) -> String {
        let count = |v: Verdict| self.probes.iter().filter(|p| p.verdict == v).count();
        let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            out,
            "<testsuite name=\"idem audit {}\" tests=\"{}\" failures=\"{}\" skipped=\"{}\" errors=\"{}\" time=\"{:.3}\">",
            xml(&self.url),
            self.probes.len(),
            count(Verdict::Fail),
            count(Verdict::NotApplicable),
            usize::from(self.aborted.is_some()),
            self.millis as f64 / 1000.0
        );
        for p in &self.probes {
            let evidence = xml(&p.evidence.join("\n"));
            let _ = write!(
                out,
                "  <testcase classname=\"idem.audit\" name=\"{}\" time=\"{:.3}\"",
                p.probe.name(),
                p.millis as f64 / 1000.0
            );
            match p.verdict {
                Verdict::Pass => {
                    let _ = writeln!(out, "><system-out>{evidence}</system-out></testcase>");
                }
                Verdict::Fail => {
                    let first = p.evidence.first().map_or("", String::as_str);
                    let _ = writeln!(
                        out,
                        "><failure message=\"{}\">{evidence}</failure></testcase>",
                        xml(first)
                    );
                }
                Verdict::NotApplicable => {
                    let first = p.evidence.first().map_or("", String::as_str);
                    let _ = writeln!(out, "><skipped message=\"{}\"/></testcase>", xml(first));
                }
            }
        }
        if let Some(why) = &self.aborted {
            let _ = writeln!(
                out,
                "  <testcase classname=\"idem.audit\" name=\"bounds\"><error message=\"{}\"/></testcase>",
                xml(why)
            );
        }
        out.push_str("</testsuite>\n");
        out
    }
}

/// Escapes text for XML content and attributes.
fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}
