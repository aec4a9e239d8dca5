//! Every conformance property Redis claims, against the real server (`IDEM_REDIS_URL`),
//! each store under its own key prefix.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use idem_conformance::StoreFactory;
use idem_core::Error;
use idem_redis::{RedisOptions, RedisStore};

fn url() -> String {
    std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_string())
}

struct RedisFactory {
    prefix: String,
    next: AtomicU32,
}

impl RedisFactory {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        RedisFactory {
            prefix: format!("idem-test:{}:{nanos}:", std::process::id()),
            next: AtomicU32::new(0),
        }
    }
}

impl Drop for RedisFactory {
    fn drop(&mut self) {
        // Delete this factory's keys with a client of our own: the test runtime may be gone.
        let pattern = format!("{}*", self.prefix);
        let Ok(client) = redis::Client::open(url()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query(&mut conn)
            .unwrap_or_default();
        for chunk in keys.chunks(500) {
            let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query(&mut conn);
        }
    }
}

#[async_trait]
impl StoreFactory for RedisFactory {
    type Store = RedisStore;

    fn name(&self) -> &str {
        "redis"
    }

    async fn unavailable(&self) -> Option<String> {
        let probe = async {
            let client = redis::Client::open(url())?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("cannot reach {}: {e}", url())),
            Err(_) => Some(format!("connecting to {} timed out", url())),
        }
    }

    async fn create(&self) -> Result<RedisStore, Error> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let options = RedisOptions {
            key_prefix: format!("{}{n}:", self.prefix),
            ..RedisOptions::default()
        };
        RedisStore::connect_with(&url(), options).await
    }
}

idem_conformance::conformance_tests!(redis_store, RedisFactory::new());
