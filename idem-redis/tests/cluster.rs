//! Redis Cluster (`IDEM_TEST_REQUIRE` name `redis-cluster`): a local cluster of three
//! masters with one replica each, started and stopped with `scripts/cluster.sh`
//! (127.0.0.1:27001-27006).
//!
//! One test, in order, because the failover changes the cluster under everything else:
//! the conformance suite through the cluster; `purge` and `stats` covering every master;
//! the cost of `WAIT` acknowledgement; then a concurrent run during which a master is killed
//! (once without and once with `WAIT 1`), reporting per key what happened.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{plain, unique_prefix};
use idem_core::backend::codec;
use idem_core::{
    Barrier, Begin, Clock, Deadlines, Error, Failure, Key, Outcome, RunError, State, Store,
    SystemClock,
};
use idem_redis::conformance::RedisConformance;
use idem_redis::{RedisOptions, RedisStore};

const PORTS: [u16; 6] = [27001, 27002, 27003, 27004, 27005, 27006];

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh")
}

/// Runs `scripts/cluster.sh args…`; its stdout, or why it failed.
fn cluster_sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script().display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "cluster.sh {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn endpoints() -> Vec<String> {
    PORTS
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}/"))
        .collect()
}

/// Stops the cluster when the test ends (also on a failed assertion).
struct Running;

impl Drop for Running {
    fn drop(&mut self) {
        if let Err(e) = cluster_sh(&["clean", "redis-cluster"]) {
            eprintln!("{e}");
        }
    }
}

/// One line of `CLUSTER NODES`: a master, its member number and its slot ranges.
#[derive(Debug, Clone)]
struct Master {
    port: u16,
    slots: Vec<(u16, u16)>,
}

impl Master {
    fn member(&self) -> String {
        (self.port - 27000).to_string()
    }
    fn owns(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

/// The masters serving slots, as any live node reports them.
async fn masters() -> Vec<Master> {
    for port in PORTS {
        let Some(mut conn) = plain(&format!("redis://127.0.0.1:{port}/")).await else {
            continue;
        };
        let Ok(text) = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async::<String>(&mut conn)
            .await
        else {
            continue;
        };
        let mut out = Vec::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 9 || !f[2].contains("master") || f[2].contains("fail") {
                continue;
            }
            let port = f[1]
                .split(['@', ','])
                .next()
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| p.parse().ok())
                .unwrap_or(0);
            let slots = f[8..]
                .iter()
                .filter(|r| !r.starts_with('['))
                .filter_map(|r| match r.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => r.parse().ok().map(|s| (s, s)),
                })
                .collect();
            out.push(Master { port, slots });
        }
        return out;
    }
    Vec::new()
}

/// Whether the node on `port` sees a healthy cluster with all 16384 slots served and, if
/// it is a replica, is in sync with its master (only then can it take over).
async fn node_healthy(port: u16) -> bool {
    let Some(mut conn) = plain(&format!("redis://127.0.0.1:{port}/")).await else {
        return false;
    };
    let info = |section: &'static str| {
        let mut cmd = redis::cmd(section);
        if section == "CLUSTER" {
            cmd.arg("INFO");
        } else {
            cmd.arg("replication");
        }
        cmd
    };
    let (Ok(cluster), Ok(replication)) = (
        info("CLUSTER").query_async::<String>(&mut conn).await,
        info("INFO").query_async::<String>(&mut conn).await,
    ) else {
        return false;
    };
    cluster.contains("cluster_state:ok")
        && cluster.contains("cluster_slots_ok:16384")
        && (replication.contains("role:master")
            || (replication.contains("master_link_status:up")
                && replication.contains("master_sync_in_progress:0")))
}

