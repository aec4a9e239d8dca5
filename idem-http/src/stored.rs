//! A response as the barrier stores and replays it.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

use crate::header::IDEMPOTENT_REPLAYED;

/// Headers always kept with a stored response, besides the configured ones.
pub(crate) const ALWAYS_STORED: [HeaderName; 3] = [
    header::CONTENT_TYPE,
    header::LOCATION,
    header::CONTENT_ENCODING,
];

/// A response as the barrier stores it: the status, the headers that matter, the body.
///
/// The layer captures one from each handler response. In transactional mode
/// ([`crate::IdempotentRequest::transaction`]) the operation returns one, and it is stored
/// in the same transaction as the business writes.
///
/// ```
/// use http::StatusCode;
/// let reply = idem_http::Reply::json(StatusCode::CREATED, &serde_json::json!({"id": 7}))?
///     .with_header(http::header::LOCATION, "/payments/7");
/// let response = reply.into_response(false);
/// assert_eq!(response.status(), StatusCode::CREATED);
/// assert_eq!(response.headers()["location"], "/payments/7");
/// # Ok::<(), idem_core::Error>(())
/// ```
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    /// Base64 of the body; `None` when it was larger than the stored-body limit.
    body: Option<String>,
    /// The fresh response, handed to the first caller whole (all its headers); never stored.
    #[serde(skip)]
    live: Option<Box<(http::response::Parts, Bytes)>>,
}

impl Reply {
    /// A response with `status`, a `Content-Type` and `body`.
    pub fn new(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Self {
        Reply {
            status: status.as_u16(),
            headers: vec![(
                header::CONTENT_TYPE.as_str().to_string(),
                content_type.to_string(),
            )],
            body: Some(STANDARD.encode(body.into())),
            live: None,
        }
    }

    /// A JSON response; fails with [`idem_core::Error::Encode`] if `value` cannot be
    /// serialized.
    pub fn json<T: Serialize + ?Sized>(
        status: StatusCode,
        value: &T,
    ) -> Result<Self, idem_core::Error> {
        let body = serde_json::to_vec(value).map_err(|e| idem_core::Error::Encode(Box::new(e)))?;
        Ok(Reply::new(status, "application/json", body))
    }

    /// Adds a header (one with a value that is not visible ASCII is not stored).
    pub fn with_header(mut self, name: HeaderName, value: &str) -> Self {
        self.headers
            .push((name.as_str().to_string(), value.to_string()));
        self
    }

    /// Captures `parts` and `body`; the body is kept only up to `max_body` bytes.
    pub(crate) fn capture(
        parts: http::response::Parts,
        body: Bytes,
        extra: &[HeaderName],
        max_body: usize,
    ) -> Self {
        let headers = ALWAYS_STORED
            .iter()
            .chain(extra)
            .flat_map(|name| {
                parts.headers.get_all(name).iter().filter_map(move |v| {
                    v.to_str()
                        .ok()
                        .map(|v| (name.as_str().to_string(), v.to_string()))
                })
            })
            .collect();
        Reply {
            status: parts.status.as_u16(),
            headers,
            body: (body.len() <= max_body).then(|| STANDARD.encode(&body)),
            live: Some(Box::new((parts, body))),
        }
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Whether the body was too large to store.
    pub(crate) fn body_omitted(&self) -> bool {
        self.body.is_none()
    }

    /// The HTTP response: the handler's own if this reply was just captured from it, else
    /// built from the stored parts, with `Idempotent-Replayed: true` when `replayed`.
    pub fn into_response(self, replayed: bool) -> Response<Full<Bytes>> {
        if let Some(live) = self.live {
            let (parts, body) = *live;
            return Response::from_parts(parts, Full::new(body));
        }
        let body = self
            .body
            .as_deref()
            .and_then(|b| STANDARD.decode(b).ok())
            .map(Bytes::from);
        let omitted = body.is_none();
        let mut response = Response::new(Full::new(body.unwrap_or_default()));
        *response.status_mut() = self.status();
        let headers: &mut HeaderMap = response.headers_mut();
        for (name, value) in &self.headers {
            if omitted && name == header::CONTENT_TYPE.as_str() {
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(name, value);
            }
        }
        if replayed {
            headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        response
    }
}
