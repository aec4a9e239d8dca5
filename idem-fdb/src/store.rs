//! [`FdbStore`]: the client network, constructors, the retry loop, and the lease-mode
//! [`Store`].

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use foundationdb::api::NetworkAutoStop;
use foundationdb::options::{MutationType, StreamingMode, TransactionOption};
use foundationdb::tuple::Subspace;
use foundationdb::{Database, FdbError, RangeOption, Transaction};
use futures::future::BoxFuture;
use idem_core::backend::model;
use idem_core::{
    Begin, Deadlines, Error, Fingerprint, Guarantees, Key, Lease, Record, RunError, State, Stats,
    Store, Timestamp,
};

use crate::error::{map_err, TRANSACTION_TOO_LARGE};
use crate::keys::{decode, encode, Keys, Stored};
use crate::options::FdbOptions;

static NETWORK: Mutex<Option<NetworkAutoStop>> = Mutex::new(None);
static BOOT: OnceLock<Result<(), String>> = OnceLock::new();

/// Starts the FoundationDB client network once per process; later calls return at once.
/// [`FdbStore::connect`] calls it.
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
/// Every operation is one transaction that reads the record (adding it to the read-conflict
/// range) and writes its next version, so concurrent claims of one key conflict and exactly
/// one commits. The key layout is in the crate docs.
#[derive(Clone)]
pub struct FdbStore {
    db: Arc<Database>,
    pub(crate) keys: Keys,
    options: FdbOptions,
}

impl std::fmt::Debug for FdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbStore")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Why one attempt of a transaction stopped.
pub(crate) enum Abort<E> {
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
pub(crate) type Attempt<'a, T, E> = Box<
    dyn FnMut(Transaction, bool) -> BoxFuture<'a, (Transaction, Result<T, Abort<E>>)> + Send + 'a,
>;

fn barrier_only<T>(r: Result<T, RunError<Infallible>>) -> Result<T, Error> {
    r.map_err(|e| match e {
        RunError::Barrier(e) => e,
        RunError::Operation(never) => match never {},
    })
}

/// A unique id per claim attempt, so that a retry after `commit_unknown_result` can tell
/// its own committed claim from another worker's.
pub(crate) fn claim_id() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    RandomState::new().hash_one((seed, NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// A claim attempt: its id, and whether an earlier try of it may have committed.
#[derive(Clone, Copy)]
pub(crate) struct Attempted {
    pub(crate) id: u64,
    pub(crate) maybe_committed: bool,
}

impl FdbStore {
    /// Opens the cluster named by `cluster_file` (`None`: the default cluster file) with
    /// [`FdbOptions::default`]; see [`FdbStore::connect_with`].
    pub async fn connect(cluster_file: Option<&str>) -> Result<Self, Error> {
        Self::connect_with(cluster_file, FdbOptions::default()).await
    }

    /// Opens the cluster named by `cluster_file` (`None`: the default cluster file) with
    /// `options`, starting the client network if needed, and checks that the cluster
    /// answers (it reads a version, within the options' timeout: an unreachable cluster is
    /// a retryable error here rather than at the first call). There is no schema to migrate.
    pub async fn connect_with(
        cluster_file: Option<&str>,
        options: FdbOptions,
    ) -> Result<Self, Error> {
        options.validate()?;
        start_network()?;
        let db = Database::new(cluster_file).map_err(map_err)?;
        let store = Self::build(Arc::new(db), options);
        store.new_trx()?.get_read_version().await.map_err(map_err)?;
        Ok(store)
    }

    /// A store on an open database (its client network started), with `options`.
    pub fn from_database(db: Arc<Database>, options: FdbOptions) -> Result<Self, Error> {
        options.validate()?;
        Ok(Self::build(db, options))
    }

    fn build(db: Arc<Database>, options: FdbOptions) -> Self {
        FdbStore {
            db,
            keys: Keys {
                space: options.subspace.clone(),
            },
            options,
        }
    }

    /// The database.
    pub fn database(&self) -> &Arc<Database> {
        &self.db
    }

    /// The options the store was opened with (its subspace among them).
    pub fn options(&self) -> &FdbOptions {
        &self.options
    }

    /// The store's subspace.
    pub fn subspace(&self) -> &Subspace {
        &self.options.subspace
    }

    pub(crate) async fn read(
        &self,
        trx: &Transaction,
        key: &Key,
    ) -> Result<Option<Stored>, Abort<Infallible>> {
        let Some(raw) = trx.get(&self.keys.record(key), false).await? else {
            return Ok(None);
        };
        Ok(Some(decode(key, &raw).map_err(Abort::from)?))
    }

    /// Writes `next` over `prev` (if any), keeping the purge index and counters in step.
    pub(crate) fn write(
        &self,
        trx: &Transaction,
        prev: Option<&Record>,
        next: &Stored,
    ) -> Result<(), Error> {
        let value = encode(next)?;
        let key = &next.record.key;
        if let Some(prev) = prev {
            trx.clear(&self.keys.expiry(prev.expires_at, key));
            self.count(trx, prev.state.name(), -1);
        }
        trx.set(&self.keys.record(key), &value);
        trx.set(&self.keys.expiry(next.record.expires_at, key), b"");
        self.count(trx, next.record.state.name(), 1);
        Ok(())
    }

    fn count(&self, trx: &Transaction, state: &str, delta: i64) {
        trx.atomic_op(
            &self.keys.count(state),
            &delta.to_le_bytes(),
            MutationType::Add,
        );
    }

    fn new_trx(&self) -> Result<Transaction, Error> {
        let trx = self.db.create_trx().map_err(map_err)?;
        let (timeout_ms, retries) = self.options.transaction_limits();
        trx.set_option(TransactionOption::Timeout(timeout_ms))
            .map_err(map_err)?;
        trx.set_option(TransactionOption::RetryLimit(retries))
            .map_err(map_err)?;
        Ok(trx)
    }

    /// The retry loop: runs `attempt` until it commits, returns a final answer, or
    /// FoundationDB gives up (timeout, retry limit, non-retryable error). `attempt` learns
    /// whether an earlier attempt may have committed (`commit_unknown_result`), so it can
    /// re-read and recognise its own write instead of applying it twice.
    pub(crate) async fn run<T, E>(&self, mut attempt: Attempt<'_, T, E>) -> Result<T, RunError<E>> {
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
                        trx = e.on_error().await.map_err(map_err)?;
                    }
                },
                Err(Abort::Fdb(e)) => trx = trx.on_error(e).await.map_err(map_err)?,
                Err(Abort::Run(e)) => return Err(e),
            }
        }
    }

    /// Claims `key` inside `trx`: the shared first step of `begin` and of transactional mode.
    /// After a maybe-committed attempt, a record carrying this call's `claim` is our own.
    pub(crate) async fn claim_in(
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
                        self.write(&trx, prev, &Stored::after(next, stored.as_ref()))?;
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
                        self.write(&trx, prev, &Stored::after(next, stored.as_ref()))?;
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
                        let (begin, end) = self.keys.expired(now);
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
                            let key = self.keys.expiry_entry(&index_key)?;
                            trx.clear(&index_key);
                            if let Some(s) = self.read(&trx, &key).await? {
                                trx.clear(&self.keys.record(&key));
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
                            let n = match trx.get(&self.keys.count(state), true).await? {
                                Some(v) => {
                                    let bytes: [u8; 8] = v.as_ref().try_into().map_err(|_| {
                                        Error::corrupt(format!("counter {state} is not 8 bytes"))
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
