//! HTTP services for the auditor to audit, on 127.0.0.1 at a free port: a correct one (the
//! idem-http layer over SQLite) and deliberately broken ones, each with one defect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use idem_core::{Barrier, Store};
use idem_http::IdempotencyLayer;
use idem_sqlite::SqliteStore;

/// How long every handler works before its effect: the window the probes aim at.
pub const WORK: Duration = Duration::from_millis(300);

/// Effects taken, and every request that reached the service (any route).
#[derive(Default)]
pub struct Effects {
    pub effects: AtomicU64,
    pub requests: AtomicU64,
}

impl Effects {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// One effect: a new resource id.
    fn take(&self) -> u64 {
        self.effects.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// A running service: its base URL, its counters, and what keeps it alive.
pub struct Service {
    pub base: String,
    pub effects: Arc<Effects>,
    _dir: Option<tempfile::TempDir>,
}

impl Service {
    /// The audited endpoint.
    pub fn things(&self) -> String {
        format!("{}/things", self.base)
    }

    /// The effect count endpoint.
    pub fn count(&self) -> String {
        format!("{}/count", self.base)
    }
}

async fn serve(router: Router, effects: Arc<Effects>, dir: Option<tempfile::TempDir>) -> Service {
    let counted = effects.clone();
    let router = router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            counted.requests.fetch_add(1, Ordering::SeqCst);
            next.run(req)
        },
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Service {
        base: format!("http://{addr}"),
        effects,
        _dir: dir,
    }
}

fn created(id: u64, body: &[u8]) -> Response {
    let echo = String::from_utf8_lossy(body).to_string();
    (
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "id": format!("thing-{id}"), "echo": echo })),
    )
        .into_response()
}

async fn count(State(effects): State<Arc<Effects>>) -> String {
    effects.effects.load(Ordering::SeqCst).to_string()
}

/// Works, then takes its effect: cancelled during the work, it has no effect.
async fn work_then_effect(State(effects): State<Arc<Effects>>, body: Bytes) -> Response {
    tokio::time::sleep(WORK).await;
    created(effects.take(), &body)
}

/// Takes its effect, then works: cancelled during the work, the effect stays.
async fn effect_then_work(State(effects): State<Arc<Effects>>, body: Bytes) -> Response {
    let id = effects.take();
    tokio::time::sleep(WORK).await;
    created(id, &body)
}

async fn idem_service(scoped: bool, effect_first: bool) -> Service {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::connect(dir.path().join("idem.db"))
            .await
            .unwrap(),
    );
    let barrier = Barrier::new(store).with_lease(Duration::from_secs(1));
    let mut layer = IdempotencyLayer::new(barrier);
    if scoped {
        layer = layer.tenant(|req| {
            req.headers
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("anonymous")
                .to_string()
        });
    }
    let effects = Arc::new(Effects::default());
    let handler = if effect_first {
        post(effect_then_work)
    } else {
        post(work_then_effect)
    };
    let router = Router::new()
        .route("/things", handler.layer(layer))
        .route("/count", get(count))
        .with_state(effects.clone());
    serve(router, effects, Some(dir)).await
}

/// The correct service: idem-http's layer over a SQLite store, keys scoped per `X-Tenant`.
pub async fn correct() -> Service {
    idem_service(true, false).await
}

/// idem-http's layer without a tenant function: one key space for every tenant.
pub async fn unscoped() -> Service {
    idem_service(false, false).await
}

/// idem-http's layer (lease mode) over a handler that takes its effect before it works:
/// when the client goes away mid-request, the effect stays but no response is stored.
pub async fn effect_before_cancel() -> Service {
    idem_service(true, true).await
}

/// The defects of the hand-written services.
#[derive(Debug, Clone, Copy)]
pub enum Defect {
    /// Looks the key up, works, then records it: no atomic claim.
    CheckThenInsert,
    /// Claims keys atomically and stores responses, but never compares the payload.
    NoPayloadCheck,
    /// Forgets keys this long after their response.
    ShortTtl(Duration),
    /// Claims keys while in flight, but stores nothing: a retry after completion runs again.
    NotStored,
    /// A per-key lock that queues concurrent duplicates and hands them the result, dropped
    /// with the last holder: sequential retries run again.
    SerializingLock,
}

struct Done {
    fingerprint: Bytes,
    id: u64,
    body: Bytes,
    at: Instant,
}

enum Entry {
    InFlight(Bytes),
    Done(Done),
}

type Slot = Arc<tokio::sync::Mutex<Option<Done>>>;

struct Broken {
    defect: Defect,
    effects: Arc<Effects>,
    entries: Mutex<HashMap<String, Entry>>,
    locks: Mutex<HashMap<String, Slot>>,
}

