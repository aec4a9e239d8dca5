//! Transactional mode, as thoroughly as lease mode: commit once, rollbacks leave nothing,
//! fingerprints on every path, fencing across modes, Wait and NoWait, retention.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    Barrier, Clock, Error, Fingerprint, Key, Lease, ManualClock, Outcome, Response, RunError,
    State, Store, TransactionalStore, TxPolicy,
};
use tokio::task::JoinHandle;

use crate::config::{TTL_TRAP_JUMP, TX_DUPLICATES, TX_ROLLBACKS, TX_ROUNDS};
use crate::factory::{Gate, TxEnd, TxFactory, TxPlan};
use crate::kit::{
    acquire, at_once, charge, ensure, env, err, fenced, joined, key, lease_lost, record, run_err,
    within, Check, Cx, Env,
};

/// What a transaction answers when it has an outcome.
type Answer = Response<u64, String>;
/// What a transaction answers.
type TxResult = Result<Answer, RunError<String>>;

/// The outcome a zombie (a holder whose lease was reclaimed) tries to store.
const ZOMBIE: &[u8] = b"\x01\"zombie\"";

/// One transactional property's world: the factory and the run's context, and a fresh store
/// with its clock and a barrier over both.
struct TxEnv<'a, F>
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    f: &'a F,
    cx: Cx,
    store: Arc<F::Store>,
    clock: ManualClock,
    barrier: Barrier<F::Store>,
    /// The policy of [`TxEnv::tx`]'s calls.
    policy: TxPolicy,
}

impl<'a, F> TxEnv<'a, F>
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    async fn new(f: &'a F, cx: &Cx) -> Result<Self, String> {
        Self::with_policy(f, cx, TxPolicy::Wait).await
    }

    /// [`TxEnv::new`] whose calls run with `policy` unless a call says otherwise.
    async fn with_policy(f: &'a F, cx: &Cx, policy: TxPolicy) -> Result<Self, String> {
        let Env {
            store,
            clock,
            barrier,
        } = env(f, cx).await?;
        Ok(TxEnv {
            f,
            cx: *cx,
            store,
            clock,
            barrier,
            policy,
        })
    }

    /// A transaction on `k` that writes `rows` business rows and commits, with the
    /// environment's policy (`Wait` unless it says otherwise) and without fingerprint;
    /// [`Call`]'s builders change the rest.
    fn tx<'c>(&'c self, k: &'c Key, rows: u32) -> Call<'c, F> {
        Call {
            env: self,
            key: k,
            fp: None,
            policy: self.policy,
            plan: TxPlan {
                rows,
                hold: Duration::ZERO,
                end: TxEnd::Commit,
            },
        }
    }

    /// The business rows committed for `k`.
    async fn rows(&self, k: &Key) -> Result<u64, String> {
        self.f.business_rows(&self.store, k).await.map_err(err)
    }

    /// `k` has exactly `want` committed business rows.
    async fn expect_rows(&self, k: &Key, want: u64, when: &str) -> Check {
        let n = self.rows(k).await?;
        ensure!(n == want, "{when}: {n} business rows, expected {want}");
        Ok(())
    }

    /// `what` left neither business rows nor a record under `k`.
    async fn expect_nothing(&self, k: &Key, what: &str) -> Check {
        let n = self.rows(k).await?;
        let rec = self.store.get(k).await.map_err(err)?;
        ensure!(
            n == 0 && rec.is_none(),
            "{what} left {n} business rows and the record {rec:?} (expected neither)"
        );
        Ok(())
    }

    /// A live lease-mode claim on `k`: a transaction beside it must not run. Once that lease
    /// expires a transaction reclaims the key, and the old holder (a zombie) is fenced.
    /// Returns the zombie's lease.
    async fn reclaim_after_a_live_lease(&self, k: &Key) -> Result<Lease, String> {
        let lease = acquire(&*self.store, k, None, self.clock.now(), &self.cx).await?;
        self.tx(k, 1)
            .refused(Refusal::InProgress, "a transaction beside a live lease")
            .await?;
        self.expect_rows(k, 0, "beside a live lease").await?;
        self.clock.advance(self.cx.lease() + Duration::from_secs(1));
        self.tx(k, 1)
            .fresh("the transaction on a key with an expired lease (it must reclaim it)")
            .await?;
        self.zombie_complete(
            &lease,
            "the zombie's complete after a transactional reclaim",
        )
        .await?;
        Ok(lease)
    }

    /// `complete` through `zombie`, a lease the store no longer honours, answers `LeaseLost`.
    async fn zombie_complete(&self, zombie: &Lease, what: &str) -> Check {
        let now = self.clock.now();
        let r = self
            .store
            .complete(zombie, ZOMBIE, self.cx.expiry(now), now)
            .await;
        lease_lost(what, r)
    }
}

