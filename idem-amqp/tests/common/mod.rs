//! Shared by the integration tests: skipping when RabbitMQ is unavailable, and private
//! RabbitMQ nodes on ports and directories of their own for fault tests.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use idem_broker::testkit::restart::Restartable;

/// How long a private node may take to accept connections after it is started.
const START_BOUND: Duration = Duration::from_secs(60);

/// The node's start script, run directly (the `/usr/sbin` wrapper switches to the
/// `rabbitmq` user).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// `None` after printing why the test is skipped, or a failure if `IDEM_TEST_REQUIRE`
/// names rabbitmq.
pub fn skip<T>(why: &str) -> Option<T> {
    assert!(
        !idem_conformance::required("rabbitmq"),
        "IDEM_TEST_REQUIRE names rabbitmq: {why}"
    );
    eprintln!("skipped: {why}");
    None
}

fn free_port() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a free local port")
}

/// A throwaway RabbitMQ node (its own node name, AMQP and distribution ports, database,
/// logs, `HOME` and Erlang cookie, no plugins), killed when dropped. Nothing here touches
/// the shared broker.
pub struct PrivateBroker {
    node: String,
    port: u16,
    dist_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateBroker {
    /// Starts a node and waits until it accepts AMQP connections. `None` (after printing
    /// why, or failing if `IDEM_TEST_REQUIRE` names rabbitmq) if RabbitMQ is not installed.
    pub async fn start() -> Option<PrivateBroker> {
        if !Path::new(SERVER).is_file() {
            return skip(&format!("no RabbitMQ installed ({SERVER})"));
        }
        let (amqp, dist) = (free_port(), free_port());
        let port = amqp.local_addr().expect("a local address").port();
        let dist_port = dist.local_addr().expect("a local address").port();
        drop((amqp, dist));
        let dir = tempfile::tempdir().expect("a temporary directory");
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("a node directory");
        }
        std::fs::write(dir.path().join("enabled_plugins"), "[].").expect("a plugins file");
        let mut broker = PrivateBroker {
            node: format!("idemtest-{}-{port}@localhost", std::process::id()),
            port,
            dist_port,
            dir,
            child: None,
        };
        broker.spawn().await;
        Some(broker)
    }

    /// The node's AMQP URL.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.dir.path().join(sub)
    }

    /// Starts the node in a process group of its own and waits (bounded) until its AMQP
    /// port accepts connections.
    async fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("out.log"))
            .expect("a log file");
        let err = out.try_clone().expect("a log file");
        let child = Command::new(SERVER)
            .env("HOME", self.path("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.path("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.path("log"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.path("enabled_plugins"),
            )
            .env("RABBITMQ_CONFIG_FILE", self.path("rabbitmq"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                self.path("advanced.config"),
            )
            .env("RABBITMQ_CONF_ENV_FILE", self.path("rabbitmq-env.conf"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {SERVER}: {e}"));
        let child = self.child.insert(child);
        let started = Instant::now();
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "RabbitMQ node {} exited ({status}): {}",
                    self.node,
                    self.log()
                );
            }
            assert!(
                started.elapsed() < START_BOUND,
                "RabbitMQ node {} did not accept connections within {START_BOUND:?}: {}",
                self.node,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the node's process group, if running, and reaps the start script.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The group's id is the script's pid (`process_group(0)`); an error means it
            // has exited already.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Restartable for PrivateBroker {
    /// The node's startup output and log, across restarts.
    fn log(&self) -> String {
        let mut log = std::fs::read_to_string(self.dir.path().join("out.log")).unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("log")) {
            for entry in entries.flatten() {
                log.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        log
    }

    /// Kills the node with SIGKILL (the whole process group: the start script and the
    /// Erlang VM) and starts it again with the same name, ports and database.
    async fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.kill();
    }
}
