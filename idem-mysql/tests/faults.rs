//! Failures that need a MariaDB server of the test's own (started from `mariadbd` on a
//! free port with a data directory under the target dir, never the shared server): too
//! many connections, a read-only server, and the server killed with SIGKILL mid-transaction
//! and restarted (durability of acknowledged writes, rollback of the open transaction).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_conformance::required;
use idem_core::{
    Barrier, Begin, Clock, Deadlines, Error, Failure, Key, RunError, Store, SystemClock, TxPolicy,
};
use idem_mysql::{MySqlOperation, MySqlOptions, MySqlStore};
use sqlx::{AssertSqlSafe, Connection, MySqlConnection};
use tokio::sync::oneshot;

/// A data directory made once by `mariadb-install-db`, copied for each server.
static TEMPLATE: Mutex<Option<PathBuf>> = Mutex::new(None);

fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The template data directory, or why there is none.
fn template() -> Result<PathBuf, String> {
    let mut slot = TEMPLATE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = &*slot {
        return Ok(dir.clone());
    }
    if !installed("mariadbd") || !installed("mariadb-install-db") {
        return Err("mariadbd or mariadb-install-db is not installed".into());
    }
    // Kept between runs; made under a name of its own, then renamed into place.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("idem-mysql-template");
    if !dir.join("mysql").is_dir() {
        let fresh = PathBuf::from(format!("{}.{}", dir.display(), std::process::id()));
        let _ = std::fs::remove_dir_all(&fresh);
        let out = Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                &format!("--datadir={}", fresh.display()),
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--innodb-log-file-size=8M",
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "mariadb-install-db failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if std::fs::rename(&fresh, &dir).is_err() {
            // Another test process put its own in place first.
            let _ = std::fs::remove_dir_all(&fresh);
        }
    }
    *slot = Some(dir.clone());
    Ok(dir)
}

