//! HTTP integration of the idempotency barrier, following
//! draft-ietf-httpapi-idempotency-key-header.
//!
//! - Server side: [`IdempotencyLayer`], a tower layer (axum, hyper, any tower service)
//!   that reads the `Idempotency-Key` header, runs the handler once per key, stores its
//!   response and replays it to retries with `Idempotent-Replayed: true`.
//! - Client side (feature `client`, on by default): [`client::IdempotencyMiddleware`], a
//!   `reqwest-middleware` middleware that attaches a key per logical request and retries
//!   with the same key.
//!
//! ```
//! use std::sync::Arc;
//! use axum::{routing::post, Router};
//! use idem_core::{Barrier, MemoryStore};
//! use idem_http::IdempotencyLayer;
//!
//! let barrier = Barrier::new(Arc::new(MemoryStore::new()));
//! let app: Router = Router::new()
//!     .route("/payments", post(|body: String| async move { (http::StatusCode::CREATED, body) }))
//!     .layer(IdempotencyLayer::new(barrier).tenant(|req| {
//!         let tenant = req.headers.get("x-tenant").and_then(|v| v.to_str().ok());
//!         tenant.unwrap_or("public").to_string()
//!     }));
//! # drop(app);
//! ```
//!
//! The guide, with the policies and their reasons, is `docs/http.md` in the repository.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

#[cfg(feature = "client")]
pub mod client;
mod header;
mod layer;
pub mod metrics;
mod problem;
mod stored;

pub use header::{
    format_key, parse_key, KeyHeaderError, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, MAX_KEY_LEN,
};
pub use layer::{
    default_disposition, Disposition, FingerprintBy, FingerprintFn, IdempotencyLayer, Idempotent,
    IdempotentRequest, DEFAULT_MAX_REQUEST_BODY, DEFAULT_MAX_STORED_BODY,
};
pub use problem::{problem, Rejection, PROBLEM_TYPE_PREFIX};
pub use stored::Reply;

/// The examples of `docs/http.md`, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/http.md")]
pub struct GuideDoctests;
