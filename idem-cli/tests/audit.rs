//! `idem audit` as a user runs it: the built binary audits `idem serve` (the built binary
//! too, on a real port); a dry run sends nothing, every probe passes, and the ledger holds
//! exactly one payment per key that succeeded.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const PAYMENT: &str = r#"{"account": "acc-1", "amount": 1250, "currency": "EUR"}"#;

/// A running `idem serve`; killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(["serve", "--listen", "127.0.0.1:0", "--lease-ms", "1000"])
            .args(["--work-ms", "300"])
            .arg("--db")
            .arg(dir.join("keys.db"))
            .arg("--payments-db")
            .arg(dir.join("payments.db"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("the idem binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Drains the server's output so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let first: String = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("idem serve prints its address");
        let base = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        Server { child, base }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn payments(dir: &Path) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("payments.db")).unwrap();
    conn.query_row("SELECT count(*) FROM payments", [], |r| r.get(0))
        .unwrap()
}

fn audit(server: &Server, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["audit", "--url", &format!("{}/payments", server.base)])
        .args(["--body", PAYMENT, "--tenant-header", "X-Tenant"])
        .args(["-H", "X-Tenant: acme", "--retry-delays", "0,200ms"])
        .args(["--retention-probe", "1500ms"])
        .args(extra)
        .output()
        .expect("idem audit runs")
}

#[test]
fn idem_serve_passes_the_audit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());

    let dry = audit(&server, &["--dry-run"]);
    assert!(dry.status.success(), "{dry:?}");
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert!(
        plan.contains("nothing sent") && plan.contains("burst"),
        "{plan}"
    );
    assert_eq!(payments(dir.path()), 0, "a dry run sends nothing");

    let out = audit(&server, &["--format", "json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{out:?}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for probe in report["probes"].as_array().unwrap() {
        // Without a count endpoint the lost request's own effect is invisible: the probe
        // says so instead of passing.
        let expected = if probe["probe"] == "lost-response" {
            "not_applicable"
        } else {
            "pass"
        };
        assert_eq!(probe["verdict"], expected, "{stdout}");
    }
    // One payment per key that succeeded: retry, burst, lost response, changed payload,
    // two tenants, key expiry; the rejected requests wrote nothing.
    assert_eq!(payments(dir.path()), 7, "{stdout}");

    let junit = audit(&server, &["--format", "junit", "--burst", "4"]);
    assert_eq!(junit.status.code(), Some(0), "{junit:?}");
    let xml = String::from_utf8_lossy(&junit.stdout);
    assert!(
        xml.contains("<testsuite") && xml.contains("failures=\"0\""),
        "{xml}"
    );
}

#[test]
fn bad_arguments_exit_2_and_send_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["audit", "--url", "http://127.0.0.1:9/x"])
        .args(["--count-url", "http://127.0.0.1:10/count"])
        .output()
        .expect("idem audit runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("same scheme, host and port"), "{stderr}");
}
