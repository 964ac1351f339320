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

use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::{Client, ProtocolVersion, RedisError, TlsCertificates};

use super::endpoint::{
    address_of, client, connection_info, tcp_settings, Endpoint, COMMAND_TIMEOUT,
};
use super::sentinel::Sentinels;
use super::url::{host_port, node_url, redact, split};
use crate::broker::SetupError;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
