//! Benchmarks: the barrier against the same work without it, from one run, as ratios.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem::postgres::sqlx::{self, PgPool};
use idem::postgres::{db_err, PgOperation, PgStore};
use idem::redis::{redis, redis_err, RedisOptions, RedisStore};
use idem::{Barrier, Error, Failure, Key, Started, Store, TxPolicy};

/// Throughput and latency of one measured loop.
#[derive(Clone, Copy, Debug)]
pub struct Measured {
    pub per_second: f64,
    pub p50: Duration,
    pub p99: Duration,
}

/// Runs `op` from `clients` concurrent tasks for `seconds`; `op(client, n)` is the n-th call
/// of a client.
pub async fn measure<F, Fut>(clients: usize, seconds: f64, op: F) -> Result<Measured, Error>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Error>> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (op, stop) = (Arc::clone(&op), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    op(c, n).await?;
                    latencies.push(t.elapsed());
                    n += 1;
                }
                Ok::<_, Error>(latencies)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(|e| Error::Config(e.to_string()))??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Measured {
        per_second: all.len() as f64 / elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
    })
}

fn row(label: &str, clients: usize, with: Measured, without: Measured) {
    println!(
        "{label:<46} {clients:>7} {:>12.0} {:>12.0} {:>7.2}x {:>9.2?} {:>9.2?}",
        with.per_second,
        without.per_second,
        with.per_second / without.per_second.max(1e-9),
        with.p50,
        with.p99
    );
}

fn header(title: &str, with: &str, without: &str) {
    println!("\n{title}");
    println!(
        "{:<46} {:>7} {:>12} {:>12} {:>8} {:>9} {:>9}",
        "measurement", "clients", with, without, "ratio", "p50", "p99"
    );
}

// ------------------------------------------------------------------ PostgreSQL

const SCHEMA: &str = "idem_bench";

async fn pg_setup(url: &str) -> Result<(PgPool, PgStore), Error> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(64)
        .connect(url)
        .await
        .map_err(db_err)?;
    sqlx::raw_sql(
        "DROP SCHEMA IF EXISTS idem_bench CASCADE;
         CREATE SCHEMA idem_bench;
         CREATE TABLE idem_bench.business (k TEXT PRIMARY KEY, amount BIGINT NOT NULL);",
    )
    .execute(&pool)
    .await
    .map_err(db_err)?;
    let store = PgStore::with_table(pool.clone(), &format!("{SCHEMA}.idem_records"))?;
    store.migrate().await?;
    Ok((pool, store))
}

fn business_op(k: String) -> PgOperation<i64, String, String> {
    Box::new(move |conn| {
        Box::pin(async move {
            sqlx::query("INSERT INTO idem_bench.business (k, amount) VALUES ($1, 100)")
                .bind(k)
                .execute(&mut *conn)
                .await
                .map_err(|e| Failure::Retryable(e.to_string()))?;
            Ok(100)
        })
    })
}

async fn bare_insert(
    pool: &PgPool,
    clients: usize,
    seconds: f64,
    tag: &'static str,
) -> Result<Measured, Error> {
    let pool = pool.clone();
    measure(clients, seconds, move |c, n| {
        let pool = pool.clone();
        async move {
            sqlx::query("INSERT INTO idem_bench.business (k, amount) VALUES ($1, 100)")
                .bind(format!("bare-{tag}-{c}-{n}"))
                .execute(&pool)
                .await
                .map_err(db_err)
                .map(drop)
        }
    })
    .await
}

/// The same insert in an explicit transaction (BEGIN; INSERT; COMMIT), as business code
/// that already uses a transaction runs it.
async fn insert_in_transaction(
    pool: &PgPool,
    clients: usize,
    seconds: f64,
    tag: &'static str,
) -> Result<Measured, Error> {
    let pool = pool.clone();
    measure(clients, seconds, move |c, n| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.map_err(db_err)?;
            sqlx::query("INSERT INTO idem_bench.business (k, amount) VALUES ($1, 100)")
                .bind(format!("txn-{tag}-{c}-{n}"))
                .execute(&mut *tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)
        }
    })
    .await
}

async fn tx_barrier(
    store: &PgStore,
    clients: usize,
    seconds: f64,
    tag: &'static str,
) -> Result<Measured, Error> {
    let barrier = Barrier::new(Arc::new(store.clone()));
    measure(clients, seconds, move |c, n| {
        let barrier = barrier.clone();
        async move {
            let id = format!("tx-{tag}-{c}-{n}");
            let key = Key::new("bench", id.clone())?;
            barrier
                .transaction(&key, None, TxPolicy::Wait, business_op(id))
                .await
                .map_err(|e| Error::Config(format!("{e}")))
                .map(drop)
        }
    })
    .await
}