/// One transaction through the barrier: made by [`TxEnv::tx`], adjusted by the builders,
/// then run by what it is expected to answer.
struct Call<'c, F>
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    env: &'c TxEnv<'c, F>,
    key: &'c Key,
    fp: Option<Fingerprint>,
    policy: TxPolicy,
    plan: TxPlan,
}

impl<F> Call<'_, F>
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    fn fp(self, fp: Option<Fingerprint>) -> Self {
        Call { fp, ..self }
    }

    fn policy(self, policy: TxPolicy) -> Self {
        Call { policy, ..self }
    }

    fn end(mut self, end: TxEnd) -> Self {
        self.plan.end = end;
        self
    }

    fn hold(mut self, hold: Duration) -> Self {
        self.plan.hold = hold;
        self
    }

    /// Runs the transaction; whatever it answers.
    async fn run(self) -> TxResult {
        let op = self.env.f.operation(self.key, self.plan);
        let b = &self.env.barrier;
        b.transaction(self.key, self.fp, self.policy, op).await
    }

    /// The transaction as a future that owns what it needs, to spawn.
    fn detached(self) -> impl Future<Output = TxResult> + Send + 'static {
        let op = self.env.f.operation(self.key, self.plan);
        let (b, k, fp, policy) = (
            self.env.barrier.clone(),
            self.key.clone(),
            self.fp,
            self.policy,
        );
        async move { b.transaction(&k, fp, policy, op).await }
    }

    /// The transaction spawned: it runs beside the caller.
    fn spawn(self) -> JoinHandle<TxResult> {
        tokio::spawn(self.detached())
    }

    /// Runs the transaction, which must answer an outcome (executed or replayed).
    async fn answer(self, what: &str) -> Result<Answer, String> {
        self.run()
            .await
            .map_err(|e| format!("{what}: {}", run_err(e)))
    }

    /// Runs the transaction, which must execute (not replay).
    async fn fresh(self, what: &str) -> Result<Answer, String> {
        let r = self.answer(what).await?;
        ensure!(!r.replayed, "{what} replayed instead of executing: {r:?}");
        Ok(r)
    }

    /// Runs the transaction, which must replay a stored outcome.
    async fn replay(self, what: &str) -> Result<Answer, String> {
        let r = self.answer(what).await?;
        ensure!(r.replayed, "{what} executed instead of replaying: {r:?}");
        Ok(r)
    }

    /// Runs the transaction, which must take no effect and answer as `want` says.
    async fn refused(self, want: Refusal, what: &str) -> Check {
        refused(want, what, &self.run().await)
    }
}

/// How a transaction that takes no effect answers.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// `Error::Mismatch`: the key holds another payload.
    Mismatch,
    /// `Error::InProgress`: another attempt holds the key.
    InProgress,
    /// The operation's own error: the transaction rolled back.
    RolledBack,
}

/// `r`, the answer of `what`, is the refusal `want`.
fn refused(want: Refusal, what: &str, r: &TxResult) -> Check {
    let is = match want {
        Refusal::Mismatch => matches!(r, Err(RunError::Barrier(Error::Mismatch))),
        Refusal::InProgress => matches!(r, Err(RunError::Barrier(Error::InProgress { .. }))),
        Refusal::RolledBack => matches!(r, Err(RunError::Operation(_))),
    };
    ensure!(is, "{what} answered {r:?}, expected {want:?}");
    Ok(())
}

/// `r`, the answer of `what`, has the outcome `want`.
fn outcome(what: &str, r: &Answer, want: Outcome<u64, String>) -> Check {
    ensure!(
        r.outcome == want,
        "{what} answered {r:?}, expected {want:?}"
    );
    Ok(())
}

