//! `idem`: the phantom-write lab, the payments demo, benchmarks, and operator commands.

mod audit;
mod bench;
mod demo;
mod error;
mod lab;
mod ops;
mod pipeline;
mod scratch;
mod serve;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::CliError;
use crate::lab::LabConfig;
use crate::ops::show::Format;
use crate::target::{OpsTarget, Target};

#[derive(Parser)]
#[command(
    name = "idem",
    version,
    about = "Make retried operations take effect exactly once.",
    after_help = "Exit status of the operator commands (stats, get, list, purge, migrate, check): \
0 done; 1 check found a failing property; 2 bad arguments or a store error; 3 the records \
table (or SQLite file) does not exist, and nothing was created; 4 cannot connect to the \
server within --connect-timeout. `idem audit` documents its own."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The phantom-write lab: naive strategies and the barrier, side by side, on a real
    /// backend, judged by the ledger.
    Lab {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        config: LabConfig,
        /// Print the results as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The payments demo on embedded SQLite: duplicates, a crash, a 26-hour-late redelivery,
    /// a reused key, and the resulting ledger.
    Demo {
        /// SQLite database file to create (an existing file is refused, never overwritten;
        /// default: a new file in a temporary directory, removed afterwards).
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Benchmarks: the barrier beside the same work without it and the hand-rolled
    /// pattern, as ratios from one run, with p50/p99 latency (`--json`: one object per line).
    Bench(bench::BenchArgs),
    /// Record counts per state (also published as the `idem_records` gauge by the library).
    /// Read-only: creates nothing, and says so when the table is absent (exit 3).
    Stats {
        #[command(flatten)]
        target: OpsTarget,
    },
    /// Deletes records whose retention has passed, in batches, with progress on stderr.
    Purge {
        #[command(flatten)]
        target: OpsTarget,
        /// Records per batch (one statement or script call each).
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Count what would be purged (reading the records) and delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// A payments HTTP API behind the Idempotency-Key layer (POST /payments,
    /// GET /payments/{id}, GET /metrics).
    Serve(serve::ServeArgs),
    /// Audits any HTTP endpoint's idempotency: burst, retries, lost response, changed
    /// payload, missing key, tenant scope, key expiry. Exit 0 all passed, 1 a probe failed,
    /// 2 bad arguments (nothing sent), 3 stopped at a bound, 4 nothing could be judged.
    Audit(Box<audit::AuditArgs>),
    /// Orders -> transactional outbox -> relay -> broker -> consumer barrier -> ledger, with
    /// faults at every boundary; exit 1 on any duplicate or lost message.
    Pipeline(Box<pipeline::PipelineArgs>),
    /// Shows one key's record (read-only). Outcomes show as JSON when they are, else
    /// UTF-8 text, else hex.
    Get {
        #[command(flatten)]
        target: OpsTarget,
        /// The key's scope.
        #[arg(long)]
        scope: String,
        /// The key's id.
        #[arg(long)]
        id: String,
        /// `table` for people, `json` for one object per line with stable field names.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Lists records in the store's key order (read-only; every backend but FoundationDB).
    List {
        #[command(flatten)]
        target: OpsTarget,
        /// Only this scope.
        #[arg(long)]
        scope: Option<String>,
        /// At most this many records (stderr says when there are more).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// `table` for people, `json` for one object per line with stable field names.
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Creates the records table (idempotent); `--print` prints the DDL for review without
    /// connecting. Redis and etcd have no schema.
    Migrate {
        #[command(flatten)]
        target: OpsTarget,
        /// Print the DDL instead of running it.
        #[arg(long)]
        print: bool,
    },
    /// Runs the conformance suite against the configured store (every backend but
    /// FoundationDB) in a scratch namespace it removes afterwards, and prints the report;
    /// exit 1 if a property failed.
    Check {
        #[command(flatten)]
        target: OpsTarget,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("idem: {}", idem::ErrorChain(&e));
            e.exit_code()
        }
    }
}

/// Runs the command: 0 when all went well, 1 when it ran and found a problem (a violation,
/// a failed probe), an error (status 2) when it could not run.
async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let passed = match cli.command {
        Command::Lab {
            target,
            config,
            json,
        } => lab::run(&target, &config, json).await?,
        Command::Demo { db } => {
            let db = scratch::ScratchDb::new(db.as_deref(), "idem-demo.db")?;
            demo::run(db.path()).await?
        }
        Command::Bench(args) => {
            bench::run(args).await?;
            true
        }
        Command::Stats { target } => {
            ops::stats(&target).await?;
            true
        }
        Command::Purge {
            target,
            batch,
            dry_run,
        } => {
            ops::purge(&target, batch, dry_run).await?;
            true
        }
        Command::Serve(args) => serve::run(args).await?,
        Command::Audit(args) => return audit::run(*args).await,
        Command::Pipeline(args) => pipeline::run(*args).await?,
        Command::Get {
            target,
            scope,
            id,
            format,
        } => {
            ops::get(&target, scope, id, format).await?;
            true
        }
        Command::List {
            target,
            scope,
            limit,
            format,
        } => {
            ops::list(&target, scope, limit, format).await?;
            true
        }
        Command::Migrate { target, print } => {
            ops::migrate(&target, print).await?;
            true
        }
        Command::Check { target } => ops::check::run(&target).await?,
    };
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
