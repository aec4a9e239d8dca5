//! The lab's backends: where the ledger, the naive strategies' keys and the barrier's
//! records live. Every strategy writes real rows on the real backend.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem::postgres::sqlx::{self, PgPool};
use idem::postgres::PgStore;
use idem::redis::{redis, RedisStore};
use idem::sqlite::{rusqlite, SqliteStore};
use idem::{
    Barrier, DynStore, Error, Failure, Fingerprint, Key, ManualClock, Response, RunError, TxPolicy,
};

/// A leg of a payment: the debit of the customer and the credit of the merchant.
#[derive(Clone, Copy, Debug)]
pub enum Leg {
    Debit,
    Credit,
}

impl Leg {
    pub fn name(self) -> &'static str {
        match self {
            Leg::Debit => "debit",
            Leg::Credit => "credit",
        }
    }
}

/// Rows per payment found in a strategy's ledger.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub payment: String,
    pub debits: u64,
    pub credits: u64,
}

/// What the transactional strategy does inside the store's transaction.
#[derive(Clone, Debug)]
pub struct TxPayment {
    pub strategy: &'static str,
    pub payment: String,
    pub amount: i64,
    pub latency: Duration,
    /// The worker dies between the two legs: the transaction never commits.
    pub crash: bool,
    /// Counts every start of the operation's body (FoundationDB may run it more than once).
    pub executions: Arc<AtomicU64>,
}

pub type TxAnswer = Result<Response<i64, String>, RunError<String>>;

