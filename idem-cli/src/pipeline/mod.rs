//! `idem pipeline`: orders → transactional outbox → relay → broker → consumer barrier →
//! ledger, with faults injected at every boundary, judged by the ledger.
//!
//! An orders operation writes the order and an outbox message in one transaction (SQLite or
//! PostgreSQL); relays publish the outbox (NATS JetStream or RabbitMQ); a consumer applies
//! each message to a ledger behind the barrier in transactional mode. Faults: client retries
//! of the order, a relay killed after publishing and before marking sent, a consumer killed
//! after its effect and before its ack, an ack lost on the network (the broker redelivers),
//! and messages published again after the broker's de-duplication window. Exit status 1 on
//! any duplicate or lost ledger entry.

mod bus;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use idem::postgres::{sqlx, PgOperation, PgStore};
use idem::sqlite::{rusqlite, SqliteOperation, SqliteStore};
use idem::{Barrier, Error, Failure, Key, TxPolicy};
use idem_broker::{ConsumeError, ConsumerBarrier, Delivery, Handled, Incoming, Publisher};
use idem_outbox::{OutboxStore, Outgoing, PgOutbox, Relay, SqliteOutbox};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use self::bus::{Bus, Inbox, Step};

/// The database of the orders service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// Embedded SQLite in a scratch directory.
    Sqlite,
    /// PostgreSQL (`--postgres-url`), in a scratch schema.
    Postgres,
}

/// The broker between the outbox and the consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerArg {
    /// NATS JetStream (`--nats-url`).
    Nats,
    /// RabbitMQ (`--amqp-url`).
    Rabbitmq,
}

/// `idem pipeline` arguments.
#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// Where orders and their outbox live.
    #[arg(long, value_enum, default_value_t = BackendArg::Sqlite)]
    backend: BackendArg,
    /// The broker.
    #[arg(long, value_enum, default_value_t = BrokerArg::Nats)]
    broker: BrokerArg,
    /// How many orders.
    #[arg(long, default_value_t = 200)]
    orders: usize,
    /// The probability of each fault at each boundary.
    #[arg(long, default_value_t = 0.1)]
    fault_rate: f64,
    /// The random seed (faults are chosen from it).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// PostgreSQL URL.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    postgres_url: String,
    /// NATS URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// RabbitMQ URL.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
}

/// The outbox label of the order's event.
const EVENT: &str = "order-placed";
/// The relays' claim lease: a killed relay's rows are published again after it.
const RELAY_LEASE: Duration = Duration::from_millis(300);
/// Messages a relay claims per run.
const RELAY_BATCH: usize = 5;
/// How long the run may take before what is missing is counted lost.
const DEADLINE: Duration = Duration::from_secs(50);

/// Where faults come from, what they were, and the progress shown.
struct Chaos {
    rng: StdRng,
    fault_rate: f64,
    faults: Arc<Faults>,
    progress: ProgressBar,
}

/// Faults injected, per kind.
#[derive(Debug, Default)]
struct Faults {
    client_retries: AtomicUsize,
    /// Retryable errors (a store or broker hiccup) that a client or the consumer retried.
    transient: AtomicUsize,
    relay_kills: AtomicUsize,
    consumer_kills: AtomicUsize,
    lost_acks: AtomicUsize,
    republished: AtomicUsize,
    replays: AtomicUsize,
}

