//! The node's link to Redis: one pub/sub connection, which carries the channels' messages, the
//! node's control topic and the cluster's, and whose health is the broker's availability.
//!
//! The link connects in the background and reconnects after every loss, as
//! [`reconnect`](crate::broker::reconnect) says. Each connection is a new generation: the
//! command pool drops connections of older generations, and pushes that still come from a
//! replaced connection are ignored. Once a connection is up and the control topic subscribed,
//! the hub is told to resync: it subscribes every channel again and repairs from history what
//! was published while the link was down.
//!
//! Checked every [`LINK_CHECK`] (and at once when Redis closes the connection): a `PING`, and
//! behind Sentinel whether the Sentinels still name the same master.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::endpoint::{Connection, Endpoint};
use super::keys::{control_topic, parse_push, CONTROL_TOPIC};
use super::target::Target;
use crate::broker::{reconnect, Event};
use crate::metrics::Metrics;

/// How often the link is checked.
const LINK_CHECK: Duration = Duration::from_millis(500);

/// The state of the link, shared with the broker and its command pool.
#[derive(Default)]
pub struct LinkState {
    up: AtomicBool,
    /// Counts connection attempts: the generation of the connection being made or in use.
    generation: AtomicU64,
    current: RwLock<Option<Current>>,
    /// Woken when Redis closes the current connection.
    lost: Notify,
}

/// The connection in use, and where it goes.
#[derive(Clone)]
pub struct Current {
    pub endpoint: Endpoint,
    pub pubsub: Connection,
    pub generation: u64,
}

impl LinkState {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The connection in use, while the link is up.
    pub fn current(&self) -> Option<Current> {
        self.current.read().clone()
    }

    fn install(&self, current: Current) {
        *self.current.write() = Some(current);
        self.up.store(true, Ordering::Release);
    }

    fn lose(&self) {
        self.up.store(false, Ordering::Release);
        *self.current.write() = None;
    }
}

/// The task that keeps the link up.
pub struct Link {
    pub target: Arc<Target>,
    pub state: Arc<LinkState>,
    pub node: String,
    pub events: mpsc::Sender<Event>,
    pub metrics: Arc<Metrics>,
}

impl Link {
    /// Keeps the link up until `stop`. `first` is told when the first attempt is over, whether
    /// it connected or not.
    pub async fn run(self, stop: CancellationToken, first: oneshot::Sender<()>) {
        let mut first = Some(first);
        loop {
            let connected = reconnect::retry(
                "Redis",
                &self.target.redacted,
                &stop,
                || {
                    if let Some(first) = first.take() {
                        let _ = first.send(());
                    }
                },
                || self.connect(),
            )
            .await;
            let Some(current) = connected else { return };
            info!(
                address = %self.target.redacted,
                node = current.endpoint.address(),
                "connected to Redis"
            );
            self.state.install(current.clone());
            if let Some(first) = first.take() {
                let _ = first.send(());
            }
            let _ = self.events.send(Event::Resync).await;
            let Some(reason) = self.watch(&current, &stop).await else {
                return;
            };
            self.state.lose();
            warn!(address = %self.target.redacted, error = %reason, "Redis link lost; reconnecting");
        }
    }

    /// One attempt: where Redis is, a connection, and the control topic.
    async fn connect(&self) -> Result<Current, String> {
        let endpoint = self.target.resolve().await?;
        let generation = self.state.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let at = |e: redis::RedisError| format!("{}: {e}", endpoint.address());
        let pubsub = endpoint
            .connect(Some(self.push_handler(generation)))
            .await
            .map_err(at)?;
        if self.target.is_sentinel() {
            let role = role(&pubsub).await.map_err(at)?;
            if role != "master" {
                return Err(format!(
                    "{}: named master by the Sentinels, but its role is {role}",
                    endpoint.address()
                ));
            }
        }
        pubsub
            .subscribe(&control_topic(&self.node))
            .await
            .map_err(at)?;
        pubsub.subscribe(CONTROL_TOPIC).await.map_err(at)?;
        Ok(Current {
            endpoint,
            pubsub,
            generation,
        })
    }

    /// Waits for the link to fail; the reason, or `None` when stopped.
    async fn watch(&self, current: &Current, stop: &CancellationToken) -> Option<String> {
        loop {
            tokio::select! {
                () = stop.cancelled() => return None,
                () = tokio::time::sleep(LINK_CHECK) => {}
                () = self.state.lost.notified() => {}
            }
            let mut conn = current.pubsub.clone();
            if let Err(e) = redis::cmd("PING").query_async::<()>(&mut conn).await {
                return Some(format!("{}: {e}", current.endpoint.address()));
            }
            match self.target.current_master().await {
                Some(Ok(master)) if master != current.endpoint.address() => {
                    return Some(format!(
                        "the Sentinels name a new master, {master} (was {})",
                        current.endpoint.address()
                    ));
                }
                Some(Err(e)) => {
                    debug!(error = %e, "no Sentinel answers; staying on the master that does");
                }
                _ => {}
            }
        }
    }

    /// Turns the pushes of the connection of `generation` into events for the hub.
    fn push_handler(
        &self,
        generation: u64,
    ) -> impl Fn(PushInfo) -> Result<(), redis::aio::SendError> + Clone + Send + Sync + 'static
    {
        let state = self.state.clone();
        let events = self.events.clone();
        let metrics = self.metrics.clone();
        move |push: PushInfo| {
            if state.generation() == generation {
                on_push(push, &events, &state, &metrics);
            }
            Ok(())
        }
    }
}

/// The role a Redis reports: `master`, `slave` or `sentinel`.
async fn role(conn: &Connection) -> Result<String, redis::RedisError> {
    let mut conn = conn.clone();
    let reply: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
    match reply.into_iter().next() {
        Some(role) => Ok(redis::from_redis_value(role)?),
        None => Ok(String::new()),
    }
}

fn on_push(push: PushInfo, events: &mpsc::Sender<Event>, state: &LinkState, metrics: &Metrics) {
    let event = match push.kind {
        PushKind::Disconnection => {
            state.lost.notify_one();
            return;
        }
        PushKind::Message | PushKind::SMessage => {
            let [Value::BulkString(topic), Value::BulkString(payload)] = &push.data[..] else {
                return;
            };
            match parse_push(topic, payload) {
                Some(event) => event,
                None => {
                    metrics.drops.with_label_values(&["malformed_push"]).inc();
                    return;
                }
            }
        }
        _ => return,
    };
    if events.try_send(event).is_err() {
        metrics
            .drops
            .with_label_values(&["broker_queue_full"])
            .inc();
    }
}
