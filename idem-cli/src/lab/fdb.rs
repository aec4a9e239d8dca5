//! The lab's FoundationDB backend (feature `fdb`): ledger and naive keys in their own
//! subspace, the barrier's records in the store's.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use idem::fdb::foundationdb::tuple::Subspace;
use idem::fdb::foundationdb::{Database, RangeOption, RetryableTransaction};
use idem::fdb::{start_network, FdbOperation, FdbOptions, FdbStore};
use idem::{Barrier, DynStore, Error, Failure, Fingerprint, Key, ManualClock, TxPolicy};

use super::{tally_rows, LabBackend, Ledger, Leg, Tally, TxAnswer, TxPayment, WORKER_DIED};

pub struct FdbLab {
    db: Arc<Database>,
    store: FdbStore,
    space: Subspace,
}

fn write_row(
    trx: &RetryableTransaction,
    space: &Subspace,
    strategy: &str,
    payment: &str,
    leg: Leg,
) {
    let row = space.pack(&(
        "ledger",
        strategy,
        payment,
        leg.name(),
        rand::random::<u64>(),
    ));
    trx.set(&row, b"");
}

impl FdbLab {
    pub fn open(cluster_file: Option<&str>) -> Result<Self, Error> {
        start_network()?;
        let db = Arc::new(Database::new(cluster_file).map_err(Error::retryable)?);
        let store = FdbStore::from_database(
            Arc::clone(&db),
            FdbOptions::default().with_name("lab-records")?,
        )?;
        Ok(FdbLab {
            db,
            store,
            space: Subspace::all().subspace(&("idem-lab",)),
        })
    }
}

#[async_trait]
impl Ledger for FdbLab {
    async fn reset(&self) -> Result<(), Error> {
        let (lab, records) = (self.space.range(), self.store.subspace().range());
        self.db
            .run(|trx, _| {
                let (lab, records) = (lab.clone(), records.clone());
                async move {
                    trx.clear_range(&lab.0, &lab.1);
                    trx.clear_range(&records.0, &records.1);
                    Ok(())
                }
            })
            .await
            .map_err(Error::retryable)
    }

    async fn insert(
        &self,
        strategy: &str,
        payment: &str,
        leg: Leg,
        _amount: i64,
        dedup: Option<&str>,
    ) -> Result<(), Error> {
        self.db
            .run(|trx, _| {
                let space = self.space.clone();
                async move {
                    if let Some(d) = dedup {
                        let k = space.pack(&("dedup", d));
                        if trx.get(&k, false).await?.is_some() {
                            return Ok(());
                        }
                        trx.set(&k, b"");
                    }
                    write_row(&trx, &space, strategy, payment, leg);
                    Ok(())
                }
            })
            .await
            .map_err(Error::retryable)
    }

    async fn naive_seen(&self, strategy: &str, key: &str) -> Result<bool, Error> {
        let k = self.space.pack(&("naive", strategy, key));
        self.db
            .run(|trx, _| {
                let k = k.clone();
                async move { Ok(trx.get(&k, false).await?.is_some()) }
            })
            .await
            .map_err(Error::retryable)
    }

    async fn naive_mark(&self, strategy: &str, key: &str) -> Result<(), Error> {
        let k = self.space.pack(&("naive", strategy, key));
        self.db
            .run(|trx, _| {
                let k = k.clone();
                async move {
                    trx.set(&k, b"1");
                    Ok(())
                }
            })
            .await
            .map_err(Error::retryable)
    }

    async fn ttl_claim(
        &self,
        strategy: &str,
        key: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<bool, Error> {
        let k = self.space.pack(&("ttl", strategy, key));
        let until = now_ms + ttl.as_millis() as i64;
        self.db
            .run(|trx, _| {
                let k = k.clone();
                async move {
                    if let Some(v) = trx.get(&k, false).await? {
                        let bytes: [u8; 8] = v.as_ref().try_into().unwrap_or([0; 8]);
                        if i64::from_le_bytes(bytes) > now_ms {
                            return Ok(false);
                        }
                    }
                    trx.set(&k, &until.to_le_bytes());
                    Ok(true)
                }
            })
            .await
            .map_err(Error::retryable)
    }

    async fn tally(&self, strategy: &str) -> Result<Vec<Tally>, Error> {
        let range = self.space.subspace(&("ledger", strategy)).range();
        let keys: Vec<Vec<u8>> = self
            .db
            .run(|trx, _| {
                let range = range.clone();
                async move {
                    let mut out = Vec::new();
                    let mut opt = Some(RangeOption::from(range));
                    let mut iteration = 1;
                    while let Some(o) = opt {
                        let page = trx.get_range(&o, iteration, true).await?;
                        out.extend(page.iter().map(|kv| kv.key().to_vec()));
                        opt = o.next_range(&page);
                        iteration += 1;
                    }
                    Ok(out)
                }
            })
            .await
            .map_err(Error::retryable)?;
        let rows = keys
            .iter()
            .map(|k| {
                let (_, _, payment, leg, _): (String, String, String, String, u64) =
                    self.space.unpack(k).map_err(Error::corrupt)?;
                Ok((payment, leg))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(tally_rows(rows))
    }
}

#[async_trait]
impl LabBackend for FdbLab {
    fn name(&self) -> &'static str {
        "fdb"
    }

    fn store(&self) -> DynStore {
        Arc::new(self.store.clone())
    }

    fn ledger(&self) -> &dyn Ledger {
        self
    }

    async fn transactional(
        &self,
        clock: &ManualClock,
        key: &Key,
        fp: Fingerprint,
        p: TxPayment,
        policy: TxPolicy,
    ) -> Option<TxAnswer> {
        let barrier =
            Barrier::new(Arc::new(self.store.clone())).with_clock(Arc::new(clock.clone()));
        let space = self.space.clone();
        let op: FdbOperation<i64, String, String> = Box::new(move |trx| {
            let (space, p) = (space.clone(), p.clone());
            Box::pin(async move {
                p.started();
                let row = |leg: Leg| {
                    space.pack(&(
                        "ledger",
                        p.strategy,
                        p.payment.as_str(),
                        leg.name(),
                        rand::random::<u64>(),
                    ))
                };
                trx.set(&row(Leg::Debit), b"");
                tokio::time::sleep(p.latency).await;
                if p.crash {
                    return Err(Failure::Retryable(WORKER_DIED.to_string()));
                }
                trx.set(&row(Leg::Credit), b"");
                Ok(p.amount)
            })
        });
        Some(barrier.transaction(key, Some(fp), policy, op).await)
    }
}