/// How the calls of a burst of duplicates answered.
#[derive(Default)]
struct Tally {
    fresh: usize,
    replays: usize,
    busy: usize,
}

/// Waits for every call of a burst and counts the answers: `InProgress` counts as busy
/// where `busy_ok`, any other error fails the burst (`what`).
async fn tally(
    cx: &Cx,
    tasks: Vec<JoinHandle<TxResult>>,
    busy_ok: bool,
    what: &str,
) -> Result<Tally, String> {
    let mut t = Tally::default();
    for task in tasks {
        match joined(cx, what, task).await? {
            Ok(r) if r.replayed => t.replays += 1,
            Ok(_) => t.fresh += 1,
            Err(RunError::Barrier(Error::InProgress { .. })) if busy_ok => t.busy += 1,
            Err(e) => return Err(format!("{what}: {}", run_err(e))),
        }
    }
    Ok(t)
}

pub(crate) async fn commit_once<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = TxEnv::new(f, cx).await?;
    commits_once(&env, &key("tx", "commit-once")?).await
}

/// `k` commits once with the fingerprint of `order=1`; retries after the TTL-trap jump
/// replay it and write nothing; the record keeps the fingerprint.
async fn commits_once<F>(env: &TxEnv<'_, F>, k: &Key) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let fp = Some(Fingerprint::of_bytes(b"order=1"));
    let first = env.tx(k, 3).fp(fp).fresh("the first transaction").await?;
    outcome("the first transaction", &first, Outcome::Completed(3))?;
    env.expect_rows(k, 3, "after the commit").await?;
    env.clock.advance(TTL_TRAP_JUMP);
    for _ in 0..3 {
        let again = env.tx(k, 3).fp(fp).replay("a retry").await?;
        outcome("a retry", &again, Outcome::Completed(3))?;
    }
    env.expect_rows(k, 3, "after the retries (which must not write again)")
        .await?;
    let rec = env.store.get(k).await.map_err(err)?;
    ensure!(
        matches!(
            rec.as_ref().map(|r| &r.state),
            Some(State::Completed { .. })
        ) && rec.as_ref().and_then(|r| r.fingerprint) == fp,
        "the committed record is {rec:?}"
    );
    Ok(())
}

pub(crate) async fn ghost<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = TxEnv::new(f, cx).await?;
    let k = key("tx", "ghost")?;
    rollbacks_leave_nothing(&env, &k).await?;

    env.tx(&k, 3)
        .policy(TxPolicy::NoWait)
        .fresh("the retry after a crash")
        .await?;
    env.tx(&k, 3).replay("the second retry").await?;
    env.expect_rows(&k, 3, "after crash and retries").await
}

/// A retryable failure on `k`, then a worker that dies mid-operation (a panic before
/// commit), each after writing three rows: neither leaves rows or a record.
async fn rollbacks_leave_nothing<F>(env: &TxEnv<'_, F>, k: &Key) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    env.tx(k, 3)
        .end(TxEnd::Retryable)
        .refused(Refusal::RolledBack, "a retryable failure")
        .await?;
    env.expect_nothing(k, "a rolled-back transaction").await?;
    let crashed = env.tx(k, 3).end(TxEnd::Panic).spawn().await;
    ensure!(
        crashed.as_ref().is_err_and(|e| e.is_panic()),
        "the simulated crash did not happen: {crashed:?}"
    );
    env.expect_nothing(k, "a crashed transaction").await
}

pub(crate) async fn permanent_failure<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = TxEnv::new(f, cx).await?;
    let k = key("tx", "declined")?;
    let declined = || Outcome::Failed("declined".into());
    let what = "a permanent failure";
    let r = env.tx(&k, 2).end(TxEnd::Permanent).fresh(what).await?;
    outcome(what, &r, declined())?;
    env.expect_rows(&k, 0, "after a permanent failure (its rows must roll back)")
        .await?;
    let what = "the retry of a permanent failure";
    let again = env.tx(&k, 2).replay(what).await?;
    outcome(what, &again, declined())?;
    env.expect_rows(&k, 0, what).await
}

