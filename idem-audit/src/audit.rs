//! The audit: the plan, the probes and the effect oracle.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::Method;
use url::Url;

use crate::config::{
    changed_body, human, parse_header, AuditConfig, MAX_BURST, MAX_RETRY_DELAYS, MAX_WAIT,
};
use crate::error::{AuditError, SendError};
use crate::report::{ProbeKind, ProbeReport, Report, Verdict};
use crate::transport::{
    json_content_type, same_origin, Answer, Exchange, KeyValue, Outgoing, Target, Transport,
};

/// One step of the plan, as `--dry-run` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedProbe {
    /// The probe.
    pub probe: ProbeKind,
    /// What it sends and what it expects.
    pub description: String,
    /// The most requests it may send (count reads included, retries of `409` answers not).
    pub requests: usize,
    /// The delays it waits on purpose, in milliseconds.
    pub waits_ms: u64,
}

/// A configured audit of one endpoint. Building it checks the configuration and sends
/// nothing; [`Audit::run`] sends the probes.
#[derive(Debug)]
pub struct Audit {
    config: AuditConfig,
    changed: Vec<u8>,
    first_tenant: HeaderValue,
    second_tenant: HeaderValue,
    target: Target,
    run_id: String,
}

impl Audit {
    /// Checks `config` (URLs, headers, pointers, bounds). Sends nothing.
    pub fn new(config: AuditConfig) -> Result<Self, AuditError> {
        let url = parse_url(&config.url)?;
        let count_url = match &config.count_url {
            None => None,
            Some(text) => {
                let count = parse_url(text)?;
                if !same_origin(&count, &url) {
                    return Err(AuditError::ForeignCountUrl {
                        count_url: text.clone(),
                        url: config.url.clone(),
                    });
                }
                Some(count)
            }
        };
        let method = Method::from_bytes(config.method.trim().to_ascii_uppercase().as_bytes())
            .map_err(|_| AuditError::BadMethod(config.method.clone()))?;
        let header_name = |name: &str| {
            HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| AuditError::BadHeader {
                line: name.to_string(),
                reason: format!("bad name: {e}"),
            })
        };
        let key_header = header_name(&config.key_header)?;
        let tenant_header = config
            .tenant_header
            .as_deref()
            .map(header_name)
            .transpose()?;
        let mut headers = HeaderMap::new();
        for line in &config.headers {
            let (name, value) = parse_header(line)?;
            headers.append(name, value);
        }
        if let Some(value) = json_content_type(&headers, &config.body) {
            headers.insert(CONTENT_TYPE, value);
        }
        let first_tenant = tenant_header
            .as_ref()
            .and_then(|name| headers.get(name).cloned())
            .unwrap_or_else(|| HeaderValue::from_static("idem-audit-tenant-a"));
        let second_tenant = HeaderValue::from_str(config.second_tenant.trim()).map_err(|e| {
            AuditError::BadHeader {
                line: config.second_tenant.clone(),
                reason: format!("bad second tenant value: {e}"),
            }
        })?;
        for pointer in [&config.id_field, &config.count_field] {
            if !(pointer.is_empty() || pointer.starts_with('/')) {
                return Err(AuditError::BadPointer(pointer.clone()));
            }
        }
        check(
            "--burst",
            config.burst,
            (2..=MAX_BURST).contains(&config.burst),
            format!("2 to {MAX_BURST}"),
        )?;
        check(
            "the number of --retry-delays",
            config.retry_delays.len(),
            (1..=MAX_RETRY_DELAYS).contains(&config.retry_delays.len()),
            format!("1 to {MAX_RETRY_DELAYS}"),
        )?;
        let waits = config.retry_delays.iter().chain(&config.retention_probe);
        for wait in waits.chain([&config.drop_after, &config.in_flight_delay]) {
            check(
                "a delay",
                human(*wait),
                *wait <= MAX_WAIT,
                format!("at most {}", human(MAX_WAIT)),
            )?;
        }
        for (what, value) in [
            ("--timeout", config.timeout),
            ("--max-wait", config.max_wait),
            ("--max-duration", config.max_duration),
        ] {
            check(
                what,
                human(value),
                !value.is_zero() && value <= MAX_WAIT,
                format!("between 1ms and {}", human(MAX_WAIT)),
            )?;
        }
        let changed = config
            .changed_body
            .clone()
            .unwrap_or_else(|| changed_body(&config.body));
        let target = Target {
            url,
            count_url,
            method,
            headers,
            body: config.body.clone(),
            key_header,
            tenant_header,
        };
        let audit = Audit {
            changed,
            first_tenant,
            second_tenant,
            target,
            run_id: format!("{:016x}", rand::random::<u64>()),
            config,
        };
        let planned: usize = audit.plan().iter().map(|p| p.requests).sum();
        if planned > audit.config.max_requests {
            return Err(AuditError::PlanTooLarge {
                planned,
                max: audit.config.max_requests,
            });
        }
        let waits = Duration::from_millis(audit.plan().iter().map(|p| p.waits_ms).sum());
        if waits > audit.config.max_duration {
            return Err(AuditError::PlanTooLong {
                planned: waits,
                max: audit.config.max_duration,
            });
        }
        Ok(audit)
    }

    /// The settings.
    pub fn config(&self) -> &AuditConfig {
        &self.config
    }

    /// The probes in the order they run, with their request counts and waits.
    pub fn plan(&self) -> Vec<PlannedProbe> {
        let c = &self.config;
        let counts = if self.target.count_url.is_some() {
            2
        } else {
            0
        };
        let key = &self.config.key_header;
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let delays: Vec<String> = c.retry_delays.iter().map(|d| human(*d)).collect();
        vec![
            PlannedProbe {
                probe: ProbeKind::MissingKey,
                description: format!("1 request without {key}: expect 400 (or report that it is processed unprotected)"),
                requests: 1,
                waits_ms: 0,
            },
            PlannedProbe {
                probe: ProbeKind::MalformedKey,
                description: format!("1 request with an empty {key}: expect 400"),
                requests: 1,
                waits_ms: 0,
            },
            PlannedProbe {
                probe: ProbeKind::RetryAfterCompletion,
                description: format!(
                    "1 request, then retries with the same key after {}: expect the same status and body, one effect",
                    delays.join(", ")
                ),
                requests: 1 + c.retry_delays.len() + counts,
                waits_ms: c.retry_delays.iter().map(|d| ms(*d)).sum(),
            },
            PlannedProbe {
                probe: ProbeKind::Burst,
                description: format!(
                    "{} identical requests with one key, sent concurrently: expect one effect; answers the original response or 409 + Retry-After",
                    c.burst
                ),
                requests: c.burst + counts,
                waits_ms: 0,
            },
            PlannedProbe {
                probe: ProbeKind::LostResponse,
                description: format!(
                    "1 request whose connection is dropped {} after sending, then retries with the same key: expect one effect (needs --count-url to see it)",
                    human(c.drop_after)
                ),
                requests: 3 + counts,
                waits_ms: ms(c.drop_after),
            },
            PlannedProbe {
                probe: ProbeKind::ChangedPayload,
                description: format!(
                    "1 request, the same key with a changed body {} later (in flight) and after completion: expect 422 (a 4xx), never processed",
                    human(c.in_flight_delay)
                ),
                requests: 3 + counts,
                waits_ms: ms(c.in_flight_delay),
            },
            PlannedProbe {
                probe: ProbeKind::Scope,
                description: match &c.tenant_header {
                    Some(name) => format!("the same key under two values of {name}: expect two independent results, no cross-tenant replay"),
                    None => "skipped: no --tenant-header".into(),
                },
                requests: if c.tenant_header.is_some() { 2 + counts } else { 0 },
                waits_ms: 0,
            },
            PlannedProbe {
                probe: ProbeKind::KeyExpiry,
                description: match c.retention_probe {
                    Some(d) => format!("1 request, a retry {} later: expect a replay, one effect", human(d)),
                    None => "skipped: no --retention-probe".into(),
                },
                requests: if c.retention_probe.is_some() { 2 + counts } else { 0 },
                waits_ms: c.retention_probe.map_or(0, ms),
            },
        ]
    }

    /// The plan as text, for `--dry-run`.
    pub fn plan_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "idem audit plan for {} {} (nothing sent)",
            self.target.method, self.target.url
        );
        if let Some(count) = &self.target.count_url {
            let _ = writeln!(out, "effect count: GET {count} before and after each probe");
        }
        let _ = writeln!(out, "resource id: JSON pointer {:?}", self.config.id_field);
        let plan = self.plan();
        for p in &plan {
            let _ = writeln!(
                out,
                "  {:<24} up to {:>3} requests  {}",
                p.probe.name(),
                p.requests,
                p.description
            );
        }
        let _ = writeln!(
            out,
            "bounds: at most {} requests, {} in all, {} per request, {} retrying 409 answers",
            self.config.max_requests,
            human(self.config.max_duration),
            human(self.config.timeout),
            human(self.config.max_wait)
        );
        out
    }

    /// Runs every probe without a progress bar.
    pub async fn run(&self) -> Result<Report, AuditError> {
        self.run_with_progress(&ProgressBar::hidden()).await
    }

    /// Runs every probe, advancing `progress` by one per probe. Returns the report; a
    /// bound reached mid-way stops the audit and is noted in [`Report::aborted`].
    pub async fn run_with_progress(&self, progress: &ProgressBar) -> Result<Report, AuditError> {
        let transport = Arc::new(Transport::new(
            self.target.clone(),
            self.config.timeout,
            self.config.max_requests,
            self.config.max_duration,
        )?);
        let started = Instant::now();
        progress.set_length(ProbeKind::ALL.len() as u64);
        let mut probes = Vec::new();
        let mut aborted = None;
        for kind in ProbeKind::ALL {
            progress.set_message(kind.name());
            let before = transport.sent();
            let t0 = Instant::now();
            let mut probe = Probe {
                audit: self,
                transport: &transport,
                kind,
                evidence: Vec::new(),
            };
            let verdict = if aborted.is_some() {
                probe.note("not run: the audit stopped at a bound");
                Verdict::NotApplicable
            } else {
                match probe.run().await {
                    Ok(verdict) => verdict,
                    Err(e) if e.is_bound() => {
                        probe.note(format!("stopped: {e}"));
                        aborted = Some(e.to_string());
                        Verdict::NotApplicable
                    }
                    Err(e) => {
                        probe.note(e.to_string());
                        Verdict::Fail
                    }
                }
            };
            probes.push(ProbeReport {
                probe: kind,
                verdict,
                evidence: probe.evidence,
                requests: transport.sent() - before,
                millis: millis(t0.elapsed()),
            });
            progress.inc(1);
        }
        progress.finish_and_clear();
        Ok(Report {
            url: self.target.url.to_string(),
            probes,
            aborted,
            requests: transport.sent(),
            millis: millis(started.elapsed()),
        })
    }

    /// A fresh key for one probe.
    fn key(&self, kind: ProbeKind) -> String {
        format!(
            "idem-audit-{}-{}-{:08x}",
            self.run_id,
            kind.name(),
            rand::random::<u32>()
        )
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn parse_url(text: &str) -> Result<Url, AuditError> {
    let url = Url::parse(text.trim()).map_err(|source| AuditError::BadUrl {
        url: text.to_string(),
        source,
    })?;
    if url.scheme() != "http" {
        return Err(AuditError::UnsupportedScheme {
            url: text.to_string(),
            scheme: url.scheme().to_string(),
        });
    }
    if url.host_str().is_none() {
        return Err(AuditError::BadUrl {
            url: text.to_string(),
            source: url::ParseError::EmptyHost,
        });
    }
    Ok(url)
}

fn check(
    what: &'static str,
    value: impl ToString,
    ok: bool,
    bound: String,
) -> Result<(), AuditError> {
    if ok {
        Ok(())
    } else {
        Err(AuditError::OutOfBounds {
            what,
            value: value.to_string(),
            bound,
        })
    }
}

/// What identifies the effect behind an answer: the resource id at the configured
/// pointer, or else the whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    Id(String),
    Body(Vec<u8>),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Id(id) => write!(f, "id {id}"),
            Identity::Body(body) => {
                let text = String::from_utf8_lossy(body);
                let short: String = text.chars().take(80).collect();
                if short.len() < text.len() {
                    write!(f, "body {short:?}…")
                } else {
                    write!(f, "body {short:?}")
                }
            }
        }
    }
}