/// Waits until every node is up, the cluster is healthy and every replica is in sync.
async fn wait_healthy() {
    for _ in 0..300 {
        let mut ok = 0;
        for port in PORTS {
            if node_healthy(port).await {
                ok += 1;
            }
        }
        if ok == PORTS.len() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the cluster did not become healthy");
}

/// The slot of `key`'s record under the documented layout: the hash tag
/// `{<scope-hex>.<id-hex>}`.
async fn slot_of(key: &Key) -> u16 {
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let tag = format!("{{{}.{}}}", hex(key.scope()), hex(key.id()));
    let mut conn = plain("redis://127.0.0.1:27001/")
        .await
        .or(plain("redis://127.0.0.1:27002/").await)
        .expect("a live node");
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(tag)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Deletes every key under `prefix` (free of glob characters) on every node that owns it.
async fn delete_everywhere(prefix: &str) {
    for port in PORTS {
        let Some(mut conn) = plain(&format!("redis://127.0.0.1:{port}/")).await else {
            continue;
        };
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        for k in keys {
            let _: Result<(), _> = redis::cmd("DEL").arg(k).query_async(&mut conn).await;
        }
    }
}

fn options(prefix: &str) -> RedisOptions {
    RedisOptions::default()
        .with_key_prefix(prefix)
        .expect("a valid prefix")
}

#[test]
fn redis_cluster() {
    let required = idem_conformance::required("redis-cluster");
    let have = |bin: &str| Command::new(bin).arg("--version").output().is_ok();
    if !have("redis-server") || !have("redis-cli") {
        assert!(
            !required,
            "IDEM_TEST_REQUIRE names redis-cluster but redis-server/redis-cli are missing"
        );
        eprintln!("skipped: redis-server or redis-cli is not installed");
        return;
    }
    if let Err(e) = cluster_sh(&["start", "redis-cluster"]) {
        assert!(!required, "{e}");
        eprintln!("skipped: {e}");
        return;
    }
    let _running = Running;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        wait_healthy().await;
        conformance().await;
        purge_and_stats_cover_every_master().await;
        wait_cost().await;
        let plain = failover("without WAIT", None).await;
        wait_healthy().await;
        let waited = failover("with WAIT 1", Some(1)).await;
        println!("\nfailover summary (keys on the killed master / all keys):");
        for (name, r) in [("without WAIT", plain), ("with WAIT 1", waited)] {
            println!(
                "  {name:<13} keys {:>5}/{:<5} duplicates {:>3} (overlapping {:>3}) lost \
                 completions {:>3} divergent answers {:>3} unresolved {:>3}",
                r.on_killed, r.keys, r.duplicates, r.overlapping, r.lost, r.divergent, r.unresolved
            );
        }
    });
}

async fn conformance() {
    let factory = RedisConformance::cluster(endpoints(), &unique_prefix("cluster-conformance"))
        .expect("a valid prefix");
    let started = Instant::now();
    let report = idem_conformance::run_all(&factory).await;
    println!(
        "conformance suite against the cluster ({:.1?}):\n{report}",
        started.elapsed()
    );
    factory.remove().await.expect("remove the conformance keys");
    report.assert_ok();
}

async fn purge_and_stats_cover_every_master() {
    let prefix = unique_prefix("cluster-scan");
    let store = RedisStore::connect_cluster_with(endpoints(), options(&prefix))
        .await
        .unwrap();
    let now = SystemClock.now();
    let d = Deadlines {
        lease_until: now.plus(Duration::from_secs(60)),
        expires_at: now.plus(Duration::from_secs(60)),
    };
    let mut slots_by_master = HashMap::new();
    let masters = masters().await;
    for i in 0..60 {
        let key = Key::new("scan", format!("k{i}")).unwrap();
        let Begin::Acquired(lease) = store.begin(&key, None, d, now).await.unwrap() else {
            panic!("fresh key")
        };
        store.complete(&lease, b"\x011", now, now).await.unwrap();
        let slot = slot_of(&key).await;
        let master = masters.iter().find(|m| m.owns(slot)).expect("slot served");
        *slots_by_master.entry(master.port).or_insert(0) += 1;
    }
    assert_eq!(
        slots_by_master.len(),
        3,
        "records on every master: {slots_by_master:?}"
    );
    assert_eq!(store.stats().await.unwrap().completed, 60);
    let later = now.plus(Duration::from_secs(1));
    assert_eq!(store.purge(later, 25).await.unwrap(), 25, "a batch");
    assert_eq!(store.purge(later, 1000).await.unwrap(), 35);
    assert_eq!(store.stats().await.unwrap().total(), 0);
    println!("purge and stats covered all 3 masters: {slots_by_master:?}");
}