pub(crate) async fn concurrent_duplicates<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = TxEnv::new(f, cx).await?;
    for round in 0..(TX_ROUNDS * cx.scale()) {
        for policy in [TxPolicy::Wait, TxPolicy::NoWait] {
            let k = key("tx-race", &format!("{policy:?}-{round}"))?;
            let hold = Duration::from_millis(30);
            let tasks = at_once(
                (0..TX_DUPLICATES).map(|_| env.tx(&k, 1).policy(policy).hold(hold).detached()),
            );
            let what = format!("{policy:?} round {round}");
            let busy_ok = policy == TxPolicy::NoWait;
            let Tally {
                fresh,
                replays,
                busy,
            } = tally(cx, tasks, busy_ok, &what).await?;
            let n = env.rows(&k).await?;
            ensure!(
                fresh == 1 && n == 1,
                "{what}: {TX_DUPLICATES} concurrent duplicates: {fresh} executed, \
                 {replays} replayed, {busy} in progress, {n} business rows"
            );
            if policy == TxPolicy::Wait {
                ensure!(
                    replays == TX_DUPLICATES - 1,
                    "Wait: every duplicate must replay ({replays} did)"
                );
            }
        }
    }
    Ok(())
}

/// `TxPolicy::Optimistic` (which a store may honour by running the operation before it
/// claims the key, and otherwise runs as `Wait`): commit once, replay without writing,
/// mismatch, nothing left by a rollback or a crash, a permanent failure, a live and an
/// expired lease-mode claim with its zombie fenced, and concurrent duplicates of which
/// exactly one commits and every other replays it.
pub(crate) async fn optimistic<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = TxEnv::with_policy(f, cx, TxPolicy::Optimistic).await?;
    let k = key("tx-optimistic", "commit")?;
    commits_once(&env, &k).await?;
    env.tx(&k, 3)
        .fp(Some(Fingerprint::of_bytes(b"order=2")))
        .refused(Refusal::Mismatch, "a retry with another payload")
        .await?;
    env.expect_rows(&k, 3, "after a retry with another payload")
        .await?;

    let k = key("tx-optimistic", "ghost")?;
    rollbacks_leave_nothing(&env, &k).await?;
    env.tx(&k, 2).fresh("the retry after a crash").await?;
    env.expect_rows(&k, 2, "after a crash and its retry")
        .await?;

    let k = key("tx-optimistic", "declined")?;
    let declined = || Outcome::Failed("declined".into());
    let r = env
        .tx(&k, 2)
        .end(TxEnd::Permanent)
        .fresh("a permanent failure")
        .await?;
    outcome("a permanent failure", &r, declined())?;
    let again = env.tx(&k, 2).replay("its retry").await?;
    outcome("the retry of a permanent failure", &again, declined())?;
    env.expect_rows(&k, 0, "after a permanent failure and its retry")
        .await?;

    let k = key("tx-optimistic", "lease")?;
    let lease = env.reclaim_after_a_live_lease(&k).await?;
    let rec = record(&*env.store, &k).await?;
    ensure!(
        rec.token > lease.token && matches!(rec.state, State::Completed { .. }),
        "after an optimistic reclaim the record is {rec:?} (the zombie held {:?})",
        lease.token
    );
    env.expect_rows(&k, 1, "after the reclaim").await?;

    for round in 0..(TX_ROUNDS * cx.scale()) {
        let k = key("tx-optimistic-race", &round.to_string())?;
        let hold = Duration::from_millis(30);
        let tasks = at_once((0..TX_DUPLICATES).map(|_| env.tx(&k, 1).hold(hold).detached()));
        let what = format!("Optimistic round {round}");
        let Tally {
            fresh,
            replays,
            busy,
        } = tally(cx, tasks, false, &what).await?;
        let n = env.rows(&k).await?;
        ensure!(
            fresh == 1 && replays == TX_DUPLICATES - 1 && n == 1,
            "{what}: {TX_DUPLICATES} concurrent duplicates: {fresh} executed, \
             {replays} replayed, {busy} in progress, {n} business rows \
             (expected one execution, every other replaying it, one row)"
        );
    }
    Ok(())
}