async fn replay_vs_select(
    pool: &PgPool,
    store: &PgStore,
    clients: usize,
    seconds: f64,
) -> Result<(Measured, Measured), Error> {
    let barrier = Barrier::new(Arc::new(store.clone()));
    let keys: Vec<Key> = (0..256)
        .map(|i| Key::new("bench-replay", format!("k{i}")))
        .collect::<Result<_, _>>()?;
    for k in &keys {
        barrier
            .transaction(
                k,
                None,
                TxPolicy::Wait,
                business_op(format!("replay-{}", k.id())),
            )
            .await
            .map_err(|e| Error::Config(e.to_string()))?;
    }
    let keys = Arc::new(keys);
    let replay = {
        let (barrier, keys) = (barrier.clone(), Arc::clone(&keys));
        measure(clients, seconds, move |c, n| {
            let (barrier, keys) = (barrier.clone(), Arc::clone(&keys));
            async move {
                match barrier
                    .begin(&keys[(c * 31 + n as usize) % keys.len()], None)
                    .await?
                {
                    Started::Replay(_) => Ok(()),
                    Started::Acquired(_) => {
                        Err(Error::Config("a completed key was acquired".into()))
                    }
                }
            }
        })
        .await?
    };
    let pool = pool.clone();
    let select = measure(clients, seconds, move |c, n| {
        let pool = pool.clone();
        async move {
            sqlx::query("SELECT amount FROM idem_bench.business WHERE k = $1")
                .bind(format!("replay-k{}", (c * 31 + n as usize) % 256))
                .fetch_optional(&pool)
                .await
                .map_err(db_err)
                .map(drop)
        }
    })
    .await?;
    Ok((replay, select))
}

/// Empties the store and business tables, then stores `records` completed records.
async fn prefill(pool: &PgPool, records: u64) -> Result<(), Error> {
    sqlx::raw_sql("TRUNCATE idem_bench.idem_records, idem_bench.business")
        .execute(pool)
        .await
        .map_err(db_err)?;
    sqlx::query(
        "INSERT INTO idem_bench.idem_records (scope, id, fingerprint, state, token, lease_until, response,
                                              created_at, updated_at, expires_at)
         SELECT 'prefill', 'p' || g, NULL, 'completed', 1, NULL, '\\x0131'::bytea, 0, 0, 9000000000000
           FROM generate_series(1, $1) g ON CONFLICT DO NOTHING",
    )
    .bind(records as i64)
    .execute(pool)
    .await
    .map_err(db_err)?;
    sqlx::raw_sql("ANALYZE idem_bench.idem_records")
        .execute(pool)
        .await
        .map_err(db_err)?;
    Ok(())
}

/// The PostgreSQL benchmark: prints every measurement with its ratio.
pub async fn postgres(url: &str, seconds: f64) -> Result<(), Error> {
    let (pool, store) = pg_setup(url).await?;
    header(
        "PostgreSQL: business insert inside the transactional barrier vs the bare insert",
        "barrier/s",
        "bare/s",
    );
    for (clients, tag) in [(1, "c1"), (16, "c16"), (64, "c64")] {
        let bare = bare_insert(&pool, clients, seconds, tag).await?;
        let in_tx = insert_in_transaction(&pool, clients, seconds, tag).await?;
        let tx = tx_barrier(&store, clients, seconds, tag).await?;
        row("transactional barrier vs bare INSERT", clients, tx, bare);
        row(
            "transactional barrier vs BEGIN; INSERT; COMMIT",
            clients,
            tx,
            in_tx,
        );
    }

    header(
        "PostgreSQL: lease mode begin + complete (no business write)",
        "pairs/s",
        "bare/s",
    );
    let barrier = Barrier::new(Arc::new(store.clone()));
    let lease = measure(16, seconds, move |c, n| {
        let barrier = barrier.clone();
        async move {
            let key = Key::new("bench-lease", format!("{c}-{n}"))?;
            match barrier.begin(&key, None).await? {
                Started::Acquired(handle) => handle.complete(&1u8).await,
                Started::Replay(_) => Err(Error::Config("fresh key replayed".into())),
            }
        }
    })
    .await?;
    let bare = bare_insert(&pool, 16, seconds, "lease").await?;
    row("lease begin+complete vs bare INSERT", 16, lease, bare);

    header(
        "PostgreSQL: replay (begin on a completed key) vs a bare primary-key SELECT",
        "replay/s",
        "select/s",
    );
    let (replay, select) = replay_vs_select(&pool, &store, 16, seconds).await?;
    row("replay vs SELECT by primary key", 16, replay, select);

    for records in [1_000u64, 1_000_000] {
        prefill(&pool, records).await?;
        let stored = store.stats().await?.total();
        header(
            &format!("PostgreSQL with {stored} records stored"),
            "with/s",
            "without/s",
        );
        let tag: &'static str = if records == 1_000 { "k" } else { "m" };
        let bare = bare_insert(&pool, 16, seconds, tag).await?;
        let tx = tx_barrier(&store, 16, seconds, tag).await?;
        row("transactional barrier vs bare INSERT", 16, tx, bare);
        let (replay, select) = replay_vs_select(&pool, &store, 16, seconds).await?;
        row("replay vs SELECT by primary key", 16, replay, select);
    }
    sqlx::raw_sql("DROP SCHEMA idem_bench CASCADE")
        .execute(&pool)
        .await
        .map_err(db_err)?;
    Ok(())
}

