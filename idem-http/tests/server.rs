//! The layer behind a real port, called with a real HTTP client, on SQLite and PostgreSQL
//! (skipped with a note when PostgreSQL is unreachable, unless `IDEM_TEST_REQUIRE` names it).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{router, serve, App};
use idem_core::{Barrier, Store};
use reqwest::{Client, Response, StatusCode};

/// One request with an optional key (sent as written) and tenant.
async fn post(
    client: &Client,
    url: &str,
    key: Option<&str>,
    tenant: Option<&str>,
    body: &str,
) -> Response {
    let mut req = client.post(url).body(body.to_string());
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    if let Some(tenant) = tenant {
        req = req.header("x-tenant", tenant);
    }
    req.send().await.unwrap()
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).map(|v| v.to_str().unwrap())
}

/// Status, problem `type` and `Retry-After` of a problem answer.
async fn problem(r: Response) -> (StatusCode, String, Option<String>) {
    let status = r.status();
    assert_eq!(header(&r, "content-type"), Some("application/problem+json"));
    let retry_after = header(&r, "retry-after").map(str::to_string);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    let kind = body["type"].as_str().unwrap();
    let name = kind.strip_prefix("urn:idem:problem:").unwrap().to_string();
    (status, name, retry_after)
}

async fn start(store: Arc<dyn Store>) -> (Arc<App>, String) {
    let app = App::new();
    let base = serve(router(app.clone(), Barrier::new(store))).await;
    (app, base)
}

async fn replays_are_byte_for_byte(store: Arc<dyn Store>) {
    let (app, base) = start(store).await;
    let client = Client::new();
    let url = format!("{base}/echo");
    let first = post(&client, &url, Some("k-1"), Some("acme"), "hello").await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(header(&first, "idempotent-replayed"), None);
    assert_eq!(header(&first, "location"), Some("/things/1"));
    assert_eq!(header(&first, "x-volatile"), Some("1"));
    let first_body = first.bytes().await.unwrap();

    // The bare token and the RFC 8941 sf-string name the same key.
    for key in ["k-1", "\"k-1\"", " \"k-1\" "] {
        let again = post(&client, &url, Some(key), Some("acme"), "hello").await;
        assert_eq!(again.status(), StatusCode::CREATED);
        assert_eq!(header(&again, "idempotent-replayed"), Some("true"));
        assert_eq!(header(&again, "location"), Some("/things/1"));
        assert_eq!(header(&again, "x-trace"), Some("trace-1"));
        assert_eq!(header(&again, "content-type"), Some("application/json"));
        assert_eq!(header(&again, "x-volatile"), None, "not a replayed header");
        assert_eq!(again.bytes().await.unwrap(), first_body);
    }
    assert_eq!(app.runs(), 1);
}

async fn bad_requests_are_problems(store: Arc<dyn Store>) {
    let (app, base) = start(store).await;
    let client = Client::new();
    let url = format!("{base}/echo");
    let cases: [(Option<&str>, &str); 6] = [
        (None, "idempotency-key-missing"),
        (Some("\"open"), "idempotency-key-malformed"),
        (Some("\"\""), "idempotency-key-malformed"),
        (Some("a b"), "idempotency-key-malformed"),
        (Some("\"k\";p=1"), "idempotency-key-malformed"),
        (Some(&*"x".repeat(256)), "idempotency-key-malformed"),
    ];
    for (key, want) in cases {
        let r = post(&client, &url, key, None, "{}").await;
        assert_eq!(
            problem(r).await,
            (StatusCode::BAD_REQUEST, want.to_string(), None),
            "{key:?}"
        );
    }
    let twice = client
        .post(&url)
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .send()
        .await
        .unwrap();
    assert_eq!(
        problem(twice).await.1,
        "idempotency-key-malformed",
        "a repeated header"
    );
    let tenant = "t".repeat(300);
    let r = post(&client, &url, Some("k"), Some(&tenant), "{}").await;
    assert_eq!(
        problem(r).await.0,
        StatusCode::BAD_REQUEST,
        "a scope too long"
    );
    let r = post(&client, &url, Some("k"), None, &"b".repeat(5000)).await;
    assert_eq!(
        problem(r).await,
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request-too-large".to_string(),
            None
        )
    );
    assert_eq!(app.runs(), 0, "no rejected request reached the handler");

    // Unguarded methods and optional routes run without a key.
    let get = client.get(&url).send().await.unwrap();
    assert_eq!(get.status(), StatusCode::OK);
    assert_eq!(get.text().await.unwrap(), "plain GET");
    for n in 1..=2 {
        let r = post(&client, &format!("{base}/optional"), None, None, "x").await;
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(header(&r, "idempotent-replayed"), None);
        assert_eq!(app.runs(), n);
    }
    let keyed = post(&client, &format!("{base}/optional"), Some("o"), None, "x").await;
    assert_eq!(keyed.status(), StatusCode::CREATED);
    let again = post(&client, &format!("{base}/optional"), Some("o"), None, "x").await;
    assert_eq!(header(&again, "idempotent-replayed"), Some("true"));
    assert_eq!(app.runs(), 3);
}