pub(crate) async fn mixed_modes<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = TxEnv::new(f, cx).await?;
    let (a, b) = (Fingerprint::of_bytes(b"a"), Fingerprint::of_bytes(b"b"));
    let k = key("tx-mixed", "mismatch")?;
    env.tx(&k, 1)
        .fp(Some(a))
        .answer("the first transaction")
        .await?;
    env.tx(&k, 1)
        .fp(Some(b))
        .refused(Refusal::Mismatch, "a transaction with another payload")
        .await?;
    env.expect_rows(&k, 1, "after a mismatched transaction")
        .await?;

    let live = key("tx-mixed", "live-lease")?;
    env.reclaim_after_a_live_lease(&live).await?;
    env.expect_rows(&live, 1, "after the reclaim").await
}

pub(crate) async fn mismatch_every_path<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = TxEnv::new(f, cx).await?;
    let (fa, fb) = (Fingerprint::of_bytes(b"a"), Fingerprint::of_bytes(b"b"));
    let other = |path: &str| format!("{path}: a transaction with another payload");
    // A fresh claim stores the fingerprint; replays of its completion check it.
    let k = key("tx-mismatch", "completed")?;
    env.tx(&k, 1)
        .fp(Some(fa))
        .answer("the first transaction")
        .await?;
    ensure!(
        record(&*env.store, &k).await?.fingerprint == Some(fa),
        "a transactional claim did not keep its fingerprint"
    );
    for policy in [TxPolicy::Wait, TxPolicy::NoWait] {
        let what = other(&format!("completed ({policy:?})"));
        let call = env.tx(&k, 1).fp(Some(fb)).policy(policy);
        call.refused(Refusal::Mismatch, &what).await?;
    }
    for fp in [Some(fa), None] {
        env.tx(&k, 1).fp(fp).replay("an identical retry").await?;
    }
    // A permanent failure's replay.
    let k = key("tx-mismatch", "failed")?;
    env.tx(&k, 1)
        .fp(Some(fa))
        .end(TxEnd::Permanent)
        .answer("a permanent failure")
        .await?;
    env.tx(&k, 1)
        .fp(Some(fb))
        .refused(Refusal::Mismatch, &other("failed"))
        .await?;
    // A live lease-mode claim: mismatch comes before "in progress".
    let k = key("tx-mismatch", "live-lease")?;
    acquire(&*env.store, &k, Some(&fa), env.clock.now(), cx).await?;
    for policy in [TxPolicy::Wait, TxPolicy::NoWait] {
        let what = other(&format!("live lease ({policy:?})"));
        let call = env.tx(&k, 1).fp(Some(fb)).policy(policy);
        call.refused(Refusal::Mismatch, &what).await?;
    }
    // An expired lease-mode claim: no reclaim for another payload, and nothing changes.
    let before = record(&*env.store, &k).await?;
    env.clock.advance(cx.lease());
    env.tx(&k, 1)
        .fp(Some(fb))
        .refused(Refusal::Mismatch, &other("reclaim"))
        .await?;
    ensure!(
        record(&*env.store, &k).await? == before,
        "a mismatched transactional reclaim changed the record"
    );
    env.tx(&k, 1)
        .fp(Some(fa))
        .fresh("the matching reclaim")
        .await?;
    // A transaction still open: a Wait duplicate with another payload waits, then mismatches.
    let k = key("tx-mismatch", "open")?;
    let gate = Gate::new();
    let holder = env.tx(&k, 1).fp(Some(fa)).end(gate.end()).spawn();
    within(cx, "the holder reaching its gate", gate.entered(1)).await?;
    let waiter = env.tx(&k, 1).fp(Some(fb)).spawn();
    let no_wait = env.tx(&k, 1).fp(Some(fb)).policy(TxPolicy::NoWait);
    let no_wait = within(cx, "a NoWait duplicate", no_wait.run()).await?;
    ensure!(
        matches!(
            no_wait,
            Err(RunError::Barrier(
                Error::InProgress { .. } | Error::Mismatch
            ))
        ),
        "NoWait with another payload beside an open transaction answered {no_wait:?}"
    );
    gate.open(TxEnd::Commit);
    joined(cx, "the holder", holder).await?.map_err(run_err)?;
    let waited = joined(cx, "the waiting duplicate", waiter).await?;
    let what = other("after waiting for an open transaction");
    refused(Refusal::Mismatch, &what, &waited)?;
    env.expect_rows(&k, 1, "after mismatched duplicates").await
}

