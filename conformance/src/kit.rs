//! The helpers every property uses: fresh environments, time, error formatting, a fault
//! injecting store wrapper and a poll-limited driver for dropped futures.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use idem_core::backend::TxRequest;
use idem_core::{
    Barrier, Begin, Deadlines, Error, Failure, Fingerprint, Guarantees, Key, Lease, ManualClock,
    Record, Response, RunError, Stats, Store, Timestamp, TransactionalStore,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::config::{Config, Rng};
use crate::factory::StoreFactory;

/// `return Err(format!(..))` unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}
pub(crate) use ensure;

/// What a property returns: `Err` explains the violation.
pub(crate) type Check = Result<(), String>;

/// Formats a store error with its source chain.
pub(crate) fn err(e: Error) -> String {
    let mut msg = format!("unexpected store error: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// Formats a barrier error.
pub(crate) fn run_err<E: std::fmt::Debug>(e: RunError<E>) -> String {
    match e {
        RunError::Barrier(e) => err(e),
        RunError::Operation(e) => format!("unexpected operation error: {e:?}"),
    }
}

/// A valid key (the suite's own keys are always valid).
pub(crate) fn key(scope: &str, id: &str) -> Result<Key, String> {
    Key::new(scope, id).map_err(err)
}

/// Fingerprint number `fp` (`0` = none), for generated calls.
pub(crate) fn fingerprint(fp: u8) -> Option<Fingerprint> {
    (fp > 0).then(|| Fingerprint::of_bytes(&[fp]))
}

/// The context of one property run: the configuration and its time parameters.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cx {
    pub cfg: Config,
}

impl Cx {
    pub fn lease(&self) -> Duration {
        self.cfg.timing.lease
    }

    pub fn retention(&self) -> Duration {
        self.cfg.timing.retention
    }

    pub fn scale(&self) -> u32 {
        self.cfg.scale
    }

    /// The deadlines the barrier would pass for a claim at `now`.
    pub fn deadlines(&self, now: Timestamp) -> Deadlines {
        let lease_until = now.plus(self.lease());
        Deadlines {
            lease_until,
            expires_at: lease_until.plus(self.retention()),
        }
    }

    /// When an outcome written at `now` may be purged.
    pub fn expiry(&self, now: Timestamp) -> Timestamp {
        now.plus(self.retention())
    }

    /// A generator for one property, derived from the run's seed.
    pub fn rng(&self, salt: &str) -> Rng {
        let mut h = self.cfg.seed;
        for b in salt.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        Rng::new(h)
    }
}

/// A fresh store, a manual clock at the run's start, and a barrier over both.
pub(crate) struct Env<S> {
    pub store: Arc<S>,
    pub clock: ManualClock,
    pub barrier: Barrier<S>,
}

impl<S: Store> Env<S> {
    pub fn over(store: Arc<S>, cx: &Cx) -> Self {
        let clock = ManualClock::new(cx.cfg.timing.start);
        let barrier = Barrier::new(Arc::clone(&store))
            .with_clock(Arc::new(clock.clone()))
            .with_lease(cx.lease())
            .with_retention(cx.retention());
        Env {
            store,
            clock,
            barrier,
        }
    }

    pub fn now(&self) -> Timestamp {
        idem_core::Clock::now(&self.clock)
    }
}

pub(crate) async fn env<F: StoreFactory>(f: &F, cx: &Cx) -> Result<Env<F::Store>, String> {
    Ok(Env::over(Arc::new(f.create().await.map_err(err)?), cx))
}

/// `begin` that must acquire.
pub(crate) async fn acquire<S: Store + ?Sized>(
    store: &S,
    k: &Key,
    fp: Option<&Fingerprint>,
    now: Timestamp,
    cx: &Cx,
) -> Result<Lease, String> {
    acquire_with(store, k, fp, cx.deadlines(now), now).await
}

/// `begin` with the deadlines `d` that must acquire.
pub(crate) async fn acquire_with<S: Store + ?Sized>(
    store: &S,
    k: &Key,
    fp: Option<&Fingerprint>,
    d: Deadlines,
    now: Timestamp,
) -> Result<Lease, String> {
    match store.begin(k, fp, d, now).await.map_err(err)? {
        Begin::Acquired(lease) => Ok(lease),
        other => Err(format!("begin on {k} should acquire, answered {other:?}")),
    }
}

/// `begin` at `now` with the run's deadlines.
pub(crate) async fn begin<S: Store + ?Sized>(
    store: &S,
    k: &Key,
    fp: Option<&Fingerprint>,
    now: Timestamp,
    cx: &Cx,
) -> Result<Begin, String> {
    store
        .begin(k, fp, cx.deadlines(now), now)
        .await
        .map_err(err)
}

/// `get` that must find a record.
pub(crate) async fn record<S: Store + ?Sized>(store: &S, k: &Key) -> Result<Record, String> {
    store
        .get(k)
        .await
        .map_err(err)?
        .ok_or_else(|| format!("the record of {k} is missing"))
}

pub(crate) fn lease_lost<T: std::fmt::Debug>(what: &str, r: Result<T, Error>) -> Check {
    match r {
        Err(Error::LeaseLost) => Ok(()),
        other => Err(format!("{what}: expected LeaseLost, got {other:?}")),
    }
}

/// Every write through `zombie`, a lease its store no longer honours, answers `LeaseLost`
/// at `now`: complete and fail (with `resp`), extend and release.
pub(crate) async fn fenced<S: Store + ?Sized>(
    s: &S,
    zombie: &Lease,
    resp: &[u8],
    now: Timestamp,
    cx: &Cx,
    who: &str,
) -> Check {
    let expires = cx.expiry(now);
    let complete = s.complete(zombie, resp, expires, now).await;
    lease_lost(&format!("{who}: complete"), complete)?;
    let fail = s.fail(zombie, resp, expires, now).await;
    lease_lost(&format!("{who}: fail"), fail)?;
    let extend = s.extend(zombie, cx.deadlines(now), now).await;
    lease_lost(&format!("{who}: extend"), extend)?;
    lease_lost(&format!("{who}: release"), s.release(zombie, now).await)
}

/// The barrier's answer in the suite's lease-mode scenarios.
pub(crate) type Charge = Result<Response<u64, String>, RunError<String>>;

/// A lease-mode "charge": counts its executions and answers `100 × execution number`.
pub(crate) async fn charge<S: Store + ?Sized + 'static>(
    barrier: &Barrier<S>,
    k: &Key,
    fp: Option<Fingerprint>,
    executions: &AtomicU32,
    hold: Duration,
) -> Charge {
    barrier
        .execute(k, fp, |_lease| async move {
            let n = executions.fetch_add(1, Ordering::SeqCst) + 1;
            if !hold.is_zero() {
                tokio::time::sleep(hold).await;
            }
            Ok::<u64, Failure<String, String>>(u64::from(n) * 100)
        })
        .await
}

/// Runs `fut`, or reports `what` as stuck after [`Config::stuck_after`] (a liveness guard).
pub(crate) async fn within<T>(
    cx: &Cx,
    what: &str,
    fut: impl Future<Output = T>,
) -> Result<T, String> {
    let limit = cx.cfg.stuck_after;
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("{what} did not return within {limit:?}: it is stuck"))
}

