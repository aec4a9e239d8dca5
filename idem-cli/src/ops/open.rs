//! Opening a store for the operator commands: the namespace options, a connection bounded
//! by `--connect-timeout` that reports why it failed, and no DDL unless migrating.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use idem::etcd::{EtcdOptions, EtcdStore};
use idem::mysql::sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions};
use idem::mysql::{MySqlOptions, MySqlStore};
use idem::postgres::sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use idem::postgres::sqlx::{self, Connection};
use idem::postgres::{PgOptions, PgStore};
use idem::redis::{RedisOptions, RedisStore};
use idem::sqlite::{SqliteOptions, SqliteStore};
use idem::{DynStore, Error};

use crate::error::CliError;
use crate::target::{BackendKind, OpsTarget};

/// Connections an operator command's pool opens at most.
const POOL_SIZE: u32 = 4;

/// The store of `t` for a command that reads or deletes records: the table (or SQLite
/// file) must exist already; nothing is created ([`CliError::Missing`] otherwise).
pub async fn existing(t: &OpsTarget) -> Result<DynStore, CliError> {
    let table = t.table()?;
    let timeout = t.connect_timeout;
    Ok(match t.target.backend {
        BackendKind::Sqlite => {
            let path = t.target.db("idem.db");
            let options = sqlite_options(table)?;
            if is_plain_file(&path) && !path.exists() {
                return Err(CliError::Missing(format!(
                    "the SQLite database {} does not exist (run `idem migrate --db {}`)",
                    path.display(),
                    path.display()
                )));
            }
            let store = SqliteStore::open_with(&path, options).await?;
            let name = store.table().to_string();
            let found = store
                .with_connection(move |c| {
                    c.query_row(
                        "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                        [name],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .await?;
            if found == 0 {
                return Err(missing(t, store.table(), &format!("in {}", path.display())));
            }
            Arc::new(store)
        }
        BackendKind::Postgres => {
            let options = pg_options(table)?;
            let (pool, at) = pg_pool(&t.target.url()?, timeout).await?;
            let quoted = options.table().quoted();
            let found: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(&quoted)
                .fetch_one(&pool)
                .await
                .map_err(Error::permanent)?;
            if !found {
                return Err(missing(t, &quoted, &format!("on {at}")));
            }
            Arc::new(PgStore::from_pool(pool, options)?)
        }
        BackendKind::Mysql => {
            let options = mysql_options(table)?;
            let (pool, at) = mysql_pool(&t.target.url()?, timeout).await?;
            let name = options.table().to_string();
            let (database, bare) = match name.split_once('.') {
                Some((d, b)) => (Some(d), b),
                None => (None, name.as_str()),
            };
            let found: i64 = idem::mysql::sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.tables
                  WHERE table_schema = COALESCE(?, DATABASE()) AND table_name = ?",
            )
            .bind(database)
            .bind(bare)
            .fetch_one(&pool)
            .await
            .map_err(Error::permanent)?;
            if found == 0 {
                return Err(missing(t, &name, &format!("on {at}")));
            }
            Arc::new(MySqlStore::from_pool(pool, options))
        }
        BackendKind::Redis => Arc::new(redis(t).await?),
        BackendKind::Etcd => Arc::new(etcd(t).await?),
        #[cfg(feature = "fdb")]
        BackendKind::Fdb => {
            Arc::new(idem::fdb::FdbStore::connect(t.target.cluster_file.as_deref()).await?)
        }
    })
}

fn missing(t: &OpsTarget, table: &str, place: &str) -> CliError {
    let mut hint = format!("idem migrate --backend {}", t.target.backend.name());
    if let Some(db) = &t.target.db {
        hint.push_str(&format!(" --db {}", db.display()));
    }
    if let Some(table) = &t.table {
        hint.push_str(&format!(" --table {table}"));
    }
    CliError::Missing(format!(
        "table {table} does not exist {place} (run `{hint}`)"
    ))
}

/// Whether `path` names a file SQLite would create (not `:memory:` or a `file:` URI).
fn is_plain_file(path: &Path) -> bool {
    let s = path.to_string_lossy();
    s != ":memory:" && !s.starts_with("file:")
}

pub(crate) fn sqlite_options(table: Option<&str>) -> Result<SqliteOptions, Error> {
    match table {
        Some(t) => SqliteOptions::default().with_table(t),
        None => Ok(SqliteOptions::default()),
    }
}

pub(crate) fn pg_options(table: Option<&str>) -> Result<PgOptions, Error> {
    match table {
        Some(t) => PgOptions::default().with_table(t),
        None => Ok(PgOptions::default()),
    }
}

pub(crate) fn mysql_options(table: Option<&str>) -> Result<MySqlOptions, Error> {
    match table {
        Some(t) => MySqlOptions::default().with_table(t),
        None => Ok(MySqlOptions::default()),
    }
}

/// Waits at most `timeout` for `connect`; a failure names the server and keeps the cause
/// (refused, unknown host, authentication).
async fn bounded<T, E>(
    at: &str,
    timeout: Duration,
    connect: impl Future<Output = Result<T, E>>,
) -> Result<T, CliError>
where
    E: Into<idem::BoxError>,
{
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(CliError::Connect {
            what: at.to_string(),
            source: e.into(),
        }),
        Err(_) => Err(CliError::Connect {
            what: at.to_string(),
            source: format!("no connection within {timeout:?} (--connect-timeout)").into(),
        }),
    }
}

/// A pool on `url` after one connection succeeded within `timeout`: the pool's own
/// connect would retry until its acquire timeout and then report only that it timed out.
pub(crate) async fn pg_pool(url: &str, timeout: Duration) -> Result<(PgPool, String), CliError> {
    let (options, at) = pg_connect(url, timeout).await?;
    let pool = PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(timeout)
        .connect_lazy_with(options);
    Ok((pool, at))
}

/// The connect options of `url`, after one connection with them succeeded within
/// `timeout`, and the server's name for messages.
pub(crate) async fn pg_connect(
    url: &str,
    timeout: Duration,
) -> Result<(PgConnectOptions, String), CliError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| Error::Config(format!("invalid PostgreSQL URL: {e}")))?;
    let at = format!(
        "PostgreSQL at {}:{}",
        options.get_host(),
        options.get_port()
    );
    let probe: PgConnection = bounded(&at, timeout, PgConnection::connect_with(&options)).await?;
    let _ = probe.close().await;
    Ok((options, at))
}

