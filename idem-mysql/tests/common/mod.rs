//! The server under test and the crate's conformance factory on it: a fresh table per
//! store a factory creates, all dropped with the factory.

#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::time::Duration;

use idem_mysql::conformance::{session_pool, MySqlConformance};
use idem_mysql::MySqlStore;
use sqlx::mysql::MySqlPool;

/// The server under test: `IDEM_MYSQL_URL`, default the local `test` database.
pub fn url() -> String {
    std::env::var("IDEM_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// A name no other test process uses: the pid and a nanosecond stamp.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// The crate's conformance factory, whose stores the tests use.
pub type MySqlFactory = MySqlConformance;

/// A factory on [`url`] whose tables are named `idem_t_<run>_…`.
pub fn factory() -> MySqlFactory {
    let connect = url().parse().expect("a valid IDEM_MYSQL_URL");
    MySqlConformance::new(connect, &unique("idem_t")).expect("a valid prefix")
}

/// A pool of at most `max` connections, each of which runs `setup` (session settings)
/// right after connecting, after one connection succeeded.
pub async fn try_pool_with(setup: &str, max: u32) -> Result<MySqlPool, sqlx::Error> {
    let connect = url().parse()?;
    let pool = session_pool(&connect, setup, max);
    drop(pool.acquire().await?);
    Ok(pool)
}

/// [`try_pool_with`], for tests that already know the server is there.
pub async fn pool_with(setup: &str, max: u32) -> MySqlPool {
    try_pool_with(setup, max).await.expect("connect")
}

/// Waits until a statement on `store`'s table waits for a row lock (a duplicate queued
/// behind an open transaction), as `SHOW ENGINE INNODB STATUS` reports it (not
/// `information_schema.INNODB_TRX`: that is a cache the server refreshes only after 0.1 s
/// without readers, so pollers keep it stale). Panics after 60 s.
pub async fn lock_waiter(store: &MySqlStore) {
    let table = format!("`{}`", store.options().table());
    for _ in 0..600 {
        let (_, _, status): (String, String, String) = sqlx::query_as("SHOW ENGINE INNODB STATUS")
            .fetch_one(store.pool())
            .await
            .expect("SHOW ENGINE INNODB STATUS");
        if status
            .lines()
            .any(|l| l.contains(&table) && l.contains("waiting"))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no statement on {table} ever waited for a lock");
}
