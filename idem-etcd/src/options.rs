//! [`EtcdOptions`]: the key prefix, timeouts and limits of an [`crate::EtcdStore`].

use std::time::Duration;

use idem_core::Error;

/// etcd's default `--max-request-bytes` (1.5 MiB).
pub const ETCD_DEFAULT_MAX_REQUEST_BYTES: usize = 1_572_864;

/// Options for [`crate::EtcdStore::connect_with`].
///
/// ```
/// use std::time::Duration;
/// use idem_etcd::EtcdOptions;
/// let options = EtcdOptions::default()
///     .with_key_prefix("billing/idem/")
///     .with_request_timeout(Duration::from_secs(2));
/// assert!(options.validate().is_ok());
/// assert!(EtcdOptions::default().with_key_prefix("no-slash").validate().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdOptions {
    /// The namespace: every key the store writes starts with it. 1 to 128 bytes of visible
    /// ASCII ending in `/`. Two stores whose prefixes nest (`a/` and `a/m/`) must not share a
    /// cluster. Default `idem/`.
    pub key_prefix: String,
    /// Timeout of establishing a connection to a member. Default 5 s.
    pub connect_timeout: Duration,
    /// Timeout of one request; past it the call fails with a retryable error and its write,
    /// if any, is indeterminate. Default 5 s.
    pub request_timeout: Duration,
    /// The largest request the store sends (keys, record and outcome together); a larger
    /// outcome is refused with [`Error::TooLarge`] before anything is sent. Keep it at or
    /// below the cluster's `--max-request-bytes`. Default 1.5 MiB, etcd's default.
    pub max_request_bytes: usize,
    /// How many records one page of a `purge` or `stats` scan reads. Default 500.
    pub page_size: usize,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            key_prefix: "idem/".into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            max_request_bytes: ETCD_DEFAULT_MAX_REQUEST_BYTES,
            page_size: 500,
        }
    }
}

impl EtcdOptions {
    /// Sets [`EtcdOptions::key_prefix`].
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Sets [`EtcdOptions::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`EtcdOptions::request_timeout`].
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`EtcdOptions::max_request_bytes`].
    pub fn with_max_request_bytes(mut self, bytes: usize) -> Self {
        self.max_request_bytes = bytes;
        self
    }

    /// Sets [`EtcdOptions::page_size`].
    pub fn with_page_size(mut self, records: usize) -> Self {
        self.page_size = records;
        self
    }

    /// Checks every option; [`crate::EtcdStore::connect_with`] calls it. A bad value is
    /// [`Error::Config`].
    pub fn validate(&self) -> Result<(), Error> {
        let p = self.key_prefix.as_bytes();
        if p.is_empty()
            || p.len() > 128
            || !p.iter().all(|b| (0x21..=0x7e).contains(b))
            || !p.ends_with(b"/")
        {
            return Err(Error::Config(format!(
                "etcd key prefix {:?} must be 1 to 128 bytes of visible ASCII ending in `/`",
                self.key_prefix
            )));
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(Error::Config("etcd timeouts must be positive".into()));
        }
        if self.max_request_bytes < 4096 {
            return Err(Error::Config(format!(
                "etcd max_request_bytes {} is below 4096",
                self.max_request_bytes
            )));
        }
        if self.page_size == 0 || self.page_size > 10_000 {
            return Err(Error::Config(format!(
                "etcd page_size {} is not in 1..=10000",
                self.page_size
            )));
        }
        Ok(())
    }
}
