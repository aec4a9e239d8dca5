//! Every row of the crate's error table that a real server can be made to produce:
//! corrupt records and `WRONGTYPE` on the shared server; `LOADING`, `BUSY`, `READONLY`,
//! authentication, a client pause, a dropped connection and a restart on private servers
//! (ports 26380-26389).

mod common;

use std::time::Duration;

use common::{PrivateServer, Shared};
use idem_core::{Begin, Clock, Deadlines, Error, Key, State, Store, SystemClock, Timestamp};
use idem_redis::{RedisOptions, RedisStore};

const LEASE: Duration = Duration::from_secs(60);

fn deadlines(now: Timestamp) -> Deadlines {
    Deadlines {
        lease_until: now.plus(LEASE),
        expires_at: now.plus(LEASE * 10),
    }
}

async fn begin(store: &RedisStore, key: &Key) -> Result<Begin, Error> {
    let now = SystemClock.now();
    store.begin(key, None, deadlines(now), now).await
}

/// Asserts a `begin` of `id` acquires it.
async fn assert_acquires(store: &RedisStore, id: &str) {
    let r = begin(store, &key(id)).await;
    assert!(matches!(r, Ok(Begin::Acquired(_))), "{id}: {r:?}");
}

fn key(id: &str) -> Key {
    Key::new("errors", id).expect("a valid key")
}

