//! `idem serve` as a user runs it: the built binary on a real port, a real HTTP client,
//! SIGKILL in the middle of a request, a restart, and SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use idem_http::client::{IdempotencyKey, IdempotencyMiddleware};
use reqwest::StatusCode;

/// A running `idem serve` and its output, line by line.
struct Server {
    child: Child,
    base: String,
    lines: mpsc::Receiver<String>,
}

impl Server {
    fn start(dir: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(["serve", "--listen", "127.0.0.1:0", "--lease-ms", "1000"])
            .arg("--db")
            .arg(dir.join("keys.db"))
            .arg("--payments-db")
            .arg(dir.join("payments.db"))
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("the idem binary starts");
        let lines = lines(child.stdout.take().unwrap());
        let first = lines
            .recv_timeout(Duration::from_secs(60))
            .expect("idem serve prints its address");
        let base = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        Server { child, base, lines }
    }

    /// Waits for an output line containing `text`.
    fn wait_for(&self, text: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("waiting for {text:?}: {e}"));
            if line.contains(text) {
                return line;
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn payments(dir: &Path) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("payments.db")).unwrap();
    conn.query_row("SELECT count(*) FROM payments", [], |r| r.get(0))
        .unwrap()
}

const PAYMENT: &str = r#"{"account": "acc-1", "amount": 1250, "currency": "EUR"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_request_and_restarted_makes_one_payment() {
    let dir = tempfile::tempdir().unwrap();
    // The handler writes the payment, then works for a minute: the kill lands in between.
    let server = Server::start(dir.path(), &["--work-ms", "60000"]);
    let url = format!("{}/payments", server.base);
    let first = tokio::spawn({
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .post(url)
                .header("idempotency-key", "\"order-17\"")
                .header("x-tenant", "shop-1")
                .body(PAYMENT)
                .send()
                .await
        }
    });
    server.wait_for("written");
    drop(server); // SIGKILL
    assert!(
        first.await.unwrap().is_err(),
        "the first caller saw the connection die"
    );
    assert_eq!(payments(dir.path()), 1);

    // The restarted server: the key is held until the dead request's lease runs out (1 s),
    // then the retry takes it over; the payment id comes from the key, so nothing new is
    // written.
    let server = Server::start(dir.path(), &[]);
    let url = format!("{}/payments", server.base);
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(
            IdempotencyMiddleware::default()
                .max_attempts(20)
                .max_backoff(Duration::from_secs(1)),
        )
        .build();
    let retry = client
        .post(&url)
        .with_extension(IdempotencyKey("order-17".into()))
        .header("x-tenant", "shop-1")
        .body(PAYMENT)
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), StatusCode::CREATED);
    let location = retry.headers()["location"].to_str().unwrap().to_string();
    let payment: serde_json::Value = retry.json().await.unwrap();
    assert_eq!(payment["amount"], 1250);
    assert_eq!(
        location,
        format!("/payments/{}", payment["id"].as_str().unwrap())
    );
    assert_eq!(payments(dir.path()), 1, "exactly one payment");

    let replay = reqwest::Client::new()
        .post(&url)
        .header("idempotency-key", "order-17")
        .header("x-tenant", "shop-1")
        .body(PAYMENT)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let again: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(again, payment);

    let shown = reqwest::Client::new()
        .get(format!("{}{location}", server.base))
        .header("x-tenant", "shop-1")
        .send()
        .await
        .unwrap();
    assert_eq!(shown.status(), StatusCode::OK);
    let other_tenant = reqwest::Client::new()
        .get(format!("{}{location}", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(other_tenant.status(), StatusCode::NOT_FOUND);
    assert_eq!(payments(dir.path()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payments_are_problems_metrics_are_served_and_sigterm_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--in-flight", "wait"]);
    let url = format!("{}/payments", server.base);
    let client = reqwest::Client::new();
    let cases = [
        ("k1", "{not json", StatusCode::BAD_REQUEST),
        (
            "k2",
            r#"{"account":"a","amount":0,"currency":"EUR"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "k3",
            r#"{"account":"a","amount":-5,"currency":"EUR"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "k4",
            r#"{"account":"a","amount":1.5,"currency":"EUR"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "k5",
            r#"{"account":"a","currency":"EUR"}"#,
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (key, body, status) in cases {
        let r = client
            .post(&url)
            .header("idempotency-key", key)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{body}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    let r = client.post(&url).body(PAYMENT).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST, "no key");
    let ok = client
        .post(&url)
        .header("idempotency-key", "k6")
        .body(PAYMENT)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
    // Field order does not matter to the fingerprint; a different amount does.
    let reordered = client
        .post(&url)
        .header("idempotency-key", "k6")
        .body(r#"{"currency": "EUR", "amount": 1250, "account": "acc-1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(reordered.headers()["idempotent-replayed"], "true");
    let changed = client
        .post(&url)
        .header("idempotency-key", "k6")
        .body(r#"{"currency": "EUR", "amount": 1251, "account": "acc-1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let metrics = client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("idem_http_requests_total{outcome=\"replayed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("idem_begin_total"), "{metrics}");

    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    server.wait_for("stopped");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(payments(dir.path()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_request_in_flight_before_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), &["--work-ms", "1000"]);
    let url = format!("{}/payments", server.base);
    let request = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .header("idempotency-key", "late")
            .body(PAYMENT)
            .send()
            .await
    });
    server.wait_for("written");
    let term = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let response = request
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(response.status(), StatusCode::CREATED);
    server.wait_for("stopped");
    assert!(server.child.wait().unwrap().success());
    assert_eq!(payments(dir.path()), 1);

    // The acknowledged payment is the key's outcome after a restart too.
    let server = Server::start(dir.path(), &[]);
    let replay = reqwest::Client::new()
        .post(format!("{}/payments", server.base))
        .header("idempotency-key", "late")
        .body(PAYMENT)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(payments(dir.path()), 1);
}
