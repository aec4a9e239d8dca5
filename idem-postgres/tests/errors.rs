//! Each failure of the crate docs' error table, provoked against the real server, comes back
//! classified as the table says.

mod common;
mod support;

use std::sync::Arc;
use std::time::Duration;

use common::{deadlines, url, PgFactory};
use idem_conformance::{available, StoreFactory};
use idem_core::{Barrier, Begin, Error, Failure, Key, Lease, RunError, Store, TxPolicy};
use idem_postgres::{PgOperation, PgOptions, PgStore};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The SQLSTATE behind a store error, if the server sent one.
fn sqlstate(e: &Error) -> Option<String> {
    let Error::Store { source, .. } = e else {
        return None;
    };
    match source.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

fn is_io(e: &Error) -> bool {
    matches!(e, Error::Store { source, .. }
        if matches!(source.downcast_ref::<sqlx::Error>(), Some(sqlx::Error::Io(_))))
}

fn assert_retryable(e: &Error, code: &str) {
    assert!(e.is_retryable(), "{code}: {e}");
    assert_eq!(sqlstate(e).as_deref(), Some(code), "{e}");
}

fn assert_permanent(e: &Error) {
    assert!(
        matches!(
            e,
            Error::Store {
                retryable: false,
                ..
            }
        ),
        "expected a permanent store error, got {e:?}"
    );
}

async fn acquire(store: &PgStore, key: &Key) -> Lease {
    let (d, now) = deadlines();
    match store.begin(key, None, d, now).await.unwrap() {
        Begin::Acquired(lease) => lease,
        other => panic!("a fresh key must be acquired, got {other:?}"),
    }
}

/// A factory with its schema, and a store on a fresh table of it opened by
/// `connect_with(app_url, options)`.
async fn store_with(options: PgOptions, app: &str) -> Option<(PgFactory, PgStore)> {
    let factory = common::factory();
    if !available(&factory).await {
        return None;
    }
    factory.pool().await.unwrap();
    let options = options
        .with_table(&format!("{}.records", factory.schema()))
        .unwrap();
    let store = PgStore::connect_with(&support::app_url(app), options)
        .await
        .unwrap();
    Some((factory, store))
}

/// Opens a transaction on its own connection that locks the record of `key`.
async fn lock_record(store: &PgStore, key: &Key) -> PgConnection {
    let mut conn = PgConnection::connect(&url()).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM {} WHERE scope = $1 AND id = $2 FOR UPDATE",
        store.table().quoted()
    )))
    .bind(key.scope())
    .bind(key.id())
    .fetch_one(&mut conn)
    .await
    .unwrap();
    conn
}

