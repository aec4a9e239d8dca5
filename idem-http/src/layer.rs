//! The tower layer and its service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, Limited};
use idem_core::{
    Barrier, BoxError, Error, Failure, Fingerprint, InFlight, Key, LeaseHandle, Outcome, RunError,
    Store, TransactionalStore, TxPolicy,
};
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::header::{parse_key, KeyHeaderError, IDEMPOTENCY_KEY};
use crate::metrics;
use crate::problem::Rejection;
use crate::stored::Reply;

/// Default largest request body the layer buffers to fingerprint: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 1 << 20;
/// Default largest response body stored for replay: 1 MiB.
pub const DEFAULT_MAX_STORED_BODY: usize = 1 << 20;

/// What happens to the key after the handler answered with a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The response is final: it is stored and replayed to every retry with the key.
    Store,
    /// The work did not take effect: the key is released, and the next request with it runs
    /// the handler again.
    Release,
}

/// The default [`Disposition`] policy.
///
/// | status | disposition |
/// |---|---|
/// | 5xx | [`Disposition::Release`]: the server failed, a retry should run again |
/// | 408 Request Timeout, 425 Too Early, 429 Too Many Requests | [`Disposition::Release`]: transient |
/// | everything else (2xx, 3xx, other 4xx) | [`Disposition::Store`] |
///
/// A handler that can fail with 5xx *after* its side effect took effect should deduplicate
/// that effect downstream (with [`LeaseHandle::derive`]) or use a policy that stores 5xx.
pub fn default_disposition(status: StatusCode) -> Disposition {
    match status.as_u16() {
        408 | 425 | 429 | 500..=599 => Disposition::Release,
        _ => Disposition::Store,
    }
}

/// A custom fingerprint: a function of the request head and body.
pub type FingerprintFn = Arc<dyn Fn(&Parts, &[u8]) -> Fingerprint + Send + Sync>;

/// How the request fingerprint is computed.
#[derive(Clone)]
pub enum FingerprintBy {
    /// Method, path with query, and the body's bytes (the default).
    MethodPathBody,
    /// Method, path with query, and the body as canonical JSON (object keys sorted, so field
    /// order and whitespace do not matter); a body that is not JSON falls back to its bytes.
    MethodPathJson,
    /// The method, path, the listed request headers (in order, absent ones as empty), and
    /// the body's bytes.
    MethodPathHeadersBody(Vec<HeaderName>),
    /// The caller's own function of the request head and body.
    Custom(FingerprintFn),
}

impl fmt::Debug for FingerprintBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FingerprintBy::MethodPathBody => f.write_str("MethodPathBody"),
            FingerprintBy::MethodPathJson => f.write_str("MethodPathJson"),
            FingerprintBy::MethodPathHeadersBody(h) => {
                f.debug_tuple("MethodPathHeadersBody").field(h).finish()
            }
            FingerprintBy::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

impl FingerprintBy {
    fn compute(&self, parts: &Parts, body: &[u8]) -> Fingerprint {
        let mut canonical = Vec::with_capacity(body.len() + 64);
        let mut field = |bytes: &[u8]| {
            canonical.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
            canonical.extend_from_slice(bytes);
        };
        field(parts.method.as_str().as_bytes());
        field(
            parts
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .as_bytes(),
        );
        match self {
            FingerprintBy::MethodPathBody => field(body),
            FingerprintBy::MethodPathJson => {
                match serde_json::from_slice::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| Fingerprint::of_json(&v).ok())
                {
                    Some(json) => {
                        field(b"json");
                        field(json.as_bytes());
                    }
                    None => {
                        field(b"bytes");
                        field(body);
                    }
                }
            }
            FingerprintBy::MethodPathHeadersBody(names) => {
                for name in names {
                    field(parts.headers.get(name).map_or(&[][..], |v| v.as_bytes()));
                }
                field(body);
            }
            FingerprintBy::Custom(f) => return f(parts, body),
        }
        Fingerprint::of_bytes(&canonical)
    }
}

type ScopeFn = Arc<dyn Fn(&Parts) -> String + Send + Sync>;
type PolicyFn = Arc<dyn Fn(StatusCode) -> Disposition + Send + Sync>;

/// The layer's settings, shared by every service it makes.
#[derive(Clone)]
struct Config {
    required: bool,
    in_flight: InFlight,
    tenant: ScopeFn,
    fingerprint: FingerprintBy,
    policy: PolicyFn,
    replay_headers: Vec<HeaderName>,
    max_request_body: usize,
    max_stored_body: usize,
    heartbeat: Option<Duration>,
    methods: Vec<Method>,
    transactional: bool,
}

