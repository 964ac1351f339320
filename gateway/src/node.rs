//! The node: what every connection, listener and task of one gateway process shares.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth::Verifier;
use crate::broker::{Broker, BrokerError, Published};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::session::Sessions;
use crate::user_limit::UserConnections;

pub struct Node {
    pub id: String,
    pub config: Config,
    pub broker: Arc<dyn Broker>,
    pub hub: Arc<Hub>,
    pub sessions: Arc<Sessions>,
    /// `--max-connections-per-user`, across the cluster.
    pub user_connections: UserConnections,
    pub metrics: Arc<Metrics>,
    /// `None` when authentication is off.
    pub verifier: Option<Verifier>,
    /// One permit per client connection: `--max-connections`.
    pub capacity: Arc<Semaphore>,
    /// Set on SIGTERM: readiness fails and new sockets are refused.
    pub draining: AtomicBool,
    /// Cancelled when every connection is to close with 1001, each in its slot of the window.
    pub closing: CancellationToken,
    /// Connections open when the drain began, and slots of the drain window taken so far.
    drain_total: AtomicUsize,
    drain_slots: AtomicUsize,
    connection_ids: AtomicU64,
}

impl Node {
    pub fn new(
        id: String,
        config: Config,
        broker: Arc<dyn Broker>,
        verifier: Option<Verifier>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let hub = Arc::new(Hub::new(broker.clone(), metrics.clone()));
        let sessions = Arc::new(Sessions::new(
            broker.clone(),
            metrics.clone(),
            config.session_ttl,
        ));
        let user_connections = UserConnections::new(
            config.max_connections_per_user,
            broker.clone(),
            id.clone(),
            config.node_report_interval,
        );
        Self {
            id,
            user_connections,
            capacity: Arc::new(Semaphore::new(config.max_connections)),
            config,
            broker,
            hub,
            sessions,
            metrics,
            verifier,
            draining: AtomicBool::new(false),
            closing: CancellationToken::new(),
            drain_total: AtomicUsize::new(0),
            drain_slots: AtomicUsize::new(0),
            // Random high bits: a takeover notice for a connection of an earlier process with the
            // same node id (a restarted pod) cannot match a connection of this one.
            connection_ids: AtomicU64::new(u64::from(rand::random::<u32>()) << 32 | 1),
        }
    }

    pub fn next_connection_id(&self) -> u64 {
        self.connection_ids.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts closing every connection with 1001, spread evenly over the drain window so that
    /// the other nodes do not take every reconnect at once.
    pub fn close_all(&self) {
        let open = usize::try_from(self.metrics.connections.get()).unwrap_or(0);
        self.drain_total.store(open.max(1), Ordering::Relaxed);
        self.closing.cancel();
    }

    /// How long a connection waits before its 1001: the next evenly spaced slot of the window.
    pub fn drain_delay(&self) -> Duration {
        let total = self.drain_total.load(Ordering::Relaxed).max(1);
        let slot = self
            .drain_slots
            .fetch_add(1, Ordering::Relaxed)
            .min(total - 1);
        self.config.drain_window.mul_f64(slot as f64 / total as f64)
    }

    /// Publishes through the broker, for clients and the admin API alike.
    pub async fn publish(&self, channel: &str, data: Bytes) -> Result<Published, BrokerError> {
        let started = Instant::now();
        let published = (self.broker.publish(channel, data).await)
            .inspect_err(|_| self.metrics.publish_errors.inc())?;
        self.metrics.published.inc();
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(published)
    }
}
