#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use foundationdb::api::NetworkAutoStop;
use foundationdb::options::{MutationType, StreamingMode, TransactionOption};
use foundationdb::tuple::Subspace;
use foundationdb::{Database, FdbError, RangeOption, Transaction};
use futures::future::BoxFuture;
use idem_core::{
    model, settle, tx_claim, Begin, Deadlines, Error, Failure, Fingerprint, Guarantees, Key, Lease,
    Record, RecordRow, Response, RunError, State, Stats, Store, Timestamp, TransactionalStore,
    TxClaim, TxRequest,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use foundationdb;

/// FoundationDB's largest value: a record (with its response) must fit in it.
pub const MAX_VALUE_BYTES: usize = 100_000;

/// The record format this crate writes (first element of the packed value).
const FORMAT: i64 = 1;

/// FoundationDB's error code for a transaction over its 10 MB limit.
const TRANSACTION_TOO_LARGE: i32 = 2101;
/// FoundationDB's error code for a transaction that ran past its timeout.
const TRANSACTION_TIMED_OUT: i32 = 1031;

/// The operation [`FdbStore`] runs in transactional mode.
///
/// **FoundationDB may run it more than once**: after a conflict or a retryable error the
/// whole transaction is retried, the operation included. It must touch nothing but the
/// transaction it is given (no HTTP calls, no e-mails, no counters in memory): only then is
/// every run but the committed one without effect.
pub type FdbOperation<T, F, E> =
    Box<dyn for<'t> Fn(&'t Transaction) -> BoxFuture<'t, Result<T, Failure<F, E>>> + Send + Sync>;

/// Per-transaction limits, so that an unreachable cluster is an error, not a hang.
#[derive(Clone, Debug)]
pub struct FdbOptions {
    /// Timeout of one transaction, retries included. Default 5 s (FoundationDB's own limit
    /// on a transaction's lifetime is 5 s as well).
    pub timeout: Duration,
    /// How many times a transaction is retried after a conflict or a retryable error.
    /// Default 20.
    pub retry_limit: u32,
}

impl Default for FdbOptions {
    fn default() -> Self {
        FdbOptions {
            timeout: Duration::from_secs(5),
            retry_limit: 20,
        }
    }
}

static NETWORK: Mutex<Option<NetworkAutoStop>> = Mutex::new(None);
static BOOT: OnceLock<Result<(), String>> = OnceLock::new();

/// Starts the FoundationDB client network once per process; later calls return at once.
/// [`FdbStore::open`] calls it.
pub fn start_network() -> Result<(), Error> {
    BOOT.get_or_init(|| {
        // SAFETY: the handle is kept in a static and dropped by `stop_network`, which the
        // application calls before it exits; FoundationDB allows one network per process,
        // which the `OnceLock` guarantees.
        let handle = foundationdb::api::FdbApiBuilder::default()
            .build()
            .and_then(|builder| unsafe { builder.boot() })
            .map_err(|e| format!("cannot start the FoundationDB client network: {e}"))?;
        *NETWORK.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    })
    .clone()
    .map_err(Error::Config)
}

/// Stops the client network. Call it once at the end of `main`, after the last store is
/// used; FoundationDB cannot restart the network in the same process.
pub fn stop_network() {
    drop(NETWORK.lock().unwrap_or_else(|p| p.into_inner()).take());
}

/// A strictly serializable idempotency store in FoundationDB.
///
/// # Key layout
///
/// Inside the store's subspace (tuple-encoded, one per store):
/// - `("rec", scope, id)` → the record, a packed tuple `(1, state, token, lease_until?,
///   created_at, updated_at, expires_at, claim_id, reclaimed, fingerprint?, response?)`;
/// - `("exp", expires_at, scope, id)` → empty: the purge index;
/// - `("count", state)` → a little-endian counter maintained with atomic adds, for `stats`.
///
/// Every operation is one transaction that reads the record (adding it to the read-conflict
/// range) and writes its next version, so concurrent claims of one key conflict and exactly
/// one commits.
#[derive(Clone)]
pub struct FdbStore {
    db: Arc<Database>,
    space: Subspace,
    options: FdbOptions,
}