// ------------------------------------------------------------------ Redis

/// The Redis benchmark: begin+complete pairs vs plain SET, replay vs plain GET.
pub async fn redis(url: &str, seconds: f64) -> Result<(), Error> {
    header(
        "Redis: begin + complete pairs vs plain SET (one connection per client)",
        "pairs/s",
        "SET/s",
    );
    let client = redis::Client::open(url).map_err(redis_err)?;
    for clients in [1usize, 16, 64] {
        let mut stores = Vec::new();
        let mut conns = Vec::new();
        for _ in 0..clients {
            let options = RedisOptions {
                key_prefix: "idem-bench:".into(),
                ..Default::default()
            };
            stores.push(Barrier::new(Arc::new(
                RedisStore::connect_with(url, options).await?,
            )));
            conns.push(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(redis_err)?,
            );
        }
        let stores = Arc::new(stores);
        let pairs = {
            let stores = Arc::clone(&stores);
            measure(clients, seconds, move |c, n| {
                let barrier = stores[c].clone();
                async move {
                    let key = Key::new("bench", format!("{clients}-{c}-{n}"))?;
                    match barrier.begin(&key, None).await? {
                        Started::Acquired(h) => h.complete(&1u8).await,
                        Started::Replay(_) => Err(Error::Config("fresh key replayed".into())),
                    }
                }
            })
            .await?
        };
        let conns = Arc::new(conns);
        let sets = {
            let conns = Arc::clone(&conns);
            measure(clients, seconds, move |c, n| {
                let mut conn = conns[c].clone();
                async move {
                    redis::cmd("SET")
                        .arg(format!("idem-bench:plain:{clients}-{c}-{n}"))
                        .arg(b"\x011")
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(redis_err)
                }
            })
            .await?
        };
        row("begin+complete vs SET", clients, pairs, sets);
        if clients == 16 {
            let replay_key = Key::new("bench", "replay")?;
            if let Started::Acquired(h) = stores[0].begin(&replay_key, None).await? {
                h.complete(&1u8).await?;
            }
            let replay = {
                let (stores, k) = (Arc::clone(&stores), replay_key.clone());
                measure(clients, seconds, move |c, _| {
                    let (barrier, k) = (stores[c].clone(), k.clone());
                    async move {
                        match barrier.begin(&k, None).await? {
                            Started::Replay(_) => Ok(()),
                            Started::Acquired(_) => {
                                Err(Error::Config("completed key acquired".into()))
                            }
                        }
                    }
                })
                .await?
            };
            let gets = {
                let conns = Arc::clone(&conns);
                measure(clients, seconds, move |c, _| {
                    let mut conn = conns[c].clone();
                    async move {
                        redis::cmd("GET")
                            .arg("idem-bench:plain:16-0-0")
                            .query_async::<Option<Vec<u8>>>(&mut conn)
                            .await
                            .map_err(redis_err)
                            .map(drop)
                    }
                })
                .await?
            };
            row(
                "replay (begin on a completed key) vs GET",
                clients,
                replay,
                gets,
            );
        }
    }
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(redis_err)?;
    crate::backend::unlink_matching(&mut conn, "idem-bench:*").await?;
    Ok(())
}
