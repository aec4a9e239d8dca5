//! The lab on etcd: ledger and naive keys under `idem-lab/`, beside the store's records
//! under `idem-lab/records/`, as the Redis lab keeps them beside its store. etcd has no
//! transactional mode.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem::etcd::etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use idem::etcd::{EtcdOptions, EtcdStore};
use idem::{DynStore, Error};

use super::{lab_key, tally_rows, LabBackend, Ledger, Leg, Tally};

const PREFIX: &str = "idem-lab/";
/// Keys one page of the ledger scan reads.
const PAGE: i64 = 1000;

pub struct EtcdLab {
    store: EtcdStore,
}

impl EtcdLab {
    pub async fn connect(endpoints: &str) -> Result<Self, Error> {
        let options = EtcdOptions::default().with_key_prefix(format!("{PREFIX}records/"));
        Ok(EtcdLab {
            store: EtcdStore::connect_with(endpoints, options).await?,
        })
    }

    fn client(&self) -> Client {
        self.store.client().clone()
    }

    fn ledger_prefix(strategy: &str) -> String {
        format!("{PREFIX}ledger/{strategy}/")
    }
}

/// A millisecond time as a value whose byte order is its numeric order.
fn millis(ms: i64) -> String {
    format!("{:020}", ms.max(0))
}

#[async_trait]
impl Ledger for EtcdLab {
    async fn reset(&self) -> Result<(), Error> {
        self.client()
            .delete(PREFIX, Some(DeleteOptions::new().with_prefix()))
            .await
            .map_err(Error::retryable)
            .map(drop)
    }

    async fn insert(
        &self,
        strategy: &str,
        payment: &str,
        leg: Leg,
        _amount: i64,
        dedup: Option<&str>,
    ) -> Result<(), Error> {
        let row = format!(
            "{}{payment}/{}/{:016x}",
            Self::ledger_prefix(strategy),
            leg.name(),
            rand::random::<u64>()
        );
        let mut client = self.client();
        match dedup {
            // The dedup key and the row in one transaction, as a downstream service with a
            // unique index would write them.
            Some(d) => {
                let d = format!("{PREFIX}dedup/{d}");
                let txn = Txn::new()
                    .when([Compare::create_revision(d.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(d, "", None), TxnOp::put(row, "", None)]);
                client.txn(txn).await.map(drop)
            }
            None => client.put(row, "", None).await.map(drop),
        }
        .map_err(Error::retryable)
    }

    async fn naive_seen(&self, strategy: &str, key: &str) -> Result<bool, Error> {
        let k = format!("{PREFIX}naive/{}", lab_key(strategy, key));
        let got = self.client().get(k, None).await.map_err(Error::retryable)?;
        Ok(!got.kvs().is_empty())
    }

    async fn naive_mark(&self, strategy: &str, key: &str) -> Result<(), Error> {
        let k = format!("{PREFIX}naive/{}", lab_key(strategy, key));
        self.client()
            .put(k, "1", None)
            .await
            .map_err(Error::retryable)
            .map(drop)
    }

    async fn ttl_claim(
        &self,
        strategy: &str,
        key: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<bool, Error> {
        // A live key (expiry after now) stays; an absent one fails the value comparison, so
        // it is set, as an expired one is.
        let k = format!("{PREFIX}ttl/{}", lab_key(strategy, key));
        let until = millis(now_ms + ttl.as_millis() as i64);
        let txn = Txn::new()
            .when([Compare::value(
                k.clone(),
                CompareOp::Greater,
                millis(now_ms),
            )])
            .or_else([TxnOp::put(k, until, None)]);
        let done = self.client().txn(txn).await.map_err(Error::retryable)?;
        Ok(!done.succeeded())
    }

    async fn tally(&self, strategy: &str) -> Result<Vec<Tally>, Error> {
        let prefix = Self::ledger_prefix(strategy);
        let mut client = self.client();
        let mut keys = Vec::new();
        let mut from = prefix.clone().into_bytes();
        let mut end = prefix.clone().into_bytes();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_keys_only()
                .with_limit(PAGE);
            let page = client
                .get(from.clone(), Some(options))
                .await
                .map_err(Error::retryable)?;
            keys.extend(
                page.kvs()
                    .iter()
                    .map(|kv| String::from_utf8_lossy(kv.key()).into_owned()),
            );
            match page.kvs().last() {
                Some(last) if page.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        // `<prefix><payment>/<leg>/<random>`
        let rows = keys.iter().map(|k| {
            let mut parts = k[prefix.len()..].split('/');
            (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            )
        });
        Ok(tally_rows(rows))
    }
}

#[async_trait]
impl LabBackend for EtcdLab {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn store(&self) -> DynStore {
        Arc::new(self.store.clone())
    }

    fn ledger(&self) -> &dyn Ledger {
        self
    }
}
