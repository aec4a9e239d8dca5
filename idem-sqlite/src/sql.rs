//! The statements of one table, built once from its validated name.

use crate::options::VERSIONS_TABLE;

/// The schema version this crate writes for its table (recorded in
/// `idem_schema_versions`, never in `PRAGMA user_version`, which belongs to the application).
pub const SCHEMA_VERSION: i64 = 1;

/// The statement texts of one store. Each is prepared once per connection and cached.
#[derive(Debug)]
pub(crate) struct Sql {
    /// The table's name (validated: a lowercase identifier, safe to quote).
    pub(crate) table: String,
    /// The DDL [`crate::SqliteStore::migrate`] runs.
    pub(crate) schema: String,
    /// How many of the versions table, the table and its index exist: 3 when the schema
    /// is complete.
    pub(crate) exists: String,
    /// The table's recorded schema version; needs the versions table.
    pub(crate) version: String,
    pub(crate) select: String,
    pub(crate) upsert: String,
    pub(crate) purge: String,
    pub(crate) stats: String,
}

impl Sql {
    pub(crate) fn new(table: &str) -> Self {
        let t = format!("\"{table}\"");
        let index = format!("{table}_expires_at");
        Sql {
            schema: format!(
                "CREATE TABLE IF NOT EXISTS \"{VERSIONS_TABLE}\" (
    table_name TEXT    NOT NULL PRIMARY KEY,
    version    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {t} (
    scope       TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    fingerprint BLOB,
    state       TEXT    NOT NULL,
    token       INTEGER NOT NULL,
    lease_until INTEGER,
    response    BLOB,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (scope, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS \"{index}\" ON {t} (expires_at);
INSERT INTO \"{VERSIONS_TABLE}\" (table_name, version) VALUES ('{table}', {SCHEMA_VERSION})
    ON CONFLICT (table_name) DO NOTHING;
"
            ),
            exists: format!(
                "SELECT COUNT(*) FROM sqlite_schema
                  WHERE (type = 'table' AND name IN ('{VERSIONS_TABLE}', '{table}'))
                     OR (type = 'index' AND name = '{index}')"
            ),
            version: format!(
                "SELECT version FROM \"{VERSIONS_TABLE}\" WHERE table_name = '{table}'"
            ),
            select: format!(
                "SELECT fingerprint, state, token, lease_until, response, created_at, updated_at,
                        expires_at
                   FROM {t} WHERE scope = ?1 AND id = ?2"
            ),
            upsert: format!(
                "INSERT INTO {t} (scope, id, fingerprint, state, token, lease_until, response,
                                  created_at, updated_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT (scope, id) DO UPDATE SET
                    fingerprint = excluded.fingerprint, state = excluded.state,
                    token = excluded.token, lease_until = excluded.lease_until,
                    response = excluded.response, updated_at = excluded.updated_at,
                    expires_at = excluded.expires_at"
            ),
            purge: format!(
                "DELETE FROM {t} WHERE (scope, id) IN
                    (SELECT scope, id FROM {t} WHERE expires_at <= ?1 LIMIT ?2)"
            ),
            stats: format!("SELECT state, COUNT(*) FROM {t} GROUP BY state"),
            table: table.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::DEFAULT_TABLE;

    #[test]
    fn the_crate_docs_show_the_schema_migrate_runs() {
        let docs = include_str!("lib.rs");
        for line in Sql::new(DEFAULT_TABLE).schema.lines() {
            let shown = format!("//! {line}");
            assert!(docs.contains(shown.trim_end()), "not in the docs: {line}");
        }
    }
}
