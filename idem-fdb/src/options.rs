//! [`FdbOptions`]: the subspace and the per-transaction limits of an [`crate::FdbStore`].

use std::time::Duration;

use foundationdb::tuple::Subspace;
use idem_core::Error;

/// The default subspace's name: the store writes under `("idem", "default")`.
pub const DEFAULT_NAME: &str = "default";

/// How a [`FdbStore`](crate::FdbStore) is set up: where its keys live, and the limits that
/// make an unreachable cluster an error rather than a hang.
///
/// ```no_run
/// use std::time::Duration;
/// use idem_fdb::FdbOptions;
/// let options = FdbOptions::default()
///     .with_name("billing")?
///     .with_timeout(Duration::from_secs(2))
///     .with_retry_limit(10);
/// # Ok::<(), idem_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FdbOptions {
    pub(crate) subspace: Subspace,
    pub(crate) timeout: Duration,
    pub(crate) retry_limit: u32,
}

impl Default for FdbOptions {
    /// The subspace `("idem", "default")`, a 5 s timeout, 20 retries.
    fn default() -> Self {
        FdbOptions {
            subspace: named(DEFAULT_NAME),
            timeout: Duration::from_secs(5),
            retry_limit: 20,
        }
    }
}

impl FdbOptions {
    /// Uses the subspace `("idem", name)`: `name` is 1 to 255 bytes without control
    /// characters. Anything else is [`Error::Config`].
    pub fn with_name(mut self, name: &str) -> Result<Self, Error> {
        if name.is_empty() || name.len() > 255 || name.chars().any(char::is_control) {
            return Err(Error::Config(format!(
                "FoundationDB store name {name:?} must be 1 to 255 bytes without control characters"
            )));
        }
        self.subspace = named(name);
        Ok(self)
    }

    /// Uses a subspace of your choosing (not the empty one: the store's keys would mix with
    /// everything else in the database; [`crate::FdbStore::connect_with`] refuses it).
    pub fn with_subspace(mut self, subspace: Subspace) -> Self {
        self.subspace = subspace;
        self
    }

    /// The timeout of one transaction, retries included (FoundationDB's `timeout` option);
    /// past it the call fails with a retryable error. 1 ms to `i32::MAX` ms (0 would mean
    /// no timeout). Default 5 s, which is also FoundationDB's limit on a transaction's life.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How many times a transaction is retried after a conflict or a retryable error
    /// (FoundationDB's `retry_limit` option; at most `i32::MAX`). Default 20.
    pub fn with_retry_limit(mut self, retries: u32) -> Self {
        self.retry_limit = retries;
        self
    }

    /// The subspace.
    pub fn subspace(&self) -> &Subspace {
        &self.subspace
    }

    /// The transaction timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The retry limit.
    pub fn retry_limit(&self) -> u32 {
        self.retry_limit
    }

    /// Checks what the builders cannot check on their own.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.subspace.bytes().is_empty() {
            return Err(Error::Config(
                "the FoundationDB store needs a non-empty subspace".into(),
            ));
        }
        let ms = self.timeout.as_millis();
        if ms == 0 || ms > i32::MAX as u128 {
            return Err(Error::Config(format!(
                "FoundationDB transaction timeout {:?} is not within 1 ms and {} ms",
                self.timeout,
                i32::MAX
            )));
        }
        if i32::try_from(self.retry_limit).is_err() {
            return Err(Error::Config(format!(
                "FoundationDB retry limit {} is above {}",
                self.retry_limit,
                i32::MAX
            )));
        }
        Ok(())
    }

    /// The timeout in milliseconds and the retry limit, as the options take them (checked
    /// by [`FdbOptions::validate`]).
    pub(crate) fn transaction_limits(&self) -> (i32, i32) {
        (
            i32::try_from(self.timeout.as_millis()).unwrap_or(i32::MAX),
            i32::try_from(self.retry_limit).unwrap_or(i32::MAX),
        )
    }
}

fn named(name: &str) -> Subspace {
    Subspace::all().subspace(&("idem", name))
}
