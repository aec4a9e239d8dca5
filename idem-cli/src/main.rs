//! `idem`: the phantom-write lab, the payments demo, benchmarks, and operator commands.

mod backend;
mod bench;
mod demo;
#[cfg(feature = "fdb")]
mod fdb_lab;
mod lab;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use idem::{Clock, DynStore, Error, Key, SystemClock};

use crate::backend::{LabBackend, PgLab, RedisLab, SqliteLab};
use crate::lab::{LabConfig, Strategy};

#[derive(Parser)]
#[command(
    name = "idem",
    version,
    about = "Make retried operations take effect exactly once."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendKind {
    Sqlite,
    Postgres,
    Redis,
    /// FoundationDB (built with the `fdb` feature), at `--cluster-file`.
    #[cfg(feature = "fdb")]
    Fdb,
}

#[derive(clap::Args, Clone, Debug)]
struct Target {
    /// Which store.
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: BackendKind,
    /// Server URL for postgres and redis (defaults: IDEM_POSTGRES_URL / IDEM_REDIS_URL, then
    /// the local servers).
    #[arg(long)]
    url: Option<String>,
    /// SQLite database file (default: a file in the temporary directory).
    #[arg(long)]
    db: Option<PathBuf>,
    /// FoundationDB cluster file (default: the system's).
    #[cfg(feature = "fdb")]
    #[arg(long)]
    cluster_file: Option<String>,
}

impl Target {
    fn url(&self) -> String {
        server_url(self.backend, self.url.clone())
    }

    fn db(&self, name: &str) -> PathBuf {
        self.db
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(name))
    }

    async fn lab(&self) -> Result<Arc<dyn LabBackend>, Error> {
        Ok(match self.backend {
            BackendKind::Sqlite => {
                let path = self.db("idem-lab.db");
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
                Arc::new(SqliteLab::open(&path).await?)
            }
            BackendKind::Postgres => Arc::new(PgLab::connect(&self.url(), 32).await?),
            BackendKind::Redis => Arc::new(RedisLab::connect(&self.url()).await?),
            #[cfg(feature = "fdb")]
            BackendKind::Fdb => Arc::new(fdb_lab::FdbLab::open(self.cluster_file.as_deref())?),
        })
    }

    async fn store(&self) -> Result<DynStore, Error> {
        Ok(match self.backend {
            BackendKind::Sqlite => {
                Arc::new(idem::sqlite::SqliteStore::open(self.db("idem.db")).await?)
            }
            BackendKind::Postgres => Arc::new(idem::postgres::PgStore::connect(&self.url()).await?),
            BackendKind::Redis => Arc::new(idem::redis::RedisStore::connect(&self.url()).await?),
            #[cfg(feature = "fdb")]
            BackendKind::Fdb => Arc::new(idem::fdb::FdbStore::open(
                self.cluster_file.as_deref(),
                "default",
                idem::fdb::FdbOptions::default(),
            )?),
        })
    }
}

