//! The client middleware against the layer on a real port (SQLite), through injected
//! failures: lost responses, 5xx, a connection closed before the answer, 409 in flight.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use common::{router, serve, App};
use idem_core::Barrier;
use idem_http::client::{IdempotencyKey, IdempotencyMiddleware, ParentKey};
use reqwest::StatusCode;
use reqwest_middleware::{ClientBuilder, ClientWithMiddleware};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

/// What the fault injector saw: the keys of each attempt, by path.
#[derive(Default)]
struct Seen(Mutex<HashMap<String, Vec<String>>>);

impl Seen {
    fn keys(&self, path: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .get(path)
            .cloned()
            .unwrap_or_default()
    }
}

/// Outside the idempotency layer: on `/echo`, the first attempt runs and its answer is
/// replaced by 502 (a lost response), the second gets 503 without reaching the layer,
/// later ones pass.
async fn inject(State(seen): State<Arc<Seen>>, req: Request, next: Next) -> Response {
    let key = req
        .headers()
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let path = req.uri().path().to_string();
    let attempt = {
        let mut seen = seen.0.lock().unwrap();
        let keys = seen.entry(path.clone()).or_default();
        keys.push(key);
        keys.len()
    };
    if path != "/echo" {
        return next.run(req).await;
    }
    match attempt {
        1 => {
            let _ = next.run(req).await;
            StatusCode::BAD_GATEWAY.into_response()
        }
        2 => (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "0")]).into_response(),
        _ => next.run(req).await,
    }
}

async fn start() -> (Arc<App>, Arc<Seen>, String, tempfile::TempDir) {
    let (store, dir) = common::sqlite().await;
    let app = App::new();
    let seen = Arc::new(Seen::default());
    let api =
        router(app.clone(), Barrier::new(store)).layer(from_fn_with_state(seen.clone(), inject));
    (app, seen, serve(api).await, dir)
}

fn client() -> ClientWithMiddleware {
    ClientBuilder::new(reqwest::Client::new())
        .with(
            IdempotencyMiddleware::default()
                .base_backoff(Duration::from_millis(10))
                .max_backoff(Duration::from_secs(1)),
        )
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_through_lost_responses_and_5xx_with_one_execution() {
    let (app, seen, base, _dir) = start().await;
    let r = client()
        .post(format!("{base}/echo"))
        .body("pay")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(app.runs(), 1);
    let keys = seen.keys("/echo");
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys.iter().all(|k| k == &keys[0]), "{keys:?}");
    assert!(keys[0].starts_with('"') && keys[0].len() == 34, "{keys:?}");

    // A second logical request gets a key of its own.
    let r = client()
        .post(format!("{base}/declined"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    assert_ne!(seen.keys("/declined")[0], keys[0]);
}

/// A proxy to `upstream` whose first connection is closed once the upstream has started
/// answering: the request took effect, and the client sees a network error.
async fn closing_proxy(upstream: SocketAddr) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let mut server = TcpStream::connect(upstream).await.unwrap();
            if std::mem::take(&mut first) {
                tokio::spawn(async move {
                    let (mut client_read, client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let forward = tokio::spawn(async move {
                        tokio::io::copy(&mut client_read, &mut server_write).await
                    });
                    let mut byte = [0u8; 1];
                    let _ = server_read.read(&mut byte).await;
                    forward.abort();
                    let _ = forward.await;
                    drop(client_write);
                });
            } else {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        }
    });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_a_connection_closed_before_the_answer_with_one_execution() {
    let (app, seen, base, _dir) = start().await;
    let upstream: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let proxy = closing_proxy(upstream).await;
    let r = client()
        .post(format!("{proxy}/declined"))
        .body("pay")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(app.runs(), 1);
    let keys = seen.keys("/declined");
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_a_409_after_retry_after_and_replays() {
    let (app, seen, base, _dir) = start().await;
    let url = format!("{base}/slow");
    let holder = tokio::spawn({
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .post(url)
                .header("idempotency-key", "held")
                .body("p")
                .send()
                .await
                .unwrap()
        }
    });
    app.entered().await;
    let duplicate = tokio::spawn({
        let url = url.clone();
        async move {
            client()
                .post(url)
                .with_extension(IdempotencyKey("held".into()))
                .body("p")
                .send()
                .await
                .unwrap()
        }
    });
    // Open the gate once the duplicate has been turned away at least once.
    while seen.keys("/slow").len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.open();
    let first = holder.await.unwrap();
    let first_body = first.text().await.unwrap();
    let r = duplicate.await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    assert_eq!(r.text().await.unwrap(), first_body);
    assert_eq!(app.runs(), 1);
    assert!(seen.keys("/slow").len() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_parent_key_derives_the_same_key_on_every_retry_of_the_parent() {
    let (app, seen, base, _dir) = start().await;
    for _ in 0..2 {
        let r = client()
            .post(format!("{base}/declined"))
            .with_extension(ParentKey::new("incoming-7", "charge"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::PAYMENT_REQUIRED);
    }
    assert_eq!(app.runs(), 1);
    let keys = seen.keys("/declined");
    let derived = ParentKey::new("incoming-7", "charge").key().unwrap();
    assert_eq!(keys, vec![format!("\"{derived}\""); 2]);
}
