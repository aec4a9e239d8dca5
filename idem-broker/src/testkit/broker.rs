//! What a broker's test fixture provides to the shared [`scenarios`](super::scenarios).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use idem_core::Barrier;
use idem_sqlite::SqliteStore;

use crate::{ConsumerBarrier, Delivery};

/// The scope of the test consumers' keys.
pub const SCOPE: &str = "ledger";

/// How long a test consumer asks the broker to wait before delivering a message again after
/// a retryable failure, short so that a test does not wait long.
pub const RETRY_DELAY: Duration = Duration::from_millis(100);

/// A broker under test, as its test fixture sees it: one fresh queue (or stream), a
/// consumer on it, a producer to it and a consumer barrier on a fresh store.
///
/// Each method panics when the broker fails: a test fixture has nothing to recover.
pub trait TestBroker: Sized {
    /// The broker's message.
    type Message: Delivery + 'static;

    /// A consumer that takes one delivery and then crashes, never settling it.
    type Crashing;

    /// Whether the broker itself drops a copy of a message published again at once (a
    /// de-duplication window, as JetStream has by `Nats-Msg-Id`).
    const DEDUPLICATES: bool;

    /// A fresh fixture for the test `test` (a queue or stream of its own, a consumer on it,
    /// a fresh store), or `None` after saying why when the broker is unreachable and the
    /// test is not required to run.
    fn open(test: &str) -> impl Future<Output = Option<Self>>;

    /// Deletes what the fixture made on the broker (at the end of a test that passed; a
    /// failed test leaves it for inspection).
    fn delete(self) -> impl Future<Output = ()>;

    /// The consumer barrier between the broker and the scenario's handlers (a fresh store,
    /// keys in [`SCOPE`], [`RETRY_DELAY`]).
    fn barrier(&self) -> &ConsumerBarrier<SqliteStore, Self::Message>;

    /// Publishes `payload` the adapter's way under the key `producer/{id}` (its
    /// `Idempotency-Key` header, and the broker's message id), once the broker has taken it;
    /// `true` when the broker dropped it as a duplicate.
    fn publish(&self, id: &str, payload: &[u8]) -> impl Future<Output = bool>;

    /// Publishes again a message published before (as [`publish`](Self::publish) did), so
    /// that the broker delivers the copy as a new message: past the broker's
    /// de-duplication window, where it has one.
    fn publish_copy(&self, id: &str, payload: &[u8]) -> impl Future<Output = ()>;

    /// Publishes `payload` without an `Idempotency-Key` header, with the broker's own
    /// message id `message_id`, if any.
    fn publish_raw(&self, message_id: Option<&str>, payload: &[u8]) -> impl Future<Output = ()>;

    /// The next delivery to the consumer, waiting (bounded) for a redelivery if need be.
    fn next(&self) -> impl Future<Output = Self::Message>;

    /// What the broker says of how often it delivered `message`.
    fn deliveries(message: &Self::Message) -> Deliveries;

    /// The next delivery, taken by a consumer of its own that will crash.
    fn next_to_crash(&self) -> impl Future<Output = (Self::Message, Self::Crashing)>;

    /// Crashes `consumer` with `message` unsettled: the broker delivers it again.
    fn crash(&self, consumer: Self::Crashing, message: Self::Message) -> impl Future<Output = ()>;

    /// Asserts that the consumer has nothing left to deliver, nor to deliver again.
    fn assert_drained(&self) -> impl Future<Output = ()>;

    /// Asserts that a message with `payload`, just terminated, is never delivered again, and
    /// that the broker dead-lettered it where it does so.
    fn assert_terminated(&self, payload: &[u8]) -> impl Future<Output = ()>;
}

/// Runs `scenario` on a fresh fixture for the test `test` and deletes the fixture after
/// it; skips it when [`TestBroker::open`] finds no broker.
pub async fn run<B: TestBroker>(test: &str, scenario: impl AsyncFnOnce(&B)) {
    let Some(broker) = B::open(test).await else {
        return;
    };
    scenario(&broker).await;
    broker.delete().await;
}

/// What a broker says of how often it delivered a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deliveries {
    /// The broker counts them (JetStream): the message's delivery count, `None` when the
    /// message does not say.
    Counted(Option<i64>),
    /// The broker only flags a delivery as a redelivery (AMQP's `redelivered`).
    Flagged {
        /// Whether the broker delivered the message before.
        redelivered: bool,
    },
}

impl Deliveries {
    /// Whether this is the message's first delivery.
    pub fn is_first(self) -> bool {
        match self {
            Deliveries::Counted(count) => count == Some(1),
            Deliveries::Flagged { redelivered } => !redelivered,
        }
    }

    /// Whether this is the message's second delivery (a redelivery, for a broker that only
    /// flags them).
    pub fn is_second(self) -> bool {
        match self {
            Deliveries::Counted(count) => count == Some(2),
            Deliveries::Flagged { redelivered } => redelivered,
        }
    }
}

/// A SQLite store in a temporary directory of its own, removed when this is dropped.
pub struct TempStore {
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

impl TempStore {
    /// A fresh store.
    ///
    /// # Panics
    ///
    /// When the directory or the store cannot be created.
    pub async fn new() -> TempStore {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = SqliteStore::connect(dir.path().join("idem.db"))
            .await
            .expect("a SQLite store");
        TempStore { store, _dir: dir }
    }

    /// The store.
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// A consumer barrier on the store, keys in [`SCOPE`], asking for a redelivery after
    /// [`RETRY_DELAY`].
    pub fn consumer_barrier<M: Delivery>(&self) -> ConsumerBarrier<SqliteStore, M> {
        ConsumerBarrier::new(Barrier::new(Arc::new(self.store.clone())), SCOPE)
            .expect("a valid scope")
            .with_retry_delay(RETRY_DELAY)
    }
}
