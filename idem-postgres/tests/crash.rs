//! Real failures against the real server: a worker killed with SIGKILL mid-transaction, and a
//! backend terminated by the server mid-operation.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use idem_conformance::{available, StoreFactory, TxEnd, TxFactory, TxPlan};
use idem_core::{Barrier, Clock, Error, Failure, Key, RunError, Store, TxPolicy};
use idem_postgres::{PgOperation, PgOptions, PgStore};
use sqlx::AssertSqlSafe;
use tokio::io::{AsyncBufReadExt, BufReader};

const CHILD_SCHEMA: &str = "IDEM_CRASH_CHILD_SCHEMA";
const WROTE: &str = "idem-crash-child: rows written, transaction open";

fn key() -> Key {
    Key::new("crash", "order-1").unwrap()
}

/// Runs in the child process: opens a transactional operation, writes rows, reports, and
/// hangs until it is killed.
#[test]
#[ignore = "helper: run as a child process by `sigkill_mid_transaction_leaves_nothing`"]
fn crash_child() {
    let Ok(schema) = std::env::var(CHILD_SCHEMA) else {
        return;
    };
    idem_conformance::__block_on(async move {
        let pool = sqlx::PgPool::connect(&common::url()).await.unwrap();
        let options = PgOptions::default()
            .with_table(&format!("{schema}.records_0"))
            .unwrap();
        let store = PgStore::from_pool(pool, options).unwrap();
        let insert = format!("INSERT INTO {schema}.business (scope, id, n) VALUES ('crash', 'order-1', 1), ('crash', 'order-1', 2)");
        let op: PgOperation<u64, String, String> = Box::new(move |conn| {
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(insert))
                    .execute(&mut *conn)
                    .await
                    .unwrap();
                println!("{WROTE}");
                tokio::time::sleep(Duration::from_secs(120)).await;
                Ok(2)
            })
        });
        let _ = Barrier::new(Arc::new(store))
            .transaction(&key(), None, TxPolicy::Wait, op)
            .await;
        unreachable!("the parent kills this process before the operation ends");
    });
}

#[test]
fn sigkill_mid_transaction_leaves_nothing() {
    idem_conformance::__block_on(async {
        let factory = common::factory();
        if !available(&factory).await {
            return;
        }
        let store = factory.create().await.unwrap();
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_SCHEMA, factory.schema())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let wrote = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains(WROTE) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(wrote, Ok(true), "the child never reached its operation");

        // The child is inside its transaction: its claim blocks a no-wait duplicate.
        let barrier = Barrier::new(Arc::new(store.clone()));
        let busy = barrier
            .transaction(
                &key(),
                None,
                TxPolicy::NoWait,
                factory.operation(&key(), plan()),
            )
            .await;
        assert!(
            matches!(busy, Err(RunError::Barrier(Error::InProgress { .. }))),
            "{busy:?}"
        );

        child.kill().await.unwrap(); // SIGKILL
        child.wait().await.unwrap();

        // The retry waits for the server to abort the dead transaction, then executes once.
        let retry = barrier
            .transaction(
                &key(),
                None,
                TxPolicy::Wait,
                factory.operation(&key(), plan()),
            )
            .await
            .unwrap();
        assert!(
            !retry.replayed,
            "the killed transaction must not have committed an outcome"
        );
        assert_eq!(
            factory.business_rows(&store, &key()).await.unwrap(),
            1,
            "only the retry's row"
        );
        let again = barrier
            .transaction(
                &key(),
                None,
                TxPolicy::Wait,
                factory.operation(&key(), plan()),
            )
            .await
            .unwrap();
        assert!(again.replayed);
        assert_eq!(factory.business_rows(&store, &key()).await.unwrap(), 1);
    });
}

fn plan() -> TxPlan {
    TxPlan {
        rows: 1,
        hold: Duration::ZERO,
        end: TxEnd::Commit,
    }
}

#[test]
fn terminated_backend_is_retryable_and_nothing_duplicates() {
    idem_conformance::__block_on(async {
        let factory = common::factory();
        if !available(&factory).await {
            return;
        }
        let store = factory.create().await.unwrap();
        let barrier = Barrier::new(Arc::new(store.clone()));
        let k = Key::new("kill", "order-2").unwrap();
        let (pid_tx, pid_rx) = tokio::sync::oneshot::channel::<i32>();
        let insert = format!(
            "INSERT INTO {}.business (scope, id, n) VALUES ('kill', 'order-2', 1)",
            factory.schema()
        );
        let op: PgOperation<u64, String, String> = Box::new(move |conn| {
            Box::pin(async move {
                let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(|e| Failure::Retryable(e.to_string()))?;
                sqlx::query(AssertSqlSafe(insert.clone()))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| Failure::Retryable(e.to_string()))?;
                let _ = pid_tx.send(pid);
                tokio::time::sleep(Duration::from_millis(500)).await;
                sqlx::query(AssertSqlSafe(insert))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| Failure::Retryable(e.to_string()))?;
                Ok(2)
            })
        });
        let running = tokio::spawn({
            let barrier = barrier.clone();
            let k = k.clone();
            async move { barrier.transaction(&k, None, TxPolicy::Wait, op).await }
        });
        let pid = pid_rx.await.unwrap();
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert!(killed);
        match running.await.unwrap() {
            Err(RunError::Operation(_)) => {}
            Err(RunError::Barrier(e @ Error::Store { .. })) => assert!(e.is_retryable(), "{e:?}"),
            other => {
                panic!("a terminated backend must surface as a retryable error, got {other:?}")
            }
        }
        assert_eq!(factory.business_rows(&store, &k).await.unwrap(), 0);
        assert!(
            store.get(&k).await.unwrap().is_none(),
            "no claim survives the dead transaction"
        );

        let retry = barrier
            .transaction(
                &k,
                None,
                TxPolicy::Wait,
                factory.operation(&k, TxPlan { rows: 2, ..plan() }),
            )
            .await
            .unwrap();
        assert!(!retry.replayed);
        let again = barrier
            .transaction(
                &k,
                None,
                TxPolicy::Wait,
                factory.operation(&k, TxPlan { rows: 2, ..plan() }),
            )
            .await
            .unwrap();
        assert!(again.replayed);
        assert_eq!(
            factory.business_rows(&store, &k).await.unwrap(),
            2,
            "executed exactly once"
        );
    });
}

#[test]
fn a_closed_pool_is_a_permanent_store_error() {
    idem_conformance::__block_on(async {
        let factory = common::factory();
        if !available(&factory).await {
            return;
        }
        let store = factory.create().await.unwrap();
        store.pool().close().await;
        let now = idem_core::SystemClock.now();
        let d = idem_core::Deadlines {
            lease_until: now,
            expires_at: now,
        };
        match store.begin(&key(), None, d, now).await {
            Err(e @ Error::Store { .. }) => assert!(!e.is_retryable(), "{e:?}"),
            other => panic!("a closed pool must be a permanent store error, got {other:?}"),
        }
    });
}

#[test]
fn invalid_table_names_are_refused() {
    for name in [
        "Idem",
        "idem-records",
        "a.b.c",
        "",
        "x; DROP TABLE y",
        "1abc",
        "a.",
        ".a",
    ] {
        assert!(
            matches!(idem_postgres::TableName::new(name), Err(Error::Config(_))),
            "{name:?} was accepted"
        );
    }
    assert_eq!(
        idem_postgres::TableName::new("billing.idem_records")
            .unwrap()
            .quoted(),
        "\"billing\".\"idem_records\""
    );
}