/// [`pg_pool`] for MySQL.
pub(crate) async fn mysql_pool(
    url: &str,
    timeout: Duration,
) -> Result<(MySqlPool, String), CliError> {
    let (options, at) = mysql_connect(url, timeout).await?;
    let pool = MySqlPoolOptions::new()
        .max_connections(POOL_SIZE)
        .acquire_timeout(timeout)
        .connect_lazy_with(options);
    Ok((pool, at))
}

/// [`pg_connect`] for MySQL.
pub(crate) async fn mysql_connect(
    url: &str,
    timeout: Duration,
) -> Result<(MySqlConnectOptions, String), CliError> {
    let options: MySqlConnectOptions = url
        .parse()
        .map_err(|e| Error::Config(format!("invalid MySQL URL: {e}")))?;
    let at = format!("MySQL at {}:{}", options.get_host(), options.get_port());
    let probe: MySqlConnection =
        bounded(&at, timeout, MySqlConnection::connect_with(&options)).await?;
    let _ = probe.close().await;
    Ok((options, at))
}

/// The Redis store of `t`, with its key prefix; Redis has no schema to create.
pub(crate) async fn redis(t: &OpsTarget) -> Result<RedisStore, CliError> {
    redis_with_prefix(t, t.key_prefix.as_deref()).await
}

pub(crate) async fn redis_with_prefix(
    t: &OpsTarget,
    prefix: Option<&str>,
) -> Result<RedisStore, CliError> {
    let mut options = RedisOptions::default().with_connect_timeout(t.connect_timeout);
    if let Some(p) = prefix {
        options = options.with_key_prefix(p)?;
    }
    let url = t.target.url()?;
    let at = format!("Redis at {}", without_credentials(&url));
    bounded(
        &at,
        t.connect_timeout,
        RedisStore::connect_with(&url, options),
    )
    .await
}

/// The etcd store of `t`, with its key prefix, after one read answered.
pub(crate) async fn etcd(t: &OpsTarget) -> Result<EtcdStore, CliError> {
    etcd_with_prefix(t, t.key_prefix.as_deref()).await
}

pub(crate) async fn etcd_with_prefix(
    t: &OpsTarget,
    prefix: Option<&str>,
) -> Result<EtcdStore, CliError> {
    let mut options = EtcdOptions::default().with_connect_timeout(t.connect_timeout);
    if let Some(p) = prefix {
        options = options.with_key_prefix(p);
    }
    options.validate()?;
    let url = t.target.url()?;
    let at = format!("etcd at {}", without_credentials(&url));
    bounded(&at, t.connect_timeout, async {
        let store = EtcdStore::connect_with(&url, options).await?;
        // The client connects lazily: one read shows whether any endpoint answers.
        store
            .client()
            .clone()
            .get("idem-cli-probe", None)
            .await
            .map_err(Error::retryable)?;
        Ok::<_, Error>(store)
    })
    .await
}

/// `url` without a password (`redis://user:secret@host` → `redis://user@host`).
fn without_credentials(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = &url[scheme + 3..at];
            let user = user.split(':').next().unwrap_or("");
            format!("{}{user}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_left_out_of_server_names() {
        assert_eq!(
            without_credentials("redis://u:secret@h:6379/0"),
            "redis://u@h:6379/0"
        );
        assert_eq!(without_credentials("redis://h:6379/"), "redis://h:6379/");
    }
}
