//! The store trait and the guarantees a store declares.

use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::record::{Begin, Deadlines, Lease, Record, Stats};
use crate::time::Timestamp;

/// What a store promises. The conformance suite runs the properties a store claims and
/// fails a store that claims a guarantee it does not keep.
///
/// Non-exhaustive: start from a preset and adjust with the `with_*` methods.
///
/// ```
/// use idem_core::Guarantees;
/// let g = Guarantees::single_node_sql().with_survives_failover(true);
/// assert!(g.transactional && g.survives_failover);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Guarantees {
    /// Exactly one of any number of concurrent `begin`s on a fresh key acquires it.
    pub atomic_claim: bool,
    /// `complete`, `fail`, `extend` and `release` succeed only with the current token.
    pub fenced_completion: bool,
    /// Every operation on one key is linearizable.
    pub linearizable: bool,
    /// Business writes can share the claim's transaction ([`crate::TransactionalStore`]).
    pub transactional: bool,
    /// An acknowledged write survives a crash or restart of the server.
    pub durable: bool,
    /// An acknowledged write survives the loss of a server (replicated synchronously).
    pub survives_failover: bool,
    /// Several processes (or machines) can share one store.
    pub shared_across_processes: bool,
}

impl Guarantees {
    /// Nothing promised.
    pub const fn none() -> Self {
        Guarantees {
            atomic_claim: false,
            fenced_completion: false,
            linearizable: false,
            transactional: false,
            durable: false,
            survives_failover: false,
            shared_across_processes: false,
        }
    }

    /// A strict store inside one process that keeps nothing on disk ([`crate::MemoryStore`]).
    pub const fn in_memory() -> Self {
        Guarantees {
            atomic_claim: true,
            fenced_completion: true,
            linearizable: true,
            ..Self::none()
        }
    }

    /// A strict, durable, transactional SQL database on one node (PostgreSQL, SQLite).
    pub const fn single_node_sql() -> Self {
        Guarantees {
            transactional: true,
            durable: true,
            shared_across_processes: true,
            ..Self::in_memory()
        }
    }

    /// A strict distributed database with synchronous replication (FoundationDB).
    pub const fn distributed() -> Self {
        Guarantees {
            survives_failover: true,
            ..Self::single_node_sql()
        }
    }

    /// Atomic and fenced on a single primary, but writes can be lost (Redis).
    pub const fn best_effort() -> Self {
        Guarantees {
            shared_across_processes: true,
            ..Self::in_memory()
        }
    }

    /// Sets [`Guarantees::atomic_claim`].
    pub const fn with_atomic_claim(mut self, v: bool) -> Self {
        self.atomic_claim = v;
        self
    }
    /// Sets [`Guarantees::fenced_completion`].
    pub const fn with_fenced_completion(mut self, v: bool) -> Self {
        self.fenced_completion = v;
        self
    }
    /// Sets [`Guarantees::linearizable`].
    pub const fn with_linearizable(mut self, v: bool) -> Self {
        self.linearizable = v;
        self
    }
    /// Sets [`Guarantees::transactional`].
    pub const fn with_transactional(mut self, v: bool) -> Self {
        self.transactional = v;
        self
    }
    /// Sets [`Guarantees::durable`].
    pub const fn with_durable(mut self, v: bool) -> Self {
        self.durable = v;
        self
    }
    /// Sets [`Guarantees::survives_failover`].
    pub const fn with_survives_failover(mut self, v: bool) -> Self {
        self.survives_failover = v;
        self
    }
    /// Sets [`Guarantees::shared_across_processes`].
    pub const fn with_shared_across_processes(mut self, v: bool) -> Self {
        self.shared_across_processes = v;
        self
    }
}

/// A three-state idempotency store.
///
/// # Contract
///
/// Every operation concerns one key and, on a store that declares
/// [`Guarantees::linearizable`], takes effect atomically at one instant between its call and
/// its return. [`crate::backend::model`] is the executable form of this contract; the conformance
/// suite (`idem-conformance`) compares a store against it.
///
/// - `begin`: no record → create `InProgress` with token 1 → `Acquired`. Both fingerprints
///   present and different → `Mismatch`, checked before anything else. `Completed` /
///   `Failed` → the stored outcome. `InProgress` with `lease_until > now` → `InProgress`.
///   `InProgress` with `lease_until <= now` → token + 1, new lease → `Acquired` with
///   `reclaimed` set unless the lease was released. `expires_at` is never read.
/// - `complete` / `fail`: only if the record is `InProgress` with the lease's token and the
///   lease was not released; otherwise [`Error::LeaseLost`] and nothing is written.
/// - `extend`: fenced the same way; returns the lease with its new deadline.
/// - `release`: fenced; the next `begin` acquires at once, with a larger token and
///   `reclaimed` unset (tokens of a key never repeat while its record exists). A released
///   record reads back from `get` as `InProgress` with `lease_until == Timestamp::MIN`.
/// - `purge`: deletes at most `batch` records whose `expires_at <= now`, returns how many.
/// - `stats`: counts per state.
///
/// Validation of keys happens before a store is called ([`Key::new`]); a store may assume
/// valid keys but must return errors, not panic, on anything it reads back.
#[async_trait]
pub trait Store: Send + Sync {
    /// What this store promises.
    fn guarantees(&self) -> Guarantees;

