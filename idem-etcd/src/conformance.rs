//! The conformance factory of this store (feature `conformance`): what the crate's own
//! tests and `idem check` run [`idem_conformance`]'s suite with.
//!
//! Every store it creates lives under the key prefix `<prefix><n>/` of one scratch prefix;
//! [`EtcdConformance::remove`] deletes every key under the scratch prefix, and so does
//! dropping the factory if that was not done.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, DeleteOptions};
use idem_conformance::{async_trait, StoreFactory};
use idem_core::{Error, Store};

use crate::error::map_err;
use crate::{EtcdOptions, EtcdStore};

/// How long the availability probe waits for a first answer (an election may be running).
const PROBE: Duration = Duration::from_secs(20);

/// Stores under a scratch key prefix of an etcd cluster, for the conformance suite.
pub struct EtcdConformance {
    endpoints: String,
    prefix: String,
    options: EtcdOptions,
    /// Whether keys may exist under the prefix: a store was created and they were not
    /// removed since.
    created: AtomicBool,
    next: AtomicU32,
}

impl EtcdConformance {
    /// A factory on the cluster at `endpoints` (comma-separated) whose stores have
    /// `options` under prefixes `<prefix><n>/`. Nothing is connected yet.
    pub fn new(endpoints: &str, prefix: &str, options: EtcdOptions) -> Result<Self, Error> {
        options
            .clone()
            .with_key_prefix(format!("{prefix}0/"))
            .validate()?;
        Ok(EtcdConformance {
            endpoints: endpoints.to_string(),
            prefix: prefix.to_string(),
            options,
            created: AtomicBool::new(false),
            next: AtomicU32::new(0),
        })
    }

    /// The scratch prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The options of the stores (their key prefix aside).
    pub fn options(&self) -> &EtcdOptions {
        &self.options
    }

    /// A store under a fresh prefix, with `options` but for the prefix.
    pub async fn store_with(&self, options: EtcdOptions) -> Result<EtcdStore, Error> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        self.created.store(true, Ordering::SeqCst);
        EtcdStore::connect_with(
            &self.endpoints,
            options.with_key_prefix(format!("{}{n}/", self.prefix)),
        )
        .await
    }

    /// Deletes every key under the scratch prefix, through a client of its own.
    pub async fn remove(&self) -> Result<(), Error> {
        if !self.created.load(Ordering::SeqCst) {
            return Ok(());
        }
        let endpoints: Vec<&str> = self.endpoints.split(',').map(str::trim).collect();
        let connect = ConnectOptions::new().with_timeout(self.options.connect_timeout);
        let mut client = Client::connect(endpoints, Some(connect))
            .await
            .map_err(map_err)?;
        client
            .delete(
                self.prefix.as_str(),
                Some(DeleteOptions::new().with_prefix()),
            )
            .await
            .map_err(map_err)?;
        self.created.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for EtcdConformance {
    fn drop(&mut self) {
        if self.created.load(Ordering::SeqCst) {
            let _ = idem_conformance::scratch::block_on_own_thread(self.remove());
        }
    }
}

#[async_trait]
impl StoreFactory for EtcdConformance {
    type Store = EtcdStore;

    fn name(&self) -> &str {
        "etcd"
    }

    async fn unavailable(&self) -> Option<String> {
        let probe = async { self.create().await?.stats().await };
        match tokio::time::timeout(PROBE, probe).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("cannot use etcd at {}: {e}", self.endpoints)),
            Err(_) => Some(format!(
                "etcd at {} did not answer in {PROBE:?}",
                self.endpoints
            )),
        }
    }

    async fn create(&self) -> Result<EtcdStore, Error> {
        self.store_with(self.options.clone()).await
    }

    async fn reopen(&self, store: EtcdStore) -> Option<Result<EtcdStore, Error>> {
        let reopened = EtcdStore::connect_with(&self.endpoints, store.options().clone()).await;
        drop(store);
        Some(reopened)
    }

    async fn second_handle(&self, store: &EtcdStore) -> Option<Result<EtcdStore, Error>> {
        Some(EtcdStore::connect_with(&self.endpoints, store.options().clone()).await)
    }
}
