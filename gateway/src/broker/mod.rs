//! The broker: where channel sequences, history and sessions live, and how a published message
//! reaches every node. The rest of the gateway does not know which implementation it runs on.
//!
//! [`connect`] builds the one the configuration names; each broker runs its background work
//! (the embedded broker's sweep, the Redis link and its reconnects) on the node's [`Tasks`],
//! named, so that it stops with the node's other tasks and the drain names it if it does not.

pub mod embedded;
pub mod reconnect;
pub mod redis;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shared::Position;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::presence::{Change, Member};
use crate::shutdown::Tasks;

/// How long a channel's seq and epoch outlive its last publish or read, in either broker. Much
/// longer than any history or session, so that a client's position stays comparable while it
/// can resume; idle channels are forgotten after it, so that their records do not pile up.
pub const CHANNEL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How much history a channel keeps.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    pub size: usize,
    pub ttl: Duration,
}

/// A running broker, as [`connect`] hands it to the node.
pub struct Connected {
    pub broker: Arc<dyn Broker>,
    /// What the broker tells the node, in order.
    pub events: Events,
    /// `"redis"` or `"embedded"`, for the logs.
    pub kind: &'static str,
}

/// The broker the configuration names: Redis with `--redis-url`, else the embedded one. A Redis
/// that does not answer is no error here: the node starts, unready, and the broker keeps trying
/// in the background (see [`reconnect`]); this returns after the first attempt, so that a node
/// whose Redis is up is ready as soon as it listens. Errors are those of the configuration (a
/// malformed URL, an unreadable certificate file), each naming its flag.
pub async fn connect(
    config: &Config,
    node: &str,
    metrics: Arc<Metrics>,
    tasks: &Tasks,
) -> Result<Connected, SetupError> {
    let history = HistoryLimits {
        size: config.history_size,
        ttl: config.history_ttl,
    };
    match &config.redis_url {
        Some(url) => {
            let settings = redis::Settings::from_config(url.expose(), config, history)?;
            let (broker, events) =
                redis::RedisBroker::start(settings, node.to_owned(), metrics, tasks).await?;
            Ok(Connected {
                broker,
                events,
                kind: "redis",
            })
        }
        None => {
            let (broker, events) = embedded::EmbeddedBroker::start(node.to_owned(), history, tasks);
            Ok(Connected {
                broker,
                events,
                kind: "embedded",
            })
        }
    }
}

/// A configuration the broker cannot start with. Never carries a secret: URLs are redacted.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--redis-url / BGW_REDIS_URL: {0}")]
    Url(String),
    #[error("cannot read {flag} {path}")]
    File {
        flag: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{flag}: {message}")]
    Tls { flag: &'static str, message: String },
}

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
    /// A back end acts on connections of every node (admin API): see [`crate::control`].
    Control(Control),
    /// A member joined (`joined`) or left a presence channel: a `join` or `leave` frame for the
    /// local subscribers that asked for them ([`crate::presence`]).
    Presence {
        joined: bool,
        presence: shared::frame::Presence,
    },
}

/// What a back end asks every node to do to the connections of a user or of one session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    /// Close the connections with `close`; with `end_session`, their sessions cannot be resumed.
    Disconnect {
        target: Target,
        close: Disconnect,
        end_session: bool,
    },
    /// Leave the channel; the client gets `unsubscribed` without an `id`.
    Unsubscribe { target: Target, channel: String },
    /// Join the channel (a server-side subscription); the client gets `subscribed` without an
    /// `id`.
    Subscribe { target: Target, channel: String },
}

/// Whose connections a [`Control`] acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every connection whose token's `sub` is this.
    User(String),
    /// The connection that holds this session.
    Session(String),
}

/// The closes a back end may choose from (PROTOCOL.md, section 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disconnect {
    /// 4003 `disconnected`: the client may reconnect after a delay.
    Disconnect,
    /// 4001 `access revoked`: the client needs a new token.
    Revoked,
    /// 4004 `terminated`: the client should not reconnect.
    Terminate,
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

