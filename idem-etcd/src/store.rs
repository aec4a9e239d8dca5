//! [`EtcdStore`]: read the record, decide with the contract's model, compare-and-swap.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, GetResponse, KvClient, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};
use idem_core::backend::model;
use idem_core::{
    Begin, Deadlines, Error, Fingerprint, Guarantees, Key, Lease, Record, Stats, Store, Timestamp,
};

use crate::error::{map_err, never_sent};
use crate::keys::{decode, decode_expires_at, decode_state, encode_meta, Keys, Stored};
use crate::options::EtcdOptions;

/// How many compare-and-swap rounds one call makes before it gives up with a retryable
/// error (each lost round means another writer changed the key meanwhile).
const MAX_SWAPS: usize = 32;
/// How many times a request that could not be sent (no connection to the member the client
/// picked) is sent again before the store reports the failure.
const SEND_ATTEMPTS: usize = 4;
/// How many records one purge transaction deletes (two keys each; etcd's default
/// `--max-txn-ops` is 128).
const PURGE_CHUNK: usize = 50;
/// Bytes added to every request's keys and values when checking its size: the protobuf
/// framing of the operations and compares.
const REQUEST_OVERHEAD: usize = 512;
/// How often the background task that undoes an abandoned claim tries before giving up
/// (the claim then holds until its lease runs out).
const ABANDON_ATTEMPTS: u32 = 8;

/// A strict idempotency store on an etcd v3 cluster.
///
/// Every record is two keys (see [`crate`]'s key layout); every change is one etcd
/// transaction that compares the metadata key's `mod_revision` with the one just read, so of
/// concurrent writers exactly one succeeds and the others re-decide on what it wrote. The
/// decision itself is [`idem_core::model`], the contract's executable form.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    kv: KvClient,
    pub(crate) keys: Arc<Keys>,
    options: Arc<EtcdOptions>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A record as read, with the metadata key's `mod_revision` (0: no record).
#[derive(Debug)]
struct Snapshot {
    rev: i64,
    stored: Option<Stored>,
}

impl Snapshot {
    fn record(&self) -> Option<&Record> {
        self.stored.as_ref().map(|s| &s.record)
    }
}

/// The end of one compare-and-swap.
enum Swap {
    /// The write happened.
    Done,
    /// Another writer changed the record first: here it is now.
    Lost(Snapshot),
}

/// Work a call leaves to a background task if it is dropped (or fails) before it knows its
/// write's fate: undoing a claim nobody received, or finishing a release.
struct Pending {
    task: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    runtime: Option<tokio::runtime::Handle>,
}