/// Runs the pipeline; `Ok(false)` if the ledger has a duplicate or a lost message.
pub async fn run(args: PipelineArgs) -> Result<bool, Error> {
    let fault_rate = args.fault_rate.clamp(0.0, 1.0);
    // Unique per run, also between runs of one process at once: the broker's stream or
    // queue and PostgreSQL's schema are named after it.
    let run_id = format!(
        "{}_{}_{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed),
        nanos()
    );
    let scratch_dir = tempfile::Builder::new()
        .prefix("idem-pipeline-")
        .tempdir()
        .map_err(Error::permanent)?;
    let scratch = scratch_dir.path();
    let (bus, inbox) = bus::connect(args.broker, &args, &run_id).await?;
    let faults = Arc::new(Faults::default());
    let progress = ProgressBar::new(args.orders as u64);
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {pos}/{len} applied") {
        progress.set_style(style);
    }
    progress.enable_steady_tick(Duration::from_millis(120));
    progress.set_message("placing orders");

    let orders: Vec<String> = (0..args.orders).map(|i| format!("order-{i}")).collect();
    let mut chaos = Chaos {
        rng: StdRng::seed_from_u64(args.seed),
        fault_rate,
        faults: Arc::clone(&faults),
        progress: progress.clone(),
    };
    let result = match args.backend {
        BackendArg::Sqlite => {
            let path = scratch.join("orders.db");
            let store = SqliteStore::connect(&path).await?;
            store
                .with_connection(|c| {
                    c.execute_batch("CREATE TABLE orders (id TEXT PRIMARY KEY, amount INTEGER)")
                })
                .await?;
            let barrier = Barrier::new(Arc::new(store));
            let outbox = SqliteOutbox::open(&path, "idem_outbox")
                .await
                .map_err(Error::permanent)?;
            for order in &orders {
                let retries = usize::from(chaos.rng.random_bool(fault_rate));
                for attempt in 0..=retries {
                    let replayed = place(&faults, || {
                        sqlite_order(&barrier, &outbox, order, bus.subject())
                    })
                    .await?;
                    if attempt > 0 && replayed {
                        faults.client_retries.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            flow(outbox, &bus, inbox, &orders, scratch, &mut chaos).await
        }
        BackendArg::Postgres => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .connect(&args.postgres_url)
                .await
                .map_err(Error::permanent)?;
            let schema = format!("idem_pipeline_{run_id}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE SCHEMA {schema}; CREATE TABLE {schema}.orders (id TEXT PRIMARY KEY, amount BIGINT)"
            )))
            .execute(&pool)
            .await
            .map_err(Error::permanent)?;
            let options = idem::postgres::PgOptions::default()
                .with_table(&format!("{schema}.idem_records"))?;
            let store = PgStore::from_pool(pool.clone(), options)?;
            store.migrate().await?;
            let barrier = Barrier::new(Arc::new(store));
            let outbox = PgOutbox::open(pool.clone(), &format!("{schema}.idem_outbox"))
                .await
                .map_err(Error::permanent)?;
            for order in &orders {
                let retries = usize::from(chaos.rng.random_bool(fault_rate));
                for attempt in 0..=retries {
                    let replayed = place(&faults, || {
                        pg_order(&barrier, &outbox, &schema, order, bus.subject())
                    })
                    .await?;
                    if attempt > 0 && replayed {
                        faults.client_retries.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            let result = flow(outbox, &bus, inbox, &orders, scratch, &mut chaos).await;
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&pool)
                .await
                .map_err(Error::permanent)?;
            result
        }
    };
    progress.finish_and_clear();
    bus.cleanup().await;
    drop(scratch_dir);
    let ledger = result?;
    Ok(report(&orders, &ledger, &faults, args.backend, args.broker))
}

/// The order id and amount as the event's payload.
fn payload(order: &str) -> Vec<u8> {
    format!("{order}:100").into_bytes()
}

/// How many times a client retries one order after a retryable error.
const CLIENT_ATTEMPTS: u32 = 5;

/// Places an order as a client does: a retryable error (a store hiccup) is retried after a
/// short pause, a few times; anything else is the answer.
async fn place<Fut>(faults: &Faults, mut attempt: impl FnMut() -> Fut) -> Result<bool, Error>
where
    Fut: Future<Output = Result<bool, Error>>,
{
    let mut tries = 1;
    loop {
        match attempt().await {
            Err(e) if e.is_retryable() && tries < CLIENT_ATTEMPTS => {
                faults.transient.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20) * tries).await;
                tries += 1;
            }
            answer => return answer,
        }
    }
}

/// The order operation's key.
fn order_key(order: &str) -> Result<Key, Error> {
    Key::new("shop/orders", order)
}

async fn sqlite_order(
    barrier: &Barrier<SqliteStore>,
    outbox: &SqliteOutbox,
    order: &str,
    subject: &str,
) -> Result<bool, Error> {
    let key = order_key(order)?;
    let (outbox, op_key, order, subject) = (
        outbox.clone(),
        key.clone(),
        order.to_string(),
        subject.to_string(),
    );
    let op: SqliteOperation<(), String, String> = Box::new(move |tx| {
        tx.execute("INSERT INTO orders (id, amount) VALUES (?1, 100)", [&order])
            .map_err(|e: rusqlite::Error| Failure::Retryable(e.to_string()))?;
        outbox
            .enqueue(tx, &op_key, &Outgoing::new(EVENT, subject, payload(&order)))
            .map_err(|e| Failure::Retryable(e.to_string()))?;
        Ok(())
    });
    barrier
        .transaction(&key, None, TxPolicy::Wait, op)
        .await
        .map(|r| r.replayed)
        .map_err(run_error)
}

