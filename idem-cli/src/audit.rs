//! `idem audit`: probes one HTTP endpoint's idempotency (see `docs/audit.md`).
//!
//! Exit status: 0 no probe failed (and at least one passed), 1 a probe failed, 2 the
//! arguments were refused (nothing was sent), 3 the audit stopped at a bound (request
//! count or duration), 4 no probe could judge anything (every probe not applicable).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use idem_audit::{parse_duration, Audit, AuditConfig, AuditError, EXIT_FAILED, EXIT_OK};
use indicatif::{ProgressBar, ProgressStyle};

use crate::error::CliError;

/// The report's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table, evidence under each probe.
    Table,
    /// JSON.
    Json,
    /// JUnit XML, one test case per probe.
    Junit,
}

/// `idem audit` arguments.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// The endpoint to audit; the only URL requests are sent to (http:// only).
    #[arg(long)]
    url: String,
    /// The request method.
    #[arg(long, default_value = "POST")]
    method: String,
    /// The request body (JSON is sent with Content-Type: application/json).
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// A file holding the request body.
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// The body for the changed-payload probe (default: the body with one value changed).
    #[arg(long)]
    changed_body: Option<String>,
    /// An extra header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// The header carrying the key.
    #[arg(long, default_value = "Idempotency-Key")]
    key_header: String,
    /// A tenant or auth header: enables the scope probe (the first tenant is its -H value).
    #[arg(long)]
    tenant_header: Option<String>,
    /// The second tenant's value for the scope probe.
    #[arg(long, default_value = "idem-audit-tenant-b")]
    second_tenant: String,
    /// JSON pointer to the resource id in responses.
    #[arg(long, default_value = "/id")]
    id_field: String,
    /// A GET endpoint counting effects (same scheme, host and port as --url).
    #[arg(long)]
    count_url: Option<String>,
    /// JSON pointer to the count when the count endpoint answers an object.
    #[arg(long, default_value = "/count")]
    count_field: String,
    /// Concurrent requests in the burst probe.
    #[arg(long, default_value_t = 10)]
    burst: usize,
    /// Delays before each retry after completion, comma-separated (`0,1s,5s`).
    #[arg(long, default_value = "0,1s", value_delimiter = ',')]
    retry_delays: Vec<String>,
    /// A retry after this delay must still replay (the key-expiry probe, e.g. `25h`).
    #[arg(long)]
    retention_probe: Option<String>,
    /// When the lost-response probe drops the connection after sending.
    #[arg(long, default_value = "50ms")]
    drop_after: String,
    /// When the changed payload is sent after the original (to be in flight).
    #[arg(long, default_value = "20ms")]
    in_flight_delay: String,
    /// Per-request timeout.
    #[arg(long, default_value = "10s")]
    timeout: String,
    /// How long a probe keeps retrying 409 (in progress) answers.
    #[arg(long, default_value = "60s")]
    max_wait: String,
    /// Most requests the whole audit may send.
    #[arg(long, default_value_t = 500)]
    max_requests: usize,
    /// Longest the whole audit may run.
    #[arg(long, default_value = "10m")]
    max_duration: String,
    /// Report format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Print the plan and send nothing.
    #[arg(long)]
    dry_run: bool,
}

impl AuditArgs {
    fn config(&self) -> Result<AuditConfig, AuditError> {
        let mut config = AuditConfig::new(&self.url);
        config.method.clone_from(&self.method);
        if let Some(body) = &self.body {
            config.body = body.clone().into_bytes();
        }
        if let Some(path) = &self.body_file {
            config.body = std::fs::read(path).map_err(|e| AuditError::OutOfBounds {
                what: "--body-file",
                value: path.display().to_string(),
                bound: format!("a readable file ({e})"),
            })?;
        }
        config.changed_body = self.changed_body.clone().map(String::into_bytes);
        config.headers.clone_from(&self.headers);
        config.key_header.clone_from(&self.key_header);
        config.tenant_header.clone_from(&self.tenant_header);
        config.second_tenant.clone_from(&self.second_tenant);
        config.id_field.clone_from(&self.id_field);
        config.count_url.clone_from(&self.count_url);
        config.count_field.clone_from(&self.count_field);
        config.burst = self.burst;
        config.retry_delays = self
            .retry_delays
            .iter()
            .map(|d| parse_duration(d))
            .collect::<Result<Vec<Duration>, _>>()?;
        config.retention_probe = self
            .retention_probe
            .as_deref()
            .map(parse_duration)
            .transpose()?;
        config.drop_after = parse_duration(&self.drop_after)?;
        config.in_flight_delay = parse_duration(&self.in_flight_delay)?;
        config.timeout = parse_duration(&self.timeout)?;
        config.max_wait = parse_duration(&self.max_wait)?;
        config.max_requests = self.max_requests;
        config.max_duration = parse_duration(&self.max_duration)?;
        Ok(config)
    }
}

/// Runs the audit and prints the report; the exit status is the report's (see the module
/// docs). Arguments the auditor refuses are [`CliError::Audit`] (status 2, nothing sent).
pub async fn run(args: AuditArgs) -> Result<ExitCode, CliError> {
    let audit = args.config().and_then(Audit::new)?;
    if args.dry_run {
        print!("{}", audit.plan_text());
        return Ok(ExitCode::SUCCESS);
    }
    let progress = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template("{spinner} probe {pos}/{len} {msg}") {
        progress.set_style(style);
    }
    progress.enable_steady_tick(Duration::from_millis(120));
    let report = audit.run_with_progress(&progress).await?;
    let text = match args.format {
        Format::Table => report.to_table(),
        Format::Json => report.to_json() + "\n",
        Format::Junit => report.to_junit(),
    };
    print!("{text}");
    let _ = std::io::stdout().flush();
    let code = report.exit_code();
    if code != EXIT_OK && code != EXIT_FAILED {
        match &report.aborted {
            Some(why) => eprintln!("idem audit: stopped early: {why}"),
            None => {
                eprintln!("idem audit: no probe could judge anything (every probe not applicable)")
            }
        }
    }
    Ok(ExitCode::from(code))
}
