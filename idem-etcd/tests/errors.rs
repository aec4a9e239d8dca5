//! Every row of the crate's error table, provoked on the real cluster: unreachable members,
//! no quorum, request timeouts, a compacted revision, requests too large, unreadable
//! records. The test that stops and pauses members runs alone (it holds `FAULTS` for
//! writing, the others for reading) and skips when `IDEM_ETCD_ENDPOINTS` names another
//! cluster.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{local, member_endpoint, pause, resume, start, EtcdFactory};
use etcd_client::{Client, CompactionOptions};
use idem_conformance::{available, StoreFactory};
use idem_core::{Begin, Clock, Deadlines, Error, Key, Lease, State, Store, SystemClock, Timestamp};
use idem_etcd::{EtcdOptions, EtcdStore};

static FAULTS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn deadlines(now: Timestamp) -> Deadlines {
    Deadlines {
        lease_until: now.plus(Duration::from_secs(30)),
        expires_at: now.plus(Duration::from_secs(3600)),
    }
}

fn key(id: &str) -> Key {
    Key::new("errors", id).expect("valid key")
}

/// The whole cause chain, for matching on the driver's message.
fn chain(e: &Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s:?}"));
        source = s.source();
    }
    msg
}

fn assert_retryable(e: &Error, what: &str) {
    assert!(
        matches!(
            e,
            Error::Store {
                retryable: true,
                ..
            }
        ),
        "{what}: expected a retryable store error, got {}",
        chain(e)
    );
}

async fn acquire(store: &EtcdStore, k: &Key) -> Lease {
    let now = SystemClock.now();
    match store.begin(k, None, deadlines(now), now).await {
        Ok(Begin::Acquired(lease)) => lease,
        other => panic!("begin on a fresh key answered {other:?}"),
    }
}