impl std::fmt::Debug for FdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbStore")
            .field("subspace", &self.space.bytes())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Why one attempt of a transaction stopped.
enum Abort<E> {
    /// A FoundationDB error: retried through `on_error` if it is retryable.
    Fdb(FdbError),
    /// A final answer: returned as it is.
    Run(RunError<E>),
}

impl<E> From<FdbError> for Abort<E> {
    fn from(e: FdbError) -> Self {
        Abort::Fdb(e)
    }
}

impl<E> From<Error> for Abort<E> {
    fn from(e: Error) -> Self {
        Abort::Run(RunError::Barrier(e))
    }
}

/// One attempt of a transaction: it gets the transaction (and whether an earlier attempt
/// may have committed) and hands the transaction back with its result.
type Attempt<'a, T, E> = Box<
    dyn FnMut(Transaction, bool) -> BoxFuture<'a, (Transaction, Result<T, Abort<E>>)> + Send + 'a,
>;

fn fdb_err(e: FdbError) -> Error {
    let retryable = e.is_retryable() || e.code() == TRANSACTION_TIMED_OUT;
    Error::Store {
        retryable,
        source: Box::new(e),
    }
}

fn barrier_only<T>(r: Result<T, RunError<Infallible>>) -> Result<T, Error> {
    r.map_err(|e| match e {
        RunError::Barrier(e) => e,
        RunError::Operation(never) => match never {},
    })
}