impl Pending {
    fn new(task: impl Future<Output = ()> + Send + 'static) -> Self {
        Pending {
            task: Some(Box::pin(task)),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }

    fn disarm(&mut self) {
        self.task = None;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let (Some(task), Some(runtime)) = (self.task.take(), &self.runtime) {
            runtime.spawn(task);
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64 << attempt.min(6))
}

impl EtcdStore {
    /// Connects to `endpoints` (comma-separated, e.g.
    /// `http://127.0.0.1:2379,http://127.0.0.2:2379`) with default options.
    pub async fn connect(endpoints: &str) -> Result<Self, Error> {
        Self::connect_with(endpoints, EtcdOptions::default()).await
    }

    /// Connects to `endpoints` (comma-separated) with `options`. The client balances requests
    /// over the endpoints and asks every member to refuse requests while it has no leader
    /// (etcd's `require_leader`), so an election fails calls fast with a retryable error
    /// instead of letting them hang.
    pub async fn connect_with(endpoints: &str, options: EtcdOptions) -> Result<Self, Error> {
        options.validate()?;
        let list: Vec<&str> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .collect();
        if list.is_empty() {
            return Err(Error::Config(format!("no etcd endpoint in {endpoints:?}")));
        }
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_timeout(options.request_timeout)
            .with_require_leader(true);
        let client = Client::connect(list, Some(connect))
            .await
            .map_err(map_err)?;
        Self::from_client(client, options)
    }

    /// A store on an existing client (its own timeouts and authentication apply).
    pub fn from_client(client: Client, options: EtcdOptions) -> Result<Self, Error> {
        options.validate()?;
        // Replies carry at most one page of metadata or one outcome: allow what the store
        // may have written, with room for framing.
        let kv = client
            .kv_client()
            .max_decoding_message_size(options.max_request_bytes.max(4 << 20) + (1 << 20));
        Ok(EtcdStore {
            client,
            kv,
            keys: Arc::new(Keys::new(&options.key_prefix)),
            options: Arc::new(options),
        })
    }

    /// The options.
    pub fn options(&self) -> &EtcdOptions {
        &self.options
    }

    /// The etcd client, for business keys beside the barrier.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sends `txn`, again if it could not be sent at all (see [`never_sent`]).
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, Error> {
        let mut attempt = 1;
        loop {
            match self.kv.clone().txn(txn.clone()).await {
                Err(e) if attempt < SEND_ATTEMPTS && never_sent(&e) => attempt += 1,
                result => return result.map_err(map_err),
            }
        }
    }

    /// Reads a range, again if it could not be sent at all.
    pub(crate) async fn range(
        &self,
        from: Vec<u8>,
        options: GetOptions,
    ) -> Result<GetResponse, Error> {
        let mut attempt = 1;
        loop {
            match self
                .kv
                .clone()
                .get(from.clone(), Some(options.clone()))
                .await
            {
                Err(e) if attempt < SEND_ATTEMPTS && never_sent(&e) => attempt += 1,
                result => return result.map_err(map_err),
            }
        }
    }

    fn snapshot(&self, key: &Key, responses: Vec<TxnOpResponse>) -> Result<Snapshot, Error> {
        let mut gets = responses.into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let (Some(mut meta), Some(mut outcome)) = (gets.next(), gets.next()) else {
            return Err(Error::permanent(format!(
                "etcd answered a read of {key} without its two ranges"
            )));
        };
        let Some(meta) = meta.take_kvs().into_iter().next() else {
            return Ok(Snapshot {
                rev: 0,
                stored: None,
            });
        };
        let outcome = outcome
            .take_kvs()
            .into_iter()
            .next()
            .map(|kv| kv.into_key_value().1);
        let rev = meta.mod_revision();
        let stored = decode(key, meta.value(), outcome)?;
        Ok(Snapshot {
            rev,
            stored: Some(stored),
        })
    }

    fn read_ops(&self, key: &Key) -> Vec<TxnOp> {
        vec![
            TxnOp::get(self.keys.meta(key), None),
            TxnOp::get(self.keys.outcome(key), None),
        ]
    }

    /// The record, by one linearizable read-only transaction over its two keys.
    async fn read(&self, key: &Key) -> Result<Snapshot, Error> {
        let resp = self.txn(Txn::new().and_then(self.read_ops(key))).await?;
        self.snapshot(key, resp.op_responses())
    }

    /// Writes `ops` if the record's metadata still has `mod_revision == rev` (0: absent);
    /// otherwise returns the record as it is now.
    async fn swap(&self, key: &Key, rev: i64, ops: Vec<TxnOp>) -> Result<Swap, Error> {
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(
                self.keys.meta(key),
                CompareOp::Equal,
                rev,
            )])
            .and_then(ops)
            .or_else(self.read_ops(key));
        let resp = self.txn(txn).await?;
        if resp.succeeded() {
            Ok(Swap::Done)
        } else {
            self.snapshot(key, resp.op_responses()).map(Swap::Lost)
        }
    }

    /// Reads `key` and applies `change` to it with compare-and-swap until the write happens
    /// or `change` declines (returns `Ok(None)`, or an error such as `LeaseLost`).
    async fn update<T>(
        &self,
        key: &Key,
        mut change: impl FnMut(Option<&Record>) -> Result<(T, Option<Vec<TxnOp>>), Error>,
    ) -> Result<T, Error> {
        let mut snap = self.read(key).await?;
        for _ in 0..MAX_SWAPS {
            let (answer, ops) = change(snap.record())?;
            let Some(ops) = ops else {
                return Ok(answer);
            };
            match self.swap(key, snap.rev, ops).await? {
                Swap::Done => return Ok(answer),
                Swap::Lost(now) => snap = now,
            }
        }
        Err(contention(key))
    }

    fn put_meta(&self, record: &Record, claim: u64) -> Result<TxnOp, Error> {
        Ok(TxnOp::put(
            self.keys.meta(&record.key),
            encode_meta(record, claim)?,
            None,
        ))
    }