/// A private server; SIGKILLed and its directory removed on drop.
struct Server {
    dir: PathBuf,
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl Server {
    /// Starts a server with `extra` options, or `None` (skip printed) when MariaDB is not
    /// installed here; panics then if `IDEM_TEST_REQUIRE` names `mysql`.
    async fn start(extra: &[&str]) -> Option<Server> {
        let template = match template() {
            Ok(t) => t,
            Err(why) if required("mysql") => panic!("IDEM_TEST_REQUIRE names `mysql`: {why}"),
            Err(why) => {
                eprintln!("skipped: {why}");
                return None;
            }
        };
        let dir = PathBuf::from(format!(
            "{}-{}",
            template.display(),
            common::unique("server")
        ));
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(copied.success());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut args = vec![
            "--no-defaults".to_string(),
            format!("--datadir={}", dir.display()),
            format!("--port={port}"),
            "--bind-address=127.0.0.1".into(),
            format!("--socket={}/mysqld.sock", dir.display()),
            format!("--pid-file={}/mysqld.pid", dir.display()),
            "--user=root".into(),
            "--innodb-buffer-pool-size=16M".into(),
            "--innodb-log-file-size=8M".into(),
            "--skip-log-bin".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut server = Server {
            dir,
            port,
            args,
            child: None,
        };
        server.run().await;
        let mut root = MySqlConnection::connect(&server.root_url()).await.unwrap();
        sqlx::raw_sql(
            "CREATE DATABASE test;
             CREATE USER 'idem'@'127.0.0.1';
             GRANT ALL ON test.* TO 'idem'@'127.0.0.1';
             CREATE TABLE test.business (scope VARBINARY(255) NOT NULL,
                 id VARBINARY(255) NOT NULL, n INT NOT NULL) ENGINE = InnoDB",
        )
        .execute(&mut root)
        .await
        .unwrap();
        Some(server)
    }

    async fn run(&mut self) {
        let log = std::fs::File::create(self.dir.join("server.log")).unwrap();
        self.child = Some(
            Command::new("mariadbd")
                .args(&self.args)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        for _ in 0..600 {
            if MySqlConnection::connect(&self.root_url()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the private server on port {} did not start", self.port);
    }

    /// Root, without a database (there is none at first).
    fn root_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    fn url(&self, user: &str) -> String {
        format!("mysql://{user}@127.0.0.1:{}/test", self.port)
    }

    async fn connect(&self, user: &str) -> MySqlConnection {
        MySqlConnection::connect(&self.url(user)).await.unwrap()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn deadlines() -> (idem_core::Timestamp, Deadlines) {
    let now = SystemClock.now();
    (
        now,
        Deadlines {
            lease_until: now.plus(Duration::from_secs(30)),
            expires_at: now.plus(Duration::from_secs(3600)),
        },
    )
}

fn options() -> MySqlOptions {
    MySqlOptions::default()
        .with_max_connections(4)
        .with_acquire_timeout(Duration::from_secs(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_connections_is_retryable() {
    // MariaDB's smallest limit is 10 (plus one for an administrator).
    let Some(server) = Server::start(&["--max-connections=10"]).await else {
        return;
    };
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(server.connect("idem").await);
    }
    let e = MySqlStore::connect_with(&server.url("idem"), options())
        .await
        .unwrap_err();
    assert!(
        e.is_retryable() && e.to_string().contains("1040"),
        "too many connections: {e}"
    );
    // The retry succeeds once a connection is free. The server frees the slot when it has
    // processed the close, which a loaded machine may delay: retry the retryable error, as a
    // client would, for a bounded time.
    held.pop().unwrap().close().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match MySqlStore::connect_with(&server.url("idem"), options().with_max_connections(1)).await
        {
            Ok(_) => break,
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no connection after one was freed: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_server_is_retryable() {
    let Some(server) = Server::start(&[]).await else {
        return;
    };
    let store = MySqlStore::connect_with(&server.url("idem"), options())
        .await
        .unwrap();
    let (now, d) = deadlines();
    let Begin::Acquired(lease) = store
        .begin(&Key::new("ro", "held").unwrap(), None, d, now)
        .await
        .unwrap()
    else {
        panic!("fresh key not acquired")
    };
    let mut root = server.connect("root").await;
    sqlx::raw_sql("SET GLOBAL read_only = 1")
        .execute(&mut root)
        .await
        .unwrap();
    let e = store
        .begin(&Key::new("ro", "new").unwrap(), None, d, now)
        .await
        .unwrap_err();
    assert!(e.is_retryable() && e.to_string().contains("1290"), "{e}");
    let e = store
        .complete(&lease, b"ok", d.expires_at, now)
        .await
        .unwrap_err();
    assert!(e.is_retryable() && e.to_string().contains("1290"), "{e}");
    let op: MySqlOperation<u32, String, String> = Box::new(|_| Box::pin(async { Ok(1) }));
    let r = Barrier::new(Arc::new(store.clone()))
        .transaction(&Key::new("ro", "tx").unwrap(), None, TxPolicy::Wait, op)
        .await;
    assert!(
        matches!(&r, Err(RunError::Barrier(e)) if e.is_retryable()),
        "{r:?}"
    );
    // Writable again (the failover finished): the same calls succeed.
    sqlx::raw_sql("SET GLOBAL read_only = 0")
        .execute(&mut root)
        .await
        .unwrap();
    store
        .complete(&lease, b"ok", d.expires_at, now)
        .await
        .unwrap();
    assert!(matches!(
        store
            .begin(&Key::new("ro", "new").unwrap(), None, d, now)
            .await
            .unwrap(),
        Begin::Acquired(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_keeps_what_it_acknowledged_and_nothing_else() {
    let Some(mut server) = Server::start(&[]).await else {
        return;
    };
    let store = MySqlStore::connect_with(&server.url("root"), options())
        .await
        .unwrap();
    let barrier = Barrier::new(Arc::new(store.clone()));
    let (now, d) = deadlines();
    // Acknowledged before the crash: a completed key and a lease-mode claim.
    let done = Key::new("crash", "done").unwrap();
    let Begin::Acquired(lease) = store.begin(&done, None, d, now).await.unwrap() else {
        panic!("fresh key not acquired")
    };
    store
        .complete(&lease, b"paid", d.expires_at, now)
        .await
        .unwrap();
    let claimed = Key::new("crash", "claimed").unwrap();
    let Begin::Acquired(claim) = store.begin(&claimed, None, d, now).await.unwrap() else {
        panic!("fresh key not acquired")
    };
    // Open when the server dies: a transaction that wrote a business row.
    let open = Key::new("crash", "open").unwrap();
    let (entered_tx, entered) = oneshot::channel::<()>();
    let (release, release_rx) = oneshot::channel::<()>();
    let op: MySqlOperation<u32, String, String> = Box::new(move |conn| {
        Box::pin(async move {
            sqlx::query("INSERT INTO business (scope, id, n) VALUES ('crash', 'open', 1)")
                .execute(&mut *conn)
                .await
                .map_err(|e| Failure::Retryable(e.to_string()))?;
            let _ = entered_tx.send(());
            let _ = release_rx.await;
            Ok(1)
        })
    });
    let running = tokio::spawn({
        let (barrier, open) = (barrier.clone(), open.clone());
        async move { barrier.transaction(&open, None, TxPolicy::Wait, op).await }
    });
    entered.await.unwrap();

    server.kill(); // SIGKILL
    let _ = release.send(());
    match running.await.unwrap() {
        Err(RunError::Barrier(e)) => assert!(e.is_retryable(), "{e}"),
        other => panic!("a dead server must be a retryable error, got {other:?}"),
    }
    let e = store.begin(&open, None, d, now).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::Store {
                retryable: true,
                ..
            }
        ),
        "{e}"
    );

    server.run().await; // crash recovery
    let (now, d) = deadlines();
    assert!(
        matches!(store.begin(&done, None, d, now).await.unwrap(), Begin::Completed { response } if response == b"paid"),
        "an acknowledged completion was lost"
    );
    store
        .complete(&claim, b"late", d.expires_at, now)
        .await
        .expect("an acknowledged claim survives the crash, fenced by its token");
    assert!(
        store.get(&open).await.unwrap().is_none(),
        "the open claim rolled back"
    );
    let mut root = server.connect("root").await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM business WHERE id = 'open'")
        .fetch_one(&mut root)
        .await
        .unwrap();
    assert_eq!(rows, 0, "the open transaction's row rolled back");
    let retry: MySqlOperation<u32, String, String> = Box::new(|conn| {
        Box::pin(async move {
            sqlx::query(AssertSqlSafe(
                "INSERT INTO business (scope, id, n) VALUES ('crash', 'open', 2)",
            ))
            .execute(&mut *conn)
            .await
            .map_err(|e| Failure::Retryable(e.to_string()))?;
            Ok(2)
        })
    });
    let r = barrier
        .transaction(&open, None, TxPolicy::Wait, retry)
        .await
        .unwrap();
    assert!(!r.replayed);
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM business WHERE id = 'open'")
        .fetch_one(&mut root)
        .await
        .unwrap();
    assert_eq!(rows, 1);
}
