//! Several processes sharing one database file: every key is acquired exactly once.

use std::process::Stdio;

use idem_core::{Begin, Clock, Deadlines, Key, Store, SystemClock};
use idem_sqlite::SqliteStore;

const CHILD_DB: &str = "IDEM_SQLITE_CHILD_DB";
const KEYS: usize = 300;
const PROCESSES: usize = 4;

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
        let store = SqliteStore::open(&path).await.unwrap();
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

#[test]
fn processes_sharing_a_file_claim_each_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "claim_child",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_DB, &path)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut total = 0;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "a child failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let n: usize = stdout
            .lines()
            .find_map(|l| l.split("acquired=").nth(1))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no count in child output: {stdout}"));
        total += n;
    }
    assert_eq!(
        total, KEYS,
        "{PROCESSES} processes acquired {total} claims on {KEYS} keys"
    );
}