/// Waits until a session named `app` waits on a lock, and returns its pid.
async fn waiting_backend(app: &str) -> i32 {
    let mut observer = PgConnection::connect(&url()).await.unwrap();
    loop {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind(app)
        .fetch_optional(&mut observer)
        .await
        .unwrap();
        if let Some(pid) = pid {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn statement_timeout_is_retryable() {
    idem_conformance::__block_on(async {
        let app = support::unique("idem_err_stmt");
        let options = PgOptions::default().with_statement_timeout(Duration::from_secs(1));
        let Some((_f, store)) = store_with(options, &app).await else {
            return;
        };
        let key = Key::new("err", "statement-timeout").unwrap();
        let lease = acquire(&store, &key).await;
        let (_, now) = deadlines();
        let holder = lock_record(&store, &key).await;
        let e = store.complete(&lease, b"\x01", now, now).await.unwrap_err();
        assert_retryable(&e, "57014");
        drop(holder);
        store.complete(&lease, b"\x01", now, now).await.unwrap();
        support::assert_pool_healthy(&store).await;
    });
}

#[test]
fn lock_timeout_is_retryable() {
    idem_conformance::__block_on(async {
        let app = support::unique("idem_err_lock");
        let options = PgOptions::default().with_lock_timeout(Duration::from_secs(1));
        let Some((_f, store)) = store_with(options, &app).await else {
            return;
        };
        let key = Key::new("err", "lock-timeout").unwrap();
        let lease = acquire(&store, &key).await;
        let (_, now) = deadlines();
        let holder = lock_record(&store, &key).await;
        let e = store.release(&lease, now).await.unwrap_err();
        assert_retryable(&e, "55P03");
        drop(holder);
        store.release(&lease, now).await.unwrap();
    });
}

#[test]
fn terminated_backend_and_cancelled_query_are_retryable() {
    idem_conformance::__block_on(async {
        let app = support::unique("idem_err_kill");
        let Some((_f, store)) = store_with(PgOptions::default(), &app).await else {
            return;
        };
        let key = Key::new("err", "terminated").unwrap();
        let lease = acquire(&store, &key).await;
        let (_, now) = deadlines();
        let mut holder = lock_record(&store, &key).await;

        // pg_cancel_backend: the waiting statement is cancelled (57014).
        let blocked = tokio::spawn({
            let (store, lease) = (store.clone(), lease.clone());
            async move { store.complete(&lease, b"\x01", now, now).await }
        });
        let pid = waiting_backend(&app).await;
        let cancelled: bool = sqlx::query_scalar("SELECT pg_cancel_backend($1)")
            .bind(pid)
            .fetch_one(&mut holder)
            .await
            .unwrap();
        assert!(cancelled);
        assert_retryable(&blocked.await.unwrap().unwrap_err(), "57014");

        // pg_terminate_backend: the session ends (57P01, or the closed socket first).
        let blocked = tokio::spawn({
            let (store, lease) = (store.clone(), lease.clone());
            async move { store.complete(&lease, b"\x01", now, now).await }
        });
        let pid = waiting_backend(&app).await;
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&mut holder)
            .await
            .unwrap();
        assert!(killed);
        let e = blocked.await.unwrap().unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(
            sqlstate(&e).as_deref() == Some("57P01") || is_io(&e),
            "a terminated backend is 57P01 or an I/O error: {e}"
        );
        drop(holder);
        store.complete(&lease, b"\x01", now, now).await.unwrap();
        support::assert_pool_healthy(&store).await;
    });
}

/// A transactional operation that writes one business row for `key`, then waits until
/// `until` resolves.
fn op_then<Fut>(business: &str, key: &Key, until: Fut) -> PgOperation<u64, String, String>
where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let insert = format!("INSERT INTO {business} (scope, id, n) VALUES ($1, $2, 1)");
    let (scope, id) = (key.scope().to_string(), key.id().to_string());
    Box::new(move |conn| {
        Box::pin(async move {
            sqlx::query(AssertSqlSafe(insert))
                .bind(scope)
                .bind(id)
                .execute(&mut *conn)
                .await
                .map_err(|e| Failure::Retryable(e.to_string()))?;
            until.await;
            Ok(1)
        })
    })
}

async fn business_rows(factory: &PgFactory, key: &Key) -> i64 {
    let mut conn = PgConnection::connect(&url()).await.unwrap();
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.business WHERE scope = $1 AND id = $2",
        factory.schema()
    )))
    .bind(key.scope())
    .bind(key.id())
    .fetch_one(&mut conn)
    .await
    .unwrap()
}

/// The retry after a failed transaction executes, exactly once.
async fn retry_executes_once(factory: &PgFactory, store: &PgStore, key: &Key) {
    assert_eq!(business_rows(factory, key).await, 0, "rolled back");
    assert!(store.get(key).await.unwrap().is_none(), "no claim left");
    let barrier = Barrier::new(Arc::new(store.clone()));
    let business = format!("{}.business", factory.schema());
    let retry = barrier
        .transaction(key, None, TxPolicy::Wait, op_then(&business, key, async {}))
        .await
        .unwrap();
    assert!(!retry.replayed);
    assert_eq!(business_rows(factory, key).await, 1);
}