async fn pg_order(
    barrier: &Barrier<PgStore>,
    outbox: &PgOutbox,
    schema: &str,
    order: &str,
    subject: &str,
) -> Result<bool, Error> {
    let key = order_key(order)?;
    let (outbox, op_key, order, subject) = (
        outbox.clone(),
        key.clone(),
        order.to_string(),
        subject.to_string(),
    );
    let insert = format!("INSERT INTO {schema}.orders (id, amount) VALUES ($1, 100)");
    let op: PgOperation<(), String, String> = Box::new(move |tx| {
        Box::pin(async move {
            sqlx::query(sqlx::AssertSqlSafe(insert))
                .bind(&order)
                .execute(&mut *tx)
                .await
                .map_err(|e| Failure::Retryable(e.to_string()))?;
            outbox
                .enqueue(tx, &op_key, &Outgoing::new(EVENT, subject, payload(&order)))
                .await
                .map_err(|e| Failure::Retryable(e.to_string()))?;
            Ok(())
        })
    });
    barrier
        .transaction(&key, None, TxPolicy::Wait, op)
        .await
        .map(|r| r.replayed)
        .map_err(run_error)
}

/// A barrier call that did not return an outcome, as the CLI's error.
fn run_error(e: idem::RunError<String>) -> Error {
    match e {
        idem::RunError::Barrier(e) => e,
        idem::RunError::Operation(e) => Error::retryable(e),
    }
}

/// Relays the outbox (killing relays now and then, republishing some messages after the
/// de-duplication window) while the consumer applies messages to the ledger; returns the
/// ledger's entries per order.
async fn flow<O: OutboxStore + Clone + 'static>(
    outbox: O,
    bus: &Bus,
    inbox: Inbox,
    orders: &[String],
    scratch: &std::path::Path,
    chaos: &mut Chaos,
) -> Result<HashMap<String, u32>, Error> {
    let Chaos {
        rng,
        fault_rate,
        faults,
        progress,
    } = chaos;
    let (fault_rate, faults, progress) = (*fault_rate, &*faults, &*progress);
    let ledger_path = scratch.join("ledger.db");
    let ledger = SqliteStore::connect(&ledger_path).await?;
    ledger
        .with_connection(|c| c.execute_batch("CREATE TABLE ledger (order_id TEXT, amount INTEGER)"))
        .await?;
    let consumer = ConsumerBarrier::new(Barrier::new(Arc::new(ledger)), "ledger")?
        .with_retry_delay(Duration::from_millis(100));
    progress.set_message("relaying and consuming");

    let relay = Relay::new(outbox.clone(), bus.clone())
        .with_lease(RELAY_LEASE)
        .with_batch(RELAY_BATCH);
    let relay_seed: u64 = rng.random();
    let consumer_seed: u64 = rng.random();
    let started = Instant::now();
    let relaying = {
        let (faults, bus) = (Arc::clone(faults), bus.clone());
        async move {
            let mut rng = StdRng::seed_from_u64(relay_seed);
            loop {
                // Each message a run could take may instead go to a relay that dies.
                for _ in 0..RELAY_BATCH {
                    if rng.random_bool(fault_rate) && kill_a_relay(&outbox, &bus).await? {
                        faults.relay_kills.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let run = relay.run_once().await.map_err(Error::permanent)?;
                if run.backlog.pending == 0 || started.elapsed() > DEADLINE {
                    return Ok::<_, Error>(());
                }
                if run.claimed == 0 {
                    tokio::time::sleep(RELAY_LEASE / 4).await;
                }
            }
        }
    };
    let consuming = {
        let (faults, inbox, consumer) = (Arc::clone(faults), &inbox, &consumer);
        async move {
            let mut rng = StdRng::seed_from_u64(consumer_seed);
            inbox
                .drain(orders.len(), started, DEADLINE, progress, |message| {
                    let fault = if rng.random_bool(fault_rate) {
                        if rng.random_bool(0.5) {
                            Fault::Kill
                        } else {
                            Fault::LoseAck
                        }
                    } else {
                        Fault::None
                    };
                    let (consumer, faults) = (consumer.clone(), Arc::clone(&faults));
                    async move { consume(&consumer, message, fault, &faults).await }
                })
                .await
        }
    };
    let (relayed, consumed) = tokio::join!(relaying, consuming);
    relayed?;
    consumed?;

    // Producers that publish again long after the broker's de-duplication window.
    progress.set_message("republishing past the dedup window");
    let mut again = Vec::new();
    for order in orders {
        if rng.random_bool(fault_rate) {
            let key = order_key(order)?.derive(EVENT);
            bus.publish(&key, bus.subject(), &payload(order))
                .await
                .map_err(Error::permanent)?;
            faults.republished.fetch_add(1, Ordering::Relaxed);
            again.push(order.clone());
        }
    }
    if !again.is_empty() {
        inbox
            .drain(0, Instant::now(), DEADLINE, progress, |message| {
                let (consumer, faults) = (consumer.clone(), Arc::clone(faults));
                async move { consume(&consumer, message, Fault::None, &faults).await }
            })
            .await?;
    }

    let counts = consumer
        .barrier()
        .store()
        .with_connection(|c| {
            let mut stmt = c.prepare("SELECT order_id, COUNT(*) FROM ledger GROUP BY order_id")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))?;
            rows.collect::<Result<HashMap<_, _>, _>>()
        })
        .await?;
    Ok(counts)
}