pub(crate) async fn reclaim_fencing<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = TxEnv::new(f, cx).await?;
    let s = &*env.store;
    let k = key("tx-fencing", "expired")?;
    let zombie = acquire(s, &k, None, env.clock.now(), cx).await?;
    env.clock.advance(cx.lease() + Duration::from_millis(1));
    env.tx(&k, 2)
        .fresh("the transaction on a key with an expired lease (it must reclaim it)")
        .await?;
    let rec = record(s, &k).await?;
    ensure!(
        rec.token > zombie.token && matches!(rec.state, State::Completed { .. }),
        "after a transactional reclaim the record is {rec:?} (the zombie held {:?})",
        zombie.token
    );
    let now = env.clock.now();
    fenced(s, &zombie, ZOMBIE, now, cx, "the zombie").await?;
    ensure!(
        record(s, &k).await? == rec,
        "the zombie's writes changed the record"
    );
    env.expect_rows(&k, 2, "after the reclaim").await?;

    // A released lease-mode claim: the transaction acquires with a new token.
    let k = key("tx-fencing", "released")?;
    let l = acquire(s, &k, None, now, cx).await?;
    s.release(&l, now).await.map_err(err)?;
    env.tx(&k, 1)
        .policy(TxPolicy::NoWait)
        .answer("a transaction after a release")
        .await?;
    ensure!(
        record(s, &k).await?.token > l.token,
        "a transaction after a release reused the token"
    );
    env.zombie_complete(&l, "complete after release").await?;

    // A rolled-back transaction, then lease mode: the lease-mode outcome is the key's one.
    let k = key("tx-fencing", "after-rollback")?;
    env.tx(&k, 1)
        .end(TxEnd::Retryable)
        .refused(Refusal::RolledBack, "a retryable failure")
        .await?;
    let executions = AtomicU32::new(0);
    charge(&env.barrier, &k, None, &executions, Duration::ZERO)
        .await
        .map_err(run_err)?;
    let what = "a transaction after a lease-mode completion";
    let r = env.tx(&k, 1).replay(what).await?;
    outcome(what, &r, Outcome::Completed(100))?;
    env.expect_rows(&k, 0, what).await
}

pub(crate) async fn interleaving<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = TxEnv::new(f, cx).await?;
    for round in 0..(TX_ROUNDS * cx.scale()) {
        let k = key("tx-interleaving", &format!("k{round}"))?;
        let executions = Arc::new(AtomicU32::new(0));
        let hold = Duration::from_millis(5);
        let tasks = at_once((0..TX_DUPLICATES).map(|i| {
            let policy = if i % 4 < 2 {
                TxPolicy::Wait
            } else {
                TxPolicy::NoWait
            };
            let tx = env.tx(&k, 1).policy(policy).hold(hold).detached();
            let (b, k, ex) = (env.barrier.clone(), k.clone(), Arc::clone(&executions));
            async move {
                if i % 2 == 0 {
                    charge(&b, &k, None, &ex, hold).await
                } else {
                    tx.await
                }
            }
        }));
        let what = format!("round {round}");
        let Tally {
            fresh,
            replays,
            busy,
        } = tally(cx, tasks, true, &what).await?;
        let (ran, n) = (executions.load(Ordering::SeqCst), env.rows(&k).await?);
        ensure!(
            fresh == 1 && u64::from(ran) + n == 1,
            "{what}: lease-mode and transactional duplicates: {fresh} fresh outcomes, \
             {replays} replays, {busy} in progress; {ran} lease-mode executions and {n} \
             transactional rows (exactly one effect expected)"
        );
    }
    Ok(())
}

