//! [`RedisStore`]: connecting, and the [`Store`] operations: a claim is one `SET … NX GET`
//! (plus a compare-and-set script to reclaim an expired lease), the others one script each.

use std::time::Duration;

use async_trait::async_trait;
use idem_core::{
    Begin, Deadlines, Error, Fingerprint, Guarantees, Key, Lease, Record, Stats, Store, Timestamp,
    Token,
};
use redis::{Cmd, ErrorKind, RedisError, RedisResult, Script, ServerErrorKind, ToRedisArgs, Value};

use crate::conn::{Node, RedisConnection};
use crate::error::{map_err, map_key_err, outcome_unknown};
use crate::keys::{foreign, Layout};
use crate::options::RedisOptions;
use crate::record::{self, Change, Header, Status, HEADER};
use crate::scripts::{scripts, Scripts};

/// Keys per `SCAN` page and per `stats` pipeline.
const PAGE: usize = 1000;
/// First pause between two attempts to give back an abandoned claim.
const ABANDON_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between two such attempts.
const ABANDON_MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Reads and compare-and-sets one `begin` makes before answering retryably: every failed
/// compare-and-set means another call changed the record meanwhile.
const CLAIM_ATTEMPTS: usize = 8;
/// The largest outcome the record encoding holds (its length is 4 bytes).
const MAX_STORED_OUTCOME: usize = u32::MAX as usize;