impl History {
    /// The history of a channel at `epoch` and `top` after the position `after`, from the
    /// retained `messages` with a seq above it, in order. Complete when they are every seq from
    /// `after + 1` to `top`, none missing, or when `after` is `top` (nothing to miss). A
    /// position ahead of the channel is never complete: the client saw messages the channel no
    /// longer has. That includes `u64::MAX`, which the hub asks with when a client gave no
    /// position (and does not read `complete` then).
    pub fn new(epoch: Arc<str>, top: u64, after: u64, messages: Vec<(u64, Bytes)>) -> Self {
        let complete = after == top
            || (after < top
                && messages
                    .iter()
                    .zip(after + 1..)
                    .all(|((seq, _), expected)| *seq == expected)
                && messages.last().is_some_and(|(seq, _)| *seq == top));
        Self {
            epoch,
            top,
            messages,
            complete,
        }
    }
}

/// A session as the broker keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub subject: String,
    pub subscriptions: BTreeMap<String, Position>,
    pub owner: Owner,
    /// The subscriptions that asked for `join` and `leave` frames: a resume keeps them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub presence: BTreeSet<String>,
    /// Set on the record of a live connection: its positions are where it stood at the save,
    /// and a later save of its node's positions may carry them further (see
    /// [`crate::session`]). `None` on a record saved when the connection ended: exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follows: Option<Follows>,
}

/// The node (one run of it) whose saved positions a live session's record follows, and the
/// tick of the node's saver when the record was made: node positions of a later tick are
/// never ahead of where the session stood.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Follows {
    pub node: String,
    pub instance: u64,
    pub tick: u64,
}

/// A node's positions of its channels at one tick of its saver: on each channel, a position
/// that no subscriber of the node is behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePositions {
    /// One run of the node: a node restarted under the same name starts another.
    pub instance: u64,
    pub tick: u64,
    pub channels: BTreeMap<String, Position>,
}

/// The connection that holds a session; only its saves are taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub node: String,
    pub conn: u64,
}

/// Why a broker call failed, by cause: whose fault it is decides what the caller does (retry
/// later, or report a bug) and what the logs say. None is the client's fault: requests are
/// checked before they reach the broker.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached, or refuses work for a while (down, failing over, loading,
    /// a replica that is read-only): worth retrying; clients get 503.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker answered what this gateway does not understand (a malformed reply, a script
    /// error): a bug or a foreign writer of the gateway's keys, not an outage.
    #[error("broker protocol error: {0}")]
    Protocol(String),
    /// The node itself failed: it is stopping, or could not encode a request.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A channel's sequence, history and delivery to the nodes.
#[async_trait]
pub trait Channels: Send + Sync {
    /// Appends `data` to the channel: the next seq, history, and delivery to every node.
    async fn publish(&self, channel: &str, data: Bytes) -> Result<Published, BrokerError>;

    /// Publishes as [`Channels::publish`] does, unless a publish to the channel with the same
    /// idempotency `key` was made within `window`: then answers with that publish's place and
    /// publishes nothing. The check and the publish are one atomic step, so that two retries
    /// racing each other publish once.
    async fn publish_once(
        &self,
        channel: &str,
        data: Bytes,
        key: &str,
        window: Duration,
    ) -> Result<Published, BrokerError>;

    /// Forgets the channel's retained messages; its seq and epoch stay, so that later publishes
    /// continue the sequence (a client resuming from before gets `recovered: false`).
    async fn remove_history(&self, channel: &str) -> Result<(), BrokerError>;

    /// The channel's retained messages with seq greater than `after`.
    async fn history(&self, channel: &str, after: u64) -> Result<History, BrokerError>;

    /// Starts delivering the channel's messages to this node. Returns once later publishes are
    /// sure to arrive. The node calls it once per channel, however many local subscribers.
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError>;

    /// Stops delivering the channel's messages to this node.
    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError>;
}

/// Sessions, and each node's positions, as the broker keeps them.
#[async_trait]
pub trait SessionStore: Send + Sync {
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

    /// Replaces the node's positions; they expire after `ttl` unless saved again.
    async fn save_positions(
        &self,
        node: &str,
        positions: &NodePositions,
        ttl: Duration,
    ) -> Result<(), BrokerError>;

    /// The node's last saved positions of `channels` (those it has), with their run and tick.
    async fn load_positions(
        &self,
        node: &str,
        channels: &[&str],
    ) -> Result<Option<NodePositions>, BrokerError>;

