//! The server under test and the crate's conformance factory on it, in a schema of this
//! run, dropped when the factory is.

#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::time::Duration;

use idem_core::{Clock, Deadlines, SystemClock, Timestamp};
use idem_postgres::conformance::PgConformance;

/// The server under test: `IDEM_POSTGRES_URL`, default the local `test` database.
pub fn url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// The conformance factory, whose stores the tests use.
pub type PgFactory = PgConformance;

/// A factory on [`url`] in a fresh schema `idem_test_<run>`.
pub fn factory() -> PgFactory {
    let connect = url().parse().expect("a valid IDEM_POSTGRES_URL");
    let schema = format!("idem_test_{}", idem_conformance::scratch::run_id());
    PgConformance::new(connect, &schema).expect("a valid schema name")
}

/// Deadlines from now: a 60 s lease and an hour's retention after it; and now.
pub fn deadlines() -> (Deadlines, Timestamp) {
    let now = SystemClock.now();
    let lease_until = now.plus(Duration::from_secs(60));
    (
        Deadlines {
            lease_until,
            expires_at: lease_until.plus(Duration::from_secs(3600)),
        },
        now,
    )
}