/// A best-effort idempotency store on Redis or Redis Cluster.
///
/// `begin` is one `SET … NX GET` on one key (plus, to reclaim an expired or released
/// lease, a compare-and-set script); `complete`, `fail`, `extend` and `release` are one Lua
/// script each (one round trip, `EVALSHA` with a load on `NOSCRIPT`). Each is atomic on the
/// primary that owns the key. See the crate docs for what Redis can lose, the error table
/// and what a cancelled call leaves behind.
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) conn: RedisConnection,
    options: RedisOptions,
    pub(crate) layout: Layout,
    scripts: &'static Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("conn", &self.conn)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the server at `url` (`redis://host:port/db`) with default options.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::connect_with(url, RedisOptions::default()).await
    }

    /// Connects to the server at `url` through a reconnecting connection manager. Warns
    /// (with `tracing`) if the server's eviction policy can drop records, and lowers the
    /// outcome limit to the server's `proto-max-bulk-len` when it can read it.
    pub async fn connect_with(url: &str, options: RedisOptions) -> Result<Self, Error> {
        options.validate()?;
        let conn = RedisConnection::single(url, &options)
            .await
            .map_err(map_err)?;
        Self::ready(conn, options).await
    }

    /// Connects to the Redis Cluster that `nodes` (`redis://host:port` URLs; one reachable
    /// node is enough) belong to, with default options.
    pub async fn connect_cluster<I, T>(nodes: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        Self::connect_cluster_with(nodes, RedisOptions::default()).await
    }

    /// Connects to a Redis Cluster with `options`. The store behaves as on one server:
    /// every record is one key in one slot (see the crate docs for the hash tag), scripts
    /// are routed to the slot's primary, and `purge` and `stats` walk every primary.
    pub async fn connect_cluster_with<I, T>(nodes: I, options: RedisOptions) -> Result<Self, Error>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        options.validate()?;
        let conn = RedisConnection::cluster(nodes, &options)
            .await
            .map_err(map_err)?;
        Self::ready(conn, options).await
    }

    async fn ready(conn: RedisConnection, mut options: RedisOptions) -> Result<Self, Error> {
        let mut store = RedisStore {
            layout: Layout::new(options.key_prefix()),
            conn,
            options: options.clone(),
            scripts: scripts(),
        };
        if let Some(limit) = store.server_bulk_limit().await {
            options.cap_outcome_size(limit);
            store.options = options;
        }
        if let Some(risk) = store.eviction_risk().await {
            tracing::warn!("{risk}");
        }
        Ok(store)
    }

    /// The smallest `proto-max-bulk-len` of the servers, less room for the rest of the
    /// command, or `None` if it cannot be read (managed services refuse `CONFIG`).
    async fn server_bulk_limit(&self) -> Option<usize> {
        let mut limit = None;
        for node in self.conn.nodes().await.ok()? {
            let value = self
                .conn
                .on_node(&node, config_get("proto-max-bulk-len"))
                .await
                .ok()?;
            let (_, bytes): (String, usize) = redis::from_redis_value(value).ok()?;
            let room = bytes.saturating_sub(4096);
            limit = Some(limit.map_or(room, |l: usize| l.min(room)));
        }
        limit
    }

    /// `Some(explanation)` unless no server can evict records: `maxmemory-policy`
    /// `noeviction`, or a `volatile-*` policy while records carry no TTL (the default; see
    /// [`RedisOptions::with_ttl_grace`]). Every other policy can evict records, and an
    /// evicted record is a key the barrier has forgotten. A server that refuses
    /// `CONFIG GET` (managed services) is reported as unknown.
    pub async fn eviction_risk(&self) -> Option<String> {
        let nodes = match self.conn.nodes().await {
            Ok(nodes) => nodes,
            Err(e) => return Some(format!("cannot list the Redis servers ({e})")),
        };
        for node in nodes {
            let policy = match self
                .conn
                .on_node(&node, config_get("maxmemory-policy"))
                .await
                .and_then(|v| Ok(redis::from_redis_value::<(String, String)>(v)?))
            {
                Ok((_, policy)) => policy,
                Err(e) => {
                    return Some(format!(
                        "cannot read Redis maxmemory-policy ({e}); make sure it is `noeviction`"
                    ))
                }
            };
            let safe = policy == "noeviction"
                || (policy.starts_with("volatile-") && self.options.ttl_grace().is_none());
            if !safe {
                return Some(format!(
                    "Redis maxmemory-policy is {policy:?}: idempotency records can be evicted \
                     under memory pressure and their keys would execute again; set \
                     `maxmemory-policy noeviction`"
                ));
            }
        }
        None
    }

    /// The options in effect (the outcome limit possibly lowered to the server's).
    pub fn options(&self) -> &RedisOptions {
        &self.options
    }

    /// The store's connection, for business commands beside the barrier.
    pub fn connection(&self) -> RedisConnection {
        self.conn.clone()
    }

    /// The ttl grace in milliseconds, if any.
    fn grace_ms(&self) -> Option<i64> {
        self.options
            .ttl_grace()
            .map(|g| i64::try_from(g.as_millis()).unwrap_or(i64::MAX))
    }

    /// The ttl grace argument of the scripts: milliseconds, or `''` for none.
    fn grace(&self) -> String {
        self.grace_ms().map(|g| g.to_string()).unwrap_or_default()
    }

    /// The TTL in ms of a record retained until `expires_at`, written at `now`: `grace`
    /// after `expires_at` (at least 1), or `None` without a ttl grace.
    fn ttl(&self, expires_at: Timestamp, now: Timestamp) -> Option<i64> {
        self.grace_ms().map(|g| {
            expires_at
                .as_millis()
                .saturating_sub(now.as_millis())
                .saturating_add(g)
                .max(1)
        })
    }

    /// Runs `cmd` (an `EVALSHA` of `script`, or a plain command), loading the script on
    /// `NOSCRIPT`.
    async fn run(&self, script: Option<&Script>, cmd: &Cmd) -> RedisResult<Value> {
        let mut conn = self.conn.clone();
        match (cmd.query_async(&mut conn).await, script) {
            (Err(e), Some(script)) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                script.load_async(&mut conn).await?;
                cmd.query_async(&mut conn).await
            }
            (other, _) => other,
        }
    }

    /// [`Self::run`], reissued once if the reply was lost (a timeout or a dropped
    /// connection): every call recognises a repeat of itself.
    async fn run_reissued(&self, script: &Script, cmd: &Cmd) -> RedisResult<Value> {
        self.run_reissued_tracked(Some(script), cmd).await.0
    }

    /// [`Self::run_reissued`], also saying whether an attempt may have run on the server
    /// without its reply arriving.
    async fn run_reissued_tracked(
        &self,
        script: Option<&Script>,
        cmd: &Cmd,
    ) -> (RedisResult<Value>, bool) {
        match self.run(script, cmd).await {
            Err(e) if outcome_unknown(&e) => {
                tracing::debug!(error = %e, "reissuing a Redis call whose reply was lost");
                let again = self.run(script, cmd).await;
                (again, true)
            }
            other => (other, false),
        }
    }

    /// [`Self::run_reissued`], followed in the same pipeline by `WAIT` when the options ask
    /// for it; a shortfall of acknowledgements is a retryable error.
    async fn run_acknowledged(&self, script: &Script, cmd: &Cmd, key: &str) -> RedisResult<Value> {
        let Some(wait) = self.options.wait_replicas() else {
            return self.run_reissued(script, cmd).await;
        };
        let mut pipe = redis::pipe();
        pipe.add_command(cmd.clone())
            .cmd("WAIT")
            .arg(wait.replicas)
            .arg(u64::try_from(wait.timeout.as_millis()).unwrap_or(u64::MAX));
        let mut reissued = false;
        let mut loaded = false;
        loop {
            let replies = match self.conn.pipe_for_key(key, pipe.clone(), 2).await {
                Err(e) if outcome_unknown(&e) && !reissued => {
                    reissued = true;
                    continue;
                }
                other => other?,
            };
            let mut replies = replies.into_iter();
            let (Some(reply), Some(acked)) = (replies.next(), replies.next()) else {
                return Err(RedisError::from((
                    ErrorKind::Parse,
                    "short WAIT pipeline reply",
                )));
            };
            match reply.extract_error() {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) && !loaded => {
                    script.load_async(&mut self.conn.clone()).await?;
                    loaded = true;
                }
                Err(e) => return Err(e),
                Ok(reply) => {
                    let acked: i64 = redis::from_redis_value(acked.extract_error()?)?;
                    if acked < i64::from(wait.replicas) {
                        return Err(redis::make_extension_error(
                            "NOREPLICAS".into(),
                            Some(format!(
                                "written on the primary, but only {acked} of {} replicas \
                                 acknowledged within {:?}",
                                wait.replicas, wait.timeout
                            )),
                        ));
                    }
                    return Ok(reply);
                }
            }
        }
    }

    /// Writes an outcome (or the too-large marker), fenced by the lease's token.
    async fn write_outcome(
        &self,
        lease: &Lease,
        state: Status,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
        too_large: &[u8],
    ) -> Result<(), Error> {
        let record = self.layout.record(&lease.key);
        let mut cmd = evalsha(&self.scripts.finish, &record);
        // Both lengths are within u32: `finish` caps the outcome, the note is short.
        let fields = record::finish_fields(
            state,
            now,
            expires_at,
            nonce(),
            too_large.len() as u32,
            response.len() as u32,
        );
        cmd.arg(&lease.token.0.to_be_bytes()[..])
            .arg(&fields[..])
            .arg(too_large)
            .arg(response)
            .arg(opt(self.ttl(expires_at, now)));
        let reply = self
            .run_acknowledged(&self.scripts.finish, &cmd, &record)
            .await
            .map_err(map_key_err(&lease.key))?;
        fenced(&lease.key, reply)
    }

    /// `complete` (`state == "completed"`) or `fail`. An outcome above the limit is not
    /// sent: the key is failed with a short marker that says so, and the answer is
    /// [`Error::TooLarge`], also to every later `begin` of the key.
    async fn finish(
        &self,
        lease: &Lease,
        state: Status,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        let limit = self.options.max_outcome_size().min(MAX_STORED_OUTCOME);
        if response.len() <= limit {
            return self
                .write_outcome(lease, state, response, expires_at, now, b"")
                .await;
        }
        let size = response.len();
        let state = state.name();
        let note = format!("{size}:{limit}:{state}");
        let marker = format!(
            "idem-redis: the {state} outcome of {size} bytes exceeded max_outcome_size \
             ({limit} bytes) and was not stored; the operation ran once"
        );
        tracing::warn!(key = %lease.key, size, limit, "outcome too large to store");
        self.write_outcome(
            lease,
            Status::Failed,
            marker.as_bytes(),
            expires_at,
            now,
            note.as_bytes(),
        )
        .await?;
        Err(Error::TooLarge {
            what: "outcome",
            size,
            limit,
        })
    }

    /// Every key of `node` matching the record pattern (of `scope`'s records only, if
    /// given), one `SCAN` page at a time.
    pub(crate) async fn scan_page(
        &self,
        node: &Node,
        scope: Option<&str>,
        cursor: u64,
    ) -> Result<(u64, Vec<Vec<u8>>), Error> {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(self.layout.scan_pattern(scope))
            .arg("COUNT")
            .arg(PAGE);
        let value = self.conn.on_node(node, scan).await.map_err(map_err)?;
        redis::from_redis_value(value).map_err(|e| map_err(e.into()))
    }

    /// Runs the check-and-delete script on each of `records` (all on `node`) in one
    /// pipeline; how many were deleted. A record the script cannot read is kept and logged.
    async fn purge_page(
        &self,
        node: &Node,
        records: &[(Key, Vec<u8>)],
        now: Timestamp,
    ) -> Result<usize, Error> {
        let script = &self.scripts.purge_one;
        let mut pipe = redis::pipe();
        for (_, redis_key) in records {
            pipe.add_command(evalsha(script, redis_key))
                .arg(now.as_millis());
        }
        let mut replies = self
            .conn
            .pipe_on_node(node, pipe.clone(), records.len())
            .await
            .map_err(map_err)?;
        let no_script = |v: &Value| matches!(v, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript));
        if replies.iter().any(no_script) {
            // Deleting is idempotent: load the script and run the whole page again.
            script
                .load_async(&mut self.conn.clone())
                .await
                .map_err(map_err)?;
            replies = self
                .conn
                .pipe_on_node(node, pipe, records.len())
                .await
                .map_err(map_err)?;
        }
        let mut deleted = 0;
        for ((key, _), reply) in records.iter().zip(replies) {
            match reply.extract_error().map_err(map_key_err(key))? {
                Value::Int(1) => deleted += 1,
                Value::Int(0) => {}
                _ => tracing::warn!(key = %key, "purge skipped a record it cannot read"),
            }
        }
        Ok(deleted)
    }

    /// Adds the states of the record keys `page` (all on `node`) to `stats`.
    async fn count_states(
        &self,
        node: &Node,
        page: &[Vec<u8>],
        stats: &mut Stats,
    ) -> Result<(), Error> {
        let mut keys = Vec::with_capacity(page.len());
        let mut pipe = redis::pipe();
        for redis_key in page {
            keys.push(
                self.layout
                    .parse(redis_key)
                    .ok_or_else(|| foreign(redis_key))?,
            );
            pipe.getrange(redis_key, 0, HEADER as isize - 1);
        }
        let states = self
            .conn
            .pipe_on_node(node, pipe, page.len())
            .await
            .map_err(map_err)?;
        for (key, header) in keys.iter().zip(states) {
            let header: Vec<u8> =
                redis::from_redis_value(header.extract_error().map_err(map_key_err(key))?)
                    .map_err(|e| map_err(e.into()))?;
            let state = record::decode_header(&header)
                .map_err(|why| Error::corrupt_key(key, why))?
                .status
                .name();
            stats
                .add(state, 1)
                .map_err(|_| Error::corrupt_key(key, format!("unknown state {state:?}")))?;
        }
        Ok(())
    }

    /// Arms the give-back of the claim a `begin` call with `nonce` may make.
    fn abandon_guard(
        &self,
        record: &str,
        nonce: [u8; 8],
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Abandon {
        let lease_left =
            u64::try_from(lease_until.as_millis().saturating_sub(now.as_millis())).unwrap_or(0);
        Abandon(Some(AbandonCall {
            conn: self.conn.clone(),
            script: &self.scripts.abandon,
            record: record.to_string(),
            nonce,
            now,
            give_up_after: Duration::from_millis(lease_left),
        }))
    }

    /// Sends `cmd` (reissued once if its reply is lost), noting in `unanswered` when an
    /// attempt may have run on the server without its reply arriving.
    async fn claim_step(
        &self,
        script: Option<&Script>,
        cmd: &Cmd,
        unanswered: &mut bool,
    ) -> RedisResult<Value> {
        let (reply, maybe_ran) = self.run_reissued_tracked(script, cmd).await;
        if maybe_ran || matches!(&reply, Err(e) if outcome_unknown(e)) {
            *unanswered = true;
        }
        reply
    }

    /// `begin` after arming the give-back: claims a fresh key with `SET … NX GET`, answers
    /// from the record that returns when nothing needs writing, and reclaims an expired or
    /// released lease by compare-and-set against the record it decided on.
    async fn claim(
        &self,
        key: &Key,
        record: &str,
        claim: &Claim<'_>,
        unanswered: &mut bool,
    ) -> Result<Begin, Error> {
        let header = Header {
            token: 1,
            lease_until: claim.lease_until,
            created_at: claim.now,
            status: Status::InProgress,
            change: Change::Plain,
            updated_at: claim.now,
            expires_at: claim.expires_at,
            nonce: claim.nonce,
        };
        let mut set = redis::cmd("SET");
        set.arg(record)
            .arg(record::encode_claim(&header, claim.fingerprint))
            .arg("NX")
            .arg("GET");
        if let Some(ttl) = self.ttl(claim.expires_at, claim.now) {
            set.arg("PX").arg(ttl);
        }
        let fresh = Begin::Acquired(Lease {
            key: key.clone(),
            token: Token(1),
            lease_until: claim.lease_until,
            reclaimed: false,
        });
        let to_err = map_key_err(key);
        let mut reply = self.claim_step(None, &set, unanswered).await;
        // What a nil or 1 reply means: the SET claimed the key, the compare-and-set gone
        // through (the reclaim's answer), the compare-and-set found no record.
        let mut written: Option<Begin> = None;
        for _ in 0..CLAIM_ATTEMPTS {
            let current = match (reply.map_err(&to_err)?, written.take()) {
                (Value::Nil, None) => return Ok(fresh),
                (Value::Int(1), Some(answer)) => return Ok(answer),
                (Value::Nil, Some(_)) => {
                    // The record was deleted (purged) meanwhile: claim it fresh.
                    reply = self.claim_step(None, &set, unanswered).await;
                    continue;
                }
                (Value::BulkString(current), _) => current,
                (other, _) => {
                    *unanswered = true;
                    return Err(Error::corrupt_key(
                        key,
                        format!("unexpected claim reply {other:?}"),
                    ));
                }
            };
            let (replacement, expires_at, answer) = match decide(key, &current, claim)? {
                Decision::Answer(answer) => return Ok(answer),
                Decision::Reclaim {
                    record,
                    expires_at,
                    answer,
                } => (record, expires_at, answer),
            };
            let mut cas = evalsha(&self.scripts.claim, record);
            cas.arg(&current)
                .arg(&replacement)
                .arg(opt(self.ttl(expires_at, claim.now)));
            written = Some(answer);
            reply = self
                .claim_step(Some(&self.scripts.claim), &cas, unanswered)
                .await;
        }
        Err(Error::retryable(format!(
            "the record of {key} changed under {CLAIM_ATTEMPTS} claim attempts in a row"
        )))
    }
}

