//! [`RedisConnection`]: one server through a reconnecting connection manager, or a Redis
//! Cluster through the redis crate's cluster client (redirections, topology changes and
//! reconnection are its job).

use std::fmt;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, Value};

use crate::options::RedisOptions;

/// How often the connection manager retries a lost connection before a call fails.
const RECONNECT_ATTEMPTS: usize = 2;

/// A connection to the store's Redis: a single server or a cluster. Cheap to clone (clones
/// share the connection); implements [`ConnectionLike`], so business commands can run
/// beside the barrier on the same connection ([`crate::RedisStore::connection`]).
#[derive(Clone)]
pub struct RedisConnection(Inner);

#[derive(Clone)]
enum Inner {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Inner::Single(_) => "RedisConnection::Single",
            Inner::Cluster(_) => "RedisConnection::Cluster",
        })
    }
}

/// A server whose keys a scan walks: the single server, or one cluster master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Node {
    Single,
    Master { host: String, port: u16 },
}

impl RedisConnection {
    /// Connects to one server at `url`.
    pub(crate) async fn single(url: &str, options: &RedisOptions) -> RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout()))
            .set_response_timeout(Some(options.response_timeout()))
            .set_number_of_retries(RECONNECT_ATTEMPTS);
        let manager = ConnectionManager::new_with_config(client, config).await?;
        Ok(RedisConnection(Inner::Single(manager)))
    }

    /// Connects to the cluster that `nodes` (`redis://host:port` URLs) belong to.
    pub(crate) async fn cluster<I, T>(nodes: I, options: &RedisOptions) -> RedisResult<Self>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_string()).collect();
        let client = ClusterClientBuilder::new(nodes)
            .connection_timeout(options.connect_timeout())
            .response_timeout(options.response_timeout())
            .build()?;
        let conn = client.get_async_connection().await?;
        Ok(RedisConnection(Inner::Cluster(conn)))
    }

    /// Whether this is a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self.0, Inner::Cluster(_))
    }

    /// The servers holding keys: the server, or every cluster master. A cluster master
    /// marked failing is an error (its slots would be skipped); a failover in progress is
    /// retryable.
    pub(crate) async fn nodes(&self) -> RedisResult<Vec<Node>> {
        let Inner::Cluster(conn) = &self.0 else {
            return Ok(vec![Node::Single]);
        };
        let mut conn = conn.clone();
        let mut info = redis::cmd("CLUSTER");
        info.arg("NODES");
        let text: String = redis::from_redis_value(
            conn.route_command(info, RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
                .await?
                .extract_error()?,
        )?;
        let mut masters = Vec::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
                continue;
            };
            let flags: Vec<&str> = flags.split(',').collect();
            // Fields 8.. are the slot ranges a master serves.
            if !flags.contains(&"master") || fields.len() <= 8 {
                continue;
            }
            if flags.iter().any(|f| f.starts_with("fail")) {
                return Err(RedisError::from((
                    ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                    "a cluster master is failing; its slots cannot be scanned now",
                    line.to_string(),
                )));
            }
            let addr = addr.split(['@', ',']).next().unwrap_or_default();
            let parsed = addr
                .rsplit_once(':')
                .and_then(|(host, port)| Some((host.to_string(), port.parse().ok()?)));
            let Some((host, port)) = parsed else {
                return Err(RedisError::from((
                    ErrorKind::Parse,
                    "unexpected CLUSTER NODES line",
                    line.to_string(),
                )));
            };
            masters.push(Node::Master { host, port });
        }
        Ok(masters)
    }

    /// Runs `cmd` on `node`.
    pub(crate) async fn on_node(&self, node: &Node, cmd: Cmd) -> RedisResult<Value> {
        match (&self.0, node) {
            (Inner::Cluster(conn), Node::Master { host, port }) => {
                let route = SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                };
                conn.clone()
                    .route_command(cmd, RoutingInfo::SingleNode(route))
                    .await?
                    .extract_error()
            }
            _ => cmd.query_async(&mut self.clone()).await,
        }
    }

    /// Sends `pipe` (`count` commands) to `node` on one connection; the replies are
    /// returned as they are, errors included.
    pub(crate) async fn pipe_on_node(
        &self,
        node: &Node,
        pipe: Pipeline,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let route = match node {
            Node::Master { host, port } => SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            },
            Node::Single => SingleNodeRoutingInfo::Random,
        };
        self.pipe_routed(pipe, count, route).await
    }

    /// Sends `pipe` to the primary of `key`'s slot on one connection, so a `WAIT` in it
    /// waits for the writes before it.
    pub(crate) async fn pipe_for_key(
        &self,
        key: &str,
        pipe: Pipeline,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let route = SingleNodeRoutingInfo::SpecificNode(Route::with_slot(
            Slot::for_key(key),
            SlotAddr::Master,
        ));
        self.pipe_routed(pipe, count, route).await
    }

    async fn pipe_routed(
        &self,
        pipe: Pipeline,
        count: usize,
        route: SingleNodeRoutingInfo,
    ) -> RedisResult<Vec<Value>> {
        match &self.0 {
            Inner::Single(conn) => conn.clone().req_packed_commands(&pipe, 0, count).await,
            Inner::Cluster(conn) => conn.clone().route_pipeline(pipe, 0, count, route).await,
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Inner::Single(conn) => conn.req_packed_command(cmd),
            Inner::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Inner::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Inner::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Inner::Single(conn) => conn.get_db(),
            Inner::Cluster(conn) => conn.get_db(),
        }
    }
}
