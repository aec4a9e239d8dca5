//! `idem serve`: a small payments API behind the HTTP layer of `idem-http`.
//!
//! - `POST /payments` with an `Idempotency-Key` and `{"account": "...", "amount": <positive
//!   integer>, "currency": "..."}` answers 201 with the payment (its `id` included) and a
//!   `Location`; retries with the key replay it.
//! - `GET /payments/{id}`: the tenant's payment, or 404.
//! - `GET /metrics`: Prometheus text (the layer's `idem_http_*` and the barrier's `idem_*`).
//!
//! The tenant is the `X-Tenant` header, `public` when absent. Keys live in the chosen store;
//! payments live in a SQLite ledger (`--payments-db`), written with an id derived from the
//! key, so a request re-run after a crash and a reclaimed lease finds its payment instead of
//! writing a second one.

mod payments;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use clap::ValueEnum;
use idem::{Barrier, InFlight};
use idem_http::{FingerprintBy, IdempotencyLayer};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::error::CliError;
use crate::target::Target;
use payments::Ledger;

/// The tenant of a request without `X-Tenant`.
pub const DEFAULT_TENANT: &str = "public";

/// What a duplicate of a running request gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InFlightArg {
    /// Wait (up to `--wait-ms`) for the first request's answer and replay it.
    Wait,
    /// 409 at once, with `Retry-After`.
    Reject,
}

/// `idem serve`'s flags.
#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Where the idempotency keys are kept.
    #[command(flatten)]
    target: Target,
    /// Address to listen on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// SQLite file of the payments ledger (default: idem-payments.db in the temporary
    /// directory).
    #[arg(long)]
    payments_db: Option<PathBuf>,
    /// Simulated processing inside the handler, in milliseconds, after the payment is
    /// written: makes in-flight duplicates (and crashes mid-request) easy to produce.
    #[arg(long, default_value_t = 0)]
    work_ms: u64,
    /// What a concurrent duplicate gets.
    #[arg(long, value_enum, default_value = "reject")]
    in_flight: InFlightArg,
    /// Longest wait of `--in-flight wait`, in milliseconds (then 409).
    #[arg(long, default_value_t = 10_000)]
    wait_ms: u64,
    /// Lease of a running request, in milliseconds: how soon a request whose server died
    /// can be taken over by a retry. Live requests extend it every third of it.
    #[arg(long, default_value_t = 10_000)]
    lease_ms: u64,
}

/// Runs the service until SIGTERM or Ctrl-C; in-flight requests finish before it exits.
pub async fn run(args: ServeArgs) -> Result<bool, CliError> {
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let store = args.target.store().await?;
    let ledger = Ledger::open(
        args.payments_db
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("idem-payments.db")),
    )
    .await?;
    let barrier = Barrier::new(store).with_lease(Duration::from_millis(args.lease_ms.max(1)));
    let in_flight = match args.in_flight {
        InFlightArg::Wait => InFlight::Wait(Duration::from_millis(args.wait_ms)),
        InFlightArg::Reject => InFlight::Reject,
    };
    let layer = IdempotencyLayer::new(barrier)
        .tenant(|req| payments::tenant(&req.headers).to_string())
        .fingerprint(FingerprintBy::MethodPathJson)
        .in_flight(in_flight);
    let state = Arc::new(payments::App {
        ledger,
        work: Duration::from_millis(args.work_ms),
    });
    let app = Router::new()
        .route("/payments", post(payments::create).layer(layer))
        .route("/payments/{id}", get(payments::show))
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| CliError::io(format!("cannot listen on {}", args.listen), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::io("cannot read the listening address", e))?;
    println!(
        "listening on http://{addr} (keys: {}, in flight: {:?}, work: {} ms)",
        args.target.backend.name(),
        args.in_flight,
        args.work_ms
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await
        .map_err(|e| CliError::io("the server failed", e))?;
    println!("stopped");
    Ok(true)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    println!("shutting down: finishing requests in flight");
}
