//! The business calls of the sqlx-backed benchmarks (PostgreSQL, MySQL): one
//! implementation, each dialect's statements passed in.

use futures::future::BoxFuture;
use idem::{Error, Failure};
use sqlx::{Database, Encode, Executor, IntoArguments, Pool, Type};

use super::sql::Business;
use super::Call;

/// One dialect's business statements.
pub struct Statements<DB: Database> {
    /// The business insert of row `k` (its one parameter).
    pub insert: &'static str,
    /// A primary-key `SELECT` of row `k`.
    pub select: &'static str,
    /// The hand-rolled pattern's idempotency row for key `k`, nothing on conflict.
    pub claim_key: &'static str,
    /// The hand-rolled pattern's saved response: parameters the body, then the key.
    pub save_response: &'static str,
    /// The rows a statement changed.
    pub rows_affected: fn(&DB::QueryResult) -> u64,
}

/// The business calls on `pool` in the dialect of `sql`.
pub struct SqlxCalls<DB: Database> {
    pub pool: Pool<DB>,
    pub sql: &'static Statements<DB>,
}

impl<DB> Business for SqlxCalls<DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> Vec<u8>: Encode<'q, DB> + Type<DB>,
{
    /// The bare business insert of row `k`.
    fn insert(&self, k: String) -> Call {
        let (pool, sql) = (self.pool.clone(), self.sql);
        Box::pin(async move {
            sqlx::query(sql.insert)
                .bind(k)
                .execute(&pool)
                .await
                .map_err(Error::retryable)
                .map(drop)
        })
    }

    /// The same insert in an explicit transaction.
    fn insert_in_transaction(&self, k: String) -> Call {
        let (pool, sql) = (self.pool.clone(), self.sql);
        Box::pin(async move {
            let mut tx = pool.begin().await.map_err(Error::retryable)?;
            sqlx::query(sql.insert)
                .bind(k)
                .execute(&mut *tx)
                .await
                .map_err(Error::retryable)?;
            tx.commit().await.map_err(Error::retryable)
        })
    }

    /// The hand-rolled pattern around the insert, in one transaction: the idempotency
    /// row, the business row, the saved response.
    fn handrolled(&self, k: String) -> Call {
        let (pool, sql) = (self.pool.clone(), self.sql);
        Box::pin(async move {
            let mut tx = pool.begin().await.map_err(Error::retryable)?;
            let claimed = sqlx::query(sql.claim_key)
                .bind(k.clone())
                .execute(&mut *tx)
                .await
                .map_err(Error::retryable)?;
            if (sql.rows_affected)(&claimed) == 0 {
                return Err(Error::Config(format!("handrolled: key {k} was taken")));
            }
            sqlx::query(sql.insert)
                .bind(k.clone())
                .execute(&mut *tx)
                .await
                .map_err(Error::retryable)?;
            sqlx::query(sql.save_response)
                .bind(b"100".to_vec())
                .bind(k)
                .execute(&mut *tx)
                .await
                .map_err(Error::retryable)?;
            tx.commit().await.map_err(Error::retryable)
        })
    }

    /// A primary-key SELECT of row `k`.
    fn select(&self, k: String) -> Call {
        let (pool, sql) = (self.pool.clone(), self.sql);
        Box::pin(async move {
            sqlx::query(sql.select)
                .bind(k)
                .fetch_optional(&pool)
                .await
                .map_err(Error::retryable)
                .map(drop)
        })
    }
}

/// The business insert of row `k` through the store's transaction `conn`: the barrier's
/// transactional operation.
pub fn insert_on<'c, DB>(
    conn: &'c mut DB::Connection,
    sql: &'static str,
    k: String,
) -> BoxFuture<'c, Result<i64, Failure<String, String>>>
where
    DB: Database,
    for<'e> &'e mut DB::Connection: Executor<'e, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'q> String: Encode<'q, DB> + Type<DB>,
{
    Box::pin(async move {
        sqlx::query(sql)
            .bind(k)
            .execute(conn)
            .await
            .map_err(|e| Failure::Retryable(e.to_string()))?;
        Ok(100)
    })
}
