//! `idem lab` end to end, on every backend that is reachable: the binary's exit code and
//! its JSON report. SQLite always runs; a server backend is skipped with a note when it
//! cannot be reached, unless `IDEM_TEST_REQUIRE` names it.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

/// Runs a small lab on `backend` and returns its output.
fn lab(backend: &str, extra: &[&str]) -> Output {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let db = std::env::temp_dir().join(format!(
        "idem-cli-test-lab-{}-{}.db",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idem"));
    cmd.args(["lab", "--json", "--backend", backend])
        .args(["--payments", "300", "--clients", "40"])
        .args(extra);
    if backend == "sqlite" {
        cmd.arg("--db").arg(&db);
    }
    let out = cmd.output().expect("the idem binary runs");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    out
}

/// Starts the local etcd cluster of `scripts/cluster.sh` (a no-op for members already
/// running), unless `IDEM_ETCD_ENDPOINTS` names another one; a failure to start shows up as
/// an unreachable backend.
fn start_local_etcd() {
    if std::env::var("IDEM_ETCD_ENDPOINTS").is_err() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cluster.sh");
        match Command::new("bash")
            .args([script, "start", "etcd"])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "scripts/cluster.sh start etcd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("cannot run scripts/cluster.sh: {e}"),
        }
    }
}

/// The report of a lab run, or `None` if the backend is unreachable and not required.
fn report(backend: &str) -> Option<Value> {
    if backend == "etcd" {
        start_local_etcd();
    }
    let out = lab(backend, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(2) && backend != "sqlite" {
        assert!(
            !idem_conformance::required(backend),
            "IDEM_TEST_REQUIRE names `{backend}` but the lab could not run: {stderr}"
        );
        eprintln!("skipped: `{backend}` unavailable: {stderr}");
        return None;
    }
    assert_eq!(
        out.status.code(),
        Some(0),
        "the lab on {backend} failed: {stderr}"
    );
    Some(serde_json::from_slice(&out.stdout).expect("the lab prints JSON"))
}

fn results(report: &Value) -> &Vec<Value> {
    report["results"].as_array().expect("results")
}

fn strategy<'a>(report: &'a Value, name: &str) -> &'a Value {
    results(report)
        .iter()
        .find(|r| r["strategy"] == name)
        .unwrap_or_else(|| panic!("no row for {name}"))
}

/// The barrier's rows show no violation; the naive check-then-insert, whose crashed
/// workers are retried, shows its duplicates and still does not fail the run. The
/// optimistic strategy runs only where the store claims at commit (`optimistic`).
fn judged(report: &Value, transactional: bool, optimistic: bool) {
    let has_optimistic = results(report)
        .iter()
        .any(|r| r["strategy"] == "barrier (optimistic tx)");
    assert_eq!(has_optimistic, optimistic, "{report}");
    let optimistic = optimistic.then_some("barrier (optimistic tx)");
    for name in ["barrier (lease)", "barrier (transactional)"]
        .into_iter()
        .chain(optimistic)
    {
        let r = strategy(report, name);
        if name == "barrier (transactional)" && !transactional {
            assert_eq!(r["applicable"], false, "{r}");
            continue;
        }
        assert_eq!(r["applicable"], true, "{r}");
        for field in [
            "duplicate_effects",
            "partial_writes",
            "acknowledged_missing",
        ] {
            assert_eq!(r[field], 0, "{name}: {field} in {r}");
        }
        assert!(r["executed"].as_u64() >= Some(1), "{r}");
    }
    let naive = strategy(report, "check-then-insert");
    assert!(naive["duplicate_effects"].as_u64() > Some(0), "{naive}");
}

#[test]
fn sqlite_lab_passes_and_shows_naive_duplicates() {
    let report = report("sqlite").expect("sqlite always runs");
    judged(&report, true, false);
}

#[test]
fn postgres_lab() {
    if let Some(report) = report("postgres") {
        judged(&report, true, true);
    }
}

#[test]
fn mysql_lab() {
    if let Some(report) = report("mysql") {
        judged(&report, true, false);
    }
}

#[test]
fn redis_lab_has_no_transactional_mode() {
    if let Some(report) = report("redis") {
        judged(&report, false, false);
    }
}

#[test]
fn etcd_lab_has_no_transactional_mode() {
    if let Some(report) = report("etcd") {
        judged(&report, false, false);
    }
}

#[test]
fn a_share_outside_zero_to_one_is_refused() {
    let out = lab("sqlite", &["--lost", "1.5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--lost must be between 0 and 1"),
        "{out:?}"
    );
}

#[test]
fn the_lab_and_the_demo_refuse_an_existing_file_and_leave_it_untouched() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("mine.db");
    std::fs::write(&path, b"not the lab's").expect("a file of the user's");
    for args in [
        &["lab", "--payments", "10", "--db"][..],
        &["demo", "--db"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(args)
            .arg(&path)
            .output()
            .expect("the idem binary runs");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("exists"),
            "{args:?}: {out:?}"
        );
        assert_eq!(
            std::fs::read(&path).expect("the file is still there"),
            b"not the lab's",
            "{args:?} touched the file"
        );
    }
}
