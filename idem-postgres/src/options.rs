//! [`PgOptions`]: the table, the session timeouts and the pool settings; [`TableName`].

use std::time::Duration;

use idem_core::Error;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The default table.
pub const DEFAULT_TABLE: &str = "idem_records";

/// The suffix of the retention index's name (`<table>_expires_at`).
const INDEX_SUFFIX: &str = "_expires_at";

/// The suffix of the claim function's name (`<table>_claim`).
const CLAIM_SUFFIX: &str = "_claim";

/// The claim function's argument types: scope, id, fingerprint, lease deadline, now,
/// retention deadline.
pub(crate) const CLAIM_ARGUMENTS: &str = "text, text, bytea, bigint, bigint, bigint";

// The table part's limit is set by the longest derived name, the index's.
const _: () = assert!(CLAIM_SUFFIX.len() <= INDEX_SUFFIX.len());

/// PostgreSQL's identifier limit (`NAMEDATALEN - 1`): longer names are silently truncated.
const MAX_IDENTIFIER: usize = 63;

/// A validated table name: `table` or `schema.table`, each part a lowercase SQL identifier
/// (`[a-z_][a-z0-9_]*`).
///
/// Every name PostgreSQL derives from it must fit its 63-byte identifier limit (names beyond it are
/// truncated silently, so two tables could share an index name): the table part is at most 52
/// bytes, because its index is `<table>_expires_at` (the primary key's `<table>_pkey` and the claim
/// function's `<table>_claim` are shorter). The schema part is at most 63 bytes and may not be a
/// system schema: `pg_temp…` schemas are refused because each pooled connection has its own, so a
/// claim made on one connection would be invisible to the others; other `pg_…` schemas and
/// `information_schema` belong to the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    table: String,
}

impl TableName {
    /// Validates `name`; anything else is [`Error::Config`] saying what is wrong.
    ///
    /// ```
    /// use idem_postgres::TableName;
    /// assert!(TableName::new("billing.idem_records").is_ok());
    /// assert!(TableName::new("idem; DROP TABLE users").is_err());
    /// assert!(TableName::new("a.b.c").is_err());
    /// assert!(TableName::new("pg_temp.idem_records").is_err());
    /// assert!(TableName::new(&"t".repeat(53)).is_err(), "its index name would be 64 bytes");
    /// ```
    pub fn new(name: &str) -> Result<Self, Error> {
        let bad = |why: String| Err(Error::Config(format!("table name {name:?}: {why}")));
        let (schema, table) = match name.split('.').collect::<Vec<_>>()[..] {
            [table] => (None, table),
            [schema, table] => (Some(schema), table),
            _ => return bad("expected `table` or `schema.table`".into()),
        };
        for part in schema.iter().chain([&table]) {
            if !is_identifier(part) {
                return bad(format!(
                    "{part:?} is not a lowercase SQL identifier ([a-z_][a-z0-9_]*)"
                ));
            }
        }
        if table.len() + INDEX_SUFFIX.len() > MAX_IDENTIFIER {
            return bad(format!(
                "the table part is {} bytes; at most {} fit, because its index \
                 `<table>{INDEX_SUFFIX}` must stay within PostgreSQL's {MAX_IDENTIFIER}-byte \
                 identifier limit",
                table.len(),
                MAX_IDENTIFIER - INDEX_SUFFIX.len()
            ));
        }
        if let Some(schema) = schema {
            if schema.len() > MAX_IDENTIFIER {
                return bad(format!(
                    "the schema is {} bytes; PostgreSQL identifiers have at most {MAX_IDENTIFIER}",
                    schema.len()
                ));
            }
            if schema.starts_with("pg_temp") {
                return bad(format!(
                    "{schema:?} is a temporary schema: each pooled connection has its own, so \
                     a claim made on one connection would be invisible to the others"
                ));
            }
            if schema.starts_with("pg_") || schema == "information_schema" {
                return bad(format!("{schema:?} is a system schema"));
            }
        }
        Ok(TableName {
            schema: schema.map(str::to_string),
            table: table.to_string(),
        })
    }

    /// The quoted name, safe to put in SQL (`"billing"."idem_records"`).
    pub fn quoted(&self) -> String {
        self.qualify(&self.table)
    }

    /// The quoted name of the retention index (in the table's schema).
    pub(crate) fn quoted_index(&self) -> String {
        self.qualify(&format!("{}{INDEX_SUFFIX}", self.table))
    }

    /// The unqualified, quoted index name, as `CREATE INDEX` takes it.
    pub(crate) fn index_identifier(&self) -> String {
        format!("\"{}{INDEX_SUFFIX}\"", self.table)
    }

    /// The quoted name of the claim function (in the table's schema).
    pub(crate) fn quoted_claim_function(&self) -> String {
        self.qualify(&format!("{}{CLAIM_SUFFIX}", self.table))
    }

    fn qualify(&self, name: &str) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{name}\""),
            None => format!("\"{name}\""),
        }
    }
}

