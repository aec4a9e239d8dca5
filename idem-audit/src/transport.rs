//! The only way out: every request of the audit goes through [`Transport::send`], which
//! takes its URL from the configured [`Target`], never from the caller.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use url::Url;

use crate::error::{AuditError, SendError};

/// The endpoint and the request the audit repeats.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) url: Url,
    pub(crate) count_url: Option<Url>,
    pub(crate) method: Method,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
    pub(crate) key_header: HeaderName,
    pub(crate) tenant_header: Option<HeaderName>,
}

/// Whether two URLs share scheme, host and port.
pub(crate) fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Where a request goes: one of the two configured URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dest {
    /// The audited endpoint.
    Endpoint,
    /// The count endpoint (`GET`, no key, no body).
    Count,
}

/// The idempotency key of a request.
#[derive(Debug, Clone)]
pub(crate) enum KeyValue {
    /// No key header.
    Absent,
    /// The header with this raw value.
    Raw(HeaderValue),
}

/// One request to send.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) dest: Dest,
    pub(crate) key: KeyValue,
    /// Replaces the configured body.
    pub(crate) body: Option<Vec<u8>>,
    /// The tenant header's value.
    pub(crate) tenant: Option<HeaderValue>,
    /// Drop the connection this long after sending (the lost-response probe).
    pub(crate) drop_after: Option<Duration>,
}

impl Outgoing {
    /// The endpoint with a key.
    pub(crate) fn keyed(key: &str) -> Self {
        Outgoing {
            dest: Dest::Endpoint,
            key: HeaderValue::from_str(key).map_or(KeyValue::Absent, KeyValue::Raw),
            body: None,
            tenant: None,
            drop_after: None,
        }
    }

    /// A read of the count endpoint.
    pub(crate) fn count() -> Self {
        Outgoing {
            dest: Dest::Count,
            key: KeyValue::Absent,
            body: None,
            tenant: None,
            drop_after: None,
        }
    }
}

/// An answer: status, the headers the oracle reads, and the body.
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) retry_after: Option<String>,
    pub(crate) replayed: bool,
    pub(crate) body: Vec<u8>,
}

/// What became of a request.
#[derive(Debug)]
pub(crate) enum Exchange {
    /// It was answered.
    Answered(Answer),
    /// The connection was dropped before an answer came.
    Dropped,
}

/// The HTTP client, the target and the bounds.
#[derive(Debug)]
pub(crate) struct Transport {
    target: Target,
    client: reqwest::Client,
    timeout: Duration,
    sent: AtomicUsize,
    max_requests: usize,
    started: Instant,
    max_duration: Duration,
}

impl Transport {
    pub(crate) fn new(
        target: Target,
        timeout: Duration,
        max_requests: usize,
        max_duration: Duration,
    ) -> Result<Self, AuditError> {
        // No redirects (a 3xx would send the next request elsewhere) and no proxy.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .build()
            .map_err(AuditError::Client)?;
        Ok(Transport {
            target,
            client,
            timeout,
            sent: AtomicUsize::new(0),
            max_requests,
            started: Instant::now(),
            max_duration,
        })
    }

    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    /// Requests sent so far.
    pub(crate) fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// Time left before `max_duration`.
    pub(crate) fn remaining(&self) -> Duration {
        self.max_duration.saturating_sub(self.started.elapsed())
    }

    /// Sleeps `delay`, or fails when it would pass `max_duration`.
    pub(crate) async fn wait(&self, delay: Duration) -> Result<(), SendError> {
        if delay > self.remaining() {
            return Err(SendError::Deadline(self.max_duration));
        }
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Sends one request to the configured URL (or the configured count URL). This is the
    /// only function of the crate that sends anything.
    pub(crate) async fn send(&self, out: Outgoing) -> Result<Exchange, SendError> {
        let url = match out.dest {
            Dest::Endpoint => &self.target.url,
            Dest::Count => match &self.target.count_url {
                Some(count) if same_origin(count, &self.target.url) => count,
                _ => return Err(SendError::Malformed("no count URL configured".into())),
            },
        };
        if self.remaining().is_zero() {
            return Err(SendError::Deadline(self.max_duration));
        }
        if self.sent.fetch_add(1, Ordering::SeqCst) >= self.max_requests {
            self.sent.fetch_sub(1, Ordering::SeqCst);
            return Err(SendError::Budget(self.max_requests));
        }
        let (method, headers, body) = match out.dest {
            Dest::Count => (Method::GET, HeaderMap::new(), Vec::new()),
            Dest::Endpoint => {
                let mut headers = self.target.headers.clone();
                if let KeyValue::Raw(value) = &out.key {
                    headers.insert(self.target.key_header.clone(), value.clone());
                }
                if let (Some(name), Some(value)) = (&self.target.tenant_header, &out.tenant) {
                    headers.insert(name.clone(), value.clone());
                }
                let body = out.body.unwrap_or_else(|| self.target.body.clone());
                (self.target.method.clone(), headers, body)
            }
        };
        match out.drop_after {
            Some(after) => {
                self.send_and_drop(url, &method, &headers, &body, after)
                    .await
            }
            None => {
                let response = self
                    .client
                    .request(method, url.clone())
                    .headers(headers)
                    .body(body)
                    .send()
                    .await
                    .map_err(SendError::Http)?;
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let replayed = response
                    .headers()
                    .get("idempotent-replayed")
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
                let body = response.bytes().await.map_err(SendError::Http)?.to_vec();
                Ok(Exchange::Answered(Answer {
                    status,
                    retry_after,
                    replayed,
                    body,
                }))
            }
        }
    }

    /// Writes the whole request on a fresh connection, then closes it `after` later unless
    /// an answer started first (then its status line is read and the rest discarded).
    async fn send_and_drop(
        &self,
        url: &Url,
        method: &Method,
        headers: &HeaderMap,
        body: &[u8],
        after: Duration,
    ) -> Result<Exchange, SendError> {
        let host = url
            .host_str()
            .ok_or_else(|| SendError::Malformed("URL without a host".into()))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| SendError::Malformed("URL without a port".into()))?;
        let connect = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port));
        let mut stream = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| SendError::Malformed("connect timed out".into()))?
            .map_err(SendError::Io)?;
        let mut path = url.path().to_string();
        if let Some(query) = url.query() {
            path.push('?');
            path.push_str(query);
        }
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n").into_bytes();
        for (name, value) in headers {
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        head.extend_from_slice(body);
        stream.write_all(&head).await.map_err(SendError::Io)?;
        stream.flush().await.map_err(SendError::Io)?;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(after, stream.read(&mut buf)).await {
            Err(_) => Ok(Exchange::Dropped),
            Ok(Err(e)) => Err(SendError::Io(e)),
            Ok(Ok(0)) => Err(SendError::Malformed(
                "connection closed without an answer".into(),
            )),
            Ok(Ok(n)) => {
                let line = String::from_utf8_lossy(&buf[..n]);
                let status = line
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| SendError::Malformed(format!("status line {line:?}")))?;
                Ok(Exchange::Answered(Answer {
                    status,
                    retry_after: None,
                    replayed: false,
                    body: Vec::new(),
                }))
            }
        }
    }
}

/// The configured body's content type, when it should be set.
pub(crate) fn json_content_type(headers: &HeaderMap, body: &[u8]) -> Option<HeaderValue> {
    let is_json = serde_json::from_slice::<serde_json::Value>(body).is_ok();
    (is_json && !headers.contains_key(CONTENT_TYPE))
        .then(|| HeaderValue::from_static("application/json"))
}
