//! The conformance factory of this store (feature `conformance`): what the crate's own
//! tests and `idem check` run [`idem_conformance`]'s suite with.
//!
//! Every store it creates lives under the key prefix `<prefix><n>:` of one scratch prefix,
//! on a server or a Redis Cluster; [`RedisConformance::remove`] deletes every key under the
//! scratch prefix on every master, and so does dropping the factory if that was not done.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use idem_conformance::{async_trait, StoreFactory};
use idem_core::Error;

use crate::error::map_err;
use crate::keys::glob_escape;
use crate::{RedisOptions, RedisStore};

/// How long the availability probe waits for a connection.
const PROBE: Duration = Duration::from_secs(5);
/// Keys per `SCAN` page when removing the scratch prefix.
const PAGE: usize = 1000;

/// Where the stores connect.
enum Server {
    Single(String),
    Cluster(Vec<String>),
}

/// Stores under a scratch key prefix of a Redis server or cluster, for the conformance
/// suite.
pub struct RedisConformance {
    server: Server,
    prefix: String,
    /// Whether keys may exist under the prefix: a store was created and they were not
    /// removed since.
    created: AtomicBool,
    next: AtomicU32,
}

impl RedisConformance {
    /// A factory on the server at `url` whose stores live under `<prefix><n>:`.
    pub fn new(url: &str, prefix: &str) -> Result<Self, Error> {
        Self::on(Server::Single(url.to_string()), prefix)
    }

    /// A factory on the Redis Cluster reached through `nodes` whose stores live under
    /// `<prefix><n>:`; its name (for `IDEM_TEST_REQUIRE`) is `redis-cluster`.
    pub fn cluster(nodes: Vec<String>, prefix: &str) -> Result<Self, Error> {
        Self::on(Server::Cluster(nodes), prefix)
    }

    fn on(server: Server, prefix: &str) -> Result<Self, Error> {
        RedisOptions::default().with_key_prefix(format!("{prefix}0:"))?;
        Ok(RedisConformance {
            server,
            prefix: prefix.to_string(),
            created: AtomicBool::new(false),
            next: AtomicU32::new(0),
        })
    }

    /// The scratch prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    async fn connect(&self, options: RedisOptions) -> Result<RedisStore, Error> {
        match &self.server {
            Server::Single(url) => RedisStore::connect_with(url, options).await,
            Server::Cluster(nodes) => {
                RedisStore::connect_cluster_with(nodes.clone(), options).await
            }
        }
    }

    /// Deletes every key under the scratch prefix, on every master, through a connection
    /// of its own.
    pub async fn remove(&self) -> Result<(), Error> {
        if !self.created.load(Ordering::SeqCst) {
            return Ok(());
        }
        let store = self.connect(RedisOptions::default()).await?;
        let pattern = format!("{}*", glob_escape(&self.prefix));
        for node in store.conn.nodes().await.map_err(map_err)? {
            let mut cursor = 0u64;
            loop {
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(PAGE);
                let value = store.conn.on_node(&node, scan).await.map_err(map_err)?;
                let (next, keys): (u64, Vec<Vec<u8>>) =
                    redis::from_redis_value(value).map_err(|e| map_err(e.into()))?;
                if !keys.is_empty() {
                    // One `DEL` per key: on a cluster, the keys of a page span slots.
                    let mut pipe = redis::pipe();
                    for key in &keys {
                        pipe.del(key);
                    }
                    store
                        .conn
                        .pipe_on_node(&node, pipe, keys.len())
                        .await
                        .map_err(map_err)?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        self.created.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for RedisConformance {
    fn drop(&mut self) {
        if self.created.load(Ordering::SeqCst) {
            let _ = idem_conformance::scratch::block_on_own_thread(self.remove());
        }
    }
}

#[async_trait]
impl StoreFactory for RedisConformance {
    type Store = RedisStore;

    fn name(&self) -> &str {
        match self.server {
            Server::Single(_) => "redis",
            Server::Cluster(_) => "redis-cluster",
        }
    }

    async fn unavailable(&self) -> Option<String> {
        let at = match &self.server {
            Server::Single(url) => url.clone(),
            Server::Cluster(nodes) => format!("the cluster at {}", nodes.join(", ")),
        };
        match tokio::time::timeout(PROBE, self.connect(RedisOptions::default())).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("cannot reach {at}: {e}")),
            Err(_) => Some(format!("connecting to {at} timed out")),
        }
    }

    async fn create(&self) -> Result<RedisStore, Error> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        self.created.store(true, Ordering::SeqCst);
        let options = RedisOptions::default().with_key_prefix(format!("{}{n}:", self.prefix))?;
        self.connect(options).await
    }

    async fn reopen(&self, store: RedisStore) -> Option<Result<RedisStore, Error>> {
        let options = store.options().clone();
        drop(store);
        Some(self.connect(options).await)
    }

    async fn second_handle(&self, store: &RedisStore) -> Option<Result<RedisStore, Error>> {
        Some(self.connect(store.options().clone()).await)
    }
}