    /// Tells the owner's node that its connection lost the session to another one.
    async fn take_over(&self, previous: &Owner, session: &str) -> Result<(), BrokerError>;

    /// Ends the session for good: it cannot be resumed, and saves of it are refused, for `ttl`
    /// (as long as a save could come: the session's TTL).
    async fn end_session(&self, id: &str, ttl: Duration) -> Result<(), BrokerError>;
}

/// What each node reports of its subscribers: channel counts, presence members.
#[async_trait]
pub trait Reports: Send + Sync {
    /// Replaces this node's report of its channels' local subscriber counts; the report expires
    /// after `ttl` unless made again, so that a dead node's counts vanish.
    async fn report_channels(
        &self,
        counts: &[(Arc<str>, u64)],
        ttl: Duration,
    ) -> Result<(), BrokerError>;

    /// Every channel with subscribers in a live report of any node, with the counts summed.
    async fn channels(&self) -> Result<Vec<(String, u64)>, BrokerError>;

    /// Adds (or reports again) and removes members of presence channels, each channel's in the
    /// order given, atomically with what each change announces: an added member expires after
    /// `ttl` unless reported again, and expired ones are removed first. A change that is one (a
    /// member added that was absent, removed that was present) reaches every node subscribed to
    /// the channel as [`Event::Presence`], with the channel's member count after it, when
    /// [`crate::presence::announced`] says so under `max`; so does the removal of an expired
    /// member.
    async fn change_presence(
        &self,
        changes: &[Change],
        ttl: Duration,
        max: usize,
    ) -> Result<(), BrokerError>;

    /// The channel's unexpired members, at most `limit` of them, and how many there are.
    async fn presence(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<(u64, Vec<Member>), BrokerError>;
}

/// The connections each user holds across the cluster (`--max-connections-per-user`).
#[async_trait]
pub trait UserSlots: Send + Sync {
    /// Adds `member` (a node's connection) to the connections of `user` unless the user has
    /// `limit` unexpired ones already; `false` then. The member expires after `ttl` unless
    /// refreshed.
    async fn acquire_connection(
        &self,
        user: &str,
        member: &str,
        limit: usize,
        ttl: Duration,
    ) -> Result<bool, BrokerError>;

    /// Removes `member` from the connections of `user`.
    async fn release_connection(&self, user: &str, member: &str) -> Result<(), BrokerError>;

    /// Pushes back the expiry of each `(user, member)` that is still held (a released one is
    /// not taken again).
    async fn refresh_connections(
        &self,
        slots: &[(String, String)],
        ttl: Duration,
    ) -> Result<(), BrokerError>;
}

/// The broker of a node: one trait per job, each implemented by both brokers in the module of
/// that job (`embedded/`, `redis/`), and what concerns the node's link here.
#[async_trait]
pub trait Broker: Channels + SessionStore + Reports + UserSlots + 'static {
    /// Hands `control` to every node that shares the broker, this one included, as
    /// [`Event::Control`]. At most once: a node whose link is down at that moment misses it.
    async fn control(&self, control: &Control) -> Result<(), BrokerError>;

    /// Whether the broker answers now.
    async fn ping(&self) -> Result<(), BrokerError>;

    /// Whether the node's link to the broker is up, as last seen: cheap, without I/O, for the
    /// checks of every handshake. `false` until the first connection, and during an outage.
    fn available(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(seqs: &[u64], after: u64, top: u64) -> bool {
        let messages = seqs.iter().map(|seq| (*seq, Bytes::new())).collect();
        History::new("e".into(), top, after, messages).complete
    }

    #[test]
    fn history_is_complete_only_without_holes() {
        assert!(complete(&[4, 5, 6], 3, 6));
        assert!(!complete(&[5, 6], 3, 6), "4 is missing");
        assert!(!complete(&[4, 6], 3, 6), "5 is missing");
        assert!(!complete(&[4, 5], 3, 6), "6 is missing");
        assert!(!complete(&[], 3, 6), "all removed");
        assert!(complete(&[], 6, 6), "at the top: nothing to miss");
        assert!(complete(&[], 0, 0), "a channel without messages");
        assert!(!complete(&[], 7, 6), "ahead of the channel");
        assert!(
            !complete(&[], u64::MAX, 6),
            "no position is ahead of every channel"
        );
    }
}
