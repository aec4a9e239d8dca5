//! The client side: a `reqwest-middleware` middleware that attaches an `Idempotency-Key` per
//! logical request and retries with the same key.
//!
//! ```no_run
//! use idem_http::client::{IdempotencyMiddleware, ParentKey};
//!
//! # async fn demo() -> Result<(), reqwest_middleware::Error> {
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(IdempotencyMiddleware::default())
//!     .build();
//! // A fresh random key, kept across the retries of this one call.
//! client.post("http://127.0.0.1:8080/payments").body("{}").send().await?;
//! // A key derived from the request this service is handling, so a retry of that request
//! // sends the same key downstream.
//! client
//!     .post("http://127.0.0.1:8080/payments")
//!     .with_extension(ParentKey::new("incoming-key-7", "charge"))
//!     .body("{}")
//!     .send()
//!     .await?;
//! # Ok(()) }
//! ```

use std::time::Duration;

use http::{Extensions, HeaderValue, Method, StatusCode};
use idem_core::Key;
use rand::Rng;
use reqwest::{Request, Response};
use reqwest_middleware::{Middleware, Next};

use crate::header::{format_key, parse_key, IDEMPOTENCY_KEY};

/// Default number of attempts per logical request (the first one included).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default first pause between attempts without a `Retry-After`.
pub const DEFAULT_BASE_BACKOFF: Duration = Duration::from_millis(100);
/// Default longest pause between attempts, `Retry-After` included.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(10);

/// An explicit key for one request, as a request extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(pub String);

/// Derive the key from a parent key (the key of the request being handled) and a label
/// naming this call, as a request extension: the same parent and label always give the
/// same key, so a retried parent sends the same key downstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentKey {
    parent: String,
    label: String,
}

impl ParentKey {
    /// The key of the request being handled, and a label naming this downstream call.
    pub fn new(parent: impl Into<String>, label: impl Into<String>) -> Self {
        ParentKey {
            parent: parent.into(),
            label: label.into(),
        }
    }

    /// The derived key: [`Key::derive`] of the parent key (`idem1-` and 64 hex digits).
    pub fn key(&self) -> Result<String, ClientError> {
        let parent = Key::new("", self.parent.as_str()).map_err(ClientError::InvalidParent)?;
        Ok(parent.derive(&self.label).id().to_string())
    }
}

