//! The outbox on real SQLite and PostgreSQL (`IDEM_POSTGRES_URL`) databases, relayed to a
//! real NATS JetStream server (`IDEM_NATS_URL`); each service is skipped with a note when
//! unreachable unless `IDEM_TEST_REQUIRE` names it (`nats`, `postgres`). The scenarios that
//! do not depend on the database run on both through [`Orders`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, stream};
use futures::StreamExt;
use idem_broker::testkit::{Tally, TempStore};
use idem_broker::Publisher;
use idem_core::{Barrier, BoxError, Failure, Key, RunError, TxPolicy};
use idem_nats::{JetStreamMessage, JetStreamPublisher};
use idem_outbox::{OutboxStore, Outgoing, PgOutbox, Relay, SqliteOutbox};
use idem_postgres::sqlx::{self, AssertSqlSafe, PgPool};
use idem_postgres::{PgOperation, PgOptions, PgStore};
use idem_sqlite::{SqliteOperation, SqliteStore};

fn nats_url() -> String {
    std::env::var("IDEM_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

fn postgres_url() -> String {
    std::env::var("IDEM_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

fn skip<T>(service: &str, why: &str) -> Option<T> {
    assert!(
        !idem_conformance::required(service),
        "IDEM_TEST_REQUIRE names {service}: {why}"
    );
    eprintln!("skipped: {why}");
    None
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{name}_{}_{nanos}", std::process::id())
}

/// A fresh JetStream stream with a tiny de-duplication window, deleted when dropped.
struct Nats {
    js: jetstream::Context,
    stream: String,
    subject: String,
}

/// The de-duplication window of the test streams: shorter than any relay lease below, so a
/// message republished after a relay crash reaches the consumer as a new message.
const DUPLICATE_WINDOW: Duration = Duration::from_millis(100);

impl Nats {
    async fn new(name: &str) -> Option<Nats> {
        let connected =
            tokio::time::timeout(Duration::from_secs(5), async_nats::connect(nats_url())).await;
        let client = match connected {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return skip("nats", &format!("cannot connect to {}: {e}", nats_url())),
            Err(_) => return skip("nats", &format!("connecting to {} timed out", nats_url())),
        };
        let js = jetstream::new(client);
        let stream = unique(&format!("IDEM_OUTBOX_{name}"));
        let subject = format!("idem.outbox.{}", stream.to_lowercase());
        js.create_stream(stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{subject}.>")],
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "creating a stream at {} (is JetStream on?): {e}",
                nats_url()
            )
        });
        Some(Nats {
            js,
            stream,
            subject,
        })
    }

    /// The real JetStream publisher.
    fn publisher(&self) -> JetStreamPublisher {
        JetStreamPublisher(self.js.clone())
    }

    /// Deletes the stream (at the end of a test that passed).
    async fn delete(self) {
        self.js.delete_stream(&self.stream).await.unwrap();
    }

    /// Every message in the stream, through a consumer barrier: the effects per key id, and
    /// how many messages the stream held.
    async fn consume(&self) -> (Tally, usize) {
        let consumer: PullConsumer = self
            .js
            .get_stream(&self.stream)
            .await
            .unwrap()
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some("ledger".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let store = TempStore::new().await;
        let barrier = store.consumer_barrier();
        let tally = Tally::default();
        let mut delivered = 0;
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(100)
                .expires(Duration::from_secs(2))
                .messages()
                .await
                .unwrap();
            let mut got = 0;
            while let Some(message) = batch.next().await {
                got += 1;
                let message = JetStreamMessage::from(message.unwrap());
                tally.handle(&barrier, &message).await;
            }
            if got == 0 {
                break;
            }
            delivered += got;
        }
        (tally, delivered)
    }
}

/// Acknowledged publishes in order: key id and payload.
type Log = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// The real JetStream publisher, recording each acknowledged publish in order.
#[derive(Clone)]
struct Recording {
    inner: JetStreamPublisher,
    log: Log,
}

impl Publisher for Recording {
    async fn publish(&self, key: &Key, subject: &str, payload: &[u8]) -> Result<(), BoxError> {
        self.inner.publish(key, subject, payload).await?;
        self.log
            .lock()
            .unwrap()
            .push((key.id().to_string(), payload.to_vec()));
        Ok(())
    }
}

/// How an order operation ends: committed, or failed permanently or retryably.
type Ending = Result<(), Failure<String, String>>;

/// A database with an `orders` table and an outbox: what the scenarios that do not depend
/// on the database need of it.
trait Orders {
    type Outbox: OutboxStore + Clone + 'static;

    /// The outbox.
    fn outbox(&self) -> &Self::Outbox;

    /// An order operation under `key`: writes the order and enqueues `message` in one
    /// transaction that ends with `ending`. `Ok(true)` when its outcome was replayed.
    async fn order(
        &self,
        key: &Key,
        message: Outgoing,
        ending: Ending,
    ) -> Result<bool, RunError<String>>;
}

/// A SQLite store and its outbox in one database file.
struct Sqlite {
    barrier: Barrier<SqliteStore>,
    outbox: SqliteOutbox,
    _dir: tempfile::TempDir,
}

impl Sqlite {
    async fn new() -> Sqlite {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.db");
        let store = SqliteStore::connect(&path).await.unwrap();
        store
            .with_connection(|c| {
                c.execute(
                    "CREATE TABLE orders (id TEXT PRIMARY KEY, amount INTEGER)",
                    [],
                )
                .map(drop)
            })
            .await
            .unwrap();
        let outbox = SqliteOutbox::open(&path, "idem_outbox").await.unwrap();
        Sqlite {
            barrier: Barrier::new(Arc::new(store)),
            outbox,
            _dir: dir,
        }
    }
}

impl Orders for Sqlite {
    type Outbox = SqliteOutbox;

    fn outbox(&self) -> &SqliteOutbox {
        &self.outbox
    }

    async fn order(
        &self,
        key: &Key,
        message: Outgoing,
        ending: Ending,
    ) -> Result<bool, RunError<String>> {
        let (outbox, op_key) = (self.outbox.clone(), key.clone());
        let op: SqliteOperation<(), String, String> = Box::new(move |tx| {
            tx.execute(
                "INSERT INTO orders (id, amount) VALUES (?1, 100)",
                [op_key.id()],
            )
            .map_err(|e| Failure::Retryable(e.to_string()))?;
            outbox
                .enqueue(tx, &op_key, &message)
                .map_err(|e| Failure::Retryable(e.to_string()))?;
            ending
        });
        self.barrier
            .transaction(key, None, TxPolicy::Wait, op)
            .await
            .map(|r| r.replayed)
    }
}

/// A PostgreSQL schema for one test with a store and an outbox in it, dropped at the end.
struct Pg {
    pool: PgPool,
    schema: String,
    barrier: Barrier<PgStore>,
    outbox: PgOutbox,
}

impl Pg {
    async fn new() -> Option<Pg> {
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .connect(&postgres_url()),
        )
        .await;
        let pool = match connected {
            Ok(Ok(pool)) => pool,
            Ok(Err(e)) => {
                return skip(
                    "postgres",
                    &format!("cannot connect to {}: {e}", postgres_url()),
                )
            }
            Err(_) => {
                return skip(
                    "postgres",
                    &format!("connecting to {} timed out", postgres_url()),
                )
            }
        };
        let schema = unique("idem_outbox_test");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA {schema}; CREATE TABLE {schema}.orders (id TEXT PRIMARY KEY, amount INT)"
        )))
        .execute(&pool)
        .await
        .unwrap();
        let options = PgOptions::default()
            .with_table(&format!("{schema}.records"))
            .unwrap();
        let store = PgStore::from_pool(pool.clone(), options).unwrap();
        store.migrate().await.unwrap();
        let outbox = PgOutbox::open(pool.clone(), &format!("{schema}.outbox"))
            .await
            .unwrap();
        Some(Pg {
            pool,
            schema,
            barrier: Barrier::new(Arc::new(store)),
            outbox,
        })
    }

    async fn drop_schema(self) {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await
        .unwrap();
    }
}

