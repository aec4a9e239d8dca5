//! The transactional outbox: outgoing messages that commit with the operation that sends
//! them, and a crash-safe relay that publishes them.
//!
//! # Enqueue
//!
//! Inside a transactional-mode operation ([`idem_core::Barrier::transaction`] on
//! [`idem_sqlite::SqliteStore`] or [`idem_postgres::PgStore`]), [`SqliteOutbox::enqueue`] or
//! [`PgOutbox::enqueue`] writes an [`Outgoing`] message through the operation's transaction.
//! It commits with the business writes and the key, or not at all. Its key is derived from
//! the operation's key and the message's label ([`idem_core::Key::derive`]): stable across
//! retries, so a retried operation replays and enqueues nothing, and an operation rolled
//! back and run again enqueues the same key.
//!
//! # Relay
//!
//! [`Relay::run_once`] claims a batch of pending messages, publishes each with
//! [`idem_broker::Publisher`] (which waits for the broker's acknowledgement), and marks it
//! sent. Messages with the same ordering key ([`Outgoing::ordering`], by default the
//! operation's key) are published in the order they were enqueued: only the oldest pending
//! message of each ordering key is claimed, and the next one only after it is marked sent.
//!
//! A claim is a lease on the row (`claimed_until`, fenced by a random token). A relay that
//! crashes anywhere leaves rows pending: claimed rows are claimed again once the lease runs
//! out, and a row published but not marked sent is published again, with the same key, which
//! the broker's de-duplication (`Nats-Msg-Id`) and the consumer barrier absorb. Several
//! relays may run at once: a live claim is never taken by another relay, so no row is
//! published by two relays at the same moment. On PostgreSQL the claim is one `UPDATE` over
//! a `SELECT … FOR UPDATE SKIP LOCKED`, so relays skip each other's rows without waiting;
//! on SQLite it is one `BEGIN IMMEDIATE` transaction, serialised by SQLite's single writer.
//! A publish that fails releases the claim and counts the attempt; the row stays first in
//! its ordering key and is retried on the next run.
//!
//! Sent rows are kept for the relay's retention and then deleted by [`Relay::purge`], like
//! keys.
//!
//! # Metrics
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `idem_outbox_pending` | gauge | — | messages not yet sent, at the end of the last run |
//! | `idem_outbox_published_total` | counter | — | messages published and marked sent |
//! | `idem_outbox_publish_errors_total` | counter | — | publishes the broker refused or did not acknowledge |
//! | `idem_outbox_lag_seconds` | gauge | — | age of the oldest pending message (relay lag), 0 when none |
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_broker::Publisher;
use idem_core::{BoxError, Key};

mod postgres;
mod sqlite;

pub use postgres::PgOutbox;
pub use sqlite::SqliteOutbox;

/// Gauge of pending messages.
pub const PENDING: &str = "idem_outbox_pending";
/// Counter of messages published and marked sent.
pub const PUBLISHED_TOTAL: &str = "idem_outbox_published_total";
/// Counter of failed publishes.
pub const PUBLISH_ERRORS_TOTAL: &str = "idem_outbox_publish_errors_total";
/// Gauge of the age of the oldest pending message, in seconds.
pub const LAG_SECONDS: &str = "idem_outbox_lag_seconds";

/// The default outbox table.
pub const DEFAULT_TABLE: &str = "idem_outbox";