/// Errors of the middleware itself (wrapped in [`reqwest_middleware::Error::Middleware`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A [`ParentKey`]'s parent is not a valid key id.
    #[error("the parent idempotency key is invalid: {0}")]
    InvalidParent(#[source] idem_core::Error),
    /// The key given as an [`IdempotencyKey`] or a header is not a valid key.
    #[error("the idempotency key is invalid: {0}")]
    InvalidKey(#[source] crate::KeyHeaderError),
}

/// Attaches an `Idempotency-Key` to each logical request of the guarded methods (default
/// `POST` and `PATCH`) and retries it with the same key.
///
/// The key is, in order: the request's own `Idempotency-Key` header; an
/// [`IdempotencyKey`] extension; a key derived from a [`ParentKey`] extension; else 128
/// random bits in hex. It is sent as an RFC 8941 sf-string.
///
/// An attempt is retried, up to [`IdempotencyMiddleware::max_attempts`] attempts in all,
/// when it fails with a network error (connect, timeout, a connection closed before the
/// response) or answers 5xx or 409 (the same key in flight). The pause is the response's
/// `Retry-After` in seconds if it has one, else exponential backoff from
/// [`IdempotencyMiddleware::base_backoff`]; either is capped at
/// [`IdempotencyMiddleware::max_backoff`]. The last attempt's response or error is returned.
/// A request whose body cannot be cloned (a stream) is sent once.
#[derive(Debug, Clone)]
pub struct IdempotencyMiddleware {
    max_attempts: u32,
    base_backoff: Duration,
    max_backoff: Duration,
    methods: Vec<Method>,
}

impl Default for IdempotencyMiddleware {
    fn default() -> Self {
        IdempotencyMiddleware {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            base_backoff: DEFAULT_BASE_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            methods: vec![Method::POST, Method::PATCH],
        }
    }
}

impl IdempotencyMiddleware {
    /// Attempts per logical request, the first included (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// The first pause without a `Retry-After`; it doubles per attempt.
    pub fn base_backoff(mut self, pause: Duration) -> Self {
        self.base_backoff = pause;
        self
    }

    /// The longest pause between attempts, `Retry-After` included.
    pub fn max_backoff(mut self, pause: Duration) -> Self {
        self.max_backoff = pause;
        self
    }

    /// The methods that get a key and retries; other requests pass through untouched.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// The key for `req`, by the order documented on the type.
    fn key_for(&self, req: &Request, extensions: &Extensions) -> Result<HeaderValue, ClientError> {
        if let Some(value) = req.headers().get(IDEMPOTENCY_KEY) {
            parse_key(value).map_err(ClientError::InvalidKey)?;
            return Ok(value.clone());
        }
        let key = if let Some(IdempotencyKey(key)) = extensions.get::<IdempotencyKey>() {
            key.clone()
        } else if let Some(parent) = extensions.get::<ParentKey>() {
            parent.key()?
        } else {
            format!("{:032x}", rand::rng().random::<u128>())
        };
        let value = format_key(&key);
        parse_key(&value).map_err(ClientError::InvalidKey)?;
        Ok(value)
    }

    /// The pause before attempt `attempt + 1`.
    fn pause(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = || {
            self.base_backoff
                .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1)))
        };
        retry_after.unwrap_or_else(backoff).min(self.max_backoff)
    }
}

/// Whether an answer is worth retrying with the same key.
fn retryable_status(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::CONFLICT
}

/// `Retry-After` as delta-seconds (an HTTP date is ignored: backoff is used instead).
fn retry_after(response: &Response) -> Option<Duration> {
    let value = response.headers().get(http::header::RETRY_AFTER)?;
    value
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[async_trait::async_trait]
impl Middleware for IdempotencyMiddleware {
    async fn handle(
        &self,
        mut req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        if !self.methods.contains(req.method()) {
            return next.run(req, extensions).await;
        }
        let key = self
            .key_for(&req, extensions)
            .map_err(reqwest_middleware::Error::middleware)?;
        req.headers_mut().insert(IDEMPOTENCY_KEY, key);
        let mut attempt = 1;
        loop {
            let Some(this) = (attempt < self.max_attempts)
                .then(|| req.try_clone())
                .flatten()
            else {
                return next.run(req, extensions).await;
            };
            let wait = match next.clone().run(this, extensions).await {
                Ok(response) if retryable_status(response.status()) => {
                    tracing::debug!(status = %response.status(), attempt, "retrying with the same idempotency key");
                    retry_after(&response)
                }
                Err(reqwest_middleware::Error::Reqwest(e)) if !e.is_builder() => {
                    tracing::debug!(error = %e, attempt, "retrying with the same idempotency key");
                    None
                }
                other => return other,
            };
            tokio::time::sleep(self.pause(attempt, wait)).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_are_bounded() {
        let m = IdempotencyMiddleware::default()
            .base_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_secs(1));
        assert_eq!(m.pause(1, None), Duration::from_millis(100));
        assert_eq!(m.pause(3, None), Duration::from_millis(400));
        assert_eq!(m.pause(30, None), Duration::from_secs(1));
        assert_eq!(
            m.pause(1, Some(Duration::from_secs(60))),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn derived_keys_are_stable_and_valid() {
        let a = ParentKey::new("parent-1", "charge").key().unwrap();
        assert_eq!(a, ParentKey::new("parent-1", "charge").key().unwrap());
        assert_ne!(a, ParentKey::new("parent-1", "email").key().unwrap());
        assert!(parse_key(&format_key(&a)).is_ok());
        assert!(ParentKey::new("has space", "x").key().is_err());
    }
}
