//! Which store a command works on: the `--backend` choice, its URL or file, and how it is
//! opened.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use idem::{DynStore, Error};

/// The stores the commands know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Embedded SQLite, in a file.
    Sqlite,
    /// PostgreSQL, at `--url`.
    Postgres,
    /// MySQL or MariaDB (InnoDB), at `--url`.
    Mysql,
    /// Redis, at `--url`.
    Redis,
    /// etcd, at the comma-separated endpoints of `--url`.
    Etcd,
    /// FoundationDB (built with the `fdb` feature), at `--cluster-file`.
    #[cfg(feature = "fdb")]
    Fdb,
}

impl BackendKind {
    /// The name on the command line.
    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// The environment variable and the local default of a server backend's URL; `None` for
    /// the backends that take no URL.
    fn url_source(self) -> Option<(&'static str, &'static str)> {
        match self {
            BackendKind::Postgres => Some((
                "IDEM_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            )),
            BackendKind::Mysql => Some(("IDEM_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")),
            BackendKind::Redis => Some(("IDEM_REDIS_URL", "redis://127.0.0.1:6379/")),
            BackendKind::Etcd => Some((
                "IDEM_ETCD_ENDPOINTS",
                "http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793",
            )),
            _ => None,
        }
    }

    /// The server URL: the one given, else the backend's environment variable, else the
    /// local server (the etcd cluster of `scripts/cluster.sh start etcd`).
    pub fn url(self, explicit: Option<String>) -> Result<String, Error> {
        let (var, default) = self
            .url_source()
            .ok_or_else(|| Error::Config(format!("the {} backend takes no --url", self.name())))?;
        Ok(explicit
            .or_else(|| std::env::var(var).ok())
            .unwrap_or_else(|| default.to_string()))
    }
}

/// Where a command's store is.
#[derive(clap::Args, Clone, Debug)]
pub struct Target {
    /// Which store.
    #[arg(long, value_enum, default_value = "sqlite")]
    pub backend: BackendKind,
    /// Server URL (etcd: comma-separated endpoints). Defaults: IDEM_POSTGRES_URL,
    /// IDEM_MYSQL_URL, IDEM_REDIS_URL, IDEM_ETCD_ENDPOINTS, then the local servers.
    #[arg(long)]
    pub url: Option<String>,
    /// SQLite database file (default: a file in the temporary directory; the lab wants a
    /// new file and refuses an existing one, and by default uses a fresh temporary one).
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// FoundationDB cluster file (default: the system's).
    #[cfg(feature = "fdb")]
    #[arg(long)]
    pub cluster_file: Option<String>,
}

impl Target {
    /// The server URL of the chosen backend.
    pub fn url(&self) -> Result<String, Error> {
        self.backend.url(self.url.clone())
    }

    /// The SQLite file: `--db`, else `name` in the temporary directory.
    pub fn db(&self, name: &str) -> PathBuf {
        self.db
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(name))
    }

    /// The store with its default options, for the operator commands.
    pub async fn store(&self) -> Result<DynStore, Error> {
        Ok(match self.backend {
            BackendKind::Sqlite => {
                Arc::new(idem::sqlite::SqliteStore::connect(self.db("idem.db")).await?)
            }
            BackendKind::Postgres => {
                Arc::new(idem::postgres::PgStore::connect(&self.url()?).await?)
            }
            BackendKind::Mysql => Arc::new(idem::mysql::MySqlStore::connect(&self.url()?).await?),
            BackendKind::Redis => Arc::new(idem::redis::RedisStore::connect(&self.url()?).await?),
            BackendKind::Etcd => Arc::new(idem::etcd::EtcdStore::connect(&self.url()?).await?),
            #[cfg(feature = "fdb")]
            BackendKind::Fdb => {
                Arc::new(idem::fdb::FdbStore::connect(self.cluster_file.as_deref()).await?)
            }
        })
    }
}

/// Where an operator command's store is, and which namespace in it: the options the library
/// takes (table, key prefix) and how long to wait for a connection.
#[derive(clap::Args, Clone, Debug)]
pub struct OpsTarget {
    /// Which store, and where.
    #[command(flatten)]
    pub target: Target,
    /// The records' table (SQLite, PostgreSQL, MySQL): `table`, or `schema.table` on
    /// PostgreSQL and `database.table` on MySQL. Default: idem_records.
    #[arg(long)]
    pub table: Option<String>,
    /// The records' key prefix (Redis, etcd). Default: the library's (`idem:` on Redis,
    /// `idem/` on etcd).
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// How long to wait for the server to accept a connection (`500ms`, `5s`, `1m`).
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub connect_timeout: Duration,
}

fn duration(text: &str) -> Result<Duration, String> {
    idem_audit::parse_duration(text).map_err(|e| e.to_string())
}

impl OpsTarget {
    /// `--table`, after refusing it (and `--key-prefix`) where it does not apply.
    pub fn table(&self) -> Result<Option<&str>, Error> {
        let backend = self.target.backend;
        let sql = matches!(
            backend,
            BackendKind::Sqlite | BackendKind::Postgres | BackendKind::Mysql
        );
        if sql && self.key_prefix.is_some() {
            return Err(Error::Config(format!(
                "--key-prefix applies to redis and etcd; the {} backend takes --table",
                backend.name()
            )));
        }
        if !sql && self.table.is_some() {
            return Err(Error::Config(format!(
                "--table applies to sqlite, postgres and mysql; the {} backend takes --key-prefix",
                backend.name()
            )));
        }
        if backend != BackendKind::Sqlite && self.target.db.is_some() {
            return Err(Error::Config(format!(
                "--db applies to sqlite; the {} backend takes --url",
                backend.name()
            )));
        }
        if backend == BackendKind::Sqlite && self.target.url.is_some() {
            return Err(Error::Config(
                "--url does not apply to sqlite; give the database file with --db".into(),
            ));
        }
        Ok(self.table.as_deref())
    }
}
