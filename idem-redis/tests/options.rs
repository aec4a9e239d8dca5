//! Configuration and odd input: outcomes too large to store, the server's own bulk limit,
//! key prefixes with glob characters, and the opt-in retention TTL.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{url, PrivateServer, Shared};
use idem_core::{Barrier, Clock, Error, Failure, Key, RunError, State, Store, SystemClock};
use idem_redis::{RedisOptions, RedisStore, DEFAULT_MAX_OUTCOME_SIZE};

type Run = Result<idem_core::Response<String, String>, RunError<String>>;

/// Runs `execute` on `key` with an operation that returns (or, if `fail`, fails
/// permanently with) `size` bytes, counting runs in `runs`.
async fn run_sized(
    barrier: &Barrier<RedisStore>,
    key: &Key,
    size: usize,
    fail: bool,
    runs: &AtomicU32,
) -> Run {
    barrier
        .execute(key, None, |_| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let body = "x".repeat(size);
            if fail {
                Err(Failure::Permanent(body))
            } else {
                Ok(body)
            }
        })
        .await
}

/// A too-large outcome: the caller gets `TooLarge`, the operation never runs again, the
/// record says what happened.
async fn assert_too_large_once(barrier: &Barrier<RedisStore>, key: &Key, size: usize, fail: bool) {
    let limit = barrier.store().options().max_outcome_size();
    let runs = AtomicU32::new(0);
    for attempt in 0..3 {
        match run_sized(barrier, key, size, fail, &runs).await {
            Err(RunError::Barrier(Error::TooLarge {
                size: reported,
                limit: l,
                ..
            })) => {
                assert!(reported > limit && l == limit, "{reported} {l} {limit}");
            }
            other => panic!("attempt {attempt}: expected TooLarge, got {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");
    let record = barrier.store().get(key).await.unwrap().expect("a record");
    match record.state {
        State::Failed { response } => {
            let note = String::from_utf8_lossy(&response);
            assert!(note.contains("exceeded max_outcome_size"), "{note}");
        }
        other => panic!("expected the too-large marker, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_too_large_is_refused_once_and_never_runs_again() {
    let Some(shared) = Shared::open("too-large").await else {
        return;
    };
    let store = shared.store(shared.options("")).await;
    assert_eq!(store.options().max_outcome_size(), DEFAULT_MAX_OUTCOME_SIZE);
    let barrier = Barrier::new(Arc::new(store));
    // Above the 1 MiB default, completed and failed.
    let two_mib = 2 << 20;
    assert_too_large_once(&barrier, &Key::new("big", "ok").unwrap(), two_mib, false).await;
    assert_too_large_once(&barrier, &Key::new("big", "fail").unwrap(), two_mib, true).await;
    // At the limit it is stored and replayed.
    let runs = AtomicU32::new(0);
    let key = Key::new("big", "fits").unwrap();
    let fits = DEFAULT_MAX_OUTCOME_SIZE - 3; // the codec's tag and quotes
    let first = run_sized(&barrier, &key, fits, false, &runs).await.unwrap();
    let again = run_sized(&barrier, &key, fits, false, &runs).await.unwrap();
    assert!(!first.replayed && again.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    shared.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_never_exceeds_what_the_server_accepts() {
    // A server that refuses bulk strings above 1 MB stands in for the 512 MB default: an
    // outcome above it would be cut off by the server (connection closed, retryable, run
    // again); the store lowers its limit so it is refused as too large instead.
    let Some(server) = PrivateServer::start(26388, &["--proto-max-bulk-len", "1mb"]).await else {
        return;
    };
    let options = RedisOptions::default().with_max_outcome_size(64 << 20);
    let store = RedisStore::connect_with(&server.url(), options)
        .await
        .unwrap();
    let limit = store.options().max_outcome_size();
    assert!(limit < 1 << 20, "lowered to the server's limit: {limit}");
    let barrier = Barrier::new(Arc::new(store));
    assert_too_large_once(
        &barrier,
        &Key::new("big", "server").unwrap(),
        3 << 19,
        false,
    )
    .await;
    // On this fresh server the purge script is not loaded yet: the pipelined purge loads it.
    let after_retention = SystemClock.now().plus(barrier.retention() * 2);
    assert_eq!(barrier.store().purge(after_retention, 10).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn glob_characters_in_a_prefix_match_only_its_own_records() {
    let Some(shared) = Shared::open("glob").await else {
        return;
    };
    // Unescaped, `P*` would match `Px`'s keys, `P?` `Py`'s and `P[ab]` `Pa`'s.
    let names = ["*", "x", "?", "y", "[ab]", "a", "\\"];
    let mut stores = Vec::new();
    for name in names {
        stores.push(shared.store(shared.options(&format!("{name}:"))).await);
    }
    let now = SystemClock.now();
    let lease = Duration::from_secs(60);
    for (i, store) in stores.iter().enumerate() {
        for n in 0..=i {
            let key = Key::new("glob", format!("k{n}")).unwrap();
            let deadlines = idem_core::Deadlines {
                lease_until: now.plus(lease),
                expires_at: now.plus(lease),
            };
            let idem_core::Begin::Acquired(l) =
                store.begin(&key, None, deadlines, now).await.unwrap()
            else {
                panic!("fresh key")
            };
            store.complete(&l, b"\x011", now, now).await.unwrap();
        }
    }
    for (i, store) in stores.iter().enumerate() {
        assert_eq!(
            store.stats().await.unwrap().total(),
            i as u64 + 1,
            "prefix {:?}",
            names[i]
        );
    }
    // Purging one prefix deletes only its own records.
    let later = now.plus(Duration::from_secs(1));
    assert_eq!(stores[0].purge(later, 1000).await.unwrap(), 1);
    assert_eq!(stores[4].purge(later, 1000).await.unwrap(), 5);
    for (i, store) in stores.iter().enumerate() {
        let left = store.stats().await.unwrap().total();
        let want = if i == 0 || i == 4 { 0 } else { i as u64 + 1 };
        assert_eq!(left, want, "prefix {:?}", names[i]);
    }
    shared.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_carry_a_ttl_only_when_asked() {
    let Some(mut shared) = Shared::open("ttl").await else {
        return;
    };
    let plain = shared.options("off:");
    let grace = shared
        .options("on:")
        .with_ttl_grace(Duration::from_secs(3600));
    let mut pttls = Vec::new();
    for options in [plain, grace] {
        let prefix = options.key_prefix().to_string();
        let barrier = Barrier::new(Arc::new(shared.store(options).await));
        let key = Key::new("ttl", "k").unwrap();
        let r: Run = barrier
            .execute(&key, None, |_| async { Ok("done".to_string()) })
            .await;
        r.unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut shared.admin)
            .await
            .unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&keys[0])
            .query_async(&mut shared.admin)
            .await
            .unwrap();
        pttls.push(pttl);
    }
    assert_eq!(pttls[0], -1, "no TTL by default: purge alone forgets keys");
    assert!(pttls[1] > 3_600_000, "retention plus grace: {}", pttls[1]);
    shared.cleanup().await;
}

#[test]
fn invalid_options_are_config_errors() {
    for prefix in ["", "a{b", "b}", "with space", "tab\t", &"p".repeat(129)] {
        assert!(
            matches!(
                RedisOptions::default().with_key_prefix(prefix),
                Err(Error::Config(_))
            ),
            "{prefix:?}"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bad = [
        RedisOptions::default().with_response_timeout(Duration::ZERO),
        RedisOptions::default().with_wait_replicas(1, Duration::ZERO),
        RedisOptions::default()
            .with_response_timeout(Duration::from_millis(100))
            .with_wait_replicas(1, Duration::from_millis(100)),
    ];
    for options in bad {
        let r = rt.block_on(RedisStore::connect_with(&url(), options.clone()));
        assert!(matches!(r, Err(Error::Config(_))), "{options:?}: {r:?}");
    }
}
