//! `idem bench --json` end to end: every stable workload name appears once per client
//! count with a positive throughput and ordered percentiles, on SQLite (always) and on the
//! PostgreSQL, MySQL and Redis servers when reachable (required when `IDEM_TEST_REQUIRE` names
//! them). A smoke test of the benchmark's plumbing, not a measurement: no figure is
//! compared with a threshold.

use std::process::Command;

use serde_json::Value;

/// Runs a tiny benchmark and returns its JSON lines, or `None` when the server is
/// unreachable and not required.
fn bench(backend: &str, extra: &[&str]) -> Option<Vec<Value>> {
    let db = std::env::temp_dir().join(format!("idem-cli-test-bench-{}.db", std::process::id()));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idem"));
    cmd.args(["bench", "--json", "--backend", backend])
        .args(["--seconds", "0.2", "--rounds", "1", "--clients", "1,3"])
        .args(extra);
    if backend == "sqlite" {
        cmd.arg("--db").arg(&db);
    }
    let out = cmd.output().expect("the idem binary runs");
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && backend != "sqlite" {
        assert!(
            !idem_conformance::required(backend),
            "IDEM_TEST_REQUIRE names {backend} but the benchmark failed: {stderr}"
        );
        eprintln!("skipped: the {backend} benchmark could not run: {stderr}");
        return None;
    }
    assert!(out.status.success(), "idem bench failed: {stderr}");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    Some(lines)
}

/// Checks that every name appears at 1 and 3 clients, and the fields of every line.
fn check(backend: &str, lines: &[Value], names: &[&str]) {
    for line in lines {
        assert_eq!(line["backend"], backend, "{line}");
        let ops = line["ops_per_s"].as_f64().expect("ops_per_s");
        assert!(ops > 0.0, "no call completed: {line}");
        let (p50, p99) = (line["p50_us"].as_u64(), line["p99_us"].as_u64());
        assert!(p50.is_some() && p99.is_some() && p50 <= p99, "{line}");
    }
    for name in names {
        for clients in [1, 3] {
            let found = lines
                .iter()
                .filter(|l| {
                    l["name"] == *name && l["clients"] == clients && l.get("records").is_none()
                })
                .count();
            assert_eq!(found, 1, "{backend} {name} at {clients} clients: {lines:?}");
        }
    }
}

#[test]
fn sqlite_workloads_with_stored_records() {
    let lines = bench("sqlite", &["--records", "10,100"]).expect("SQLite always runs");
    check(
        "sqlite",
        &lines,
        &[
            "insert-own-txn",
            "handrolled",
            "barrier-tx",
            "barrier-lease",
            "pk-select",
            "replay",
        ],
    );
    for records in [10, 100] {
        let at: Vec<&Value> = lines.iter().filter(|l| l["records"] == records).collect();
        let names: Vec<&str> = at.iter().filter_map(|l| l["name"].as_str()).collect();
        assert_eq!(
            names,
            ["insert-own-txn", "barrier-tx", "pk-select", "replay"],
            "at {records} records"
        );
        assert!(at.iter().all(|l| l["clients"] == 3), "{at:?}");
    }
}

/// The workloads of the servers' SQL benchmarks.
const SQL_SERVER_WORKLOADS: &[&str] = &[
    "insert-own-txn",
    "handrolled",
    "barrier-tx",
    "barrier-lease",
    "replay",
    "pk-select",
];

#[test]
fn postgres_workloads() {
    if let Some(lines) = bench("postgres", &["--no-records"]) {
        check("postgres", &lines, SQL_SERVER_WORKLOADS);
    }
}

#[test]
fn mysql_workloads() {
    if let Some(lines) = bench("mysql", &["--no-records"]) {
        check("mysql", &lines, SQL_SERVER_WORKLOADS);
    }
}

#[test]
fn redis_workloads_with_server_time() {
    if let Some(lines) = bench("redis", &[]) {
        check(
            "redis",
            &lines,
            &[
                "set",
                "get",
                "barrier-lease",
                "barrier-lease-multiplexed",
                "set-multiplexed",
                "replay",
            ],
        );
        let lease = lines
            .iter()
            .find(|l| l["name"] == "barrier-lease")
            .expect("barrier-lease");
        assert!(
            lease["server_us_per_call"]["set"].as_f64().is_some(),
            "a claim is a SET on the server: {lease}"
        );
    }
}