    async fn finish(
        &self,
        lease: &Lease,
        failed: bool,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        let size = response.len() + 2 * self.keys.meta(&lease.key).len() + REQUEST_OVERHEAD;
        if size > self.options.max_request_bytes {
            return Err(Error::TooLarge {
                what: "outcome",
                size: response.len(),
                limit: self
                    .options
                    .max_request_bytes
                    .saturating_sub(size - response.len()),
            });
        }
        self.update(&lease.key, |rec| {
            let next = model::finish(rec, lease, failed, response, expires_at, now)?;
            Ok((
                (),
                Some(vec![
                    self.put_meta(&next, 0)?,
                    TxnOp::put(self.keys.outcome(&lease.key), response.to_vec(), None),
                ]),
            ))
        })
        .await
    }

    async fn release_once(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        self.update(&lease.key, |rec| {
            let next = model::release(rec, lease, now)?;
            Ok(((), Some(vec![self.put_meta(&next, 0)?])))
        })
        .await
    }

    /// Undoes a claim whose `begin` never answered: if the claim may still land (the record
    /// still has `mod_revision == rev`), writes the claim as released, so that it cannot;
    /// if it landed (the record carries `claim`), releases it. Either way the key is as if
    /// the claim had happened and been released: the next `begin` acquires with a larger
    /// token.
    async fn abandon(&self, mut rev: i64, mut claimed: Record, claim: u64, now: Timestamp) {
        let key = claimed.key.clone();
        let lease = Lease {
            key: key.clone(),
            token: claimed.token,
            lease_until: Timestamp::MIN,
            reclaimed: false,
        };
        let mut attempt = 0;
        while attempt < ABANDON_ATTEMPTS {
            let Ok(released) = model::release(Some(&claimed), &lease, now) else {
                return;
            };
            let ops = match self.put_meta(&released, 0) {
                Ok(op) => vec![op],
                Err(_) => return,
            };
            match self.swap(&key, rev, ops).await {
                Ok(Swap::Done) => return,
                Ok(Swap::Lost(snap)) => match snap.stored {
                    Some(s) if s.claim == claim => {
                        rev = snap.rev;
                        claimed = s.record;
                    }
                    _ => return,
                },
                Err(e) => {
                    tracing::debug!(key = %key, error = %e, "retrying to undo an abandoned claim");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
        tracing::warn!(key = %key, "could not undo an abandoned claim; it holds until its lease runs out");
    }

    /// Every metadata key and value from `from` on, one page (at `revision`, or the newest
    /// when 0). Returns the page, the revision it was read at, and whether more follow.
    async fn page(
        &self,
        from: Vec<u8>,
        revision: i64,
    ) -> Result<(Vec<(Vec<u8>, Vec<u8>, i64)>, i64, bool), Error> {
        let (_, end) = self.keys.meta_range();
        let limit = i64::try_from(self.options.page_size).unwrap_or(i64::MAX);
        let options = GetOptions::new()
            .with_range(end)
            .with_limit(limit)
            .with_revision(revision);
        let mut resp = self.range(from, options).await?;
        let at = resp.header().map(|h| h.revision()).unwrap_or(revision);
        let more = resp.more();
        let kvs = resp
            .take_kvs()
            .into_iter()
            .map(|kv| {
                let rev = kv.mod_revision();
                let (k, v) = kv.into_key_value();
                (k, v, rev)
            })
            .collect();
        Ok((kvs, at, more))
    }

    /// Deletes the records in `chunk` (metadata key, `mod_revision`) that did not change
    /// since they were read: one transaction for the chunk, one per record if any changed.
    async fn delete_unchanged(&self, chunk: &[(Vec<u8>, i64)]) -> Result<u64, Error> {
        let txn = |items: &[(Vec<u8>, i64)]| {
            Txn::new()
                .when(
                    items
                        .iter()
                        .map(|(k, rev)| Compare::mod_revision(k.clone(), CompareOp::Equal, *rev))
                        .collect::<Vec<_>>(),
                )
                .and_then(
                    items
                        .iter()
                        .flat_map(|(k, _)| {
                            [
                                TxnOp::delete(k.clone(), None),
                                TxnOp::delete(self.keys.outcome_of(k), None),
                            ]
                        })
                        .collect::<Vec<_>>(),
                )
        };
        if self.txn(txn(chunk)).await?.succeeded() {
            return Ok(chunk.len() as u64);
        }
        let mut deleted = 0;
        for item in chunk {
            if self.txn(txn(std::slice::from_ref(item))).await?.succeeded() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

fn contention(key: &Key) -> Error {
    Error::retryable(format!(
        "record {key} changed under {MAX_SWAPS} compare-and-swap rounds in a row"
    ))
}

/// The first key after `key`.
pub(crate) fn next_key(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

#[async_trait]
impl Store for EtcdStore {
    /// Atomic, fenced, linearizable, durable (etcd fsyncs its log before it answers),
    /// survives the loss of a minority of members, shared; not transactional (see the crate
    /// docs for why).
    fn guarantees(&self) -> Guarantees {
        Guarantees::distributed().with_transactional(false)
    }

    async fn begin(
        &self,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        let mut snap = self.read(key).await?;
        for _ in 0..MAX_SWAPS {
            let (answer, next) = model::begin(snap.record(), key, fingerprint, deadlines, now);
            let Some(next) = next else {
                return Ok(answer);
            };
            // A claim id nobody else writes: it tells an abandoned claim from a later one.
            let claim = rand::random::<u64>() | 1;
            let op = self.put_meta(&next, claim)?;
            let store = self.clone();
            let rev = snap.rev;
            let mut pending =
                Pending::new(async move { store.abandon(rev, next, claim, now).await });
            match self.swap(key, snap.rev, vec![op]).await {
                Ok(Swap::Done) => {
                    pending.disarm();
                    return Ok(answer);
                }
                Ok(Swap::Lost(current)) => {
                    pending.disarm();
                    snap = current;
                }
                Err(e) => {
                    if !e.is_retryable() {
                        // Refused by the server: nothing can land.
                        pending.disarm();
                    }
                    return Err(e);
                }
            }
        }
        Err(contention(key))
    }

    async fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.finish(lease, false, response, expires_at, now).await
    }

    async fn fail(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.finish(lease, true, response, expires_at, now).await
    }

    async fn extend(
        &self,
        lease: &Lease,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Lease, Error> {
        self.update(&lease.key, |rec| {
            let (extended, next) = model::extend(rec, lease, deadlines, now)?;
            Ok((extended, Some(vec![self.put_meta(&next, 0)?])))
        })
        .await
    }

    /// Fenced like the others. If the call is dropped or fails before it knows whether the
    /// release was written, a background task finishes it.
    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        let store = self.clone();
        let again = lease.clone();
        let mut pending = Pending::new(async move {
            for attempt in 0..ABANDON_ATTEMPTS {
                match store.release_once(&again, now).await {
                    Err(e) if e.is_retryable() => tokio::time::sleep(backoff(attempt)).await,
                    _ => return,
                }
            }
        });
        let result = self.release_once(lease, now).await;
        if !matches!(&result, Err(e) if e.is_retryable()) {
            pending.disarm();
        }
        result
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
        Ok(self.read(key).await?.stored.map(|s| s.record))
    }

    /// Scans the metadata range in pages of [`EtcdOptions::page_size`] and deletes expired
    /// records (both keys) in transactions that check each record is unchanged since read.
    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        let mut deleted = 0u64;
        let (mut from, _) = self.keys.meta_range();
        while (deleted as usize) < batch {
            let (page, _, more) = self.page(from, 0).await?;
            let mut expired = Vec::new();
            for (k, v, rev) in &page {
                let key = self.keys.parse_meta(k)?;
                if decode_expires_at(&key, v)? <= now.as_millis() {
                    expired.push((k.clone(), *rev));
                }
            }
            let room = batch - deleted as usize;
            expired.truncate(room);
            for chunk in expired.chunks(PURGE_CHUNK) {
                deleted += self.delete_unchanged(chunk).await?;
            }
            match page.last() {
                Some((last, _, _)) if more => from = next_key(last),
                _ => break,
            }
        }
        Ok(deleted)
    }

    /// One range read of the metadata keys, one of their outcomes (see [`crate`]'s key
    /// layout for the order: by scope length, then scope, then id).
    async fn list(
        &self,
        scope: Option<&str>,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Option<Vec<Record>>, Error> {
        self.list_page(scope, after, limit).await.map(Some)
    }

    /// Counts the records of one consistent snapshot: every page is read at the revision of
    /// the first. A compaction of that revision during the scan is a retryable error.
    async fn stats(&self) -> Result<Stats, Error> {
        let mut stats = Stats::default();
        let (mut from, _) = self.keys.meta_range();
        let mut revision = 0;
        loop {
            let (page, at, more) = self.page(from, revision).await?;
            revision = at;
            for (k, v, _) in &page {
                let key = self.keys.parse_meta(k)?;
                stats.add(decode_state(&key, v)?, 1)?;
            }
            match page.last() {
                Some((last, _, _)) if more => from = next_key(last),
                _ => return Ok(stats),
            }
        }
    }
}