fn is_identifier(part: &str) -> bool {
    let mut chars = part.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_lowercase())
        && chars.all(|c| c == '_' || c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// How a [`PgStore`](crate::PgStore) is set up: its table, and for the pool that
/// [`PgStore::connect_with`](crate::PgStore::connect_with) opens, the session timeouts and
/// the pool's size.
///
/// Unset timeouts keep the server's settings; unset pool settings keep sqlx's defaults
/// (10 connections, none kept open, a 30 s connect timeout). A pool handed to
/// [`PgStore::from_pool`](crate::PgStore::from_pool) is used as it is: options that would
/// configure it are refused there with [`Error::Config`] rather than ignored.
///
/// ```
/// use std::time::Duration;
/// use idem_postgres::PgOptions;
/// let options = PgOptions::default()
///     .with_table("billing.idem_records")?
///     .with_statement_timeout(Duration::from_secs(5))
///     .with_lock_timeout(Duration::from_secs(2))
///     .with_max_connections(32);
/// assert_eq!(options.table().quoted(), "\"billing\".\"idem_records\"");
/// # Ok::<(), idem_core::Error>(())
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PgOptions {
    table: TableName,
    statement_timeout: Option<Duration>,
    lock_timeout: Option<Duration>,
    idle_in_transaction_timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    max_connections: Option<u32>,
    min_connections: Option<u32>,
}

impl Default for PgOptions {
    /// The table [`DEFAULT_TABLE`]; server timeouts; sqlx's pool defaults.
    fn default() -> Self {
        PgOptions {
            table: TableName {
                schema: None,
                table: DEFAULT_TABLE.to_string(),
            },
            statement_timeout: None,
            lock_timeout: None,
            idle_in_transaction_timeout: None,
            connect_timeout: None,
            max_connections: None,
            min_connections: None,
        }
    }
}

impl PgOptions {
    /// Uses `table` (`table` or `schema.table`, validated by [`TableName::new`]).
    pub fn with_table(mut self, table: &str) -> Result<Self, Error> {
        self.table = TableName::new(table)?;
        Ok(self)
    }

    /// Sets the session's `statement_timeout`: a statement running longer is cancelled
    /// with SQLSTATE 57014, a retryable error. It applies to the operation's statements in
    /// transactional mode too, and bounds how long a `TxPolicy::Wait` duplicate waits.
    /// At least 1 ms (PostgreSQL reads 0 as "no timeout").
    pub fn with_statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// Sets the session's `lock_timeout`: waiting longer for a lock fails with SQLSTATE
    /// 55P03, a retryable error. At least 1 ms.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = Some(timeout);
        self
    }

    /// Sets the session's `idle_in_transaction_session_timeout`: a transactional operation
    /// that leaves its transaction idle longer (waiting on something outside the database)
    /// has its session ended by the server (SQLSTATE 25P03, retryable), which rolls the
    /// transaction back and frees its claim. At least 1 ms.
    pub fn with_idle_in_transaction_timeout(mut self, timeout: Duration) -> Self {
        self.idle_in_transaction_timeout = Some(timeout);
        self
    }

    /// Bounds how long opening the pool, and each wait for a pooled connection, may take
    /// (sqlx's `acquire_timeout`; it covers connecting, which sqlx retries while the server
    /// refuses connections or has too many). Past it: a retryable pool timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// The most connections the pool opens.
    pub fn with_max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// How many connections the pool keeps open when idle.
    pub fn with_min_connections(mut self, n: u32) -> Self {
        self.min_connections = Some(n);
        self
    }

    /// The table.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// Refuses settings that only a pool this crate opens can honour (for `from_pool`).
    pub(crate) fn check_no_pool_settings(&self) -> Result<(), Error> {
        let set: Vec<&str> = [
            ("statement timeout", self.statement_timeout.is_some()),
            ("lock timeout", self.lock_timeout.is_some()),
            (
                "idle-in-transaction timeout",
                self.idle_in_transaction_timeout.is_some(),
            ),
            ("connect timeout", self.connect_timeout.is_some()),
            ("max connections", self.max_connections.is_some()),
            ("min connections", self.min_connections.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, is_set)| is_set.then_some(name))
        .collect();
        if set.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "PgStore::from_pool uses the pool as it is, so it cannot apply: {}; set them on \
                 the pool's PgConnectOptions/PgPoolOptions, or use PgStore::connect_with",
                set.join(", ")
            )))
        }
    }

    /// `connect`'s options with the session timeouts added as startup parameters.
    pub(crate) fn connect_options(
        &self,
        mut connect: PgConnectOptions,
    ) -> Result<PgConnectOptions, Error> {
        let settings = [
            ("statement_timeout", self.statement_timeout),
            ("lock_timeout", self.lock_timeout),
            (
                "idle_in_transaction_session_timeout",
                self.idle_in_transaction_timeout,
            ),
        ];
        for (name, timeout) in settings {
            if let Some(timeout) = timeout {
                connect = connect.options([(name, milliseconds(name, timeout)?)]);
            }
        }
        Ok(connect)
    }

    /// The pool settings, over sqlx's defaults.
    pub(crate) fn pool_options(&self) -> PgPoolOptions {
        let mut pool = PgPoolOptions::new();
        if let Some(n) = self.max_connections {
            pool = pool.max_connections(n);
        }
        if let Some(n) = self.min_connections {
            pool = pool.min_connections(n);
        }
        if let Some(timeout) = self.connect_timeout {
            pool = pool.acquire_timeout(timeout);
        }
        pool
    }
}

/// A timeout as the whole milliseconds PostgreSQL takes (1 ms up to `i32::MAX` ms).
fn milliseconds(name: &str, timeout: Duration) -> Result<u128, Error> {
    let ms = timeout.as_millis();
    if (1..=i32::MAX as u128).contains(&ms) {
        Ok(ms)
    } else {
        Err(Error::Config(format!(
            "{name} is {timeout:?}; PostgreSQL takes 1 ms to {} ms (0 would mean no timeout)",
            i32::MAX
        )))
    }
}