async fn a_reused_key_is_422_on_every_path(store: Arc<dyn Store>) {
    let (app, base) = start(store).await;
    let client = Client::new();
    // Completed.
    let url = format!("{base}/echo");
    assert_eq!(
        post(&client, &url, Some("m"), None, "a").await.status(),
        StatusCode::CREATED
    );
    let r = post(&client, &url, Some("m"), None, "b").await;
    assert_eq!(
        problem(r).await,
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused".into(),
            None
        )
    );
    // Failed (a stored 402).
    let url = format!("{base}/declined");
    assert_eq!(
        post(&client, &url, Some("m"), None, "a").await.status(),
        StatusCode::PAYMENT_REQUIRED
    );
    let r = post(&client, &url, Some("m"), None, "b").await;
    assert_eq!(problem(r).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    // In flight, under both policies: a mismatch is answered at once, never waited for.
    for route in ["slow", "slow-wait"] {
        let url = format!("{base}/{route}");
        let first = tokio::spawn({
            let (client, url) = (client.clone(), url.clone());
            async move { post(&client, &url, Some("m"), None, "a").await }
        });
        app.entered().await;
        let r = post(&client, &url, Some("m"), None, "b").await;
        assert_eq!(
            problem(r).await.0,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{route}"
        );
        app.open();
        assert_eq!(first.await.unwrap().status(), StatusCode::CREATED);
        app.close();
    }
    assert_eq!(app.runs(), 4);
}

async fn final_and_released_statuses_follow_the_policy(store: Arc<dyn Store>) {
    let (app, base) = start(store).await;
    let client = Client::new();
    // A 4xx is final: stored and replayed.
    let url = format!("{base}/declined");
    let first = post(&client, &url, Some("d"), None, "").await;
    assert_eq!(first.status(), StatusCode::PAYMENT_REQUIRED);
    let first_body = first.bytes().await.unwrap();
    let again = post(&client, &url, Some("d"), None, "").await;
    assert_eq!(again.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(header(&again, "idempotent-replayed"), Some("true"));
    assert_eq!(
        header(&again, "content-type"),
        Some("application/problem+json")
    );
    assert_eq!(again.bytes().await.unwrap(), first_body);
    assert_eq!(app.runs(), 1);

    // A 5xx releases the key: the retry runs again, and its success is final.
    let url = format!("{base}/flaky");
    let r = post(&client, &url, Some("f"), None, "").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&r, "idempotent-replayed"), None);
    let r = post(&client, &url, Some("f"), None, "").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.text().await.unwrap(), "created by run 3");
    let r = post(&client, &url, Some("f"), None, "").await;
    assert_eq!(header(&r, "idempotent-replayed"), Some("true"));
    assert_eq!(r.text().await.unwrap(), "created by run 3");
    assert_eq!(app.runs(), 3);

    // A body over the stored-body limit: sent whole once, replayed without its body.
    let url = format!("{base}/big");
    let r = post(&client, &url, Some("b"), None, "").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.bytes().await.unwrap().len(), 2048);
    let r = post(&client, &url, Some("b"), None, "").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "idempotent-replayed"), Some("true"));
    assert_eq!(header(&r, "content-type"), None);
    assert!(r.bytes().await.unwrap().is_empty());
    assert_eq!(app.runs(), 4);
}

