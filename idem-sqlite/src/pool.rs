//! The store's connections, and how a call runs on one: on tokio's blocking pool, to its end,
//! whatever happens to the caller's future.
//!
//! A call waits (asynchronously, in FIFO order) for a connection slot; then a blocking task
//! takes, if the call writes, the store's write gate, takes a connection, runs the call's
//! work, puts the connection back, frees the gate and the slot, and only then hands the
//! output to the caller. Dropping the caller's future while it waits for a slot leaves
//! nothing behind; once the blocking task runs, it runs to its end (a blocking task cannot be
//! interrupted) and its output goes to the call's *orphan* handler instead of the caller.

use std::panic;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use idem_core::backend::detach::detached;
use idem_core::{Error, NO_WAIT_RETRY_AFTER};
use rusqlite::Connection;
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{is_busy, map_err};
use crate::options::{SqliteOptions, Synchronous};

/// What a call needs besides a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Nothing: reads, and the application's own [`crate::SqliteStore::with_connection`].
    Read,
    /// The store's write gate, waiting for it.
    Write,
    /// The store's write gate if it is free at once; otherwise [`Error::InProgress`].
    TryWrite,
}

/// The store's connections. Cloning shares them.
#[derive(Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    /// What each connection opens: the caller's path, or the store's own shared in-memory
    /// database.
    target: PathBuf,
    busy_timeout: Duration,
    synchronous: Synchronous,
    memory: bool,
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection the pool may have open.
    slots: Arc<Semaphore>,
    /// SQLite has one writer per database: the store's writes wait for each other here (a
    /// blocked thread is woken as soon as the gate is free) instead of polling SQLite's write
    /// lock in its busy handler, which sleeps up to 100 ms between tries, favours newcomers,
    /// and under load let some writes starve past the busy timeout. The gate is taken on
    /// the blocking thread, so that handing it on costs one wake-up, not a task's scheduling.
    writer: Mutex<()>,
    /// For `:memory:`: a connection that keeps the shared in-memory database alive while the
    /// pool replaces its working connection.
    _anchor: Option<Mutex<Connection>>,
}

impl Pool {
    /// Opens the pool's first connection to `path` (on the blocking pool) and keeps it.
    ///
    /// `:memory:` becomes an in-memory database of this pool's own, shared by its
    /// connections (a named database with a shared cache, kept alive by an anchor
    /// connection) and served by one connection at a time. Any other path that opens an
    /// in-memory or temporary database (an empty path, a `mode=memory` URI) is refused: each
    /// of the pool's connections would see a database of its own.
    pub(crate) async fn open(path: &Path, options: &SqliteOptions) -> Result<Pool, Error> {
        let runtime = runtime()?;
        let (path, options) = (path.to_path_buf(), options.clone());
        blocking(&runtime, move || Pool::open_blocking(path, &options)).await
    }

    fn open_blocking(path: PathBuf, options: &SqliteOptions) -> Result<Pool, Error> {
        let memory = path.as_os_str() == ":memory:";
        let target = if memory {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            PathBuf::from(format!(
                "file:idem-memory-{}-{stamp}-{}?mode=memory&cache=shared",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ))
        } else {
            path
        };
        let mut shared = Shared {
            target,
            busy_timeout: options.busy_timeout,
            synchronous: options.synchronous,
            memory,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(if memory {
                1
            } else {
                options.max_connections
            })),
            writer: Mutex::new(()),
            _anchor: None,
        };
        let first = shared.open_connection()?;
        if memory {
            shared._anchor = Some(Mutex::new(shared.open_connection()?));
        } else if first.path().is_none_or(str::is_empty) {
            return Err(Error::Config(format!(
                "{} opens an in-memory or temporary SQLite database, which is private to one \
                 connection, while SqliteStore pools connections: each would see a database \
                 of its own. Use a file, or \":memory:\" (an in-memory database the store \
                 shares between its connections)",
                shared.target.display()
            )));
        }
        shared.put(first);
        Ok(Pool {
            shared: Arc::new(shared),
        })
    }

    /// Whether the database is the pool's own in-memory database.
    pub(crate) fn is_memory(&self) -> bool {
        self.shared.memory
    }

    /// Runs `work` on one of the pool's connections on the blocking pool.
    ///
    /// If the caller's future is dropped after the work started, the work still runs to its
    /// end; a successful output nobody received goes to `orphan` (with the runtime to spawn
    /// clean-up on), exactly once (see [`idem_core::backend::detach`]). A panic in `work` resumes in the caller (the connection
    /// it held is closed, never reused).
    pub(crate) async fn run<T, W, O>(&self, gate: Gate, work: W, orphan: O) -> Result<T, Error>
    where
        T: Send + 'static,
        W: FnOnce(&mut Connection) -> Result<T, Error> + Send + 'static,
        O: Fn(T, &Handle) + Clone + Send + 'static,
    {
        // `TryWrite` answers at once while the gate is taken, without waiting for a
        // connection first (and checks again once it has one).
        if gate == Gate::TryWrite
            && matches!(self.shared.writer.try_lock(), Err(TryLockError::WouldBlock))
        {
            return Err(in_progress());
        }
        let runtime = runtime()?;
        let slot = acquire(&self.shared.slots).await?;
        let shared = Arc::clone(&self.shared);
        let work = move || {
            let output = shared.with_connection(gate, work);
            // The connection is back in the pool (or closed) before anyone learns the output.
            drop((slot, shared));
            output
        };
        detached(async move { blocking(&runtime, work).await }, orphan).await
    }
}