async fn factory() -> Option<EtcdFactory> {
    let f = common::factory();
    available(&f).await.then_some(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_retryable() {
    // Nothing listens on port 1 of the loopback interface.
    let store = EtcdStore::connect("http://127.0.0.1:1")
        .await
        .expect("lazy connect");
    let now = SystemClock.now();
    let e = store
        .begin(&key("unreachable"), None, deadlines(now), now)
        .await
        .expect_err("no server");
    assert_retryable(&e, "connection refused");
    assert!(chain(&e).contains("tcp connect error"), "{}", chain(&e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_before_any_request() {
    for bad in [
        EtcdOptions::default().with_key_prefix(""),
        EtcdOptions::default().with_key_prefix("no/trailing/slash"),
        EtcdOptions::default().with_key_prefix("has space/"),
        EtcdOptions::default().with_page_size(0),
        EtcdOptions::default().with_request_timeout(Duration::ZERO),
    ] {
        let r = EtcdStore::connect_with("http://127.0.0.1:1", bad.clone()).await;
        assert!(matches!(r, Err(Error::Config(_))), "{bad:?} was accepted");
    }
    assert!(matches!(
        EtcdStore::connect(" , ").await,
        Err(Error::Config(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_quorum_and_a_paused_member_are_retryable() {
    if !local() {
        eprintln!("skipped: only the local cluster's members can be stopped");
        return;
    }
    let _alone = FAULTS.write().await;
    let Some(f) = factory().await else { return };
    let only_m3 = EtcdOptions::default()
        .with_key_prefix(format!("{}m3/", f.prefix()))
        .with_request_timeout(Duration::from_millis(800));
    let store = EtcdStore::connect_with(&member_endpoint(3), only_m3)
        .await
        .expect("connect");
    let now = SystemClock.now();

    // Member 3 alone: no leader, and it says so at once (require_leader).
    for m in [1, 2] {
        tokio::task::spawn_blocking(move || common::cluster(&["stop", "etcd", &m.to_string()]))
            .await
            .expect("join")
            .expect("stop a member");
    }
    let lost_quorum = store
        .begin(&key("no-quorum"), None, deadlines(now), now)
        .await;
    for m in [1, 2] {
        tokio::task::spawn_blocking(move || start(m))
            .await
            .expect("join");
    }
    let e = lost_quorum.expect_err("no quorum");
    assert_retryable(&e, "no quorum");

    // Member 3 paused: the request times out.
    tokio::task::spawn_blocking(|| pause(3))
        .await
        .expect("join");
    let hung = store.begin(&key("paused"), None, deadlines(now), now).await;
    tokio::task::spawn_blocking(|| resume(3))
        .await
        .expect("join");
    let e = hung.expect_err("paused member");
    assert_retryable(&e, "request timeout");
    assert!(chain(&e).contains("Timeout expired"), "{}", chain(&e));

    // Back to normal: the same store serves requests again.
    let mut answered = false;
    for _ in 0..50 {
        if store.stats().await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        answered,
        "member 3 did not serve requests again after resuming"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_scan_revision_is_retryable() {
    let _shared = FAULTS.read().await;
    let Some(f) = factory().await else { return };
    let store = f
        .store_with(EtcdOptions::default().with_page_size(1))
        .await
        .expect("store");
    for i in 0..40 {
        acquire(&store, &key(&format!("c{i}"))).await;
    }
    // Compact the history to the newest revision as fast as possible, while `stats` reads
    // its pages one record at a time at the revision of its first page.
    let stop = Arc::new(AtomicBool::new(false));
    let compactor = {
        let (stop, client) = (Arc::clone(&stop), store.client().clone());
        let scratch = format!("{}scratch", f.prefix());
        tokio::spawn(async move {
            let mut kv = client.kv_client();
            while !stop.load(Ordering::SeqCst) {
                if let Ok(put) = kv.put(scratch.clone(), "x", None).await {
                    let rev = put.header().map(|h| h.revision()).unwrap_or(0);
                    let _ = kv
                        .compact(rev, Some(CompactionOptions::new().with_physical()))
                        .await;
                }
            }
        })
    };
    let mut compacted = None;
    let mut complete = 0;
    for _ in 0..200 {
        match store.stats().await {
            Ok(stats) => {
                assert_eq!(stats.in_progress, 40, "a complete scan counts every record");
                complete += 1;
            }
            Err(e) => {
                compacted = Some(e);
                break;
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    compactor.await.expect("compactor");
    let e = compacted.unwrap_or_else(|| {
        panic!("200 scans ({complete} complete) never met a compaction; the compactor did not run")
    });
    assert_retryable(&e, "compacted revision");
    assert!(chain(&e).contains("compacted"), "{}", chain(&e));
    // A fresh scan reads at the newest revision and succeeds.
    assert_eq!(store.stats().await.expect("stats").in_progress, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_outcomes_are_permanent_and_write_nothing() {
    let _shared = FAULTS.read().await;
    let Some(f) = factory().await else { return };
    let now = SystemClock.now();
    let expires = now.plus(Duration::from_secs(3600));

    // Over the store's own limit (1.5 MiB, etcd's default): refused before sending.
    let store = f.create().await.expect("store");
    let lease = acquire(&store, &key("big")).await;
    let big = vec![7u8; 2 << 20];
    match store.complete(&lease, &big, expires, now).await {
        Err(Error::TooLarge { size, limit, .. }) => {
            assert_eq!(size, big.len());
            assert!(limit < size);
        }
        other => panic!("a 2 MiB outcome: {other:?}"),
    }
    let unchanged = |rec: Option<idem_core::Record>, lease: &Lease| {
        assert!(
            matches!(rec.map(|r| r.state), Some(State::InProgress { token, .. }) if token == lease.token),
            "a refused outcome changed the record"
        );
    };
    unchanged(store.get(&lease.key).await.expect("get"), &lease);

    // A store configured above the server's limit: the server refuses, permanently.
    let lax = f
        .store_with(EtcdOptions::default().with_max_request_bytes(16 << 20))
        .await
        .expect("store");
    for (id, size, expect) in [
        ("etcd-limit", 1_700_000, "request is too large"),
        ("grpc-limit", 3 << 20, "larger than max"),
    ] {
        let lease = acquire(&lax, &key(id)).await;
        let e = lax
            .complete(&lease, &vec![1u8; size], expires, now)
            .await
            .expect_err("over the server's limit");
        assert!(
            matches!(
                e,
                Error::Store {
                    retryable: false,
                    ..
                }
            ),
            "{size} bytes: expected a permanent error, got {}",
            chain(&e)
        );
        assert!(chain(&e).contains(expect), "{}", chain(&e));
        unchanged(lax.get(&lease.key).await.expect("get"), &lease);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_records_are_typed_errors_naming_the_key() {
    let _shared = FAULTS.read().await;
    let _shared = FAULTS.read().await;
    let Some(f) = factory().await else { return };
    let store = f.create().await.expect("store");
    let prefix = store.options().key_prefix.clone();
    let mut kv = store.client().kv_client();
    let now = SystemClock.now();
    for (id, value, unknown) in [
        ("format", vec![9u8, 1, 2], true),
        ("state", [vec![1u8, 9], vec![0; 49]].concat(), false),
        ("short", vec![1u8, 1, 0, 0], false),
    ] {
        let k = key(id);
        // The documented layout: <prefix>m/<scope length, 3 digits>/<scope>/<id>.
        let raw = format!("{prefix}m/{:03}/{}/{}", k.scope().len(), k.scope(), k.id());
        kv.put(raw, value, None).await.expect("put");
        let e = store
            .begin(&k, None, deadlines(now), now)
            .await
            .expect_err("unreadable");
        match (&e, unknown) {
            (Error::UnknownFormat { .. }, true) => {}
            (Error::Corrupt { key: Some(k), .. }, false) => {
                assert_eq!(*k, format!("errors/{id}"))
            }
            _ => panic!("{id}: {}", chain(&e)),
        }
        assert!(!e.is_retryable());
    }
    assert!(
        store.stats().await.is_err(),
        "stats read an unreadable record"
    );
    // A foreign key under the prefix is reported, not skipped.
    let clean = f.create().await.expect("store");
    let foreign = format!("{}m/not-a-record", clean.options().key_prefix);
    kv.put(foreign, "x", None).await.expect("put");
    assert!(matches!(clean.stats().await, Err(Error::Corrupt { .. })));
    assert!(matches!(
        clean.purge(SystemClock.now(), 10).await,
        Err(Error::Corrupt { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_the_store_options_still_works() {
    let _shared = FAULTS.read().await;
    let Some(f) = factory().await else { return };
    let endpoints = common::endpoints().expect("endpoints");
    let list: Vec<&str> = endpoints.split(',').collect();
    let client = Client::connect(list, None).await.expect("connect");
    let store = EtcdStore::from_client(
        client,
        EtcdOptions::default().with_key_prefix(format!("{}own/", f.prefix())),
    )
    .expect("store");
    let lease = acquire(&store, &key("own-client")).await;
    let now = SystemClock.now();
    store
        .complete(&lease, b"ok", now.plus(Duration::from_secs(60)), now)
        .await
        .expect("complete");
    assert!(matches!(
        store.begin(&lease.key, None, deadlines(now), now).await,
        Ok(Begin::Completed { .. })
    ));
}
