//! The barrier: lease mode, and the entry point of transactional mode.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use crate::codec;
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::metrics as m;
use crate::record::{Begin, Deadlines, Lease, Stats};
use crate::store::Store;
use crate::time::{Clock, SystemClock, Timestamp};
use crate::tx::{TransactionalStore, TxPolicy, TxRequest};

/// Default lease: how long a worker may run before another may reclaim the key.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default retention: how long outcomes are kept after they are written. Longer than any
/// plausible replay window (Kafka consumer lag, client retry schedules).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How an operation ended.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Outcome<T, F> {
    /// It succeeded with `T`.
    Completed(T),
    /// It failed permanently with `F` (a declined card, a validation error).
    Failed(F),
}

/// What the barrier answers: the outcome, and whether it was replayed from the store.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Response<T, F> {
    /// The operation's outcome, fresh or replayed.
    pub outcome: Outcome<T, F>,
    /// `true` when the outcome came from the store and the operation did not run.
    pub replayed: bool,
}

impl<T: DeserializeOwned, F: DeserializeOwned> Response<T, F> {
    /// Decodes a stored outcome for replay.
    pub fn from_stored(failed: bool, bytes: &[u8]) -> Result<Self, Error> {
        let outcome = if failed {
            Outcome::Failed(codec::decode(bytes)?)
        } else {
            Outcome::Completed(codec::decode(bytes)?)
        };
        Ok(Response {
            outcome,
            replayed: true,
        })
    }
}

/// How an operation failed.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Failure<F, E> {
    /// A permanent failure: stored as `Failed` and replayed to every retry.
    Permanent(F),
    /// A retryable failure: nothing is stored, the key is released, and the next
    /// request with the key executes.
    Retryable(E),
}

/// Why [`Barrier::execute`] or [`Barrier::transaction`] did not return an outcome.
#[derive(Debug)]
pub enum RunError<E> {
    /// The barrier refused or failed: invalid key, mismatch, in progress, lease lost, store.
    Barrier(Error),
    /// The operation failed with a retryable error; the key was released (or, in
    /// transactional mode, everything was rolled back).
    Operation(E),
}

impl<E> From<Error> for RunError<E> {
    fn from(e: Error) -> Self {
        RunError::Barrier(e)
    }
}

impl<E: fmt::Display> fmt::Display for RunError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Barrier(e) => e.fmt(f),
            RunError::Operation(e) => write!(f, "operation failed and may be retried: {e}"),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for RunError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RunError::Barrier(e) => Some(e),
            RunError::Operation(e) => Some(e),
        }
    }
}

/// A stored outcome found by [`Barrier::begin`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Replay {
    /// `true` for a permanent failure, `false` for a completion.
    pub failed: bool,
    /// The encoded outcome.
    pub response: Vec<u8>,
}

impl Replay {
    /// Decodes the stored outcome.
    pub fn decode<T: DeserializeOwned, F: DeserializeOwned>(
        &self,
    ) -> Result<Response<T, F>, Error> {
        Response::from_stored(self.failed, &self.response)
    }
}

/// The answer of [`Barrier::begin`].
#[derive(Debug)]
pub enum Started<S: ?Sized> {
    /// This worker holds the key and must finish it through the handle.
    Acquired(LeaseHandle<S>),
    /// The key has an outcome; replay it.
    Replay(Replay),
}

/// The idempotency barrier over a store.
///
/// Lease mode ([`Barrier::execute`]) guards side effects outside the store: the key is
/// claimed, the operation runs with a fenced lease, and its outcome is stored and replayed.
/// Transactional mode ([`Barrier::transaction`]) runs the operation inside the store's own
/// transaction, together with the claim and the outcome.
///
/// Time comes from the injected [`Clock`]; leases and retention only affect liveness and
/// clean-up, never which answer a key gets.
pub struct Barrier<S: ?Sized> {
    store: Arc<S>,
    clock: Arc<dyn Clock>,
    lease: Duration,
    retention: Duration,
}