/// The server URL: the one given, else `IDEM_POSTGRES_URL` / `IDEM_REDIS_URL`, else the
/// local server.
fn server_url(backend: BackendKind, explicit: Option<String>) -> String {
    let (var, default) = match backend {
        BackendKind::Postgres => (
            "IDEM_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        ),
        _ => ("IDEM_REDIS_URL", "redis://127.0.0.1:6379/"),
    };
    explicit
        .or_else(|| std::env::var(var).ok())
        .unwrap_or_else(|| default.to_string())
}

#[derive(Subcommand)]
enum Command {
    /// The phantom-write lab: naive strategies and the barrier, side by side, on a real
    /// backend, judged by the ledger.
    Lab {
        #[command(flatten)]
        target: Target,
        /// Payments in the workload.
        #[arg(long, default_value_t = 2000)]
        payments: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 500)]
        clients: usize,
        /// Share of responses lost after the server applied them (the client retries).
        #[arg(long, default_value_t = 0.10)]
        lost: f64,
        /// Share of workers that die between the debit and the credit.
        #[arg(long, default_value_t = 0.05)]
        crash: f64,
        /// Share of requests redelivered after a 26-hour clock jump.
        #[arg(long, default_value_t = 0.10)]
        late: f64,
        /// Share of keys reused with a different amount.
        #[arg(long, default_value_t = 0.02)]
        reuse: f64,
        /// Simulated latency of the payment network between the two legs, in ms.
        #[arg(long, default_value_t = 2)]
        latency_ms: u64,
        /// Seed of the workload (the same seed gives the same requests).
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Print the results as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The payments demo on embedded SQLite: duplicates, a crash, a 26-hour-late redelivery,
    /// a reused key, and the resulting ledger.
    Demo {
        /// SQLite database file (recreated).
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Benchmarks printing the barrier against the same work without it.
    Bench {
        /// postgres or redis.
        #[arg(value_enum)]
        backend: BackendKind,
        /// Server URL (defaults as for `lab`).
        #[arg(long)]
        url: Option<String>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Record counts per state (also published as the `idem_records` gauge by the library).
    Stats {
        #[command(flatten)]
        target: Target,
    },
    /// Deletes records whose retention has passed, in batches.
    Purge {
        #[command(flatten)]
        target: Target,
        /// Records per batch.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
    /// Shows one key's record.
    Get {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        scope: String,
        #[arg(long)]
        id: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("idem: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> Result<bool, Error> {
    match cli.command {
        Command::Lab {
            target,
            payments,
            clients,
            lost,
            crash,
            late,
            reuse,
            latency_ms,
            seed,
            json,
        } => {
            for (name, share) in [
                ("lost", lost),
                ("crash", crash),
                ("late", late),
                ("reuse", reuse),
            ] {
                if !(0.0..=1.0).contains(&share) {
                    return Err(Error::Config(format!(
                        "--{name} must be between 0 and 1, got {share}"
                    )));
                }
            }
            let config = LabConfig {
                payments,
                clients,
                lost,
                crash,
                late,
                reuse,
                latency_ms,
                seed,
            };
            let backend = target.lab().await?;
            let mut reports = Vec::new();
            for strategy in Strategy::ALL {
                backend.reset().await?;
                if let Some(r) =
                    lab::run_strategy(Arc::clone(&backend), strategy, &config, json).await?
                {
                    reports.push(r);
                }
            }
            if json {
                let out = serde_json::json!({ "config": config, "results": reports });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out).map_err(|e| Error::Encode(Box::new(e)))?
                );
            } else {
                lab::print_table(&reports, &config);
            }
            let violations = lab::barrier_violations(&reports);
            for v in &violations {
                eprintln!("idem lab: BARRIER VIOLATION: {v}");
            }
            Ok(violations.is_empty())
        }
        Command::Demo { db } => {
            demo::run(&db.unwrap_or_else(|| std::env::temp_dir().join("idem-demo.db"))).await
        }
        Command::Bench {
            backend,
            url,
            seconds,
        } => {
            let url = server_url(backend, url);
            match backend {
                BackendKind::Postgres => bench::postgres(&url, seconds).await?,
                BackendKind::Redis => bench::redis(&url, seconds).await?,
                _ => return Err(Error::Config("bench supports postgres and redis".into())),
            }
            Ok(true)
        }
        Command::Stats { target } => {
            let s = target.store().await?.stats().await?;
            println!(
                "in_progress {}\ncompleted   {}\nfailed      {}\ntotal       {}",
                s.in_progress,
                s.completed,
                s.failed,
                s.total()
            );
            Ok(true)
        }
        Command::Purge { target, batch } => {
            let store = target.store().await?;
            let now = SystemClock.now();
            let mut total = 0;
            loop {
                let n = store.purge(now, batch.max(1)).await?;
                total += n;
                if n < batch.max(1) as u64 {
                    break;
                }
            }
            println!("purged {total} records");
            Ok(true)
        }
        Command::Get { target, scope, id } => {
            let key = Key::new(scope, id)?;
            match target.store().await?.get(&key).await? {
                Some(r) => println!("{r:#?}"),
                None => println!("no record for {key}"),
            }
            Ok(true)
        }
    }
}