#[test]
fn idle_in_transaction_timeout_is_retryable_and_rolls_back() {
    idem_conformance::__block_on(async {
        let app = support::unique("idem_err_idle");
        let options = PgOptions::default().with_idle_in_transaction_timeout(Duration::from_secs(1));
        let Some((factory, store)) = store_with(options, &app).await else {
            return;
        };
        let key = Key::new("err", "idle-in-transaction").unwrap();
        let business = format!("{}.business", factory.schema());
        // The operation waits (outside the database) until the server has ended its session.
        let gone = {
            let app = app.clone();
            async move {
                let mut observer = PgConnection::connect(&url()).await.unwrap();
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let idle: i64 = sqlx::query_scalar(
                        "SELECT count(*) FROM pg_stat_activity
                          WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
                    )
                    .bind(&app)
                    .fetch_one(&mut observer)
                    .await
                    .unwrap();
                    if idle == 0 {
                        return;
                    }
                }
            }
        };
        let barrier = Barrier::new(Arc::new(store.clone()));
        let result = barrier
            .transaction(&key, None, TxPolicy::Wait, op_then(&business, &key, gone))
            .await;
        let Err(RunError::Barrier(e)) = result else {
            panic!("expected a store error, got {result:?}");
        };
        assert!(e.is_retryable(), "{e}");
        assert!(
            sqlstate(&e).as_deref() == Some("25P03") || is_io(&e),
            "25P03 or an I/O error: {e}"
        );
        retry_executes_once(&factory, &store, &key).await;
        support::assert_pool_healthy(&store).await;
    });
}

#[test]
fn serialization_failure_at_commit_is_retryable() {
    idem_conformance::__block_on(async {
        let app = support::unique("idem_err_serial");
        let factory = common::factory();
        if !available(&factory).await {
            return;
        }
        factory.pool().await.unwrap();
        let options = PgOptions::default()
            .with_table(&format!("{}.records", factory.schema()))
            .unwrap();
        // Every transaction of this pool is SERIALIZABLE, as on a server configured so.
        let serializable = format!(
            "{}&options=-c%20default_transaction_isolation%3Dserializable",
            support::app_url(&app)
        );
        let store = PgStore::connect_with(&serializable, options).await.unwrap();
        let barrier = Barrier::new(Arc::new(store.clone()));
        let business = format!("{}.business", factory.schema());
        // Write skew: each operation counts the group's rows, then adds one; neither sees
        // the other's. The first to commit wins; the other fails at its next statement.
        let sync = Arc::new(tokio::sync::Barrier::new(2));
        let op = |id: &'static str| -> PgOperation<u64, String, sqlx::Error> {
            let (business, sync) = (business.clone(), Arc::clone(&sync));
            Box::new(move |conn| {
                Box::pin(async move {
                    let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                        "SELECT count(*) FROM {business} WHERE scope = 'skew'"
                    )))
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(Failure::Retryable)?;
                    sync.wait().await;
                    sqlx::query(AssertSqlSafe(format!(
                        "INSERT INTO {business} (scope, id, n) VALUES ('skew', $1, $2)"
                    )))
                    .bind(id)
                    .bind(n as i32)
                    .execute(&mut *conn)
                    .await
                    .map_err(Failure::Retryable)?;
                    sync.wait().await;
                    Ok(1)
                })
            })
        };
        let (a, b) = (
            Key::new("skew", "a").unwrap(),
            Key::new("skew", "b").unwrap(),
        );
        // A liveness bound: an operation failing before the second rendezvous would leave
        // the other waiting.
        let (ra, rb) = tokio::time::timeout(Duration::from_secs(120), async {
            tokio::join!(
                barrier.transaction(&a, None, TxPolicy::Wait, op("a")),
                barrier.transaction(&b, None, TxPolicy::Wait, op("b")),
            )
        })
        .await
        .expect("both operations reach their rendezvous");
        let failed = match (ra, rb) {
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
            other => panic!("exactly one of the two must commit: {other:?}"),
        };
        let RunError::Barrier(e) = failed else {
            panic!("the failure must come from the barrier's own statements: {failed:?}");
        };
        assert_retryable(&e, "40001");
        support::assert_pool_healthy(&store).await;
    });
}

