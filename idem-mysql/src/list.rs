//! [`Store::list`](idem_core::Store::list) on MySQL: pages along the primary key
//! `(scope, id)`, bytewise (the key columns are `VARBINARY`).

use idem_core::{Error, Key, Record};
use sqlx::{AssertSqlSafe, Row};

use crate::error::map_err;
use crate::store::{record, MySqlStore};

impl MySqlStore {
    /// Up to `limit` records after `after`, of `scope` if given, in primary-key order.
    pub(crate) async fn list_page(
        &self,
        scope: Option<&str>,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<Record>, Error> {
        let statement = format!(
            "SELECT scope, id, fingerprint, state, token, lease_until, response, created_at,
                    updated_at, expires_at
               FROM {}
              WHERE (? IS NULL OR scope = ?)
                AND (? IS NULL OR scope > ? OR (scope = ? AND id > ?))
              ORDER BY scope, id
              LIMIT ?",
            self.options().table_name().quoted
        );
        let (after_scope, after_id) = (after.map(Key::scope), after.map(Key::id));
        let rows = sqlx::query(AssertSqlSafe(statement))
            .bind(scope)
            .bind(scope)
            .bind(after_scope)
            .bind(after_scope)
            .bind(after_scope)
            .bind(after_id)
            .bind(u64::try_from(limit).unwrap_or(u64::MAX))
            .fetch_all(self.pool())
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                let text = |column: &str| -> Result<String, Error> {
                    let bytes: Vec<u8> = row.try_get(column).map_err(Error::corrupt)?;
                    String::from_utf8(bytes).map_err(Error::corrupt)
                };
                let (scope, id) = (text("scope")?, text("id")?);
                let key = Key::new(scope.as_str(), id.as_str())
                    .map_err(|e| Error::corrupt_key(format!("{scope}/{id}"), e))?;
                record(&key, row)
            })
            .collect()
    }
}
