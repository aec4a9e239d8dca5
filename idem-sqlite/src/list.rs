//! [`Store::list`](idem_core::Store::list) on SQLite: pages in key order (the `BINARY`
//! collation, bytewise), along the primary key.

use idem_core::{Error, Key, Record};
use rusqlite::{params, Connection};

use crate::error::map_err;
use crate::sql::Sql;
use crate::store::columns;

/// The page statement of `sql`'s table: `?1` scope or NULL, `?2`/`?3` the previous page's
/// last key or NULLs, `?4` the limit.
fn statement(sql: &Sql) -> String {
    format!(
        "SELECT scope, id, fingerprint, state, token, lease_until, response, created_at,
                updated_at, expires_at
           FROM \"{}\"
          WHERE (?1 IS NULL OR scope = ?1)
            AND (?2 IS NULL OR (scope, id) > (?2, ?3))
          ORDER BY scope, id
          LIMIT ?4",
        sql.table
    )
}

/// Up to `limit` records after `after`, of `scope` if given.
pub(crate) fn page(
    conn: &Connection,
    sql: &Sql,
    scope: Option<&str>,
    after: Option<&Key>,
    limit: usize,
) -> Result<Vec<Record>, Error> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut stmt = conn.prepare_cached(&statement(sql)).map_err(map_err)?;
    let rows = stmt
        .query_map(
            params![scope, after.map(Key::scope), after.map(Key::id), limit],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    columns(r, 2),
                ))
            },
        )
        .map_err(map_err)?;
    let mut records = Vec::new();
    for row in rows {
        let (scope, id, columns) = row.map_err(map_err)?;
        let key = Key::new(scope.as_str(), id.as_str())
            .map_err(|e| Error::corrupt_key(format!("{scope}/{id}"), e))?;
        let columns = columns.map_err(|e| Error::corrupt_key(&key, e))?;
        records.push(columns.into_record(&key)?);
    }
    Ok(records)
}
