//! [`MySqlOptions`]: the table a store uses and the pool it builds.

use std::time::Duration;

use idem_core::Error;

/// The default table.
pub const DEFAULT_TABLE: &str = "idem_records";

/// The default of [`MySqlOptions::with_max_outcome_bytes`]: 15 MiB, below MariaDB's
/// default `max_allowed_packet` of 16 MiB with room for the rest of the statement.
pub const DEFAULT_MAX_OUTCOME_BYTES: usize = 15 * 1024 * 1024;

/// The longest identifier MySQL and MariaDB accept (tables, databases, indexes).
const MAX_IDENTIFIER: usize = 64;

/// Suffix of the retention index's name, derived from the table's.
pub(crate) const INDEX_SUFFIX: &str = "_expires_at";

/// Databases a store must never write into.
const SYSTEM_DATABASES: [&str; 4] = ["mysql", "information_schema", "performance_schema", "sys"];

/// Options of a [`crate::MySqlStore`]: the table, and the pool that
/// [`crate::MySqlStore::connect_with`] builds (a store made with
/// [`crate::MySqlStore::from_pool`] uses the caller's pool as it is).
///
/// ```
/// use std::time::Duration;
/// use idem_mysql::MySqlOptions;
/// let options = MySqlOptions::default()
///     .with_table("billing.idem_records")?
///     .with_max_connections(32)
///     .with_acquire_timeout(Duration::from_secs(5));
/// assert_eq!(options.table(), "billing.idem_records");
/// assert!(MySqlOptions::default().with_table("Idem; DROP TABLE users").is_err());
/// # Ok::<(), idem_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MySqlOptions {
    table: TableName,
    max_connections: u32,
    acquire_timeout: Duration,
    max_outcome_bytes: usize,
}

impl Default for MySqlOptions {
    /// Table [`DEFAULT_TABLE`] in the connection's database, 10 connections, 30 s to
    /// acquire one, outcomes up to [`DEFAULT_MAX_OUTCOME_BYTES`].
    fn default() -> Self {
        MySqlOptions {
            table: TableName::new(DEFAULT_TABLE)
                .unwrap_or_else(|_| unreachable!("the default table name is valid")),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(30),
            max_outcome_bytes: DEFAULT_MAX_OUTCOME_BYTES,
        }
    }
}

impl MySqlOptions {
    /// Uses `table`: `table` or `database.table`, each part a lowercase identifier
    /// (`[a-z_][a-z0-9_]*`), at most 64 bytes including the retention index's name
    /// (`<table>_expires_at`), never in a system database (`mysql`, `sys`,
    /// `information_schema`, `performance_schema`). Anything else is [`Error::Config`].
    /// Lowercase only, so the name means the same table whatever the server's
    /// `lower_case_table_names`.
    pub fn with_table(mut self, table: &str) -> Result<Self, Error> {
        self.table = TableName::new(table)?;
        Ok(self)
    }

    /// How many connections the pool built by `connect_with` opens at most. Default 10.
    pub fn with_max_connections(mut self, max_connections: u32) -> Self {
        self.max_connections = max_connections.max(1);
        self
    }

    /// How long a call waits for a free pooled connection before it fails with a retryable
    /// store error. Default 30 s.
    pub fn with_acquire_timeout(mut self, acquire_timeout: Duration) -> Self {
        self.acquire_timeout = acquire_timeout;
        self
    }

    /// The largest outcome `complete` and `fail` store. A larger one is refused before it
    /// is sent with [`Error::TooLarge`] (permanent; in transactional mode everything is
    /// rolled back). The server refuses any statement over its `max_allowed_packet`
    /// (MariaDB's default 16 MiB, MySQL 8's 64 MiB), and drops the connection while doing
    /// so; keep this limit about 1 KiB below it. Default [`DEFAULT_MAX_OUTCOME_BYTES`].
    pub fn with_max_outcome_bytes(mut self, max_outcome_bytes: usize) -> Self {
        self.max_outcome_bytes = max_outcome_bytes;
        self
    }