/// A tower [`Layer`] that makes requests with an `Idempotency-Key` take effect once.
///
/// Each request with a key is scoped by the tenant (from [`IdempotencyLayer::tenant`],
/// default the empty tenant), its method and its path, and claimed in the barrier's store:
///
/// | situation | answer |
/// |---|---|
/// | no key, on a route that requires one (the default) | 400 `idempotency-key-missing` |
/// | no key, [`IdempotencyLayer::optional`] | the handler runs unguarded |
/// | malformed key | 400 `idempotency-key-malformed` |
/// | request body over [`IdempotencyLayer::max_request_body`] | 413 `request-too-large` |
/// | first request | the handler runs; its response is stored or the key released ([`Disposition`]) |
/// | retry after a stored response | the stored status, headers and body, plus `Idempotent-Replayed: true` |
/// | same key, different method, path or body (in flight or finished) | 422 `idempotency-key-reused` |
/// | duplicate while the first runs, [`InFlight::Reject`] (default) | 409 `idempotency-key-in-flight` with `Retry-After` |
/// | duplicate while the first runs, [`InFlight::Wait`] | waits (bounded) and replays, or runs if the first released the key; 409 when the wait runs out |
/// | store failure | 503 with `Retry-After: 1` (retryable), else 500 |
///
/// Requests whose method is not in [`IdempotencyLayer::methods`] (default `POST` and
/// `PATCH`) pass through untouched, their responses streamed as they are. Guarded responses
/// are read whole (to be stored) before they are sent.
///
/// The handler can take the key's [`LeaseHandle`] from the request extensions
/// (`Extension<LeaseHandle<S>>` in axum) to derive downstream keys. While it runs, the lease
/// is extended every third of the barrier's lease (see [`IdempotencyLayer::heartbeat`]).
///
/// If the request's future is dropped while the handler runs (the client went away and the
/// server cancelled it), the key stays claimed until its lease runs out, because the
/// handler's effect may still land; then a retry reclaims it and runs the handler again.
pub struct IdempotencyLayer<S: ?Sized> {
    barrier: Barrier<S>,
    config: Arc<Config>,
}

impl<S: ?Sized> Clone for IdempotencyLayer<S> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            barrier: self.barrier.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S: ?Sized> fmt::Debug for IdempotencyLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("required", &self.config.required)
            .field("in_flight", &self.config.in_flight)
            .field("fingerprint", &self.config.fingerprint)
            .field("max_request_body", &self.config.max_request_body)
            .field("max_stored_body", &self.config.max_stored_body)
            .finish_non_exhaustive()
    }
}

impl<S: ?Sized> IdempotencyLayer<S> {
    /// A layer over `barrier` with the defaults: key required on `POST` and `PATCH`, one
    /// tenant, [`InFlight::Reject`], [`FingerprintBy::MethodPathBody`],
    /// [`default_disposition`], 1 MiB request and stored-body limits, heartbeat every
    /// third of the lease.
    pub fn new(barrier: Barrier<S>) -> Self {
        IdempotencyLayer {
            barrier,
            config: Arc::new(Config {
                required: true,
                in_flight: InFlight::Reject,
                tenant: Arc::new(|_| String::new()),
                fingerprint: FingerprintBy::MethodPathBody,
                policy: Arc::new(default_disposition),
                replay_headers: Vec::new(),
                max_request_body: DEFAULT_MAX_REQUEST_BODY,
                max_stored_body: DEFAULT_MAX_STORED_BODY,
                heartbeat: None,
                methods: vec![Method::POST, Method::PATCH],
                transactional: false,
            }),
        }
    }

