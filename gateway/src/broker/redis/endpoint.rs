//! Connecting to a Redis: the settings every connection gets (RESP3, TCP_NODELAY, TLS, timeouts),
//! the Redis that answers now, and one connection to it, a single Redis or a Cluster.

use std::time::Duration;

use redis::aio::{AsyncPushSender, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionInfo, IntoConnectionInfo, ProtocolVersion, RedisError,
    TlsCertificates,
};

use super::url::host_port;

/// Redis answers each command within this, or the broker is unavailable.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// A Redis that answers now, as the pub/sub link and the command pool connect to it.
#[derive(Clone)]
pub enum Endpoint {
    Single {
        client: Client,
        /// `host:port`, for the logs and to notice that a Sentinel master moved.
        address: String,
    },
    Cluster(ClusterClient),
}

/// One connection to an [`Endpoint`].
#[derive(Clone)]
pub enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Endpoint {
    /// A new connection, its pushes (pub/sub messages, disconnection) handed to `push`.
    pub async fn connect(
        &self,
        push: Option<impl AsyncPushSender + Clone>,
    ) -> Result<Connection, RedisError> {
        match self {
            Endpoint::Single { client, .. } => {
                let mut config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(COMMAND_TIMEOUT))
                    .set_response_timeout(Some(COMMAND_TIMEOUT));
                if let Some(push) = push {
                    config = config.set_push_sender(push);
                }
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Connection::Single(conn))
            }
            Endpoint::Cluster(client) => {
                let mut config = ClusterConfig::new()
                    .set_connection_timeout(COMMAND_TIMEOUT)
                    .set_response_timeout(COMMAND_TIMEOUT);
                if let Some(push) = push {
                    config = config.set_push_sender(push);
                }
                let conn = client.get_async_connection_with_config(config).await?;
                Ok(Connection::Cluster(conn))
            }
        }
    }

    /// `host:port` of a single Redis, `cluster` for a cluster.
    pub fn address(&self) -> &str {
        match self {
            Endpoint::Single { address, .. } => address,
            Endpoint::Cluster(_) => "cluster",
        }
    }
}

impl Connection {
    /// Subscribes to a topic: sharded on a cluster, so that it lives on the channel's shard.
    pub async fn subscribe(&self, topic: &str) -> redis::RedisResult<()> {
        match self.clone() {
            Connection::Single(mut conn) => conn.subscribe(topic).await,
            Connection::Cluster(mut conn) => conn.ssubscribe(topic).await,
        }
    }

    pub async fn unsubscribe(&self, topic: &str) -> redis::RedisResult<()> {
        match self.clone() {
            Connection::Single(mut conn) => conn.unsubscribe(topic).await,
            Connection::Cluster(mut conn) => conn.sunsubscribe(topic).await,
        }
    }
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(conn) => conn.req_packed_command(cmd),
            Connection::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(conn) => conn.get_db(),
            Connection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A client of one Redis, with TLS files applied where given.
pub(super) fn client(url: &str, certs: Option<&TlsCertificates>) -> Result<Client, RedisError> {
    let info = connection_info(url)?;
    match certs {
        Some(certs) => Client::build_with_tls(info, certs.clone()),
        None => Client::open(info),
    }
}

/// Connection settings for one Redis: RESP3 (pub/sub pushes) and TCP_NODELAY, which the
/// `redis` crate leaves off and which every small command pays for in latency.
pub(super) fn connection_info(url: &str) -> Result<ConnectionInfo, RedisError> {
    let info = url.into_connection_info()?;
    let redis_settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Ok(info
        .set_redis_settings(redis_settings)
        .set_tcp_settings(tcp_settings()))
}

pub(super) fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

pub(super) fn address_of(info: &ConnectionInfo) -> String {
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => host_port(host, *port),
        redis::ConnectionAddr::Unix(path) => path.display().to_string(),
        other => format!("{other:?}"),
    }
}
