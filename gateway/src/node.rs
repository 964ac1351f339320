//! The node: what every connection, listener and task of one gateway process shares.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::auth::Verifier;
use crate::broker::{Broker, BrokerError, Published};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::session::Sessions;
use crate::shutdown::{Drain, Tasks};
use crate::user_limit::UserConnections;

pub struct Node {
    pub id: String,
    pub config: Config,
    pub broker: Arc<dyn Broker>,
    pub hub: Arc<Hub>,
    pub sessions: Arc<Sessions>,
    /// `--max-connections-per-user`, across the cluster.
    pub user_connections: UserConnections,
    /// `--presence`: the members of presence channels, and their `join` and `leave` frames.
    pub presence: Arc<Presence>,
    pub metrics: Arc<Metrics>,
    /// `None` when authentication is off.
    pub verifier: Option<Verifier>,
    /// One permit per client connection: `--max-connections`.
    pub capacity: Arc<Semaphore>,
    /// The drain: readiness, and the connections to close.
    pub drain: Drain,
    /// The node's long-lived tasks.
    pub tasks: Arc<Tasks>,
    connection_ids: AtomicU64,
}

impl Node {
    pub fn new(
        id: String,
        config: Config,
        broker: Arc<dyn Broker>,
        verifier: Option<Verifier>,
        metrics: Arc<Metrics>,
        tasks: Arc<Tasks>,
    ) -> Self {
        let hub = Arc::new(Hub::new(broker.clone(), metrics.clone(), tasks.clone()));
        let sessions = Arc::new(Sessions::new(
            broker.clone(),
            metrics.clone(),
            config.session_ttl,
            id.clone(),
        ));
        let user_connections = UserConnections::new(
            config.max_connections_per_user,
            broker.clone(),
            id.clone(),
            config.node_report_interval,
        );
        let presence = Arc::new(Presence::new(&config.presence, id.clone(), metrics.clone()));
        Self {
            id,
            user_connections,
            presence,
            capacity: Arc::new(Semaphore::new(config.max_connections)),
            config,
            broker,
            hub,
            sessions,
            metrics,
            verifier,
            drain: Drain::default(),
            tasks,
            // Random high bits: a takeover notice for a connection of an earlier process with the
            // same node id (a restarted pod) cannot match a connection of this one.
            connection_ids: AtomicU64::new(u64::from(rand::random::<u32>()) << 32 | 1),
        }
    }

    pub fn next_connection_id(&self) -> u64 {
        self.connection_ids.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_draining()
    }

    /// Publishes through the broker, for clients and the admin API alike.
    pub async fn publish(&self, channel: &str, data: Bytes) -> Result<Published, BrokerError> {
        self.counted(self.broker.publish(channel, data)).await
    }

    /// Publishes unless the same idempotency `key` published to the channel within the
    /// configured window; counted as every publish is.
    pub async fn publish_once(
        &self,
        channel: &str,
        data: Bytes,
        key: &str,
    ) -> Result<Published, BrokerError> {
        let window = self.config.idempotency_window;
        self.counted(self.broker.publish_once(channel, data, key, window))
            .await
    }

    /// A publish, with its metrics: published, failed, and how long it took.
    async fn counted(
        &self,
        publish: impl std::future::Future<Output = Result<Published, BrokerError>>,
    ) -> Result<Published, BrokerError> {
        let started = Instant::now();
        let published = publish
            .await
            .inspect_err(|_| self.metrics.publish_errors.inc())?;
        self.metrics.published.inc();
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(published)
    }
}
