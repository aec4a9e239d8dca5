//! Transactional mode: the handler's business writes and the key's outcome in one
//! transaction, on SQLite and PostgreSQL (skipped with a note when PostgreSQL is
//! unreachable, unless `IDEM_TEST_REQUIRE` names it), behind a real port.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use common::serve;
use idem_core::{Barrier, Failure, InFlight};
use idem_http::{problem, IdempotencyLayer, IdempotentRequest, Reply};
use idem_postgres::sqlx::{self, AssertSqlSafe};
use idem_postgres::{PgOperation, PgOptions, PgStore};
use idem_sqlite::{SqliteOperation, SqliteStore};
use tokio::sync::{mpsc, Mutex};

/// The handlers' state: runs, a one-shot transient failure, and a lock that holds the
/// operation of an order of amount 0 while the test keeps it.
struct App {
    runs: AtomicU32,
    fail_next: AtomicBool,
    hold: Mutex<()>,
    entered: mpsc::UnboundedSender<()>,
    table: String,
}

/// What an order of `amount` does inside the transaction, after writing its row.
enum Plan {
    /// Commit, 201.
    Commit,
    /// A declined order: 402, stored; the row rolls back.
    Decline,
    /// A transient failure: everything rolls back, nothing stored.
    Transient,
}

impl App {
    /// Counts a run; an order of amount 0 announces itself and is to wait at `hold`.
    fn enter(&self, amount: i64) -> bool {
        self.runs.fetch_add(1, Ordering::SeqCst);
        amount == 0 && self.entered.send(()).is_ok()
    }

    fn plan(&self, amount: i64) -> Plan {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            Plan::Transient
        } else if amount > 1000 {
            Plan::Decline
        } else {
            Plan::Commit
        }
    }
}

fn finish(plan: Plan, amount: i64) -> Result<Reply, Failure<Reply, String>> {
    match plan {
        Plan::Commit => Reply::json(
            StatusCode::CREATED,
            &serde_json::json!({ "amount": amount }),
        )
        .map_err(|e| Failure::Retryable(e.to_string())),
        Plan::Decline => Err(Failure::Permanent(Reply::new(
            StatusCode::PAYMENT_REQUIRED,
            "text/plain",
            "declined",
        ))),
        Plan::Transient => Err(Failure::Retryable("transient".to_string())),
    }
}

fn amount(body: &Bytes) -> i64 {
    std::str::from_utf8(body)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1)
}

fn transient(e: String) -> Response {
    problem(StatusCode::SERVICE_UNAVAILABLE, "transient", &e).into_response()
}

async fn sqlite_order(
    State(app): State<Arc<App>>,
    Extension(req): Extension<IdempotentRequest<SqliteStore>>,
    body: Bytes,
) -> Response {
    let amount = amount(&body);
    let insert = format!("INSERT INTO {} (amount) VALUES (?1)", app.table);
    let op: SqliteOperation<Reply, Reply, String> = Box::new(move |tx| {
        tx.execute(&insert, [amount])
            .map_err(|e| Failure::Retryable(e.to_string()))?;
        if app.enter(amount) {
            drop(app.hold.blocking_lock());
        }
        finish(app.plan(amount), amount)
    });
    match req.transaction(op).await {
        Ok(response) => response.into_response(),
        Err(e) => transient(e),
    }
}

async fn pg_order(
    State(app): State<Arc<App>>,
    Extension(req): Extension<IdempotentRequest<PgStore>>,
    body: Bytes,
) -> Response {
    let amount = amount(&body);
    let insert = format!("INSERT INTO {} (amount) VALUES ($1)", app.table);
    let op: PgOperation<Reply, Reply, String> = Box::new(move |conn| {
        Box::pin(async move {
            sqlx::query(AssertSqlSafe(insert))
                .bind(amount)
                .execute(&mut *conn)
                .await
                .map_err(|e| Failure::Retryable(e.to_string()))?;
            if app.enter(amount) {
                drop(app.hold.lock().await);
            }
            finish(app.plan(amount), amount)
        })
    });
    match req.transaction(op).await {
        Ok(response) => response.into_response(),
        Err(e) => transient(e),
    }
}

/// The app and its router: `/orders` with 409 at once, `/orders-wait` waiting.
fn app(table: &str) -> (Arc<App>, mpsc::UnboundedReceiver<()>) {
    let (entered, rx) = mpsc::unbounded_channel();
    let app = Arc::new(App {
        runs: AtomicU32::new(0),
        fail_next: AtomicBool::new(false),
        hold: Mutex::new(()),
        entered,
        table: table.to_string(),
    });
    (app, rx)
}

fn routes<S, H, T>(app: Arc<App>, barrier: Barrier<S>, handler: H) -> Router
where
    S: idem_core::Store + 'static,
    H: axum::handler::Handler<T, Arc<App>> + Clone,
    T: 'static,
{
    let layer = IdempotencyLayer::new(barrier).transactional();
    Router::new()
        .route("/orders", post(handler.clone()).layer(layer.clone()))
        .route(
            "/orders-wait",
            post(handler).layer(layer.in_flight(InFlight::Wait(Duration::from_secs(30)))),
        )
        .with_state(app)
}

