//! A test API behind the layer, served on a real port, and the stores it runs on.

#![allow(dead_code)] // Each test binary uses a part of the harness.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use idem_core::{Barrier, InFlight, Store};
use idem_http::{problem, IdempotencyLayer};
use idem_postgres::sqlx::{self, AssertSqlSafe};
use idem_postgres::{PgOptions, PgStore};
use idem_sqlite::SqliteStore;
use tokio::sync::{mpsc, Mutex, Semaphore};

/// The handlers' shared state: how often they ran, and a gate that holds `/slow*`.
pub struct App {
    pub runs: AtomicU32,
    /// Handlers whose future was dropped before they answered.
    pub cancelled: AtomicU32,
    flaky: AtomicU32,
    gate: Semaphore,
    entered_tx: mpsc::UnboundedSender<()>,
    entered_rx: Mutex<mpsc::UnboundedReceiver<()>>,
}

impl App {
    pub fn new() -> Arc<Self> {
        let (entered_tx, entered_rx) = mpsc::unbounded_channel();
        Arc::new(App {
            runs: AtomicU32::new(0),
            cancelled: AtomicU32::new(0),
            flaky: AtomicU32::new(0),
            gate: Semaphore::new(0),
            entered_tx,
            entered_rx: Mutex::new(entered_rx),
        })
    }

    pub fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }

    /// Waits until a held handler has started.
    pub async fn entered(&self) {
        self.entered_rx
            .lock()
            .await
            .recv()
            .await
            .expect("a handler entered");
    }

    /// Lets every held handler finish.
    pub fn open(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    /// Holds handlers again (call once no handler is running).
    pub fn close(&self) {
        self.gate.forget_permits(usize::MAX);
    }
}

/// `201` with a `Location`, a replayed custom header, a header that is not replayed, and a
/// body naming the execution.
async fn echo(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> impl IntoResponse {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let tenant = headers
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    let body =
        serde_json::json!({ "n": n, "tenant": tenant, "echo": String::from_utf8_lossy(&body) });
    (
        StatusCode::CREATED,
        [
            (header::LOCATION, format!("/things/{n}")),
            (header::HeaderName::from_static("x-trace"), "trace-1".into()),
            (header::HeaderName::from_static("x-volatile"), n.to_string()),
            (header::CONTENT_TYPE, "application/json".into()),
        ],
        body.to_string(),
    )
}

/// A final business failure: 402, stored and replayed.
async fn declined(State(app): State<Arc<App>>) -> impl IntoResponse {
    app.runs.fetch_add(1, Ordering::SeqCst);
    problem(StatusCode::PAYMENT_REQUIRED, "declined", "card declined")
}

/// 503 on its first call (released), 201 afterwards.
async fn flaky(State(app): State<Arc<App>>) -> impl IntoResponse {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if app.flaky.fetch_add(1, Ordering::SeqCst) == 0 {
        (StatusCode::SERVICE_UNAVAILABLE, "try later".to_string())
    } else {
        (StatusCode::CREATED, format!("created by run {n}"))
    }
}

/// Counts a handler as cancelled unless it is disarmed.
struct Cancelled<'a>(Option<&'a App>);

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        if let Some(app) = self.0 {
            app.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Waits at the gate, then 201.
pub async fn slow(State(app): State<Arc<App>>, body: Bytes) -> impl IntoResponse {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let mut cancelled = Cancelled(Some(&app));
    let _ = app.entered_tx.send(());
    let _permit = app.gate.acquire().await.expect("the gate is never closed");
    cancelled.0 = None;
    (
        StatusCode::CREATED,
        format!("slow run {n}: {}", String::from_utf8_lossy(&body)),
    )
}

/// A body larger than the stored-body limit.
async fn big(State(app): State<Arc<App>>) -> impl IntoResponse {
    app.runs.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "text/plain")],
        "x".repeat(2048),
    )
}

/// The layer every route uses, before per-route changes: tenant from `X-Tenant`, `X-Trace`
/// replayed, 1 KiB stored bodies, 4 KiB requests.
pub fn layer(barrier: Barrier<dyn Store>) -> IdempotencyLayer<dyn Store> {
    IdempotencyLayer::new(barrier)
        .tenant(|req| {
            req.headers
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("anonymous")
                .to_string()
        })
        .replay_header(header::HeaderName::from_static("x-trace"))
        .max_stored_body(1024)
        .max_request_body(4096)
}

/// The test API: `/echo`, `/declined`, `/flaky`, `/slow`, `/big` with the default layer
/// (409 at once), `/slow-wait` waiting up to a minute, `/slow-short-wait` waiting 200 ms,
/// `/optional` without a required key.
pub fn router(app: Arc<App>, barrier: Barrier<dyn Store>) -> Router {
    let base = layer(barrier);
    Router::new()
        .route("/echo", post(echo).get(|| async { "plain GET" }))
        .route("/declined", post(declined))
        .route("/flaky", post(flaky))
        .route("/slow", post(slow))
        .route("/big", post(big))
        .route_layer(base.clone())
        .route(
            "/slow-wait",
            post(slow).layer(
                base.clone()
                    .in_flight(InFlight::Wait(Duration::from_secs(60))),
            ),
        )
        .route(
            "/slow-short-wait",
            post(slow).layer(
                base.clone()
                    .in_flight(InFlight::Wait(Duration::from_millis(200))),
            ),
        )
        .route("/optional", post(echo).layer(base.optional()))
        .with_state(app)
}

/// Serves `router` on 127.0.0.1 at a free port; the base URL.
pub async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

/// A store on a fresh SQLite file; keep the directory alive with it.
pub async fn sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(dir.path().join("idem.db"))
        .await
        .unwrap();
    (Arc::new(store), dir)
}

/// The server under test: `IDEM_POSTGRES_URL`, default the local `test` database.
pub fn postgres_url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// A store on a fresh PostgreSQL table, dropped with the guard; `None` (after printing why)
/// when the server is unreachable, unless `IDEM_TEST_REQUIRE` names postgres.
pub async fn postgres() -> Option<(Arc<dyn Store>, PgTable)> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let table = format!("idem_http_test_{}_{nanos}", std::process::id());
    let options = PgOptions::default()
        .with_table(&table)
        .unwrap()
        .with_max_connections(24);
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        PgStore::connect_with(&postgres_url(), options),
    )
    .await;
    match connected {
        Ok(Ok(store)) => {
            store.migrate().await.unwrap();
            let guard = PgTable {
                pool: store.pool().clone(),
                table,
            };
            Some((Arc::new(store), guard))
        }
        Ok(Err(e)) => skip(&format!("cannot connect to {}: {e}", postgres_url())),
        Err(_) => skip(&format!("connecting to {} timed out", postgres_url())),
    }
}

fn skip<T>(why: &str) -> Option<T> {
    assert!(
        !idem_conformance::required("postgres"),
        "IDEM_TEST_REQUIRE names postgres: {why}"
    );
    eprintln!("skipped: {why}");
    None
}

/// Drops the test's table (and the store's claim function) when the test ends.
pub struct PgTable {
    pool: sqlx::PgPool,
    table: String,
}

impl PgTable {
    /// Drops the table and its claim function (call at the end of a test that passed).
    pub async fn drop_table(self) {
        let _ = sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {0}; DROP FUNCTION IF EXISTS {0}_claim",
            self.table
        )))
        .execute(&self.pool)
        .await;
    }
}