/// Everything that can go wrong in the outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The outbox was configured wrongly (an invalid table name).
    #[error("invalid outbox configuration")]
    Config(#[source] idem_core::Error),
    /// A SQLite statement failed.
    #[error("outbox SQLite statement failed")]
    Sqlite(#[source] idem_sqlite::rusqlite::Error),
    /// A PostgreSQL statement failed.
    #[error("outbox PostgreSQL statement failed")]
    Postgres(#[source] idem_postgres::sqlx::Error),
    /// A stored row could not be read back (an invalid key).
    #[error("outbox row {seq} is corrupt")]
    Corrupt {
        /// The row's sequence number.
        seq: i64,
        /// What is wrong with it.
        #[source]
        source: idem_core::Error,
    },
    /// The blocking task running a SQLite statement was lost (a panic, a runtime shutting
    /// down).
    #[error("the outbox's blocking task was lost")]
    Task(#[source] BoxError),
}

/// An outgoing message, as an operation enqueues it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Names the message within its operation; the message's key is the operation's key
    /// derived with this label, so each label may be used once per operation.
    pub label: String,
    /// Where to publish it (a NATS subject, an AMQP routing key).
    pub subject: String,
    /// The body.
    pub payload: Vec<u8>,
    /// Messages with the same ordering key are published in enqueue order; `None` orders
    /// them by the operation's key.
    pub ordering: Option<String>,
}

impl Outgoing {
    /// A message labelled `label` for `subject`, ordered by the operation's key.
    pub fn new(label: impl Into<String>, subject: impl Into<String>, payload: Vec<u8>) -> Self {
        Outgoing {
            label: label.into(),
            subject: subject.into(),
            payload,
            ordering: None,
        }
    }

    /// Orders this message with every other message of `ordering` (an aggregate's id).
    pub fn ordered_by(mut self, ordering: impl Into<String>) -> Self {
        self.ordering = Some(ordering.into());
        self
    }

    /// The message's key and ordering key under the operation's key.
    fn keys(&self, operation: &Key) -> (Key, String) {
        let key = operation.derive(&self.label);
        let ordering = self
            .ordering
            .clone()
            .unwrap_or_else(|| operation.to_string());
        (key, ordering)
    }
}

/// A pending message a relay claimed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// Its position in the outbox (enqueue order).
    pub seq: i64,
    /// Its key (derived from the operation's key).
    pub key: Key,
    /// Where to publish it.
    pub subject: String,
    /// The body.
    pub payload: Vec<u8>,
}

/// What is waiting in the outbox.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Messages not yet sent.
    pub pending: u64,
    /// When the oldest of them was enqueued, in milliseconds since the Unix epoch.
    pub oldest_ms: Option<i64>,
}

/// Where a relay finds its messages: implemented by [`SqliteOutbox`] and [`PgOutbox`].
pub trait OutboxStore: Send + Sync {
    /// Claims up to `batch` pending messages, the oldest of each ordering key whose claim
    /// is absent or expired at `now_ms`, until `until_ms`, under `token`; in `seq` order.
    fn claim(
        &self,
        now_ms: i64,
        until_ms: i64,
        token: i64,
        batch: usize,
    ) -> impl Future<Output = Result<Vec<Pending>, OutboxError>> + Send;

    /// Marks a claimed message sent at `now_ms`; `false` if the claim was lost (another
    /// relay took the row after the lease ran out).
    fn mark_sent(
        &self,
        seq: i64,
        token: i64,
        now_ms: i64,
    ) -> impl Future<Output = Result<bool, OutboxError>> + Send;

    /// Releases a claim after a failed publish, counting the attempt and keeping `error`.
    fn release(
        &self,
        seq: i64,
        token: i64,
        error: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Deletes up to `batch` messages sent before `before_ms`; how many.
    fn purge(
        &self,
        before_ms: i64,
        batch: usize,
    ) -> impl Future<Output = Result<u64, OutboxError>> + Send;

    /// The pending messages.
    fn backlog(&self) -> impl Future<Output = Result<Backlog, OutboxError>> + Send;
}

/// What one [`Relay::run_once`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayRun {
    /// Messages claimed.
    pub claimed: usize,
    /// Messages published and marked sent.
    pub published: usize,
    /// Publishes that failed (their claims were released).
    pub errors: usize,
    /// Messages published whose claim was lost before they were marked sent (another relay
    /// publishes them again).
    pub lost: usize,
    /// What was still pending afterwards.
    pub backlog: Backlog,
}

