//! The in-memory reference store.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use crate::backend::model;
use crate::error::Error;
use crate::fingerprint::Fingerprint;
use crate::key::Key;
use crate::record::{Begin, Deadlines, Lease, Record, Stats};
use crate::store::{Guarantees, Store};
use crate::time::Timestamp;

/// The reference store: the pure [`crate::backend::model`] behind one mutex.
///
/// Strict and linearizable inside one process; keeps nothing across restarts. It is what the
/// conformance suite compares other stores against, and a fine store for tests.
///
/// ```
/// use std::sync::Arc;
/// use idem_core::{Barrier, Failure, Key, MemoryStore, Outcome};
/// # tokio_test();
/// # fn tokio_test() { tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let barrier = Barrier::new(Arc::new(MemoryStore::new()));
/// let key = Key::new("tenant-1", "req-1")?;
/// let first = barrier
///     .execute(&key, None, |_lease| async { Ok::<_, Failure<String, String>>(42u32) })
///     .await?;
/// let retry = barrier
///     .execute(&key, None, |_lease| async { Ok::<_, Failure<String, String>>(43u32) })
///     .await?;
/// assert_eq!(first.outcome, Outcome::Completed(42));
/// assert_eq!(retry.outcome, Outcome::Completed(42));
/// assert!(retry.replayed);
/// # Ok::<(), idem_core::RunError<String>>(()) }).unwrap() }
/// ```
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: Mutex<BTreeMap<Key, Record>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Key, Record>> {
        // A panic while holding the lock cannot leave a half-written record: every
        // mutation is a single insert or remove.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(
        &self,
        lease: &Lease,
        failed: bool,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        let mut records = self.lock();
        let next = model::finish(
            records.get(&lease.key),
            lease,
            failed,
            response,
            expires_at,
            now,
        )?;
        records.insert(lease.key.clone(), next);
        Ok(())
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn guarantees(&self) -> Guarantees {
        Guarantees::in_memory()
    }

    async fn begin(
        &self,
        key: &Key,
        fingerprint: Option<&Fingerprint>,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        let mut records = self.lock();
        let (answer, next) = model::begin(records.get(key), key, fingerprint, deadlines, now);
        if let Some(next) = next {
            records.insert(key.clone(), next);
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
        self.finish(lease, false, response, expires_at, now)
    }

    async fn fail(
        &self,
        lease: &Lease,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        self.finish(lease, true, response, expires_at, now)
    }

    async fn extend(
        &self,
        lease: &Lease,
        deadlines: Deadlines,
        now: Timestamp,
    ) -> Result<Lease, Error> {
        let mut records = self.lock();
        let (lease, next) = model::extend(records.get(&lease.key), lease, deadlines, now)?;
        records.insert(lease.key.clone(), next);
        Ok(lease)
    }

    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        let mut records = self.lock();
        let next = model::release(records.get(&lease.key), lease, now)?;
        records.insert(lease.key.clone(), next);
        Ok(())
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
        Ok(self.lock().get(key).cloned())
    }

    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        let mut records = self.lock();
        let doomed: Vec<Key> = records
            .iter()
            .filter(|(_, r)| r.expires_at <= now)
            .map(|(k, _)| k.clone())
            .take(batch)
            .collect();
        for k in &doomed {
            records.remove(k);
        }
        Ok(doomed.len() as u64)
    }

    /// In key order (scope, then id, bytewise).
    async fn list(
        &self,
        scope: Option<&str>,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Option<Vec<Record>>, Error> {
        let records = self.lock();
        Ok(Some(
            records
                .iter()
                .filter(|(k, _)| after.is_none_or(|a| *k > a))
                .filter(|(k, _)| scope.is_none_or(|s| k.scope() == s))
                .take(limit)
                .map(|(_, r)| r.clone())
                .collect(),
        ))
    }

    async fn stats(&self) -> Result<Stats, Error> {
        let mut stats = Stats::default();
        for r in self.lock().values() {
            stats.add(r.state.name(), 1)?;
        }
        Ok(stats)
    }
}
