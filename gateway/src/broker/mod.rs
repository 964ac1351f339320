//! The broker: where channel sequences, history and sessions live, and how a published message
//! reaches every node. The rest of the gateway does not know which implementation it runs on.

pub mod embedded;
pub mod redis;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shared::Position;
use tokio::sync::mpsc;

/// A published message as the broker hands it to a node: `data` is the raw JSON of the payload.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub channel: Arc<str>,
    pub seq: u64,
    pub epoch: Arc<str>,
    pub data: Bytes,
}

/// Where a publish landed in its channel's sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    pub epoch: Arc<str>,
}

/// What a broker tells a node, in order.
#[derive(Debug)]
pub enum Event {
    Message(Delivery),
    /// Another connection resumed the session `session`: close the connection `conn` with 4009.
    TakenOver {
        session: String,
        conn: u64,
    },
    /// The link to the broker was down and is back: pushes may have been lost meanwhile.
    Resync,
}

/// Where a node learns of the broker's events. Bounded: a slow node slows its broker link.
pub type Events = mpsc::Receiver<Event>;

/// The retained history of a channel after a position.
#[derive(Debug, Clone)]
pub struct History {
    /// The channel's epoch now.
    pub epoch: Arc<str>,
    /// The channel's last seq now (0 before the first message of the epoch).
    pub top: u64,
    /// The retained messages with seq greater than the position asked for, in order.
    pub messages: Vec<(u64, Bytes)>,
    /// Whether `messages` holds every message after the position asked for, up to `top`.
    pub complete: bool,
}

/// A session as the broker keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub subject: String,
    pub subscriptions: BTreeMap<String, Position>,
    pub owner: Owner,
}

/// The connection that holds a session; only its saves are taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub node: String,
    pub conn: u64,
}

/// Why a broker call failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Appends `data` to the channel: the next seq, history, and delivery to every node.
    async fn publish(&self, channel: &str, data: Bytes) -> Result<Published, BrokerError>;

    /// The channel's retained messages with seq greater than `after`.
    async fn history(&self, channel: &str, after: u64) -> Result<History, BrokerError>;

    /// Starts delivering the channel's messages to this node. Returns once later publishes are
    /// sure to arrive. The node calls it once per channel, however many local subscribers.
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError>;

    /// Stops delivering the channel's messages to this node.
    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError>;

    async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, BrokerError>;

    /// Makes `owner` the owner of a live session, and returns the session as it was (with its
    /// previous owner); `None` when there is no such session.
    async fn claim_session(
        &self,
        id: &str,
        owner: &Owner,
        ttl: Duration,
    ) -> Result<Option<SessionRecord>, BrokerError>;

    /// Saves sessions in one batch. A record is kept only where its owner still owns the session
    /// (or it has expired), so a connection that was taken over cannot overwrite its successor.
    async fn save_sessions(
        &self,
        records: &[SessionRecord],
        ttl: Duration,
    ) -> Result<(), BrokerError>;

    /// Tells the owner's node that its connection lost the session to another one.
    async fn take_over(&self, previous: &Owner, session: &str) -> Result<(), BrokerError>;

    /// Whether the broker answers now.
    async fn ping(&self) -> Result<(), BrokerError>;
}