#[async_trait]
pub trait LabBackend: Send + Sync {
    /// The backend's name in the report.
    fn name(&self) -> &'static str;
    /// The barrier's store (lease mode).
    fn store(&self) -> DynStore;
    /// Clears everything the lab wrote before.
    async fn reset(&self) -> Result<(), Error>;
    /// Writes one ledger row; with `dedup`, a second row with the same dedup key is ignored
    /// (how a downstream system deduplicates on an idempotency key).
    async fn insert(
        &self,
        strategy: &str,
        payment: &str,
        leg: Leg,
        amount: i64,
        dedup: Option<&str>,
    ) -> Result<(), Error>;
    /// Check-then-insert: is the key recorded?
    async fn naive_seen(&self, strategy: &str, key: &str) -> Result<bool, Error>;
    /// Check-then-insert: record the key.
    async fn naive_mark(&self, strategy: &str, key: &str) -> Result<(), Error>;
    /// TTL cache: set the key if it is absent or expired (`SET NX EX`), atomically.
    async fn ttl_claim(
        &self,
        strategy: &str,
        key: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<bool, Error>;
    /// The ledger, per payment.
    async fn tally(&self, strategy: &str) -> Result<Vec<Tally>, Error>;
    /// The transactional barrier; `None` if the backend has none (its store does not
    /// declare `transactional`).
    async fn transactional(
        &self,
        clock: &ManualClock,
        key: &Key,
        fp: Fingerprint,
        p: TxPayment,
    ) -> Option<TxAnswer>;
}

fn lab_key(strategy: &str, key: &str) -> String {
    format!("{strategy}/{key}")
}

// ------------------------------------------------------------------ SQLite

pub struct SqliteLab {
    store: SqliteStore,
}

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS lab_ledger (strategy TEXT NOT NULL, payment TEXT NOT NULL, leg TEXT NOT NULL,
                                       amount INTEGER NOT NULL, dedup TEXT UNIQUE);
CREATE TABLE IF NOT EXISTS lab_naive_keys (k TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS lab_ttl_keys (k TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
";

impl SqliteLab {
    pub async fn open(path: &std::path::Path) -> Result<Self, Error> {
        let store = SqliteStore::open(path).await?;
        store
            .with_connection(|c| c.execute_batch(SQLITE_SCHEMA))
            .await?;
        Ok(SqliteLab { store })
    }
}

fn sqlite_insert(
    c: &rusqlite::Connection,
    strategy: &str,
    payment: &str,
    leg: Leg,
    amount: i64,
    dedup: Option<&str>,
) -> rusqlite::Result<usize> {
    c.execute(
        "INSERT INTO lab_ledger (strategy, payment, leg, amount, dedup) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (dedup) DO NOTHING",
        rusqlite::params![strategy, payment, leg.name(), amount, dedup],
    )
}

#[async_trait]
impl LabBackend for SqliteLab {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn store(&self) -> DynStore {
        Arc::new(self.store.clone())
    }

    async fn reset(&self) -> Result<(), Error> {
        self.store
            .with_connection(|c| c.execute_batch("DELETE FROM lab_ledger; DELETE FROM lab_naive_keys; DELETE FROM lab_ttl_keys; DELETE FROM idem_records;"))
            .await
    }

    async fn insert(
        &self,
        strategy: &str,
        payment: &str,
        leg: Leg,
        amount: i64,
        dedup: Option<&str>,
    ) -> Result<(), Error> {
        let (s, p, d) = (
            strategy.to_string(),
            payment.to_string(),
            dedup.map(str::to_string),
        );
        self.store
            .with_connection(move |c| sqlite_insert(c, &s, &p, leg, amount, d.as_deref()).map(drop))
            .await
    }

    async fn naive_seen(&self, strategy: &str, key: &str) -> Result<bool, Error> {
        let k = lab_key(strategy, key);
        self.store
            .with_connection(move |c| {
                c.query_row(
                    "SELECT COUNT(*) FROM lab_naive_keys WHERE k = ?1",
                    [k],
                    |r| r.get::<_, i64>(0),
                )
            })
            .await
            .map(|n| n > 0)
    }

    async fn naive_mark(&self, strategy: &str, key: &str) -> Result<(), Error> {
        let k = lab_key(strategy, key);
        self.store
            .with_connection(move |c| {
                c.execute("INSERT OR IGNORE INTO lab_naive_keys (k) VALUES (?1)", [k])
                    .map(drop)
            })
            .await
    }

    async fn ttl_claim(
        &self,
        strategy: &str,
        key: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<bool, Error> {
        let k = lab_key(strategy, key);
        let until = now_ms + ttl.as_millis() as i64;
        self.store
            .with_connection(move |c| {
                c.execute(
                    "INSERT INTO lab_ttl_keys (k, expires_at) VALUES (?1, ?2)
                     ON CONFLICT (k) DO UPDATE SET expires_at = excluded.expires_at
                     WHERE lab_ttl_keys.expires_at <= ?3",
                    rusqlite::params![k, until, now_ms],
                )
            })
            .await
            .map(|n| n == 1)
    }

    async fn tally(&self, strategy: &str) -> Result<Vec<Tally>, Error> {
        let s = strategy.to_string();
        self.store
            .with_connection(move |c| {
                let mut stmt = c.prepare(
                    "SELECT payment, SUM(leg = 'debit'), SUM(leg = 'credit') FROM lab_ledger
                      WHERE strategy = ?1 GROUP BY payment",
                )?;
                let rows = stmt.query_map([s], |r| {
                    Ok(Tally {
                        payment: r.get(0)?,
                        debits: r.get::<_, i64>(1)? as u64,
                        credits: r.get::<_, i64>(2)? as u64,
                    })
                })?;
                rows.collect()
            })
            .await
    }

    async fn transactional(
        &self,
        clock: &ManualClock,
        key: &Key,
        fp: Fingerprint,
        p: TxPayment,
    ) -> Option<TxAnswer> {
        let barrier =
            Barrier::new(Arc::new(self.store.clone())).with_clock(Arc::new(clock.clone()));
        let op = Box::new(move |tx: &rusqlite::Transaction<'_>| {
            p.executions.fetch_add(1, Ordering::Relaxed);
            let fail = |e: rusqlite::Error| Failure::Retryable(e.to_string());
            sqlite_insert(tx, p.strategy, &p.payment, Leg::Debit, p.amount, None).map_err(fail)?;
            std::thread::sleep(p.latency);
            if p.crash {
                return Err(Failure::Retryable("worker died before commit".to_string()));
            }
            sqlite_insert(tx, p.strategy, &p.payment, Leg::Credit, p.amount, None).map_err(fail)?;
            Ok(p.amount)
        });
        Some(barrier.transaction(key, Some(fp), TxPolicy::Wait, op).await)
    }
}

// ------------------------------------------------------------------ PostgreSQL

pub struct PgLab {
    store: PgStore,
}

const PG_SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS idem_lab;
CREATE TABLE IF NOT EXISTS idem_lab.ledger (strategy TEXT NOT NULL, payment TEXT NOT NULL, leg TEXT NOT NULL,
                                            amount BIGINT NOT NULL, dedup TEXT UNIQUE);
CREATE TABLE IF NOT EXISTS idem_lab.naive_keys (k TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS idem_lab.ttl_keys (k TEXT PRIMARY KEY, expires_at BIGINT NOT NULL);
";

const PG_INSERT: &str = "INSERT INTO idem_lab.ledger (strategy, payment, leg, amount, dedup) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (dedup) DO NOTHING";

impl PgLab {
    pub async fn connect(url: &str, pool_size: u32) -> Result<Self, Error> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(Duration::from_secs(60))
            .connect(url)
            .await
            .map_err(idem::postgres::db_err)?;
        sqlx::raw_sql(PG_SCHEMA)
            .execute(&pool)
            .await
            .map_err(idem::postgres::db_err)?;
        let store = PgStore::with_table(pool, "idem_lab.idem_records")?;
        store.migrate().await?;
        Ok(PgLab { store })
    }

    fn pool(&self) -> &PgPool {
        self.store.pool()
    }
}

#[async_trait]
impl LabBackend for PgLab {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn store(&self) -> DynStore {
        Arc::new(self.store.clone())
    }

    async fn reset(&self) -> Result<(), Error> {
        sqlx::raw_sql("TRUNCATE idem_lab.ledger, idem_lab.naive_keys, idem_lab.ttl_keys, idem_lab.idem_records")
            .execute(self.pool())
            .await
            .map_err(idem::postgres::db_err)
            .map(drop)
    }

    async fn insert(
        &self,
        strategy: &str,
        payment: &str,
        leg: Leg,
        amount: i64,
        dedup: Option<&str>,
    ) -> Result<(), Error> {
        sqlx::query(PG_INSERT)
            .bind(strategy)
            .bind(payment)
            .bind(leg.name())
            .bind(amount)
            .bind(dedup)
            .execute(self.pool())
            .await
            .map_err(idem::postgres::db_err)
            .map(drop)
    }

    async fn naive_seen(&self, strategy: &str, key: &str) -> Result<bool, Error> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM idem_lab.naive_keys WHERE k = $1")
            .bind(lab_key(strategy, key))
            .fetch_one(self.pool())
            .await
            .map_err(idem::postgres::db_err)?;
        Ok(n > 0)
    }

    async fn naive_mark(&self, strategy: &str, key: &str) -> Result<(), Error> {
        sqlx::query("INSERT INTO idem_lab.naive_keys (k) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(lab_key(strategy, key))
            .execute(self.pool())
            .await
            .map_err(idem::postgres::db_err)
            .map(drop)
    }

    async fn ttl_claim(
        &self,
        strategy: &str,
        key: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<bool, Error> {
        let done = sqlx::query(
            "INSERT INTO idem_lab.ttl_keys AS t (k, expires_at) VALUES ($1, $2)
             ON CONFLICT (k) DO UPDATE SET expires_at = EXCLUDED.expires_at WHERE t.expires_at <= $3",
        )
        .bind(lab_key(strategy, key))
        .bind(now_ms + ttl.as_millis() as i64)
        .bind(now_ms)
        .execute(self.pool())
        .await
        .map_err(idem::postgres::db_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn tally(&self, strategy: &str) -> Result<Vec<Tally>, Error> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT payment, COUNT(*) FILTER (WHERE leg = 'debit'), COUNT(*) FILTER (WHERE leg = 'credit')
               FROM idem_lab.ledger WHERE strategy = $1 GROUP BY payment",
        )
        .bind(strategy)
        .fetch_all(self.pool())
        .await
        .map_err(idem::postgres::db_err)?;
        Ok(rows
            .into_iter()
            .map(|(payment, d, c)| Tally {
                payment,
                debits: d as u64,
                credits: c as u64,
            })
            .collect())
    }

    async fn transactional(
        &self,
        clock: &ManualClock,
        key: &Key,
        fp: Fingerprint,
        p: TxPayment,
    ) -> Option<TxAnswer> {
        let barrier =
            Barrier::new(Arc::new(self.store.clone())).with_clock(Arc::new(clock.clone()));
        let op: idem::postgres::PgOperation<i64, String, String> = Box::new(move |conn| {
            Box::pin(async move {
                p.executions.fetch_add(1, Ordering::Relaxed);
                let fail = |e: sqlx::Error| Failure::Retryable(e.to_string());
                let insert = |leg: Leg| {
                    sqlx::query(PG_INSERT)
                        .bind(p.strategy)
                        .bind(p.payment.clone())
                        .bind(leg.name())
                        .bind(p.amount)
                        .bind(None::<String>)
                };
                insert(Leg::Debit).execute(&mut *conn).await.map_err(fail)?;
                tokio::time::sleep(p.latency).await;
                if p.crash {
                    return Err(Failure::Retryable("worker died before commit".to_string()));
                }
                insert(Leg::Credit)
                    .execute(&mut *conn)
                    .await
                    .map_err(fail)?;
                Ok(p.amount)
            })
        });
        Some(barrier.transaction(key, Some(fp), TxPolicy::Wait, op).await)
    }
}

// ------------------------------------------------------------------ Redis

pub struct RedisLab {
    store: RedisStore,
    prefix: String,
}

impl RedisLab {
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let prefix = "idem-lab:".to_string();
        let options = idem::redis::RedisOptions {
            key_prefix: format!("{prefix}records:"),
            ..Default::default()
        };
        Ok(RedisLab {
            store: RedisStore::connect_with(url, options).await?,
            prefix,
        })
    }

    fn conn(&self) -> redis::aio::ConnectionManager {
        self.store.connection()
    }
}

/// Deletes every key matching `pattern`, a `SCAN` page at a time (a single `KEYS` over
/// millions of keys would block the server).
pub async fn unlink_matching(
    conn: &mut impl redis::aio::ConnectionLike,
    pattern: &str,
) -> Result<(), Error> {
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await
            .map_err(redis_err)?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(conn)
                .await
                .map_err(redis_err)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

fn redis_err(e: redis::RedisError) -> Error {
    idem::redis::redis_err(e)
}

#[async_trait]
impl LabBackend for RedisLab {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn store(&self) -> DynStore {
        Arc::new(self.store.clone())
    }

    async fn reset(&self) -> Result<(), Error> {
        unlink_matching(&mut self.conn(), &format!("{}*", self.prefix)).await
    }

    async fn insert(
        &self,
        strategy: &str,
        payment: &str,
        leg: Leg,
        amount: i64,
        dedup: Option<&str>,
    ) -> Result<(), Error> {
        // One script: the dedup check and the ledger write are atomic, as a downstream
        // service with a unique index would be.
        let script = redis::Script::new(
            "if ARGV[1] ~= '' and redis.call('SET', KEYS[2], '1', 'NX') == false then return 0 end
             redis.call('HINCRBY', KEYS[1], ARGV[2], 1) redis.call('HINCRBY', KEYS[1], ARGV[2] .. '_amount', ARGV[4])
             redis.call('SADD', KEYS[3], ARGV[3]) return 1",
        );
        let _: i64 = script
            .key(format!("{}ledger:{strategy}:{payment}", self.prefix))
            .key(format!("{}dedup:{}", self.prefix, dedup.unwrap_or("")))
            .key(format!("{}payments:{strategy}", self.prefix))
            .arg(dedup.unwrap_or(""))
            .arg(leg.name())
            .arg(payment)
            .arg(amount)
            .invoke_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn naive_seen(&self, strategy: &str, key: &str) -> Result<bool, Error> {
        let n: i64 = redis::cmd("EXISTS")
            .arg(format!("{}naive:{}", self.prefix, lab_key(strategy, key)))
            .query_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        Ok(n == 1)
    }

    async fn naive_mark(&self, strategy: &str, key: &str) -> Result<(), Error> {
        redis::cmd("SET")
            .arg(format!("{}naive:{}", self.prefix, lab_key(strategy, key)))
            .arg(1)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(redis_err)
    }

    async fn ttl_claim(
        &self,
        strategy: &str,
        key: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<bool, Error> {
        // `SET NX PX`, with the expiry judged on the lab's clock so it can jump 26 hours.
        let script = redis::Script::new(
            "local e = redis.call('GET', KEYS[1])
             if e and tonumber(e) > tonumber(ARGV[1]) then return 0 end
             redis.call('SET', KEYS[1], ARGV[2]) return 1",
        );
        let claimed: i64 = script
            .key(format!("{}ttl:{}", self.prefix, lab_key(strategy, key)))
            .arg(now_ms)
            .arg(now_ms + ttl.as_millis() as i64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(redis_err)?;
        Ok(claimed == 1)
    }

    async fn tally(&self, strategy: &str) -> Result<Vec<Tally>, Error> {
        let mut conn = self.conn();
        let payments: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{}payments:{strategy}", self.prefix))
            .query_async(&mut conn)
            .await
            .map_err(redis_err)?;
        let mut out = Vec::new();
        for payment in payments {
            let (d, c): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
                .arg(format!("{}ledger:{strategy}:{payment}", self.prefix))
                .arg("debit")
                .arg("credit")
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            out.push(Tally {
                payment,
                debits: d.unwrap_or(0),
                credits: c.unwrap_or(0),
            });
        }
        Ok(out)
    }

    async fn transactional(
        &self,
        _: &ManualClock,
        _: &Key,
        _: Fingerprint,
        _: TxPayment,
    ) -> Option<TxAnswer> {
        None
    }
}
