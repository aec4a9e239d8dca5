//! [`Store::list`](idem_core::Store::list) on PostgreSQL: pages along the primary key
//! `(scope, id)`, in the columns' collation.

use idem_core::{Error, Key, Record};
use sqlx::{AssertSqlSafe, Row};

use crate::error::map_err;
use crate::store::{record, PgStore};

impl PgStore {
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
              WHERE ($1::text IS NULL OR scope = $1)
                AND ($2::text IS NULL OR (scope, id) > ($2::text, $3::text))
              ORDER BY scope, id
              LIMIT $4",
            self.table().quoted()
        );
        let rows = sqlx::query(AssertSqlSafe(statement))
            .bind(scope)
            .bind(after.map(Key::scope))
            .bind(after.map(Key::id))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                let scope: String = row.try_get("scope").map_err(Error::corrupt)?;
                let id: String = row.try_get("id").map_err(Error::corrupt)?;
                let key = Key::new(scope.as_str(), id.as_str())
                    .map_err(|e| Error::corrupt_key(format!("{scope}/{id}"), e))?;
                record(&key, row)
            })
            .collect()
    }
}