/// The answer of a spawned task, within [`Config::stuck_after`]; a panic in it is a failure.
pub(crate) async fn joined<T>(cx: &Cx, what: &str, task: JoinHandle<T>) -> Result<T, String> {
    within(cx, what, task)
        .await?
        .map_err(|e| format!("{what}: {e}"))
}

/// Spawns every future of `futs` behind one start line, so that they all begin at once.
pub(crate) fn at_once<Fut>(futs: impl IntoIterator<Item = Fut>) -> Vec<JoinHandle<Fut::Output>>
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let futs: Vec<Fut> = futs.into_iter().collect();
    let start = Arc::new(tokio::sync::Barrier::new(futs.len()));
    futs.into_iter()
        .map(|fut| {
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                start.wait().await;
                fut.await
            })
        })
        .collect()
}

/// Polls `fut` at most `polls` times, then drops it: `Some` if it finished first.
pub(crate) async fn poll_then_drop<F: Future>(fut: F, polls: usize) -> Option<F::Output> {
    struct Limited<F> {
        fut: Pin<Box<F>>,
        left: usize,
    }
    impl<F: Future> Future for Limited<F> {
        type Output = Option<F::Output>;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            match self.fut.as_mut().poll(cx) {
                Poll::Ready(v) => Poll::Ready(Some(v)),
                Poll::Pending => Poll::Pending,
            }
        }
    }
    Limited {
        fut: Box::pin(fut),
        left: polls,
    }
    .await
}

