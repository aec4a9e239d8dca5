//! The SQLite store for [idem](https://docs.rs/idem-barrier): strict, durable and
//! transactional, in one embedded file, with no server to run.
//!
//! ```
//! use std::sync::Arc;
//! use idem_core::{Barrier, Failure, Key, Outcome, TxPolicy};
//! use idem_sqlite::{rusqlite, SqliteOperation, SqliteOptions, SqliteStore};
//!
//! # tokio::runtime::Builder::new_multi_thread().build().unwrap().block_on(async {
//! # let dir = std::env::temp_dir().join(format!("idem-sqlite-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir)?;
//! let options = SqliteOptions::default().with_table("shop_idem")?;
//! let store = SqliteStore::connect_with(dir.join("shop.db"), options).await?;
//! store.with_connection(|c| c.execute_batch(
//!     "CREATE TABLE IF NOT EXISTS ledger (order_id TEXT PRIMARY KEY, amount INTEGER)")).await?;
//! let barrier = Barrier::new(Arc::new(store));
//! let key = Key::new("shop", "order-1")?;
//!
//! for _attempt in 0..3 {
//!     let op: SqliteOperation<i64, String, rusqlite::Error> = Box::new(|tx| {
//!         tx.execute("INSERT INTO ledger VALUES ('order-1', 100)", [])
//!             .map_err(Failure::Retryable)?;
//!         Ok(100)
//!     });
//!     let r = barrier.transaction(&key, None, TxPolicy::Wait, op).await?;
//!     assert_eq!(r.outcome, Outcome::Completed(100));
//! }
//! let rows: i64 = barrier.store().with_connection(|c|
//!     c.query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0))).await?;
//! assert_eq!(rows, 1);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(()) }).unwrap();
//! ```
//!
//! # Guarantees
//!
//! [`SqliteStore`] declares [`Guarantees::single_node_sql`](idem_core::Guarantees::single_node_sql)
//! (less for `:memory:` and [`Synchronous::Normal`], see below):
//!
//! | guarantee | how |
//! |---|---|
//! | atomic claim | every write is one `BEGIN IMMEDIATE` transaction that reads the record, applies [`idem_core::backend::model`] and writes the result; SQLite has one writer per database, across threads and processes |
//! | fenced completion | `complete`, `fail`, `extend`, `release` check the token inside that transaction; a zombie worker gets `LeaseLost` and writes nothing |
//! | linearizable | every operation on a key is one serializable transaction |
//! | transactional | the operation gets the claim's `&rusqlite::Transaction`; claim, business rows and outcome commit together. A permanent failure rolls the business rows back (savepoint) and commits `Failed`; a retryable error, a panic or a killed process leaves nothing. A duplicate waits for the write lock and replays ([`TxPolicy::Wait`](idem_core::TxPolicy)) or gets `InProgress` at once if the write lock is taken (`TxPolicy::NoWait`: the lock may be another key's). `TxPolicy::Optimistic` runs as `Wait` (the claim is a few microseconds inside the same commit: there is no statement to save) |
//! | durable | WAL with `synchronous = FULL`: an acknowledged commit survives a power loss. Not with [`Synchronous::Normal`] (the store then reports `durable: false`), nor for `:memory:` |
//! | survives failover | no: one file on one machine |
//! | shared across processes | yes, for processes on one machine sharing the file (not over a network file system, where SQLite's locks are unreliable); not for `:memory:` |
//!
//! The table name is configurable ([`SqliteOptions::with_table`]): one lowercase SQL
//! identifier, quoted in every statement. SQLite's only schemas are attached databases,
//! which exist per connection while the store pools its own connections, so `schema.table`
//! is refused; give the store a table or a file of its own instead.
//!
//! # Cancellation
//!
//! Any future of this crate may be dropped at any await point (a client disconnects, a
//! `tokio::time::timeout` fires, a `select!` takes another branch). A call first waits, in
//! FIFO order, for one of the store's connections; dropped there, it leaves nothing behind.
//! Then it runs on tokio's blocking pool, which cannot interrupt it: it takes the store's
//! write gate (if it writes), the transaction runs to its `COMMIT` or `ROLLBACK`, the
//! connection goes back to the pool, and only then is the answer handed to the caller — or,
//! if the caller is gone, to clean-up. (So a call dropped while its blocking task waits for
//! the write gate still runs when its turn comes; at most `max_connections` calls can be in
//! that state, since each holds a connection slot.)
//!
//! | call dropped | what happens | how a retry learns the outcome |
//! |---|---|---|
//! | `Barrier::transaction` | the transaction runs to its end without the caller: the operation (a blocking closure) finishes, and claim, business rows and outcome commit together (or roll back together on a retryable error or a panic) | a retry with `TxPolicy::Wait` waits for the write lock until that transaction ends, then replays its outcome or, if it rolled back, executes; with `TxPolicy::NoWait` it gets `InProgress` while the transaction runs. The key never executes twice, and transactional mode never leaves a claim behind |
//! | `begin` (lease mode) | the claim's transaction commits; if it acquired the key and the caller is gone, the claim is released at once (a task spawned on the runtime), since no operation can run under a lease nobody received | the next `begin` acquires at once (a released claim is not a reclaim) or finds the outcome. If the runtime shuts down before the release runs, the claim ends with its lease |
//! | `complete` / `fail` | the fenced write still lands | the retry replays the stored outcome |
//! | `release` / `extend` | the write still lands | the retry acquires (`release`) or sees the extended lease |
//! | `get`, `purge`, `stats`, `migrate`, `with_connection` | the statement runs to its end | (no state of a key changes except by `purge`, within its contract) |
//! | lease-mode `Barrier::execute` while the operation runs | `idem-core` ends the lease: it stores the pending outcome, or releases the key | see `idem_core::Barrier::execute` |
//!
//! A connection goes back to the pool only outside a transaction. One that is still inside
//! one (a rollback that failed, or an application's [`SqliteStore::with_connection`] closure
//! that left a transaction open) is closed instead, which rolls the transaction back. A
//! panic in an operation rolls its transaction back, closes its connection and resumes in
//! the caller. A crash of the process rolls back every open transaction (SQLite's journal).
//!
//! # Errors
//!
//! One function classifies every rusqlite error; `tests/errors.rs` provokes each row marked
//! *tested* against the real engine, and a unit test checks every code of the table.
//!
//! | failure | SQLite code | class | tested |
//! |---|---|---|---|
//! | another connection or process holds the write lock past the busy timeout (`BEGIN EXCLUSIVE` elsewhere), stale WAL snapshot, WAL recovery | `SQLITE_BUSY` (5) and its extended codes | retryable (503); a `TxPolicy::NoWait` claim answers `InProgress` instead | yes (a second connection holding `BEGIN EXCLUSIVE`, 50 ms busy timeout) |
//! | the store's own writers contending | — | never an error: they wait, without a limit, for a connection and then for the store's write gate (a blocked thread is woken as soon as the gate is free; see cancellation for what a call dropped while waiting does) | yes (24 transactions queued behind a 20 ms busy timeout) |
//! | a table lock of a shared cache (`file:…?cache=shared`) | `SQLITE_LOCKED` (6) | retryable | yes |
//! | disk full, database at `max_page_count` | `SQLITE_FULL` (13) | retryable: space can be freed | yes (`PRAGMA max_page_count`) |
//! | an I/O error of the operating system (a failed read, write or sync) | `SQLITE_IOERR` (10) and its extended codes | retryable; a `COMMIT` that fails this way may or may not have reached the disk, and the retry learns which (replay or execute) | yes (a write past `ulimit -f`: `SQLITE_IOERR_WRITE`) |
//! | out of memory, interrupted, aborted, WAL lock protocol race, schema changed | `SQLITE_NOMEM` (7), `SQLITE_INTERRUPT` (9), `SQLITE_ABORT` (4), `SQLITE_PROTOCOL` (15), `SQLITE_SCHEMA` (17) | retryable | code table only |
//! | read-only database (`?mode=ro`, `PRAGMA query_only`, a read-only file) | `SQLITE_READONLY` (8) | permanent (500); reads still work | yes (both) |
//! | corrupt database | `SQLITE_CORRUPT` (11) | [`Error::Corrupt`](idem_core::Error::Corrupt) without a key (the damage is in the file), permanent | yes (pages overwritten) |
//! | the file is not a SQLite database | `SQLITE_NOTADB` (26) | permanent | yes |
//! | the path cannot be opened (missing directory, permissions) | `SQLITE_CANTOPEN` (14) | permanent | yes |
//! | missing table, bad SQL | `SQLITE_ERROR` (1) | permanent | yes (table dropped) |
//! | permission, authorization, constraint, too big, misuse, internal | `SQLITE_PERM`, `SQLITE_AUTH`, `SQLITE_CONSTRAINT`, `SQLITE_TOOBIG`, `SQLITE_MISUSE`, `SQLITE_INTERNAL` | permanent | code table only |
//! | an error of rusqlite itself (conversion, parameters) outside a record | | permanent | code table only |
//! | a stored record that does not decode (unknown state, token out of range, fingerprint of the wrong length, a column of the wrong type) | | [`Error::Corrupt`](idem_core::Error::Corrupt) naming the key, permanent | yes (`tests/bad_rows.rs`) |
//! | the table was written by a newer schema version | | [`Error::UnknownFormat`](idem_core::Error::UnknownFormat), permanent | yes |
//! | bad options (table name, pool size, busy timeout beyond `i32::MAX` ms), a private in-memory path | | [`Error::Config`](idem_core::Error::Config) | yes |
//! | the transactional operation ended the transaction itself (`COMMIT`, `ROLLBACK`), or returned `Ok` after SQLite rolled it back | | permanent | yes |
//! | no tokio runtime, or the runtime shutting down before the call ran | | [`Error::Config`](idem_core::Error::Config) / retryable | |
//!
//! # Options and set-up
//!
//! [`SqliteOptions`]: the table, the busy timeout (how long a write waits for another
//! process's write lock; default 5 s), the pool size (default 4; writes use one connection
//! at a time, more serve concurrent reads) and [`Synchronous`] (default `FULL`).
//! [`SqliteStore::connect`] / [`SqliteStore::connect_with`] open the pool and migrate.
//! [`SqliteStore::migrate`] is idempotent and safe to run from a fleet of processes at once:
//! when the schema is complete it only reads; otherwise it runs the DDL in one
//! `BEGIN IMMEDIATE` transaction. Switching a fresh file to WAL is retried when processes
//! race on it. The schema version is kept per table in `idem_schema_versions`, never in
//! `PRAGMA user_version`, which belongs to the application's own migrations.
//!
//! `path` may be a file, a `file:` URI (`file:idem.db?mode=ro`), or `:memory:`: an
//! in-memory database of the store's own, which all its connections (and clones) share —
//! a named shared-cache database kept alive by a connection the store holds, served by one
//! connection at a time. Other in-memory or temporary paths (an empty path,
//! `file::memory:`, `mode=memory` URIs) are refused with [`Error::Config`](idem_core::Error::Config): each pooled
//! connection would see a private database of its own.
//!
//! The schema, as [`SqliteStore::migrate`] creates it for the default table (print it for
//! another table with [`SqliteStore::schema_sql`]):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "idem_schema_versions" (
//!     table_name TEXT    NOT NULL PRIMARY KEY,
//!     version    INTEGER NOT NULL
//! ) WITHOUT ROWID;
//! CREATE TABLE IF NOT EXISTS "idem_records" (
//!     scope       TEXT    NOT NULL,
//!     id          TEXT    NOT NULL,
//!     fingerprint BLOB,
//!     state       TEXT    NOT NULL,
//!     token       INTEGER NOT NULL,
//!     lease_until INTEGER,
//!     response    BLOB,
//!     created_at  INTEGER NOT NULL,
//!     updated_at  INTEGER NOT NULL,
//!     expires_at  INTEGER NOT NULL,
//!     PRIMARY KEY (scope, id)
//! ) WITHOUT ROWID;
//! CREATE INDEX IF NOT EXISTS "idem_records_expires_at" ON "idem_records" (expires_at);
//! INSERT INTO "idem_schema_versions" (table_name, version) VALUES ('idem_records', 1)
//!     ON CONFLICT (table_name) DO NOTHING;
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod list;
mod options;
mod pool;
mod sql;
mod store;
mod tx;

pub use options::{SqliteOptions, Synchronous, DEFAULT_TABLE};
pub use rusqlite;
pub use sql::SCHEMA_VERSION;
pub use store::SqliteStore;
pub use tx::{operation, SqliteOperation};