/// A relay that claims one message, publishes it and dies before marking it sent; `false`
/// if there was nothing to claim.
async fn kill_a_relay<O: OutboxStore>(outbox: &O, bus: &Bus) -> Result<bool, Error> {
    let now = now_ms();
    let until = now + i64::try_from(RELAY_LEASE.as_millis()).unwrap_or(i64::MAX);
    let claimed = outbox
        .claim(now, until, rand::random(), 1)
        .await
        .map_err(Error::permanent)?;
    for message in &claimed {
        bus.publish(&message.key, &message.subject, &message.payload)
            .await
            .map_err(Error::permanent)?;
    }
    Ok(!claimed.is_empty())
}

/// What the consumer does wrong with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Applies the message and dies before its ack.
    Kill,
    /// Applies the message; the ack is lost, so the broker redelivers it.
    LoseAck,
}

/// Applies one message to the ledger behind the barrier.
async fn consume(
    consumer: &ConsumerBarrier<SqliteStore, bus::Message>,
    message: bus::Message,
    fault: Fault,
    faults: &Faults,
) -> Result<Step, Error> {
    let apply = |incoming: Incoming| -> SqliteOperation<(), String, String> {
        Box::new(move |tx| {
            let text = String::from_utf8_lossy(&incoming.payload).into_owned();
            let (order, amount) = text
                .split_once(':')
                .and_then(|(o, a)| Some((o.to_string(), a.parse::<i64>().ok()?)))
                .ok_or_else(|| Failure::Permanent(format!("bad event {text:?}")))?;
            tx.execute(
                "INSERT INTO ledger (order_id, amount) VALUES (?1, ?2)",
                (&order, amount),
            )
            .map_err(|e| Failure::Retryable(e.to_string()))?;
            Ok(())
        })
    };
    if fault != Fault::None {
        // The barrier step the consumer takes before its ack, then no ack.
        let key = consumer.key(&message).map_err(Error::permanent)?;
        let fingerprint = idem::Fingerprint::of_bytes(message.payload());
        let op = apply(Incoming {
            key: key.clone(),
            payload: message.payload().to_vec(),
        });
        let fresh = match consumer
            .barrier()
            .transaction(&key, Some(fingerprint), TxPolicy::Wait, op)
            .await
            .map_err(run_error)
        {
            Ok(response) => !response.replayed,
            // Nothing recorded, nothing settled: the broker delivers it again.
            Err(e) if e.is_retryable() => return Ok(transient(faults)),
            Err(e) => return Err(e),
        };
        if fault == Fault::Kill {
            faults.consumer_kills.fetch_add(1, Ordering::Relaxed);
            return Ok(Step::Abandoned { fresh });
        }
        faults.lost_acks.fetch_add(1, Ordering::Relaxed);
        message
            .nak(Duration::ZERO)
            .await
            .map_err(Error::permanent)?;
        return Ok(Step::Settled { fresh });
    }
    let handled = match consumer.handle_transaction(&message, apply).await {
        Ok(handled) => handled,
        // The barrier failed retryably (and naked the message), or the broker did not take
        // the settlement: either way the message comes back, and its redelivery replays or
        // executes. The consumer lets go of it.
        Err(ConsumeError::Barrier(e)) if e.is_retryable() => return Ok(transient(faults)),
        Err(ConsumeError::Settle { .. }) => return Ok(transient(faults)),
        Err(e) => return Err(Error::permanent(e)),
    };
    match handled {
        Handled::Completed { replayed, .. } => {
            if replayed {
                faults.replays.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Step::Settled { fresh: !replayed })
        }
        Handled::Failed { failure, .. } => Err(Error::permanent(failure)),
        Handled::Retry { .. } | Handled::Busy { .. } => Ok(Step::Settled { fresh: false }),
        Handled::Rejected(why) => Err(Error::permanent(why)),
    }
}

