//! `idem bench`: named workloads on one backend, each measured for throughput and p50/p99
//! latency, printed side by side with the ratios that matter (the barrier against the same
//! work without it, and against the hand-rolled pattern), or as one JSON object per line.
//!
//! The SQL stores (SQLite, PostgreSQL, MySQL) share their workloads through
//! [`sql::SqlBench`], the key-value stores (Redis, etcd) through [`kv::KvBench`]; one file per
//! backend holds its statements. docs/performance.md describes every workload.

use std::path::PathBuf;

use async_trait::async_trait;
use idem::Error;
use indicatif::{ProgressBar, ProgressStyle};

use crate::target::BackendKind;

mod etcd;
mod kv;
mod measure;
mod mysql;
mod postgres;
mod redis;
mod report;
mod sql;
mod sqlite;
mod sqlx_calls;

use measure::Summary;
pub use measure::{Call, Measured};
use report::{Comparison, Sample};

/// `idem bench`'s arguments.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// sqlite, postgres, mysql, redis or etcd.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BackendKind,
    /// Server URL (defaults as for `lab`).
    #[arg(long)]
    url: Option<String>,
    /// SQLite database file (default: `idem-bench.db` in the temporary directory). The
    /// benchmark recreates its own `idem_bench_*` tables in it and touches nothing else.
    #[arg(long)]
    db: Option<PathBuf>,
    /// Seconds per round of a measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Rounds per measurement, run interleaved with the other workloads' rounds; the
    /// median round's throughput is reported, and the percentiles of all rounds' calls.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent clients, one measurement of every workload per value.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    clients: Vec<usize>,
    /// Stored-record counts at which the SQL workloads are measured again (at the largest
    /// `--clients`), after the store is emptied and prefilled with that many records.
    #[arg(long, value_delimiter = ',', default_value = "1000,1000000")]
    records: Vec<u64>,
    /// Skip the stored-record measurements.
    #[arg(long)]
    no_records: bool,
    /// Only these workloads (comma-separated names; default: all of the backend's). A
    /// ratio is printed when both of its workloads ran.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// One JSON object per line on stdout instead of the table:
    /// {"backend","name","clients","ops_per_s","p50_us","p99_us"}, with "records" where the
    /// store was prefilled and "server_us_per_call" (per command) where the server reports
    /// its time (Redis).
    #[arg(long)]
    json: bool,
}

/// One backend's benchmark: its named workloads, and which of them are compared.
#[async_trait]
trait Suite: Send + Sync {
    /// The backend's name in the output (`postgres`).
    fn backend(&self) -> &'static str;
    /// The workloads, in the order they run.
    fn workloads(&self) -> Vec<&'static str>;
    /// The ratios the table prints.
    fn comparisons(&self) -> Vec<Comparison>;
    /// The workloads measured again at each stored-record count (none: not supported).
    fn scale_workloads(&self) -> &'static [&'static str];
    /// Runs `workload` from `clients` concurrent clients for `seconds`.
    async fn measure(
        &self,
        workload: &'static str,
        clients: usize,
        seconds: f64,
    ) -> Result<Measured, Error>;
    /// Empties the store and its business tables, then stores `records` completed records;
    /// returns how many the store holds.
    async fn prefill(&self, records: u64) -> Result<u64, Error>;
    /// Removes everything the benchmark created.
    async fn teardown(&self) -> Result<(), Error>;
}

/// Runs the benchmark `args` choose.
pub async fn run(args: BenchArgs) -> Result<(), Error> {
    let clients: Vec<usize> = args.clients.iter().map(|&c| c.max(1)).collect();
    if clients.is_empty() || args.rounds == 0 || !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err(Error::Config(
            "--clients needs at least one value, --rounds and --seconds a positive number".into(),
        ));
    }
    let suite: Box<dyn Suite> = match args.backend {
        BackendKind::Sqlite => {
            let path = args
                .db
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("idem-bench.db"));
            Box::new(sql::SqlSuite::new(sqlite::SqliteBench::setup(&path).await?))
        }
        BackendKind::Postgres => {
            let url = args.backend.url(args.url.clone())?;
            Box::new(sql::SqlSuite::new(postgres::PgBench::setup(&url).await?))
        }
        BackendKind::Mysql => {
            let url = args.backend.url(args.url.clone())?;
            Box::new(sql::SqlSuite::new(mysql::MySqlBench::setup(&url).await?))
        }
        BackendKind::Redis => {
            let url = args.backend.url(args.url.clone())?;
            Box::new(kv::KvSuite::new(redis::RedisBench::new(&url)?))
        }
        BackendKind::Etcd => {
            let url = args.backend.url(args.url.clone())?;
            Box::new(kv::KvSuite::new(etcd::EtcdBench::new(&url)))
        }
        #[cfg(feature = "fdb")]
        BackendKind::Fdb => {
            return Err(Error::Config(
                "bench supports sqlite, postgres, mysql, redis and etcd".into(),
            ))
        }
    };
    let result = measure_all(suite.as_ref(), &args, &clients).await;
    let cleaned = suite.teardown().await;
    let samples = result?;
    cleaned?;
    if args.json {
        report::print_json(&samples);
    } else {
        report::print_table(&samples, &suite.comparisons(), args.seconds, args.rounds);
    }
    Ok(())
}