impl<S: ?Sized> Clone for Barrier<S> {
    fn clone(&self) -> Self {
        Barrier {
            store: Arc::clone(&self.store),
            clock: Arc::clone(&self.clock),
            lease: self.lease,
            retention: self.retention,
        }
    }
}

impl<S: ?Sized> fmt::Debug for Barrier<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier")
            .field("clock", &self.clock)
            .field("lease", &self.lease)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl<S: ?Sized> Barrier<S> {
    /// A barrier with the system clock, [`DEFAULT_LEASE`] and [`DEFAULT_RETENTION`].
    pub fn new(store: Arc<S>) -> Self {
        Barrier {
            store,
            clock: Arc::new(SystemClock),
            lease: DEFAULT_LEASE,
            retention: DEFAULT_RETENTION,
        }
    }

    /// Uses `clock` for every timestamp.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets how long a lease lasts before another worker may reclaim the key.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Sets how long outcomes are kept before `purge` may delete them.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The lease duration.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The retention.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Lease deadline and retention for a claim made at `now`.
    pub fn deadlines(&self, now: Timestamp) -> Deadlines {
        let lease_until = now.plus(self.lease);
        Deadlines {
            lease_until,
            expires_at: lease_until.plus(self.retention),
        }
    }

    /// When an outcome written at `now` may be purged.
    pub fn expiry(&self, now: Timestamp) -> Timestamp {
        now.plus(self.retention)
    }
}

impl<S: Store + ?Sized> Barrier<S> {
    /// Claims `key` or finds its outcome; the building block under [`Barrier::execute`]
    /// for callers that finish the lease themselves (HTTP middleware, message consumers).
    ///
    /// Errors: [`Error::Mismatch`], [`Error::InProgress`] (with the time left on the
    /// holder's lease), [`Error::Store`].
    pub async fn begin(
        &self,
        key: &Key,
        fingerprint: Option<Fingerprint>,
    ) -> Result<Started<S>, Error> {
        let now = self.clock.now();
        let answer = self
            .store
            .begin(key, fingerprint.as_ref(), self.deadlines(now), now)
            .await
            .inspect_err(|_| m::begin("error"))?;
        match answer {
            Begin::Acquired(lease) => {
                if lease.reclaimed {
                    m::begin("reclaimed");
                    tracing::warn!(key = %key, token = lease.token.0, "reclaimed an expired lease");
                } else {
                    m::begin("acquired");
                }
                Ok(Started::Acquired(LeaseHandle {
                    barrier: self.clone(),
                    lease: Arc::new(Mutex::new(lease)),
                }))
            }
            Begin::Completed { response } => {
                m::begin("replayed");
                Ok(Started::Replay(Replay {
                    failed: false,
                    response,
                }))
            }
            Begin::Failed { response } => {
                m::begin("replayed");
                Ok(Started::Replay(Replay {
                    failed: true,
                    response,
                }))
            }
            Begin::InProgress { lease_until } => {
                m::begin("in_progress");
                Err(Error::InProgress {
                    retry_after: lease_until.since(now),
                })
            }
            Begin::Mismatch => {
                m::begin("mismatch");
                Err(Error::Mismatch)
            }
        }
    }