/// Asserts `r` is a retryable store error whose cause chain mentions `needle`.
fn assert_retryable<T: std::fmt::Debug>(r: Result<T, Error>, needle: &str) {
    match r {
        Err(e) => {
            assert!(e.is_retryable(), "expected retryable, got {e}");
            assert!(
                e.to_string()
                    .to_lowercase()
                    .contains(&needle.to_lowercase()),
                "{needle:?} not in {e}"
            );
        }
        Ok(v) => panic!("expected a retryable {needle} error, got {v:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_permanent_and_name_their_key() {
    let Some(mut shared) = Shared::open("corrupt").await else {
        return;
    };
    let store = shared.store(shared.options("")).await;
    // (name, redis commands that damage a completed record, whether it was in progress).
    // The record is one string: a 60-byte header (offsets in `src/record.rs`), then the
    // fingerprint, the too-large note and the outcome.
    type Damage = (&'static str, Vec<Vec<&'static [u8]>>, bool);
    let cases: Vec<Damage> = vec![
        (
            "token-zero",
            vec![vec![b"SETRANGE", b"2", &[0u8; 8]]],
            false,
        ),
        (
            "token-negative",
            vec![vec![b"SETRANGE", b"2", &[0xffu8; 8]]],
            false,
        ),
        (
            "fingerprint-31",
            vec![vec![b"SETRANGE", b"1", &[31u8]]],
            false,
        ),
        (
            "version-unknown",
            vec![vec![b"SETRANGE", b"0", b"\x02"]],
            false,
        ),
        ("state-unknown", vec![vec![b"SETRANGE", b"26", b"a"]], false),
        (
            "state-binary",
            vec![vec![b"SETRANGE", b"26", b"\xff"]],
            false,
        ),
        ("change-unknown", vec![vec![b"SETRANGE", b"27", b"?"]], true),
        // The outcome length says 9 bytes; 5 are stored.
        (
            "outcome-cut",
            vec![vec![b"SETRANGE", b"56", b"\x00\x00\x00\x09"]],
            false,
        ),
        ("trailing-byte", vec![vec![b"APPEND", b"z"]], false),
        (
            "shorter-than-header",
            vec![vec![b"SET", b"\x01\x00"]],
            false,
        ),
        // A consistent length, but an in-progress record holding an outcome.
        (
            "in-progress-outcome",
            vec![vec![b"SETRANGE", b"59", b"\x01"], vec![b"APPEND", b"z"]],
            true,
        ),
        // A hash, as idem-redis wrote records before the string encoding.
        (
            "wrong-type",
            vec![
                vec![b"DEL"],
                vec![b"HSET", b"st", b"completed", b"tok", b"1"],
            ],
            false,
        ),
    ];
    for (id, damage, in_progress) in &cases {
        let k = key(id);
        let Begin::Acquired(lease) = begin(&store, &k).await.unwrap() else {
            panic!("{id}: fresh key not acquired")
        };
        if !in_progress {
            let now = SystemClock.now();
            store
                .complete(&lease, b"\x01\"ok\"", now.plus(LEASE), now)
                .await
                .unwrap();
        }
        damage_record(&mut shared, id, damage).await;
        let calls = vec![
            ("get", store.get(&k).await.map(drop)),
            ("begin", begin(&store, &k).await.map(drop)),
        ];
        for (call, result) in calls {
            assert_corrupt(id, call, &k, result);
        }
    }
    // The fenced calls refuse to write over an in-progress record they cannot read.
    let id = "fenced-version-unknown";
    let k = key(id);
    let Begin::Acquired(lease) = begin(&store, &k).await.unwrap() else {
        panic!("{id}: fresh key not acquired")
    };
    damage_record(&mut shared, id, &[vec![b"SETRANGE", b"0", b"\x02"]]).await;
    let now = SystemClock.now();
    let calls = vec![
        (
            "complete",
            store.complete(&lease, b"\x01", now.plus(LEASE), now).await,
        ),
        (
            "extend",
            store.extend(&lease, deadlines(now), now).await.map(drop),
        ),
        ("release", store.release(&lease, now).await),
    ];
    for (call, result) in calls {
        assert_corrupt(id, call, &k, result);
    }
    let stats = store.stats().await;
    assert!(matches!(stats, Err(Error::Corrupt { .. })), "{stats:?}");
    // Purge keeps what it cannot read (and deletes nothing inside retention).
    assert_eq!(store.purge(SystemClock.now(), 1000).await.unwrap(), 0);
    shared.cleanup().await;
}

/// Runs `damage` (commands without their key) on the record of `id`.
async fn damage_record(shared: &mut Shared, id: &str, damage: &[Vec<&[u8]>]) {
    // The record's Redis key: the only key of this test run naming the id.
    let pattern = format!("{}*.{}}}", shared.prefix, hex_id(id));
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut shared.admin)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{id}: {keys:?}");
    for command in damage {
        let mut cmd = redis::cmd(std::str::from_utf8(command[0]).unwrap());
        cmd.arg(&keys[0]);
        for arg in &command[1..] {
            cmd.arg(*arg);
        }
        let _: redis::Value = cmd.query_async(&mut shared.admin).await.unwrap();
    }
}

/// Asserts `result` (of `call` on `key`) is a permanent `Corrupt` naming the key.
fn assert_corrupt(id: &str, call: &str, key: &Key, result: Result<(), Error>) {
    match result {
        Err(e @ Error::Corrupt { .. }) => {
            assert!(!e.is_retryable(), "{id} {call}: {e}");
            assert!(
                matches!(&e, Error::Corrupt { key: Some(named), .. } if *named == key.to_string()),
                "{id} {call}: {e:?}"
            );
        }
        other => panic!("{id} {call}: expected Corrupt naming the key, got {other:?}"),
    }
}

fn hex_id(id: &str) -> String {
    id.bytes().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_is_retryable() {
    let Some(server) = PrivateServer::start(
        26380,
        &[
            "--enable-debug-command",
            "yes",
            "--loading-process-events-interval-bytes",
            "1024",
        ],
    )
    .await
    else {
        return;
    };
    let store = RedisStore::connect(&server.url()).await.unwrap();
    // An administrative connection that waits as long as DEBUG takes.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let _: () = redis::cmd("DEBUG")
        .arg("POPULATE")
        .arg(20_000)
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("key-load-delay")
        .arg(100)
        .query_async(&mut admin)
        .await
        .unwrap();
    // DEBUG RELOAD saves and loads the dataset again, slowly, answering LOADING meanwhile.
    let reload = tokio::spawn(async move {
        redis::cmd("DEBUG")
            .arg("RELOAD")
            .query_async::<()>(&mut admin)
            .await
    });
    let mut loading_seen = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        match begin(&store, &key("loading")).await {
            Err(e) if e.to_string().to_lowercase().contains("loading") => {
                assert!(e.is_retryable(), "{e}");
                loading_seen = true;
                break;
            }
            Ok(Begin::Acquired(lease)) => {
                // Before the load began: give the key back and try again.
                store.release(&lease, SystemClock.now()).await.unwrap();
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(loading_seen, "the server never answered LOADING");
    reload.await.unwrap().unwrap();
    assert_acquires(&store, "loading").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_script_is_retryable() {
    let Some(server) = PrivateServer::start(26381, &["--busy-reply-threshold", "100"]).await else {
        return;
    };
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut runner = server.admin().await;
    // Opened before the script runs: a new connection's PING would be answered BUSY.
    let mut admin = server.admin().await;
    let busy = tokio::spawn(async move {
        redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query_async::<()>(&mut runner)
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_retryable(begin(&store, &key("busy")).await, "BUSY");
    let _: () = redis::cmd("SCRIPT")
        .arg("KILL")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(busy.await.unwrap().is_err(), "the killed script reports it");
    assert_acquires(&store, "busy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replica_is_retryable_until_promoted() {
    let Some(primary) = PrivateServer::start(26382, &[]).await else {
        return;
    };
    let Some(replica) = PrivateServer::start(26383, &["--replicaof", "127.0.0.1", "26382"]).await
    else {
        return;
    };
    let store = RedisStore::connect(&replica.url()).await.unwrap();
    assert_retryable(begin(&store, &key("replica")).await, "READONLY");
    let mut admin = replica.admin().await;
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_acquires(&store, "replica").await;
    drop(primary);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_errors_are_permanent() {
    let Some(server) = PrivateServer::start(26386, &["--requirepass", "sesame"]).await else {
        return;
    };
    let wrong = format!("redis://:wrong@127.0.0.1:{}/", server.port);
    match RedisStore::connect(&wrong).await {
        Err(e) => assert!(!e.is_retryable(), "{e}"),
        Ok(_) => panic!("a wrong password connected"),
    }
    // Without a password the connection opens and every command is refused.
    if let Ok(store) = RedisStore::connect(&server.url()).await {
        let r = begin(&store, &key("auth")).await;
        assert!(
            matches!(&r, Err(e @ Error::Store { retryable: false, .. }) if e.to_string().contains("NOAUTH")),
            "{r:?}"
        );
    }
    let right = format!("redis://:sesame@127.0.0.1:{}/", server.port);
    let store = RedisStore::connect(&right).await.unwrap();
    assert_acquires(&store, "auth").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_longer_than_the_response_timeout_strands_no_claim() {
    let Some(server) = PrivateServer::start(26384, &[]).await else {
        return;
    };
    let options = RedisOptions::default().with_response_timeout(Duration::from_millis(300));
    let store = RedisStore::connect_with(&server.url(), options)
        .await
        .unwrap();
    let mut admin = server.admin().await;
    let pause = |ms: u64| {
        let mut cmd = redis::cmd("CLIENT");
        cmd.arg("PAUSE").arg(ms).arg("WRITE");
        cmd
    };

    // A pause a little longer than one timeout: the reissued call finds its own claim.
    let _: () = pause(450).query_async(&mut admin).await.unwrap();
    let k = key("short-pause");
    match begin(&store, &k).await {
        Ok(Begin::Acquired(lease)) => assert_eq!(lease.token.0, 1),
        other => panic!("the reissued begin should recognise its claim: {other:?}"),
    }
    let record = store.get(&k).await.unwrap().expect("claimed");
    assert_eq!(record.token.0, 1, "one claim, not two: {record:?}");

    // A pause longer than both attempts: the call fails, retryable, and once the server
    // runs again its claim (which did land) is given back instead of holding the key for
    // the whole 60 s lease.
    let _: () = pause(1500).query_async(&mut admin).await.unwrap();
    let k = key("long-pause");
    let r = begin(&store, &k).await;
    assert!(matches!(&r, Err(e) if e.is_retryable()), "{r:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut state = None;
    for _ in 0..40 {
        state = store.get(&k).await.unwrap().map(|r| r.state);
        if matches!(
            state,
            Some(State::InProgress {
                lease_until: Timestamp::MIN,
                ..
            })
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        matches!(
            state,
            Some(State::InProgress {
                lease_until: Timestamp::MIN,
                ..
            })
        ),
        "the landed claim is released: {state:?}"
    );
    match begin(&store, &k).await {
        Ok(Begin::Acquired(lease)) => assert!(!lease.reclaimed && lease.token.0 == 2),
        other => panic!("the key is free at once: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_and_restarts_are_retryable() {
    let Some(server) = PrivateServer::start(26385, &[]).await else {
        return;
    };
    let store = RedisStore::connect(&server.url()).await.unwrap();
    assert_acquires(&store, "before").await;
    let mut admin = server.admin().await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(killed >= 1);
    // The dropped connection is noticed, the call reissued on a new one.
    assert_acquires(&store, "after-kill").await;

    let mut server = server;
    server.kill().await;
    let r = begin(&store, &key("down")).await;
    assert!(matches!(&r, Err(e) if e.is_retryable()), "{r:?}");
    let _server = server.restart(&[]).await.expect("restarted");
    let mut answered = None;
    for _ in 0..50 {
        match begin(&store, &key("down")).await {
            Ok(answer) => {
                answered = Some(answer);
                break;
            }
            Err(e) => assert!(e.is_retryable(), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(answered, Some(Begin::Acquired(_))), "{answered:?}");
}