async fn send(client: &reqwest::Client, url: &str, key: &str, body: &str) -> reqwest::Response {
    client
        .post(url)
        .header("idempotency-key", key)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

fn replayed(r: &reqwest::Response) -> bool {
    r.headers().get("idempotent-replayed").is_some()
}

/// The scenarios, on any backend; `rows` counts the business table.
async fn scenarios<F, Fut>(
    app: Arc<App>,
    mut entered: mpsc::UnboundedReceiver<()>,
    base: String,
    rows: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    let client = reqwest::Client::new();
    let url = format!("{base}/orders");

    // Once, replayed byte for byte.
    let first = send(&client, &url, "a", "5").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(!replayed(&first));
    let body = first.bytes().await.unwrap();
    let again = send(&client, &url, "a", "5").await;
    assert!(replayed(&again));
    assert_eq!(again.bytes().await.unwrap(), body);
    assert_eq!((app.runs.load(Ordering::SeqCst), rows().await), (1, 1));

    // A reused key is 422.
    let r = send(&client, &url, "a", "6").await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // A declined order: its row rolls back, the 402 is stored.
    let r = send(&client, &url, "d", "5000").await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    let r = send(&client, &url, "d", "5000").await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    assert!(replayed(&r));
    assert_eq!(r.text().await.unwrap(), "declined");
    assert_eq!((app.runs.load(Ordering::SeqCst), rows().await), (2, 1));

    // A transient failure rolls everything back and the retry runs.
    app.fail_next.store(true, Ordering::SeqCst);
    let r = send(&client, &url, "t", "7").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(rows().await, 1);
    let r = send(&client, &url, "t", "7").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(!replayed(&r));
    assert_eq!((app.runs.load(Ordering::SeqCst), rows().await), (4, 2));

    // Concurrent duplicates, waiting: one transaction, every caller the same answer.
    let wait_url = format!("{base}/orders-wait");
    let guard = app.hold.lock().await;
    let first = tokio::spawn({
        let (client, url) = (client.clone(), wait_url.clone());
        async move { send(&client, &url, "c", "0").await }
    });
    entered.recv().await.unwrap();
    let duplicates: Vec<_> = (0..8)
        .map(|_| {
            let (client, url) = (client.clone(), wait_url.clone());
            tokio::spawn(async move { send(&client, &url, "c", "0").await })
        })
        .collect();
    // Give the duplicates time to arrive and wait; correctness does not depend on it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(guard);
    let first = first.await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let body = first.bytes().await.unwrap();
    for d in duplicates {
        let d = d.await.unwrap();
        assert_eq!(d.status(), StatusCode::CREATED);
        assert!(replayed(&d));
        assert_eq!(d.bytes().await.unwrap(), body);
    }
    assert_eq!((app.runs.load(Ordering::SeqCst), rows().await), (5, 3));

    // Concurrent duplicate, rejecting: 409 while the first transaction is open.
    let guard = app.hold.lock().await;
    let first = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { send(&client, &url, "r", "0").await }
    });
    entered.recv().await.unwrap();
    let r = send(&client, &url, "r", "0").await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert!(r.headers().get("retry-after").is_some());
    drop(guard);
    assert_eq!(first.await.unwrap().status(), StatusCode::CREATED);
    assert_eq!((app.runs.load(Ordering::SeqCst), rows().await), (6, 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_business_writes_commit_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::connect(dir.path().join("idem.db"))
        .await
        .unwrap();
    store
        .with_connection(|c| {
            c.execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY, amount INTEGER NOT NULL)")
        })
        .await
        .unwrap();
    let (app, entered) = app("orders");
    let base = serve(routes(
        app.clone(),
        Barrier::new(Arc::new(store.clone())),
        sqlite_order,
    ))
    .await;
    let rows = || {
        let store = store.clone();
        async move {
            store
                .with_connection(|c| {
                    c.query_row("SELECT count(*) FROM orders", [], |r| r.get::<_, i64>(0))
                })
                .await
                .unwrap()
        }
    };
    scenarios(app, entered, base, rows).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_business_writes_commit_with_the_key() {
    let Some((_, keys)) = common::postgres().await else {
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let table = format!("idem_http_orders_{}_{nanos}", std::process::id());
    let options = PgOptions::default()
        .with_table(&format!("{table}_keys"))
        .unwrap()
        .with_max_connections(16);
    let store = PgStore::connect_with(&common::postgres_url(), options)
        .await
        .unwrap();
    let pool = store.pool().clone();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE {table} (id BIGSERIAL PRIMARY KEY, amount BIGINT NOT NULL)"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let (app, entered) = app(&table);
    let base = serve(routes(app.clone(), Barrier::new(Arc::new(store)), pg_order)).await;
    let rows = || {
        let (pool, table) = (pool.clone(), table.clone());
        async move {
            sqlx::query_scalar::<_, i64>(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    scenarios(app, entered, base, rows).await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP TABLE {table}; DROP TABLE {table}_keys; DROP FUNCTION {table}_keys_claim"
    )))
    .execute(&pool)
    .await
    .unwrap();
    keys.drop_table().await;
}
