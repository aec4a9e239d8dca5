//! The etcd test fixture: the local 3-member cluster of `scripts/cluster.sh` (started on
//! first use), single members stopped and started for fault tests, and the crate's conformance
//! factory on it, a key prefix per factory, deleted when the factory is dropped.
//!
//! `IDEM_ETCD_ENDPOINTS` (comma-separated) points the tests at another cluster instead; the
//! tests that stop members then skip, since they can only control the local one.

#![allow(dead_code)] // Each test binary uses its own part of the fixture.

use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use idem_etcd::conformance::EtcdConformance;
use idem_etcd::EtcdOptions;

/// The members of the local cluster, numbered as `scripts/cluster.sh` numbers them.
pub const MEMBERS: [u32; 3] = [1, 2, 3];

fn script() -> String {
    format!("{}/../scripts/cluster.sh", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `scripts/cluster.sh <args>`; its stdout, or why it failed.
pub fn cluster(args: &[&str]) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "scripts/cluster.sh {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether the tests run against the local cluster (no `IDEM_ETCD_ENDPOINTS`).
pub fn local() -> bool {
    std::env::var("IDEM_ETCD_ENDPOINTS").is_err()
}

/// The endpoints under test: `IDEM_ETCD_ENDPOINTS`, or the local cluster, started once per
/// test binary if it is not running.
pub fn endpoints() -> Result<String, String> {
    if let Ok(e) = std::env::var("IDEM_ETCD_ENDPOINTS") {
        return Ok(e);
    }
    static STARTED: OnceLock<Result<String, String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            let out = cluster(&["start", "etcd"])?;
            out.lines()
                .last()
                .map(str::to_string)
                .ok_or_else(|| "scripts/cluster.sh printed no endpoints".to_string())
        })
        .clone()
}

/// The client endpoint of one local member.
pub fn member_endpoint(member: u32) -> String {
    format!("http://127.0.0.1:{}", 23790 + member)
}

/// Kills (`SIGKILL`) one local member.
pub fn kill(member: u32) {
    cluster(&["kill", "etcd", &member.to_string()]).expect("kill an etcd member");
}

/// Starts one local member again and waits until it is healthy.
pub fn start(member: u32) {
    cluster(&["start", "etcd", &member.to_string()]).expect("start an etcd member");
}

/// Pauses (`SIGSTOP`) one local member.
pub fn pause(member: u32) {
    cluster(&["pause", "etcd", &member.to_string()]).expect("pause an etcd member");
}

/// Resumes (`SIGCONT`) one local member.
pub fn resume(member: u32) {
    cluster(&["resume", "etcd", &member.to_string()]).expect("resume an etcd member");
}

/// The member that leads the local cluster now, asked of every member that answers.
pub async fn leader() -> Result<u32, String> {
    let mut ids = Vec::new();
    let mut leader = None;
    for m in MEMBERS {
        let Ok(mut c) = Client::connect(
            [member_endpoint(m)],
            Some(ConnectOptions::new().with_timeout(Duration::from_secs(2))),
        )
        .await
        else {
            continue;
        };
        if let Ok(s) = c.status().await {
            ids.push((m, s.header().map(|h| h.member_id()).unwrap_or(0)));
            if s.leader() != 0 {
                leader = Some(s.leader());
            }
        }
    }
    let leader = leader.ok_or("no member reports a leader")?;
    ids.iter()
        .find(|(_, id)| *id == leader)
        .map(|(m, _)| *m)
        .ok_or_else(|| format!("leader {leader:x} is not among the members that answered"))
}

/// The crate's conformance factory, whose stores the tests use.
pub type EtcdFactory = EtcdConformance;

/// A factory on [`endpoints`] under a fresh prefix `idem-test/<run>/`, with `options`.
pub fn factory_with(options: EtcdOptions) -> EtcdFactory {
    // A cluster that cannot be started shows as unavailable: the probe names the cause.
    let endpoints = endpoints().unwrap_or_else(|why| {
        eprintln!("{why}");
        String::new()
    });
    let prefix = format!("idem-test/{}/", idem_conformance::scratch::run_id());
    EtcdConformance::new(&endpoints, &prefix, options).expect("valid options")
}

/// [`factory_with`] the default options.
pub fn factory() -> EtcdFactory {
    factory_with(EtcdOptions::default())
}
