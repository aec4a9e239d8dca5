#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

use std::time::Duration;

use async_trait::async_trait;
use idem_core::{
    Begin, Deadlines, Error, Fingerprint, Guarantees, Key, Lease, Record, RecordRow, Stats, Store,
    Timestamp, Token,
};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RetryMethod, Script};

pub use redis;

/// The deadline a released lease carries (`Timestamp::MIN`), as the scripts write it.
const RELEASED: &str = "-9223372036854775808";

/// Options for [`RedisStore::connect_with`].
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// Prefix of every key this store writes. Default `idem:`.
    pub key_prefix: String,
    /// How long after a record's `expires_at` Redis deletes it by itself (its `PEXPIRE`),
    /// in case `purge` is never run. Records never expire at lease time. Default 1 hour.
    pub ttl_grace: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            key_prefix: "idem:".into(),
            ttl_grace: Duration::from_secs(3600),
        }
    }
}

/// A best-effort idempotency store on Redis.
///
/// Each of `begin`, `complete`, `fail`, `extend` and `release` is one Lua script (one round
/// trip, `EVALSHA` with a load on `NOSCRIPT`), atomic on the primary. See the crate docs for
/// what Redis can lose.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    options: RedisOptions,
    scripts: &'static Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

struct Scripts {
    begin: Script,
    finish: Script,
    extend: Script,
    release: Script,
    purge_one: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        // ARGV: fingerprint ('' for none), lease_until, now, expires_at, ttl_grace_ms
        begin: Script::new(&format!(
            r#"
local r = redis.call('HMGET', KEYS[1], 'st', 'tok', 'lu', 'fp', 'resp', 'ea')
if not r[1] then
  redis.call('HSET', KEYS[1], 'st', 'in_progress', 'tok', '1', 'lu', ARGV[2],
             'ca', ARGV[3], 'ua', ARGV[3], 'ea', ARGV[4])
  if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'fp', ARGV[1]) end
  redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(ARGV[4]) - tonumber(ARGV[3]) + tonumber(ARGV[5])))
  return {{'acquired', '1', '0'}}
end
if r[4] and ARGV[1] ~= '' and r[4] ~= ARGV[1] then return {{'mismatch'}} end
if r[1] == 'completed' or r[1] == 'failed' then return {{r[1], r[5]}} end
if r[1] ~= 'in_progress' then return {{'unknown', r[1]}} end
if tonumber(r[3]) > tonumber(ARGV[3]) then return {{'in_progress', r[3]}} end
local tok = tostring(tonumber(r[2]) + 1)
local ea = r[6]
if tonumber(ARGV[4]) > tonumber(ea) then ea = ARGV[4] end
redis.call('HSET', KEYS[1], 'tok', tok, 'lu', ARGV[2], 'ua', ARGV[3], 'ea', ea)
if not r[4] and ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'fp', ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(ea) - tonumber(ARGV[3]) + tonumber(ARGV[5])))
local reclaimed = '1'
if r[3] == '{RELEASED}' then reclaimed = '0' end
return {{'acquired', tok, reclaimed}}
"#
        )),
        // ARGV: token, state, response, expires_at, now, ttl_grace_ms
        finish: Script::new(&format!(
            r#"
local r = redis.call('HMGET', KEYS[1], 'st', 'tok', 'lu')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] or r[3] == '{RELEASED}' then return 0 end
redis.call('HSET', KEYS[1], 'st', ARGV[2], 'resp', ARGV[3], 'ea', ARGV[4], 'ua', ARGV[5])
redis.call('HDEL', KEYS[1], 'lu')
redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(ARGV[4]) - tonumber(ARGV[5]) + tonumber(ARGV[6])))
return 1
"#
        )),
        // ARGV: token, lease_until, expires_at, now, ttl_grace_ms
        extend: Script::new(&format!(
            r#"
local r = redis.call('HMGET', KEYS[1], 'st', 'tok', 'lu', 'ea')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] or r[3] == '{RELEASED}' then return 0 end
local ea = r[4]
if tonumber(ARGV[3]) > tonumber(ea) then ea = ARGV[3] end
redis.call('HSET', KEYS[1], 'lu', ARGV[2], 'ea', ea, 'ua', ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.max(1, tonumber(ea) - tonumber(ARGV[4]) + tonumber(ARGV[5])))
return 1
"#
        )),
        // ARGV: token, now
        release: Script::new(&format!(
            r#"
local r = redis.call('HMGET', KEYS[1], 'st', 'tok', 'lu')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] or r[3] == '{RELEASED}' then return 0 end
redis.call('HSET', KEYS[1], 'lu', '{RELEASED}', 'ua', ARGV[2])
return 1
"#
        )),
        // ARGV: now. Deletes the record if it has expired, atomically with the check.
        purge_one: Script::new(
            r#"
local ea = redis.call('HGET', KEYS[1], 'ea')
if ea and tonumber(ea) <= tonumber(ARGV[1]) then redis.call('DEL', KEYS[1]) return 1 end
return 0
"#,
        ),
    })
}

