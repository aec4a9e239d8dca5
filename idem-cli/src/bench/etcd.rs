//! The etcd benchmark: one store (one client) per benchmark client, keys under
//! `idem-bench/`, on the cluster of `scripts/cluster.sh start etcd` by default.

use std::sync::Arc;

use idem::etcd::etcd_client::DeleteOptions;
use idem::etcd::{EtcdOptions, EtcdStore};
use idem::{Barrier, Error};

use super::kv::{Connecting, KvBench, KvClient, ReadingTimes};
use super::report::Comparison;
use super::Call;

const PREFIX: &str = "idem-bench/";

pub struct EtcdBench {
    endpoints: String,
}

impl EtcdBench {
    pub fn new(endpoints: &str) -> Self {
        EtcdBench {
            endpoints: endpoints.to_string(),
        }
    }
}

async fn connect(endpoints: &str) -> Result<EtcdStore, Error> {
    let options = EtcdOptions::default().with_key_prefix(format!("{PREFIX}records/"));
    EtcdStore::connect_with(endpoints, options).await
}

impl KvBench for EtcdBench {
    const BACKEND: &'static str = "etcd";
    const WORKLOADS: &'static [&'static str] = &["put", "get", "barrier-lease", "replay"];
    const COMPARISONS: &'static [Comparison] = &[
        Comparison {
            with: "barrier-lease",
            without: "put",
            what: "begin + complete vs PUT, one client each",
        },
        Comparison {
            with: "replay",
            without: "get",
            what: "a replay vs GET",
        },
    ];

    fn client(&self) -> Connecting<'_> {
        Box::pin(async move {
            let store = connect(&self.endpoints).await?;
            let (writer, reader) = (store.client().clone(), store.client().clone());
            Ok(KvClient {
                barrier: Barrier::new(Arc::new(store)),
                write: Box::new(move |k| {
                    let mut client = writer.clone();
                    Box::pin(async move {
                        client
                            .put(format!("{PREFIX}plain/{k}"), b"\x011".to_vec(), None)
                            .await
                            .map_err(Error::retryable)
                            .map(drop)
                    })
                }),
                read: Box::new(move |k| {
                    let mut client = reader.clone();
                    Box::pin(async move {
                        client
                            .get(format!("{PREFIX}plain/{k}"), None)
                            .await
                            .map_err(Error::retryable)
                            .map(drop)
                    })
                }),
            })
        })
    }

    fn cleanup(&self) -> Call {
        let endpoints = self.endpoints.clone();
        Box::pin(async move {
            let store = connect(&endpoints).await?;
            store
                .client()
                .clone()
                .delete(PREFIX, Some(DeleteOptions::new().with_prefix()))
                .await
                .map_err(Error::retryable)
                .map(drop)
        })
    }

    fn command_times(&self) -> ReadingTimes<'_> {
        Box::pin(async { Ok(None) })
    }
}
