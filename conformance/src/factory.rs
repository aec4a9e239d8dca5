//! What an implementor provides: a factory of fresh stores, hooks to reopen them, and (for
//! transactional stores) the operation that writes business rows.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use idem_core::{Error, Failure, Key, Store, TransactionalStore};

/// Hands out fresh, isolated stores (or namespaces of one store), one per test case, and
/// gives the suite the handles it needs to check the guarantees the store declares.
///
/// # Contract
///
/// Every store `create` returns must start empty and must not share records with any other
/// store it returned: properties run concurrently and each assumes it is alone.
///
/// The hooks answer `None` when the factory does not provide them. A store that declares
/// [`idem_core::Guarantees::durable`] needs [`StoreFactory::reopen`], and one that declares
/// [`idem_core::Guarantees::shared_across_processes`] needs [`StoreFactory::second_handle`]:
/// without them the suite cannot check the claim and the property fails.
#[async_trait]
pub trait StoreFactory: Send + Sync + 'static {
    /// The store under test.
    type Store: Store + 'static;

    /// A short name of the backend, matched against `IDEM_TEST_REQUIRE` (`postgres`,
    /// `redis`, `sqlite`, …).
    fn name(&self) -> &str;

    /// `Some(reason)` if the backing service cannot be reached: the properties are then
    /// skipped with the reason printed, unless `IDEM_TEST_REQUIRE` names this backend, in
    /// which case they fail.
    async fn unavailable(&self) -> Option<String> {
        None
    }

    /// A fresh, empty, isolated store.
    async fn create(&self) -> Result<Self::Store, Error>;

    /// The data of `store` after a restart: drop `store` (and everything it holds in
    /// memory: caches, connections, buffered writes) and open the same data again, as a
    /// process starting up would. Used to check `durable`.
    async fn reopen(&self, store: Self::Store) -> Option<Result<Self::Store, Error>> {
        drop(store);
        None
    }

    /// A second, independent handle on the data of `store`, as another process would open
    /// it (its own connections, nothing shared in memory with `store`), while `store` stays
    /// in use. Used to check `shared_across_processes`.
    async fn second_handle(&self, store: &Self::Store) -> Option<Result<Self::Store, Error>> {
        let _ = store;
        None
    }

    /// The data of `store` after the loss of the server it talks to: fail over to a replica
    /// and open a handle there. Used to check `survives_failover`; the property is reported
    /// as skipped (never as passed) when this hook is absent.
    async fn fail_over(&self, store: Self::Store) -> Option<Result<Self::Store, Error>> {
        drop(store);
        None
    }
}

/// How the operation of a transactional-mode test case ends.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TxEnd {
    /// Return `Ok(rows)`.
    Commit,
    /// Return a permanent failure (`"declined"`).
    Permanent,
    /// Return a retryable failure (`"timeout"`).
    Retryable,
    /// Panic after writing: the process "dies" before commit.
    Panic,
    /// Stop at a [`Gate`] the suite controls (after writing), and end as the suite says
    /// when it opens the gate.
    Gated(GateId),
}

/// What a transactional-mode test operation does: write `rows` business rows for its key
/// through the store's transaction, wait `hold`, then end as `end` says.
///
/// A factory's operation must call [`TxPlan::finish`] last, inside the transaction: it
/// returns the result, panics for [`TxEnd::Panic`], and blocks at a gate for
/// [`TxEnd::Gated`] (in async code it uses `tokio::task::block_in_place`, so a
/// multi-threaded runtime keeps running).
///
/// # Panics
///
/// A panicking body must never commit anything. The store must roll the transaction back
/// and then either let the panic continue to the caller (`std::panic::resume_unwind`, what
/// the suite expects by default) or answer an error; never an outcome.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TxPlan {
    /// Business rows to insert, tagged with the key.
    pub rows: u32,
    /// How long to keep the transaction open after writing (widens race windows).
    pub hold: Duration,
    /// How the operation ends.
    pub end: TxEnd,
}

impl TxPlan {
    /// The operation's result once its rows are written: call it last in
    /// [`TxFactory::operation`].
    pub fn finish(&self) -> Result<u64, Failure<String, String>> {
        let end = match self.end {
            TxEnd::Gated(id) => pass_gate(id),
            end => end,
        };
        match end {
            TxEnd::Commit => Ok(u64::from(self.rows)),
            TxEnd::Permanent => Err(Failure::Permanent("declined".into())),
            TxEnd::Panic => panic!("idem-conformance: simulated crash before commit"),
            TxEnd::Retryable | TxEnd::Gated(_) => Err(Failure::Retryable("timeout".into())),
        }
    }
}

