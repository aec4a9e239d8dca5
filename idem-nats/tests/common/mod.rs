//! Shared by the integration tests: skipping when NATS is unavailable, and private
//! `nats-server`s on ports and store directories of their own for fault tests.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idem_broker::testkit::restart::Restartable;

/// How long a private server may take to accept connections after it is started.
const START_BOUND: Duration = Duration::from_secs(30);

/// `None` after printing why the test is skipped, or a failure if `IDEM_TEST_REQUIRE`
/// names nats.
pub fn skip<T>(why: &str) -> Option<T> {
    assert!(
        !idem_conformance::required("nats"),
        "IDEM_TEST_REQUIRE names nats: {why}"
    );
    eprintln!("skipped: {why}");
    None
}

/// The `nats-server` binary: `/usr/sbin/nats-server`, else the first one on `PATH`.
pub fn nats_server_binary() -> Option<PathBuf> {
    let fixed = PathBuf::from("/usr/sbin/nats-server");
    if fixed.is_file() {
        return Some(fixed);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

/// A throwaway JetStream server on its own port and store directory, killed when dropped.
/// Nothing here touches the shared server.
pub struct PrivateServer {
    binary: PathBuf,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateServer {
    /// Starts `nats-server -js` on a free port and waits until it accepts connections.
    /// `None` (after printing why, or failing if `IDEM_TEST_REQUIRE` names nats) if there
    /// is no `nats-server` binary.
    pub async fn start() -> Option<PrivateServer> {
        let Some(binary) = nats_server_binary() else {
            return skip("no nats-server binary (neither /usr/sbin/nats-server nor on PATH)");
        };
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .expect("a free local port")
            .port();
        let mut server = PrivateServer {
            binary,
            port,
            dir: tempfile::tempdir().expect("a temporary directory"),
            child: None,
        };
        server.spawn().await;
        Some(server)
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits (bounded) until its port accepts connections.
    async fn spawn(&mut self) {
        let log = self.dir.path().join("nats-server.log");
        let child = Command::new(&self.binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path().join("store"))
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        let child = self.child.insert(child);
        let started = Instant::now();
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nats-server on port {} exited ({status}): {}",
                    self.port,
                    self.log()
                );
            }
            assert!(
                started.elapsed() < START_BOUND,
                "nats-server on port {} did not accept connections within {START_BOUND:?}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server, if running, and reaps it.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL on Unix; an error means it has exited already.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Restartable for PrivateServer {
    /// The server's log, across restarts.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }

    /// Kills the server with SIGKILL and starts it again on the same port and store
    /// directory.
    async fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
    }
}
