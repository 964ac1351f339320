//! Where Redis is: the forms of `--redis-url`, TLS, and the node that takes writes now.
//!
//! - `redis://[user:password@]host[:port][/db]`, or `rediss://` for TLS: one Redis.
//! - `redis+cluster://[user:password@]host:port,host:port[,...]`, or `rediss+cluster://`: a Redis
//!   Cluster, by its seed nodes.
//! - `redis+sentinel://[user:password@]host:port,host:port[,...]/master-name[/db]`, or
//!   `rediss+sentinel://`: the master that these Sentinels name. The credentials and the db
//!   are the master's; the Sentinels are asked without credentials, over TLS with `rediss`.
//!
//! TLS checks the server's certificate against the system's roots, or against the CA file
//! given; a client certificate is presented where one is given.

use std::time::Duration;

use redis::aio::{AsyncPushSender, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionInfo, IntoConnectionInfo, ProtocolVersion, RedisError,
    TlsCertificates,
};

use super::sentinel::Sentinels;
use crate::broker::SetupError;

/// Redis answers each command within this, or the broker is unavailable.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Default ports of a seed node and of a Sentinel.
const REDIS_PORT: u16 = 6379;
const SENTINEL_PORT: u16 = 26379;

/// The Redis that `--redis-url` names.
pub struct Target {
    /// The URL with its password replaced: the only form of it that logs and errors show.
    pub redacted: String,
    place: Place,
}

enum Place {
    Single(Client),
    Cluster(ClusterClient),
    Sentinel {
        sentinels: Sentinels,
        /// The master's URL without its address: `(scheme, userinfo, db)`.
        master: MasterUrl,
        tls: Option<TlsCertificates>,
    },
}

struct MasterUrl {
    scheme: &'static str,
    userinfo: Option<String>,
    db: Option<String>,
}

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

/// The TLS files of the configuration, read.
#[derive(Default)]
pub struct TlsFiles {
    pub ca: Option<Vec<u8>>,
    /// Certificate chain and private key, PEM.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client.is_none()
    }

    fn certificates(&self) -> TlsCertificates {
        TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca.clone(),
        }
    }
}