/// Maps a Redis error: connection loss, timeouts, `LOADING`, `TRYAGAIN` and the like are
/// retryable; a script or type error is not.
pub fn redis_err(e: redis::RedisError) -> Error {
    Error::Store {
        retryable: !matches!(e.retry_method(), RetryMethod::NoRetry),
        source: Box::new(e),
    }
}

fn corrupt(what: String) -> Error {
    Error::Corrupt(what.into())
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, Error> {
    String::from_utf8(bytes.to_vec()).map_err(|_| corrupt(format!("{what} is not UTF-8")))
}

fn int(bytes: &[u8], what: &str) -> Result<i64, Error> {
    utf8(bytes, what)?
        .parse()
        .map_err(|_| corrupt(format!("{what} is not an integer")))
}

impl RedisStore {
    /// Connects to `url` with default options.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, RedisOptions::default()).await
    }

    /// Connects to `url` (`redis://host:port/db`) through a reconnecting connection manager,
    /// and warns (with `tracing`) if the server's eviction policy can drop claim records.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self, Error> {
        let client = redis::Client::open(url).map_err(redis_err)?;
        let conn = ConnectionManager::new(client).await.map_err(redis_err)?;
        let store = RedisStore {
            conn,
            options,
            scripts: scripts(),
        };
        if let Some(risk) = store.eviction_risk().await {
            tracing::warn!("{risk}");
        }
        Ok(store)
    }

    /// `Some(explanation)` unless the server's `maxmemory-policy` is `noeviction`: every
    /// other policy can evict claim records (they carry a TTL, so even `volatile-*` policies
    /// apply), and an evicted record is a key the barrier has forgotten. A server that
    /// refuses `CONFIG GET` (managed services) is reported as unknown.
    pub async fn eviction_risk(&self) -> Option<String> {
        let mut conn = self.conn.clone();
        let policy: Result<Vec<String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut conn)
            .await;
        match policy {
            Ok(v) if v.get(1).map(String::as_str) == Some("noeviction") => None,
            Ok(v) => Some(format!(
                "Redis maxmemory-policy is {:?}: idempotency records can be evicted under memory \
                 pressure and their keys would execute again; set `maxmemory-policy noeviction`",
                v.get(1)
            )),
            Err(e) => Some(format!(
                "cannot read Redis maxmemory-policy ({e}); make sure it is `noeviction`"
            )),
        }
    }

    /// The options.
    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    /// A clone of the connection manager, for business commands beside the barrier.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn grace(&self) -> i64 {
        i64::try_from(self.options.ttl_grace.as_millis()).unwrap_or(i64::MAX)
    }

    /// The record's key: the prefix, then scope and id hex-encoded inside one hash tag, so
    /// that every key of one record lands in one Redis Cluster slot, and no scope or id can
    /// collide with another or break out of the tag.
    fn record_key(&self, key: &Key) -> String {
        format!(
            "{}r:{{{}.{}}}",
            self.options.key_prefix,
            hex::encode(key.scope()),
            hex::encode(key.id())
        )
    }

    fn parse_key(&self, redis_key: &str) -> Result<Key, Error> {
        let inner = redis_key
            .strip_prefix(&self.options.key_prefix)
            .and_then(|k| k.strip_prefix("r:{"))
            .and_then(|k| k.strip_suffix('}'))
            .and_then(|k| k.split_once('.'))
            .ok_or_else(|| corrupt(format!("unexpected key {redis_key:?}")))?;
        let part = |h: &str| {
            hex::decode(h)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| corrupt(format!("unexpected key {redis_key:?}")))
        };
        Key::new(part(inner.0)?, part(inner.1)?)
    }

    async fn fenced(&self, script: &Script, key: &Key, args: Vec<Vec<u8>>) -> Result<(), Error> {
        let mut invocation = script.key(self.record_key(key));
        for a in args {
            invocation.arg(a);
        }
        let done: i64 = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_err)?;
        if done == 1 {
            Ok(())
        } else {
            Err(Error::LeaseLost)
        }
    }

    async fn finish(
        &self,
        lease: &Lease,
        state: &str,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        let args = vec![
            lease.token.0.to_string().into_bytes(),
            state.as_bytes().to_vec(),
            response.to_vec(),
            expires_at.as_millis().to_string().into_bytes(),
            now.as_millis().to_string().into_bytes(),
            self.grace().to_string().into_bytes(),
        ];
        self.fenced(&self.scripts.finish, &lease.key, args).await
    }

    /// Every record key under the prefix, by `SCAN` (O(keys in the database), in pages).
    async fn scan(&self) -> Result<Vec<String>, Error> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}r:*", self.options.key_prefix);
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        loop {
            let (next, page): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(redis_err)?;
            keys.extend(page);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }
}