/// A running probe: its evidence so far.
struct Probe<'a> {
    audit: &'a Audit,
    transport: &'a Arc<Transport>,
    kind: ProbeKind,
    evidence: Vec<String>,
}

fn is_success(status: u16) -> bool {
    (200..300).contains(&status)
}

impl Probe<'_> {
    fn note(&mut self, line: impl Into<String>) {
        self.evidence.push(line.into());
    }

    fn identity(&self, answer: &Answer) -> Identity {
        let pointer = &self.audit.config.id_field;
        let id = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v.pointer(pointer).cloned())
            .filter(|v| !v.is_null());
        match id {
            Some(serde_json::Value::String(s)) => Identity::Id(s),
            Some(v) => Identity::Id(v.to_string()),
            None => Identity::Body(answer.body.clone()),
        }
    }

    /// Sends a request that must be answered.
    async fn answer(&self, out: Outgoing) -> Result<Answer, SendError> {
        match self.transport.send(out).await? {
            Exchange::Answered(a) => Ok(a),
            Exchange::Dropped => Err(SendError::Malformed("dropped".into())),
        }
    }

    /// Sends `out`, and again while the answer is `409` (in progress), honouring
    /// `Retry-After` (between 50 ms and 2 s), for at most `max_wait`. Returns the last
    /// answer and how many `409`s came before it.
    async fn settle(&self, out: Outgoing) -> Result<(Answer, usize), SendError> {
        let deadline = Instant::now() + self.audit.config.max_wait;
        let mut conflicts = 0;
        loop {
            let answer = self.answer(out.clone()).await?;
            if answer.status != 409 || Instant::now() >= deadline {
                return Ok((answer, conflicts));
            }
            conflicts += 1;
            let pause = answer
                .retry_after
                .as_deref()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .unwrap_or(Duration::from_millis(200))
                .clamp(Duration::from_millis(50), Duration::from_secs(2));
            self.transport.wait(pause).await?;
        }
    }

    /// The effect count, when a count endpoint is configured and answers a number.
    async fn count(&mut self) -> Result<Option<i64>, SendError> {
        if self.transport.target().count_url.is_none() {
            return Ok(None);
        }
        let answer = self.answer(Outgoing::count()).await?;
        let value = serde_json::from_slice::<serde_json::Value>(&answer.body).ok();
        let count = match &value {
            Some(serde_json::Value::Number(n)) => n.as_i64(),
            Some(serde_json::Value::Array(items)) => i64::try_from(items.len()).ok(),
            Some(v) => v
                .pointer(&self.audit.config.count_field)
                .and_then(serde_json::Value::as_i64),
            None => None,
        };
        if count.is_none() {
            self.note(format!(
                "count endpoint answered {} without a count (a number, an array, or {:?})",
                answer.status, self.audit.config.count_field
            ));
        }
        Ok(count)
    }

    /// Compares the effect count after a probe with the expected change.
    fn effects(&mut self, before: Option<i64>, after: Option<i64>, expected: i64) -> bool {
        match (before, after) {
            (Some(b), Some(a)) => {
                let delta = a - b;
                if delta == expected {
                    self.note(format!("effect count +{delta} (expected +{expected})"));
                    true
                } else {
                    self.note(format!(
                        "effect count +{delta}, expected +{expected}: {} effects for one key",
                        if delta > expected { "extra" } else { "missing" }
                    ));
                    false
                }
            }
            _ => true,
        }
    }

    fn keyed(&self) -> Outgoing {
        Outgoing::keyed(&self.audit.key(self.kind))
    }

    async fn run(&mut self) -> Result<Verdict, SendError> {
        match self.kind {
            ProbeKind::MissingKey => self.missing_key().await,
            ProbeKind::MalformedKey => self.malformed_key().await,
            ProbeKind::RetryAfterCompletion => self.retry_after_completion().await,
            ProbeKind::Burst => self.burst().await,
            ProbeKind::LostResponse => self.lost_response().await,
            ProbeKind::ChangedPayload => self.changed_payload().await,
            ProbeKind::Scope => self.scope().await,
            ProbeKind::KeyExpiry => self.key_expiry().await,
        }
    }

    async fn missing_key(&mut self) -> Result<Verdict, SendError> {
        let mut out = self.keyed();
        out.key = KeyValue::Absent;
        let answer = self.answer(out).await?;
        Ok(self.key_check(&answer, "without a key"))
    }

    async fn malformed_key(&mut self) -> Result<Verdict, SendError> {
        let mut out = self.keyed();
        out.key = KeyValue::Raw(HeaderValue::from_static(""));
        let answer = self.answer(out).await?;
        Ok(self.key_check(&answer, "with an empty key"))
    }

    fn key_check(&mut self, answer: &Answer, what: &str) -> Verdict {
        let status = answer.status;
        match status {
            400..=499 => {
                self.note(format!(
                    "{what}: rejected with {status}{}",
                    if status == 400 {
                        ""
                    } else {
                        " (the draft says 400)"
                    }
                ));
                Verdict::Pass
            }
            200..=399 => {
                self.note(format!(
                    "{what}: processed ({status}, {}) without protection; the draft says 400 for a resource that requires a key",
                    self.identity(answer)
                ));
                Verdict::NotApplicable
            }
            _ => {
                self.note(format!("{what}: server error {status}"));
                Verdict::Fail
            }
        }
    }

    /// The first request of a probe; `None` (after noting why) when it was not a success.
    async fn first(&mut self, out: Outgoing) -> Result<Option<Answer>, SendError> {
        let (answer, _) = self.settle(out).await?;
        if is_success(answer.status) {
            self.note(format!(
                "first request: {} {}",
                answer.status,
                self.identity(&answer)
            ));
            Ok(Some(answer))
        } else {
            self.note(format!(
                "the request itself was answered {}: {}; fix the request (--body, -H) to audit this",
                answer.status,
                Identity::Body(answer.body.clone())
            ));
            Ok(None)
        }
    }

    /// Whether `again` is the same response as `first` (status and identity); notes it.
    fn same(&mut self, label: &str, first: &Answer, again: &Answer, conflicts: usize) -> bool {
        let waited = if conflicts > 0 {
            format!(" after {conflicts}× 409")
        } else {
            String::new()
        };
        let (a, b) = (self.identity(first), self.identity(again));
        let replayed = if again.replayed { ", replayed" } else { "" };
        if again.status == first.status && a == b {
            self.note(format!("{label}: {} {b}{replayed}{waited}", again.status));
            true
        } else {
            self.note(format!(
                "{label}: {} {b}{waited}, but the first was {} {a}: {}",
                again.status,
                first.status,
                if is_success(again.status) && a != b {
                    "a second effect"
                } else {
                    "a different response"
                }
            ));
            false
        }
    }

    async fn retry_after_completion(&mut self) -> Result<Verdict, SendError> {
        let out = self.keyed();
        let before = self.count().await?;
        let Some(first) = self.first(out.clone()).await? else {
            return Ok(Verdict::NotApplicable);
        };
        let mut ok = true;
        for delay in self.audit.config.retry_delays.clone() {
            self.transport.wait(delay).await?;
            let (again, conflicts) = self.settle(out.clone()).await?;
            ok &= self.same(
                &format!("retry after {}", human(delay)),
                &first,
                &again,
                conflicts,
            );
        }
        let after = self.count().await?;
        ok &= self.effects(before, after, 1);
        Ok(if ok { Verdict::Pass } else { Verdict::Fail })
    }

    async fn burst(&mut self) -> Result<Verdict, SendError> {
        let out = self.keyed();
        let before = self.count().await?;
        let n = self.audit.config.burst;
        let gate = Arc::new(tokio::sync::Barrier::new(n));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (gate, transport, out) = (gate.clone(), self.transport.clone(), out.clone());
            tasks.spawn(async move {
                gate.wait().await;
                transport.send(out).await
            });
        }
        let mut answers = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(Exchange::Answered(a))) => answers.push(a),
                Ok(Ok(Exchange::Dropped)) => {}
                Ok(Err(e)) if e.is_bound() => return Err(e),
                Ok(Err(e)) => self.note(format!("a burst request failed: {e}")),
                Err(e) => self.note(format!("a burst task failed: {e}")),
            }
        }
        let mut ok = answers.len() == n;
        let mut identities: Vec<(u16, Identity)> = Vec::new();
        let (mut conflicts, mut without_retry_after, mut others) = (0, 0, Vec::new());
        for a in &answers {
            if is_success(a.status) {
                let pair = (a.status, self.identity(a));
                if !identities.contains(&pair) {
                    identities.push(pair);
                }
            } else if a.status == 409 {
                conflicts += 1;
                without_retry_after += usize::from(a.retry_after.is_none());
            } else {
                others.push(a.status);
            }
        }
        let successes = answers.iter().filter(|a| is_success(a.status)).count();
        self.note(format!(
            "{n} concurrent requests: {successes} success, {conflicts} × 409, {} other",
            others.len()
        ));
        if identities.is_empty() {
            self.note("no request of the burst succeeded");
            return Ok(if others.iter().any(|s| *s >= 500) {
                Verdict::Fail
            } else {
                Verdict::NotApplicable
            });
        }
        if identities.len() > 1 {
            let list: Vec<String> = identities.iter().map(|(s, i)| format!("{s} {i}")).collect();
            self.note(format!(
                "{} different responses for one key: {}",
                identities.len(),
                list.join("; ")
            ));
            ok = false;
        } else {
            self.note(format!(
                "one response: {} {}",
                identities[0].0, identities[0].1
            ));
        }
        if !others.is_empty() {
            self.note(format!(
                "answers neither the original response nor 409: {others:?}"
            ));
            ok = false;
        }
        if without_retry_after > 0 {
            self.note(format!("{without_retry_after} × 409 without Retry-After"));
        }
        let after = self.count().await?;
        ok &= self.effects(before, after, 1);
        Ok(if ok { Verdict::Pass } else { Verdict::Fail })
    }

    async fn lost_response(&mut self) -> Result<Verdict, SendError> {
        let out = self.keyed();
        let before = self.count().await?;
        let mut dropped = out.clone();
        dropped.drop_after = Some(self.audit.config.drop_after);
        match self.transport.send(dropped).await? {
            Exchange::Dropped => self.note(format!(
                "dropped the connection {} after sending, before any answer",
                human(self.audit.config.drop_after)
            )),
            Exchange::Answered(a) => self.note(format!(
                "the answer ({}) began before the drop at {}: the in-flight window was not exercised (lower --drop-after)",
                a.status,
                human(self.audit.config.drop_after)
            )),
        }
        let (retry, conflicts) = self.settle(out.clone()).await?;
        if !is_success(retry.status) {
            self.note(format!(
                "retry: {} after {conflicts}× 409: {}",
                retry.status,
                Identity::Body(retry.body.clone())
            ));
            return Ok(if retry.status >= 500 || retry.status == 409 {
                Verdict::Fail
            } else {
                Verdict::NotApplicable
            });
        }
        self.note(format!(
            "retry: {} {} after {conflicts}× 409",
            retry.status,
            self.identity(&retry)
        ));
        let (again, conflicts) = self.settle(out).await?;
        let mut ok = self.same("second retry", &retry, &again, conflicts);
        let after = self.count().await?;
        if after.is_none() {
            self.note("the dropped request's own effect is invisible without --count-url");
            return Ok(if ok {
                Verdict::NotApplicable
            } else {
                Verdict::Fail
            });
        }
        ok &= self.effects(before, after, 1);
        Ok(if ok { Verdict::Pass } else { Verdict::Fail })
    }

    fn judge_changed(&mut self, label: &str, answer: &Answer) -> bool {
        let status = answer.status;
        match status {
            422 => {
                self.note(format!("{label}: rejected with 422"));
                true
            }
            409 => {
                self.note(format!("{label}: 409 (in progress), not processed"));
                true
            }
            400..=499 => {
                self.note(format!(
                    "{label}: rejected with {status} (the draft says 422)"
                ));
                true
            }
            200..=399 => {
                self.note(format!(
                    "{label}: {status} {}{}: a different payload under the same key was {}",
                    self.identity(answer),
                    if answer.replayed { ", replayed" } else { "" },
                    if answer.replayed {
                        "answered with the original response"
                    } else {
                        "accepted"
                    }
                ));
                false
            }
            _ => {
                self.note(format!("{label}: server error {status}"));
                false
            }
        }
    }

    async fn changed_payload(&mut self) -> Result<Verdict, SendError> {
        let out = self.keyed();
        let mut changed = out.clone();
        changed.body = Some(self.audit.changed.clone());
        let before = self.count().await?;
        let transport = self.transport.clone();
        let first_out = out.clone();
        let first = tokio::spawn(async move {
            let answer = transport.send(first_out).await;
            (answer, Instant::now())
        });
        self.transport
            .wait(self.audit.config.in_flight_delay)
            .await?;
        let sent_at = Instant::now();
        let in_flight = self.answer(changed.clone()).await?;
        let (first, first_done) = first
            .await
            .map_err(|e| SendError::Malformed(format!("the first request's task failed: {e}")))?;
        let first = match first? {
            Exchange::Answered(a) => a,
            Exchange::Dropped => return Err(SendError::Malformed("dropped".into())),
        };
        let first = if first.status == 409 {
            // The changed payload won the race; settle the original.
            self.settle(out).await?.0
        } else {
            first
        };
        if !is_success(first.status) {
            self.note(format!(
                "the original request was answered {}; fix the request to audit this",
                first.status
            ));
            return Ok(Verdict::NotApplicable);
        }
        self.note(format!(
            "original: {} {}",
            first.status,
            self.identity(&first)
        ));
        let overlap = if first_done > sent_at {
            "while the original was in flight"
        } else {
            "in-flight window missed: the original had already completed"
        };
        let mut ok = self.judge_changed(&format!("changed body {overlap}"), &in_flight);
        let after_completion = self.answer(changed).await?;
        ok &= self.judge_changed("changed body after completion", &after_completion);
        let after = self.count().await?;
        ok &= self.effects(before, after, 1);
        Ok(if ok { Verdict::Pass } else { Verdict::Fail })
    }

    async fn scope(&mut self) -> Result<Verdict, SendError> {
        let Some(name) = self.audit.config.tenant_header.clone() else {
            self.note("no --tenant-header given");
            return Ok(Verdict::NotApplicable);
        };
        let mut a = self.keyed();
        a.tenant = Some(self.audit.first_tenant.clone());
        let mut b = a.clone();
        b.tenant = Some(self.audit.second_tenant.clone());
        let before = self.count().await?;
        let Some(first) = self.first(a).await? else {
            return Ok(Verdict::NotApplicable);
        };
        let (second, _) = self.settle(b).await?;
        let (ia, ib) = (self.identity(&first), self.identity(&second));
        let mut ok = match second.status {
            401 | 403 => {
                self.note(format!(
                    "second tenant ({name}: {:?}) refused with {}: pass a valid one with --second-tenant",
                    self.audit.config.second_tenant, second.status
                ));
                return Ok(Verdict::NotApplicable);
            }
            s if is_success(s) && (second.replayed || ia == ib) => {
                self.note(format!(
                    "second tenant: {s} {ib}{}: tenant A's response replayed to tenant B",
                    if second.replayed { ", replayed" } else { "" }
                ));
                false
            }
            s if is_success(s) => {
                self.note(format!("second tenant: {s} {ib}, an independent result"));
                true
            }
            s => {
                self.note(format!(
                    "second tenant: {s}: refused because tenant A used the key; keys are not scoped per tenant"
                ));
                false
            }
        };
        let after = self.count().await?;
        ok &= self.effects(before, after, 2);
        Ok(if ok { Verdict::Pass } else { Verdict::Fail })
    }

    async fn key_expiry(&mut self) -> Result<Verdict, SendError> {
        let Some(delay) = self.audit.config.retention_probe else {
            self.note("no --retention-probe given");
            return Ok(Verdict::NotApplicable);
        };
        let out = self.keyed();
        let before = self.count().await?;
        let Some(first) = self.first(out.clone()).await? else {
            return Ok(Verdict::NotApplicable);
        };
        self.transport.wait(delay).await?;
        let (again, conflicts) = self.settle(out).await?;
        let mut ok = self.same(
            &format!("retry after {}", human(delay)),
            &first,
            &again,
            conflicts,
        );
        let after = self.count().await?;
        ok &= self.effects(before, after, 1);
        Ok(if ok { Verdict::Pass } else { Verdict::Fail })
    }
}
