//! [`SqliteOptions`]: the table, the busy timeout, the pool size and the durability of commits.

use std::time::Duration;

use idem_core::Error;

/// The default table.
pub const DEFAULT_TABLE: &str = "idem_records";

/// The table in which [`crate::SqliteStore::migrate`] records each idem table's schema
/// version; it cannot be used as the store's own table.
pub(crate) const VERSIONS_TABLE: &str = "idem_schema_versions";

/// The longest table name accepted (the same limit as PostgreSQL's, so that a name works on
/// every SQL backend; SQLite itself has none).
const MAX_TABLE: usize = 63;

/// How hard SQLite makes each commit durable (`PRAGMA synchronous`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Synchronous {
    /// `FULL`: the WAL is synced on every commit; an acknowledged commit survives a power
    /// loss. The default, and what [`idem_core::Guarantees::durable`] is reported for.
    #[default]
    Full,
    /// `EXTRA`: `FULL`, and the directory is synced too when the journal is deleted.
    Extra,
    /// `NORMAL`: in WAL mode, commits are synced at checkpoints only. A crash of the
    /// application loses nothing, but a power loss or an operating-system crash may roll
    /// back the last acknowledged commits — a key whose outcome was acknowledged could then
    /// execute again. The store reports itself as not durable.
    Normal,
}

impl Synchronous {
    /// The pragma's value.
    pub(crate) fn pragma(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Extra => "EXTRA",
            Synchronous::Normal => "NORMAL",
        }
    }

    /// Whether an acknowledged commit survives a power loss.
    pub(crate) fn durable(self) -> bool {
        self != Synchronous::Normal
    }
}

/// How a [`SqliteStore`](crate::SqliteStore) is set up.
///
/// The table is one lowercase SQL identifier in the database file itself. SQLite's only
/// schemas are attached databases (`ATTACH … AS billing`), which exist per connection: the
/// store's pool opens its own connections, which would not have the attachment, so
/// `schema.table` names are refused. To keep idem's records apart from other data, give the
/// store a table name of its own, or a file of its own.
///
/// ```
/// use std::time::Duration;
/// use idem_sqlite::{SqliteOptions, Synchronous};
/// let options = SqliteOptions::default()
///     .with_table("billing_idem")?
///     .with_busy_timeout(Duration::from_secs(2))
///     .with_max_connections(8)
///     .with_synchronous(Synchronous::Full);
/// assert_eq!(options.table(), "billing_idem");
/// assert!(SqliteOptions::default().with_table("main.idem_records").is_err());
/// assert!(SqliteOptions::default().with_table("Idem; DROP TABLE users").is_err());
/// # Ok::<(), idem_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SqliteOptions {
    pub(crate) table: String,
    pub(crate) busy_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) synchronous: Synchronous,
}

impl Default for SqliteOptions {
    /// The table [`DEFAULT_TABLE`], a 5 s busy timeout, 4 connections, `synchronous = FULL`.
    fn default() -> Self {
        SqliteOptions {
            table: DEFAULT_TABLE.to_string(),
            busy_timeout: Duration::from_secs(5),
            max_connections: 4,
            synchronous: Synchronous::Full,
        }
    }
}

impl SqliteOptions {
    /// Uses `table`: a lowercase SQL identifier (`[a-z_][a-z0-9_]*`, at most 63 bytes), not
    /// `schema.table` (see above), not starting with `sqlite_` (reserved by SQLite) and not
    /// `idem_schema_versions` (where idem records schema versions). Anything else is
    /// [`Error::Config`] saying what is wrong.
    pub fn with_table(mut self, table: &str) -> Result<Self, Error> {
        validate_table(table)?;
        self.table = table.to_string();
        Ok(self)
    }

    /// How long a write waits for the database's write lock while another process (or
    /// another store on the same file) holds it; past it the call fails with a retryable
    /// `SQLITE_BUSY` error. Writers of one store wait for each other instead, without a
    /// limit: first for a connection (a call dropped there leaves no trace), then, on the
    /// blocking pool, for the store's write gate (a call dropped there still runs when its
    /// turn comes). At most `i32::MAX` milliseconds. Default 5 s.
    pub fn with_busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How many connections the store opens at most (at least 1; default 4). Writes use
    /// one at a time — SQLite has one writer — so more connections serve more concurrent
    /// reads (`get`, `stats`, [`SqliteStore::with_connection`](crate::SqliteStore::with_connection)).
    /// An in-memory store (`:memory:`) always uses one.
    pub fn with_max_connections(mut self, n: usize) -> Self {
        self.max_connections = n;
        self
    }

    /// How durable a commit is (`PRAGMA synchronous`). Default [`Synchronous::Full`].
    pub fn with_synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// The table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The busy timeout.
    pub fn busy_timeout(&self) -> Duration {
        self.busy_timeout
    }

    /// The most connections the store opens.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// The durability of commits.
    pub fn synchronous(&self) -> Synchronous {
        self.synchronous
    }

    /// Checks the values the builders cannot check on their own.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        validate_table(&self.table)?;
        if self.max_connections == 0 {
            return Err(Error::Config(
                "SQLite max_connections must be at least 1".into(),
            ));
        }
        if self.busy_timeout.as_millis() > i32::MAX as u128 {
            return Err(Error::Config(format!(
                "SQLite busy timeout {:?} is longer than SQLite's limit of {} ms",
                self.busy_timeout,
                i32::MAX
            )));
        }
        Ok(())
    }
}

fn validate_table(name: &str) -> Result<(), Error> {
    let bad = |why: &str| Err(Error::Config(format!("SQLite table name {name:?}: {why}")));
    if name.contains('.') {
        return bad(
            "`schema.table` is not supported: SQLite's schemas are attached databases, which \
             exist per connection, and the store's pool opens its own connections; use a table \
             name of its own or a database file of its own",
        );
    }
    let mut chars = name.chars();
    let identifier = matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_lowercase())
        && chars.all(|c| c == '_' || c.is_ascii_lowercase() || c.is_ascii_digit());
    if !identifier {
        return bad("not a lowercase SQL identifier ([a-z_][a-z0-9_]*)");
    }
    if name.len() > MAX_TABLE {
        return bad("longer than 63 bytes");
    }
    if name.starts_with("sqlite_") {
        return bad("names starting with `sqlite_` are reserved by SQLite");
    }
    if name == VERSIONS_TABLE {
        return bad("idem keeps its schema versions in that table");
    }
    Ok(())
}
