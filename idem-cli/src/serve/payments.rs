//! The payments ledger and the handlers of `idem serve`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use idem::sqlite::rusqlite::{self, Connection, OptionalExtension};
use idem::{Error, LeaseHandle};
use idem_http::problem;
use serde::{Deserialize, Serialize};

use super::DEFAULT_TENANT;

/// The handlers' state.
pub struct App {
    pub ledger: Ledger,
    /// Simulated processing after the payment is written.
    pub work: Duration,
}

/// The tenant of a request: `X-Tenant`, else [`DEFAULT_TENANT`].
pub fn tenant(headers: &HeaderMap) -> &str {
    headers
        .get("x-tenant")
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty())
        .unwrap_or(DEFAULT_TENANT)
}

/// A payment as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Payment {
    id: String,
    tenant: String,
    account: String,
    amount: u64,
    currency: String,
}

/// The body of `POST /payments`.
#[derive(Debug, Deserialize)]
struct NewPayment {
    account: String,
    amount: serde_json::Value,
    currency: String,
}

/// The payments table in a SQLite file; one connection, used from blocking threads.
#[derive(Clone)]
pub struct Ledger(Arc<Mutex<Connection>>);

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS payments (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    account TEXT NOT NULL,
    amount INTEGER NOT NULL,
    currency TEXT NOT NULL
)";

fn sqlite_err(e: rusqlite::Error) -> Error {
    Error::permanent(e)
}

impl Ledger {
    /// Opens (creating) the ledger at `path`.
    pub async fn open(path: PathBuf) -> Result<Self, Error> {
        let conn = tokio::task::spawn_blocking(move || {
            let conn = Connection::open(&path).map_err(sqlite_err)?;
            conn.busy_timeout(Duration::from_secs(5))
                .map_err(sqlite_err)?;
            conn.execute_batch(SCHEMA).map_err(sqlite_err)?;
            Ok::<_, Error>(conn)
        })
        .await
        .map_err(Error::permanent)??;
        Ok(Ledger(Arc::new(Mutex::new(conn))))
    }

    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, Error> {
        let conn = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&conn).map_err(sqlite_err)
        })
        .await
        .map_err(Error::permanent)?
    }

    /// Writes `payment` unless a payment with its id exists; the stored one either way.
    async fn insert(&self, payment: Payment) -> Result<Payment, Error> {
        self.call(move |conn| {
            conn.execute(
                "INSERT INTO payments (id, tenant, account, amount, currency)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING",
                (
                    &payment.id,
                    &payment.tenant,
                    &payment.account,
                    payment.amount as i64,
                    &payment.currency,
                ),
            )?;
            read(conn, &payment.tenant, &payment.id).map(|p| p.unwrap_or(payment))
        })
        .await
    }

    async fn get(&self, tenant: String, id: String) -> Result<Option<Payment>, Error> {
        self.call(move |conn| read(conn, &tenant, &id)).await
    }
}

fn read(conn: &Connection, tenant: &str, id: &str) -> rusqlite::Result<Option<Payment>> {
    conn.query_row(
        "SELECT id, tenant, account, amount, currency FROM payments WHERE id = ?1 AND tenant = ?2",
        (id, tenant),
        |row| {
            Ok(Payment {
                id: row.get(0)?,
                tenant: row.get(1)?,
                account: row.get(2)?,
                amount: row.get::<_, i64>(3)?.max(0) as u64,
                currency: row.get(4)?,
            })
        },
    )
    .optional()
}

/// `POST /payments`, behind the idempotency layer.
pub async fn create(
    State(app): State<Arc<App>>,
    Extension(lease): Extension<LeaseHandle<dyn idem::Store>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let new: NewPayment = match serde_json::from_slice(&body) {
        Ok(new) => new,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "bad-json",
                &format!("the body is not a payment: {e}"),
            )
            .into_response()
        }
    };
    let amount = match new.amount.as_u64() {
        Some(amount) if amount > 0 && amount <= i64::MAX as u64 => amount,
        _ => {
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "bad-amount",
                &format!("amount must be a positive integer, not {}", new.amount),
            )
            .into_response()
        }
    };
    if new.account.is_empty() || new.currency.is_empty() {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad-payment",
            "account and currency must not be empty",
        )
        .into_response();
    }
    // The id is derived from the key: a re-run after a crash writes nothing new.
    let derived = lease.derive("payment");
    let payment = Payment {
        id: format!("pay_{}", &derived.id()[6..30]),
        tenant: tenant(&headers).to_string(),
        account: new.account,
        amount,
        currency: new.currency,
    };
    let payment = match app.ledger.insert(payment).await {
        Ok(payment) => payment,
        Err(e) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "ledger",
                &format!("the ledger is unavailable: {e}"),
            )
            .into_response()
        }
    };
    println!(
        "payment {} written ({} {} for {}/{})",
        payment.id, payment.amount, payment.currency, payment.tenant, payment.account
    );
    if !app.work.is_zero() {
        tokio::time::sleep(app.work).await;
    }
    (
        StatusCode::CREATED,
        [(header::LOCATION, format!("/payments/{}", payment.id))],
        axum::Json(payment),
    )
        .into_response()
}

/// `GET /payments/{id}`: the tenant's payment.
pub async fn show(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    match app.ledger.get(tenant(&headers).to_string(), id).await {
        Ok(Some(payment)) => axum::Json(payment).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "not-found", "no such payment").into_response(),
        Err(e) => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "ledger",
            &format!("the ledger is unavailable: {e}"),
        )
        .into_response(),
    }
}