/// Removes an in-flight claim when the handler is cancelled.
struct Claim<'a> {
    broken: &'a Broken,
    key: String,
    armed: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.broken.entries.lock().unwrap().remove(&self.key);
        }
    }
}

fn problem(status: StatusCode, what: &str) -> Response {
    let mut r = (status, what.to_string()).into_response();
    if status == StatusCode::CONFLICT {
        r.headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static("1"));
    }
    r
}

fn replay(done: &Done, body: &Bytes) -> Response {
    if done.fingerprint != *body {
        return problem(StatusCode::UNPROCESSABLE_ENTITY, "key reused");
    }
    created(done.id, &done.body)
}

async fn broken_handler(
    State(broken): State<Arc<Broken>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        Some(Ok(k)) if !k.is_empty() => k.to_string(),
        _ => return problem(StatusCode::BAD_REQUEST, "key missing or malformed"),
    };
    let b = &*broken;
    match b.defect {
        Defect::CheckThenInsert => {
            if let Some(Entry::Done(done)) = b.entries.lock().unwrap().get(&key) {
                return replay(done, &body);
            }
            tokio::time::sleep(WORK).await;
            let id = b.effects.take();
            let done = Done {
                fingerprint: body.clone(),
                id,
                body: body.clone(),
                at: Instant::now(),
            };
            b.entries.lock().unwrap().insert(key, Entry::Done(done));
            created(id, &body)
        }
        Defect::NoPayloadCheck | Defect::ShortTtl(_) | Defect::NotStored => {
            {
                let mut entries = b.entries.lock().unwrap();
                match entries.get(&key) {
                    Some(Entry::Done(done)) => match b.defect {
                        Defect::NoPayloadCheck => return created(done.id, &done.body),
                        Defect::ShortTtl(ttl) if done.at.elapsed() >= ttl => {}
                        _ => return replay(done, &body),
                    },
                    Some(Entry::InFlight(fingerprint)) => {
                        let checks = !matches!(b.defect, Defect::NoPayloadCheck);
                        if checks && *fingerprint != body {
                            return problem(StatusCode::UNPROCESSABLE_ENTITY, "key reused");
                        }
                        return problem(StatusCode::CONFLICT, "in progress");
                    }
                    None => {}
                }
                entries.insert(key.clone(), Entry::InFlight(body.clone()));
            }
            let mut claim = Claim {
                broken: b,
                key: key.clone(),
                armed: true,
            };
            tokio::time::sleep(WORK).await;
            let id = b.effects.take();
            claim.armed = false;
            let mut entries = b.entries.lock().unwrap();
            if matches!(b.defect, Defect::NotStored) {
                entries.remove(&key);
            } else {
                let done = Done {
                    fingerprint: body.clone(),
                    id,
                    body: body.clone(),
                    at: Instant::now(),
                };
                entries.insert(key, Entry::Done(done));
            }
            created(id, &body)
        }
        Defect::SerializingLock => {
            let slot = b
                .locks
                .lock()
                .unwrap()
                .entry(key.clone())
                .or_default()
                .clone();
            let response = {
                let mut done = slot.lock().await;
                match &*done {
                    Some(d) => replay(d, &body),
                    None => {
                        tokio::time::sleep(WORK).await;
                        let id = b.effects.take();
                        *done = Some(Done {
                            fingerprint: body.clone(),
                            id,
                            body: body.clone(),
                            at: Instant::now(),
                        });
                        created(id, &body)
                    }
                }
            };
            let mut locks = b.locks.lock().unwrap();
            // The map and this handler hold the last references: nobody waits, drop it.
            if Arc::strong_count(&slot) == 2 {
                locks.remove(&key);
            }
            response
        }
    }
}

/// A hand-written service with one defect.
pub async fn broken(defect: Defect) -> Service {
    let effects = Arc::new(Effects::default());
    let broken = Arc::new(Broken {
        defect,
        effects: effects.clone(),
        entries: Mutex::new(HashMap::new()),
        locks: Mutex::new(HashMap::new()),
    });
    let router = Router::new()
        .route("/things", post(broken_handler))
        .with_state(broken)
        .merge(
            Router::new()
                .route("/count", get(count))
                .with_state(effects.clone()),
        );
    serve(router, effects, None).await
}

/// A service that redirects every request to `to`.
pub async fn redirecting(to: String) -> Service {
    let effects = Arc::new(Effects::default());
    let router = Router::new().fallback(move || {
        let to = to.clone();
        async move {
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(axum::http::header::LOCATION, to)],
            )
        }
    });
    serve(router, effects, None).await
}
