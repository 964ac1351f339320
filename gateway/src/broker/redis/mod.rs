//! The Redis broker: channel sequences, history and sessions in Redis, and one pub/sub
//! subscription per channel per node. One Redis, a Redis Cluster (sharded pub/sub), or the
//! master that Redis Sentinels name; over TLS with `rediss`.
//!
//! - [`target`]: the URL forms, TLS, and where writes go now; [`url`]: the text of a URL,
//!   its password hidden; [`endpoint`]: connecting to a Redis or a Cluster;
//! - [`link`]: the pub/sub connection, reconnected in the background, whose health is the
//!   broker's availability; [`sentinel`]: which node is the master;
//! - [`pool`]: connections for commands; [`pipeline`]: the shared connections that pipeline
//!   concurrent publishes; [`scripts`]: the Lua that numbers and stores messages;
//! - [`keys`]: the key schema, and the payloads of the topics;
//! - [`requests`]: running a command or a script, pooled or pipelined, its error classified.
//!
//! The broker's work, by job: [`channels`] (publishing, history, the node's subscriptions),
//! [`sessions`] (records, owners, node positions), [`reports`] (channel counts, presence),
//! [`user_connections`]. Here: the broker's start, and the [`Broker`] trait, which hands each
//! call to the module of its job.

mod channels;
mod endpoint;
mod keys;
mod link;
mod pipeline;
mod pool;
mod reports;
mod requests;
mod scripts;
mod sentinel;
mod sessions;
mod target;
mod url;
mod user_connections;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use self::keys::CONTROL_TOPIC;
use self::link::{Link, LinkState};
use self::requests::{to_json, Request};
use self::scripts::Scripts;
use self::target::{Target, TlsFiles};
use super::{Broker, BrokerError, Control, Events, HistoryLimits, SetupError};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::shutdown::Tasks;

pub use self::url::redact;

/// Pushes that may wait for the hub. A full queue drops a push; the hub sees the gap at the
/// channel's next message and repairs it from history.
const EVENT_QUEUE: usize = 65_536;

/// Sessions saved per pipeline: big enough to make a drain of 20k sessions a few round trips,
/// small enough not to stall Redis.
const SAVE_BATCH: usize = 1000;

/// What the Redis broker needs of the configuration.
pub struct Settings {
    target: Target,
    history: HistoryLimits,
}

impl Settings {
    /// Parses the URL and reads the TLS files.
    pub fn from_config(
        url: &str,
        config: &Config,
        history: HistoryLimits,
    ) -> Result<Self, SetupError> {
        let read = |flag: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| SetupError::File {
                flag,
                path: path.to_owned(),
                source,
            })
        };
        let tls = TlsFiles {
            ca: config
                .redis_ca_file
                .as_deref()
                .map(|path| read("--redis-ca-file", path))
                .transpose()?,
            client: match (&config.redis_client_cert, &config.redis_client_key) {
                (Some(cert), Some(key)) => Some((
                    read("--redis-client-cert", cert)?,
                    read("--redis-client-key", key)?,
                )),
                _ => None,
            },
        };
        Ok(Self {
            target: Target::parse(url, &tls)?,
            history,
        })
    }
}

pub struct RedisBroker {
    /// This node's id: the key of its channel reports.
    node: String,
    history: HistoryLimits,
    target: Arc<Target>,
    link: Arc<LinkState>,
    commands: pool::Pool,
    /// Publishes, pipelined.
    shared: pipeline::Shared,
    scripts: Scripts,
}

impl RedisBroker {
    /// Starts the link to Redis on `tasks`, until they stop, and returns once its first
    /// attempt is over: connected, or not (then the node starts unready, and the link keeps
    /// trying).
    pub async fn start(
        settings: Settings,
        node: String,
        metrics: Arc<Metrics>,
        tasks: &Tasks,
    ) -> Result<(Arc<Self>, Events), SetupError> {
        let (events, rx) = mpsc::channel(EVENT_QUEUE);
        let target = Arc::new(settings.target);
        let state = Arc::new(LinkState::default());
        let (first_attempt, first_attempt_over) = oneshot::channel();
        let link = Link {
            target: target.clone(),
            state: state.clone(),
            node: node.clone(),
            events,
            metrics,
        };
        tasks.spawn("redis link", link.run(tasks.stop(), first_attempt));
        let _ = first_attempt_over.await;
        let broker = Arc::new(Self {
            node,
            history: settings.history,
            target,
            commands: pool::new(state.clone()),
            shared: pipeline::Shared::new(state.clone()),
            link: state,
            scripts: Scripts::new(),
        });
        Ok((broker, rx))
    }
}

/// The broker's other traits are implemented in the modules of their jobs; what concerns the
/// whole cluster or the link alone is here.
#[async_trait]
impl Broker for RedisBroker {
    async fn control(&self, control: &Control) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd(self.publish_command());
        cmd.arg(CONTROL_TOPIC).arg(to_json(control)?);
        self.query::<i64>(Request::Cmd(cmd)).await.map(|_| ())
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.query::<String>(Request::Cmd(redis::cmd("PING")))
            .await
            .map(|_| ())
    }

    fn available(&self) -> bool {
        self.link.is_up()
    }
}
