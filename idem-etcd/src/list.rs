//! [`Store::list`](idem_core::Store::list) on etcd: one range read of the metadata keys
//! (etcd keeps keys sorted) and one of the same records' outcomes at the same revision.
//!
//! The order is the key layout's: by the scope's length in bytes, then the scope's bytes,
//! then the id's bytes (see the crate's key layout).

use std::collections::HashMap;

use etcd_client::GetOptions;
use idem_core::{Error, Key, Record};

use crate::keys::decode;
use crate::store::{next_key, EtcdStore};

impl EtcdStore {
    /// Up to `limit` records after `after`, of `scope` if given, in key order.
    pub(crate) async fn list_page(
        &self,
        scope: Option<&str>,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<Record>, Error> {
        let (start, end) = self.keys.meta_range_of(scope);
        let from = match after {
            Some(key) => start.max(next_key(&self.keys.meta(key))),
            None => start,
        };
        if limit == 0 || from >= end {
            return Ok(Vec::new());
        }
        let options = GetOptions::new()
            .with_range(end)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut metas = self.range(from, options).await?;
        let revision = metas.header().map(|h| h.revision()).unwrap_or(0);
        let metas = metas.take_kvs();
        let (Some(first), Some(last)) = (metas.first(), metas.last()) else {
            return Ok(Vec::new());
        };
        // The outcome keys sort as their metadata keys do: the ones of this page are the
        // range from the first record's to the last's, read at the metadata's revision.
        let options = GetOptions::new()
            .with_range(next_key(&self.keys.outcome_of(last.key())))
            .with_revision(revision);
        let mut outcomes: HashMap<Vec<u8>, Vec<u8>> = self
            .range(self.keys.outcome_of(first.key()), options)
            .await?
            .take_kvs()
            .into_iter()
            .map(|kv| kv.into_key_value())
            .collect();
        metas
            .into_iter()
            .map(|kv| {
                let (meta_key, meta) = kv.into_key_value();
                let key = self.keys.parse_meta(&meta_key)?;
                let outcome = outcomes.remove(&self.keys.outcome_of(&meta_key));
                Ok(decode(&key, &meta, outcome)?.record)
            })
            .collect()
    }
}
