//! Operator commands: record counts, one key's record, listing, purge, migration and the
//! conformance check, on any store, in the namespace the options name.
//!
//! Every command but `migrate` and `check` opens the store with [`open::existing`]: no DDL,
//! and a missing table is [`CliError::Missing`]. Progress goes to stderr, results to stdout.

pub mod check;
pub mod open;
pub mod show;

use std::time::Duration;

use idem::mysql::sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use idem::mysql::MySqlStore;
use idem::postgres::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use idem::postgres::PgStore;
use idem::sqlite::SqliteStore;
use idem::{Clock, DynStore, Error, Key, Record, SystemClock};
use indicatif::{ProgressBar, ProgressStyle};

use crate::error::CliError;
use crate::target::{BackendKind, OpsTarget};
use show::Format;

/// Records asked for per page when listing.
const PAGE: usize = 500;

/// Prints the record counts per state.
pub async fn stats(t: &OpsTarget) -> Result<(), CliError> {
    let store = open::existing(t).await?;
    let s = store.stats().await?;
    println!(
        "in_progress {}\ncompleted   {}\nfailed      {}\ntotal       {}",
        s.in_progress,
        s.completed,
        s.failed,
        s.total()
    );
    Ok(())
}

/// Prints the record of one key; "no record" (status 0) when there is none.
pub async fn get(t: &OpsTarget, scope: String, id: String, format: Format) -> Result<(), CliError> {
    let key = Key::new(scope, id)?;
    let store = open::existing(t).await?;
    match store.get(&key).await? {
        Some(r) => print(&r, format),
        None => match format {
            Format::Table => println!("no record for {key}"),
            Format::Json => println!("null"),
        },
    }
    Ok(())
}

fn print(r: &Record, format: Format) {
    match format {
        Format::Table => print!("{}", show::table(r)),
        Format::Json => println!("{}", show::json(r)),
    }
}

/// Pages through the store's records from the first, `PAGE` at a time, handing each to
/// `each` until it returns `false`.
async fn walk(
    store: &DynStore,
    backend: BackendKind,
    scope: Option<&str>,
    mut each: impl FnMut(Record) -> bool,
) -> Result<(), CliError> {
    let mut after: Option<Key> = None;
    loop {
        let page = store
            .list(scope, after.as_ref(), PAGE)
            .await?
            .ok_or_else(|| {
                Error::Config(format!(
                    "the {} backend cannot list its records; read one with `idem get`",
                    backend.name()
                ))
            })?;
        let full = page.len() == PAGE;
        for r in page {
            after = Some(r.key.clone());
            if !each(r) {
                return Ok(());
            }
        }
        if !full {
            return Ok(());
        }
    }
}

/// Prints up to `limit` records (of `scope`, if given) in the store's key order; says on
/// stderr when there are more.
pub async fn list(
    t: &OpsTarget,
    scope: Option<String>,
    limit: usize,
    format: Format,
) -> Result<(), CliError> {
    let store = open::existing(t).await?;
    let (mut shown, mut more) = (0usize, false);
    walk(&store, t.target.backend, scope.as_deref(), |r| {
        if shown == limit {
            more = true;
            return false;
        }
        if format == Format::Table && shown > 0 {
            println!();
        }
        print(&r, format);
        shown += 1;
        true
    })
    .await?;
    if format == Format::Table && shown == 0 {
        println!("no records");
    }
    if more {
        eprintln!("(more than {limit} records: raise --limit or narrow with --scope)");
    }
    Ok(())
}

/// Deletes the records whose retention has passed, `batch` at a time, showing progress on
/// stderr; with `dry_run`, counts them instead and deletes nothing.
pub async fn purge(t: &OpsTarget, batch: usize, dry_run: bool) -> Result<(), CliError> {
    let store = open::existing(t).await?;
    let batch = batch.max(1);
    let now = SystemClock.now();
    let progress = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {msg} {pos} records ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    progress.enable_steady_tick(Duration::from_millis(200));
    if dry_run {
        // The Store trait has no "count expired" call: the dry run reads the records
        // through `list` and counts the ones `purge` would take (expires_at <= now), so it
        // shares purge's rule without a statement of its own per backend, and writes nothing.
        progress.set_message("scanning");
        let mut expired = 0u64;
        walk(&store, t.target.backend, None, |r| {
            progress.inc(1);
            expired += u64::from(r.expires_at <= now);
            true
        })
        .await?;
        progress.finish_and_clear();
        println!("would purge {expired} records (dry run: nothing deleted)");
        return Ok(());
    }
    progress.set_message("purged");
    let mut total = 0;
    loop {
        let n = store.purge(now, batch).await?;
        total += n;
        progress.inc(n);
        if n < batch as u64 {
            break;
        }
    }
    progress.finish_and_clear();
    println!("purged {total} records");
    Ok(())
}

/// Creates the table (idempotent), or with `print` prints the DDL without connecting.
/// Redis and etcd have no schema.
pub async fn migrate(t: &OpsTarget, print: bool) -> Result<(), CliError> {
    let table = t.table()?;
    let backend = t.target.backend;
    if !matches!(
        backend,
        BackendKind::Sqlite | BackendKind::Postgres | BackendKind::Mysql
    ) {
        println!(
            "the {} backend has no schema: records are keys, created as they are written; \
             nothing to migrate",
            backend.name()
        );
        return Ok(());
    }
    if print {
        // Stores on nothing: an in-memory SQLite database, lazy pools that never connect.
        let ddl = match backend {
            BackendKind::Sqlite => SqliteStore::open_with(":memory:", open::sqlite_options(table)?)
                .await?
                .schema_sql()
                .to_string(),
            BackendKind::Postgres => PgStore::from_pool(
                PgPoolOptions::new().connect_lazy_with(PgConnectOptions::new()),
                open::pg_options(table)?,
            )?
            .schema_sql()
            .to_string(),
            _ => MySqlStore::from_pool(
                MySqlPoolOptions::new().connect_lazy_with(MySqlConnectOptions::new()),
                open::mysql_options(table)?,
            )
            .schema_sql()
            .to_string(),
        };
        println!("{}", ddl.trim_end());
        return Ok(());
    }
    let name = match backend {
        BackendKind::Sqlite => {
            let path = t.target.db("idem.db");
            let store = SqliteStore::connect_with(&path, open::sqlite_options(table)?).await?;
            format!("{} in {}", store.table(), path.display())
        }
        BackendKind::Postgres => {
            let (pool, at) = open::pg_pool(&t.target.url()?, t.connect_timeout).await?;
            let store = PgStore::from_pool(pool, open::pg_options(table)?)?;
            store.migrate().await?;
            format!("{} on {at}", store.table().quoted())
        }
        _ => {
            let (pool, at) = open::mysql_pool(&t.target.url()?, t.connect_timeout).await?;
            let options = open::mysql_options(table)?;
            let name = options.table().to_string();
            MySqlStore::from_pool(pool, options).migrate().await?;
            format!("{name} on {at}")
        }
    };
    println!("table {name} is ready");
    Ok(())
}