#[test]
fn deadlock_at_commit_is_retryable() {
    idem_conformance::__block_on(async {
        let app = support::unique("idem_err_deadlock");
        let Some((factory, store)) = store_with(PgOptions::default(), &app).await else {
            return;
        };
        let s = &factory.schema();
        let mut setup = PgConnection::connect(&url()).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE {s}.parent (id INT PRIMARY KEY);
             INSERT INTO {s}.parent VALUES (1);
             CREATE TABLE {s}.child (parent_id INT REFERENCES {s}.parent DEFERRABLE INITIALLY DEFERRED);
             INSERT INTO {s}.business (scope, id, n) VALUES ('deadlock', 'row', 0);"
        )))
        .execute(&mut setup)
        .await
        .unwrap();

        // The other transaction holds the parent row; it is never the one to detect the
        // deadlock (its deadlock_timeout is long), so the barrier's COMMIT is.
        let mut other = PgConnection::connect(&url()).await.unwrap();
        let other_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut other)
            .await
            .unwrap();
        // Should the test fail, the other session must not outlive it holding locks that
        // dropping the schema waits for.
        let _end_other = support::OnDrop(format!("SELECT pg_terminate_backend({other_pid})"));
        sqlx::raw_sql(AssertSqlSafe(format!(
            "BEGIN; SET LOCAL deadlock_timeout = '60s';
             SELECT 1 FROM {s}.parent WHERE id = 1 FOR UPDATE"
        )))
        .execute(&mut other)
        .await
        .unwrap();

        let (wrote_tx, wrote) = tokio::sync::oneshot::channel::<()>();
        let (go_tx, go) = tokio::sync::oneshot::channel::<()>();
        let (update, child) = (
            format!("UPDATE {s}.business SET n = n + 1 WHERE scope = 'deadlock'"),
            format!("INSERT INTO {s}.child VALUES (1)"),
        );
        // The operation holds the business row and leaves a deferred foreign-key check
        // for COMMIT, which will wait for the other transaction's parent row.
        let op: PgOperation<u64, String, String> = Box::new(move |conn| {
            Box::pin(async move {
                for statement in [update, child] {
                    sqlx::query(AssertSqlSafe(statement))
                        .execute(&mut *conn)
                        .await
                        .map_err(|e| Failure::Retryable(e.to_string()))?;
                }
                let _ = wrote_tx.send(());
                let _ = go.await;
                Ok(1)
            })
        });
        let key = Key::new("err", "deadlock").unwrap();
        let barrier = Barrier::new(Arc::new(store.clone()));
        let running = tokio::spawn({
            let key = key.clone();
            async move { barrier.transaction(&key, None, TxPolicy::Wait, op).await }
        });
        wrote.await.unwrap();
        // The other transaction now waits for the business row...
        let update = format!("UPDATE {s}.business SET n = n + 1 WHERE scope = 'deadlock'");
        let waiting = tokio::spawn(async move {
            let r = sqlx::query(AssertSqlSafe(update)).execute(&mut other).await;
            (r, other)
        });
        let mut observer = PgConnection::connect(&url()).await.unwrap();
        loop {
            let blocked: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            )
            .bind(other_pid)
            .fetch_one(&mut observer)
            .await
            .unwrap();
            if blocked > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // ...and the barrier's COMMIT waits for the parent row: a deadlock.
        go_tx.send(()).unwrap();
        let result = running.await.unwrap();
        let Err(RunError::Barrier(e)) = result else {
            panic!("expected a store error, got {result:?}");
        };
        assert_retryable(&e, "40P01");
        let (r, mut other) = waiting.await.unwrap();
        r.unwrap();
        sqlx::raw_sql("ROLLBACK").execute(&mut other).await.unwrap();
        retry_executes_once(&factory, &store, &key).await;
        support::assert_pool_healthy(&store).await;
    });
}

/// `url()` with `user` instead of its user.
fn url_as(user: &str) -> String {
    let base = url();
    let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", &base));
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{host}")
}

/// A role of this test's own, dropped with its privileges and sessions when the test ends
/// (also when it fails).
struct Role {
    name: String,
    _drop: support::OnDrop,
}