/// Where [`Faulty`] injects a fault into one store call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Fault {
    /// The call fails before it reaches the store (nothing happens).
    Before,
    /// The call takes effect, then its reply is lost (the caller sees a retryable error).
    ReplyLost,
}

/// A store wrapper that injects one fault into its `n`-th call (counting every call), as
/// a network or a crashing client would. Everything else is forwarded unchanged.
pub(crate) struct Faulty<S> {
    pub inner: Arc<S>,
    calls: AtomicUsize,
    plan: Mutex<Option<(usize, Fault)>>,
}

impl<S> Faulty<S> {
    pub fn new(inner: Arc<S>) -> Self {
        Faulty {
            inner,
            calls: AtomicUsize::new(0),
            plan: Mutex::new(None),
        }
    }

    /// Injects `fault` into the `n`-th call from now (0 = the next one).
    pub fn arm(&self, n: usize, fault: Fault) {
        let at = self.calls.load(Ordering::SeqCst) + n;
        *self.plan.lock().unwrap_or_else(|p| p.into_inner()) = Some((at, fault));
    }

    fn fault(&self) -> Option<Fault> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let mut plan = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        match *plan {
            Some((at, fault)) if at == call => {
                *plan = None;
                Some(fault)
            }
            _ => None,
        }
    }

    async fn call<T, Fut: Future<Output = Result<T, Error>>>(
        &self,
        f: impl FnOnce() -> Fut,
    ) -> Result<T, Error> {
        match self.fault() {
            Some(Fault::Before) => Err(injected("before the call reached the store")),
            Some(Fault::ReplyLost) => {
                let _ = f().await;
                Err(injected("after the call took effect (reply lost)"))
            }
            None => f().await,
        }
    }
}

fn injected(what: &str) -> Error {
    Error::retryable(format!("idem-conformance: injected fault {what}"))
}

#[async_trait]
impl<S: Store> Store for Faulty<S> {
    fn guarantees(&self) -> Guarantees {
        self.inner.guarantees()
    }
    async fn begin(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        d: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        self.call(|| self.inner.begin(key, fp, d, now)).await
    }
    async fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.call(|| self.inner.complete(lease, response, expires_at, now))
            .await
    }
    async fn fail(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.call(|| self.inner.fail(lease, response, expires_at, now))
            .await
    }
    async fn extend(&self, lease: &Lease, d: Deadlines, now: Timestamp) -> Result<Lease, Error> {
        self.call(|| self.inner.extend(lease, d, now)).await
    }
    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        self.call(|| self.inner.release(lease, now)).await
    }
    async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
        self.inner.get(key).await
    }
    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        self.inner.purge(now, batch).await
    }
    async fn stats(&self) -> Result<Stats, Error> {
        self.inner.stats().await
    }
}

impl<S: TransactionalStore> TransactionalStore for Faulty<S> {
    type Operation<T, F, E> = S::Operation<T, F, E>;

    async fn transact<T, F, E>(
        &self,
        request: TxRequest<'_>,
        op: Self::Operation<T, F, E>,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
    {
        match self.fault() {
            Some(Fault::Before) => Err(injected("before the transaction began").into()),
            Some(Fault::ReplyLost) => {
                let _ = self.inner.transact(request, op).await;
                Err(injected("after the commit (reply lost)").into())
            }
            None => self.inner.transact(request, op).await,
        }
    }
}