/// A unique id per claim attempt, so that a retry after `commit_unknown_result` can tell
/// its own committed claim from another worker's.
fn claim_id() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    RandomState::new().hash_one((seed, NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// A claim attempt: its id, and whether an earlier try of it may have committed.
#[derive(Clone, Copy)]
struct Attempted {
    id: u64,
    maybe_committed: bool,
}

/// A record as stored, with the bookkeeping only FoundationDB needs.
struct Stored {
    record: Record,
    claim: u64,
    reclaimed: bool,
}

type Packed = (
    i64,
    String,
    i64,
    Option<i64>,
    i64,
    i64,
    i64,
    u64,
    bool,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
);

impl FdbStore {
    /// Opens the cluster at `cluster_file` (`None`: the default file) and uses the subspace
    /// `("idem", name)`. Starts the client network if needed.
    pub fn open(
        cluster_file: Option<&str>,
        name: &str,
        options: FdbOptions,
    ) -> Result<Self, Error> {
        start_network()?;
        let db = Database::new(cluster_file).map_err(fdb_err)?;
        Ok(Self::from_database(
            Arc::new(db),
            Subspace::all().subspace(&("idem", name)),
            options,
        ))
    }

    /// A store on an open database and a subspace of your choosing.
    pub fn from_database(db: Arc<Database>, space: Subspace, options: FdbOptions) -> Self {
        FdbStore { db, space, options }
    }

    /// The database.
    pub fn database(&self) -> &Arc<Database> {
        &self.db
    }

    /// The store's subspace.
    pub fn subspace(&self) -> &Subspace {
        &self.space
    }

    fn rec_key(&self, key: &Key) -> Vec<u8> {
        self.space.pack(&("rec", key.scope(), key.id()))
    }

    fn exp_key(&self, expires_at: Timestamp, key: &Key) -> Vec<u8> {
        self.space
            .pack(&("exp", expires_at.as_millis(), key.scope(), key.id()))
    }

    fn count_key(&self, state: &str) -> Vec<u8> {
        self.space.pack(&("count", state))
    }

    async fn read(
        &self,
        trx: &Transaction,
        key: &Key,
    ) -> Result<Option<Stored>, Abort<Infallible>> {
        let Some(raw) = trx.get(&self.rec_key(key), false).await? else {
            return Ok(None);
        };
        Ok(Some(decode(key, &raw).map_err(Abort::from)?))
    }

    /// Writes `next` over `prev` (if any), keeping the purge index and counters in step.
    fn write(&self, trx: &Transaction, prev: Option<&Record>, next: &Stored) -> Result<(), Error> {
        let value = encode(next)?;
        let key = &next.record.key;
        if let Some(prev) = prev {
            trx.clear(&self.exp_key(prev.expires_at, key));
            self.count(trx, prev.state.name(), -1);
        }
        trx.set(&self.rec_key(key), &value);
        trx.set(&self.exp_key(next.record.expires_at, key), b"");
        self.count(trx, next.record.state.name(), 1);
        Ok(())
    }

    fn count(&self, trx: &Transaction, state: &str, delta: i64) {
        trx.atomic_op(
            &self.count_key(state),
            &delta.to_le_bytes(),
            MutationType::Add,
        );
    }

    fn new_trx(&self) -> Result<Transaction, Error> {
        let trx = self.db.create_trx().map_err(fdb_err)?;
        let ms = i32::try_from(self.options.timeout.as_millis()).unwrap_or(i32::MAX);
        trx.set_option(TransactionOption::Timeout(ms))
            .map_err(fdb_err)?;
        let retries = i32::try_from(self.options.retry_limit).unwrap_or(i32::MAX);
        trx.set_option(TransactionOption::RetryLimit(retries))
            .map_err(fdb_err)?;
        Ok(trx)
    }

    /// The retry loop: runs `attempt` until it commits, returns a final answer, or
    /// FoundationDB gives up (timeout, retry limit, non-retryable error). `attempt` learns
    /// whether an earlier attempt may have committed (`commit_unknown_result`), so it can
    /// re-read and recognise its own write instead of applying it twice.
    async fn run<T, E>(&self, mut attempt: Attempt<'_, T, E>) -> Result<T, RunError<E>> {
        let mut trx = self.new_trx()?;
        let mut maybe_committed = false;
        loop {
            let (returned, result) = attempt(trx, maybe_committed).await;
            trx = returned;
            match result {
                Ok(value) => match trx.commit().await {
                    Ok(_) => return Ok(value),
                    Err(e) => {
                        maybe_committed |= e.is_maybe_committed();
                        if e.code() == TRANSACTION_TOO_LARGE {
                            return Err(Error::permanent(e).into());
                        }
                        trx = e.on_error().await.map_err(fdb_err)?;
                    }
                },
                Err(Abort::Fdb(e)) => trx = trx.on_error(e).await.map_err(fdb_err)?,
                Err(Abort::Run(e)) => return Err(e),
            }
        }
    }

    /// Claims `key` inside `trx`: the shared first step of `begin` and of transactional mode.
    /// After a maybe-committed attempt, a record carrying this call's `claim` is our own.
    async fn claim_in(
        &self,
        trx: &Transaction,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
        claim: Attempted,
    ) -> Result<(Begin, Option<Record>), Abort<Infallible>> {
        let stored = self.read(trx, key).await?;
        if claim.maybe_committed {
            if let Some(s) = stored.as_ref().filter(|s| s.claim == claim.id) {
                if let State::InProgress { token, lease_until } = s.record.state {
                    let lease = Lease {
                        key: key.clone(),
                        token,
                        lease_until,
                        reclaimed: s.reclaimed,
                    };
                    return Ok((Begin::Acquired(lease), Some(s.record.clone())));
                }
            }
        }
        let prev = stored.as_ref().map(|s| &s.record);
        let (answer, next) = model::begin(prev, key, fingerprint, deadlines, now);
        if let (Begin::Acquired(lease), Some(next)) = (&answer, &next) {
            self.write(
                trx,
                prev,
                &Stored {
                    record: next.clone(),
                    claim: claim.id,
                    reclaimed: lease.reclaimed,
                },
            )?;
        }
        Ok((answer, next))
    }

    async fn finish(
        &self,
        lease: &Lease,
        failed: bool,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        barrier_only(
            self.run(Box::new(|trx, maybe_committed| {
                Box::pin(async move {
                    let result = async {
                        let stored = self.read(&trx, &lease.key).await?;
                        let prev = stored.as_ref().map(|s| &s.record);
                        if maybe_committed {
                            if let Some(rec) = prev {
                                let ours = rec.token == lease.token
                                    && match (&rec.state, failed) {
                                        (State::Completed { response: r }, false)
                                        | (State::Failed { response: r }, true) => r == response,
                                        _ => false,
                                    };
                                if ours {
                                    return Ok(());
                                }
                            }
                        }
                        let next = model::finish(prev, lease, failed, response, expires_at, now)?;
                        let claim = stored.as_ref().map_or(0, |s| s.claim);
                        self.write(
                            &trx,
                            prev,
                            &Stored {
                                record: next,
                                claim,
                                reclaimed: false,
                            },
                        )?;
                        Ok(())
                    }
                    .await;
                    (trx, result)
                })
            }))
            .await,
        )
    }
}

fn encode(s: &Stored) -> Result<Vec<u8>, Error> {
    let row = RecordRow::from_record(&s.record)?;
    let packed: Packed = (
        FORMAT,
        row.state,
        row.token,
        row.lease_until,
        row.created_at,
        row.updated_at,
        row.expires_at,
        s.claim,
        s.reclaimed,
        row.fingerprint,
        row.response,
    );
    let bytes = foundationdb::tuple::pack(&packed);
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(Error::TooLarge {
            what: "stored record (response included)",
            size: bytes.len(),
            limit: MAX_VALUE_BYTES,
        });
    }
    Ok(bytes)
}

fn decode(key: &Key, raw: &[u8]) -> Result<Stored, Error> {
    if raw.first() != Some(&0x15) || raw.get(1) != Some(&1) {
        // A packed tuple starting with the integer 1 begins 0x15 0x01.
        return Err(Error::UnknownFormat {
            format: format!(
                "FoundationDB record of {key} starting {:02x?}",
                &raw[..raw.len().min(2)]
            ),
        });
    }
    let (
        _,
        state,
        token,
        lease_until,
        created_at,
        updated_at,
        expires_at,
        claim,
        reclaimed,
        fingerprint,
        response,
    ): Packed = foundationdb::tuple::unpack(raw).map_err(|e| Error::Corrupt(Box::new(e)))?;
    let record = RecordRow {
        fingerprint,
        state,
        token,
        lease_until,
        response,
        created_at,
        updated_at,
        expires_at,
    }
    .into_record(key)?;
    Ok(Stored {
        record,
        claim,
        reclaimed,
    })
}

#[async_trait]
impl Store for FdbStore {
    fn guarantees(&self) -> Guarantees {
        Guarantees::distributed()
    }

    async fn begin(
        &self,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        let claim = claim_id();
        barrier_only(
            self.run(Box::new(|trx, maybe_committed| {
                Box::pin(async move {
                    let result = async {
                        let (answer, _) = self
                            .claim_in(
                                &trx,
                                key,
                                fingerprint,
                                deadlines,
                                now,
                                Attempted {
                                    id: claim,
                                    maybe_committed,
                                },
                            )
                            .await?;
                        Ok(answer)
                    }
                    .await;
                    (trx, result)
                })
            }))
            .await,
        )
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
        barrier_only(
            self.run(Box::new(|trx, maybe_committed| {
                Box::pin(async move {
                    let result = async {
                        let stored = self.read(&trx, &lease.key).await?;
                        let prev = stored.as_ref().map(|s| &s.record);
                        if maybe_committed {
                            if let Some(State::InProgress { token, lease_until }) =
                                prev.map(|r| &r.state)
                            {
                                if *token == lease.token && *lease_until == deadlines.lease_until {
                                    return Ok(Lease {
                                        lease_until: *lease_until,
                                        ..lease.clone()
                                    });
                                }
                            }
                        }
                        let (extended, next) = model::extend(prev, lease, deadlines, now)?;
                        let (claim, reclaimed) = stored
                            .as_ref()
                            .map_or((0, false), |s| (s.claim, s.reclaimed));
                        self.write(
                            &trx,
                            prev,
                            &Stored {
                                record: next,
                                claim,
                                reclaimed,
                            },
                        )?;
                        Ok(extended)
                    }
                    .await;
                    (trx, result)
                })
            }))
            .await,
        )
    }

    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        barrier_only(
            self.run(Box::new(|trx, maybe_committed| {
                Box::pin(async move {
                    let result = async {
                        let stored = self.read(&trx, &lease.key).await?;
                        let prev = stored.as_ref().map(|s| &s.record);
                        if maybe_committed {
                            if let Some(State::InProgress { token, lease_until }) =
                                prev.map(|r| &r.state)
                            {
                                if *token == lease.token && *lease_until == Timestamp::MIN {
                                    return Ok(());
                                }
                            }
                        }
                        let next = model::release(prev, lease, now)?;
                        let (claim, reclaimed) = stored
                            .as_ref()
                            .map_or((0, false), |s| (s.claim, s.reclaimed));
                        self.write(
                            &trx,
                            prev,
                            &Stored {
                                record: next,
                                claim,
                                reclaimed,
                            },
                        )?;
                        Ok(())
                    }
                    .await;
                    (trx, result)
                })
            }))
            .await,
        )
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
        barrier_only(
            self.run(Box::new(|trx, _| {
                Box::pin(async move {
                    let result = async { Ok(self.read(&trx, key).await?.map(|s| s.record)) }.await;
                    (trx, result)
                })
            }))
            .await,
        )
    }

    /// Reads up to `batch` entries of the expiry index up to `now` and deletes their records,
    /// in one transaction (keep `batch` in the hundreds: FoundationDB limits a transaction to
    /// 5 s and 10 MB).
    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        barrier_only(
            self.run(Box::new(|trx, _| {
                Box::pin(async move {
                    let result = async {
                        let begin = self.space.pack(&("exp",));
                        let end = self.space.pack(&("exp", now.as_millis().saturating_add(1)));
                        let range = RangeOption {
                            limit: Some(batch.max(1)),
                            mode: StreamingMode::WantAll,
                            ..RangeOption::from((begin, end))
                        };
                        let entries: Vec<Vec<u8>> = trx
                            .get_range(&range, 1, false)
                            .await?
                            .iter()
                            .take(batch)
                            .map(|kv| kv.key().to_vec())
                            .collect();
                        let mut deleted = 0u64;
                        for index_key in entries {
                            let (_, _, scope, id): (String, i64, String, String) = self
                                .space
                                .unpack(&index_key)
                                .map_err(|e| Error::Corrupt(Box::new(e)))?;
                            let key = Key::new(scope, id)?;
                            trx.clear(&index_key);
                            if let Some(s) = self.read(&trx, &key).await? {
                                trx.clear(&self.rec_key(&key));
                                self.count(&trx, s.record.state.name(), -1);
                                deleted += 1;
                            }
                        }
                        Ok(deleted)
                    }
                    .await;
                    (trx, result)
                })
            }))
            .await,
        )
    }

    async fn stats(&self) -> Result<Stats, Error> {
        barrier_only(
            self.run(Box::new(|trx, _| {
                Box::pin(async move {
                    let result = async {
                        let mut stats = Stats::default();
                        for state in ["in_progress", "completed", "failed"] {
                            let n = match trx.get(&self.count_key(state), true).await? {
                                Some(v) => {
                                    let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| {
                                        Error::Corrupt(
                                            format!("counter {state} is not 8 bytes").into(),
                                        )
                                    })?;
                                    i64::from_le_bytes(bytes).max(0) as u64
                                }
                                None => 0,
                            };
                            stats.add(state, n)?;
                        }
                        Ok(stats)
                    }
                    .await;
                    (trx, result)
                })
            }))
            .await,
        )
    }
}

