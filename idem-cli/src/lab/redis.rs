//! The lab on Redis: ledger and naive keys under `idem-lab:`, beside the store's records.
//! Redis has no transactional mode.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem::redis::{redis, RedisOptions, RedisStore};
use idem::{DynStore, Error};

use super::{lab_key, LabBackend, Ledger, Leg, Tally};

pub struct RedisLab {
    store: RedisStore,
    prefix: String,
}

impl RedisLab {
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let prefix = "idem-lab:".to_string();
        let options = RedisOptions::default().with_key_prefix(format!("{prefix}records:"))?;
        Ok(RedisLab {
            store: RedisStore::connect_with(url, options).await?,
            prefix,
        })
    }

    fn conn(&self) -> idem::redis::RedisConnection {
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
            .map_err(Error::retryable)?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(conn)
                .await
                .map_err(Error::retryable)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

#[async_trait]
impl Ledger for RedisLab {
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
            .map_err(Error::retryable)?;
        Ok(())
    }

    async fn naive_seen(&self, strategy: &str, key: &str) -> Result<bool, Error> {
        let n: i64 = redis::cmd("EXISTS")
            .arg(format!("{}naive:{}", self.prefix, lab_key(strategy, key)))
            .query_async(&mut self.conn())
            .await
            .map_err(Error::retryable)?;
        Ok(n == 1)
    }

    async fn naive_mark(&self, strategy: &str, key: &str) -> Result<(), Error> {
        redis::cmd("SET")
            .arg(format!("{}naive:{}", self.prefix, lab_key(strategy, key)))
            .arg(1)
            .query_async::<()>(&mut self.conn())
            .await
            .map_err(Error::retryable)
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
            .map_err(Error::retryable)?;
        Ok(claimed == 1)
    }

    async fn tally(&self, strategy: &str) -> Result<Vec<Tally>, Error> {
        let mut conn = self.conn();
        let payments: Vec<String> = redis::cmd("SMEMBERS")
            .arg(format!("{}payments:{strategy}", self.prefix))
            .query_async(&mut conn)
            .await
            .map_err(Error::retryable)?;
        let mut out = Vec::new();
        for payment in payments {
            let (d, c): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
                .arg(format!("{}ledger:{strategy}:{payment}", self.prefix))
                .arg("debit")
                .arg("credit")
                .query_async(&mut conn)
                .await
                .map_err(Error::retryable)?;
            out.push(Tally {
                payment,
                debits: d.unwrap_or(0),
                credits: c.unwrap_or(0),
            });
        }
        Ok(out)
    }
}

#[async_trait]
impl LabBackend for RedisLab {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn store(&self) -> DynStore {
        Arc::new(self.store.clone())
    }

    fn ledger(&self) -> &dyn Ledger {
        self
    }
}