    /// The table, as given.
    pub fn table(&self) -> &str {
        &self.table.name
    }

    /// The pool's connection limit.
    pub fn max_connections(&self) -> u32 {
        self.max_connections
    }

    /// The pool's acquire timeout.
    pub fn acquire_timeout(&self) -> Duration {
        self.acquire_timeout
    }

    /// The largest outcome stored.
    pub fn max_outcome_bytes(&self) -> usize {
        self.max_outcome_bytes
    }

    pub(crate) fn table_name(&self) -> &TableName {
        &self.table
    }
}

/// A validated table name and the names derived from it, quoted for SQL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TableName {
    /// As given: `table` or `database.table`.
    pub(crate) name: String,
    /// The database, if the name has one (otherwise the connection's current database).
    pub(crate) database: Option<String>,
    /// The table's own name, without the database.
    pub(crate) bare: String,
    /// Quoted, safe to put in SQL: `` `table` `` or `` `database`.`table` ``.
    pub(crate) quoted: String,
    /// The retention index's name, quoted.
    pub(crate) index: String,
}

impl TableName {
    fn new(name: &str) -> Result<Self, Error> {
        let refuse = |why: &str| Err(Error::Config(format!("table name {name:?}: {why}")));
        let parts: Vec<&str> = name.split('.').collect();
        let identifier = |p: &str| {
            let mut chars = p.chars();
            matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_lowercase())
                && chars.all(|c| c == '_' || c.is_ascii_lowercase() || c.is_ascii_digit())
        };
        if parts.len() > 2 || !parts.iter().all(|p| identifier(p)) {
            return refuse(
                "expected `table` or `database.table` of lowercase identifiers ([a-z_][a-z0-9_]*)",
            );
        }
        let (database, table) = match parts[..] {
            [table] => (None, table),
            [database, table] => (Some(database), table),
            _ => unreachable!("one or two parts"),
        };
        if let Some(db) = database {
            if db.len() > MAX_IDENTIFIER {
                return refuse("the database name is longer than 64 bytes");
            }
            if SYSTEM_DATABASES.contains(&db) {
                return refuse("a system database cannot hold idempotency records");
            }
        }
        if table.len() + INDEX_SUFFIX.len() > MAX_IDENTIFIER {
            return refuse(&format!(
                "the table name is longer than {} bytes (its index `<table>{INDEX_SUFFIX}` \
                 must fit in 64)",
                MAX_IDENTIFIER - INDEX_SUFFIX.len()
            ));
        }
        let quoted = parts
            .iter()
            .map(|p| format!("`{p}`"))
            .collect::<Vec<_>>()
            .join(".");
        Ok(TableName {
            name: name.to_string(),
            database: database.map(str::to_string),
            bare: table.to_string(),
            quoted,
            index: format!("`{table}{INDEX_SUFFIX}`"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_with_their_derived_index() {
        for bad in [
            "",
            "Idem",
            "idem-records",
            "a.b.c",
            "a.",
            ".a",
            "1abc",
            "x; DROP TABLE y",
            "`x`",
            "mysql.idem",
            "information_schema.idem",
            &"a".repeat(54),
            &format!("{}.t", "d".repeat(65)),
        ] {
            assert!(
                matches!(
                    MySqlOptions::default().with_table(bad),
                    Err(Error::Config(_))
                ),
                "{bad:?} was accepted"
            );
        }
        let longest = "a".repeat(53);
        let t = TableName::new(&format!("{}.{longest}", "d".repeat(64))).unwrap();
        assert_eq!(t.index, format!("`{longest}_expires_at`"));
        let t = TableName::new("billing.idem_records").unwrap();
        assert_eq!(t.quoted, "`billing`.`idem_records`");
        assert_eq!(t.database.as_deref(), Some("billing"));
        assert_eq!(t.bare, "idem_records");
    }
}
