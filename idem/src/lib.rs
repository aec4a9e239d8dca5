#![doc = include_str!("../../README.md")]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub use idem_core::*;

/// The SQLite store (feature `sqlite`, on by default).
#[cfg(feature = "sqlite")]
pub use idem_sqlite as sqlite;

/// The PostgreSQL store (feature `postgres`).
#[cfg(feature = "postgres")]
pub use idem_postgres as postgres;

/// The Redis store (feature `redis`): best-effort, see its docs.
#[cfg(feature = "redis")]
pub use idem_redis as redis;

/// The FoundationDB store (feature `fdb`, or `fdb-7_1` / `fdb-7_3` / `fdb-7_4` to pick the
/// API version).
#[cfg(any(feature = "fdb-7_1", feature = "fdb-7_3", feature = "fdb-7_4"))]
pub use idem_fdb as fdb;
