//! TLS (feature `tls`): a store connected with `sslmode=require` talks to the server over
//! TLS. The local server of the tests has `ssl = on` (Debian's default, a snake-oil
//! certificate, hence `require` rather than `verify-full`); against a server without TLS
//! the same URL must fail with a clear error that does not show the password.
#![cfg(feature = "tls")]

mod common;

use idem_postgres::PgStore;

#[tokio::test]
async fn sslmode_require_connects_over_tls_or_fails_without_leaking_the_password() {
    let base = common::url();
    let Some(rest) = base.strip_prefix("postgres://postgres@") else {
        eprintln!("skipped: IDEM_POSTGRES_URL is not of the form postgres://postgres@host/db");
        return;
    };
    let url = format!("postgres://postgres:s3cret-pw@{rest}?sslmode=require");
    match PgStore::connect(&url).await {
        Ok(store) => {
            let tls: bool =
                sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                    .fetch_one(store.pool())
                    .await
                    .unwrap();
            assert!(tls, "sslmode=require, yet the connection is not encrypted");
        }
        Err(e) => {
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("s3cret-pw"), "the password leaked: {shown}");
            // With the server required (CI), only a refusal of TLS itself is acceptable.
            let about_tls = ["TLS", "tls", "SSL", "ssl"]
                .iter()
                .any(|w| shown.contains(w));
            assert!(
                !idem_conformance::required("postgres") || about_tls,
                "not a TLS refusal: {shown}"
            );
            eprintln!("no TLS connection (the server does not offer TLS, or is absent): {e}");
        }
    }
}