/// A message the consumer lets go of after a retryable error, counted.
fn transient(faults: &Faults) -> Step {
    faults.transient.fetch_add(1, Ordering::Relaxed);
    Step::Abandoned { fresh: false }
}

/// Prints the table; `true` if every order is in the ledger exactly once.
fn report(
    orders: &[String],
    ledger: &HashMap<String, u32>,
    faults: &Faults,
    backend: BackendArg,
    broker: BrokerArg,
) -> bool {
    let duplicates: u32 = ledger.values().map(|n| n.saturating_sub(1)).sum();
    let lost = orders.iter().filter(|o| !ledger.contains_key(*o)).count();
    let get = |a: &AtomicUsize| a.load(Ordering::Relaxed);
    println!("idem pipeline: {backend:?} outbox -> {broker:?} -> consumer barrier -> ledger");
    println!("{:<48} {:>6}", "messages (orders)", orders.len());
    println!(
        "{:<48} {:>6}",
        "fault: client retries of the order",
        get(&faults.client_retries)
    );
    println!(
        "{:<48} {:>6}",
        "fault: relay killed after publish, before mark",
        get(&faults.relay_kills)
    );
    println!(
        "{:<48} {:>6}",
        "fault: consumer killed after effect, before ack",
        get(&faults.consumer_kills)
    );
    println!(
        "{:<48} {:>6}",
        "fault: ack lost, broker redelivered",
        get(&faults.lost_acks)
    );
    println!(
        "{:<48} {:>6}",
        "fault: republished past the dedup window",
        get(&faults.republished)
    );
    println!(
        "{:<48} {:>6}",
        "replays (duplicates absorbed by the barrier)",
        get(&faults.replays)
    );
    println!(
        "{:<48} {:>6}",
        "retryable errors retried (client, consumer)",
        get(&faults.transient)
    );
    println!("{:<48} {:>6}", "ledger duplicates", duplicates);
    println!("{:<48} {:>6}", "ledger lost", lost);
    let ok = duplicates == 0 && lost == 0;
    println!("{}", if ok { "OK: exactly once" } else { "FAILED" });
    ok
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Pipeline runs started by this process.
static RUNS: AtomicUsize = AtomicUsize::new(0);

fn nanos() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: PipelineArgs,
    }

    #[tokio::test]
    async fn a_client_retries_retryable_errors_a_few_times_and_nothing_else() {
        let faults = Faults::default();
        let calls = AtomicUsize::new(0);
        // Two store hiccups, then the answer.
        let placed = place(&faults, || async {
            match calls.fetch_add(1, Ordering::Relaxed) {
                0 | 1 => Err(Error::retryable("connection reset")),
                _ => Ok(true),
            }
        })
        .await;
        assert!(matches!(placed, Ok(true)), "{placed:?}");
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        assert_eq!(faults.transient.load(Ordering::Relaxed), 2);

        // A permanent error is the answer at once.
        calls.store(0, Ordering::Relaxed);
        let placed = place(&faults, || async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err::<bool, _>(Error::permanent("no such table"))
        })
        .await;
        assert!(placed.is_err_and(|e| !e.is_retryable()));
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        // A store that keeps failing gets CLIENT_ATTEMPTS tries, then its error.
        calls.store(0, Ordering::Relaxed);
        let placed = place(&faults, || async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err::<bool, _>(Error::retryable("down"))
        })
        .await;
        assert!(placed.is_err_and(|e| e.is_retryable()));
        assert_eq!(calls.load(Ordering::Relaxed), CLIENT_ATTEMPTS as usize);
    }

    /// Runs a small pipeline; skipped with a note when a service is unreachable, unless
    /// `IDEM_TEST_REQUIRE` names it.
    async fn pipeline(backend: &str, broker: &str, service: &str) {
        let args = Cli::parse_from([
            "pipeline",
            "--backend",
            backend,
            "--broker",
            broker,
            "--orders",
            "40",
            "--fault-rate",
            "0.2",
        ])
        .args;
        match run(args).await {
            Ok(exactly_once) => assert!(exactly_once, "a duplicate or a lost message"),
            Err(e)
                if !idem_conformance::required(service) && !idem_conformance::required(backend) =>
            {
                eprintln!("skipped: {e}")
            }
            Err(e) => panic!("{backend}/{broker}: {e}"),
        }
    }

    #[tokio::test]
    async fn sqlite_to_nats_applies_every_order_once() {
        pipeline("sqlite", "nats", "nats").await;
    }

    #[tokio::test]
    async fn postgres_to_rabbitmq_applies_every_order_once() {
        pipeline("postgres", "rabbitmq", "rabbitmq").await;
    }
}