    fn with(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// Requests without a key run the handler unguarded instead of getting 400.
    pub fn optional(self) -> Self {
        self.with(|c| c.required = false)
    }

    /// What a duplicate does while the first request runs: [`InFlight::Reject`] (409 at
    /// once) or [`InFlight::Wait`] (wait up to the given time for the outcome, then 409).
    /// Apply differently configured layers to different routes for a per-route choice.
    pub fn in_flight(self, in_flight: InFlight) -> Self {
        self.with(|c| c.in_flight = in_flight)
    }

    /// The tenant of a request (a header, an authenticated principal from an extension):
    /// two tenants' identical keys never meet.
    pub fn tenant(self, tenant: impl Fn(&Parts) -> String + Send + Sync + 'static) -> Self {
        self.with(|c| c.tenant = Arc::new(tenant))
    }

    /// How the request fingerprint is computed.
    pub fn fingerprint(self, by: FingerprintBy) -> Self {
        self.with(|c| c.fingerprint = by)
    }

    /// Which responses are final and which release the key (default
    /// [`default_disposition`]).
    pub fn disposition(
        self,
        policy: impl Fn(StatusCode) -> Disposition + Send + Sync + 'static,
    ) -> Self {
        self.with(|c| c.policy = Arc::new(policy))
    }

    /// Stores and replays this response header too; `Content-Type`, `Location` and
    /// `Content-Encoding` always are.
    pub fn replay_header(self, name: HeaderName) -> Self {
        self.with(|c| c.replay_headers.push(name))
    }

    /// The largest request body buffered for the fingerprint; larger requests get 413.
    pub fn max_request_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_request_body = bytes)
    }

    /// The largest response body stored for replay. A larger response is still sent whole
    /// to the first caller and its key is still completed (the work took effect), but
    /// replays carry its status and stored headers with an empty body and no
    /// `Content-Type`.
    pub fn max_stored_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_stored_body = bytes)
    }

    /// How often the lease is extended while the handler runs; default a third of the
    /// barrier's lease.
    pub fn heartbeat(self, every: Duration) -> Self {
        self.with(|c| c.heartbeat = Some(every))
    }

    /// Transactional mode: the layer checks the key, scopes and fingerprints the request as
    /// usual, then calls the handler with an [`IdempotentRequest`] in the request
    /// extensions instead of claiming the key itself. The handler runs its business writes
    /// and the key's outcome in one database transaction with
    /// [`IdempotentRequest::transaction`] (stores that implement
    /// [`idem_core::TransactionalStore`]: SQLite, PostgreSQL, MySQL, …). The in-flight
    /// policy maps to [`TxPolicy::NoWait`] ([`InFlight::Reject`]) or [`TxPolicy::Wait`]
    /// ([`InFlight::Wait`], bounded by the store's lock timeout rather than the given time).
    pub fn transactional(self) -> Self {
        self.with(|c| c.transactional = true)
    }

    /// The methods the layer guards (default `POST` and `PATCH`); others pass through.
    pub fn methods(self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.with(|c| c.methods = methods.into_iter().collect())
    }
}

impl<S: ?Sized, Svc> Layer<Svc> for IdempotencyLayer<S> {
    type Service = Idempotent<S, Svc>;

    fn layer(&self, inner: Svc) -> Self::Service {
        Idempotent {
            layer: self.clone(),
            inner,
        }
    }
}

/// The service made by [`IdempotencyLayer`].
pub struct Idempotent<S: ?Sized, Svc> {
    layer: IdempotencyLayer<S>,
    inner: Svc,
}

impl<S: ?Sized, Svc: Clone> Clone for Idempotent<S, Svc> {
    fn clone(&self) -> Self {
        Idempotent {
            layer: self.layer.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<S: ?Sized, Svc: fmt::Debug> fmt::Debug for Idempotent<S, Svc> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent")
            .field("layer", &self.layer)
            .field("inner", &self.inner)
            .finish()
    }
}

/// Why the handler's run ended without a stored response.
enum Released<E> {
    /// The policy released the key; the response goes to the caller as it is.
    Response(Box<Reply>),
    /// The response body failed.
    Body(BoxError),
    /// The inner service failed.
    Service(E),
}

impl<S, Svc, B, RB> Service<Request<B>> for Idempotent<S, Svc>
where
    S: Store + ?Sized + 'static,
    Svc: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Send + 'static,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<Either<Full<Bytes>, RB>>;
    type Error = Svc::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Svc::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The ready service goes to this call; its clone waits for the next poll_ready.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(handle(layer, inner, req))
    }
}

