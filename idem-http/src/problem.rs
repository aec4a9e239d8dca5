//! The layer's own answers, as RFC 9457 `application/problem+json`.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::header::KeyHeaderError;

/// Prefix of the `type` URI of every problem the layer answers.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:idem:problem:";

/// Why the layer answered instead of the handler (or instead of a replay).
///
/// Each variant is one problem document with its own `type`
/// (`urn:idem:problem:<name>`), status and detail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The route requires an `Idempotency-Key` and the request has none (400,
    /// `idempotency-key-missing`).
    #[error("this request requires an Idempotency-Key header")]
    MissingKey,
    /// The header is malformed (400, `idempotency-key-malformed`).
    #[error("{0}")]
    MalformedKey(#[from] KeyHeaderError),
    /// The key, scoped by tenant and route, is not a valid [`idem_core::Key`] (400,
    /// `idempotency-key-malformed`): the tenant or the path is too long for a scope.
    #[error("{0}")]
    InvalidKey(#[source] idem_core::Error),
    /// The request body is larger than the layer buffers (413, `request-too-large`).
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The request body could not be read (400, `request-body-unreadable`).
    #[error("the request body could not be read: {0}")]
    BodyUnreadable(#[source] idem_core::BoxError),
    /// The key was used before for a different request (422, `idempotency-key-reused`).
    #[error(
        "this Idempotency-Key was already used for a different request (method, path or body)"
    )]
    Mismatch,
    /// A request with this key is still being processed (409 with `Retry-After`,
    /// `idempotency-key-in-flight`).
    #[error("a request with this Idempotency-Key is being processed; retry after {retry_after:?}")]
    InProgress {
        /// The estimate of when to retry.
        retry_after: Duration,
    },
    /// The handler's response body failed while it was read (500,
    /// `response-body-failed`); the key was released.
    #[error("the response body failed: {0}")]
    ResponseBodyFailed(#[source] idem_core::BoxError),
    /// The barrier or its store failed (409 for a lost lease, 503 with `Retry-After: 1` for a
    /// retryable store error, 500 otherwise; `idempotency-store`).
    #[error("{0}")]
    Barrier(#[source] idem_core::Error),
}

impl Rejection {
    /// The answer for a barrier error: [`Rejection::Mismatch`],
    /// [`Rejection::InProgress`], or [`Rejection::Barrier`].
    pub fn from_barrier(e: idem_core::Error) -> Self {
        match e {
            idem_core::Error::Mismatch => Rejection::Mismatch,
            idem_core::Error::InProgress { retry_after } => Rejection::InProgress { retry_after },
            e => Rejection::Barrier(e),
        }
    }

    /// The HTTP status of this answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::MissingKey
            | Rejection::MalformedKey(_)
            | Rejection::InvalidKey(_)
            | Rejection::BodyUnreadable(_) => StatusCode::BAD_REQUEST,
            Rejection::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
            Rejection::InProgress { .. } => StatusCode::CONFLICT,
            Rejection::ResponseBodyFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Rejection::Barrier(e) => {
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
        }
    }

    /// The problem's short name, the end of its `type` URI, also the `outcome` label of the
    /// layer's metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Rejection::MissingKey => "idempotency-key-missing",
            Rejection::MalformedKey(_) | Rejection::InvalidKey(_) => "idempotency-key-malformed",
            Rejection::BodyTooLarge { .. } => "request-too-large",
            Rejection::BodyUnreadable(_) => "request-body-unreadable",
            Rejection::Mismatch => "idempotency-key-reused",
            Rejection::InProgress { .. } => "idempotency-key-in-flight",
            Rejection::ResponseBodyFailed(_) => "response-body-failed",
            Rejection::Barrier(_) => "idempotency-store",
        }
    }

    /// The `Retry-After` this answer carries, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Rejection::InProgress { retry_after } => Some(*retry_after),
            Rejection::Barrier(e) if e.is_retryable() => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The problem+json response.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let status = self.status();
        let mut response = problem(status, self.name(), &self.to_string());
        if let Some(after) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after_value(after));
        }
        response
    }
}

/// An RFC 9457 problem document with type `urn:idem:problem:<name>`.
///
/// ```
/// let r = idem_http::problem(http::StatusCode::UNPROCESSABLE_ENTITY, "bad-amount", "amount must be positive");
/// assert_eq!(r.headers()["content-type"], "application/problem+json");
/// ```
pub fn problem(status: StatusCode, name: &str, detail: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "type": format!("{PROBLEM_TYPE_PREFIX}{name}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub(crate) fn retry_after_value(after: Duration) -> HeaderValue {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}