    /// Runs `op` at most once per key (lease mode).
    ///
    /// A fresh key runs `op` with a [`LeaseHandle`]; `Ok` is stored as completed, a
    /// [`Failure::Permanent`] as failed, both replayed to every later request with the key.
    /// A [`Failure::Retryable`] releases the key and is returned as
    /// [`RunError::Operation`]. A key with an outcome returns it with `replayed == true`
    /// without running `op`. If the lease was reclaimed while `op` ran, the result is
    /// [`Error::LeaseLost`] and nothing is written: the side effect must be deduplicated
    /// downstream with [`LeaseHandle::derive`].
    pub async fn execute<T, F, E, Op, Fut>(
        &self,
        key: &Key,
        fingerprint: Option<Fingerprint>,
        op: Op,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: Serialize + DeserializeOwned,
        Op: FnOnce(LeaseHandle<S>) -> Fut,
        Fut: Future<Output = Result<T, Failure<F, E>>>,
    {
        let span = tracing::info_span!("idem.execute", scope = key.scope(), id = key.id());
        async move {
            let handle = match self.begin(key, fingerprint).await? {
                Started::Replay(replay) => return Ok(replay.decode()?),
                Started::Acquired(handle) => handle,
            };
            match op(handle.clone()).await {
                Ok(value) => {
                    handle.complete(&value).await?;
                    Ok(Response {
                        outcome: Outcome::Completed(value),
                        replayed: false,
                    })
                }
                Err(Failure::Permanent(failure)) => {
                    handle.fail(&failure).await?;
                    Ok(Response {
                        outcome: Outcome::Failed(failure),
                        replayed: false,
                    })
                }
                Err(Failure::Retryable(e)) => {
                    if let Err(release) = handle.release().await {
                        // The lease expires on its own; the key stays safe, only later.
                        tracing::warn!(error = %release, "could not release the key after a retryable failure");
                    }
                    Err(RunError::Operation(e))
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Reads the store's record counts and publishes them as the `idem_records` gauge
    /// (label `state`), the status-distribution metric.
    pub async fn observe_stats(&self) -> Result<Stats, Error> {
        let stats = self.store.stats().await?;
        m::records(&stats);
        Ok(stats)
    }
}

impl<S: TransactionalStore> Barrier<S> {
    /// Runs `op` inside the store's transaction together with the claim and the outcome
    /// (transactional mode).
    ///
    /// The operation's type is the store's own ([`TransactionalStore::Operation`]): it
    /// receives the store's transaction and writes business data through it. `Ok` commits
    /// the business writes with a `Completed` record; [`Failure::Permanent`] rolls the
    /// business writes back and commits a `Failed` record; [`Failure::Retryable`], a crash
    /// or a dropped future roll everything back and leave no record behind. A concurrent
    /// duplicate waits for the first and replays it ([`TxPolicy::Wait`]) or gets
    /// [`Error::InProgress`] at once ([`TxPolicy::NoWait`]); it never executes twice.
    pub async fn transaction<T, F, E>(
        &self,
        key: &Key,
        fingerprint: Option<Fingerprint>,
        policy: TxPolicy,
        op: S::Operation<T, F, E>,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
    {
        let span = tracing::info_span!("idem.transaction", scope = key.scope(), id = key.id());
        let now = self.clock.now();
        let request = TxRequest {
            key,
            fingerprint,
            deadlines: self.deadlines(now),
            expires_at: self.expiry(now),
            now,
            policy,
        };
        let result = self.store.transact(request, op).instrument(span).await;
        m::begin(match &result {
            Ok(r) if r.replayed => "replayed",
            Ok(_) | Err(RunError::Operation(_)) => "acquired",
            Err(RunError::Barrier(Error::InProgress { .. })) => "in_progress",
            Err(RunError::Barrier(Error::Mismatch)) => "mismatch",
            Err(RunError::Barrier(_)) => "error",
        });
        result
    }
}

/// A held lease: extend it, derive downstream keys, and finish it.
///
/// Clones share the lease, so an extension made through one is seen by all.
pub struct LeaseHandle<S: ?Sized> {
    barrier: Barrier<S>,
    lease: Arc<Mutex<Lease>>,
}

impl<S: ?Sized> Clone for LeaseHandle<S> {
    fn clone(&self) -> Self {
        LeaseHandle {
            barrier: self.barrier.clone(),
            lease: Arc::clone(&self.lease),
        }
    }
}

impl<S: ?Sized> fmt::Debug for LeaseHandle<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LeaseHandle").field(&self.lease()).finish()
    }
}

impl<S: ?Sized> LeaseHandle<S> {
    /// The lease as it stands now.
    pub fn lease(&self) -> Lease {
        self.lease.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A stable child key to pass downstream; see [`Key::derive`].
    pub fn derive(&self, label: &str) -> Key {
        self.lease().derive(label)
    }
}

impl<S: Store + ?Sized> LeaseHandle<S> {
    /// Extends the lease by the barrier's lease duration from now. Call it periodically in
    /// long operations. Fails with [`Error::LeaseLost`] if the key was reclaimed.
    pub async fn extend(&self) -> Result<(), Error> {
        let lease = self.lease();
        let now = self.barrier.clock.now();
        let deadlines = self.barrier.deadlines(now);
        let extended = self
            .barrier
            .store
            .extend(&lease, deadlines, now)
            .await
            .inspect_err(lease_lost_metric)?;
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = extended;
        Ok(())
    }

    /// Stores `value` as the key's completed outcome.
    pub async fn complete<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        let bytes = codec::encode(value)?;
        let now = self.barrier.clock.now();
        self.barrier
            .store
            .complete(&self.lease(), &bytes, self.barrier.expiry(now), now)
            .await
            .inspect_err(lease_lost_metric)
    }

    /// Stores `failure` as the key's permanent failure.
    pub async fn fail<F: Serialize + ?Sized>(&self, failure: &F) -> Result<(), Error> {
        let bytes = codec::encode(failure)?;
        let now = self.barrier.clock.now();
        self.barrier
            .store
            .fail(&self.lease(), &bytes, self.barrier.expiry(now), now)
            .await
            .inspect_err(lease_lost_metric)
    }

    /// Gives the key back without an outcome: the work did not happen.
    pub async fn release(&self) -> Result<(), Error> {
        let now = self.barrier.clock.now();
        self.barrier
            .store
            .release(&self.lease(), now)
            .await
            .inspect_err(lease_lost_metric)
    }
}

fn lease_lost_metric(e: &Error) {
    if matches!(e, Error::LeaseLost) {
        m::lease_lost();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ManualClock, MemoryStore, State, Token};
    use std::sync::atomic::{AtomicU32, Ordering};

    type R = Result<Response<u32, String>, RunError<&'static str>>;

    fn setup() -> (Barrier<MemoryStore>, ManualClock, Key) {
        let clock = ManualClock::new(Timestamp::from_millis(1_000_000));
        let barrier = Barrier::new(Arc::new(MemoryStore::new()))
            .with_clock(Arc::new(clock.clone()))
            .with_lease(Duration::from_secs(10))
            .with_retention(Duration::from_secs(3600));
        (barrier, clock, Key::new("t", "k").unwrap())
    }

    async fn run(
        b: &Barrier<MemoryStore>,
        key: &Key,
        calls: &AtomicU32,
        result: Result<u32, Failure<String, &'static str>>,
    ) -> R {
        b.execute(key, None, |_| async {
            calls.fetch_add(1, Ordering::SeqCst);
            result
        })
        .await
    }

    #[tokio::test]
    async fn completed_and_failed_outcomes_replay_without_running() {
        let (b, clock, key) = setup();
        let calls = AtomicU32::new(0);
        let first = run(&b, &key, &calls, Ok(7)).await.unwrap();
        assert_eq!(
            (first.outcome, first.replayed),
            (Outcome::Completed(7), false)
        );
        clock.advance(Duration::from_secs(26 * 3600));
        let late = run(&b, &key, &calls, Ok(8)).await.unwrap();
        assert_eq!((late.outcome, late.replayed), (Outcome::Completed(7), true));

        let key2 = Key::new("t", "declined").unwrap();
        let f = run(
            &b,
            &key2,
            &calls,
            Err(Failure::Permanent("declined".into())),
        )
        .await
        .unwrap();
        assert_eq!(f.outcome, Outcome::Failed("declined".to_string()));
        let again = run(&b, &key2, &calls, Ok(1)).await.unwrap();
        assert_eq!(
            (again.outcome, again.replayed),
            (Outcome::Failed("declined".to_string()), true)
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn retryable_failure_releases_the_key() {
        let (b, _clock, key) = setup();
        let calls = AtomicU32::new(0);
        let err = run(&b, &key, &calls, Err(Failure::Retryable("timeout")))
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Operation("timeout")));
        let ok = run(&b, &key, &calls, Ok(3)).await.unwrap();
        assert_eq!((ok.outcome, ok.replayed), (Outcome::Completed(3), false));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let rec = b.store().get(&key).await.unwrap().unwrap();
        assert_eq!(rec.token, Token(2), "release never resets the token");
    }

    #[tokio::test]
    async fn in_flight_duplicate_gets_in_progress_with_retry_after() {
        let (b, clock, key) = setup();
        let Started::Acquired(handle) = b.begin(&key, None).await.unwrap() else {
            panic!("fresh key must be acquired")
        };
        clock.advance(Duration::from_secs(4));
        match b.begin(&key, None).await {
            Err(Error::InProgress { retry_after }) => {
                assert_eq!(retry_after, Duration::from_secs(6))
            }
            other => panic!("expected InProgress, got {other:?}"),
        }
        handle.complete(&5u32).await.unwrap();
    }

    #[tokio::test]
    async fn reclaim_fences_the_zombie_and_extend_keeps_the_lease() {
        let (b, clock, key) = setup();
        let Started::Acquired(zombie) = b.begin(&key, None).await.unwrap() else {
            panic!()
        };
        clock.advance(Duration::from_secs(8));
        zombie.extend().await.unwrap();
        clock.advance(Duration::from_secs(8));
        assert!(
            matches!(b.begin(&key, None).await, Err(Error::InProgress { .. })),
            "extended lease still live"
        );
        clock.advance(Duration::from_secs(3));
        let Started::Acquired(successor) = b.begin(&key, None).await.unwrap() else {
            panic!()
        };
        assert!(successor.lease().reclaimed);
        assert!(matches!(
            zombie.complete(&1u32).await,
            Err(Error::LeaseLost)
        ));
        assert!(matches!(zombie.extend().await, Err(Error::LeaseLost)));
        assert!(matches!(zombie.release().await, Err(Error::LeaseLost)));
        successor.complete(&2u32).await.unwrap();
        let rec = b.store().get(&key).await.unwrap().unwrap();
        assert_eq!(
            rec.state,
            State::Completed {
                response: codec::encode(&2u32).unwrap()
            }
        );
    }

    #[tokio::test]
    async fn lease_lost_during_execute_is_surfaced() {
        let (b, clock, key) = setup();
        let b2 = b.clone();
        let key2 = key.clone();
        let r: R = b
            .execute(&key, None, |_| async move {
                clock.advance(Duration::from_secs(11));
                let Started::Acquired(other) = b2.begin(&key2, None).await.unwrap() else {
                    panic!()
                };
                other.complete(&9u32).await.unwrap();
                Ok(1)
            })
            .await;
        assert!(matches!(r, Err(RunError::Barrier(Error::LeaseLost))));
        let replay = run(&b, &key, &AtomicU32::new(0), Ok(0)).await.unwrap();
        assert_eq!(replay.outcome, Outcome::Completed(9));
    }

    #[tokio::test]
    async fn mismatch_and_corrupt_outcomes_are_typed_errors() {
        let (b, _clock, key) = setup();
        let fa = Fingerprint::of_bytes(b"a");
        let fb = Fingerprint::of_bytes(b"b");
        let ok: R = b.execute(&key, Some(fa), |_| async { Ok(1) }).await;
        assert!(ok.is_ok());
        let mm: R = b.execute(&key, Some(fb), |_| async { Ok(1) }).await;
        assert!(matches!(mm, Err(RunError::Barrier(Error::Mismatch))));
        let same: R = b.execute(&key, Some(fa), |_| async { Ok(2) }).await;
        assert!(
            same.unwrap().replayed,
            "an identical retry passes validation"
        );

        // A stored outcome of the wrong type is corrupt, not a wrong replay.
        let wrong: Result<Response<String, String>, RunError<()>> = b
            .execute(&key, Some(fa), |_| async { Ok("x".to_string()) })
            .await;
        assert!(matches!(wrong, Err(RunError::Barrier(Error::Corrupt(_)))));
    }
}
