//! The suite must reject deliberately broken stores, each by the property aimed at its bug.
//! (The reference store passing everything is `tests/memory.rs`.)

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use idem_conformance::{run_all, Report, StoreFactory};
use idem_core::{
    model, Begin, Deadlines, Error, Fingerprint, Guarantees, Key, Lease, Record, State, Stats,
    Store, Timestamp,
};

/// The bugs, each seen in real idempotency code.
#[derive(Clone, Copy, Debug)]
enum Bug {
    /// Reads the key, yields, then inserts: two requests both find no key.
    CheckThenInsert,
    /// Keys live 24 hours, as in a Redis `SET EX 86400`: older records count as absent.
    TtlAsAbsence,
    /// `complete` and `fail` ignore the fencing token.
    UnfencedCompletion,
    /// The fingerprint is only checked on the fresh/in-flight path, not when replaying.
    NoValidationOnReplay,
    /// `release` deletes the record, so tokens restart at 1.
    TokenResetOnRelease,
    /// Reclaim decides on a stale read: a completion landing in between is overwritten.
    ReclaimOverwrites,
}

struct Broken {
    bug: Bug,
    records: Mutex<BTreeMap<Key, Record>>,
}

impl Broken {
    fn read(&self, key: &Key, now: Timestamp) -> Option<Record> {
        let rec = self.records.lock().unwrap().get(key).cloned();
        match self.bug {
            Bug::TtlAsAbsence => {
                rec.filter(|r| r.updated_at.plus(Duration::from_secs(24 * 3600)) > now)
            }
            _ => rec,
        }
    }

    fn write(&self, rec: Record) {
        self.records.lock().unwrap().insert(rec.key.clone(), rec);
    }

    fn finish(
        &self,
        lease: &Lease,
        failed: bool,
        response: &[u8],
        expires_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Error> {
        let rec = self.records.lock().unwrap().get(&lease.key).cloned();
        let next = match (self.bug, rec) {
            (Bug::UnfencedCompletion, Some(rec)) => {
                let response = response.to_vec();
                Record {
                    state: if failed {
                        State::Failed { response }
                    } else {
                        State::Completed { response }
                    },
                    updated_at: now,
                    expires_at,
                    ..rec
                }
            }
            (_, rec) => model::finish(rec.as_ref(), lease, failed, response, expires_at, now)?,
        };
        self.write(next);
        Ok(())
    }
}

async fn widen_race() {
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
}

#[async_trait]
impl Store for Broken {
    fn guarantees(&self) -> Guarantees {
        Guarantees::in_memory()
    }

    async fn begin(
        &self,
        key: &Key,
        fp: Option<&Fingerprint>,
        d: Deadlines,
        now: Timestamp,
    ) -> Result<Begin, Error> {
        let rec = self.read(key, now);
        match (self.bug, &rec) {
            (Bug::CheckThenInsert, None) => widen_race().await,
            (
                Bug::ReclaimOverwrites,
                Some(Record {
                    state: State::InProgress { lease_until, .. },
                    ..
                }),
            ) if *lease_until <= now => widen_race().await,
            (
                Bug::NoValidationOnReplay,
                Some(Record {
                    state: State::Completed { response },
                    ..
                }),
            ) => {
                return Ok(Begin::Completed {
                    response: response.clone(),
                })
            }
            (
                Bug::NoValidationOnReplay,
                Some(Record {
                    state: State::Failed { response },
                    ..
                }),
            ) => {
                return Ok(Begin::Failed {
                    response: response.clone(),
                })
            }
            _ => {}
        }
        let (answer, next) = model::begin(rec.as_ref(), key, fp, d, now);
        if let Some(next) = next {
            self.write(next);
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

    async fn extend(&self, lease: &Lease, d: Deadlines, now: Timestamp) -> Result<Lease, Error> {
        let rec = self.records.lock().unwrap().get(&lease.key).cloned();
        let (lease, next) = model::extend(rec.as_ref(), lease, d, now)?;
        self.write(next);
        Ok(lease)
    }

    async fn release(&self, lease: &Lease, now: Timestamp) -> Result<(), Error> {
        let mut records = self.records.lock().unwrap();
        let next = model::release(records.get(&lease.key), lease, now)?;
        match self.bug {
            Bug::TokenResetOnRelease => records.remove(&lease.key),
            _ => records.insert(lease.key.clone(), next),
        };
        Ok(())
    }

    async fn get(&self, key: &Key) -> Result<Option<Record>, Error> {
        Ok(self.records.lock().unwrap().get(key).cloned())
    }

    async fn purge(&self, now: Timestamp, batch: usize) -> Result<u64, Error> {
        let mut records = self.records.lock().unwrap();
        let doomed: Vec<Key> = records
            .values()
            .filter(|r| r.expires_at <= now)
            .map(|r| r.key.clone())
            .take(batch)
            .collect();
        for k in &doomed {
            records.remove(k);
        }
        Ok(doomed.len() as u64)
    }

    async fn stats(&self) -> Result<Stats, Error> {
        let mut stats = Stats::default();
        for r in self.records.lock().unwrap().values() {
            stats.add(r.state.name(), 1)?;
        }
        Ok(stats)
    }
}

struct BrokenFactory(Bug);

#[async_trait]
impl StoreFactory for BrokenFactory {
    type Store = Broken;

    fn name(&self) -> &str {
        "broken"
    }

    async fn create(&self) -> Result<Broken, Error> {
        Ok(Broken {
            bug: self.0,
            records: Mutex::default(),
        })
    }
}

async fn rejected(bug: Bug, by: &[&str]) -> Report {
    let report = run_all(&BrokenFactory(bug)).await;
    println!("{bug:?}:\n{report}");
    for name in by {
        assert!(
            report.failed(name),
            "{bug:?} was not rejected by `{name}`:\n{report}"
        );
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_then_insert_is_rejected() {
    rejected(Bug::CheckThenInsert, &["race", "concurrent_check_race"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ttl_as_absence_is_rejected() {
    rejected(Bug::TtlAsAbsence, &["ttl_trap", "model_check"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unfenced_completion_is_rejected() {
    rejected(Bug::UnfencedCompletion, &["fencing", "model_check"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_validation_on_replay_is_rejected() {
    rejected(
        Bug::NoValidationOnReplay,
        &["mismatch_every_path", "model_check"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_reset_on_release_is_rejected() {
    rejected(Bug::TokenResetOnRelease, &["release", "model_check"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reclaim_overwriting_a_completion_is_rejected() {
    rejected(Bug::ReclaimOverwrites, &["reclaim_race"]).await;
}