impl Role {
    async fn create(attributes: &str) -> Role {
        let name = support::unique("idem_err_role");
        let mut conn = PgConnection::connect(&url()).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE ROLE {name} LOGIN {attributes}"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        let drop = support::OnDrop(format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}';
             DROP OWNED BY {name}; DROP ROLE {name}"
        ));
        Role { name, _drop: drop }
    }
}

#[test]
fn too_many_connections_is_retryable() {
    idem_conformance::__block_on(async {
        let factory = common::factory();
        if !available(&factory).await {
            return;
        }
        let role = Role::create("CONNECTION LIMIT 1").await;
        let held = PgConnection::connect(&url_as(&role.name)).await.unwrap();
        // What the server answers a second session of the role...
        let refused = PgConnection::connect(&url_as(&role.name))
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, sqlx::Error::Database(db) if db.code().as_deref() == Some("53300")),
            "{refused}"
        );
        // ...which sqlx retries while connecting, until the connect timeout.
        let options = PgOptions::default().with_connect_timeout(Duration::from_millis(500));
        let e = PgStore::connect_with(&url_as(&role.name), options)
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        drop(held);
    });
}

#[test]
fn permission_denied_is_permanent() {
    idem_conformance::__block_on(async {
        let factory = common::factory();
        if !available(&factory).await {
            return;
        }
        let owner = factory.create().await.unwrap();
        let role = Role::create("").await;
        let table = owner.table().quoted();
        let options = || {
            PgOptions::default()
                .with_table(&table.replace('"', ""))
                .unwrap()
        };
        // No USAGE on the schema: migrate cannot even look the table up.
        let e = PgStore::connect_with(&url_as(&role.name), options())
            .await
            .unwrap_err();
        assert_permanent(&e);
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e}");
        // USAGE but no table privileges: migrate finds the table, begin is refused.
        let mut conn = PgConnection::connect(&url()).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "GRANT USAGE ON SCHEMA {} TO {}",
            factory.schema(),
            role.name
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        let store = PgStore::connect_with(&url_as(&role.name), options())
            .await
            .unwrap();
        let (d, now) = deadlines();
        let e = store
            .begin(&Key::new("err", "denied").unwrap(), None, d, now)
            .await
            .unwrap_err();
        assert_permanent(&e);
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e}");
        store.pool().close().await;
    });
}

#[test]
fn connection_refused_and_pool_timeout_are_retryable() {
    idem_conformance::__block_on(async {
        let factory = common::factory();
        if !available(&factory).await {
            return;
        }
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let options = PgOptions::default().with_connect_timeout(Duration::from_millis(300));
        let e = PgStore::connect_with(
            &format!("postgres://postgres@127.0.0.1:{port}/test"),
            options,
        )
        .await
        .unwrap_err();
        assert!(e.is_retryable(), "{e}");

        // A pool of one connection, held elsewhere.
        factory.pool().await.unwrap();
        let options = PgOptions::default()
            .with_table(&format!("{}.records", factory.schema()))
            .unwrap()
            .with_max_connections(1)
            .with_connect_timeout(Duration::from_millis(300));
        let store = PgStore::connect_with(&url(), options).await.unwrap();
        let held = store.pool().acquire().await.unwrap();
        let e = store
            .get(&Key::new("err", "pool-timeout").unwrap())
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(
            matches!(&e, Error::Store { source, .. }
                if matches!(source.downcast_ref::<sqlx::Error>(), Some(sqlx::Error::PoolTimedOut))),
            "{e}"
        );
        drop(held);
        store
            .get(&Key::new("err", "pool-timeout").unwrap())
            .await
            .unwrap();
    });
}

