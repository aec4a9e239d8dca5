//! The Redis benchmark: one store and one connection per client, keys under `idem-bench:`.

use std::sync::Arc;

use idem::redis::{redis, RedisOptions, RedisStore};
use idem::{Barrier, Error};

use super::kv::{CommandTimes, Connecting, KvBench, KvClient, ReadingTimes};
use super::report::Comparison;
use super::Call;
use crate::lab::unlink_matching;

pub struct RedisBench {
    url: String,
    client: redis::Client,
}

impl RedisBench {
    pub fn new(url: &str) -> Result<Self, Error> {
        Ok(RedisBench {
            url: url.to_string(),
            client: redis::Client::open(url).map_err(Error::permanent)?,
        })
    }
}

impl KvBench for RedisBench {
    const BACKEND: &'static str = "redis";
    const WORKLOADS: &'static [&'static str] = &[
        "set",
        "get",
        "set-multiplexed",
        "barrier-lease",
        "barrier-lease-multiplexed",
        "replay",
    ];
    const COMPARISONS: &'static [Comparison] = &[
        Comparison {
            with: "barrier-lease",
            without: "set",
            what: "begin + complete vs SET, one connection per client",
        },
        Comparison {
            with: "barrier-lease-multiplexed",
            without: "set-multiplexed",
            what: "begin + complete vs SET, all clients on one multiplexed connection",
        },
        Comparison {
            with: "replay",
            without: "get",
            what: "a replay vs GET",
        },
    ];

    fn client(&self) -> Connecting<'_> {
        Box::pin(async move {
            let options = RedisOptions::default().with_key_prefix("idem-bench:")?;
            let store = RedisStore::connect_with(&self.url, options).await?;
            let conn = self
                .client
                .get_multiplexed_async_connection()
                .await
                .map_err(Error::retryable)?;
            let reader = conn.clone();
            Ok(KvClient {
                barrier: Barrier::new(Arc::new(store)),
                write: Box::new(move |k| {
                    let mut conn = conn.clone();
                    Box::pin(async move {
                        redis::cmd("SET")
                            .arg(format!("idem-bench:plain:{k}"))
                            .arg(b"\x011")
                            .query_async::<()>(&mut conn)
                            .await
                            .map_err(Error::retryable)
                    })
                }),
                read: Box::new(move |k| {
                    let mut conn = reader.clone();
                    Box::pin(async move {
                        redis::cmd("GET")
                            .arg(format!("idem-bench:plain:{k}"))
                            .query_async::<Option<Vec<u8>>>(&mut conn)
                            .await
                            .map_err(Error::retryable)
                            .map(drop)
                    })
                }),
            })
        })
    }

    fn cleanup(&self) -> Call {
        let client = self.client.clone();
        Box::pin(async move {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(Error::retryable)?;
            unlink_matching(&mut conn, "idem-bench:*").await
        })
    }

    fn command_times(&self) -> ReadingTimes<'_> {
        let client = self.client.clone();
        Box::pin(async move {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(Error::retryable)?;
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(&mut conn)
                .await
                .map_err(Error::retryable)?;
            Ok(Some(command_times(&info)))
        })
    }
}

/// `INFO commandstats`' lines `cmdstat_<name>:calls=<n>,usec=<n>,…` as name -> (calls, usec).
fn command_times(info: &str) -> CommandTimes {
    info.lines()
        .filter_map(|line| {
            let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| {
                fields
                    .split(',')
                    .find_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            };
            Some((name.to_string(), (field("calls")?, field("usec")?)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_times_are_read_from_info() {
        let info = "# Commandstats\r\ncmdstat_set:calls=10,usec=25,usec_per_call=2.50,rejected_calls=0,failed_calls=0\r\ncmdstat_evalsha:calls=4,usec=18,usec_per_call=4.50\r\nnoise\r\n";
        let times = super::command_times(info);
        assert_eq!(times.get("set"), Some(&(10, 25)));
        assert_eq!(times.get("evalsha"), Some(&(4, 18)));
        assert_eq!(times.len(), 2);
    }
}