/// Prints the cost of `WAIT 1` on completions: sequential and 16-way concurrent
/// begin+complete pairs, without and with it.
async fn wait_cost() {
    println!("\nWAIT cost (begin+complete pairs on the cluster, two rounds):");
    for wait in [None, Some(1), None, Some(1)] {
        let prefix = unique_prefix("cluster-wait-cost");
        let mut opts = options(&prefix);
        if let Some(n) = wait {
            opts = opts.with_wait_replicas(n, Duration::from_millis(500));
        }
        let barrier = Barrier::new(Arc::new(
            RedisStore::connect_cluster_with(endpoints(), opts)
                .await
                .unwrap(),
        ));
        let pair = |barrier: Barrier<RedisStore>, id: String| async move {
            let key = Key::new("cost", id).unwrap();
            let r: Result<_, RunError<String>> = barrier
                .execute(&key, None, |_| async {
                    Ok::<u8, Failure<String, String>>(1)
                })
                .await;
            r.unwrap();
        };
        for i in 0..50 {
            pair(barrier.clone(), format!("warm{i}")).await;
        }
        let n = 300;
        let start = Instant::now();
        for i in 0..n {
            pair(barrier.clone(), format!("seq{i}")).await;
        }
        let sequential = start.elapsed();
        let tasks = 16;
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    for i in 0..n / 4 {
                        pair(barrier.clone(), format!("par{t}-{i}")).await;
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        let concurrent = start.elapsed();
        let label = match wait {
            None => "no WAIT".to_string(),
            Some(n) => format!("WAIT {n}"),
        };
        println!(
            "  {label:<8} sequential {:>7.0} µs/pair ({:>6.0} pairs/s)   16 tasks {:>6.0} pairs/s",
            sequential.as_micros() as f64 / n as f64,
            n as f64 / sequential.as_secs_f64(),
            (tasks * (n / 4)) as f64 / concurrent.as_secs_f64()
        );
        delete_everywhere(&prefix).await;
    }
}

/// Per key: each execution's value and when it started.
type Executions = HashMap<usize, Vec<(u64, Instant)>>;

/// What happened to the keys of one failover run.
struct FailoverReport {
    keys: usize,
    on_killed: usize,
    duplicates: usize,
    /// Duplicates whose second execution began while the first one's lease was live: two
    /// holders at once, possible only if a claim was lost.
    overlapping: usize,
    lost: usize,
    divergent: usize,
    unresolved: usize,
}

/// Runs keys concurrently for a few seconds (two clients per key, each retrying until it
/// gets an answer), kills the master of slot 0 one second in, restarts it afterwards, and
/// reports per key: executions, acknowledged values, the final record.
async fn failover(name: &str, wait: Option<u32>) -> FailoverReport {
    const RUN: Duration = Duration::from_secs(6);
    const LEASE: Duration = Duration::from_secs(2);
    const CLIENT_DEADLINE: Duration = Duration::from_secs(30);
    let prefix = unique_prefix("cluster-failover");
    let mut opts = options(&prefix).with_response_timeout(Duration::from_secs(1));
    if let Some(n) = wait {
        opts = opts.with_wait_replicas(n, Duration::from_millis(500));
    }
    let store = RedisStore::connect_cluster_with(endpoints(), opts)
        .await
        .unwrap();
    // A short lease, so a claim lost in the failover is reclaimed within the run.
    let barrier = Barrier::new(Arc::new(store)).with_lease(LEASE);
    let executions: Arc<Mutex<Executions>> = Arc::default();
    let answers: Arc<Mutex<HashMap<usize, Vec<Option<u64>>>>> = Arc::default();
    let next_key = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..16u64 {
        let (barrier, executions, answers, next_key) = (
            barrier.clone(),
            Arc::clone(&executions),
            Arc::clone(&answers),
            Arc::clone(&next_key),
        );
        workers.push(tokio::spawn(async move {
            let mut run = 0u64;
            while started.elapsed() < RUN {
                // Two workers share each key: the second is a concurrent duplicate.
                let k = next_key.fetch_add(1, Ordering::SeqCst) / 2;
                let key = Key::new("failover", format!("k{k}")).unwrap();
                let client_start = Instant::now();
                let answer = loop {
                    run += 1;
                    let value = w * 1_000_000 + run;
                    let executions = Arc::clone(&executions);
                    let r: Result<_, RunError<String>> = barrier
                        .execute(&key, None, move |_| async move {
                            let at = Instant::now();
                            executions
                                .lock()
                                .unwrap()
                                .entry(k)
                                .or_default()
                                .push((value, at));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            Ok::<u64, Failure<String, String>>(value)
                        })
                        .await;
                    match r {
                        Ok(resp) => match resp.outcome {
                            Outcome::Completed(v) => break Some(v),
                            Outcome::Failed(f) => panic!("no operation fails here: {f}"),
                        },
                        Err(e) => {
                            let retryable = match &e {
                                RunError::Barrier(b) => {
                                    b.is_retryable() || matches!(b, Error::LeaseLost)
                                }
                                RunError::Operation(_) => true,
                            };
                            assert!(retryable, "a permanent answer during failover: {e}");
                            if client_start.elapsed() > CLIENT_DEADLINE {
                                break None;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                };
                answers.lock().unwrap().entry(k).or_default().push(answer);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let victim = masters()
        .await
        .into_iter()
        .find(|m| m.owns(0))
        .expect("slot 0 is served");
    cluster_sh(&["kill", "redis-cluster", &victim.member()]).unwrap();
    let killed_at = started.elapsed();
    for worker in workers {
        worker.await.unwrap();
    }
    let elapsed = started.elapsed();
    // The victim's replica takes over its slots (cluster-node-timeout 2 s plus an
    // election); only then does the victim come back, as a replica.
    let mut after = Vec::new();
    for _ in 0..300 {
        after = masters().await;
        if after.iter().any(|m| m.owns(0) && m.port != victim.port) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster_sh(&["start", "redis-cluster", &victim.member()]).unwrap();
    let successor = after.iter().find(|m| m.owns(0)).map(|m| m.port);
    assert!(
        successor.is_some() && successor != Some(victim.port),
        "a replica took over slot 0 from {}: {after:?}",
        victim.port
    );

    let executions = executions.lock().unwrap().clone();
    let answers = answers.lock().unwrap().clone();
    let mut report = FailoverReport {
        keys: answers.len(),
        on_killed: 0,
        duplicates: 0,
        overlapping: 0,
        lost: 0,
        divergent: 0,
        unresolved: 0,
    };
    let mut anomalies = BTreeMap::new();
    for (&k, got) in &answers {
        let key = Key::new("failover", format!("k{k}")).unwrap();
        let on_killed = victim.owns(slot_of(&key).await);
        let runs = executions.get(&k).cloned().unwrap_or_default();
        let ran: Vec<u64> = runs.iter().map(|(v, _)| *v).collect();
        let overlapping = runs
            .windows(2)
            .any(|w| w[1].1.duration_since(w[0].1) < LEASE);
        let acked: HashSet<u64> = got.iter().flatten().copied().collect();
        let record = barrier.store().get(&key).await.ok().flatten();
        let stored = match record.map(|r| r.state) {
            Some(State::Completed { response }) => codec::decode::<u64>(&response).ok(),
            _ => None,
        };
        let duplicate = ran.len() > 1;
        let lost = acked.iter().any(|v| Some(*v) != stored);
        let divergent = acked.len() > 1;
        let unresolved = got.iter().any(Option::is_none);
        report.on_killed += usize::from(on_killed);
        report.duplicates += usize::from(duplicate);
        report.overlapping += usize::from(duplicate && overlapping);
        report.lost += usize::from(lost);
        report.divergent += usize::from(divergent);
        report.unresolved += usize::from(unresolved);
        if duplicate || lost || divergent || unresolved {
            anomalies.insert(
                k,
                format!(
                    "k{k:<5} {} ran {} time(s){} {ran:?}, answered {got:?}, stored {stored:?}",
                    if on_killed {
                        "killed master "
                    } else {
                        "other master  "
                    },
                    ran.len(),
                    if overlapping {
                        " overlapping"
                    } else {
                        " after the lease"
                    }
                ),
            );
            assert!(
                on_killed,
                "a key on a surviving master went wrong: k{k} ran {ran:?}, answered {got:?}, \
                 stored {stored:?}"
            );
        }
    }
    println!(
        "\nfailover {name}: killed master 127.0.0.1:{} at {killed_at:.1?} of a {elapsed:.1?} run \
         (slot 0 then served by 127.0.0.1:{}); \
         {} keys, {} on the killed master; duplicates {} ({} overlapping), lost completions {}, \
         divergent answers {}, unresolved {}",
        victim.port,
        successor.unwrap_or(0),
        report.keys,
        report.on_killed,
        report.duplicates,
        report.overlapping,
        report.lost,
        report.divergent,
        report.unresolved
    );
    for line in anomalies.values() {
        println!("  {line}");
    }
    delete_everywhere(&prefix).await;
    report
}
