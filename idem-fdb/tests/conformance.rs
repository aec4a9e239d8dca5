//! The conformance suite against a live FoundationDB cluster named by
//! `IDEM_FDB_CLUSTER_FILE`; skipped when it is unset (fails if `IDEM_TEST_REQUIRE` has `fdb`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use foundationdb::tuple::Subspace;
use foundationdb::{Database, RangeOption};
use idem_conformance::prelude::*;
use idem_fdb::{start_network, FdbOperation, FdbOptions, FdbStore};

fn cluster_file() -> Option<String> {
    std::env::var("IDEM_FDB_CLUSTER_FILE").ok()
}

struct FdbFactory {
    run: String,
    next: AtomicU32,
}

impl FdbFactory {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        FdbFactory {
            run: format!("idem-test-{}-{nanos}", std::process::id()),
            next: AtomicU32::new(0),
        }
    }

    fn business(&self, key: &Key) -> Subspace {
        Subspace::all().subspace(&(
            "idem-test-business",
            self.run.as_str(),
            key.scope(),
            key.id(),
        ))
    }
}

#[async_trait]
impl StoreFactory for FdbFactory {
    type Store = FdbStore;

    fn name(&self) -> &str {
        "fdb"
    }

    async fn unavailable(&self) -> Option<String> {
        match cluster_file() {
            None => Some("IDEM_FDB_CLUSTER_FILE is not set".into()),
            Some(_) => start_network().err().map(|e| e.to_string()),
        }
    }

    async fn create(&self) -> Result<FdbStore, Error> {
        start_network()?;
        let db = Database::new(cluster_file().as_deref()).map_err(Error::retryable)?;
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let space = Subspace::all().subspace(&("idem-test", self.run.as_str(), n));
        FdbStore::from_database(Arc::new(db), FdbOptions::default().with_subspace(space))
    }

    async fn reopen(&self, store: FdbStore) -> Option<Result<FdbStore, Error>> {
        let space = store.subspace().clone();
        drop(store);
        Some(handle_on(space))
    }

    async fn second_handle(&self, store: &FdbStore) -> Option<Result<FdbStore, Error>> {
        Some(handle_on(store.subspace().clone()))
    }
}

/// A handle on `space` through a database connection of its own.
fn handle_on(space: Subspace) -> Result<FdbStore, Error> {
    let db = Database::new(cluster_file().as_deref()).map_err(Error::retryable)?;
    FdbStore::from_database(Arc::new(db), FdbOptions::default().with_subspace(space))
}

#[async_trait]
impl TxFactory for FdbFactory {
    fn operation(&self, key: &Key, plan: TxPlan) -> FdbOperation<u64, String, String> {
        let space = self.business(key);
        Box::new(move |trx| {
            let space = space.clone();
            Box::pin(async move {
                for n in 0..plan.rows {
                    trx.set(&space.pack(&(i64::from(n),)), b"row");
                }
                tokio::time::sleep(plan.hold).await;
                plan.finish()
            })
        })
    }

    async fn business_rows(&self, store: &FdbStore, key: &Key) -> Result<u64, Error> {
        let trx = store.database().create_trx().map_err(Error::retryable)?;
        let rows = trx
            .get_range(&RangeOption::from(self.business(key).range()), 1, false)
            .await
            .map_err(Error::retryable)?;
        Ok(rows.len() as u64)
    }
}

conformance_tests!(fdb, FdbFactory::new(), transactional);