/// One `begin` call's parameters.
struct Claim<'a> {
    fingerprint: Option<&'a [u8]>,
    lease_until: Timestamp,
    expires_at: Timestamp,
    now: Timestamp,
    nonce: [u8; 8],
}

/// What a `begin` does with the record it found.
#[derive(Debug)]
enum Decision {
    /// Answers without writing anything.
    Answer(Begin),
    /// Replaces the record (a reclaim: the new record and its retention deadline) and then
    /// answers.
    Reclaim {
        record: Vec<u8>,
        expires_at: Timestamp,
        answer: Begin,
    },
}

/// What `claim` does with the record `current` of `key`: the rules a claim follows on an
/// existing record, decided on one atomic read of it.
fn decide(key: &Key, current: &[u8], claim: &Claim<'_>) -> Result<Decision, Error> {
    let stored = record::decode(current).map_err(|why| Error::corrupt_key(key, why))?;
    let h = &stored.header;
    if let (Some(stored), Some(asked)) = (stored.fingerprint, claim.fingerprint) {
        if stored != asked {
            return Ok(Decision::Answer(Begin::Mismatch));
        }
    }
    let response = stored.response.to_vec();
    match h.status {
        Status::Completed | Status::Failed if !stored.note.is_empty() => {
            let note = String::from_utf8_lossy(stored.note);
            let mut parts = note.split(':').map(str::parse::<usize>);
            return match (parts.next(), parts.next()) {
                (Some(Ok(size)), Some(Ok(limit))) => Err(Error::TooLarge {
                    what: "outcome",
                    size,
                    limit,
                }),
                _ => Err(Error::corrupt_key(key, format!("too-large note {note:?}"))),
            };
        }
        Status::Completed => return Ok(Decision::Answer(Begin::Completed { response })),
        Status::Failed => return Ok(Decision::Answer(Begin::Failed { response })),
        Status::InProgress => {}
    }
    let released = h.lease_until == Timestamp::MIN;
    let own = h.nonce == claim.nonce;
    let lease = |token: u64, reclaimed: bool| {
        Begin::Acquired(Lease {
            key: key.clone(),
            token: Token(token),
            lease_until: claim.lease_until,
            reclaimed,
        })
    };
    if !released {
        // A reissue of this very call finds its own claim.
        match (own, h.change) {
            (true, Change::Plain) => return Ok(Decision::Answer(lease(h.token, false))),
            (true, Change::Reclaimed) => return Ok(Decision::Answer(lease(h.token, true))),
            _ => {}
        }
        if h.lease_until > claim.now {
            return Ok(Decision::Answer(Begin::InProgress {
                lease_until: h.lease_until,
            }));
        }
    } else if own && h.change == Change::Abandoned {
        return Err(Error::retryable(format!(
            "a late copy of an abandoned begin of {key} was refused"
        )));
    }
    let token = h
        .token
        .checked_add(1)
        .filter(|&t| i64::try_from(t).is_ok())
        .ok_or_else(|| Error::corrupt_key(key, format!("token {} out of range", h.token)))?;
    let expires_at = h.expires_at.max(claim.expires_at);
    let header = Header {
        token,
        lease_until: claim.lease_until,
        created_at: h.created_at,
        status: Status::InProgress,
        change: if released {
            Change::Plain
        } else {
            Change::Reclaimed
        },
        updated_at: claim.now,
        expires_at,
        nonce: claim.nonce,
    };
    Ok(Decision::Reclaim {
        record: record::encode_claim(&header, stored.fingerprint.or(claim.fingerprint)),
        expires_at,
        answer: lease(token, !released),
    })
}