async fn tenants_never_share_keys(store: Arc<dyn Store>) {
    let (app, base) = start(store).await;
    let client = Client::new();
    let url = format!("{base}/echo");
    let a = post(&client, &url, Some("same"), Some("a"), "x").await;
    let b = post(&client, &url, Some("same"), Some("b"), "x").await;
    assert_eq!(header(&a, "idempotent-replayed"), None);
    assert_eq!(header(&b, "idempotent-replayed"), None);
    let (a, b) = (a.text().await.unwrap(), b.text().await.unwrap());
    assert_ne!(a, b);
    assert_eq!(app.runs(), 2);
    for (tenant, want) in [("a", &a), ("b", &b)] {
        let r = post(&client, &url, Some("same"), Some(tenant), "x").await;
        assert_eq!(header(&r, "idempotent-replayed"), Some("true"));
        assert_eq!(&r.text().await.unwrap(), want);
    }
    // The same key on another route is another key.
    let r = post(
        &client,
        &format!("{base}/declined"),
        Some("same"),
        Some("a"),
        "x",
    )
    .await;
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(app.runs(), 3);
}

const DUPLICATES: usize = 16;

async fn concurrent_duplicates_are_rejected_with_retry_after(store: Arc<dyn Store>) {
    let (app, base) = start(store).await;
    let client = Client::new();
    let url = format!("{base}/slow");
    let first = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { post(&client, &url, Some("c"), None, "p").await }
    });
    app.entered().await;
    let duplicates: Vec<_> = (0..DUPLICATES)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { post(&client, &url, Some("c"), None, "p").await })
        })
        .collect();
    for d in duplicates {
        let (status, name, retry_after) = problem(d.await.unwrap()).await;
        assert_eq!(
            (status, name.as_str()),
            (StatusCode::CONFLICT, "idempotency-key-in-flight")
        );
        let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
        assert!(secs >= 1, "{secs}");
    }
    app.open();
    let first = first.await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let body = first.text().await.unwrap();
    let again = post(&client, &url, Some("c"), None, "p").await;
    assert_eq!(header(&again, "idempotent-replayed"), Some("true"));
    assert_eq!(again.text().await.unwrap(), body);
    assert_eq!(app.runs(), 1);
}

async fn concurrent_duplicates_wait_and_replay(store: Arc<dyn Store>) {
    let (app, base) = start(store).await;
    let client = Client::new();
    let url = format!("{base}/slow-wait");
    let callers: Vec<_> = (0..=DUPLICATES)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let r = post(&client, &url, Some("w"), None, "p").await;
                let replayed = header(&r, "idempotent-replayed").is_some();
                (r.status(), replayed, r.text().await.unwrap())
            })
        })
        .collect();
    app.entered().await;
    // Give the duplicates time to arrive and wait; correctness does not depend on it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.open();
    let mut fresh = 0;
    let mut bodies = std::collections::BTreeSet::new();
    for c in callers {
        let (status, replayed, body) = c.await.unwrap();
        assert_eq!(status, StatusCode::CREATED);
        fresh += usize::from(!replayed);
        bodies.insert(body);
    }
    assert_eq!(fresh, 1, "exactly one caller ran the handler");
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(app.runs(), 1);

    // A wait that runs out is a 409.
    app.close();
    let url = format!("{base}/slow-short-wait");
    let first = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { post(&client, &url, Some("w2"), None, "p").await }
    });
    app.entered().await;
    let r = post(&client, &url, Some("w2"), None, "p").await;
    let (status, name, retry_after) = problem(r).await;
    assert_eq!(
        (status, name.as_str()),
        (StatusCode::CONFLICT, "idempotency-key-in-flight")
    );
    assert!(retry_after.is_some());
    app.open();
    assert_eq!(first.await.unwrap().status(), StatusCode::CREATED);
}