impl Target {
    pub fn parse(url: &str, tls: &TlsFiles) -> Result<Self, SetupError> {
        let url = if url.contains("://") {
            url.to_owned()
        } else {
            format!("redis://{url}")
        };
        let redacted = redact(&url);
        let parts = split(&url).map_err(|e| SetupError::Url(format!("{redacted}: {e}")))?;
        let bad = |e: &dyn std::fmt::Display| SetupError::Url(format!("{redacted}: {e}"));
        let (tls_scheme, form) = match parts.scheme {
            "redis" | "rediss" | "redis+cluster" | "rediss+cluster" | "redis+sentinel"
            | "rediss+sentinel" => (
                parts.scheme.starts_with("rediss"),
                parts.scheme.split_once('+').map(|(_, form)| form),
            ),
            other => {
                return Err(bad(&format!(
                    "unknown scheme `{other}` (redis, rediss, redis+cluster, rediss+cluster, \
                     redis+sentinel or rediss+sentinel)"
                )))
            }
        };
        if !tls_scheme && !tls.is_empty() {
            return Err(SetupError::Tls {
                flag: "--redis-ca-file / --redis-client-cert",
                message: format!("TLS files are given, but {redacted} is not a rediss URL"),
            });
        }
        let certs = (!tls.is_empty()).then(|| tls.certificates());
        let scheme = if tls_scheme { "rediss" } else { "redis" };
        let tls_error = |e: RedisError| SetupError::Tls {
            flag: "--redis-ca-file / --redis-client-cert / --redis-client-key",
            message: e.to_string(),
        };
        let place = match form {
            None => Place::Single(client(&url, certs.as_ref()).map_err(|e| match &certs {
                Some(_) if e.kind() != redis::ErrorKind::InvalidClientConfig => tls_error(e),
                _ => bad(&e),
            })?),
            Some("cluster") => {
                let seeds = parts
                    .hosts
                    .iter()
                    .map(|host| {
                        connection_info(&node_url(scheme, parts.userinfo, host, REDIS_PORT, None))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(&e))?;
                let mut builder = ClusterClientBuilder::new(seeds)
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(COMMAND_TIMEOUT)
                    .response_timeout(COMMAND_TIMEOUT)
                    .tcp_settings(tcp_settings());
                if let Some(certs) = certs.clone() {
                    builder = builder.certs(certs);
                }
                Place::Cluster(builder.build().map_err(|e| bad(&e))?)
            }
            Some(_) => {
                let mut path = parts.path.split('/').filter(|s| !s.is_empty());
                let name = path
                    .next()
                    .ok_or_else(|| bad(&"name the master: redis+sentinel://host:port,.../name"))?;
                let db = path.next().map(str::to_owned);
                if let Some(db) = &db {
                    db.parse::<i64>()
                        .map_err(|_| bad(&format!("`{db}` is not a database number")))?;
                }
                let nodes = parts
                    .hosts
                    .iter()
                    .map(|host| {
                        let url = node_url(scheme, None, host, SENTINEL_PORT, None);
                        match &certs {
                            Some(certs) => Client::build_with_tls(url.as_str(), certs.clone()),
                            None => Client::open(url.as_str()),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad(&e))?;
                Place::Sentinel {
                    sentinels: Sentinels::new(nodes, name.to_owned()),
                    master: MasterUrl {
                        scheme,
                        userinfo: parts.userinfo.map(str::to_owned),
                        db,
                    },
                    tls: certs,
                }
            }
        };
        Ok(Self { redacted, place })
    }

    /// A Redis Cluster: sharded pub/sub, and sessions saved shard by shard.
    pub fn is_cluster(&self) -> bool {
        matches!(self.place, Place::Cluster(_))
    }

    /// Behind Sentinel: the master can change under the node.
    pub fn is_sentinel(&self) -> bool {
        matches!(self.place, Place::Sentinel { .. })
    }

    /// Where writes go now. For Sentinel, the master the Sentinels name, checked to be one.
    pub async fn resolve(&self) -> Result<Endpoint, String> {
        match &self.place {
            Place::Single(client) => Ok(Endpoint::Single {
                address: address_of(client.get_connection_info()),
                client: client.clone(),
            }),
            Place::Cluster(client) => Ok(Endpoint::Cluster(client.clone())),
            Place::Sentinel {
                sentinels,
                master,
                tls,
            } => {
                let (host, port) = sentinels
                    .master()
                    .await
                    .map_err(|e| format!("Sentinels: {e}"))?;
                let address = host_port(&host, port);
                let url = node_url(
                    master.scheme,
                    master.userinfo.as_deref(),
                    &address,
                    REDIS_PORT,
                    master.db.as_deref(),
                );
                let client = client(&url, tls.as_ref())
                    .map_err(|e| format!("master {address} (named by the Sentinels): {e}"))?;
                Ok(Endpoint::Single { client, address })
            }
        }
    }

    /// Behind Sentinel, the `host:port` of the master the Sentinels name now; `None` otherwise.
    pub async fn current_master(&self) -> Option<Result<String, RedisError>> {
        match &self.place {
            Place::Sentinel { sentinels, .. } => Some(
                sentinels
                    .master()
                    .await
                    .map(|(host, port)| host_port(&host, port)),
            ),
            _ => None,
        }
    }
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
fn client(url: &str, certs: Option<&TlsCertificates>) -> Result<Client, RedisError> {
    let info = connection_info(url)?;
    match certs {
        Some(certs) => Client::build_with_tls(info, certs.clone()),
        None => Client::open(info),
    }
}

/// Connection settings for one Redis: RESP3 (pub/sub pushes) and TCP_NODELAY, which the
/// `redis` crate leaves off and which every small command pays for in latency.
fn connection_info(url: &str) -> Result<ConnectionInfo, RedisError> {
    let info = url.into_connection_info()?;
    let redis_settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    Ok(info
        .set_redis_settings(redis_settings)
        .set_tcp_settings(tcp_settings()))
}

fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

fn address_of(info: &ConnectionInfo) -> String {
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, port)
        | redis::ConnectionAddr::TcpTls { host, port, .. } => host_port(host, *port),
        redis::ConnectionAddr::Unix(path) => path.display().to_string(),
        other => format!("{other:?}"),
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The URL of one node of a multi-host URL.
fn node_url(
    scheme: &str,
    userinfo: Option<&str>,
    host: &str,
    default_port: u16,
    db: Option<&str>,
) -> String {
    let has_port = if host.starts_with('[') {
        host.contains("]:")
    } else {
        host.contains(':')
    };
    let host = if has_port {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    };
    let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let db = db.map(|db| format!("/{db}")).unwrap_or_default();
    format!("{scheme}://{userinfo}{host}{db}")
}

/// A URL cut at its separators, without decoding anything.
struct Parts<'a> {
    scheme: &'a str,
    userinfo: Option<&'a str>,
    hosts: Vec<&'a str>,
    path: &'a str,
}

fn split(url: &str) -> Result<Parts<'_>, &'static str> {
    let (scheme, rest) = url.split_once("://").ok_or("not a URL")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (Some(userinfo), hosts),
        None => (None, authority),
    };
    let hosts: Vec<&str> = hosts.split(',').filter(|h| !h.is_empty()).collect();
    if hosts.is_empty() {
        return Err("no host");
    }
    Ok(Parts {
        scheme,
        userinfo,
        hosts,
        path,
    })
}

/// The URL with its password (or a lone userinfo, which may be one) replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL: whatever follows a colon may be a password.
        return match url.split_once(':') {
            Some((before, _)) => format!("{before}:***"),
            None => url.to_owned(),
        };
    };
    let (authority, path) = match rest.split_once('/') {
        Some((authority, path)) => (authority, Some(path)),
        None => (rest, None),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{hosts}"),
            None => format!("***@{hosts}"),
        },
        // Hosts only: a "port" that is not a number is likely a password without its `@`.
        None => authority
            .split(',')
            .map(|host| match host.rsplit_once(':') {
                Some((name, port))
                    if !host.ends_with(']') && !port.chars().all(|c| c.is_ascii_digit()) =>
                {
                    format!("{name}:***")
                }
                _ => host.to_owned(),
            })
            .collect::<Vec<_>>()
            .join(","),
    };
    match path {
        Some(path) => format!("{scheme}://{authority}/{path}"),
        None => format!("{scheme}://{authority}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://user:hunter2@10.0.0.1:6379/2"),
            "redis://user:***@10.0.0.1:6379/2"
        );
        assert_eq!(redact("rediss://:hunter2@h"), "rediss://:***@h");
        assert_eq!(redact("redis://hunter2@h:1"), "redis://***@h:1");
        assert_eq!(
            redact("redis+sentinel://u:p@a:1,b:2/mymaster"),
            "redis+sentinel://u:***@a:1,b:2/mymaster"
        );
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn the_url_forms() {
        let files = TlsFiles::default();
        let single = Target::parse("redis://127.0.0.1:6379/1", &files).unwrap();
        assert!(!single.is_cluster() && !single.is_sentinel());
        let bare = Target::parse("127.0.0.1:6379", &files).unwrap();
        assert_eq!(bare.redacted, "redis://127.0.0.1:6379");
        let cluster =
            Target::parse("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", &files).unwrap();
        assert!(cluster.is_cluster());
        let sentinel = Target::parse(
            "redis+sentinel://127.0.0.1:1,127.0.0.1:2/mymaster/3",
            &files,
        )
        .unwrap();
        assert!(sentinel.is_sentinel());
        for bad in [
            "http://127.0.0.1",
            "redis+sentinel://127.0.0.1:1",
            "redis+sentinel://127.0.0.1:1/m/x",
            "redis+cluster://",
        ] {
            assert!(Target::parse(bad, &files).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_never_show_the_password() {
        let files = TlsFiles::default();
        for url in [
            "http://u:hunter2@h",
            "redis+sentinel://u:hunter2@h:1",
            "redis://u:hunter2@h:notaport",
        ] {
            let e = Target::parse(url, &files).err().expect(url).to_string();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn tls_files_need_a_tls_url() {
        let files = TlsFiles {
            ca: Some(b"-----BEGIN CERTIFICATE-----".to_vec()),
            client: None,
        };
        let e = Target::parse("redis://127.0.0.1", &files).err().unwrap();
        assert!(e.to_string().contains("not a rediss URL"), "{e}");
    }

    #[test]
    fn node_urls() {
        assert_eq!(
            node_url("rediss", Some("u:p"), "h", 26379, None),
            "rediss://u:p@h:26379"
        );
        assert_eq!(
            node_url("redis", None, "h:1", 6379, Some("2")),
            "redis://h:1/2"
        );
        assert_eq!(
            node_url("redis", None, "[::1]:7", 6379, None),
            "redis://[::1]:7"
        );
        assert_eq!(host_port("::1", 7), "[::1]:7");
    }
}