#[test]
fn closed_pool_missing_table_and_bad_config_are_permanent() {
    idem_conformance::__block_on(async {
        let factory = common::factory();
        if !available(&factory).await {
            return;
        }
        let (d, now) = deadlines();
        let key = Key::new("err", "permanent").unwrap();

        factory.pool().await.unwrap();
        let records = PgOptions::default()
            .with_table(&format!("{}.records", factory.schema()))
            .unwrap();
        let store = PgStore::connect_with(&url(), records).await.unwrap();
        store.pool().close().await;
        assert_permanent(&store.begin(&key, None, d, now).await.unwrap_err());

        // A table never migrated (42P01), a schema that does not exist (3F000).
        let pool = factory.pool().await.unwrap().clone();
        let never = PgOptions::default()
            .with_table(&format!("{}.never_created", factory.schema()))
            .unwrap();
        let store = PgStore::from_pool(pool.clone(), never).unwrap();
        let e = store.begin(&key, None, d, now).await.unwrap_err();
        assert_permanent(&e);
        assert_eq!(sqlstate(&e).as_deref(), Some("42P01"), "{e}");
        let nowhere = PgOptions::default()
            .with_table(&format!("{}_missing.records", factory.schema()))
            .unwrap();
        let e = PgStore::from_pool(pool.clone(), nowhere)
            .unwrap()
            .migrate()
            .await
            .unwrap_err();
        assert_permanent(&e);
        assert_eq!(sqlstate(&e).as_deref(), Some("3F000"), "{e}");

        // Bad configuration: a malformed URL, a timeout PostgreSQL cannot take, pool
        // settings for a pool that is already built.
        let e = PgStore::connect("postgres://127.0.0.1:5432/test?sslmode=sometimes")
            .await
            .unwrap_err();
        assert_permanent(&e);
        for timeout in [
            Duration::ZERO,
            Duration::from_micros(999),
            Duration::from_secs(30 * 86_400),
        ] {
            let options = PgOptions::default().with_statement_timeout(timeout);
            let e = PgStore::connect_with(&url(), options).await.unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{timeout:?}: {e}");
        }
        let sized = PgOptions::default().with_max_connections(3);
        let e = PgStore::from_pool(pool, sized).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
    });
}

#[test]
fn corrupt_records_are_permanent_and_name_their_key() {
    idem_conformance::__block_on(async {
        let factory = common::factory();
        if !available(&factory).await {
            return;
        }
        let store = factory.create().await.unwrap();
        let insert = format!(
            "INSERT INTO {} (scope, id, fingerprint, state, token, lease_until, response,
                             created_at, updated_at, expires_at)
             VALUES ('corrupt', $1, $2, $3, $4, NULL, $5, 0, 0, 9000000000000)",
            store.table().quoted()
        );
        // (id, fingerprint, state, token, response)
        type Row<'a> = (&'a str, Option<&'a [u8]>, &'a str, i64, Option<&'a [u8]>);
        let cases: [Row<'_>; 4] = [
            ("unknown-state", None, "archived", 1, Some(b"\x01")),
            ("token-zero", None, "completed", 0, Some(b"\x01")),
            (
                "short-fingerprint",
                Some(b"abc"),
                "completed",
                1,
                Some(b"\x01"),
            ),
            ("no-response", None, "failed", 1, None),
        ];
        let (d, now) = deadlines();
        let barrier = Barrier::new(Arc::new(store.clone()));
        let business = format!("{}.business", factory.schema());
        for (id, fingerprint, state, token, response) in cases {
            sqlx::query(AssertSqlSafe(insert.clone()))
                .bind(id)
                .bind(fingerprint)
                .bind(state)
                .bind(token)
                .bind(response)
                .execute(store.pool())
                .await
                .unwrap();
            let key = Key::new("corrupt", id).unwrap();
            let named = |e: &Error| {
                assert!(!e.is_retryable(), "{id}: {e}");
                assert!(
                    matches!(e, Error::Corrupt { key: Some(k), .. } if *k == key.to_string()),
                    "{id}: {e:?}"
                );
                assert!(e.to_string().contains(&key.to_string()), "{e}");
            };
            named(&store.get(&key).await.unwrap_err());
            named(&store.begin(&key, None, d, now).await.unwrap_err());
            match barrier
                .transaction(
                    &key,
                    None,
                    TxPolicy::Wait,
                    op_then(&business, &key, async {}),
                )
                .await
            {
                Err(RunError::Barrier(e)) => named(&e),
                other => panic!("{id}: expected a corrupt record, got {other:?}"),
            }
        }
        let declined = Key::new("corrupt", "no-response").unwrap();
        assert_eq!(business_rows(&factory, &declined).await, 0);
    });
}