/// `CONFIG GET name`.
fn config_get(name: &str) -> Cmd {
    let mut cmd = redis::cmd("CONFIG");
    cmd.arg("GET").arg(name);
    cmd
}

/// The `EVALSHA` command of `script` on `key`, ready for its arguments.
fn evalsha(script: &Script, key: impl ToRedisArgs) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(1).arg(key);
    cmd
}

/// A fresh call nonce: 64 random bits.
fn nonce() -> [u8; 8] {
    rand::random()
}

/// An optional integer script argument: the number, or `''` for none.
fn opt(n: Option<i64>) -> String {
    n.map(|n| n.to_string()).unwrap_or_default()
}

/// A timestamp as a script argument: 8 bytes, big-endian.
fn millis(t: Timestamp) -> [u8; 8] {
    t.as_millis().to_be_bytes()
}

/// The reply of a fenced script: 1 is done, 0 is [`Error::LeaseLost`], -1 a record the
/// script cannot read.
fn fenced(key: &Key, reply: Value) -> Result<(), Error> {
    match redis::from_redis_value::<i64>(reply) {
        Ok(1) => Ok(()),
        Ok(0) => Err(Error::LeaseLost),
        Ok(-1) => Err(Error::corrupt_key(
            key,
            "the record is not in the idem-redis record encoding",
        )),
        Ok(n) => Err(Error::corrupt_key(
            key,
            format!("unexpected script reply {n}"),
        )),
        Err(e) => Err(map_err(e.into())),
    }
}