impl TransactionalStore for FdbStore {
    type Operation<T, F, E> = FdbOperation<T, F, E>;

    /// Claim, business writes and outcome in one FoundationDB transaction.
    ///
    /// FoundationDB never blocks: a concurrent duplicate runs optimistically, exactly one of
    /// the conflicting transactions commits, and the others are retried, find the outcome and
    /// replay it. So [`idem_core::TxPolicy::Wait`] and `NoWait` behave the same here, and the
    /// operation may run more than once (see [`FdbOperation`]) while only one run commits.
    /// A permanent failure resets the transaction (dropping the business writes), claims
    /// again and records `Failed`. After `commit_unknown_result` the retry re-reads the
    /// record and, if its own outcome is there, returns it instead of writing again.
    async fn transact<T, F, E>(
        &self,
        request: TxRequest<'_>,
        op: FdbOperation<T, F, E>,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
    {
        let claim = claim_id();
        let TxRequest {
            key,
            fingerprint,
            deadlines,
            expires_at,
            now,
            ..
        } = request;
        let fp = fingerprint.as_ref();
        let op = &op;
        let fresh = Attempted {
            id: claim,
            maybe_committed: false,
        };
        self.run(Box::new(move |mut trx, maybe_committed| {
            Box::pin(async move {
                let result = async {
                    if maybe_committed {
                        if let Some(s) = self.read(&trx, key).await.map_err(lift_abort)? {
                            let mine = s.claim == claim;
                            match &s.record.state {
                                State::Completed { response } if mine => {
                                    return Ok(Response {
                                        replayed: false,
                                        ..Response::from_stored(false, response)?
                                    })
                                }
                                State::Failed { response } if mine => {
                                    return Ok(Response {
                                        replayed: false,
                                        ..Response::from_stored(true, response)?
                                    })
                                }
                                _ => {}
                            }
                        }
                    }
                    let (answer, _) = self
                        .claim_in(&trx, key, fp, deadlines, now, fresh)
                        .await
                        .map_err(lift_abort)?;
                    let lease = match tx_claim(answer, now)? {
                        TxClaim::Acquired(lease) => lease,
                        TxClaim::Replay(response) => return Ok(response),
                    };
                    let settled = settle(op(&trx).await).map_err(Abort::Run)?;
                    let claimed = if settled.failed {
                        // Drop the business writes, then claim again in the clean transaction.
                        trx.reset();
                        match self
                            .claim_in(&trx, key, fp, deadlines, now, fresh)
                            .await
                            .map_err(lift_abort)?
                        {
                            (Begin::Acquired(_), Some(rec)) => rec,
                            _ => return Err(Abort::Fdb(FdbError::from_code(1020))),
                        }
                    } else {
                        match self.read(&trx, key).await.map_err(lift_abort)? {
                            Some(s) => s.record,
                            None => return Err(Abort::Fdb(FdbError::from_code(1020))),
                        }
                    };
                    let done = model::finish(
                        Some(&claimed),
                        &lease_for(&claimed, &lease),
                        settled.failed,
                        &settled.bytes,
                        expires_at,
                        now,
                    )?;
                    self.write(
                        &trx,
                        Some(&claimed),
                        &Stored {
                            record: done,
                            claim,
                            reclaimed: lease.reclaimed,
                        },
                    )?;
                    Ok(settled.into_response())
                }
                .await;
                (trx, result)
            })
        }))
        .await
    }
}

/// The lease as it stands in `claimed` (the token may differ after a re-claim).
fn lease_for(claimed: &Record, lease: &Lease) -> Lease {
    match claimed.state {
        State::InProgress { token, lease_until } => Lease {
            token,
            lease_until,
            ..lease.clone()
        },
        _ => lease.clone(),
    }
}

/// Widens an attempt's error from a lease-mode step (which has no operation error) to a
/// transactional one.
fn lift_abort<E>(a: Abort<Infallible>) -> Abort<E> {
    match a {
        Abort::Fdb(e) => Abort::Fdb(e),
        Abort::Run(RunError::Barrier(e)) => Abort::Run(RunError::Barrier(e)),
        Abort::Run(RunError::Operation(never)) => match never {},
    }
}