impl Orders for Pg {
    type Outbox = PgOutbox;

    fn outbox(&self) -> &PgOutbox {
        &self.outbox
    }

    async fn order(
        &self,
        key: &Key,
        message: Outgoing,
        ending: Ending,
    ) -> Result<bool, RunError<String>> {
        let (outbox, op_key, schema) = (self.outbox.clone(), key.clone(), self.schema.clone());
        let op: PgOperation<(), String, String> = Box::new(move |tx| {
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO {schema}.orders (id, amount) VALUES ($1, 100)"
                )))
                .bind(op_key.id())
                .execute(&mut *tx)
                .await
                .map_err(|e| Failure::Retryable(e.to_string()))?;
                outbox
                    .enqueue(tx, &op_key, &message)
                    .await
                    .map_err(|e| Failure::Retryable(e.to_string()))?;
                ending
            })
        });
        self.barrier
            .transaction(key, None, TxPolicy::Wait, op)
            .await
            .map(|r| r.replayed)
    }
}

/// A message commits with its operation, a replay enqueues nothing, a permanent failure
/// rolls the business writes and the message back, and a retryable one leaves nothing.
async fn messages_commit_with_the_operation_and_a_retry_enqueues_nothing(orders: &impl Orders) {
    let key = Key::new("shop", "order-1").unwrap();
    let event = || Outgoing::new("created", "orders.created", b"order-1".to_vec());
    assert!(!orders.order(&key, event(), Ok(())).await.unwrap());
    assert!(orders.order(&key, event(), Ok(())).await.unwrap());
    assert_eq!(orders.outbox().backlog().await.unwrap().pending, 1);

    let declined = Key::new("shop", "order-2").unwrap();
    let _ = orders
        .order(
            &declined,
            event(),
            Err(Failure::Permanent("declined".into())),
        )
        .await
        .unwrap();
    let flaky = Key::new("shop", "order-3").unwrap();
    let r = orders
        .order(&flaky, event(), Err(Failure::Retryable("timeout".into())))
        .await;
    assert!(matches!(r, Err(RunError::Operation(_))));
    assert_eq!(orders.outbox().backlog().await.unwrap().pending, 1);

    // The message's key is derived from the operation's key, stable across processes.
    let claimed = orders.outbox().claim(0, i64::MAX, 1, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].key, key.derive("created"));
}