async fn handle<S, Svc, B, RB>(
    layer: IdempotencyLayer<S>,
    mut inner: Svc,
    req: Request<B>,
) -> Result<Response<Either<Full<Bytes>, RB>>, Svc::Error>
where
    S: Store + ?Sized + 'static,
    Svc: Service<Request<B>, Response = Response<RB>> + Send + 'static,
    Svc::Future: Send + 'static,
    B: Body + From<Bytes> + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let config = &layer.config;
    let started = Instant::now();
    if !config.methods.contains(req.method()) {
        return passthrough(inner.call(req)).await;
    }
    let mut values = req.headers().get_all(IDEMPOTENCY_KEY).iter();
    let id = match (values.next(), values.next()) {
        (None, _) if !config.required => {
            metrics::request("unguarded", started);
            return passthrough(inner.call(req)).await;
        }
        (None, _) => Err(Rejection::MissingKey),
        (Some(_), Some(_)) => Err(Rejection::MalformedKey(KeyHeaderError::Repeated)),
        (Some(v), None) => parse_key(v).map_err(Rejection::from),
    };
    let (parts, body) = req.into_parts();
    let scoped = id.and_then(|id| {
        let tenant = (config.tenant)(&parts);
        let scope = format!(
            "{}:{tenant} {} {}",
            tenant.len(),
            parts.method,
            parts.uri.path()
        );
        Key::new(scope, id).map_err(Rejection::InvalidKey)
    });
    let key = match scoped {
        Ok(key) => key,
        Err(rejection) => return Ok(reject(rejection, started).map(Either::Left)),
    };
    let span = tracing::info_span!(
        "idem.http",
        method = %parts.method,
        path = parts.uri.path(),
        key = key.id(),
        outcome = tracing::field::Empty,
    );
    async move {
        let body = match Limited::new(body, config.max_request_body).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Ok(reject(
                    Rejection::BodyTooLarge {
                        limit: config.max_request_body,
                    },
                    started,
                )
                .map(Either::Left))
            }
            Err(e) => return Ok(reject(Rejection::BodyUnreadable(e), started).map(Either::Left)),
        };
        let fingerprint = config.fingerprint.compute(&parts, &body);
        if config.transactional {
            let mut req = Request::from_parts(parts, B::from(body));
            req.extensions_mut().insert(IdempotentRequest {
                barrier: layer.barrier.clone(),
                key,
                fingerprint,
                policy: match config.in_flight {
                    InFlight::Reject => TxPolicy::NoWait,
                    InFlight::Wait(_) => TxPolicy::Wait,
                },
            });
            return passthrough(inner.call(req)).await;
        }
        let period = config
            .heartbeat
            .unwrap_or(layer.barrier.lease() / 3)
            .max(Duration::from_millis(1));
        let result = layer
            .barrier
            .execute_with(&key, Some(fingerprint), config.in_flight, |lease| {
                run(inner, parts, body, lease, period, config)
            })
            .await;
        Ok(match result {
            Ok(response) => {
                let outcome = if response.replayed {
                    "replayed"
                } else {
                    "executed"
                };
                tracing::Span::current().record("outcome", outcome);
                metrics::request(outcome, started);
                match response.outcome {
                    Outcome::Completed(stored) | Outcome::Failed(stored) => {
                        stored.into_response(response.replayed)
                    }
                }
            }
            Err(RunError::Operation(Released::Response(stored))) => {
                tracing::Span::current().record("outcome", "released");
                metrics::request("released", started);
                stored.into_response(false)
            }
            Err(RunError::Operation(Released::Service(e))) => {
                tracing::Span::current().record("outcome", "service-error");
                metrics::request("service-error", started);
                return Err(e);
            }
            Err(RunError::Operation(Released::Body(e))) => {
                reject(Rejection::ResponseBodyFailed(e), started)
            }
            Err(RunError::Barrier(e)) => reject(Rejection::from_barrier(e), started),
        }
        .map(Either::Left))
    }
    .instrument(span)
    .await
}

/// Runs the handler under the lease, with the heartbeat, and decides what to store.
async fn run<S, Svc, B, RB>(
    mut inner: Svc,
    parts: Parts,
    body: Bytes,
    lease: LeaseHandle<S>,
    period: Duration,
    config: &Config,
) -> Result<Reply, Failure<Reply, Released<Svc::Error>>>
where
    S: Store + ?Sized + 'static,
    Svc: Service<Request<B>, Response = Response<RB>>,
    B: From<Bytes>,
    RB: Body,
    RB::Error: Into<BoxError>,
{
    let mut req = Request::from_parts(parts, B::from(body));
    req.extensions_mut().insert(lease.clone());
    let work = inner.call(req);
    let response = with_heartbeat(work, &lease, period)
        .await
        .map_err(|e| Failure::Retryable(Released::Service(e)))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| Failure::Retryable(Released::Body(e.into())))?
        .to_bytes();
    let status = parts.status;
    let stored = Reply::capture(parts, body, &config.replay_headers, config.max_stored_body);
    if stored.body_omitted() {
        metrics::body_omitted();
        tracing::warn!(
            status = stored.status().as_u16(),
            limit = config.max_stored_body,
            "response body too large to store; replays get an empty body"
        );
    }
    match (config.policy)(status) {
        Disposition::Release => Err(Failure::Retryable(Released::Response(Box::new(stored)))),
        Disposition::Store if status.is_success() || status.is_redirection() => Ok(stored),
        Disposition::Store => Err(Failure::Permanent(stored)),
    }
}

