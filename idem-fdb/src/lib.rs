//! The FoundationDB store for [idem](https://docs.rs/idem-barrier): strictly serializable
//! claims across a cluster, and transactional mode with business keys in the claim's
//! transaction.
//!
//! ```no_run
//! use std::sync::Arc;
//! use idem_core::{Barrier, Failure, Key, TxPolicy};
//! use idem_fdb::{FdbOperation, FdbOptions, FdbStore};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let options = FdbOptions::default().with_name("billing")?;
//! let store = FdbStore::connect_with(None, options).await?;
//! let barrier = Barrier::new(Arc::new(store));
//! let key = Key::new("merchant-7", "order-1001")?;
//! let op: FdbOperation<i64, String, String> = Box::new(|trx| Box::pin(async move {
//!     trx.set(b"ledger/order-1001", b"1250");
//!     Ok(1250)
//! }));
//! let response = barrier.transaction(&key, None, TxPolicy::Wait, op).await?;
//! idem_fdb::stop_network();
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! [`FdbStore`] declares [`Guarantees::distributed`](idem_core::Guarantees::distributed):
//!
//! | guarantee | how |
//! |---|---|
//! | atomic claim | every operation is one transaction that reads the record (a read conflict on its key) and writes the next version: of concurrent claims exactly one commits, the others are retried and see it |
//! | fenced completion | `complete`, `fail`, `extend`, `release` check the token inside their transaction |
//! | linearizable | FoundationDB transactions are strictly serializable |
//! | transactional | the operation gets the claim's `&Transaction`; claim, business writes and outcome commit together. **FoundationDB may run the operation more than once** (after a conflict or a retryable error it retries the whole transaction): it must touch nothing but the transaction it is given; only the committed run has an effect. Duplicates never block: they run optimistically, one commits, the others replay its outcome (`TxPolicy::Wait` and `NoWait` behave alike). A permanent failure resets the transaction, claims again and records `Failed`. `TxPolicy::Optimistic` runs as `Wait` |
//! | durable, survives failover | once FoundationDB acknowledges the commit (synchronous replication per the cluster's redundancy mode) |
//! | shared across processes | yes, across machines |
//!
//! **Maybe committed.** After `commit_unknown_result` (1021) the retry re-reads the record and
//! recognises its own write (a claim id stored with the lease; the token and outcome bytes of
//! a completion) instead of applying it twice.
//!
//! # Key layout
//!
//! Inside the store's subspace (default `("idem", "default")`, [`FdbOptions::with_name`] or
//! [`FdbOptions::with_subspace`]):
//!
//! | key | value |
//! |---|---|
//! | `("rec", scope, id)` | packed tuple `(1, state, token, lease_until?, created_at, updated_at, expires_at, claim_id, reclaimed, fingerprint?, response?)` |
//! | `("exp", expires_at, scope, id)` | empty: the purge index |
//! | `("count", state)` | little-endian `i64`, atomic adds: `stats` in O(1) |
//!
//! A record over [`MAX_VALUE_BYTES`] (a large response) is refused with
//! [`Error::TooLarge`](idem_core::Error::TooLarge) before anything is written.
//!
//! # Cancellation
//!
//! Any future of this crate may be dropped at any await point. FoundationDB holds no
//! session for a client: a transaction's writes stay in the client until its commit, and the
//! client's network thread is shared by every transaction. So there is no pool that could get
//! back a connection inside a transaction, and dropping a call before its commit was sent
//! writes nothing. Dropped while the commit is in flight, the commit may or may not take
//! effect — the case FoundationDB itself reports as `commit_unknown_result`:
//!
//! | call dropped | what happens | how a retry learns the outcome |
//! |---|---|---|
//! | `Barrier::transaction` | before the commit: nothing was written; during the commit: claim, business writes and outcome commit together, or nothing does | the retry's transaction reads the record; if the first commit lands after that read, the retry's commit conflicts, is retried and sees the outcome. It replays the outcome or, if nothing committed, executes — never both |
//! | `begin` (lease mode) | before the commit: nothing; during the commit: the claim may have committed with nobody holding its lease | the key answers `InProgress` (with the remaining lease as `Retry-After`) until the lease ends, then is reclaimed with a new token. Unlike the SQL stores, this store does not yet release a claim whose `begin` was dropped mid-commit: that needs the rest of a dropped call to move onto a task of its own (as `idem-postgres` does), which this crate, driven by any executor, does not spawn |
//! | `complete` / `fail` / `extend` / `release` | the fenced write lands or not | a repeated `complete` after one that landed answers `LeaseLost` while the outcome is stored; the next `begin` replays it |
//! | `get`, `purge`, `stats` | a read, or a purge batch that commits whole or not at all | |
//!
//! # Errors
//!
//! One function classifies every FoundationDB error ([`Error::Store`](idem_core::Error::Store)
//! with `retryable` set or not). The store's retry loop (`on_error`) already retries
//! retryable errors within the transaction's timeout and retry limit; an error reaches the
//! caller when those run out or the error is not retryable.
//!
//! | failure | code | class |
//! |---|---|---|
//! | conflict with a concurrent transaction | 1020 `not_committed` | retryable |
//! | commit result unknown (the store's retry recognises its own write) | 1021 `commit_unknown_result` | retryable |
//! | transaction older than 5 s (read version too old) | 1007 `transaction_too_old` | retryable |
//! | read version ahead of the storage servers | 1009 `future_version` | retryable |
//! | the transaction's timeout ([`FdbOptions::with_timeout`]) ran out, cluster unreachable | 1031 `transaction_timed_out`, 1004 `timed_out` | retryable |
//! | cancelled transaction or operation | 1025 `transaction_cancelled`, 1101 `operation_cancelled` | retryable |
//! | cluster busy, recovering or throttling | 1037 `process_behind`, 1038 `database_locked`, 1039 `cluster_version_changed`, 1040 / 1078 proxy memory limits, 1042 `batch_transaction_throttled`, 1213 `tag_throttled` | retryable |
//! | any other code FoundationDB's own `retryable` predicate accepts | | retryable |
//! | transaction over 10 MB | 2101 `transaction_too_large` | permanent |
//! | key over 10 kB, value over 100 kB (a business write of the operation) | 2102 `key_too_large`, 2103 `value_too_large` | permanent |
//! | client misuse: invalid option, key outside the legal range, network not set up, … | 2000–2099 | permanent |
//! | bad cluster file or connection string, unsupported API version | 2104 and up | permanent |
//! | `unknown_error`, `internal_error`, anything else | 4100, 4200, … | permanent |
//! | a record over [`MAX_VALUE_BYTES`] | | [`Error::TooLarge`](idem_core::Error::TooLarge), before writing |
//! | a stored record that does not decode (bytes that do not unpack, unknown state, token out of range, fingerprint of the wrong length) | | [`Error::Corrupt`](idem_core::Error::Corrupt) naming the key |
//! | a record in another format | | [`Error::UnknownFormat`](idem_core::Error::UnknownFormat) |
//! | a counter that is not 8 bytes | | [`Error::Corrupt`](idem_core::Error::Corrupt) without a key |
//! | bad options (empty subspace, timeout of 0 or above `i32::MAX` ms), the client network failing to start | | [`Error::Config`](idem_core::Error::Config) |
//!
//! # Set-up
//!
//! [`FdbStore::connect`] / [`FdbStore::connect_with`] start the client network once per
//! process ([`start_network`]) and check that the cluster answers; call [`stop_network`] at
//! the end of `main`, after the last store is used (FoundationDB cannot restart the network
//! in the same process). [`FdbStore::from_database`] uses a database you opened. There is no
//! schema to migrate.
//!
//! # Verified where
//!
//! No FoundationDB server or client library can be installed on the machine this project is
//! built on, so CI **compile-checks** this crate and its tests (`cargo clippy -p idem-fdb
//! --all-targets -- -D warnings`); the conformance suite has **not** been run live here. With
//! a cluster and `libfdb_c` installed, one command runs it:
//!
//! ```sh
//! IDEM_FDB_CLUSTER_FILE=/etc/foundationdb/fdb.cluster IDEM_TEST_REQUIRE=fdb cargo test -p idem-fdb
//! ```
#![deny(missing_docs)]

mod error;
mod keys;
mod options;
mod store;
mod tx;

pub use foundationdb;
pub use keys::MAX_VALUE_BYTES;
pub use options::{FdbOptions, DEFAULT_NAME};
pub use store::{start_network, stop_network, FdbStore};
pub use tx::{operation, FdbOperation, FdbTxFn};
