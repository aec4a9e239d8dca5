//! The statements of one table, built once from a validated name.

use std::sync::Arc;

use crate::options::TableName;

/// A released lease's deadline (`Timestamp::MIN`).
pub(crate) const RELEASED: i64 = i64::MIN;

/// What the claim statement reports in its OK packet's `last_insert_id` when the row
/// existed and could not be claimed (a replay, a live lease, a mismatch). A fresh insert
/// reports 0 (the table has no `AUTO_INCREMENT` column and `LAST_INSERT_ID(expr)` was not
/// called); a reclaim reports `2 * new_token + reclaimed`, which is at least 4.
pub(crate) const NOT_CLAIMED: u64 = 1;

/// The columns a record is read from, in [`idem_core::RecordRow`] order.
const COLUMNS: &str =
    "fingerprint, state, token, lease_until, response, created_at, updated_at, expires_at";

/// The statement text of one table.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) schema: String,
    pub(crate) verify: Arc<str>,
    pub(crate) claim: Arc<str>,
    pub(crate) get: Arc<str>,
    pub(crate) get_locked: Arc<str>,
    pub(crate) finish: Arc<str>,
    pub(crate) extend: Arc<str>,
    pub(crate) release: Arc<str>,
    table: String,
    pub(crate) stats: Arc<str>,
}

impl Sql {
    pub(crate) fn new(table: &TableName) -> Self {
        let t = &table.quoted;
        let fenced = format!(
            "scope = ? AND id = ? AND state = 'in_progress' AND token = ? AND lease_until <> {RELEASED}"
        );
        Sql {
            schema: schema_sql(table),
            verify: VERIFY.into(),
            claim: claim_sql(t).into(),
            get: format!("SELECT {COLUMNS} FROM {t} WHERE scope = ? AND id = ?").into(),
            get_locked: format!("SELECT {COLUMNS} FROM {t} WHERE scope = ? AND id = ? FOR UPDATE")
                .into(),
            finish: format!(
                "UPDATE {t} SET state = ?, response = ?, lease_until = NULL, expires_at = ?, \
                 updated_at = ? WHERE {fenced}"
            )
            .into(),
            extend: format!(
                "UPDATE {t} SET lease_until = ?, expires_at = GREATEST(expires_at, ?), \
                 updated_at = ? WHERE {fenced}"
            )
            .into(),
            release: format!(
                "UPDATE {t} SET lease_until = {RELEASED}, updated_at = ? WHERE {fenced}"
            )
            .into(),
            table: t.clone(),
            stats: format!("SELECT state, COUNT(*) FROM {t} GROUP BY state").into(),
        }
    }
}

impl Sql {
    /// A purge batch, as one multi-statement text query (the numbers are formatted here,
    /// never taken from user text): oldest first through the retention index. Under
    /// REPEATABLE READ the range scan would take next-key locks on the retention index,
    /// including the gap after the last expired record, and block the inserts of fresh
    /// claims whose `expires_at` falls in it (a no-wait transactional claim would then
    /// answer `InProgress` for a key nobody holds). READ COMMITTED locks only the rows
    /// deleted. The isolation level is set for this one transaction; if any statement
    /// fails the caller closes the connection rather than reuse it.
    pub(crate) fn purge(&self, now: i64, batch: u64) -> String {
        let t = &self.table;
        format!(
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; START TRANSACTION; \
             DELETE FROM {t} WHERE expires_at <= {now} ORDER BY expires_at LIMIT {batch}; COMMIT"
        )
    }
}

/// Whether an existing row may be claimed: an in-progress record whose lease ran out (or
/// was released) and whose fingerprint agrees. A row with a corrupt token (below 1) is
/// never claimed: it is read, and reported corrupt. Binds: now, fingerprint, fingerprint.
const CLAIMABLE: &str = "(state = 'in_progress' AND lease_until <= ? AND token > 0 \
     AND (fingerprint IS NULL OR ? IS NULL OR fingerprint = ?))";

/// The claim, one statement. A fresh key inserts token 1. An existing row is locked
/// exclusively by `ON DUPLICATE KEY UPDATE` and judged on its latest committed version:
/// if [`CLAIMABLE`], the token goes up by one and the lease is renewed; otherwise nothing
/// changes. `LAST_INSERT_ID(expr)` reports which happened (see [`NOT_CLAIMED`]).
///
/// The assignments are written so that the answer is the same whether the server
/// evaluates them left to right (MySQL, MariaDB by default: a later assignment sees the
/// earlier ones' new values) or simultaneously (MariaDB's `SIMULTANEOUS_ASSIGNMENT`):
/// `state` never changes, `lease_until` is assigned last, and the fingerprint is only
/// ever set to one that keeps the row claimable.
///
/// Binds: scope, id, fingerprint, lease_until, now, now, expires_at, then
/// [`CLAIMABLE`]'s three before each assignment plus: nothing, now, expires_at,
/// fingerprint, lease_until.
fn claim_sql(t: &str) -> String {
    let c = CLAIMABLE;
    format!(
        "INSERT INTO {t} (scope, id, fingerprint, state, token, lease_until, response, \
                          created_at, updated_at, expires_at)
         VALUES (?, ?, ?, 'in_progress', 1, ?, NULL, ?, ?, ?)
         ON DUPLICATE KEY UPDATE
            token = IF({c}, LAST_INSERT_ID((token + 1) * 2 + (lease_until <> {RELEASED})) DIV 2,
                       IF(LAST_INSERT_ID({NOT_CLAIMED}), token, token)),
            updated_at = IF({c}, ?, updated_at),
            expires_at = IF({c}, GREATEST(expires_at, ?), expires_at),
            fingerprint = IF({c}, COALESCE(fingerprint, ?), fingerprint),
            lease_until = IF({c}, ?, lease_until)"
    )
}

/// The schema for `table`, as [`crate::MySqlStore::migrate`] runs it: one statement, so a
/// table never exists without its index.
///
/// Keys are `VARBINARY`: compared byte for byte, case-sensitive, trailing spaces
/// significant, whatever the server's default character set and collation.
pub(crate) fn schema_sql(table: &TableName) -> String {
    let t = &table.quoted;
    let index = &table.index;
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (
    scope       VARBINARY(255) NOT NULL,
    id          VARBINARY(255) NOT NULL,
    fingerprint VARBINARY(32),
    state       VARCHAR(16) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    token       BIGINT   NOT NULL,
    lease_until BIGINT,
    response    LONGBLOB,
    created_at  BIGINT   NOT NULL,
    updated_at  BIGINT   NOT NULL,
    expires_at  BIGINT   NOT NULL,
    PRIMARY KEY (scope, id),
    KEY {index} (expires_at)
) ENGINE = InnoDB"
    )
}

/// Reads back what `migrate` relies on in an existing table: the engine and the key and
/// fingerprint column types. Binds: database (or NULL for the current one), table, twice.
const VERIFY: &str = "SELECT
    (SELECT ENGINE FROM information_schema.TABLES
      WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?) AS engine,
    (SELECT GROUP_CONCAT(CONCAT(COLUMN_NAME, ' ', COLUMN_TYPE) ORDER BY COLUMN_NAME SEPARATOR ', ')
       FROM information_schema.COLUMNS
      WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?
        AND COLUMN_NAME IN ('fingerprint', 'id', 'scope')) AS columns";

/// What [`VERIFY`] must find.
pub(crate) const EXPECTED_ENGINE: &str = "InnoDB";
/// What [`VERIFY`] must find.
pub(crate) const EXPECTED_COLUMNS: &str =
    "fingerprint varbinary(32), id varbinary(255), scope varbinary(255)";
