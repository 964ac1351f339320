//! The command line: every flag also reads a `BGW_` environment variable.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

#[derive(Debug, Parser)]
#[command(name = "gateway", version, about = "WebSocket broadcast gateway")]
// A flag given twice takes its last value, so that a wrapper's defaults can be overridden.
#[command(args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Without a subcommand, `gateway` runs a node as `gateway serve` does.
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a gateway node (the default).
    Serve(Box<Config>),
    /// Publish one message through a node's admin API.
    Publish(PublishArgs),
    /// Exit 0 when the node's /readyz answers 200 (for container health checks).
    Health(HealthArgs),
    /// Print a channel's retained messages after a seq and its current seq and epoch, or
    /// remove its history, through a node's admin API.
    History(HistoryArgs),
    /// Close every connection of a user, or one session's, on every node, through a node's
    /// admin API.
    Disconnect(DisconnectArgs),
    /// List the channels that have subscribers anywhere in the cluster, with their counts,
    /// through a node's admin API.
    Channels(ChannelsArgs),
    /// Print who is subscribed to a presence channel, and how many, through a node's admin API.
    Presence(PresenceArgs),
}

/// A node's configuration.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address of the client listener (WebSocket upgrades on /ws).
    #[arg(long, env = "BGW_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address of the admin listener (health, metrics, publish API). Never expose it to the
    /// internet.
    #[arg(long, env = "BGW_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,

    /// Name of this node, unique in the cluster; a random one when absent.
    #[arg(long, env = "BGW_NODE_ID")]
    pub node_id: Option<String>,

    /// Redis URL: `redis://[user:password@]host:port[/db]` (`rediss://` for TLS), a Redis Cluster
    /// by its seed nodes `redis+cluster://host:port,host:port`, or the master that Sentinels
    /// name, `redis+sentinel://host:port,host:port/master-name[/db]` (`rediss+cluster://`,
    /// `rediss+sentinel://` for TLS). Absent: the embedded in-process broker (one node).
    #[arg(long, env = "BGW_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,

    /// PEM file of the CA certificates that Redis' TLS certificate must chain to (rediss URLs).
    /// Absent: the system's roots.
    #[arg(long, env = "BGW_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM file of the certificate (chain) this node presents to Redis, for a Redis that checks
    /// its clients' certificates (`tls-auth-clients yes`). Needs --redis-client-key.
    #[arg(long, env = "BGW_REDIS_CLIENT_CERT", requires = "redis_client_key")]
    pub redis_client_cert: Option<PathBuf>,

    /// PEM file of the private key of --redis-client-cert.
    #[arg(long, env = "BGW_REDIS_CLIENT_KEY", requires = "redis_client_cert")]
    pub redis_client_key: Option<PathBuf>,

    /// HS256 secret that verifies client tokens. With neither key, authentication is off.
    #[arg(
        long,
        env = "BGW_JWT_SECRET",
        conflicts_with = "jwt_public_key",
        hide_env_values = true
    )]
    pub jwt_secret: Option<Secret>,

    /// PEM file of the RSA (RS256) or P-256 (ES256) public key that verifies client tokens.
    #[arg(long, env = "BGW_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Cookie that may carry the client token.
    #[arg(long, env = "BGW_TOKEN_COOKIE", default_value = "bgw_token")]
    pub token_cookie: String,

    /// Bearer key the admin publish API requires. Absent: the admin API is open.
    #[arg(long, env = "BGW_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,

    /// Browser origins allowed to connect, comma-separated: exact (`https://app.example.com`) or
    /// wildcard (`https://*.example.com`). Absent: only requests without Origin or whose Origin
    /// is the host they were sent to (Host, or X-Forwarded-Host from a trusted proxy; a missing
    /// port is the scheme's default).
    #[arg(long, env = "BGW_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Let anonymous clients publish with `publish` frames (authentication off). With
    /// authentication on, a token's `publish` claim alone decides, and this flag changes nothing.
    #[arg(long, env = "BGW_CLIENT_PUBLISH")]
    pub client_publish: bool,

    /// Messages retained per channel for resume. Enough for a reconnect of a few seconds on a
    /// busy channel; each one costs its payload in the broker.
    #[arg(long, env = "BGW_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: usize,

    /// How long a message is retained for resume. Matches the session TTL, so that a session
    /// that can still resume finds its history.
    #[arg(long, env = "BGW_HISTORY_TTL", default_value = "5m", value_parser = duration)]
    pub history_ttl: Duration,

    /// How long a session outlives its connection.
    #[arg(long, env = "BGW_SESSION_TTL", default_value = "5m", value_parser = duration)]
    pub session_ttl: Duration,

    /// Interval of WebSocket pings. Below the common 30 s to 60 s idle timeouts of proxies.
    #[arg(long, env = "BGW_HEARTBEAT_INTERVAL", default_value = "25s", value_parser = duration)]
    pub heartbeat_interval: Duration,

    /// A connection silent for heartbeat interval + this is dead and is dropped.
    #[arg(long, env = "BGW_PONG_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub pong_timeout: Duration,

    /// Time a client has to send `hello` after the upgrade.
    #[arg(long, env = "BGW_HELLO_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub hello_timeout: Duration,

    /// Time a client has to complete the HTTP upgrade: a socket that sends nothing must not hold
    /// a file descriptor for long.
    #[arg(long, env = "BGW_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,

    /// Most client connections on this node; more get 503 so that the load balancer tries
    /// another node. Keep it below the open-file limit.
    #[arg(long, env = "BGW_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: usize,

    /// Largest frame (and message) a client may send. A hello with a long token fits easily.
    #[arg(long, env = "BGW_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub max_frame_bytes: usize,

    /// Largest body of an admin publish.
    #[arg(long, env = "BGW_MAX_PUBLISH_BYTES", default_value_t = 1024 * 1024)]
    pub max_publish_bytes: usize,

    /// How long an idempotency key of the publish API is remembered: a retry with the same key
    /// within it gets the first publish's answer and publishes nothing. Longer than any retry
    /// policy of a back end (minutes), short enough that the keys of a busy back end (one per
    /// publish, kept in the broker) do not pile up.
    #[arg(long, env = "BGW_IDEMPOTENCY_WINDOW", default_value = "5m", value_parser = duration)]
    pub idempotency_window: Duration,

    /// How often the node reports its channels' subscriber counts to the broker, for the
    /// cluster's channel list (`GET /v1/channels`). A report lives three intervals: a node that
    /// dies drops out of the list within that.
    #[arg(long, env = "BGW_NODE_REPORT_INTERVAL", default_value = "5s", value_parser = duration)]
    pub node_report_interval: Duration,

    /// Most connections one user (a token's `sub`) may hold at once across the cluster; more
    /// are closed with 4013 at `hello`. Absent: no limit. Anonymous connections are not counted.
    #[arg(long, env = "BGW_MAX_CONNECTIONS_PER_USER")]
    pub max_connections_per_user: Option<usize>,

    /// Channels that keep presence (who is subscribed, `GET /v1/presence`, and the `join` and
    /// `leave` frames of subscribers that ask for them), comma-separated names or prefixes and
    /// `*` (`room.*`). Absent: none, and no presence work at all.
    #[arg(long, env = "BGW_PRESENCE", value_delimiter = ',')]
    pub presence: Vec<String>,

    /// Most members one presence answer lists (its count counts them all): a 20,000-member
    /// channel answers with a page, not a megabyte.
    #[arg(long, env = "BGW_PRESENCE_MAX_MEMBERS", default_value_t = 1000)]
    pub presence_max_members: usize,

    /// Most members a presence channel may have for its subscribers to get `join` and `leave`
    /// frames, counted across the cluster (the frame that crosses it is sent, with its count);
    /// 0: no such frames. In a room of thousands every connect would be thousands of frames.
    #[arg(long, env = "BGW_PRESENCE_MAX_JOIN_LEAVE", default_value_t = 100)]
    pub presence_max_join_leave: usize,

    /// Frames per second a client may send (with a burst of as many); more closes with 4029.
    /// Subscribing, publishing and pinging take a few frames a second.
    #[arg(long, env = "BGW_CLIENT_RATE", default_value_t = 50)]
    pub client_rate: u32,

    /// Bytes that may wait for a client's socket; past it the client is closed with 4030 and
    /// resumes from history. 1 MiB holds seconds of a busy channel for a slow mobile client.
    #[arg(long, env = "BGW_MAX_QUEUE_BYTES", default_value_t = 1024 * 1024)]
    pub max_queue_bytes: usize,

    /// Channels one connection may subscribe to.
    #[arg(long, env = "BGW_MAX_SUBSCRIPTIONS", default_value_t = 128)]
    pub max_subscriptions: usize,

    /// On SIGTERM, how long the node keeps serving (with /readyz at 503) before it drains, so
    /// that load balancers stop sending it clients first.
    #[arg(long, env = "BGW_DRAIN_DELAY", default_value = "2s", value_parser = duration)]
    pub drain_delay: Duration,

    /// The window over which a draining node closes its clients with 1001, evenly spaced, so
    /// that the other nodes take the reconnects as a stream rather than a storm.
    #[arg(long, env = "BGW_DRAIN_WINDOW", default_value = "10s", value_parser = duration)]
    pub drain_window: Duration,

    /// Longest a drain waits for clients to close, counted from the end of the delay; then the
    /// node exits anyway. Keep delay + timeout below Kubernetes' terminationGracePeriodSeconds.
    #[arg(long, env = "BGW_DRAIN_TIMEOUT", default_value = "20s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// Proxies (IPs or CIDRs, comma-separated) whose X-Forwarded-For names the client and whose
    /// X-Forwarded-Host names the host for the Origin check. Those headers from anyone else are
    /// ignored, so that clients cannot choose their own address or host.
    #[arg(long, env = "BGW_TRUSTED_PROXIES", value_delimiter = ',', value_parser = ip_or_net)]
    pub trusted_proxies: Vec<IpNet>,

    /// Log format.
    #[arg(long, env = "BGW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// Logs the configuration as one line of fields: secrets only as whether they are set, the
    /// Redis URL without its password.
    pub fn log(&self) {
        tracing::info!(
            listen = %self.listen,
            admin_listen = %self.admin_listen,
            node_id = self.node_id.as_deref(),
            redis_url = self.redis_url.as_ref().map(|u| crate::broker::redis::redact(u.expose())),
            jwt_secret_set = self.jwt_secret.is_some(),
            jwt_public_key = ?self.jwt_public_key,
            api_key_set = self.api_key.is_some(),
            allowed_origins = ?self.allowed_origins,
            client_publish = self.client_publish,
            history_size = self.history_size,
            history_ttl_s = self.history_ttl.as_secs_f64(),
            session_ttl_s = self.session_ttl.as_secs_f64(),
            heartbeat_interval_s = self.heartbeat_interval.as_secs_f64(),
            pong_timeout_s = self.pong_timeout.as_secs_f64(),
            hello_timeout_s = self.hello_timeout.as_secs_f64(),
            max_connections = self.max_connections,
            max_frame_bytes = self.max_frame_bytes,
            max_publish_bytes = self.max_publish_bytes,
            client_rate = self.client_rate,
            max_queue_bytes = self.max_queue_bytes,
            max_subscriptions = self.max_subscriptions,
            drain_delay_s = self.drain_delay.as_secs_f64(),
            drain_window_s = self.drain_window.as_secs_f64(),
            drain_timeout_s = self.drain_timeout.as_secs_f64(),
            trusted_proxies = ?self.trusted_proxies,
            "configuration"
        );
    }

    /// Checks what clap cannot: limits that must not be zero, timers too short to work, and
    /// origins that are not origins.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("--heartbeat-interval", !self.heartbeat_interval.is_zero()),
            ("--client-rate", self.client_rate > 0),
            ("--max-subscriptions", self.max_subscriptions > 0),
            ("--max-connections", self.max_connections > 0),
            ("--history-size", self.history_size > 0),
            (
                "--max-connections-per-user",
                self.max_connections_per_user != Some(0),
            ),
        ];
        if let Some((flag, _)) = positive.into_iter().find(|(_, ok)| !ok) {
            return Err(ConfigError::Zero { flag });
        }
        if self.node_report_interval < Duration::from_millis(100) {
            return Err(ConfigError::TooShort {
                flag: "--node-report-interval",
                least: "100ms",
            });
        }
        if self.session_ttl < Duration::from_secs(1) {
            return Err(ConfigError::TooShort {
                flag: "--session-ttl",
                least: "1s",
            });
        }
        if self.drain_window >= self.drain_timeout {
            return Err(ConfigError::DrainWindow);
        }
        if let Some(origin) = self.allowed_origins.iter().find(|o| !o.contains("://")) {
            return Err(ConfigError::Origin(origin.clone()));
        }
        Ok(())
    }
}

