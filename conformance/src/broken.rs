//! Deliberately broken stores: the suite's self-test.
//!
//! [`LabStore`] is an in-memory, transactional store built on [`idem_core::backend::model`]
//! that keeps every guarantee it declares (durable, shared across handles and failing over
//! through its factory's hooks, which reopen the same in-memory "disk"). With a [`Bug`] it
//! breaks the contract in one precise way, as real idempotency code has been seen to. The
//! self-test (`tests/self_test.rs`) runs the properties each bug must fail
//! ([`Bug::rejected_by`]) and fails if any bug passes, and runs the whole suite on the
//! correct store, so every rejection is the bug's doing alone.
//!
//! Read them as a catalogue of what the suite catches: the table in the crate's README
//! maps each one to the property that rejects it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use idem_core::backend::{model, settle, step, Step, TxRequest};
use idem_core::{
    Begin, Deadlines, Error, Failure, Fingerprint, Guarantees, Key, Lease, Record, Response,
    RunError, State, Stats, Store, Timestamp, Token, TransactionalStore, TxPolicy,
    NO_WAIT_RETRY_AFTER,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::factory::{StoreFactory, TxFactory, TxPlan};

macro_rules! bugs {
    ($($(#[$doc:meta])* $bug:ident => [$($prop:literal),+];)*) => {
        /// One way to break the contract. Each is rejected by the properties
        /// [`Bug::rejected_by`] names.
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
        #[non_exhaustive]
        pub enum Bug {
            $($(#[$doc])* $bug,)*
        }

        impl Bug {
            /// Every bug.
            pub const ALL: &'static [Bug] = &[$(Bug::$bug),*];

            /// The properties that must fail on a store with this bug.
            pub fn rejected_by(self) -> &'static [&'static str] {
                match self { $(Bug::$bug => &[$($prop),+],)* }
            }
        }
    };
}

bugs! {
    /// Reads the key, yields, then inserts: two requests both find no key.
    CheckThenInsert => ["race", "concurrent_check_race"];
    /// Reclaims an expired lease from a stale read: concurrent reclaims both win, and a
    /// completion landing in between is overwritten.
    StaleReclaim => ["race", "reclaim_race"];
    /// `complete` and `fail` ignore the fencing token.
    UnfencedCompletion => ["fencing"];
    /// `extend` ignores the fencing token.
    UnfencedExtend => ["fencing"];
    /// `release` ignores the fencing token.
    UnfencedRelease => ["fencing"];
    /// `release` deletes the record, so tokens restart at 1.
    TokenResetOnRelease => ["release"];
    /// A reclaim keeps the old token, so the zombie's completion is accepted.
    SameTokenOnReclaim => ["fencing"];
    /// A released lease can still complete (the release mark is not checked).
    ReleasedLeaseCompletes => ["release"];
    /// Reclaims are never marked `reclaimed` (the stale-reclaim metric is blind).
    ReclaimNotMarked => ["fencing"];
    /// `extend` answers a new lease but does not store it.
    ExtendNotStored => ["exact_deadlines", "time_parameters"];
    /// The fingerprint is not checked when replaying an outcome.
    NoValidationOnReplay => ["mismatch_every_path"];
    /// The fingerprint is not checked while the key is in flight.
    NoValidationInFlight => ["mismatch_every_path"];
    /// The fingerprint is not checked when reclaiming an expired lease.
    NoValidationOnReclaim => ["mismatch_every_path"];
    /// The response is stored without the request's digest.
    FingerprintDroppedOnComplete => ["mismatch_every_path"];
    /// A reclaim stores the incoming fingerprint, or none, over the original one.
    FingerprintReplacedOnReclaim => ["mismatch_every_path"];
    /// Reclaims a lease 1 ms before its deadline.
    EarlyReclaimByAMillisecond => ["exact_deadlines"];
    /// Reclaims a lease 1 ms after its deadline (`<` instead of `<=`).
    LateReclaimByAMillisecond => ["exact_deadlines"];
    /// Reclaims a lease 5 s early (a "safety margin" for clock skew).
    EarlyReclaimBySeconds => ["exact_deadlines"];
    /// Reclaims a lease 5 s late (a grace period).
    LateReclaimBySeconds => ["exact_deadlines"];
    /// Uses its own 30-second lease instead of the caller's.
    StoreChosenLease => ["time_parameters"];
    /// Uses its own 7-day retention instead of the caller's.
    StoreChosenRetention => ["time_parameters"];
    /// A duplicate is told the caller's new deadline, not the holder's (wrong Retry-After).
    WrongInProgressDeadline => ["time_parameters", "exact_deadlines"];
    /// Records live 24 hours, as with a Redis `SET EX 86400`: older ones count as absent.
    TtlAsAbsence => ["ttl_trap", "retention_is_not_absence"];
    /// `begin` treats a record past its `expires_at` as absent.
    ExpiredIsAbsent => ["retention_is_not_absence"];
    /// An outcome past its `expires_at` is executed again (reclaimed) instead of replayed.
    ExpiredOutcomeExecutes => ["retention_is_not_absence"];
    /// Purges records 1 ms before their `expires_at`.
    EarlyPurgeByAMillisecond => ["exact_deadlines"];
    /// Purges records 1 ms after their `expires_at` (`<` instead of `<=`).
    LatePurgeByAMillisecond => ["exact_deadlines"];
    /// Purges by creation time plus retention instead of the final state's `expires_at`.
    PurgeByCreatedAt => ["purge_final_state"];
    /// `extend` keeps the first `expires_at`: purge deletes a live, extended lease.
    ExtendKeepsExpiry => ["purge_final_state"];
    /// Purges in-progress records whose lease has run out, whatever their `expires_at`.
    PurgeExpiredLeases => ["purge"];
    /// Purge ignores its batch size.
    PurgeIgnoresBatch => ["purge"];
    /// Purge reports one record more than it deleted.
    PurgeMiscounts => ["purge", "model_check"];
    /// Purge selects expired records, then deletes those keys without checking again.
    PurgeNotAtomic => ["purge_race"];
    /// `complete` keeps the claim's `expires_at` instead of the one passed.
    CompleteKeepsClaimExpiry => ["purge_final_state", "time_parameters"];
    /// Keys are compared case-insensitively (a `citext` or `_ci` collation).
    CaseFoldedKeys => ["exact_keys"];
    /// Keys are stored as `scope:id`, so `("a:b", "c")` and `("a", "b:c")` collide.
    AmbiguousConcatenation => ["exact_keys"];
    /// Ids are cut at 64 bytes (a `VARCHAR(64)` column).
    TruncatedIds => ["exact_keys"];
    /// The scope is ignored: the same id in two tenants is one record.
    ScopeIgnored => ["scope_isolation", "exact_keys"];
    /// Scopes are trimmed of surrounding whitespace.
    TrimmedScope => ["exact_keys"];
    /// Non-ASCII characters of the scope are replaced (a latin1 column).
    AsciiFoldedScope => ["exact_keys"];
    /// Purging one expired record also deletes the records with its id in other scopes.
    PurgeCrossesScopes => ["scope_isolation"];
    /// Declares `durable` but a reopen finds nothing.
    NotDurable => ["durable"];
    /// Declares `durable` but a reopen keeps only outcomes, not the claims in flight.
    ClaimsLostOnRestart => ["durable"];
    /// Declares `shared_across_processes` but every handle has its own records.
    PerHandleState => ["shared_handles"];
    /// Each handle answers `get` from a cache it never invalidates.
    StaleReads => ["shared_handles"];
    /// Declares no atomic claim.
    NoAtomicClaim => ["guarantees"];
    /// `complete` writes the state, yields, then the response: a dropped call leaves a
    /// completed record with an empty response.
    CompleteNotCancelSafe => ["crash_points"];
    /// A transactional reclaim does not check the fingerprint.
    TxNoValidationOnReclaim => ["tx_mismatch_every_path"];
    /// A transaction replays an outcome without checking the fingerprint.
    TxNoValidationOnReplay => ["tx_mismatch_every_path"];
    /// `NoWait` waits for the open transaction like `Wait`.
    TxNoWaitBlocks => ["tx_wait_and_no_wait"];
    /// After a rollback every waiting duplicate runs, without claiming again.
    TxWaitersAllRunAfterRollback => ["tx_wait_and_no_wait"];
    /// `Wait` answers `InProgress` instead of waiting.
    TxWaitGivesUp => ["tx_concurrent_duplicates", "tx_wait_and_no_wait"];
    /// A transactional reclaim keeps the old token: the zombie can still complete.
    TxSameTokenOnReclaim => ["tx_reclaim_fencing"];
    /// A permanent failure keeps its business rows (no savepoint).
    TxKeepsRowsOnPermanentFailure => ["tx_permanent_failure"];
    /// A retryable failure commits the claim, leaving a stale `InProgress`.
    TxLeavesClaimOnRollback => ["tx_partial_execution_ghost"];
    /// Business rows are written outside the transaction and survive a crash.
    TxRowsOutsideTransaction => ["tx_partial_execution_ghost", "tx_crash_points"];
    /// Business rows and the outcome are committed in two steps: a dropped call between
    /// them leaves rows without an outcome.
    TxOutcomeNotAtomic => ["tx_crash_points"];
    /// Transactional outcomes never expire.
    TxIgnoresRetention => ["tx_retention"];
    /// A transaction runs beside a live lease-mode claim.
    TxIgnoresLiveLease => ["tx_mixed_modes"];
    /// Implements transactional mode but does not declare it.
    TxNotDeclared => ["tx_commit_once"];
    /// `Optimistic` commits its outcome whatever the key holds: a retry or a duplicate
    /// commits again.
    TxOptimisticOverwrites => ["tx_optimistic"];
}

/// Where a [`LabStore`]'s records live: the "disk" that reopened handles and second handles
/// share.
#[derive(Debug, Default)]
pub struct Disk {
    state: Mutex<DiskState>,
    changed: tokio::sync::Notify,
}

#[derive(Debug, Default, Clone)]
struct DiskState {
    records: BTreeMap<Vec<u8>, Record>,
    rows: BTreeMap<Vec<u8>, u64>,
    open: BTreeSet<Vec<u8>>,
}

impl Disk {
    fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The self-test's store: correct, or broken by one [`Bug`].
#[derive(Debug)]
pub struct LabStore {
    bug: Option<Bug>,
    disk: Arc<Disk>,
    cache: Mutex<HashMap<Vec<u8>, Option<Record>>>,
}

/// The business-write handle a [`LabStore`] transaction gives its operation.
#[derive(Clone, Debug)]
pub struct LabTx {
    pending: Arc<Mutex<u64>>,
    direct: Option<(Arc<Disk>, Vec<u8>)>,
}

impl LabTx {
    /// Inserts `n` business rows for the transaction's key.
    pub fn insert(&self, n: u64) {
        match &self.direct {
            Some((disk, slot)) => *disk.lock().rows.entry(slot.clone()).or_default() += n,
            None => *self.pending.lock().unwrap_or_else(|p| p.into_inner()) += n,
        }
    }
}

/// The operation a [`LabStore`] runs in transactional mode.
pub type LabOperation<T, F, E> =
    Box<dyn FnOnce(LabTx) -> BoxFuture<'static, Result<T, Failure<F, E>>> + Send>;

async fn widen_race() {
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn shift(t: Timestamp, ms: i64) -> Timestamp {
    Timestamp::from_millis(t.as_millis().saturating_add(ms))
}

/// Frees an open transaction's key when dropped (commit, rollback, panic or cancellation).
struct Open {
    disk: Arc<Disk>,
    slot: Vec<u8>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.disk.lock().open.remove(&self.slot);
        self.disk.changed.notify_waiters();
    }
}

impl LabStore {
    /// The correct store on a fresh disk.
    pub fn reference() -> Self {
        Self::on(None, Arc::default())
    }

    /// A store with `bug` on a fresh disk.
    pub fn with_bug(bug: Bug) -> Self {
        Self::on(Some(bug), Arc::default())
    }

    /// A new handle on `disk`.
    pub fn on(bug: Option<Bug>, disk: Arc<Disk>) -> Self {
        LabStore {
            bug,
            disk,
            cache: Mutex::default(),
        }
    }

    /// The disk this handle reads and writes.
    pub fn disk(&self) -> &Arc<Disk> {
        &self.disk
    }

    /// How many business rows of `key` are committed.
    pub fn rows(&self, key: &Key) -> u64 {
        self.disk
            .lock()
            .rows
            .get(&self.slot(key))
            .copied()
            .unwrap_or(0)
    }

    fn has(&self, bug: Bug) -> bool {
        self.bug == Some(bug)
    }

    /// Where `key` is stored: its scope and id, length-prefixed, unless a bug mangles them.
    fn slot(&self, key: &Key) -> Vec<u8> {
        let (scope, id) = match self.bug {
            Some(Bug::CaseFoldedKeys) => (key.scope().to_lowercase(), key.id().to_lowercase()),
            Some(Bug::AmbiguousConcatenation) => {
                return format!("{}:{}", key.scope(), key.id()).into_bytes()
            }
            Some(Bug::TruncatedIds) => (
                key.scope().into(),
                key.id()[..key.id().len().min(64)].into(),
            ),
            Some(Bug::ScopeIgnored) => (String::new(), key.id().into()),
            Some(Bug::TrimmedScope) => (key.scope().trim().into(), key.id().into()),
            Some(Bug::AsciiFoldedScope) => (
                key.scope()
                    .chars()
                    .map(|c| if c.is_ascii() { c } else { '?' })
                    .collect(),
                key.id().into(),
            ),
            _ => (key.scope().into(), key.id().into()),
        };
        let mut slot = (scope.len() as u64).to_be_bytes().to_vec();
        slot.extend_from_slice(scope.as_bytes());
        slot.extend_from_slice(id.as_bytes());
        slot
    }

    fn read(st: &DiskState, slot: &[u8], key: &Key) -> Option<Record> {
        st.records.get(slot).map(|r| Record {
            key: key.clone(),
            ..r.clone()
        })
    }

    /// Waits until no open transaction holds `slot`, then locks the disk.
    async fn settled(&self, slot: &[u8]) -> MutexGuard<'_, DiskState> {
        loop {
            let notified = self.disk.changed.notified();
            {
                let st = self.disk.lock();
                if !st.open.contains(slot) {
                    return st;
                }
            }
            notified.await;
        }
    }

    fn write(&self, st: &mut DiskState, slot: Vec<u8>, rec: Record) {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(slot.clone(), Some(rec.clone()));
        st.records.insert(slot, rec);
    }

    /// `model::begin` with this store's bug.
    fn decide(
        &self,
        rec: Option<&Record>,
        key: &Key,
        fp: Option<&Fingerprint>,
        d: Deadlines,
        now: Timestamp,
    ) -> (Begin, Option<Record>) {
        let mut d = d;
        if self.has(Bug::StoreChosenLease) {
            d.lease_until = now.plus(Duration::from_secs(30));
        }
        if self.has(Bug::StoreChosenRetention) {
            d.expires_at = d.lease_until.plus(7 * DAY);
        }
        let rec = match (self.bug, rec) {
            (Some(Bug::TtlAsAbsence), Some(r)) if r.updated_at.plus(DAY) <= now => None,
            (Some(Bug::ExpiredIsAbsent), Some(r)) if r.expires_at <= now => None,
            (_, r) => r,
        };
        let mismatch =
            || matches!((rec.and_then(|r| r.fingerprint), fp), (Some(a), Some(b)) if a != *b);
        match (self.bug, rec.map(|r| &r.state)) {
            (Some(Bug::NoValidationOnReplay), Some(State::Completed { response })) => {
                return (
                    Begin::Completed {
                        response: response.clone(),
                    },
                    None,
                )
            }
            (Some(Bug::NoValidationOnReplay), Some(State::Failed { response })) => {
                return (
                    Begin::Failed {
                        response: response.clone(),
                    },
                    None,
                )
            }
            (Some(Bug::NoValidationInFlight), Some(State::InProgress { lease_until, .. }))
                if *lease_until > now && mismatch() =>
            {
                return (
                    Begin::InProgress {
                        lease_until: *lease_until,
                    },
                    None,
                )
            }
            (
                Some(Bug::ExpiredOutcomeExecutes),
                Some(State::Completed { .. } | State::Failed { .. }),
            ) if rec.is_some_and(|r| r.expires_at <= now) => {
                let r = rec.map(|r| Record {
                    state: State::InProgress {
                        token: r.token,
                        lease_until: now,
                    },
                    ..r.clone()
                });
                return model::begin(r.as_ref(), key, fp, d, now);
            }
            _ => {}
        }
        // The reclaim decision, early or late as the bug says.
        let judged = match self.bug {
            Some(Bug::EarlyReclaimByAMillisecond) => shift(now, 1),
            Some(Bug::LateReclaimByAMillisecond) => shift(now, -1),
            Some(Bug::EarlyReclaimBySeconds) => shift(now, 5_000),
            Some(Bug::LateReclaimBySeconds) => shift(now, -5_000),
            _ => now,
        };
        let reclaimable = rec.is_some_and(
            |r| matches!(r.state, State::InProgress { lease_until, .. } if lease_until <= judged),
        );
        let stored_fp = match rec {
            Some(_) if reclaimable && self.has(Bug::NoValidationOnReclaim) => None,
            Some(r) => r.fingerprint,
            None => None,
        };
        let seen = rec.map(|r| Record {
            fingerprint: stored_fp,
            ..r.clone()
        });
        let (mut answer, next) = model::begin(seen.as_ref(), key, fp, d, judged);
        let next = next.map(|mut n| {
            n.updated_at = now;
            if rec.is_none() {
                n.created_at = now;
            } else if self.has(Bug::FingerprintReplacedOnReclaim) {
                n.fingerprint = fp.copied();
            } else {
                n.fingerprint = rec.and_then(|r| r.fingerprint).or(fp.copied());
            }
            if self.has(Bug::SameTokenOnReclaim) && rec.is_some() {
                n.token = Token(n.token.0 - 1);
                n.state = State::InProgress {
                    token: n.token,
                    lease_until: d.lease_until,
                };
            }
            n
        });
        if let Begin::Acquired(l) = &mut answer {
            if let Some(n) = &next {
                l.token = n.token;
            }
            if self.has(Bug::ReclaimNotMarked) {
                l.reclaimed = false;
            }
        }
        if let (Some(Bug::WrongInProgressDeadline), Begin::InProgress { lease_until }) =
            (self.bug, &mut answer)
        {
            *lease_until = d.lease_until;
        }
        (answer, next)
    }

    async fn finish(
        &self,
        lease: &Lease,
        failed: bool,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        let slot = self.slot(&lease.key);
        let done = {
            let mut st = self.settled(&slot).await;
            self.finish_locked(&mut st, &slot, lease, failed, response, expires_at, now)?
        };
        if self.has(Bug::CompleteNotCancelSafe) {
            tokio::task::yield_now().await;
            self.write(&mut self.disk.lock(), slot, done);
        }
        Ok(())
    }

    /// The fenced write of an outcome, under the disk's lock; with
    /// [`Bug::CompleteNotCancelSafe`] only its first half.
    #[allow(clippy::too_many_arguments)]
    fn finish_locked(
        &self,
        st: &mut DiskState,
        slot: &[u8],
        lease: &Lease,
        failed: bool,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<Record, Error> {
        let rec = Self::read(st, slot, &lease.key);
        let released = matches!(
            rec.as_ref().map(|r| &r.state),
            Some(State::InProgress { lease_until, .. }) if *lease_until == Timestamp::MIN
        );
        let fenced = match self.bug {
            Some(Bug::UnfencedCompletion) => rec.clone().ok_or(Error::LeaseLost),
            Some(Bug::ReleasedLeaseCompletes) if released => match rec.as_ref().map(|r| &r.state) {
                Some(State::InProgress { token, .. }) if *token == lease.token => {
                    rec.clone().ok_or(Error::LeaseLost)
                }
                _ => Err(Error::LeaseLost),
            },
            _ => model::fence(rec.as_ref(), lease).and(rec.clone().ok_or(Error::LeaseLost)),
        }?;
        let mut done = Record {
            state: if failed {
                State::Failed {
                    response: response.to_vec(),
                }
            } else {
                State::Completed {
                    response: response.to_vec(),
                }
            },
            updated_at: now,
            expires_at,
            ..fenced.clone()
        };
        if self.has(Bug::FingerprintDroppedOnComplete) {
            done.fingerprint = None;
        }
        if self.has(Bug::CompleteKeepsClaimExpiry) {
            done.expires_at = fenced.expires_at;
        }
        if self.has(Bug::StoreChosenRetention) {
            done.expires_at = now.plus(7 * DAY);
        }
        let written = if self.has(Bug::CompleteNotCancelSafe) {
            Record {
                state: State::Completed {
                    response: Vec::new(),
                },
                ..done.clone()
            }
        } else {
            done.clone()
        };
        self.write(st, slot.to_vec(), written);
        Ok(done)
    }
}

#[async_trait]
impl Store for LabStore {
    fn guarantees(&self) -> Guarantees {
        let g = Guarantees::distributed();
        match self.bug {
            Some(Bug::NoAtomicClaim) => g.with_atomic_claim(false),
            Some(Bug::TxNotDeclared) => g.with_transactional(false),
            _ => g,
        }
    }

    async fn begin(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        d: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        let slot = self.slot(key);
        let stale = {
            let st = self.settled(&slot).await;
            Self::read(&st, &slot, key)
        };
        let racy = match (self.bug, stale.as_ref().map(|r| &r.state)) {
            (Some(Bug::CheckThenInsert), None) => true,
            (Some(Bug::StaleReclaim), Some(State::InProgress { lease_until, .. })) => {
                *lease_until <= now
            }
            _ => false,
        };
        if racy {
            widen_race().await;
            let (answer, next) = self.decide(stale.as_ref(), key, fp, d, now);
            if let Some(next) = next {
                let mut st = self.disk.lock();
                self.write(&mut st, slot, next);
            }
            return Ok(answer);
        }
        let mut st = self.settled(&slot).await;
        let rec = Self::read(&st, &slot, key);
        let (answer, next) = self.decide(rec.as_ref(), key, fp, d, now);
        if let Some(next) = next {
            self.write(&mut st, slot, next);
        }
        Ok(answer)
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

    async fn extend(&self, lease: &Lease, d: Deadlines, now: Timestamp) -> Result<Lease, Error> {
        let slot = self.slot(&lease.key);
        let mut st = self.settled(&slot).await;
        let rec = Self::read(&st, &slot, &lease.key);
        let unfenced = rec.as_ref().map(|r| Record {
            state: State::InProgress {
                token: lease.token,
                lease_until: now.plus(Duration::from_secs(1)),
            },
            ..r.clone()
        });
        let seen = if self.has(Bug::UnfencedExtend) {
            unfenced.as_ref()
        } else {
            rec.as_ref()
        };
        let (extended, mut next) = model::extend(seen, lease, d, now)?;
        if self.has(Bug::ExtendKeepsExpiry) {
            next.expires_at = rec.as_ref().map_or(next.expires_at, |r| r.expires_at);
        }
        if !self.has(Bug::ExtendNotStored) {
            self.write(&mut st, slot, next);
        }
        Ok(extended)
    }

    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        let slot = self.slot(&lease.key);
        let mut st = self.settled(&slot).await;
        let rec = Self::read(&st, &slot, &lease.key);
        let unfenced = rec.as_ref().map(|r| Record {
            state: State::InProgress {
                token: lease.token,
                lease_until: now,
            },
            ..r.clone()
        });
        let seen = if self.has(Bug::UnfencedRelease) {
            unfenced.as_ref()
        } else {
            rec.as_ref()
        };
        let next = model::release(seen, lease, now)?;
        if self.has(Bug::TokenResetOnRelease) {
            st.records.remove(&slot);
            self.cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&slot);
        } else {
            self.write(&mut st, slot, next);
        }
        Ok(())
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
        let slot = self.slot(key);
        if self.has(Bug::StaleReads) {
            if let Some(cached) = self
                .cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&slot)
            {
                return Ok(cached.clone().map(|r| Record {
                    key: key.clone(),
                    ..r
                }));
            }
        }
        let rec = Self::read(&self.disk.lock(), &slot, key);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(slot, rec.clone());
        Ok(rec)
    }

    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        let judged = match self.bug {
            Some(Bug::EarlyPurgeByAMillisecond) => shift(now, 1),
            Some(Bug::LatePurgeByAMillisecond) => shift(now, -1),
            _ => now,
        };
        let expired = |r: &Record| match (self.bug, &r.state) {
            (Some(Bug::PurgeByCreatedAt), _) => {
                r.created_at.as_millis() + (r.expires_at.as_millis() - r.updated_at.as_millis())
                    <= judged.as_millis()
            }
            (Some(Bug::PurgeExpiredLeases), State::InProgress { lease_until, .. }) => {
                *lease_until <= judged || r.expires_at <= judged
            }
            _ => r.expires_at <= judged,
        };
        let batch = if self.has(Bug::PurgeIgnoresBatch) {
            usize::MAX
        } else {
            batch
        };
        let doomed: Vec<(Vec<u8>, Key)> = {
            let st = self.disk.lock();
            st.records
                .iter()
                .filter(|(slot, r)| !st.open.contains(*slot) && expired(r))
                .map(|(slot, r)| (slot.clone(), r.key.clone()))
                .take(batch)
                .collect()
        };
        if self.has(Bug::PurgeNotAtomic) {
            widen_race().await;
        }
        let mut st = self.disk.lock();
        let mut deleted = 0u64;
        for (slot, key) in &doomed {
            let still = st.records.get(slot).is_some_and(&expired);
            if self.has(Bug::PurgeNotAtomic) || still {
                deleted += u64::from(st.records.remove(slot).is_some());
            }
            if self.has(Bug::PurgeCrossesScopes) {
                st.records.retain(|_, r| r.key.id() != key.id());
            }
        }
        if self.has(Bug::PurgeMiscounts) {
            deleted += 1;
        }
        Ok(deleted)
    }

    async fn stats(&self) -> Result<Stats, Error> {
        let mut stats = Stats::default();
        for r in self.disk.lock().records.values() {
            stats.add(r.state.name(), 1)?;
        }
        Ok(stats)
    }
}

impl TransactionalStore for LabStore {
    type Operation<T, F, E> = LabOperation<T, F, E>;

    async fn transact<T, F, E>(
        &self,
        request: TxRequest<'_>,
        op: LabOperation<T, F, E>,
    ) -> Result<Response<T, F>, RunError<E>>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        F: Serialize + DeserializeOwned + Send + 'static,
        E: Send + 'static,
    {
        let key = request.key;
        let slot = self.slot(key);
        let mut waited = false;
        let (lease, claimed, open) = loop {
            let notified = self.disk.changed.notified();
            {
                let mut st = self.disk.lock();
                let overwrites =
                    request.policy == TxPolicy::Optimistic && self.has(Bug::TxOptimisticOverwrites);
                let busy = st.open.contains(&slot)
                    && !(waited && self.has(Bug::TxWaitersAllRunAfterRollback))
                    && !overwrites;
                if busy {
                    let no_wait =
                        request.policy == TxPolicy::NoWait && !self.has(Bug::TxNoWaitBlocks);
                    if no_wait || self.has(Bug::TxWaitGivesUp) {
                        return Err(Error::InProgress {
                            retry_after: NO_WAIT_RETRY_AFTER,
                        }
                        .into());
                    }
                } else {
                    let rec = Self::read(&st, &slot, key);
                    let seen = match (self.bug, &rec) {
                        _ if overwrites => None,
                        (Some(Bug::TxIgnoresLiveLease), Some(r))
                            if matches!(r.state, State::InProgress { .. }) =>
                        {
                            Some(Record {
                                state: State::InProgress {
                                    token: r.token,
                                    lease_until: request.now,
                                },
                                ..r.clone()
                            })
                        }
                        (Some(Bug::TxNoValidationOnReclaim), Some(r)) if matches!(r.state, State::InProgress { lease_until, .. } if lease_until <= request.now) => {
                            Some(Record {
                                fingerprint: None,
                                ..r.clone()
                            })
                        }
                        (Some(Bug::TxNoValidationOnReplay), Some(r))
                            if !matches!(r.state, State::InProgress { .. }) =>
                        {
                            Some(Record {
                                fingerprint: None,
                                ..r.clone()
                            })
                        }
                        _ => rec.clone(),
                    };
                    let (answer, next) = model::begin(
                        seen.as_ref(),
                        key,
                        request.fingerprint.as_ref(),
                        request.deadlines,
                        request.now,
                    );
                    let next = next.map(|mut n| {
                        n.fingerprint = rec
                            .as_ref()
                            .and_then(|r| r.fingerprint)
                            .or(request.fingerprint);
                        if self.has(Bug::TxSameTokenOnReclaim) && rec.is_some() {
                            n.token = Token(n.token.0 - 1);
                            n.state = State::InProgress {
                                token: n.token,
                                lease_until: request.deadlines.lease_until,
                            };
                        }
                        n
                    });
                    match step(answer, request.now)? {
                        Step::Replay(r) => return Ok(r.decode()?),
                        Step::Acquired(mut lease) => {
                            if let Some(n) = &next {
                                lease.token = n.token;
                            }
                            st.open.insert(slot.clone());
                            let open = Open {
                                disk: Arc::clone(&self.disk),
                                slot: slot.clone(),
                            };
                            break (lease, next, open);
                        }
                    }
                }
            }
            notified.await;
            waited = true;
        };
        let direct = self
            .has(Bug::TxRowsOutsideTransaction)
            .then(|| (Arc::clone(&self.disk), slot.clone()));
        let tx = LabTx {
            pending: Arc::default(),
            direct,
        };
        let result = op(tx.clone()).await;
        let settled = match settle(result) {
            Ok(s) => s,
            Err(e) => {
                if let (true, Some(claim)) = (self.has(Bug::TxLeavesClaimOnRollback), claimed) {
                    let mut st = self.disk.lock();
                    self.write(&mut st, slot, claim);
                }
                drop(open);
                return Err(e);
            }
        };
        let expires_at = if self.has(Bug::TxIgnoresRetention) {
            Timestamp::from_millis(i64::MAX)
        } else {
            request.expires_at
        };
        let done = model::finish(
            claimed.as_ref(),
            &lease,
            settled.failed,
            &settled.bytes,
            expires_at,
            request.now,
        )?;
        let rows = *tx.pending.lock().unwrap_or_else(|p| p.into_inner());
        let rows = if settled.failed && !self.has(Bug::TxKeepsRowsOnPermanentFailure) {
            0
        } else {
            rows
        };
        if self.has(Bug::TxOutcomeNotAtomic) {
            *self.disk.lock().rows.entry(slot.clone()).or_default() += rows;
            tokio::task::yield_now().await;
            self.write(&mut self.disk.lock(), slot, done);
        } else {
            let mut st = self.disk.lock();
            *st.rows.entry(slot.clone()).or_default() += rows;
            self.write(&mut st, slot, done);
        }
        drop(open);
        Ok(settled.into_response())
    }
}

/// The factory of [`LabStore`]s: every hook implemented, as a faithful in-memory "disk"
/// allows; a bug about durability or sharing shows in its hooks.
#[derive(Clone, Copy, Debug)]
pub struct LabFactory {
    /// The bug of every store it makes, or `None` for the correct store.
    pub bug: Option<Bug>,
}

impl LabFactory {
    /// The factory of correct stores.
    pub fn reference() -> Self {
        LabFactory { bug: None }
    }

    /// The factory of stores with `bug`.
    pub fn with_bug(bug: Bug) -> Self {
        LabFactory { bug: Some(bug) }
    }
}

#[async_trait]
impl StoreFactory for LabFactory {
    type Store = LabStore;

    fn name(&self) -> &str {
        "lab"
    }

    async fn create(&self) -> Result<LabStore, Error> {
        Ok(LabStore::on(self.bug, Arc::default()))
    }

    async fn reopen(&self, store: LabStore) -> Option<Result<LabStore, Error>> {
        let disk = match self.bug {
            Some(Bug::NotDurable) => Arc::default(),
            Some(Bug::ClaimsLostOnRestart) => {
                let mut st = store.disk.lock().clone();
                st.records
                    .retain(|_, r| !matches!(r.state, State::InProgress { .. }));
                Arc::new(Disk {
                    state: Mutex::new(st),
                    changed: Default::default(),
                })
            }
            _ => Arc::clone(&store.disk),
        };
        Some(Ok(LabStore::on(self.bug, disk)))
    }

    async fn second_handle(&self, store: &LabStore) -> Option<Result<LabStore, Error>> {
        let disk = match self.bug {
            Some(Bug::PerHandleState) => Arc::default(),
            _ => Arc::clone(&store.disk),
        };
        Some(Ok(LabStore::on(self.bug, disk)))
    }

    async fn fail_over(&self, store: LabStore) -> Option<Result<LabStore, Error>> {
        self.reopen(store).await
    }
}

#[async_trait]
impl TxFactory for LabFactory {
    fn operation(&self, _key: &Key, plan: TxPlan) -> LabOperation<u64, String, String> {
        Box::new(move |tx| {
            Box::pin(async move {
                for _ in 0..plan.rows {
                    tx.insert(1);
                    tokio::task::yield_now().await;
                }
                if !plan.hold.is_zero() {
                    tokio::time::sleep(plan.hold).await;
                }
                plan.finish()
            })
        })
    }

    async fn business_rows(&self, store: &LabStore, key: &Key) -> Result<u64, Error> {
        Ok(store.rows(key))
    }
}