    /// Claims `key`, or reports who has it or what it ended with.
    async fn begin(
        &self,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error>;

    /// Records a successful outcome, fenced by the lease's token.
    async fn complete(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error>;

    /// Records a permanent failure, fenced by the lease's token.
    async fn fail(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error>;

    /// Moves the lease deadline, fenced by the lease's token.
    async fn extend(
        &self,
        lease: &Lease,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Lease, Error>;

    /// Gives the key back without an outcome, fenced by the lease's token.
    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error>;

    /// Reads a record.
    async fn get(&self, key: &Key) -> Result<Option<Record>, Error>;

    /// Deletes up to `batch` records with `expires_at <= now`.
    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error>;

    /// Counts records per state.
    async fn stats(&self) -> Result<Stats, Error>;

    /// An estimate of [`Store::stats`] from the database's own statistics, for tables too
    /// large to count often; `None` (the default) when the store has no cheap estimate, and
    /// then callers count with [`Store::stats`].
    ///
    /// # Contract
    ///
    /// Reads only catalog or summary data: never a scan of the records, never a write. The
    /// numbers may be stale or approximate (as of the database's last statistics run).
    async fn estimated_stats(&self) -> Result<Option<Stats>, Error> {
        Ok(None)
    }

    /// One page of records, for operator tools (`idem list`): at most `limit` records in the
    /// store's key order, starting after `after` (the last key of the previous page; `None`
    /// for the first page), only of `scope` if one is given. `None` (the default) when the
    /// store cannot list its records.
    ///
    /// # Contract
    ///
    /// Reads only: never a write, never a lock a claim would wait on for long. Paging from
    /// `None` with each page's last key as the next `after` returns every record that existed
    /// throughout, exactly once, and each as [`Store::get`] would return it. The order is
    /// the store's own (byte order, or the database's collation); callers must not assume
    /// one beyond "pages do not overlap".
    async fn list(
        &self,
        scope: Option<&str>,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Option<Vec<Record>>, Error> {
        let _ = (scope, after, limit);
        Ok(None)
    }
}

macro_rules! forward_store {
    ($($ty:ty),*) => {$(
        #[async_trait]
        impl<S: Store + ?Sized> Store for $ty {
            fn guarantees(&self) -> Guarantees {
                (**self).guarantees()
            }
            async fn begin(
                &self,
                key: &Key,
                fingerprint: Option<&Fingerprint>,
                deadlines: Deadlines,
                now: Timestamp,
            ) -> Result<Begin, Error> {
                (**self).begin(key, fingerprint, deadlines, now).await
            }
            async fn complete(
                &self,
                lease: &Lease,
                response: &[u8],
                expires_at: Timestamp,
                now: Timestamp,
            ) -> Result<(), Error> {
                (**self).complete(lease, response, expires_at, now).await
            }
            async fn fail(
                &self,
                lease: &Lease,
                response: &[u8],
                expires_at: Timestamp,
                now: Timestamp,
            ) -> Result<(), Error> {
                (**self).fail(lease, response, expires_at, now).await
            }
            async fn extend(
                &self,
                lease: &Lease,
                deadlines: Deadlines,
                now: Timestamp,
            ) -> Result<Lease, Error> {
                (**self).extend(lease, deadlines, now).await
            }
            async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
                (**self).release(lease, now).await
            }
            async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
                (**self).get(key).await
            }
            async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
                (**self).purge(now, batch).await
            }
            async fn stats(&self) -> Result<Stats, Error> {
                (**self).stats().await
            }
            async fn estimated_stats(&self) -> Result<Option<Stats>, Error> {
                (**self).estimated_stats().await
            }
            async fn list(
                &self,
                scope: Option<&str>,
                after: Option<&Key>,
                limit: usize,
            ) -> Result<Option<Vec<Record>>, Error> {
                (**self).list(scope, after, limit).await
            }
        }
    )*};
}

forward_store!(Arc<S>, Box<S>);

/// A shared, type-erased store, for tools that pick the backend at run time.
pub type DynStore = Arc<dyn Store>;
