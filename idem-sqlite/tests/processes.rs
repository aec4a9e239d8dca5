//! Several processes sharing one database file: every key is acquired exactly once, and
//! a fleet opening (and migrating) a fresh file at the same moment all succeed.

use std::process::Stdio;

use std::path::Path;
use std::time::Duration;

use idem_core::{Begin, Clock, Deadlines, Key, Store, SystemClock};
use idem_sqlite::{SqliteOptions, SqliteStore};

const CHILD_DB: &str = "IDEM_SQLITE_CHILD_DB";
const KEYS: usize = 300;
const PROCESSES: usize = 4;
/// Processes, and stores per process, that open a fresh file at once.
const FLEET: usize = 16;
const TASKS: usize = 8;

/// Runs in each child: tries to claim every key, prints how many it acquired.
#[test]
#[ignore = "helper: run as a child process by `processes_sharing_a_file_claim_each_key_once`"]
fn claim_child() {
    let Ok(path) = std::env::var(CHILD_DB) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let acquired = runtime.block_on(async {
        let store = SqliteStore::connect(&path).await.unwrap();
        let mut acquired = 0;
        for i in 0..KEYS {
            let key = Key::new("processes", format!("k{i}")).unwrap();
            let now = SystemClock.now();
            let d = Deadlines {
                lease_until: now.plus(std::time::Duration::from_secs(600)),
                expires_at: now.plus(std::time::Duration::from_secs(3600)),
            };
            match store.begin(&key, None, d, now).await.unwrap() {
                Begin::Acquired(_) => acquired += 1,
                Begin::InProgress { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        acquired
    });
    println!("acquired={acquired}");
}

/// Runs `count` copies of the ignored test `child` with `path`, and returns each one's count
/// (the number it printed after `label=`).
fn run_children(child: &str, count: usize, path: &Path, label: &str) -> Vec<usize> {
    let children: Vec<_> = (0..count)
        .map(|_| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    child,
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_DB, path)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "a child failed: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            for failure in stdout.lines().filter(|l| l.contains("failed: ")) {
                eprintln!("{failure}");
            }
            stdout
                .lines()
                .find_map(|l| l.split(&format!("{label}=")).nth(1))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or_else(|| panic!("no count in child output: {stdout}"))
        })
        .collect()
}

#[test]
fn processes_sharing_a_file_claim_each_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let total: usize = run_children("claim_child", PROCESSES, &path, "acquired")
        .into_iter()
        .sum();
    assert_eq!(
        total, KEYS,
        "{PROCESSES} processes acquired {total} claims on {KEYS} keys"
    );
}

/// Runs in each child of the fleet: waits for the start signal, then opens `TASKS` stores
/// (two tables) on the fresh file at once and claims one key through each.
#[test]
#[ignore = "helper: run as a child process by `a_fleet_opening_a_fresh_file_at_once_all_succeed`"]
fn migrate_child() {
    let Ok(path) = std::env::var(CHILD_DB) else {
        return;
    };
    let go = format!("{path}.go");
    while !Path::new(&go).exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let opened = runtime.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let path = path.clone();
                tokio::spawn(async move {
                    let table = if t % 2 == 0 {
                        "idem_records"
                    } else {
                        "idem_other"
                    };
                    let options = SqliteOptions::default().with_table(table)?;
                    let store = SqliteStore::connect_with(&path, options).await?;
                    let key = Key::new("fleet", format!("{}-{t}", std::process::id()))?;
                    let now = SystemClock.now();
                    let d = Deadlines {
                        lease_until: now.plus(Duration::from_secs(600)),
                        expires_at: now.plus(Duration::from_secs(3600)),
                    };
                    match store.begin(&key, None, d, now).await? {
                        Begin::Acquired(_) => Ok(()),
                        other => Err(idem_core::Error::Config(format!("unexpected {other:?}"))),
                    }
                })
            })
            .collect();
        let mut opened = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(()) => opened += 1,
                Err(e) => println!("failed: {e}"),
            }
        }
        opened
    });
    println!("opened={opened}");
}

#[test]
fn a_fleet_opening_a_fresh_file_at_once_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    let go = dir.path().join("fleet.db.go");
    let fleet = std::thread::spawn({
        let path = path.clone();
        move || run_children("migrate_child", FLEET, &path, "opened")
    });
    // Let the children start and wait at the line, then release them together.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&go, b"").unwrap();
    let opened = fleet.join().unwrap();
    assert_eq!(
        opened,
        vec![TASKS; FLEET],
        "stores opened per process (of {TASKS} each)"
    );
}