async fn the_heartbeat_keeps_a_long_handler_s_key(store: Arc<dyn Store>) {
    let app = App::new();
    // A lease far shorter than the handler: only the heartbeat keeps the key.
    let barrier = Barrier::new(store).with_lease(Duration::from_millis(1500));
    let layer = common::layer(barrier).heartbeat(Duration::from_millis(100));
    let router = axum::Router::new()
        .route("/slow", axum::routing::post(common::slow))
        .route_layer(layer)
        .with_state(app.clone());
    let base = serve(router).await;
    let client = Client::new();
    let url = format!("{base}/slow");
    let first = tokio::spawn({
        let (client, url) = (client.clone(), url.clone());
        async move { post(&client, &url, Some("h"), None, "p").await }
    });
    app.entered().await;
    // Two leases' time: without the heartbeat the duplicate would reclaim the key.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let r = post(&client, &url, Some("h"), None, "p").await;
    assert_eq!(
        problem(r).await.0,
        StatusCode::CONFLICT,
        "the key was not reclaimed while its handler ran"
    );
    app.open();
    assert_eq!(first.await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(app.runs(), 1);
}

async fn a_client_that_gives_up_does_not_run_the_work_twice(store: Arc<dyn Store>) {
    let app = App::new();
    let barrier = Barrier::new(store).with_lease(Duration::from_millis(500));
    let base = serve(router(app.clone(), barrier)).await;
    let client = Client::new();
    let url = format!("{base}/slow");
    // The client gives up while the handler runs. Whether hyper notices and drops the
    // request's future or lets the handler finish, the work never runs twice at once, and
    // never again before the abandoned run's lease is over.
    let impatient = Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let first = tokio::spawn({
        let url = url.clone();
        async move {
            impatient
                .post(url)
                .header("idempotency-key", "gone")
                .body("p")
                .send()
                .await
        }
    });
    app.entered().await;
    assert!(first.await.unwrap().is_err(), "the client timed out");
    app.open();
    // Another request with the key is a reuse, whether the first is still running or done.
    let r = post(&client, &url, Some("gone"), None, "other").await;
    assert_eq!(problem(r).await.0, StatusCode::UNPROCESSABLE_ENTITY);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let retried = loop {
        let r = post(&client, &url, Some("gone"), None, "p").await;
        if r.status() != StatusCode::CONFLICT {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the key was never reclaimed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(retried.status(), StatusCode::CREATED);
    if app.cancelled.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        // Hyper let the abandoned handler finish: its response is the key's outcome.
        assert_eq!(header(&retried, "idempotent-replayed"), Some("true"));
        assert_eq!(app.runs(), 1, "the finished work is replayed, not redone");
    } else {
        // Hyper dropped the handler mid-work: its effect may have landed, so the key was
        // held until the lease ran out (409s above), and only then did a retry run it again.
        assert_eq!(app.cancelled.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(header(&retried, "idempotent-replayed"), None);
        assert_eq!(
            app.runs(),
            2,
            "one abandoned run, one reclaim after the lease"
        );
    }
    let r = post(&client, &url, Some("gone"), None, "other").await;
    assert_eq!(problem(r).await.0, StatusCode::UNPROCESSABLE_ENTITY);
}

macro_rules! on_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let (store, _dir) = super::common::sqlite().await;
                    super::$test(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let Some((store, table)) = super::common::postgres().await else {
                        return;
                    };
                    super::$test(store).await;
                    table.drop_table().await;
                }
            )*
        }
    };
}

on_backends!(
    replays_are_byte_for_byte,
    bad_requests_are_problems,
    a_reused_key_is_422_on_every_path,
    final_and_released_statuses_follow_the_policy,
    tenants_never_share_keys,
    concurrent_duplicates_are_rejected_with_retry_after,
    concurrent_duplicates_wait_and_replay,
    the_heartbeat_keeps_a_long_handler_s_key,
    a_client_that_gives_up_does_not_run_the_work_twice,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_failures_are_503_when_retryable_and_500_when_not() {
    use idem_sqlite::{rusqlite, SqliteOptions, SqliteStore, DEFAULT_TABLE};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idem.db");
    let options = SqliteOptions::default().with_busy_timeout(Duration::from_millis(100));
    let store = SqliteStore::connect_with(&path, options).await.unwrap();
    let (app, base) = start(Arc::new(store.clone())).await;
    let client = Client::new();
    let url = format!("{base}/echo");

    // Another process holds the write lock: retryable.
    let locker = rusqlite::Connection::open(&path).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let r = post(&client, &url, Some("s"), None, "x").await;
    assert_eq!(
        problem(r).await,
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "idempotency-store".into(),
            Some("1".into())
        )
    );
    locker.execute_batch("ROLLBACK").unwrap();

    // The table is gone: permanent.
    store
        .with_connection(|c| c.execute_batch(&format!("DROP TABLE {DEFAULT_TABLE}")))
        .await
        .unwrap();
    let r = post(&client, &url, Some("s"), None, "x").await;
    assert_eq!(
        problem(r).await,
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "idempotency-store".into(),
            None
        )
    );
    assert_eq!(app.runs(), 0);
}