/// A [`StoreFactory`] whose stores run operations in their own transaction: it builds the
/// store-specific operation that writes business rows, and counts them.
#[async_trait]
pub trait TxFactory: StoreFactory
where
    Self::Store: TransactionalStore,
{
    /// An operation for `key` that follows `plan`: insert `plan.rows` business rows tagged
    /// with `key` through the transaction, sleep `plan.hold`, then return `plan.finish()`.
    fn operation(
        &self,
        key: &Key,
        plan: TxPlan,
    ) -> <Self::Store as TransactionalStore>::Operation<u64, String, String>;

    /// How many business rows tagged with `key` are committed.
    async fn business_rows(&self, store: &Self::Store, key: &Key) -> Result<u64, Error>;
}

/// Names a [`Gate`] inside a [`TxPlan`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct GateId(u64);

/// A point inside transactional operations where the suite holds them: each operation that
/// reaches the gate waits there until the suite lets it out with an end of its choosing.
/// It tells the suite how many operations are inside at once, which is how "never executes
/// twice concurrently" is observed without timing.
///
/// Dropping the gate lets every waiting operation out with [`TxEnd::Retryable`].
#[derive(Debug)]
pub struct Gate {
    id: GateId,
    state: Arc<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    inner: Mutex<GateInner>,
    changed: Condvar,
    entered: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct GateInner {
    inside: u32,
    most_inside: u32,
    entered: u32,
    exits: Vec<TxEnd>,
    closed: bool,
}

/// The most time an operation waits at a gate before it gives up with a rollback.
pub const GATE_TIMEOUT: Duration = Duration::from_secs(120);

fn gates() -> &'static Mutex<HashMap<GateId, Arc<GateState>>> {
    static GATES: OnceLock<Mutex<HashMap<GateId, Arc<GateState>>>> = OnceLock::new();
    GATES.get_or_init(Mutex::default)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gate {
    /// A new gate, registered for [`TxEnd::Gated`].
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = GateId(NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        let state = Arc::new(GateState::default());
        lock(gates()).insert(id, Arc::clone(&state));
        Gate { id, state }
    }

    /// The plan end that stops at this gate.
    pub fn end(&self) -> TxEnd {
        TxEnd::Gated(self.id)
    }

    /// Waits until at least `n` operations have reached the gate since it was made.
    pub async fn entered(&self, n: u32) {
        loop {
            let notified = self.state.entered.notified();
            if lock(&self.state.inner).entered >= n {
                return;
            }
            notified.await;
        }
    }

    /// Lets one waiting (or the next arriving) operation out, ending as `end`.
    pub fn open(&self, end: TxEnd) {
        lock(&self.state.inner).exits.push(end);
        self.state.changed.notify_all();
    }

    /// How many operations reached the gate so far.
    pub fn total_entered(&self) -> u32 {
        lock(&self.state.inner).entered
    }

    /// The most operations that were inside the gate at the same time.
    pub fn most_inside(&self) -> u32 {
        lock(&self.state.inner).most_inside
    }
}

impl Default for Gate {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        lock(gates()).remove(&self.id);
        lock(&self.state.inner).closed = true;
        self.state.changed.notify_all();
    }
}

fn pass_gate(id: GateId) -> TxEnd {
    let Some(state) = lock(gates()).get(&id).cloned() else {
        return TxEnd::Retryable;
    };
    {
        let mut g = lock(&state.inner);
        g.inside += 1;
        g.entered += 1;
        g.most_inside = g.most_inside.max(g.inside);
    }
    state.entered.notify_waiters();
    let wait = || {
        let mut g = lock(&state.inner);
        let deadline = std::time::Instant::now() + GATE_TIMEOUT;
        let end = loop {
            if g.closed {
                break TxEnd::Retryable;
            }
            if !g.exits.is_empty() {
                break g.exits.remove(0);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break TxEnd::Retryable;
            }
            g = state
                .changed
                .wait_timeout(g, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        };
        g.inside -= 1;
        end
    };
    let on_worker = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if on_worker {
        tokio::task::block_in_place(wait)
    } else {
        wait()
    }
}