/// Every measurement `args` ask for, with a progress bar on stderr.
async fn measure_all(
    suite: &dyn Suite,
    args: &BenchArgs,
    clients: &[usize],
) -> Result<Vec<Sample>, Error> {
    let workloads = chosen(suite.workloads(), &args.workloads)?;
    let scale: Vec<&'static str> = if args.no_records {
        Vec::new()
    } else {
        let scale = suite.scale_workloads().iter().copied();
        scale.filter(|w| workloads.contains(w)).collect()
    };
    let records: &[u64] = if scale.is_empty() { &[] } else { &args.records };
    let total = (workloads.len() * clients.len() + scale.len() * records.len()) * args.rounds;
    let progress = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} (eta {eta})")
            .map_err(|e| Error::Config(e.to_string()))?,
    );
    let mut samples = Vec::with_capacity(total);
    for &c in clients {
        let measured = rounds(suite, &workloads, c, args, &progress, "").await?;
        samples.extend(
            measured
                .into_iter()
                .map(|(name, summary)| Sample::new(suite.backend(), name, c, None, summary)),
        );
    }
    let scale_clients = clients.iter().copied().max().unwrap_or(1);
    for &n in records {
        progress.set_message(format!("prefilling {n} records"));
        let stored = suite.prefill(n).await?;
        let at = format!(" at {stored} records");
        let measured = rounds(suite, &scale, scale_clients, args, &progress, &at).await?;
        samples.extend(measured.into_iter().map(|(name, summary)| {
            Sample::new(suite.backend(), name, scale_clients, Some(stored), summary)
        }));
    }
    progress.finish_and_clear();
    Ok(samples)
}

/// The workloads of `all` that `names` ask for, in `all`'s order (every one when `names` is
/// empty); a name `all` does not have is an error that lists the names it has.
fn chosen(all: Vec<&'static str>, names: &[String]) -> Result<Vec<&'static str>, Error> {
    if let Some(unknown) = names.iter().find(|n| !all.contains(&n.as_str())) {
        return Err(Error::Config(format!(
            "no workload named {unknown} here; this backend has: {}",
            all.join(", ")
        )));
    }
    Ok(all
        .into_iter()
        .filter(|w| names.is_empty() || names.iter().any(|n| n == w))
        .collect())
}

/// `args.rounds` rounds of every workload of `names` at `clients`, interleaved.
async fn rounds(
    suite: &dyn Suite,
    names: &[&'static str],
    clients: usize,
    args: &BenchArgs,
    progress: &ProgressBar,
    at: &str,
) -> Result<Vec<(&'static str, Summary)>, Error> {
    let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); names.len()];
    for round in 1..=args.rounds {
        for (i, &name) in names.iter().enumerate() {
            progress.set_message(format!(
                "{name} x{clients}{at}, round {round}/{}",
                args.rounds
            ));
            runs[i].push(suite.measure(name, clients, args.seconds).await?);
            progress.inc(1);
        }
    }
    names
        .iter()
        .zip(runs)
        .map(|(&name, runs)| Ok((name, Summary::of(&runs)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::chosen;

    #[test]
    fn workloads_are_chosen_by_name_in_the_suites_order() {
        let all = vec!["insert", "pk-select", "replay"];
        assert_eq!(chosen(all.clone(), &[]).unwrap(), all);
        let names = ["replay".to_string(), "insert".to_string()];
        assert_eq!(chosen(all.clone(), &names).unwrap(), ["insert", "replay"]);
        let err = chosen(all, &["replay-fast".to_string()]).unwrap_err();
        assert!(
            err.to_string().contains("replay-fast") && err.to_string().contains("pk-select"),
            "{err}"
        );
    }
}