/// A configuration a node cannot run with, by kind of mistake; each names the flag to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A limit or interval of zero: nothing could pass it, or a timer would spin.
    #[error("{flag} must be above zero")]
    Zero { flag: &'static str },
    /// An interval too short to be meant.
    #[error("{flag} must be at least {least}")]
    TooShort {
        flag: &'static str,
        least: &'static str,
    },
    /// The drain could not close every client within its timeout.
    #[error("--drain-window must be shorter than --drain-timeout")]
    DrainWindow,
    #[error("--allowed-origins: `{0}` is not an origin (scheme://host[:port])")]
    Origin(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Base URL of a node's admin listener.
    #[arg(long, env = "BGW_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
    pub admin_url: String,
    /// The admin API key, where the node requires one.
    #[arg(long, env = "BGW_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,
    /// Channel to publish to.
    pub channel: String,
    /// The message: any JSON value. Read from standard input when absent.
    pub data: Option<String>,
    /// Publish at most once with this key: a retry with the same key (to the same channel,
    /// within the node's --idempotency-window) prints the first publish's answer again.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// Where a command of the admin API goes.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Base URL of a node's admin listener.
    #[arg(long, env = "BGW_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
    pub admin_url: String,
    /// The admin API key, where the node requires one.
    #[arg(long, env = "BGW_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("whom").required(true).args(["user", "session"])))]
pub struct DisconnectArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Every connection of this user (the token's `sub`).
    #[arg(long)]
    pub user: Option<String>,
    /// The connection that holds this session.
    #[arg(long)]
    pub session: Option<String>,
    /// The close: `disconnect` (4003, may reconnect), `revoked` (4001, needs a new token) or
    /// `terminate` (4004, should not reconnect).
    #[arg(long, default_value = "disconnect", value_parser = ["disconnect", "revoked", "terminate"])]
    pub reason: String,
    /// End the sessions too, so that they cannot be resumed.
    #[arg(long)]
    pub end_session: bool,
}

#[derive(Debug, Args)]
pub struct ChannelsArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Only channels that match: a name, or a prefix and `*` (`room.*`).
    #[arg(long)]
    pub pattern: Option<String>,
    /// At most this many channels, the busiest first (1 to 10000).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

#[derive(Debug, Args)]
pub struct PresenceArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// The channel (one that matches the node's --presence).
    pub channel: String,
    /// At most this many members (0: only the count).
    #[arg(long)]
    pub limit: Option<usize>,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// The channel.
    pub channel: String,
    /// Messages with a seq above this one.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    /// At most this many messages (1 to 1000).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Remove the channel's history instead of printing it.
    #[arg(long, conflicts_with_all = ["since", "limit"])]
    pub remove: bool,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// Base URL of a node's admin listener.
    #[arg(long, env = "BGW_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
    pub admin_url: String,
}

/// A value that never appears in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// An address (`10.0.0.7`, one host) or a network (`10.0.0.0/8`).
fn ip_or_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{s}` is neither an IP address nor a CIDR network"))
}

/// Clears `BGW_` variables that are set but empty, so that `BGW_API_KEY=` means no key rather
/// than an empty one (compose files and manifests often pass variables through empty). Call it
/// before any thread starts.
pub fn forget_empty_env() {
    for (name, value) in std::env::vars_os() {
        if value.is_empty() && name.to_string_lossy().starts_with("BGW_") {
            std::env::remove_var(name);
        }
    }
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let cli = Cli::try_parse_from(["gateway"]).unwrap();
        assert!(cli.command.is_none());
        cli.serve.validate().unwrap();
        assert_eq!(cli.serve.heartbeat_interval, Duration::from_secs(25));
    }

    #[test]
    fn a_configuration_that_cannot_work_names_its_flag() {
        let refused = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["gateway"], args].concat()).unwrap();
            cli.serve.validate().unwrap_err().to_string()
        };
        assert_eq!(
            refused(&["--client-rate", "0"]),
            "--client-rate must be above zero"
        );
        assert_eq!(
            refused(&["--max-connections", "0"]),
            "--max-connections must be above zero"
        );
        assert_eq!(
            refused(&["--session-ttl", "500ms"]),
            "--session-ttl must be at least 1s"
        );
        assert_eq!(
            refused(&["--drain-window", "20s", "--drain-timeout", "20s"]),
            "--drain-window must be shorter than --drain-timeout"
        );
        assert_eq!(
            refused(&["--allowed-origins", "example.com"]),
            "--allowed-origins: `example.com` is not an origin (scheme://host[:port])"
        );
    }

    #[test]
    fn durations_and_lists() {
        let cli = Cli::try_parse_from([
            "gateway",
            "serve",
            "--hello-timeout",
            "500ms",
            "--session-ttl",
            "5m",
            "--allowed-origins",
            "https://a.example.com,https://*.example.org",
        ])
        .unwrap();
        let Some(Command::Serve(config)) = cli.command else {
            panic!()
        };
        assert_eq!(config.hello_timeout, Duration::from_millis(500));
        assert_eq!(config.session_ttl, Duration::from_secs(300));
        assert_eq!(config.allowed_origins.len(), 2);
    }

    #[test]
    fn proxies_are_hosts_or_networks() {
        let cli = Cli::try_parse_from(["gateway", "--trusted-proxies", "127.0.0.1,10.0.0.0/8,::1"])
            .unwrap();
        let nets: Vec<String> = cli
            .serve
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]);
        assert!(Cli::try_parse_from(["gateway", "--trusted-proxies", "nope"]).is_err());
    }

    #[test]
    fn a_redis_client_certificate_needs_its_key() {
        let cert = ["gateway", "--redis-client-cert", "c.pem"];
        assert!(Cli::try_parse_from(cert).is_err());
        let both = Cli::try_parse_from([
            "gateway",
            "--redis-client-cert",
            "c.pem",
            "--redis-client-key",
            "k.pem",
            "--redis-ca-file",
            "ca.pem",
        ])
        .unwrap();
        assert_eq!(both.serve.redis_client_key, Some(PathBuf::from("k.pem")));
    }

    #[test]
    fn secrets_are_redacted() {
        let cli = Cli::try_parse_from(["gateway", "--jwt-secret", "hunter2", "--api-key", "k3y"])
            .unwrap();
        let shown = format!("{:?}", cli.serve);
        assert!(
            !shown.contains("hunter2") && !shown.contains("k3y"),
            "{shown}"
        );
    }
}