#[async_trait]
impl Store for RedisStore {
    fn guarantees(&self) -> Guarantees {
        Guarantees::best_effort()
    }

    async fn begin(
        &self,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        let reply: Vec<Vec<u8>> = self
            .scripts
            .begin
            .key(self.record_key(key))
            .arg(
                fingerprint
                    .map(|f| f.as_bytes().to_vec())
                    .unwrap_or_default(),
            )
            .arg(deadlines.lease_until.as_millis())
            .arg(now.as_millis())
            .arg(deadlines.expires_at.as_millis())
            .arg(self.grace())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(redis_err)?;
        let field = |i: usize| {
            reply
                .get(i)
                .map(Vec::as_slice)
                .ok_or_else(|| corrupt(format!("begin script reply {reply:?} is short")))
        };
        match field(0)? {
            b"acquired" => Ok(Begin::Acquired(Lease {
                key: key.clone(),
                token: Token(int(field(1)?, "token")? as u64),
                lease_until: deadlines.lease_until,
                reclaimed: field(2)? == b"1",
            })),
            b"mismatch" => Ok(Begin::Mismatch),
            b"completed" => Ok(Begin::Completed {
                response: field(1)?.to_vec(),
            }),
            b"failed" => Ok(Begin::Failed {
                response: field(1)?.to_vec(),
            }),
            b"in_progress" => Ok(Begin::InProgress {
                lease_until: Timestamp::from_millis(int(field(1)?, "lease deadline")?),
            }),
            _ => Err(Error::UnknownFormat {
                format: format!(
                    "state {:?}",
                    String::from_utf8_lossy(field(1).unwrap_or(b"?"))
                ),
            }),
        }
    }

    async fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.finish(lease, "completed", response, expires_at, now)
            .await
    }

    async fn fail(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.finish(lease, "failed", response, expires_at, now)
            .await
    }

    async fn extend(
        &self,
        lease: &Lease,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Lease, Error> {
        let args = vec![
            lease.token.0.to_string().into_bytes(),
            deadlines.lease_until.as_millis().to_string().into_bytes(),
            deadlines.expires_at.as_millis().to_string().into_bytes(),
            now.as_millis().to_string().into_bytes(),
            self.grace().to_string().into_bytes(),
        ];
        self.fenced(&self.scripts.extend, &lease.key, args).await?;
        Ok(Lease {
            lease_until: deadlines.lease_until,
            ..lease.clone()
        })
    }

    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        let args = vec![
            lease.token.0.to_string().into_bytes(),
            now.as_millis().to_string().into_bytes(),
        ];
        self.fenced(&self.scripts.release, &lease.key, args).await
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
        let fields: std::collections::HashMap<String, Vec<u8>> = self
            .conn
            .clone()
            .hgetall(self.record_key(key))
            .await
            .map_err(redis_err)?;
        if fields.is_empty() {
            return Ok(None);
        }
        let required = |name: &str| {
            fields
                .get(name)
                .ok_or_else(|| corrupt(format!("record {key} has no field {name}")))
        };
        let optional_int = |name: &str| fields.get(name).map(|v| int(v, name)).transpose();
        RecordRow {
            fingerprint: fields.get("fp").cloned(),
            state: utf8(required("st")?, "state")?,
            token: int(required("tok")?, "token")?,
            lease_until: optional_int("lu")?,
            response: fields.get("resp").cloned(),
            created_at: int(required("ca")?, "created_at")?,
            updated_at: int(required("ua")?, "updated_at")?,
            expires_at: int(required("ea")?, "expires_at")?,
        }
        .into_record(key)
        .map(Some)
    }

    /// Scans every record key (`SCAN`, O(keys in the database)) and deletes up to `batch`
    /// expired ones, each with an atomic check-and-delete script.
    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        let mut deleted = 0u64;
        for k in self.scan().await? {
            if deleted as usize >= batch {
                break;
            }
            let n: i64 = self
                .scripts
                .purge_one
                .key(&k)
                .arg(now.as_millis())
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(redis_err)?;
            deleted += n as u64;
        }
        Ok(deleted)
    }

    /// Scans every record key and reads its state: O(keys in the database).
    async fn stats(&self) -> Result<Stats, Error> {
        let keys = self.scan().await?;
        let mut stats = Stats::default();
        let mut conn = self.conn.clone();
        for chunk in keys.chunks(500) {
            let mut pipe = redis::pipe();
            for k in chunk {
                // Validates the key layout, so a foreign key under the prefix is an error.
                self.parse_key(k)?;
                pipe.hget(k, "st");
            }
            let states: Vec<Option<String>> =
                pipe.query_async(&mut conn).await.map_err(redis_err)?;
            for state in states.into_iter().flatten() {
                stats.add(&state, 1)?;
            }
        }
        Ok(stats)
    }
}
