//! The barrier: lease mode, and the entry point of transactional mode.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use crate::backend::{codec, step, Step};
use crate::error::{Error, RunError};
use crate::estimate::Estimate;
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::metrics as m;
use crate::outcome::{Failure, Outcome, Replay, Response};
use crate::policy::InFlight;
use crate::record::{Begin, Deadlines, Lease, Stats};
use crate::store::Store;
use crate::time::{Clock, SystemClock, Timestamp};

/// Default lease: how long a worker may run before another may reclaim the key.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// Default retention: how long outcomes are kept after they are written. Longer than any
/// plausible replay window (Kafka consumer lag, client retry schedules).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// First pause between two claims of [`InFlight::Wait`].
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
/// Longest pause between two claims of [`InFlight::Wait`].
const MAX_BACKOFF: Duration = Duration::from_millis(250);
/// The smallest `Retry-After` estimated from observed durations.
const MIN_RETRY_AFTER: Duration = Duration::from_millis(1);

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
    pub(crate) store: Arc<S>,
    pub(crate) clock: Arc<dyn Clock>,
    lease: Duration,
    retention: Duration,
    durations: Estimate,
    redact_ids: bool,
}

impl<S: ?Sized> Clone for Barrier<S> {
    fn clone(&self) -> Self {
        Barrier {
            store: Arc::clone(&self.store),
            clock: Arc::clone(&self.clock),
            lease: self.lease,
            retention: self.retention,
            durations: self.durations.clone(),
            redact_ids: self.redact_ids,
        }
    }
}

impl<S: ?Sized> fmt::Debug for Barrier<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier")
            .field("clock", &self.clock)
            .field("lease", &self.lease)
            .field("retention", &self.retention)
            .field("typical_duration", &self.durations.get())
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
            durations: Estimate::default(),
            redact_ids: false,
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

    /// Keeps key ids out of spans and logs (they show `<redacted>`; scopes stay), for ids
    /// that may be personal data or secrets. Payloads and outcome bytes are never logged.
    pub fn with_redacted_ids(mut self, redact: bool) -> Self {
        self.redact_ids = redact;
        self
    }

    /// The id of `key` as spans and logs show it (see [`Barrier::with_redacted_ids`]).
    pub(crate) fn id_field<'k>(&self, key: &'k Key) -> &'k str {
        if self.redact_ids {
            "<redacted>"
        } else {
            key.id()
        }
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

    /// How long an operation typically takes, as this barrier (and its clones) measured it:
    /// an exponentially weighted moving average of the monotonic time from acquiring a key
    /// to storing its outcome. `None` until an outcome has been stored in this process.
    pub fn typical_duration(&self) -> Option<Duration> {
        self.durations.get()
    }

    /// The `Retry-After` for a key whose holder's lease has `remaining` left: the typical
    /// duration if known (at least 1 ms) and shorter, else `remaining`.
    pub(crate) fn retry_after(&self, remaining: Duration) -> Duration {
        match self.durations.get() {
            Some(typical) => remaining.min(typical.max(MIN_RETRY_AFTER)),
            None => remaining,
        }
    }

    /// Counts the duration of an operation that stored its outcome, for
    /// [`Barrier::typical_duration`].
    pub(crate) fn observe_duration(&self, took: Duration) {
        self.durations.observe(took);
    }

    /// When an outcome written at `now` may be purged.
    pub fn expiry(&self, now: Timestamp) -> Timestamp {
        now.plus(self.retention)
    }
}

impl<S: Store + ?Sized> Barrier<S> {
    /// Claims `key` or finds its outcome; the building block under [`Barrier::execute`]
    /// for callers that finish the lease themselves (HTTP middleware, message consumers).
    /// The same as [`Barrier::begin_with`] with [`InFlight::Reject`].
    ///
    /// Errors: [`Error::Mismatch`], [`Error::InProgress`], [`Error::Store`].
    ///
    /// `retry_after` in [`Error::InProgress`] is an honest estimate of when to try again:
    /// the smaller of the time left on the holder's lease and this barrier's
    /// [`Barrier::typical_duration`] (at least 1 ms); the time left on the lease while no
    /// duration has been observed yet.
    pub async fn begin(
        &self,
        key: &Key,
        fingerprint: Option<Fingerprint>,
    ) -> Result<Started<S>, Error> {
        self.begin_with(key, fingerprint, InFlight::Reject).await
    }

