//! The conformance factory of this store (feature `conformance`): what the crate's own
//! tests and `idem check` run [`idem_conformance`]'s suite with.
//!
//! Every store it creates is a table `<prefix>_<n>` of one database file, beside the table
//! `<prefix>_business` its transactional operations write to. [`SqliteConformance::remove`]
//! drops those tables and their schema-version rows (or removes the file, if the factory
//! created it), and so does dropping the factory if that was not done.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use idem_conformance::{async_trait, StoreFactory, TxFactory, TxPlan};
use idem_core::{Error, Failure, Key};
use rusqlite::Connection;

use crate::error::map_err;
use crate::options::VERSIONS_TABLE;
use crate::{SqliteOperation, SqliteOptions, SqliteStore};

/// Stores on scratch tables of one SQLite database file, for the conformance suite.
pub struct SqliteConformance {
    path: PathBuf,
    prefix: String,
    /// Whether the file existed before the factory (else it is removed afterwards).
    existed: bool,
    /// Whether the schema-versions table existed before the factory.
    versions_existed: bool,
    /// Whether scratch tables may exist: a store was created and they were not removed.
    created: AtomicBool,
    next: AtomicU32,
}

impl SqliteConformance {
    /// A factory whose stores are tables `<prefix>_<n>` of the database file `path`
    /// (created if missing; the file is then removed with the tables). `prefix`: letters,
    /// digits and `_`.
    pub fn new(path: impl Into<PathBuf>, prefix: &str) -> Result<Self, Error> {
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(Error::Config(format!(
                "scratch table prefix {prefix:?}: letters, digits and `_`"
            )));
        }
        let path = path.into();
        let existed = path.exists();
        let versions_existed = existed && has_table(&path, VERSIONS_TABLE)?;
        Ok(SqliteConformance {
            path,
            prefix: prefix.to_string(),
            existed,
            versions_existed,
            created: AtomicBool::new(false),
            next: AtomicU32::new(0),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The scratch prefix of the tables.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn business(&self) -> String {
        format!("{}_business", self.prefix)
    }

    /// A handle on `table`: the busy timeout is long enough for `Wait` duplicates to wait
    /// through several transactions of another connection.
    async fn open(&self, table: &str) -> Result<SqliteStore, Error> {
        let options = SqliteOptions::default()
            .with_table(table)?
            .with_busy_timeout(Duration::from_secs(30));
        SqliteStore::connect_with(&self.path, options).await
    }

    /// Drops every scratch table and its schema-version row, or removes the file if the
    /// factory created it.
    pub fn remove(&self) -> Result<(), Error> {
        if !self.created.load(Ordering::SeqCst) || !self.path.exists() {
            return Ok(());
        }
        if !self.existed {
            for suffix in ["", "-wal", "-shm"] {
                let file = format!("{}{suffix}", self.path.display());
                match std::fs::remove_file(&file) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::permanent(format!("cannot remove {file}: {e}")))
                    }
                    _ => {}
                }
            }
        } else {
            let pattern = format!("{}\\_%", self.prefix);
            let conn = Connection::open(&self.path).map_err(map_err)?;
            let tables: Vec<String> = conn
                .prepare(
                    "SELECT name FROM sqlite_schema WHERE type = 'table' \
                     AND name LIKE ?1 ESCAPE '\\'",
                )
                .and_then(|mut s| s.query_map([&pattern], |r| r.get(0))?.collect())
                .map_err(map_err)?;
            for table in tables {
                conn.execute_batch(&format!("DROP TABLE \"{table}\""))
                    .map_err(map_err)?;
            }
            if self.versions_existed {
                conn.execute(
                    &format!("DELETE FROM {VERSIONS_TABLE} WHERE table_name LIKE ?1 ESCAPE '\\'"),
                    [&pattern],
                )
                .map_err(map_err)?;
            } else {
                conn.execute_batch(&format!("DROP TABLE IF EXISTS {VERSIONS_TABLE}"))
                    .map_err(map_err)?;
            }
        }
        self.created.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl Drop for SqliteConformance {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

fn has_table(path: &Path, table: &str) -> Result<bool, Error> {
    let n = Connection::open(path)
        .and_then(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get::<_, i64>(0),
            )
        })
        .map_err(map_err)?;
    Ok(n > 0)
}

#[async_trait]
impl StoreFactory for SqliteConformance {
    type Store = SqliteStore;

    fn name(&self) -> &str {
        "sqlite"
    }

    async fn create(&self) -> Result<SqliteStore, Error> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        self.created.store(true, Ordering::SeqCst);
        let store = self.open(&format!("{}_{n}", self.prefix)).await?;
        let business = self.business();
        store
            .with_connection(move |c| {
                c.execute_batch(&format!(
                    "CREATE TABLE IF NOT EXISTS \"{business}\" \
                     (scope TEXT NOT NULL, id TEXT NOT NULL, n INTEGER NOT NULL)"
                ))
            })
            .await?;
        Ok(store)
    }

    async fn reopen(&self, store: SqliteStore) -> Option<Result<SqliteStore, Error>> {
        let table = store.table().to_string();
        drop(store);
        Some(self.open(&table).await)
    }

    async fn second_handle(&self, store: &SqliteStore) -> Option<Result<SqliteStore, Error>> {
        Some(self.open(store.table()).await)
    }
}

#[async_trait]
impl TxFactory for SqliteConformance {
    fn operation(&self, key: &Key, plan: TxPlan) -> SqliteOperation<u64, String, String> {
        let key = key.clone();
        let insert = format!(
            "INSERT INTO \"{}\" (scope, id, n) VALUES (?1, ?2, ?3)",
            self.business()
        );
        Box::new(move |tx| {
            for n in 0..plan.rows {
                tx.execute(&insert, (key.scope(), key.id(), n))
                    .map_err(|e| Failure::Retryable(e.to_string()))?;
            }
            std::thread::sleep(plan.hold);
            plan.finish()
        })
    }

    async fn business_rows(&self, store: &SqliteStore, key: &Key) -> Result<u64, Error> {
        let (scope, id) = (key.scope().to_string(), key.id().to_string());
        let count = format!(
            "SELECT COUNT(*) FROM \"{}\" WHERE scope = ?1 AND id = ?2",
            self.business()
        );
        store
            .with_connection(move |c| c.query_row(&count, (scope, id), |r| r.get::<_, i64>(0)))
            .await
            .map(|n| n as u64)
    }
}
