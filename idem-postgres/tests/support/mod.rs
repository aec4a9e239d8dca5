//! Helpers of this crate's topic tests (cancellation, errors, set-up).
#![allow(dead_code)] // each test binary uses part of it

use std::time::Duration;

use idem_postgres::PgStore;
use sqlx::{Connection, PgConnection, Row};

use crate::common::url;

/// A name unique to this process and moment (pid and a nanosecond stamp), for schemas,
/// roles and `application_name`s.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// The server URL with `application_name=app`.
pub fn app_url(app: &str) -> String {
    let base = url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}application_name={app}")
}

/// Takes every connection the store's pool may hold (waiting for calls still running in
/// the background to give theirs back), then checks through each that it serves a query
/// outside any older transaction, and through `pg_stat_activity` that none of them is
/// idle in a transaction.
pub async fn assert_pool_healthy(store: &PgStore) {
    let pool = store.pool();
    let mut held = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..pool.options().get_max_connections() {
        // A liveness bound, not a performance assertion.
        let mut conn = tokio::time::timeout(Duration::from_secs(120), pool.acquire())
            .await
            .expect("the pool serves every connection")
            .expect("acquire");
        // One simple-protocol message: a transaction it starts itself began with it
        // (`now() = statement_timestamp()`); one left open earlier began before it.
        let row = sqlx::raw_sql("SELECT pg_backend_pid(), now() = statement_timestamp()")
            .fetch_one(&mut *conn)
            .await
            .expect("a pooled connection serves SELECT outside any transaction");
        let (pid, fresh): (i32, bool) = (row.get(0), row.get(1));
        assert!(
            fresh,
            "pooled connection {pid} was inside an older transaction"
        );
        pids.push(pid);
        held.push(conn);
    }
    let mut observer = PgConnection::connect(&url())
        .await
        .expect("observer connects");
    let in_transaction: Vec<(i32, String)> = sqlx::query_as(
        "SELECT pid, state FROM pg_stat_activity
          WHERE pid = ANY($1) AND (state <> 'idle' OR xact_start IS NOT NULL)",
    )
    .bind(&pids)
    .fetch_all(&mut observer)
    .await
    .expect("pg_stat_activity");
    assert!(
        in_transaction.is_empty(),
        "pooled sessions inside a transaction: {in_transaction:?}"
    );
}

/// Runs its SQL (clean-up) when dropped, also when the test fails: on a connection of its
/// own, from a thread of its own, as the test's runtime may be shutting down. Failures are
/// ignored.
pub struct OnDrop(pub String);

impl Drop for OnDrop {
    fn drop(&mut self) {
        let sql = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&url()).await.ok()?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await
                    .ok()
            })
        })
        .join();
    }
}