    /// [`Barrier::begin`], choosing what to do while another worker holds the key:
    /// [`InFlight::Reject`] answers [`Error::InProgress`] at once, [`InFlight::Wait`] claims
    /// again with bounded exponential backoff until the key has an outcome (replayed) or is
    /// free (acquired), and answers [`Error::InProgress`] when the wait runs out. Works on
    /// every store: each attempt is an ordinary [`Store::begin`].
    ///
    /// Dropping the future leaves nothing behind, except when the store's claim already took
    /// effect and its answer was lost on the way back: then the key stays claimed until the
    /// lease runs out (no token was handed out, so nothing could release it).
    pub async fn begin_with(
        &self,
        key: &Key,
        fingerprint: Option<Fingerprint>,
        in_flight: InFlight,
    ) -> Result<Started<S>, Error> {
        let wait_until = match in_flight {
            InFlight::Reject => None,
            InFlight::Wait(max) => Some(tokio::time::Instant::now().checked_add(max)),
        };
        let mut backoff = FIRST_BACKOFF;
        let mut waiting_since = None;
        loop {
            let now = self.clock.now();
            let answer = m::store(
                "begin",
                self.store
                    .begin(key, fingerprint.as_ref(), self.deadlines(now), now),
            )
            .await
            .inspect_err(|_| m::begin("error"))?;
            if let (Begin::InProgress { .. }, Some(until)) = (&answer, wait_until) {
                // `None`: a wait too long to represent, so no deadline.
                let left = until.map_or(MAX_BACKOFF, |u| {
                    u.saturating_duration_since(tokio::time::Instant::now())
                });
                if !left.is_zero() {
                    waiting_since.get_or_insert_with(Instant::now);
                    tokio::time::sleep(backoff.min(left)).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
            if let Some(since) = waiting_since {
                m::wait(
                    match &answer {
                        Begin::Acquired(_) => "acquired",
                        Begin::InProgress { .. } => "in_progress",
                        Begin::Mismatch => "mismatch",
                        Begin::Completed { .. } | Begin::Failed { .. } => "replayed",
                    },
                    since.elapsed(),
                );
            }
            return self.started(key, answer, now);
        }
    }

    /// Turns a store's answer into the barrier's, with metrics.
    fn started(&self, key: &Key, answer: Begin, now: Timestamp) -> Result<Started<S>, Error> {
        m::begin(match &answer {
            Begin::Acquired(lease) if lease.reclaimed => "reclaimed",
            Begin::Acquired(_) => "acquired",
            Begin::Completed { .. } | Begin::Failed { .. } => "replayed",
            Begin::InProgress { .. } => "in_progress",
            Begin::Mismatch => "mismatch",
        });
        match step(answer, now) {
            Ok(Step::Acquired(lease)) => {
                if lease.reclaimed {
                    tracing::warn!(
                        scope = key.scope(),
                        id = self.id_field(key),
                        token = lease.token.0,
                        "reclaimed an expired lease"
                    );
                }
                Ok(Started::Acquired(LeaseHandle {
                    barrier: self.clone(),
                    lease: Arc::new(Mutex::new(lease)),
                    acquired_at: Instant::now(),
                }))
            }
            Ok(Step::Replay(replay)) => Ok(Started::Replay(replay)),
            Err(Error::InProgress { retry_after }) => Err(Error::InProgress {
                retry_after: self.retry_after(retry_after),
            }),
            Err(e) => Err(e),
        }
    }

    /// Runs `op` at most once per key (lease mode). The same as [`Barrier::execute_with`]
    /// with [`InFlight::Reject`].
    ///
    /// A fresh key runs `op` with a [`LeaseHandle`]; `Ok` is stored as completed, a
    /// [`Failure::Permanent`] as failed, both replayed to every later request with the key.
    /// A [`Failure::Retryable`] releases the key and is returned as
    /// [`RunError::Operation`]. A key with an outcome returns it with `replayed == true`
    /// without running `op`. If the lease was reclaimed while `op` ran, the result is
    /// [`Error::LeaseLost`] and nothing is written: the side effect must be deduplicated
    /// downstream with [`LeaseHandle::derive`].
    ///
    /// # Cancellation
    ///
    /// The future may be dropped at any await point (a client disconnect, a timeout, a
    /// `select!`). What that leaves behind, and how a retry with the same key learns the
    /// outcome:
    ///
    /// - dropped while claiming: nothing, and the retry runs `op`; unless the claim took
    ///   effect in the store and its answer was lost, then the retry gets
    ///   [`Error::InProgress`] until the lease runs out and then runs `op` (a reclaim);
    /// - dropped while `op` runs: `op` stops at that await point, and its side effects so
    ///   far stay, including a write already sent that may still commit after the drop. So
    ///   the key is not released: the retry gets [`Error::InProgress`] until the lease runs
    ///   out, then runs `op` again (a reclaim; deduplicate the side effect downstream with
    ///   [`LeaseHandle::derive`]). Releasing it at once would let the retry execute while
    ///   the first execution can still commit;
    /// - dropped while storing the outcome: the same fenced write (complete or fail with
    ///   the same bytes) is finished by a spawned task, so the retry replays the outcome;
    ///   if that write cannot be made, the lease runs out and the retry runs `op` again;
    /// - dropped while releasing after a retryable failure: the release is finished by a
    ///   spawned task.
    ///
    /// The spawned write is fenced by the lease's token: if the key was taken over in the
    /// meantime it changes nothing. Without a Tokio runtime (or if the write fails) the
    /// key is freed when the lease runs out. An outcome stored before the drop is never
    /// released.
    pub async fn execute<T, F, E, Op, Fut>(
        &self,
        key: &Key,
        fingerprint: Option<Fingerprint>,
        op: Op,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        S: 'static,
        T: Serialize + DeserializeOwned,
        F: Serialize + DeserializeOwned,
        Op: FnOnce(LeaseHandle<S>) -> Fut,
        Fut: Future<Output = Result<T, Failure<F, E>>>,
    {
        self.execute_with(key, fingerprint, InFlight::Reject, op)
            .await
    }

    /// [`Barrier::execute`], choosing what a duplicate does while another worker holds the
    /// key (see [`Barrier::begin_with`]): with [`InFlight::Wait`] it waits, bounded, for
    /// the holder's outcome and replays it, or runs `op` if the holder released the key.
    pub async fn execute_with<T, F, E, Op, Fut>(
        &self,
        key: &Key,
        fingerprint: Option<Fingerprint>,
        in_flight: InFlight,
        op: Op,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        S: 'static,
        T: Serialize + DeserializeOwned,
        F: Serialize + DeserializeOwned,
        Op: FnOnce(LeaseHandle<S>) -> Fut,
        Fut: Future<Output = Result<T, Failure<F, E>>>,
    {
        let span = tracing::info_span!(
            "idem.execute",
            scope = key.scope(),
            id = self.id_field(key),
            result = tracing::field::Empty
        );
        let started = Instant::now();
        let result = async move {
            let handle = match self.begin_with(key, fingerprint, in_flight).await? {
                Started::Replay(replay) => return Ok(replay.decode()?),
                Started::Acquired(handle) => handle,
            };
            // Dropped while `op` runs: no guard is armed, so the claim stays until the lease
            // runs out. `op`'s effect may have happened or may still land (a statement sent
            // before the drop commits on its own), so the key must not be handed to a retry.
            let (finish, answer) = match op(handle.clone()).await {
                Ok(value) => match codec::encode(&value) {
                    Ok(bytes) => (
                        Finish::Store {
                            failed: false,
                            bytes,
                        },
                        Ok(Outcome::Completed(value)),
                    ),
                    // Nothing can be stored: give the key back rather than leave it to the lease.
                    Err(unencodable) => (Finish::Release, Err(unencodable.into())),
                },
                Err(Failure::Permanent(failure)) => match codec::encode(&failure) {
                    Ok(bytes) => (
                        Finish::Store { failed: true, bytes },
                        Ok(Outcome::Failed(failure)),
                    ),
                    Err(unencodable) => (Finish::Release, Err(unencodable.into())),
                },
                Err(Failure::Retryable(e)) => (Finish::Release, Err(RunError::Operation(e))),
            };
            // From here on a drop finishes the same fenced write on a spawned task.
            let mut unfinished = Unfinished {
                handle: Some(handle.clone()),
                finish: finish.clone(),
            };
            let written = handle.finish(&finish).await;
            unfinished.handle = None;
            match (answer, written) {
                (Ok(outcome), Ok(())) => Ok(Response {
                    outcome,
                    replayed: false,
                }),
                (Ok(_), Err(e)) => Err(e.into()),
                (Err(e), released) => {
                    if let Err(release) = released {
                        // The lease expires on its own; the key stays safe, only later.
                        tracing::warn!(error = %release, "could not release the key after an operation that stored nothing");
                    }
                    Err(e)
                }
            }
        }
        .instrument(span.clone())
        .await;
        let label = m::call_result(&result);
        span.record("result", label);
        m::call("lease", label, started.elapsed());
        result
    }

    /// Reads the store's record counts and publishes them as the `idem_records` gauge
    /// (label `state`), the status-distribution metric.
    pub async fn observe_stats(&self) -> Result<Stats, Error> {
        let stats = self.store.stats().await?;
        m::records(&stats, "count");
        Ok(stats)
    }

    /// [`Barrier::observe_stats`] without counting the records where the store has a cheap
    /// estimate ([`Store::estimated_stats`]): the gauge is then labelled
    /// `source="estimate"`. Stores without one are counted.
    pub async fn observe_estimated_stats(&self) -> Result<Stats, Error> {
        match self.store.estimated_stats().await? {
            Some(stats) => {
                m::records(&stats, "estimate");
                Ok(stats)
            }
            None => self.observe_stats().await,
        }
    }
}

/// A held lease: extend it, derive downstream keys, and finish it.
///
/// Clones share the lease, so an extension made through one is seen by all.
pub struct LeaseHandle<S: ?Sized> {
    barrier: Barrier<S>,
    lease: Arc<Mutex<Lease>>,
    /// When the key was acquired, for [`Barrier::typical_duration`].
    acquired_at: Instant,
}

impl<S: ?Sized> Clone for LeaseHandle<S> {
    fn clone(&self) -> Self {
        LeaseHandle {
            barrier: self.barrier.clone(),
            lease: Arc::clone(&self.lease),
            acquired_at: self.acquired_at,
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
        let extended = m::store("extend", self.barrier.store.extend(&lease, deadlines, now))
            .await
            .inspect_err(lease_lost_metric)?;
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = extended;
        Ok(())
    }

    /// Stores `value` as the key's completed outcome.
    pub async fn complete<T: Serialize + ?Sized>(&self, value: &T) -> Result<(), Error> {
        let bytes = codec::encode(value)?;
        self.store_outcome(false, &bytes).await
    }

    /// Stores `failure` as the key's permanent failure.
    pub async fn fail<F: Serialize + ?Sized>(&self, failure: &F) -> Result<(), Error> {
        let bytes = codec::encode(failure)?;
        self.store_outcome(true, &bytes).await
    }

    /// Gives the key back without an outcome: the work did not happen.
    pub async fn release(&self) -> Result<(), Error> {
        let now = self.barrier.clock.now();
        m::store("release", self.barrier.store.release(&self.lease(), now))
            .await
            .inspect_err(lease_lost_metric)
    }

    /// Writes an encoded outcome, fenced, and counts the operation's duration.
    async fn store_outcome(&self, failed: bool, bytes: &[u8]) -> Result<(), Error> {
        let now = self.barrier.clock.now();
        let (lease, expires_at) = (self.lease(), self.barrier.expiry(now));
        let store = &self.barrier.store;
        if failed {
            m::store("fail", store.fail(&lease, bytes, expires_at, now)).await
        } else {
            m::store("complete", store.complete(&lease, bytes, expires_at, now)).await
        }
        .inspect_err(lease_lost_metric)?;
        self.barrier.observe_duration(self.acquired_at.elapsed());
        Ok(())
    }

    /// Ends the lease the way `finish` says.
    async fn finish(&self, finish: &Finish) -> Result<(), Error> {
        match finish {
            Finish::Release => self.release().await,
            Finish::Store { failed, bytes } => self.store_outcome(*failed, bytes).await,
        }
    }
}

/// How [`Barrier::execute`] ends a lease.
#[derive(Clone, Debug)]
enum Finish {
    /// No outcome: give the key back.
    Release,
    /// Store this encoded outcome.
    Store { failed: bool, bytes: Vec<u8> },
}

/// A lease that [`Barrier::execute`] has not ended yet. If the future is dropped while it
/// is armed (`handle` set), its drop spawns the fenced write `finish` on the current Tokio
/// runtime, so the key is not left to the lease.
struct Unfinished<S: Store + ?Sized + 'static> {
    handle: Option<LeaseHandle<S>>,
    finish: Finish,
}

impl<S: Store + ?Sized + 'static> Drop for Unfinished<S> {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let lease = handle.lease();
        let finish = std::mem::replace(&mut self.finish, Finish::Release);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::debug!(
                    scope = lease.key.scope(),
                    id = handle.barrier.id_field(&lease.key),
                    token = lease.token.0,
                    stores_outcome = matches!(finish, Finish::Store { .. }),
                    "execute was cancelled; ending its lease"
                );
                runtime.spawn(async move {
                    match handle.finish(&finish).await {
                        Ok(()) | Err(Error::LeaseLost) => {}
                        Err(e) => tracing::warn!(
                            scope = lease.key.scope(),
                            id = handle.barrier.id_field(&lease.key),
                            error = %e,
                            "could not end the lease of a cancelled execute; it runs out on its own"
                        ),
                    }
                });
            }
            Err(_) => tracing::warn!(
                scope = lease.key.scope(),
                id = handle.barrier.id_field(&lease.key),
                lease_until = %lease.lease_until,
                "execute was cancelled outside a Tokio runtime; the key is freed when its lease runs out"
            ),
        }
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

    #[test]
    fn redacted_ids_stay_out_of_spans_and_logs() {
        let (b, _, key) = setup();
        assert_eq!(b.id_field(&key), "k");
        let redacted = b.with_redacted_ids(true);
        assert_eq!(redacted.id_field(&key), "<redacted>");
        assert_eq!(
            redacted.clone().id_field(&key),
            "<redacted>",
            "clones keep it"
        );
    }

    #[test]
    fn calls_and_store_round_trips_are_timed_by_result() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let (b, _, key) = setup();
                let calls = AtomicU32::new(0);
                run(&b, &key, &calls, Ok(7)).await.unwrap();
                run(&b, &key, &calls, Ok(8)).await.unwrap();
                // A duplicate that waits for a holder who never finishes.
                let held = Key::new("t", "held").unwrap();
                let _holder = b.begin(&held, None).await.unwrap();
                let waited: R = b
                    .execute_with(
                        &held,
                        None,
                        InFlight::Wait(Duration::from_millis(20)),
                        |_| async { Ok(1) },
                    )
                    .await;
                assert!(matches!(
                    waited,
                    Err(RunError::Barrier(Error::InProgress { .. }))
                ));
            });
        });
        let mut seen = std::collections::BTreeMap::new();
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            if let DebugValue::Histogram(samples) = value {
                seen.insert(
                    format!("{}{{{}}}", key.key().name(), labels.join(",")),
                    samples.len(),
                );
            }
        }
        // Two calls, the holder's claim, and at least two claims of the waiting duplicate.
        let begins = seen.remove("idem_store_seconds{op=begin}").unwrap_or(0);
        assert!(begins >= 5, "{begins} begins");
        let want: std::collections::BTreeMap<String, usize> = [
            ("idem_call_seconds{mode=lease,result=executed}", 1),
            ("idem_call_seconds{mode=lease,result=replayed}", 1),
            ("idem_call_seconds{mode=lease,result=in_progress}", 1),
            ("idem_store_seconds{op=complete}", 1),
            ("idem_wait_seconds{result=in_progress}", 1),
        ]
        .into_iter()
        .map(|(k, n)| (k.to_string(), n))
        .collect();
        assert_eq!(seen, want);
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
        assert!(matches!(
            wrong,
            Err(RunError::Barrier(Error::Corrupt { .. }))
        ));
    }

    /// The reference store, with a pending await point before and after every call, so a
    /// future using it can be dropped in the middle of each store operation.
    #[derive(Debug, Default)]
    struct Yielding(MemoryStore);

    /// Runs `call` between two pending await points.
    async fn around<T>(call: impl Future<Output = T>) -> T {
        tokio::task::yield_now().await;
        let r = call.await;
        tokio::task::yield_now().await;
        r
    }

    #[async_trait::async_trait]
    impl Store for Yielding {
        fn guarantees(&self) -> crate::Guarantees {
            self.0.guarantees()
        }
        async fn begin(
            &self,
            key: &Key,
            fingerprint: Option<&Fingerprint>,
            deadlines: Deadlines,
            now: Timestamp,
        ) -> Result<Begin, Error> {
            around(self.0.begin(key, fingerprint, deadlines, now)).await
        }
        async fn complete(
            &self,
            lease: &Lease,
            response: &[u8],
            expires_at: Timestamp,
            now: Timestamp,
        ) -> Result<(), Error> {
            around(self.0.complete(lease, response, expires_at, now)).await
        }
        async fn fail(
            &self,
            lease: &Lease,
            response: &[u8],
            expires_at: Timestamp,
            now: Timestamp,
        ) -> Result<(), Error> {
            around(self.0.fail(lease, response, expires_at, now)).await
        }
        async fn extend(
            &self,
            lease: &Lease,
            deadlines: Deadlines,
            now: Timestamp,
        ) -> Result<Lease, Error> {
            self.0.extend(lease, deadlines, now).await
        }
        async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
            around(self.0.release(lease, now)).await
        }
        async fn get(&self, key: &Key) -> Result<Option<crate::Record>, Error> {
            self.0.get(key).await
        }
        async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
            self.0.purge(now, batch).await
        }
        async fn stats(&self) -> Result<Stats, Error> {
            self.0.stats().await
        }
    }

    /// Polls `fut` at most `polls` times; `Some(output)` if it finished, `None` if it was
    /// still pending and has been dropped.
    fn poll_then_drop<F: Future>(fut: F, polls: usize) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for _ in 0..polls {
            if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
                return Some(out);
            }
        }
        None
    }

    /// Lets tasks spawned by a dropped `execute` run to the end.
    async fn settle_spawned() {
        for _ in 0..64 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_cancelled_execute_frees_its_key_unless_its_op_may_still_take_effect() {
        let clock = ManualClock::new(Timestamp::from_millis(1_000_000));
        let b = Barrier::new(Arc::new(Yielding::default()))
            .with_clock(Arc::new(clock.clone()))
            .with_lease(Duration::from_secs(10));
        type Run = Result<u32, Failure<String, &'static str>>;
        let endings: [(&str, Run); 3] = [
            ("ok", Ok(7)),
            ("permanent", Err(Failure::Permanent("declined".into()))),
            ("retryable", Err(Failure::Retryable("timeout"))),
        ];
        let mut cancelled_in_op = 0;
        let mut finished = 0;
        for (name, ending) in endings {
            for polls in 0..20 {
                let key = Key::new("cancel", format!("{name}-{polls}")).unwrap();
                let (started, returned) = (AtomicU32::new(0), AtomicU32::new(0));
                let this_ending = ending.clone();
                let result = poll_then_drop(
                    b.execute(&key, None, |_| async {
                        started.fetch_add(1, Ordering::SeqCst);
                        for _ in 0..3 {
                            tokio::task::yield_now().await;
                        }
                        returned.fetch_add(1, Ordering::SeqCst);
                        this_ending
                    }),
                    polls,
                );
                settle_spawned().await;
                let record = b.store().get(&key).await.unwrap();
                let ran = started.load(Ordering::SeqCst) == 1;
                let in_op = ran && returned.load(Ordering::SeqCst) == 0;
                match (&result, ran) {
                    (Some(r), _) => {
                        finished += 1;
                        // A finished call's outcome is stored and never released afterwards.
                        match (r, &ending) {
                            (Ok(resp), _) => assert!(
                                matches!(
                                    record.as_ref().map(|r| &r.state),
                                    Some(State::Completed { .. } | State::Failed { .. })
                                ),
                                "{name}/{polls}: {resp:?} but {record:?}"
                            ),
                            (Err(RunError::Operation(_)), Err(Failure::Retryable(_))) => {}
                            (other, _) => panic!("{name}/{polls}: {other:?}"),
                        }
                    }
                    (None, false) => {
                        // Dropped while claiming: no claim, or a claim whose answer was lost.
                        assert!(
                            record.is_none()
                                || matches!(
                                    record.as_ref().map(|r| &r.state),
                                    Some(State::InProgress {
                                        token: Token(1),
                                        ..
                                    })
                                ),
                            "{name}/{polls}: {record:?}"
                        );
                        continue;
                    }
                    (None, true) if !in_op => {}
                    (None, true) => {
                        cancelled_in_op += 1;
                        // Dropped while `op` ran: its effect may still land, so the key stays
                        // claimed until the lease runs out, and only then is it reclaimed.
                        assert!(
                            matches!(b.begin(&key, None).await, Err(Error::InProgress { .. })),
                            "{name}/{polls}: a key whose op was cancelled was handed to a retry"
                        );
                        clock.advance(Duration::from_secs(11));
                    }
                }
                // Otherwise, without advancing the clock, the next call is never refused as
                // in progress.
                let next = b.begin(&key, None).await;
                match (next, &ending) {
                    (Ok(Started::Acquired(h)), _) => h.release().await.unwrap(),
                    (Ok(Started::Replay(replay)), Ok(_) | Err(Failure::Permanent(_))) => {
                        let resp: Response<u32, String> = replay.decode().unwrap();
                        let want = match &ending {
                            Ok(v) => Outcome::Completed(*v),
                            Err(Failure::Permanent(f)) => Outcome::Failed(f.clone()),
                            Err(Failure::Retryable(_)) => unreachable!(),
                        };
                        assert_eq!(resp.outcome, want, "{name}/{polls}");
                    }
                    (other, _) => panic!("{name}/{polls}: next begin got {other:?}"),
                }
            }
        }
        assert!(
            cancelled_in_op >= 3 && finished >= 3,
            "{cancelled_in_op} {finished}"
        );
    }

    #[test]
    fn a_cancelled_execute_outside_a_runtime_leaves_the_lease_to_run_out() {
        let (b, clock, key) = setup();
        let dropped = poll_then_drop(
            b.execute(&key, None, |_| {
                std::future::pending::<Result<u32, Failure<String, ()>>>()
            }),
            1,
        );
        assert!(dropped.is_none());
        let record = poll_then_drop(b.store().get(&key), 1)
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            matches!(record.state, State::InProgress { lease_until, .. } if lease_until > clock.now())
        );
    }

    #[tokio::test]
    async fn retry_after_is_the_remaining_lease_until_a_duration_is_known() {
        let (b, clock, key) = setup();
        assert_eq!(b.typical_duration(), None);
        let Started::Acquired(holder) = b.begin(&key, None).await.unwrap() else {
            panic!()
        };
        clock.advance(Duration::from_secs(4));
        let Err(Error::InProgress { retry_after }) = b.begin(&key, None).await else {
            panic!()
        };
        assert_eq!(
            retry_after,
            Duration::from_secs(6),
            "no estimate: the lease"
        );

        let other = Key::new("t", "other").unwrap();
        let r: R = b
            .clone()
            .execute(&other, None, |_| async {
                std::thread::sleep(Duration::from_millis(2));
                Ok(1)
            })
            .await;
        r.unwrap();
        let typical = b
            .typical_duration()
            .expect("a completed operation was measured");
        assert!(typical >= Duration::from_millis(2), "{typical:?}");
        let Err(Error::InProgress { retry_after }) = b.begin(&key, None).await else {
            panic!()
        };
        assert_eq!(
            retry_after,
            typical.min(Duration::from_secs(6)).max(MIN_RETRY_AFTER)
        );
        // Near the end of the lease, the lease is the better bound.
        clock.advance(Duration::from_millis(5_999));
        let Err(Error::InProgress { retry_after }) = b.begin(&key, None).await else {
            panic!()
        };
        assert_eq!(retry_after, Duration::from_millis(1));
        holder.complete(&1u32).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_duplicates_replay_the_holders_outcome_or_acquire_a_released_key() {
        let (b, _clock, key) = setup();
        let Started::Acquired(holder) = b.begin(&key, None).await.unwrap() else {
            panic!()
        };
        let waiter = tokio::spawn({
            let (b, key) = (b.clone(), key.clone());
            async move {
                b.execute_with(
                    &key,
                    None,
                    InFlight::Wait(Duration::from_secs(5)),
                    |_| async { Ok::<u32, Failure<String, ()>>(99) },
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert!(
            !waiter.is_finished(),
            "the duplicate waits while the holder works"
        );
        holder.complete(&5u32).await.unwrap();
        let replayed = waiter.await.unwrap().unwrap();
        assert_eq!(
            (replayed.outcome, replayed.replayed),
            (Outcome::Completed(5), true)
        );

        let key2 = Key::new("t", "released").unwrap();
        let Started::Acquired(holder) = b.begin(&key2, None).await.unwrap() else {
            panic!()
        };
        let waiter = tokio::spawn({
            let (b, key2) = (b.clone(), key2.clone());
            async move {
                b.begin_with(&key2, None, InFlight::Wait(Duration::from_secs(5)))
                    .await
                    .map(|s| matches!(s, Started::Acquired(_)))
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        holder.release().await.unwrap();
        assert!(waiter.await.unwrap().unwrap(), "a released key is acquired");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_is_in_progress() {
        let (b, _clock, key) = setup();
        let Started::Acquired(_holder) = b.begin(&key, None).await.unwrap() else {
            panic!()
        };
        let start = tokio::time::Instant::now();
        let r = b
            .begin_with(&key, None, InFlight::Wait(Duration::from_secs(1)))
            .await;
        assert!(matches!(r, Err(Error::InProgress { .. })), "{r:?}");
        assert!(tokio::time::Instant::now() - start >= Duration::from_secs(1));
        let r = b.begin_with(&key, None, InFlight::Wait(Duration::MAX));
        assert!(
            poll_then_drop(r, 1).is_none(),
            "an unbounded wait keeps waiting"
        );
        let r = b.begin_with(&key, None, InFlight::Reject).await;
        assert!(matches!(r, Err(Error::InProgress { .. })), "{r:?}");
    }
}
