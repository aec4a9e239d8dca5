//! [`RedisOptions`]: the key prefix, timeouts, the largest outcome stored, the optional
//! retention TTL and the optional `WAIT` acknowledgement.

use std::time::Duration;

use idem_core::Error;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "idem:";
/// The default time to establish a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The default time to wait for a reply.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The default largest outcome stored (1 MiB).
pub const DEFAULT_MAX_OUTCOME_SIZE: usize = 1 << 20;
/// The longest key prefix accepted, in bytes.
pub const MAX_PREFIX_LEN: usize = 128;

/// Options of a [`crate::RedisStore`].
///
/// | option | default | meaning |
/// |---|---|---|
/// | [`key_prefix`](Self::with_key_prefix) | `idem:` | every key the store writes starts with it |
/// | [`connect_timeout`](Self::with_connect_timeout) | 2 s | one connection attempt |
/// | [`response_timeout`](Self::with_response_timeout) | 2 s | one reply; must cover sending and reading the largest outcome |
/// | [`max_outcome_size`](Self::with_max_outcome_size) | 1 MiB | larger outcomes are not stored: [`Error::TooLarge`], see the crate docs |
/// | [`ttl_grace`](Self::with_ttl_grace) | off | Redis deletes a record by itself this long after its `expires_at` |
/// | [`wait_replicas`](Self::with_wait_replicas) | off | `complete` and `fail` answer only after `WAIT n timeout` |
///
/// ```
/// use std::time::Duration;
/// use idem_redis::RedisOptions;
/// let options = RedisOptions::default()
///     .with_key_prefix("billing:idem:")?
///     .with_response_timeout(Duration::from_millis(500))
///     .with_max_outcome_size(64 * 1024);
/// assert_eq!(options.key_prefix(), "billing:idem:");
/// assert!(RedisOptions::default().with_key_prefix("no{braces}").is_err());
/// # Ok::<(), idem_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisOptions {
    key_prefix: String,
    connect_timeout: Duration,
    response_timeout: Duration,
    max_outcome_size: usize,
    ttl_grace: Option<Duration>,
    wait_replicas: Option<WaitReplicas>,
}

/// `WAIT` acknowledgement of completions: see [`RedisOptions::with_wait_replicas`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitReplicas {
    /// How many replicas must acknowledge the write.
    pub replicas: u32,
    /// How long the server waits for them.
    pub timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            key_prefix: DEFAULT_PREFIX.to_string(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            max_outcome_size: DEFAULT_MAX_OUTCOME_SIZE,
            ttl_grace: None,
            wait_replicas: None,
        }
    }
}

impl RedisOptions {
    /// Uses `prefix` for every key: 1 to [`MAX_PREFIX_LEN`] bytes, no `{` or `}` (the
    /// record's hash tag must be the one the store writes, see the crate docs) and no
    /// control characters or spaces. Glob characters (`*`, `?`, `[`) are allowed: scans
    /// escape them. Anything else is [`Error::Config`].
    pub fn with_key_prefix(mut self, prefix: impl Into<String>) -> Result<Self, Error> {
        let prefix = prefix.into();
        let bad = |why: &str| Err(Error::Config(format!("Redis key prefix {prefix:?}: {why}")));
        if prefix.is_empty() {
            return bad("must not be empty");
        }
        if prefix.len() > MAX_PREFIX_LEN {
            return bad("is longer than 128 bytes");
        }
        if prefix.contains(['{', '}']) {
            return bad("must not contain `{` or `}`: the store's hash tag must be the record's");
        }
        if prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return bad("must not contain control characters or whitespace");
        }
        self.key_prefix = prefix;
        Ok(self)
    }

    /// Sets how long one connection attempt may take.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets how long the store waits for one reply. A call whose reply does not come in
    /// time is reissued once (the scripts recognise their own earlier attempt) and then
    /// fails with a retryable [`Error::Store`]. It must be long enough to transfer the
    /// largest outcome ([`RedisOptions::with_max_outcome_size`]).
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Sets the largest outcome, in bytes, that `complete` and `fail` store. A larger one
    /// is never sent: the key is finished with a small marker instead and the caller gets
    /// [`Error::TooLarge`] (see the crate docs). [`crate::RedisStore::connect_with`] lowers
    /// it to what the server accepts (`proto-max-bulk-len`) when it can read that.
    pub fn with_max_outcome_size(mut self, bytes: usize) -> Self {
        self.max_outcome_size = bytes;
        self
    }

    /// Opt-in safety net: Redis deletes a record by itself (`PEXPIRE`) `grace` after its
    /// `expires_at`, for deployments where `purge` may never run. Off by default, because
    /// a record deleted by Redis is a key forgotten without `purge`, judged on the server's
    /// clock rather than the barrier's, and a record with a TTL can be evicted by a
    /// `volatile-*` `maxmemory-policy`.
    pub fn with_ttl_grace(mut self, grace: Duration) -> Self {
        self.ttl_grace = Some(grace);
        self
    }

    /// `complete` and `fail` (and the too-large marker) answer only after `replicas`
    /// replicas acknowledged the write (`WAIT replicas timeout`, sent in the same pipeline
    /// as the script so it waits for exactly that write). If fewer acknowledge within
    /// `timeout`, the call fails with a retryable [`Error::Store`]: the outcome is stored
    /// on the primary (a retry replays it while that primary lives) but not known to be
    /// replicated. `timeout` must be shorter than the response timeout. Claims (`begin`),
    /// `extend` and `release` are not waited for; see the crate docs for what remains.
    pub fn with_wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = Some(WaitReplicas { replicas, timeout });
        self
    }

    /// The key prefix.
    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// The connection timeout.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The response timeout.
    pub fn response_timeout(&self) -> Duration {
        self.response_timeout
    }

    /// The largest outcome stored, in bytes.
    pub fn max_outcome_size(&self) -> usize {
        self.max_outcome_size
    }

    /// The retention TTL's grace, if the safety net is on.
    pub fn ttl_grace(&self) -> Option<Duration> {
        self.ttl_grace
    }

    /// The `WAIT` acknowledgement, if on.
    pub fn wait_replicas(&self) -> Option<WaitReplicas> {
        self.wait_replicas
    }

    /// Checks the options that only make sense together.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.connect_timeout.is_zero() || self.response_timeout.is_zero() {
            return Err(Error::Config(
                "Redis connect and response timeouts must be longer than zero".into(),
            ));
        }
        if let Some(wait) = self.wait_replicas {
            if wait.timeout.is_zero() || wait.timeout >= self.response_timeout {
                return Err(Error::Config(format!(
                    "Redis WAIT timeout {:?} must be longer than zero and shorter than the \
                     response timeout {:?} (WAIT 0 blocks forever)",
                    wait.timeout, self.response_timeout
                )));
            }
        }
        Ok(())
    }

    /// Lowers the outcome limit to `limit` (what the server accepts).
    pub(crate) fn cap_outcome_size(&mut self, limit: usize) {
        self.max_outcome_size = self.max_outcome_size.min(limit);
    }
}