/// Enqueues `n` messages, one operation each, in `groups` ordering keys (the payload is
/// `group/position`); runs two relays at once until the outbox is empty; then checks that
/// every row was published once and each ordering key in order, and that retention purges
/// the sent rows.
async fn two_relays_racing_publish_each_row_once_in_order(
    orders: &impl Orders,
    nats: &Nats,
    n: usize,
    groups: usize,
) {
    let subject = format!("{}.events", nats.subject);
    for i in 0..n {
        let group = i % groups;
        let key = Key::new("shop", format!("op-{i}")).unwrap();
        let message = Outgoing::new(
            "event",
            subject.clone(),
            format!("{group}/{}", i / groups).into_bytes(),
        )
        .ordered_by(format!("group-{group}"));
        orders.order(&key, message, Ok(())).await.unwrap();
    }

    let log = Arc::new(Mutex::new(Vec::new()));
    let publisher = Recording {
        inner: nats.publisher(),
        log: Arc::clone(&log),
    };
    let relays: Vec<_> = (0..2)
        .map(|_| {
            let relay = Relay::new(orders.outbox().clone(), publisher.clone()).with_batch(3);
            tokio::spawn(async move {
                let mut published = 0;
                loop {
                    let run = relay.run_once().await.unwrap();
                    assert_eq!((run.errors, run.lost), (0, 0));
                    published += run.published;
                    if run.backlog.pending == 0 {
                        return published;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    let mut per_relay = Vec::new();
    for relay in relays {
        per_relay.push(relay.await.unwrap());
    }
    assert_eq!(per_relay.iter().sum::<usize>(), n, "{per_relay:?}");
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), n, "no row was published twice");
    let mut next = vec![0usize; groups];
    for (_, payload) in &log {
        let text = String::from_utf8(payload.clone()).unwrap();
        let (group, position) = text.split_once('/').unwrap();
        let (group, position): (usize, usize) = (group.parse().unwrap(), position.parse().unwrap());
        assert_eq!(position, next[group], "group {group} out of order: {log:?}");
        next[group] += 1;
    }
    let (tally, delivered) = nats.consume().await;
    assert_eq!((tally.counts().len(), delivered), (n, n));

    // Sent rows are purged by retention.
    let relay =
        Relay::new(orders.outbox().clone(), nats.publisher()).with_retention(Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(relay.purge(1000).await.unwrap(), n as u64);
    assert_eq!(relay.purge(1000).await.unwrap(), 0);
}

#[tokio::test]
async fn sqlite_messages_commit_with_the_operation_and_a_retry_enqueues_nothing() {
    messages_commit_with_the_operation_and_a_retry_enqueues_nothing(&Sqlite::new().await).await;
}

#[tokio::test]
async fn a_relay_crash_at_each_step_still_gives_one_effect_per_message() {
    let Some(nats) = Nats::new("crash").await else {
        return;
    };
    let orders = Sqlite::new().await;
    let outbox = orders.outbox();
    let keys: Vec<Key> = (0..3)
        .map(|i| Key::new("shop", format!("order-{i}")).unwrap())
        .collect();
    for key in &keys {
        let event = Outgoing::new(
            "created",
            format!("{}.created", nats.subject),
            key.id().as_bytes().to_vec(),
        );
        orders.order(key, event, Ok(())).await.unwrap();
    }
    let publisher = nats.publisher();
    let lease = Duration::from_millis(300);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };

    // Relay 1 claims one message and crashes before publishing it.
    let claimed = outbox.claim(now(), now() + 300, 11, 1).await.unwrap();
    assert_eq!(claimed.len(), 1);
    // Relay 2 claims another, publishes it and crashes before marking it sent.
    let claimed = outbox.claim(now(), now() + 300, 22, 1).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let m = &claimed[0];
    publisher
        .publish(&m.key, &m.subject, &m.payload)
        .await
        .unwrap();
    // Relay 3 publishes and marks what it can; then, after the leases ran out, the rest.
    let relay = Relay::new(outbox.clone(), publisher).with_lease(lease);
    let first = relay.run_once().await.unwrap();
    assert_eq!(
        (first.claimed, first.published),
        (1, 1),
        "live claims are left alone"
    );
    let mut rounds = 0;
    while relay.run_once().await.unwrap().backlog.pending > 0 {
        rounds += 1;
        assert!(rounds < 1000, "the outbox drains");
        tokio::time::sleep(lease / 4).await;
    }

    let (tally, delivered) = nats.consume().await;
    assert_eq!(
        delivered, 4,
        "the message published by the crashed relay came twice"
    );
    tally.assert_once_each(keys.iter().map(|key| key.derive("created")));
    nats.delete().await;
}

#[tokio::test]
async fn two_sqlite_relays_racing_publish_each_row_once_in_order() {
    let Some(nats) = Nats::new("race_sqlite").await else {
        return;
    };
    two_relays_racing_publish_each_row_once_in_order(&Sqlite::new().await, &nats, 40, 4).await;
    nats.delete().await;
}

#[tokio::test]
async fn a_failed_publish_leaves_the_row_pending_and_first_in_its_order() {
    let Some(nats) = Nats::new("fail").await else {
        return;
    };
    let orders = Sqlite::new().await;
    let key = Key::new("shop", "order-x").unwrap();
    // No stream listens on this subject: JetStream cannot acknowledge the publish.
    let nowhere = Outgoing::new("first", format!("nowhere.{}", unique("x")), b"1".to_vec());
    orders.order(&key, nowhere, Ok(())).await.unwrap();
    let relay = Relay::new(orders.outbox().clone(), nats.publisher());
    let run = relay.run_once().await.unwrap();
    assert_eq!((run.claimed, run.published, run.errors), (1, 0, 1));
    assert_eq!(run.backlog.pending, 1);
    let run = relay.run_once().await.unwrap();
    assert_eq!(
        (run.claimed, run.errors),
        (1, 1),
        "released, so claimed again"
    );
    nats.delete().await;
}

#[tokio::test]
async fn postgres_messages_commit_with_the_operation_and_a_retry_enqueues_nothing() {
    let Some(pg) = Pg::new().await else {
        return;
    };
    messages_commit_with_the_operation_and_a_retry_enqueues_nothing(&pg).await;
    pg.drop_schema().await;
}

#[tokio::test]
async fn two_postgres_relays_racing_publish_each_row_once_in_order() {
    let Some(nats) = Nats::new("race_pg").await else {
        return;
    };
    let Some(pg) = Pg::new().await else {
        return;
    };
    two_relays_racing_publish_each_row_once_in_order(&pg, &nats, 60, 4).await;
    pg.drop_schema().await;
    nats.delete().await;
}

#[tokio::test]
async fn a_running_relay_drains_the_outbox_and_may_be_stopped_anywhere() {
    let Some(nats) = Nats::new("run").await else {
        return;
    };
    let orders = Sqlite::new().await;
    let relay = Relay::new(orders.outbox().clone(), nats.publisher()).with_batch(2);
    let running = tokio::spawn(async move { relay.run(Duration::from_millis(10)).await });
    for i in 0..5 {
        let key = Key::new("shop", format!("order-{i}")).unwrap();
        let event = Outgoing::new("created", format!("{}.created", nats.subject), vec![b'x']);
        orders.order(&key, event, Ok(())).await.unwrap();
    }
    let mut polls = 0;
    while orders.outbox().backlog().await.unwrap().pending > 0 {
        polls += 1;
        assert!(polls < 1000, "the running relay drains the outbox");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.abort();
    let (tally, delivered) = nats.consume().await;
    assert_eq!((tally.counts().len(), delivered), (5, 5));
    nats.delete().await;
}
