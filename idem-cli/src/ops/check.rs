//! `idem check`: the conformance suite against the configured server, with the backend's
//! own conformance factory (`idem_<backend>::conformance`, the one its tests use), in a
//! scratch namespace of its own that is removed afterwards, whatever the outcome: SQLite,
//! tables `idemchk_<run>_*` in the `--db` file; PostgreSQL, a schema `idemchk_<run>`; MySQL,
//! tables `idemchk_<run>_*`; Redis, keys under `idemchk:<run>:`; etcd, keys under
//! `idemchk/<run>/`.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use idem::etcd::EtcdOptions;
use idem::Error;
use idem_conformance::scratch::run_id;
use idem_conformance::Report;
use idem_etcd::conformance::EtcdConformance;
use idem_mysql::conformance::MySqlConformance;
use idem_postgres::conformance::PgConformance;
use idem_redis::conformance::RedisConformance;
use idem_sqlite::conformance::SqliteConformance;

use super::open;
use crate::error::CliError;
use crate::target::{BackendKind, OpsTarget};

/// Runs the suite, prints its report, removes the scratch namespace; `Ok(false)` if a
/// property failed.
pub async fn run(t: &OpsTarget) -> Result<bool, CliError> {
    t.table()?;
    if t.table.is_some() || t.key_prefix.is_some() {
        return Err(Error::Config(
            "check works in a scratch namespace of its own; --table and --key-prefix do not apply"
                .into(),
        )
        .into());
    }
    let run = run_id();
    let report = match t.target.backend {
        BackendKind::Sqlite => {
            let factory =
                SqliteConformance::new(t.target.db("idem.db"), &format!("idemchk_{run}"))?;
            eprintln!(
                "checking SQLite in {} (scratch tables {}_*)",
                factory.path().display(),
                factory.prefix()
            );
            let report = guarded(idem_conformance::run_all_transactional(&factory)).await;
            factory.remove()?;
            report?
        }
        BackendKind::Postgres => {
            let (options, at) = open::pg_connect(&t.target.url()?, t.connect_timeout).await?;
            let factory = PgConformance::new(options, &format!("idemchk_{run}"))?;
            eprintln!("checking {at} (scratch schema {})", factory.schema());
            let report = guarded(idem_conformance::run_all_transactional(&factory)).await;
            factory.remove().await?;
            report?
        }
        BackendKind::Mysql => {
            let (options, at) = open::mysql_connect(&t.target.url()?, t.connect_timeout).await?;
            let factory = MySqlConformance::new(options, &format!("idemchk_{run}"))?;
            eprintln!("checking {at} (scratch tables {}_*)", factory.prefix());
            let report = guarded(idem_conformance::run_all_transactional(&factory)).await;
            factory.remove().await?;
            report?
        }
        BackendKind::Redis => {
            // One bounded connection first, so that an unreachable server is reported as such.
            let url = t.target.url()?;
            open::redis_with_prefix(t, None).await?;
            let factory = RedisConformance::new(&url, &format!("idemchk:{run}:"))?;
            eprintln!(
                "checking Redis at {url} (scratch keys {}*)",
                factory.prefix()
            );
            let report = guarded(idem_conformance::run_all(&factory)).await;
            factory.remove().await?;
            report?
        }
        BackendKind::Etcd => {
            let url = t.target.url()?;
            open::etcd_with_prefix(t, None).await?;
            let options = EtcdOptions::default().with_connect_timeout(t.connect_timeout);
            let factory = EtcdConformance::new(&url, &format!("idemchk/{run}/"), options)?;
            eprintln!(
                "checking etcd at {url} (scratch keys {}*)",
                factory.prefix()
            );
            let report = guarded(idem_conformance::run_all(&factory)).await;
            factory.remove().await?;
            report?
        }
        #[cfg(feature = "fdb")]
        BackendKind::Fdb => {
            return Err(Error::Config(
                "check does not run on fdb; run its conformance tests \
                 (`cargo test -p idem-fdb --test conformance`)"
                    .into(),
            )
            .into())
        }
    };
    print!("{report}");
    println!("{}", report.summary());
    Ok(report.failures().is_empty())
}

/// Runs a suite; a panic in it is an error, so that the caller still removes the
/// namespace (the factories also remove it when dropped, should this be skipped).
async fn guarded(suite: impl Future<Output = Report>) -> Result<Report, CliError> {
    AssertUnwindSafe(suite)
        .catch_unwind()
        .await
        .map_err(|_| Error::Config("the conformance suite panicked".into()).into())
}
