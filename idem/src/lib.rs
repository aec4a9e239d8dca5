#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

// What an application uses. (`idem_core` is the same API with everything at its root.)
pub use idem_core::{
    maintenance, metrics, prelude, Barrier, BoxError, Clock, DynStore, Error, ErrorChain, Failure,
    Fingerprint, InFlight, Key, KeyError, Lease, LeaseHandle, ManualClock, MemoryStore, Outcome,
    Record, Replay, Response, RunError, Started, State, Stats, Store, SystemClock, Timestamp,
    TransactionalStore, TxPolicy, DEFAULT_LEASE, DEFAULT_RETENTION, MAX_ID_LEN, MAX_SCOPE_LEN,
    NO_WAIT_RETRY_AFTER,
};

/// For store implementors, not applications: the store's side of the contract (the answers
/// and parameters of [`Store`]'s methods, the guarantees a store declares) and the helpers
/// every backend shares (the executable model, the record codec, detached calls). See
/// `docs/custom-store.md`.
pub mod backend {
    pub use idem_core::backend::*;
    pub use idem_core::{Begin, Deadlines, Guarantees, Token};
}

/// The SQLite store (feature `sqlite`, on by default).
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use idem_sqlite as sqlite;

/// The PostgreSQL store (feature `postgres`).
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use idem_postgres as postgres;

/// The MySQL/MariaDB store (feature `mysql`).
#[cfg(feature = "mysql")]
#[cfg_attr(docsrs, doc(cfg(feature = "mysql")))]
pub use idem_mysql as mysql;

/// The etcd store (feature `etcd`): strict and replicated by Raft, lease mode.
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub use idem_etcd as etcd;

/// The Redis store (feature `redis`): best-effort, see its docs.
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use idem_redis as redis;

/// The FoundationDB store (feature `fdb`, or `fdb-7_1` / `fdb-7_3` / `fdb-7_4` to pick the
/// API version).
#[cfg(any(feature = "fdb-7_1", feature = "fdb-7_3", feature = "fdb-7_4"))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(feature = "fdb-7_1", feature = "fdb-7_3", feature = "fdb-7_4")))
)]
pub use idem_fdb as fdb;

/// The examples of `docs/operations.md`, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/operations.md")]
pub struct OperationsGuideDoctests;

/// The examples of `docs/custom-store.md`, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/custom-store.md")]
pub struct CustomStoreGuideDoctests;
