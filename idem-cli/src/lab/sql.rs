//! What the PostgreSQL and MySQL labs share: the ledger and the naive keys in tables,
//! written through sqlx with each database's statements.

use std::time::Duration;

use async_trait::async_trait;
use idem::postgres::sqlx::{
    self, ColumnIndex, Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool, Type,
};
use idem::{Error, Failure};

use super::{lab_key, Ledger, Leg, Tally, TxPayment, WORKER_DIED};

/// One database's statements.
pub struct Statements<DB: Database> {
    /// Empties the ledger, the naive keys and the store's table.
    pub reset: &'static str,
    /// Binds strategy, payment, leg, amount, dedup key; a second row with the same dedup
    /// key is ignored.
    pub insert: &'static str,
    /// Binds the key; answers a count.
    pub naive_seen: &'static str,
    /// Binds the key; records it once.
    pub naive_mark: &'static str,
    /// Binds the key, the new expiry, now, the new expiry again: the TTL claim in one
    /// statement.
    pub ttl_claim: &'static str,
    /// Whether the TTL claim's result says the key was claimed.
    pub claimed: fn(&DB::QueryResult) -> bool,
    /// Binds the strategy; answers (payment, debits, credits) rows.
    pub tally: &'static str,
}

/// The ledger of a SQL lab.
pub struct SqlLedger<DB: Database> {
    pub pool: Pool<DB>,
    pub sql: Statements<DB>,
}

/// One ledger row through `e` (the pool, or the store's transaction).
async fn insert<'c, DB, E>(
    e: E,
    sql: &'static str,
    row: (&str, &str, Leg, i64, Option<&str>),
) -> Result<(), sqlx::Error>
where
    DB: Database,
    E: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'t> String: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> Option<String>: Encode<'t, DB> + Type<DB>,
{
    let (strategy, payment, leg, amount, dedup) = row;
    sqlx::query(sql)
        .bind(strategy.to_string())
        .bind(payment.to_string())
        .bind(leg.name().to_string())
        .bind(amount)
        .bind(dedup.map(str::to_string))
        .execute(e)
        .await
        .map(drop)
}

#[async_trait]
impl<DB> Ledger for SqlLedger<DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'t> String: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Decode<'t, DB> + Type<DB>,
    for<'t> Option<String>: Encode<'t, DB> + Type<DB>,
    for<'r> (String, i64, i64): FromRow<'r, DB::Row>,
    usize: ColumnIndex<DB::Row>,
{
    async fn reset(&self) -> Result<(), Error> {
        sqlx::raw_sql(self.sql.reset)
            .execute(&self.pool)
            .await
            .map_err(Error::retryable)
            .map(drop)
    }

    async fn insert(
        &self,
        strategy: &str,
        payment: &str,
        leg: Leg,
        amount: i64,
        dedup: Option<&str>,
    ) -> Result<(), Error> {
        let row = (strategy, payment, leg, amount, dedup);
        insert(&self.pool, self.sql.insert, row)
            .await
            .map_err(Error::retryable)
    }

    async fn naive_seen(&self, strategy: &str, key: &str) -> Result<bool, Error> {
        let n: i64 = sqlx::query_scalar(self.sql.naive_seen)
            .bind(lab_key(strategy, key))
            .fetch_one(&self.pool)
            .await
            .map_err(Error::retryable)?;
        Ok(n > 0)
    }

    async fn naive_mark(&self, strategy: &str, key: &str) -> Result<(), Error> {
        sqlx::query(self.sql.naive_mark)
            .bind(lab_key(strategy, key))
            .execute(&self.pool)
            .await
            .map_err(Error::retryable)
            .map(drop)
    }

    async fn ttl_claim(
        &self,
        strategy: &str,
        key: &str,
        now_ms: i64,
        ttl: Duration,
    ) -> Result<bool, Error> {
        let until = now_ms + ttl.as_millis() as i64;
        let done = sqlx::query(self.sql.ttl_claim)
            .bind(lab_key(strategy, key))
            .bind(until)
            .bind(now_ms)
            .bind(until)
            .execute(&self.pool)
            .await
            .map_err(Error::retryable)?;
        Ok((self.sql.claimed)(&done))
    }

    async fn tally(&self, strategy: &str) -> Result<Vec<Tally>, Error> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(self.sql.tally)
            .bind(strategy.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(Error::retryable)?;
        Ok(rows
            .into_iter()
            .map(|(payment, d, c)| Tally {
                payment,
                debits: d as u64,
                credits: c as u64,
            })
            .collect())
    }
}

/// The transactional strategy's operation body, on the store's transaction `conn`: the
/// debit, the card network, the worker's death if planned, the credit.
pub async fn transact_legs<DB>(
    conn: &mut DB::Connection,
    sql: &'static str,
    p: TxPayment,
) -> Result<i64, Failure<String, String>>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'t> String: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> Option<String>: Encode<'t, DB> + Type<DB>,
{
    p.started();
    let fail = |e: sqlx::Error| Failure::Retryable(e.to_string());
    let row = |leg| (p.strategy, p.payment.as_str(), leg, p.amount, None);
    insert(&mut *conn, sql, row(Leg::Debit))
        .await
        .map_err(fail)?;
    tokio::time::sleep(p.latency).await;
    if p.crash {
        return Err(Failure::Retryable(WORKER_DIED.to_string()));
    }
    insert(&mut *conn, sql, row(Leg::Credit))
        .await
        .map_err(fail)?;
    Ok(p.amount)
}