/// Gives back, when dropped armed, the claim that a `begin` call may have made although
/// its caller never received the lease: the call failed with an unknown outcome, or its
/// future was dropped. The give-back is spawned on the current Tokio runtime.
struct Abandon(Option<AbandonCall>);

impl Abandon {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        let Some(call) = self.0.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(call.run());
            }
            Err(_) => tracing::debug!(
                record = call.record,
                "no Tokio runtime to give back an unanswered claim; its lease frees it"
            ),
        }
    }
}

/// The abandon script call of one `begin`.
struct AbandonCall {
    conn: RedisConnection,
    script: &'static Script,
    record: String,
    nonce: [u8; 8],
    now: Timestamp,
    give_up_after: Duration,
}

impl AbandonCall {
    /// Sends the abandon script (on the same connection as the `begin`, so after it),
    /// retrying retryable errors with backoff until the lease would have freed the key.
    async fn run(self) {
        let deadline = tokio::time::Instant::now() + self.give_up_after;
        let mut cmd = evalsha(self.script, &self.record);
        cmd.arg(&self.nonce[..]).arg(&millis(self.now)[..]);
        let mut backoff = ABANDON_BACKOFF;
        loop {
            let mut conn = self.conn.clone();
            let result: RedisResult<i64> = match cmd.query_async(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    match self.script.load_async(&mut conn).await {
                        Ok(_) => cmd.query_async(&mut conn).await,
                        Err(e) => Err(e),
                    }
                }
                other => other,
            };
            match result {
                Ok(released) => {
                    if released == 1 {
                        tracing::debug!(record = self.record, "gave back an unanswered claim");
                    }
                    return;
                }
                Err(e)
                    if map_err(e.clone()).is_retryable()
                        && tokio::time::Instant::now() + backoff < deadline =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ABANDON_MAX_BACKOFF);
                }
                Err(e) => {
                    tracing::warn!(record = self.record, error = %e, "could not give back an unanswered claim; its lease frees it");
                    return;
                }
            }
        }
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
        let record = self.layout.record(key);
        let claim = Claim {
            fingerprint: fingerprint.map(|f| &f.as_bytes()[..]),
            lease_until: deadlines.lease_until,
            expires_at: deadlines.expires_at,
            now,
            nonce: nonce(),
        };
        // Armed until an answer arrives: a dropped future gives the claim back.
        let mut abandon = self.abandon_guard(&record, claim.nonce, now, deadlines.lease_until);
        let mut unanswered = false;
        let answer = self.claim(key, &record, &claim, &mut unanswered).await;
        // Only an attempt whose reply was lost can have claimed the key unseen.
        if answer.is_ok() || !unanswered {
            abandon.disarm();
        }
        answer
    }

    async fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.finish(lease, Status::Completed, response, expires_at, now)
            .await
    }

    async fn fail(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.finish(lease, Status::Failed, response, expires_at, now)
            .await
    }

    async fn extend(
        &self,
        lease: &Lease,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Lease, Error> {
        let record = self.layout.record(&lease.key);
        let mut cmd = evalsha(&self.scripts.extend, &record);
        cmd.arg(&lease.token.0.to_be_bytes()[..])
            .arg(&millis(deadlines.lease_until)[..])
            .arg(&millis(deadlines.expires_at)[..])
            .arg(&millis(now)[..])
            .arg(self.grace());
        let reply = self
            .run_reissued(&self.scripts.extend, &cmd)
            .await
            .map_err(map_key_err(&lease.key))?;
        fenced(&lease.key, reply)?;
        Ok(Lease {
            lease_until: deadlines.lease_until,
            ..lease.clone()
        })
    }

    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        let record = self.layout.record(&lease.key);
        let mut cmd = evalsha(&self.scripts.release, &record);
        cmd.arg(&lease.token.0.to_be_bytes()[..])
            .arg(&millis(now)[..])
            .arg(&nonce()[..]);
        let reply = self
            .run_reissued(&self.scripts.release, &cmd)
            .await
            .map_err(map_key_err(&lease.key))?;
        fenced(&lease.key, reply)
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
        let mut get = redis::cmd("GET");
        get.arg(self.layout.record(key));
        let bytes: Option<Vec<u8>> = get
            .query_async(&mut self.conn.clone())
            .await
            .map_err(map_key_err(key))?;
        bytes.map(|b| record::to_record(key, &b)).transpose()
    }

    /// Walks every record key (`SCAN` on each server, O(keys in the database)) and deletes
    /// up to `batch` expired ones, each with an atomic check-and-delete script. A key under
    /// the prefix that is not a readable record is kept and logged, never deleted.
    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        let mut deleted = 0usize;
        for node in self.conn.nodes().await.map_err(map_err)? {
            let mut cursor = 0;
            loop {
                let (next, page) = self.scan_page(&node, None, cursor).await?;
                let mut records = Vec::with_capacity(page.len());
                for redis_key in page {
                    match self.layout.parse(&redis_key) {
                        Some(key) => records.push((key, redis_key)),
                        None => tracing::warn!(error = %foreign(&redis_key), "purge skipped a key"),
                    }
                }
                // Never more scripts in flight than records the batch still allows.
                let mut rest = records.as_slice();
                while !rest.is_empty() {
                    if deleted >= batch {
                        return Ok(deleted as u64);
                    }
                    let (now_batch, later) = rest.split_at(rest.len().min(batch - deleted));
                    deleted += self.purge_page(&node, now_batch, now).await?;
                    rest = later;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(deleted as u64)
    }

    /// Walks the record keys under the prefix (`SCAN` on each server, of the scope's keys
    /// if one is given), keeps the `limit` first after `after` and reads them: every page
    /// costs O(keys under the prefix). See [`RedisStore::list_page`].
    async fn list(
        &self,
        scope: Option<&str>,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Option<Vec<Record>>, Error> {
        self.list_page(scope, after, limit).await.map(Some)
    }

    /// Walks every record key (`SCAN` on each server) and reads its state: O(keys in the
    /// database).
    async fn stats(&self) -> Result<Stats, Error> {
        let mut stats = Stats::default();
        for node in self.conn.nodes().await.map_err(map_err)? {
            let mut cursor = 0;
            loop {
                let (next, page) = self.scan_page(&node, None, cursor).await?;
                if !page.is_empty() {
                    self.count_states(&node, &page, &mut stats).await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp::from_millis(1_000_000);

    fn claim(nonce: [u8; 8], fingerprint: Option<&[u8]>) -> Claim<'_> {
        Claim {
            fingerprint,
            lease_until: NOW.plus(Duration::from_secs(10)),
            expires_at: NOW.plus(Duration::from_secs(100)),
            now: NOW,
            nonce,
        }
    }

    fn in_progress(lease_until: Timestamp, change: Change, nonce: [u8; 8]) -> Vec<u8> {
        let header = Header {
            token: 4,
            lease_until,
            created_at: Timestamp::from_millis(1),
            status: Status::InProgress,
            change,
            updated_at: Timestamp::from_millis(2),
            expires_at: NOW.plus(Duration::from_secs(500)),
            nonce,
        };
        record::encode_claim(&header, Some(&[5; 32]))
    }

    fn acquired(d: Decision) -> (u64, bool) {
        match d {
            Decision::Answer(Begin::Acquired(l)) => (l.token.0, l.reclaimed),
            other => panic!("expected an own claim, got {other:?}"),
        }
    }

    #[test]
    fn decisions_on_an_existing_record() {
        let key = Key::new("s", "k").unwrap();
        let live = NOW.plus(Duration::from_secs(1));
        let expired = NOW;
        let (mine, other) = (*b"mine-nnn", *b"other-nn");
        // A reissue finds its own claim, plain or reclaimed.
        let own = in_progress(live, Change::Plain, mine);
        assert_eq!(
            acquired(decide(&key, &own, &claim(mine, None)).unwrap()),
            (4, false)
        );
        let own = in_progress(live, Change::Reclaimed, mine);
        assert_eq!(
            acquired(decide(&key, &own, &claim(mine, None)).unwrap()),
            (4, true)
        );
        // Someone else's live lease; a different fingerprint first.
        let theirs = in_progress(live, Change::Plain, other);
        assert!(matches!(
            decide(&key, &theirs, &claim(mine, None)).unwrap(),
            Decision::Answer(Begin::InProgress { lease_until }) if lease_until == live
        ));
        assert!(matches!(
            decide(&key, &theirs, &claim(mine, Some(&[6; 32]))).unwrap(),
            Decision::Answer(Begin::Mismatch)
        ));
        // A late copy of an abandoned begin is refused.
        let abandoned = in_progress(Timestamp::MIN, Change::Abandoned, mine);
        let refused = decide(&key, &abandoned, &claim(mine, None)).unwrap_err();
        assert!(refused.is_retryable(), "{refused}");
        // Expired and released leases are taken over with the next token; the new record
        // keeps the creation time and stored fingerprint and the later retention.
        for (lease_until, reclaimed) in [(expired, true), (Timestamp::MIN, false)] {
            let old = in_progress(lease_until, Change::Plain, other);
            let Decision::Reclaim {
                record: new,
                expires_at,
                answer: Begin::Acquired(lease),
            } = decide(&key, &old, &claim(mine, None)).unwrap()
            else {
                panic!("expected a reclaim")
            };
            assert_eq!((lease.token.0, lease.reclaimed), (5, reclaimed));
            let stored = record::decode(&new).unwrap();
            assert_eq!(stored.header.token, 5);
            assert_eq!(stored.header.nonce, mine);
            assert_eq!(stored.header.created_at, Timestamp::from_millis(1));
            assert_eq!(stored.header.expires_at, expires_at);
            assert_eq!(expires_at, NOW.plus(Duration::from_secs(500)));
            assert_eq!(stored.fingerprint, Some(&[5u8; 32][..]));
            let change = if reclaimed {
                Change::Reclaimed
            } else {
                Change::Plain
            };
            assert_eq!(stored.header.change, change);
        }
        // Damage is corrupt, naming the key.
        let e = decide(&key, &own[..20], &claim(mine, None)).unwrap_err();
        assert!(matches!(e, Error::Corrupt { key: Some(k), .. } if k == key.to_string()));
    }
}
