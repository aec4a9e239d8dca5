//! [`Store::list`](idem_core::Store::list) on Redis and Redis Cluster.
//!
//! `SCAN` returns keys in no order, so a page walks every record key under the prefix (of
//! the scope only, when one is given: the scope is part of the key) on every server, keeps
//! the keys after `after`, sorts them and reads the first `limit`: **each page costs
//! O(keys under the prefix)**, and paging through n records O(n²/limit). Fine for an
//! operator looking at a store; not for a hot path. The order is [`Key`]'s: scope, then id.

use std::collections::BTreeMap;

use idem_core::{Error, Key, Record};

use crate::conn::Node;
use crate::error::{map_err, map_key_err};
use crate::keys::foreign;
use crate::record;
use crate::store::RedisStore;

impl RedisStore {
    /// Up to `limit` records after `after`, of `scope` if given, in [`Key`] order.
    pub(crate) async fn list_page(
        &self,
        scope: Option<&str>,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<Record>, Error> {
        let nodes = self.conn.nodes().await.map_err(map_err)?;
        // The `limit` smallest keys after `after`, each with its Redis key and server.
        let mut first: BTreeMap<Key, (Vec<u8>, usize)> = BTreeMap::new();
        for (n, node) in nodes.iter().enumerate() {
            let mut cursor = 0;
            loop {
                let (next, page) = self.scan_page(node, scope, cursor).await?;
                for redis_key in page {
                    let key = self
                        .layout
                        .parse(&redis_key)
                        .ok_or_else(|| foreign(&redis_key))?;
                    if after.is_some_and(|a| &key <= a) {
                        continue;
                    }
                    first.insert(key, (redis_key, n));
                    if first.len() > limit {
                        first.pop_last();
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        let mut records: BTreeMap<Key, Record> = BTreeMap::new();
        for (n, node) in nodes.iter().enumerate() {
            let keys: Vec<(&Key, &Vec<u8>)> = first
                .iter()
                .filter(|(_, (_, on))| *on == n)
                .map(|(key, (redis_key, _))| (key, redis_key))
                .collect();
            records.extend(self.read_all(node, &keys).await?);
        }
        Ok(records.into_values().collect())
    }

    /// The records of `keys` (all on `node`), read in one pipeline; a record deleted since
    /// it was scanned is left out.
    async fn read_all(
        &self,
        node: &Node,
        keys: &[(&Key, &Vec<u8>)],
    ) -> Result<Vec<(Key, Record)>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (_, redis_key) in keys {
            pipe.get(redis_key.as_slice());
        }
        let replies = self
            .conn
            .pipe_on_node(node, pipe, keys.len())
            .await
            .map_err(map_err)?;
        let mut out = Vec::with_capacity(keys.len());
        for ((key, _), reply) in keys.iter().zip(replies) {
            let bytes: Option<Vec<u8>> =
                redis::from_redis_value(reply.extract_error().map_err(map_key_err(key))?)
                    .map_err(|e| map_err(e.into()))?;
            if let Some(bytes) = bytes {
                out.push(((*key).clone(), record::to_record(key, &bytes)?));
            }
        }
        Ok(out)
    }
}
