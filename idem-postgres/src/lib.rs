//! The PostgreSQL store for [idem](https://docs.rs/idem-barrier), on sqlx: strict, durable
//! and transactional.
//!
//! ```no_run
//! use std::sync::Arc;
//! use idem_core::{Barrier, Failure, Key, TxPolicy};
//! use idem_postgres::{operation, sqlx::PgConnection, PgOptions, PgStore};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let options = PgOptions::default().with_table("billing.idem_records")?;
//! let store = PgStore::connect_with("postgres://127.0.0.1/test", options).await?;
//! let barrier = Barrier::new(Arc::new(store));
//! let key = Key::new("merchant-7", "order-1001")?;
//! let op = operation(async |conn: &mut PgConnection| {
//!     sqlx::query("INSERT INTO ledger (order_id, amount) VALUES ('order-1001', 1250)")
//!         .execute(&mut *conn).await.map_err(Failure::Retryable)?;
//!     Ok::<_, Failure<String, sqlx::Error>>(1250)
//! });
//! let response = barrier.transaction(&key, None, TxPolicy::Wait, op).await?;
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! [`PgStore`] declares [`Guarantees::single_node_sql`](idem_core::Guarantees::single_node_sql):
//!
//! | guarantee | how |
//! |---|---|
//! | atomic claim | `begin` is **one statement and one round trip** for a fresh claim, a replay, a mismatch and a live lease: a primary-key read of the row, judged in Rust, that calls the table's claim function (`INSERT … ON CONFLICT (scope, id) DO NOTHING`) only when there is no row. Taking over an expired or released lease is a second statement, `INSERT … ON CONFLICT (scope, id) DO UPDATE … WHERE <lease expired and fingerprints agree>`, which raises the fencing token atomically. The primary key makes every claim atomic |
//! | fenced completion | `complete`, `fail`, `extend`, `release` are one `UPDATE … WHERE token = $n` each: a zombie worker's write matches no row and gets `LeaseLost` |
//! | linearizable | every operation on a key is one statement (or one transaction) on the primary |
//! | transactional | the operation gets `&mut PgConnection` inside the claim's transaction; claim, business writes and outcome commit together. The claim first tries a plain `INSERT … ON CONFLICT DO NOTHING` of a fresh row that already carries the final retention, so the outcome's `UPDATE` in the same transaction touches no indexed column and can be a HOT update; only a key that has a row goes on to `begin`'s statement. A permanent failure rolls the business writes back and commits `Failed`; a retryable error, a panic, a dropped future or a killed process leaves nothing. Duplicates wait and replay ([`TxPolicy::Wait`](idem_core::TxPolicy)) or get `InProgress` within a 1 ms lock timeout (`TxPolicy::NoWait`). With `TxPolicy::Optimistic` the operation runs first and the key is claimed with its outcome just before the commit (`BEGIN`, the operation, one `INSERT … ON CONFLICT DO UPDATE … WHERE <lease expired or released>`, `COMMIT`: one statement fewer); a duplicate waits on the primary key, rolls its own work back and replays, so its operation may run but never commits. An operation that fails because a duplicate committed first (a unique business key) answers the first one's outcome |
//! | durable | once PostgreSQL acknowledges the commit (with the server's `synchronous_commit`) |
//! | survives failover | not claimed: with asynchronous replication a promoted standby may lack the last commits |
//! | shared across processes | yes |
//!
//! `purge` deletes small batches with `FOR UPDATE SKIP LOCKED`, never holding long locks.
//! The table name is configurable ([`PgOptions::with_table`], `schema.table`), validated as
//! identifiers that fit PostgreSQL's 63-byte limit together with every name derived from
//! them, and quoted; temporary schemas are refused ([`TableName`]).
//!
//! # Cancellation
//!
//! Any future of this crate may be dropped at any await point (a client disconnects, a
//! `tokio::time::timeout` fires, a `select!` takes another branch). Every store call owns its
//! pooled connection and runs to its end: the caller's task polls it, and if the caller drops it
//! unfinished, the rest moves onto a tokio task of its own. So a dropped call never interrupts a
//! statement or a transaction halfway, and never hands a connection that is inside a transaction
//! back to the pool. What a dropped call leaves behind:
//!
//! | call dropped | what happens | how a retry learns the outcome |
//! |---|---|---|
//! | `Barrier::transaction` | the transaction runs to its end without the caller: the operation finishes, and claim, business writes and outcome commit together (or roll back together on a retryable error) | a retry with `TxPolicy::Wait` waits on the key's row lock until that transaction ends, then replays its outcome or, if it rolled back, executes; with `TxPolicy::NoWait` it gets `InProgress` while the transaction runs. The key never executes twice. |
//! | `begin` (lease mode) | the claim statement completes; if it acquired the key and the caller is gone, the claim is released at once (no operation can run under a lease nobody received) | the next `begin` acquires at once (a released claim is not a reclaim) or finds the outcome |
//! | `complete` / `fail` | the fenced `UPDATE` still lands | the retry replays the stored outcome |
//! | `release` / `extend` | the `UPDATE` still lands | the retry acquires (`release`) or sees the extended lease |
//! | `get`, `purge`, `stats`, `migrate` | the statement runs to its end | (no state of a key changes except by `purge`, within its contract) |
//! | lease-mode `Barrier::execute` while the operation runs | the claim stays `InProgress` until its lease ends: the store cannot know whether the side effect happened | `begin` answers `InProgress` with the remaining lease as `Retry-After`, then reclaims with a new token; deduplicate the side effect downstream with `LeaseHandle::derive` |
//!
//! A transaction's connection goes back to the pool only after PostgreSQL acknowledged its
//! `COMMIT` or `ROLLBACK`. A panic in the operation rolls the transaction back first (so a
//! retry finds the key free at once), then continues in the caller. If anything else ends it
//! (a failed statement whose rollback also fails, the runtime shutting down), the connection
//! is closed instead: the server rolls the transaction back and frees its claim.
//!
//! # Errors
//!
//! One function classifies every sqlx error ([`Error::Store`](idem_core::Error::Store) with
//! `retryable` set or not); `tests/errors.rs` provokes each row marked *tested* against the
//! real server.
//!
//! | failure | SQLSTATE / sqlx error | class | tested |
//! |---|---|---|---|
//! | serialization failure (`SERIALIZABLE`, `REPEATABLE READ`) | 40001 | retryable | yes (two serializable transactions) |
//! | deadlock | 40P01 | retryable | yes (deferred foreign key checked at commit) |
//! | lock timeout (`lock_timeout`) | 55P03 | retryable; a `TxPolicy::NoWait` claim answers `InProgress` instead | yes |
//! | statement timeout, cancelled query | 57014 | retryable | yes |
//! | idle-in-transaction timeout | 25P03 | retryable (or an I/O error, if the closed socket is seen first) | yes |
//! | terminated backend (`pg_terminate_backend`), server shutting down | 57P01 | retryable (or an I/O error) | yes |
//! | crash of another backend | 57P02 | retryable | code table only |
//! | server starting up | 57P03 | retryable (sqlx retries it while connecting) | code table only |
//! | idle-session timeout | 57P05 | retryable | code table only |
//! | statement completion unknown | 40003 | retryable | code table only |
//! | too many connections | 53300 | retryable; while connecting sqlx retries it until the connect timeout, then a pool timeout | yes (role with `CONNECTION LIMIT 1`) |
//! | insufficient resources, disk full, out of memory | 53000, 53100, 53200 | retryable | code table only |
//! | connection exception | class 08 | retryable | code table only |
//! | connection refused, reset, closed | `sqlx::Error::Io` (refused while connecting: retried until the connect timeout, then a pool timeout) | retryable | yes (a closed port) |
//! | no pooled connection within the connect timeout | `sqlx::Error::PoolTimedOut` | retryable | yes (pool of 1 held) |
//! | closed pool | `sqlx::Error::PoolClosed` | permanent | yes |
//! | missing table or schema | 42P01, 3F000 | permanent | yes |
//! | permission denied | 42501 | permanent | yes |
//! | bad URL or option | `sqlx::Error::Configuration`; [`Error::Config`](idem_core::Error::Config) for names and timeouts | permanent | yes |
//! | any other SQLSTATE or driver error (protocol, TLS, …) | | permanent | |
//! | a stored record that does not decode (unknown state, token out of range, fingerprint of the wrong length, a column of the wrong type) | | [`Error::Corrupt`](idem_core::Error::Corrupt) naming the key, permanent | yes |
//!
//! # Options and set-up
//!
//! [`PgOptions`]: the table, the session's `statement_timeout`, `lock_timeout` and
//! `idle_in_transaction_session_timeout`, the connect timeout and the pool's size.
//! [`PgStore::connect`] / [`PgStore::connect_with`] open a pool and migrate;
//! [`PgStore::from_pool`] uses a pool as it is. [`PgStore::migrate`] is idempotent and safe
//! to run from every process of a fleet at once.
//!
//! The schema, as [`PgStore::migrate`] creates it for the default table (print it for
//! another table with [`PgStore::schema_sql`]):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "idem_records" (
//!     scope       TEXT    NOT NULL,
//!     id          TEXT    NOT NULL,
//!     fingerprint BYTEA,
//!     state       TEXT    NOT NULL,
//!     token       BIGINT  NOT NULL,
//!     lease_until BIGINT,
//!     response    BYTEA,
//!     reclaimed   BOOLEAN NOT NULL DEFAULT false,
//!     created_at  BIGINT  NOT NULL,
//!     updated_at  BIGINT  NOT NULL,
//!     expires_at  BIGINT  NOT NULL,
//!     PRIMARY KEY (scope, id)
//! );
//! CREATE INDEX IF NOT EXISTS "idem_records_expires_at" ON "idem_records" USING brin (expires_at) WITH (autosummarize = on);
//! CREATE OR REPLACE FUNCTION "idem_records_claim"(text, text, bytea, bigint, bigint, bigint) RETURNS boolean
//! LANGUAGE plpgsql VOLATILE AS $claim$
//! BEGIN
//!     INSERT INTO "idem_records" (scope, id, fingerprint, state, token, lease_until, response, reclaimed, created_at, updated_at, expires_at) VALUES ($1, $2, $3, 'in_progress', 1, $4, NULL, false, $5, $5, $6) ON CONFLICT (scope, id) DO NOTHING;
//!     RETURN FOUND;
//! END
//! $claim$;
//! ```
//!
//! The claim function is what lets lease-mode `begin` be one statement that costs a
//! primary-key read when the key has a row (a replay, a mismatch, a live lease): the
//! statement reads the row and calls the function, which inserts a fresh claim, only when
//! there is none. A PostgreSQL function body is planned when it is first called, so a replay
//! never pays for an insert's set-up (docs/performance.md has the measurements). The
//! function runs with the caller's rights (it is not `SECURITY DEFINER`). A table made by an
//! earlier version gets its function from [`PgStore::migrate`]; until then `begin` fails
//! with a permanent "function does not exist" error.
//!
//! The retention index is BRIN, not B-tree: `purge` only needs the ranges of the table
//! whose rows have expired, and rows are written in roughly `expires_at` order, so a few
//! bytes per range of pages serve it, where a B-tree would add an index entry to every
//! claim and every lease-mode completion (docs/performance.md has the measurements).
//! Tables created by earlier versions keep their B-tree index, which works the same; to
//! switch, `DROP INDEX` it and run [`PgStore::migrate`].
//!
//! Timestamps are milliseconds since the Unix epoch from the barrier's clock, so tests can
//! jump 26 hours; a released lease has `lease_until = -9223372036854775808`.
#![deny(missing_docs)]

#[cfg(feature = "conformance")]
pub mod conformance;
mod error;
mod list;
mod options;
mod sql;
mod store;
mod tx;

pub use options::{PgOptions, TableName, DEFAULT_TABLE};
pub use store::PgStore;
pub use tx::{operation, PgOperation};

pub use sqlx;
