//! Shared by the integration tests: the shared server's URL and unique prefixes, and
//! private `redis-server`s on ports of their own for fault tests.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use idem_redis::{RedisOptions, RedisStore};
use tokio::process::{Child, Command};

/// The shared server (`IDEM_REDIS_URL`).
pub fn url() -> String {
    std::env::var("IDEM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_string())
}

/// A prefix no other test run uses: pid and a nanosecond stamp.
pub fn unique_prefix(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("idem-test:{tag}:{}:{nanos}:", std::process::id())
}

/// A plain connection to `url` that answers `PING`, or `None`.
pub async fn plain(url: &str) -> Option<redis::aio::MultiplexedConnection> {
    let (conn, ping) = answering(url).await?;
    ping.ok()?;
    Some(conn)
}

/// A connection to `url` and its answer to `PING`, whatever the answer (`NOAUTH`, for
/// example); `None` if nothing answers.
async fn answering(
    url: &str,
) -> Option<(
    redis::aio::MultiplexedConnection,
    redis::RedisResult<String>,
)> {
    let client = redis::Client::open(url).ok()?;
    let probe = client.get_multiplexed_async_connection();
    let mut conn = tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .ok()?
        .ok()?;
    let ping = redis::cmd("PING").query_async::<String>(&mut conn).await;
    if matches!(&ping, Err(e) if e.is_io_error()) {
        return None;
    }
    Some((conn, ping))
}

/// A connection to the shared server, or `None` after printing why the test is skipped
/// (a failure instead if `IDEM_TEST_REQUIRE` names redis).
pub async fn shared() -> Option<redis::aio::MultiplexedConnection> {
    let conn = plain(&url()).await;
    if conn.is_none() {
        assert!(
            !idem_conformance::required("redis"),
            "IDEM_TEST_REQUIRE names redis but {} cannot be reached",
            url()
        );
        eprintln!("skipped: {} cannot be reached", url());
    }
    conn
}

/// A test's namespace on the shared server: a fresh prefix and a connection to clean it.
pub struct Shared {
    pub admin: redis::aio::MultiplexedConnection,
    pub prefix: String,
}

impl Shared {
    /// `None` (after printing why) if the shared server cannot be reached.
    pub async fn open(tag: &str) -> Option<Shared> {
        Some(Shared {
            admin: shared().await?,
            prefix: unique_prefix(tag),
        })
    }

    /// Default options under the prefix `<prefix><suffix>`.
    pub fn options(&self, suffix: &str) -> RedisOptions {
        RedisOptions::default()
            .with_key_prefix(format!("{}{suffix}", self.prefix))
            .expect("a valid prefix")
    }

    /// A store on the shared server with `options`.
    pub async fn store(&self, options: RedisOptions) -> RedisStore {
        RedisStore::connect_with(&url(), options)
            .await
            .expect("connect to the shared server")
    }

    /// Deletes everything under the prefix.
    pub async fn cleanup(mut self) {
        delete_prefix(&mut self.admin, &self.prefix).await;
    }
}

/// Deletes every key under `prefix` (from [`unique_prefix`], so free of glob characters)
/// on the shared server.
pub async fn delete_prefix(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) {
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(conn)
        .await
        .unwrap_or_default();
    for chunk in keys.chunks(500) {
        let _: Result<(), _> = redis::cmd("DEL").arg(chunk).query_async(conn).await;
    }
}

/// A throwaway `redis-server` on its own port and directory, killed when dropped.
pub struct PrivateServer {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
    /// Whether dropping this value deletes `dir` (not when a restart took it over).
    owns_dir: bool,
}

impl PrivateServer {
    /// Starts `redis-server` on `port` (no persistence unless `args` ask for it) and waits
    /// until it answers. `None` (after printing why, or failing if `IDEM_TEST_REQUIRE`
    /// names redis) if there is no `redis-server` binary.
    pub async fn start(port: u16, args: &[&str]) -> Option<PrivateServer> {
        let dir = std::env::temp_dir().join(format!("idem-redis-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let server = Self::spawn(port, &dir, args).await;
        if server.is_none() {
            assert!(
                !idem_conformance::required("redis"),
                "IDEM_TEST_REQUIRE names redis but no redis-server could be started on port {port}"
            );
            eprintln!("skipped: no redis-server could be started on port {port}");
        }
        server
    }

    async fn spawn(port: u16, dir: &std::path::Path, args: &[&str]) -> Option<PrivateServer> {
        let port_arg = port.to_string();
        let dir_arg = dir.to_string_lossy().into_owned();
        let mut all = vec![
            "--port",
            &port_arg,
            "--bind",
            "127.0.0.1",
            "--dir",
            &dir_arg,
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        all.extend_from_slice(args);
        let child = Command::new("redis-server")
            .args(&all)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        let server = PrivateServer {
            port,
            dir: dir.to_path_buf(),
            child,
            owns_dir: true,
        };
        for _ in 0..100 {
            if answering(&server.url()).await.is_some() {
                return Some(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Kills the server (a crash) and starts it again with the same arguments.
    pub async fn restart(mut self, args: &[&str]) -> Option<PrivateServer> {
        self.kill().await;
        self.owns_dir = false;
        Self::spawn(self.port, &self.dir.clone(), args).await
    }

    /// Kills the server and waits for it to exit.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
        let _ = self.child.wait().await;
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A plain connection for administration.
    pub async fn admin(&self) -> redis::aio::MultiplexedConnection {
        plain(&self.url())
            .await
            .expect("the private server answers")
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