impl Shared {
    fn with_connection<T>(
        &self,
        gate: Gate,
        work: impl FnOnce(&mut Connection) -> Result<T, Error>,
    ) -> Result<T, Error> {
        // A panic while holding the gate poisons it; the gate guards no data, so go on.
        let _writing = match gate {
            Gate::Read => None,
            Gate::Write => Some(self.writer.lock().unwrap_or_else(|p| p.into_inner())),
            Gate::TryWrite => match self.writer.try_lock() {
                Ok(guard) => Some(guard),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => return Err(in_progress()),
            },
        };
        let taken = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match taken {
            Some(conn) => conn,
            None => self.open_connection()?,
        };
        let output = work(&mut conn);
        self.put(conn);
        output
    }

    /// Keeps `conn` for the next call, unless it is still inside a transaction (a rollback
    /// that failed, or an application's `with_connection` that left one open): then it is
    /// closed, which rolls the transaction back.
    fn put(&self, conn: Connection) {
        if conn.is_autocommit() {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
        }
    }

    fn open_connection(&self) -> Result<Connection, Error> {
        let conn = Connection::open(&self.target).map_err(map_err)?;
        conn.busy_timeout(self.busy_timeout).map_err(map_err)?;
        if !self.memory {
            self.use_wal(&conn)?;
        }
        conn.pragma_update(None, "synchronous", self.synchronous.pragma())
            .map_err(map_err)?;
        Ok(conn)
    }
}

impl Shared {
    /// Switches the database to WAL (a no-op read when it is in WAL already, the usual
    /// case). Connections of several processes switching a fresh file at once can get
    /// `SQLITE_BUSY` without SQLite waiting (it would deadlock: each holds a read lock and
    /// wants the exclusive one), so this waits and tries again, up to the busy timeout.
    fn use_wal(&self, conn: &Connection) -> Result<(), Error> {
        let deadline = Instant::now() + self.busy_timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            let mode = conn
                .query_row("PRAGMA journal_mode", [], |r| r.get::<_, String>(0))
                .and_then(|mode| {
                    if mode.eq_ignore_ascii_case("wal") {
                        Ok(mode)
                    } else {
                        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                    }
                });
            match mode {
                Ok(_) => return Ok(()),
                Err(e) if is_busy(&e) && Instant::now() < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(e) => return Err(map_err(e)),
            }
        }
    }
}

/// The answer of a `TryWrite` call while another write holds the gate.
fn in_progress() -> Error {
    Error::InProgress {
        retry_after: NO_WAIT_RETRY_AFTER,
    }
}

/// Runs `work` on the blocking pool of `runtime`; a panic in it resumes here.
async fn blocking<T: Send + 'static>(
    runtime: &Handle,
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    match runtime.spawn_blocking(work).await {
        Ok(output) => output,
        Err(e) if e.is_panic() => panic::resume_unwind(e.into_panic()),
        Err(_) => Err(Error::retryable(
            "the blocking task of the SQLite call did not run (the runtime is shutting down)",
        )),
    }
}

fn runtime() -> Result<Handle, Error> {
    Handle::try_current().map_err(|e| {
        Error::Config(format!(
            "idem-sqlite runs its calls on tokio's blocking pool: {e}"
        ))
    })
}

async fn acquire(semaphore: &Arc<Semaphore>) -> Result<OwnedSemaphorePermit, Error> {
    Arc::clone(semaphore)
        .acquire_owned()
        .await
        .map_err(Error::permanent)
}