pub(crate) async fn wait_and_no_wait<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    let env = TxEnv::new(f, cx).await?;
    // Wait, through several attempts that roll back: the attempts run one at a time, no
    // duplicate gives up, and exactly one commits.
    let k = key("tx-wait", "rollbacks")?;
    let gate = Gate::new();
    let mut tasks = Vec::new();
    for i in 0..TX_DUPLICATES {
        tasks.push(env.tx(&k, 1).end(gate.end()).spawn());
        if i == 0 {
            within(cx, "the first attempt reaching its gate", gate.entered(1)).await?;
        }
    }
    for attempt in 1..=TX_ROLLBACKS {
        gate.open(TxEnd::Retryable);
        within(
            cx,
            "the next waiting duplicate taking over after a rollback",
            gate.entered(attempt + 1),
        )
        .await?;
    }
    gate.open(TxEnd::Commit);
    let (mut fresh, mut replays, mut rolled_back, mut other) = (0, 0, 0, Vec::new());
    for t in tasks {
        match joined(cx, "a waiting duplicate", t).await? {
            Ok(r) if r.replayed => replays += 1,
            Ok(_) => fresh += 1,
            Err(RunError::Operation(_)) => rolled_back += 1,
            Err(e) => other.push(run_err(e)),
        }
    }
    ensure!(
        gate.most_inside() == 1,
        "{} attempts ran inside the same key at once",
        gate.most_inside()
    );
    ensure!(
        fresh == 1 && rolled_back == TX_ROLLBACKS as usize && other.is_empty(),
        "Wait through {TX_ROLLBACKS} rollbacks: {fresh} committed, {rolled_back} rolled back, \
         {replays} replayed, others: {other:?}"
    );
    ensure!(
        gate.total_entered() == TX_ROLLBACKS + 1,
        "{} attempts executed, expected {}",
        gate.total_entered(),
        TX_ROLLBACKS + 1
    );
    env.expect_rows(&k, 1, "Wait: after the rollbacks").await?;

    // NoWait beside an open transaction answers at once: the holder stays at its gate until
    // every NoWait duplicate has answered, so one that waited would never answer.
    let k = key("tx-wait", "no-wait")?;
    let gate = Gate::new();
    let no_wait = || env.tx(&k, 1).policy(TxPolicy::NoWait);
    let holder = no_wait().end(gate.end()).spawn();
    within(cx, "the holder reaching its gate", gate.entered(1)).await?;
    for i in 0..3 {
        let r = within(
            cx,
            "a NoWait duplicate beside an open transaction (NoWait must not wait)",
            no_wait().run(),
        )
        .await?;
        let what = format!("NoWait duplicate {i} beside an open transaction");
        refused(Refusal::InProgress, &what, &r)?;
    }
    gate.open(TxEnd::Commit);
    joined(cx, "the holder", holder).await?.map_err(run_err)?;
    no_wait().replay("NoWait after the commit").await?;
    env.expect_rows(&k, 1, "NoWait").await
}

pub(crate) async fn retention<F>(f: &F, cx: &Cx) -> Check
where
    F: TxFactory,
    F::Store: TransactionalStore,
{
    for end in [TxEnd::Commit, TxEnd::Permanent] {
        let env = TxEnv::new(f, cx).await?;
        let k = key("tx-retention", &format!("{end:?}"))?;
        let at = env.clock.now();
        env.tx(&k, 1)
            .end(end)
            .answer(&format!("a transactional {end:?}"))
            .await?;
        let expires = cx.expiry(at);
        let rec = record(&*env.store, &k).await?;
        ensure!(
            rec.expires_at == expires,
            "a transactional {end:?} at {at} with retention {:?} expires at {}, not {expires}",
            cx.retention(),
            rec.expires_at
        );
        let early = idem_core::Timestamp::from_millis(expires.as_millis() - 1);
        ensure!(
            env.store.purge(early, 100).await.map_err(err)? == 0,
            "purge before a transactional outcome's expires_at deleted it"
        );
        env.clock.set(early);
        env.tx(&k, 1)
            .replay("a transactional outcome inside its retention")
            .await?;
        // Past retention but not purged: still replays.
        env.clock.set(expires.plus(TTL_TRAP_JUMP));
        env.tx(&k, 1)
            .replay("a transactional outcome past retention but not purged")
            .await?;
        ensure!(
            env.store.purge(expires, 100).await.map_err(err)? == 1,
            "purge at a transactional outcome's expires_at did not delete it"
        );
        env.tx(&k, 1).fresh("a purged transactional key").await?;
        let want = if end == TxEnd::Commit { 2 } else { 1 };
        env.expect_rows(&k, want, "after purge and re-execution")
            .await?;
    }
    Ok(())
}