/// The default claim lease: how long a relay may take to publish a batch before another
/// relay may claim its rows.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// The default retention of sent rows.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Publishes pending messages from an outbox.
#[derive(Clone, Debug)]
pub struct Relay<O, P> {
    outbox: O,
    publisher: P,
    batch: usize,
    lease: Duration,
    retention: Duration,
}

impl<O: OutboxStore, P: Publisher> Relay<O, P> {
    /// A relay from `outbox` to `publisher`, 100 messages a batch, [`DEFAULT_LEASE`],
    /// [`DEFAULT_RETENTION`].
    pub fn new(outbox: O, publisher: P) -> Self {
        Relay {
            outbox,
            publisher,
            batch: 100,
            lease: DEFAULT_LEASE,
            retention: DEFAULT_RETENTION,
        }
    }

    /// Claims at most `batch` messages a run (at least 1).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// How long a claim lasts; a relay that crashed leaves its rows to others after it.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How long sent rows are kept before [`Relay::purge`] deletes them.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// The outbox.
    pub fn outbox(&self) -> &O {
        &self.outbox
    }

    /// Claims a batch, publishes each message (waiting for the broker's acknowledgement)
    /// and marks it sent; then updates the metrics.
    pub async fn run_once(&self) -> Result<RelayRun, OutboxError> {
        let now = now_ms();
        let until = now.saturating_add(millis(self.lease));
        let token: i64 = rand::random();
        let claimed = self.outbox.claim(now, until, token, self.batch).await?;
        let mut run = RelayRun {
            claimed: claimed.len(),
            ..RelayRun::default()
        };
        for message in &claimed {
            match self
                .publisher
                .publish(&message.key, &message.subject, &message.payload)
                .await
            {
                Ok(()) => {
                    if self.outbox.mark_sent(message.seq, token, now_ms()).await? {
                        run.published += 1;
                        metrics::counter!(PUBLISHED_TOTAL).increment(1);
                    } else {
                        run.lost += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(seq = message.seq, key = %message.key, error = %e, "publish failed; the message stays pending");
                    metrics::counter!(PUBLISH_ERRORS_TOTAL).increment(1);
                    run.errors += 1;
                    self.outbox
                        .release(message.seq, token, &e.to_string())
                        .await?;
                }
            }
        }
        run.backlog = self.observe().await?;
        Ok(run)
    }

    /// Runs [`Relay::run_once`] until the outbox is empty, then every `interval`, forever;
    /// drop the future to stop (safe at any point). Errors are logged and retried after
    /// `interval`.
    pub async fn run(&self, interval: Duration) {
        loop {
            match self.run_once().await {
                Ok(run) if run.published > 0 && run.backlog.pending > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "outbox relay run failed"),
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Deletes up to `batch` sent messages older than the retention; how many.
    pub async fn purge(&self, batch: usize) -> Result<u64, OutboxError> {
        let before = now_ms().saturating_sub(millis(self.retention));
        self.outbox.purge(before, batch).await
    }

    /// Reads the backlog and publishes the `pending` and `lag` gauges.
    pub async fn observe(&self) -> Result<Backlog, OutboxError> {
        let backlog = self.outbox.backlog().await?;
        metrics::gauge!(PENDING).set(backlog.pending as f64);
        let lag = backlog.oldest_ms.map_or(0.0, |oldest| {
            (now_ms().saturating_sub(oldest)).max(0) as f64 / 1000.0
        });
        metrics::gauge!(LAG_SECONDS).set(lag);
        Ok(backlog)
    }
}

/// Milliseconds since the Unix epoch (0 for a clock before it).
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

/// A duration in whole milliseconds, saturating.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Reads a stored key back.
fn stored_key(seq: i64, scope: String, id: String) -> Result<Key, OutboxError> {
    Key::new(scope, id).map_err(|source| OutboxError::Corrupt { seq, source })
}