/// Polls `work`, extending the lease every `period` while it runs. A lost lease stops the
/// heartbeat; the outcome write then fails with `LeaseLost` and nothing is stored.
async fn with_heartbeat<S, F: Future>(
    work: F,
    lease: &LeaseHandle<S>,
    period: Duration,
) -> F::Output
where
    S: Store + ?Sized + 'static,
{
    let mut work = std::pin::pin!(work);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beating = true;
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticks.tick(), if beating => {
                metrics::heartbeat();
                if let Err(e) = lease.extend().await {
                    tracing::warn!(error = %e, "could not extend the lease of a running request");
                    beating = !matches!(e, Error::LeaseLost);
                }
            }
        }
    }
}

/// The inner service's response, its body streamed untouched.
async fn passthrough<F, RB, E>(work: F) -> Result<Response<Either<Full<Bytes>, RB>>, E>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    Ok(work.await?.map(Either::Right))
}

fn reject(rejection: Rejection, started: Instant) -> Response<Full<Bytes>> {
    tracing::Span::current().record("outcome", rejection.name());
    metrics::request(rejection.name(), started);
    tracing::debug!(status = rejection.status().as_u16(), "{rejection}");
    rejection.into_response()
}

/// A request checked by a [`IdempotencyLayer::transactional`] layer: its scoped key and
/// fingerprint, ready for [`IdempotentRequest::transaction`]. In axum, take it with
/// `Extension<IdempotentRequest<S>>`.
pub struct IdempotentRequest<S: ?Sized> {
    barrier: Barrier<S>,
    key: Key,
    fingerprint: Fingerprint,
    policy: TxPolicy,
}

impl<S: ?Sized> Clone for IdempotentRequest<S> {
    fn clone(&self) -> Self {
        IdempotentRequest {
            barrier: self.barrier.clone(),
            key: self.key.clone(),
            fingerprint: self.fingerprint,
            policy: self.policy,
        }
    }
}

impl<S: ?Sized> fmt::Debug for IdempotentRequest<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotentRequest")
            .field("key", &self.key)
            .field("fingerprint", &self.fingerprint)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl<S: ?Sized> IdempotentRequest<S> {
    /// The scoped key (tenant, method and path in its scope).
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The request's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

impl<S: TransactionalStore + 'static> IdempotentRequest<S> {
    /// Runs `op` (the store's own operation type, for example an
    /// `idem_sqlite::SqliteOperation<Reply, Reply, E>`) in one transaction with the key's
    /// claim and outcome, and answers like the lease-mode layer does:
    ///
    /// - `Ok(reply)`: the business writes commit with the reply as the key's outcome; the
    ///   reply is sent, and replayed to every retry with `Idempotent-Replayed: true`;
    /// - `Err(Failure::Permanent(reply))`: the business writes roll back and the reply (a
    ///   4xx, typically) is stored and replayed;
    /// - `Err(Failure::Retryable(e))`: everything rolls back, nothing is stored, and `e` is
    ///   returned for the handler to answer (the next request with the key runs again);
    /// - a concurrent duplicate waits for the first transaction and replays it, or gets 409
    ///   (by the layer's in-flight policy); a different request with the key gets 422; a
    ///   store failure 503 or 500, all as problem+json.
    pub async fn transaction<E: Send + 'static>(
        &self,
        op: S::Operation<Reply, Reply, E>,
    ) -> Result<Response<Full<Bytes>>, E> {
        let started = Instant::now();
        let result = self
            .barrier
            .transaction(&self.key, Some(self.fingerprint), self.policy, op)
            .await;
        Ok(match result {
            Ok(response) => {
                metrics::request(
                    if response.replayed {
                        "replayed"
                    } else {
                        "executed"
                    },
                    started,
                );
                match response.outcome {
                    Outcome::Completed(reply) | Outcome::Failed(reply) => {
                        reply.into_response(response.replayed)
                    }
                }
            }
            Err(RunError::Operation(e)) => {
                metrics::request("released", started);
                return Err(e);
            }
            Err(RunError::Barrier(e)) => reject(Rejection::from_barrier(e), started),
        })
    }
}
