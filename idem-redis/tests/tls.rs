//! TLS (feature `tls`): a `rediss://` URL makes the store speak TLS. The local server of the
//! tests has no TLS port, so the handshake must fail: promptly (the connect timeout), with
//! a typed, retryable error (a server may be reconfigured), without panicking for want of a
//! crypto provider, and without showing the password of the URL.
#![cfg(feature = "tls")]

mod common;

use std::time::Duration;

use idem_redis::{RedisOptions, RedisStore};

#[tokio::test]
async fn a_tls_handshake_with_a_plain_server_fails_cleanly_without_leaking_the_password() {
    let base = common::url();
    let Some(rest) = base.strip_prefix("redis://") else {
        eprintln!("skipped: IDEM_REDIS_URL is not a redis:// URL");
        return;
    };
    if common::plain(&base).await.is_none() {
        assert!(
            !idem_conformance::required("redis"),
            "redis is required but does not answer at {base}"
        );
        eprintln!("skipped: no Redis at {base}");
        return;
    }
    let url = format!("rediss://:s3cret-pw@{rest}");
    let options = RedisOptions::default().with_connect_timeout(Duration::from_secs(2));
    let Err(e) = RedisStore::connect_with(&url, options).await else {
        panic!("a TLS handshake with a plain-text server cannot succeed");
    };
    let shown = format!("{e} {e:?}");
    assert!(!shown.contains("s3cret-pw"), "the password leaked: {shown}");
    assert!(e.is_retryable(), "{shown}");
}
