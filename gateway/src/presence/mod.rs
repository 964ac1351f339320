//! Presence, for the channels that match `--presence`: who is subscribed (user, connection,
//! node, since when), how many, and the `join` and `leave` frames of the subscribers that ask
//! for them (`"presence": true` on `subscribe`).
//!
//! A member is one subscription of one connection. Every change of membership goes to the
//! broker from one task per node, in order ([`announcer`]): a subscription that starts or ends
//! is queued at once, and every `--node-report-interval` the task also reports every member the
//! node holds, so that a change lost on the way (a full queue, a broker that failed) is put
//! right within an interval. The broker keeps the members (each expiring three intervals after
//! its node last reported it, so that a dead node leaves no ghost) and, in the same atomic step
//! as each change that is one (a member added that was absent, or removed that was present),
//! hands the `join` or `leave` to every node subscribed to the channel, on the channel's own
//! topic: the frame goes out only on a real change, however often a member is reported.
//!
//! `--presence-max-join-leave` bounds the frames: a channel with more members than that sends
//! none ([`announced`]), since in a room of thousands every connect would be thousands of
//! frames.

pub mod announcer;

use std::collections::BTreeSet;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use shared::ChannelPattern;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::Metrics;
use crate::session::LiveSession;

/// Changes of membership that may wait for the broker: far more than the subscribes and
/// unsubscribes of a report interval at any sane rate. Past it a change is dropped (and
/// counted); the next report puts the broker right.
const QUEUE: usize = 65_536;

/// One subscriber of a presence channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub session: String,
    /// The token's `sub`; empty for an anonymous client.
    pub user: String,
    pub node: String,
    /// The connection's presence id ([`Presence::client_id`]): what clients know it by.
    #[serde(default)]
    pub client: String,
    /// When this node first saw the subscription, in ms since the epoch.
    pub since: u64,
}

/// A member joined or left a channel, as the node tells the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub channel: Arc<str>,
    pub member: Member,
    pub joined: bool,
}

/// Whether a `join` (`joined`) or `leave` after which the channel has `count` members is sent
/// to clients under the bound `max`: when the channel has at most `max` members before it or
/// after it. So the join that takes the channel above `max` is sent (its count is `max + 1`:
/// the client learns that the frames stop), and so is the leave that brings it back to `max`
/// (they start again). `max` 0 sends none. The Redis broker's script keeps the same rule
/// (`scripts.rs`).
pub fn announced(joined: bool, count: u64, max: usize) -> bool {
    let max = max as u64;
    max > 0
        && if joined {
            count <= max + 1
        } else {
            count <= max
        }
}

/// What the announcer task is asked to do.
enum Request {
    Change(Change),
    /// Answer once every change queued before is with the broker.
    Flush(oneshot::Sender<()>),
}

/// The node's presence: which channels keep it, and the queue of its members' changes.
pub struct Presence {
    patterns: Vec<ChannelPattern>,
    node: String,
    /// The key of the connections' presence ids: random per process, so that an id says
    /// nothing about the connection's number.
    ids: RandomState,
    changes: mpsc::Sender<Request>,
    /// Taken by the announcer task when it starts.
    inbox: Mutex<Option<mpsc::Receiver<Request>>>,
    metrics: Arc<Metrics>,
}

impl Presence {
    pub fn new(patterns: &[String], node: String, metrics: Arc<Metrics>) -> Self {
        let (changes, inbox) = mpsc::channel(QUEUE);
        Self {
            patterns: patterns.iter().map(|p| ChannelPattern::new(p)).collect(),
            node,
            ids: RandomState::new(),
            changes,
            inbox: Mutex::new(Some(inbox)),
            metrics,
        }
    }

    /// Whether any channel keeps presence: without `--presence`, nothing here does any work.
    pub fn enabled(&self) -> bool {
        !self.patterns.is_empty()
    }

    /// Whether `channel` keeps presence.
    pub fn covers(&self, channel: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(channel))
    }

    /// The presence id of the connection `conn`: 16 hex digits, the same for as long as the
    /// connection lives, in every channel. Clients are told this, never the session id, which
    /// is what an anonymous client resumes with.
    pub fn client_id(&self, conn: u64) -> String {
        format!("{:016x}", self.ids.hash_one((&self.node, conn)))
    }

    /// The member `session`'s connection is in `channel`.
    pub fn member(&self, session: &LiveSession, since: u64) -> Member {
        Member {
            session: session.id.clone(),
            user: session.subject.clone(),
            node: self.node.clone(),
            client: self.client_id(session.owner.conn),
            since,
        }
    }

    /// A subscription of `session`'s connection to `channel` started.
    pub fn joined(&self, session: &LiveSession, channel: &Arc<str>) {
        if self.covers(channel) {
            let member = self.member(session, now_millis());
            self.queue(channel.clone(), member, true);
        }
    }

    /// A subscription of `session`'s connection to `channel` ended.
    pub fn left(&self, session: &LiveSession, channel: &str) {
        if self.covers(channel) {
            self.queue(Arc::from(channel), self.member(session, 0), false);
        }
    }

    fn queue(&self, channel: Arc<str>, member: Member, joined: bool) {
        let change = Change {
            channel,
            member,
            joined,
        };
        if self.changes.try_send(Request::Change(change)).is_err() {
            let drops = &self.metrics.drops;
            drops.with_label_values(&["presence_queue_full"]).inc();
        }
    }

    /// Waits until the changes queued so far are with the broker (or failed), for at most
    /// `within`: the drain, so that the members of a node that stops leave at once.
    pub async fn flush(&self, within: std::time::Duration) {
        if !self.enabled() {
            return;
        }
        let (done, flushed) = oneshot::channel();
        if self.changes.send(Request::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(within, flushed).await;
        }
    }
}

/// The channels of one connection whose `join` and `leave` frames it asked for. They are kept
/// in its session, so that a resume restores them with the subscriptions.
#[derive(Default)]
pub struct OptIns(Mutex<Vec<Arc<str>>>);

impl OptIns {
    pub fn new(channels: Vec<Arc<str>>) -> Self {
        Self(Mutex::new(channels))
    }

    pub fn add(&self, channel: &Arc<str>) {
        let mut channels = self.0.lock();
        if !channels.iter().any(|c| c == channel) {
            channels.push(channel.clone());
        }
    }

    pub fn remove(&self, channel: &str) {
        self.0.lock().retain(|c| &**c != channel);
    }

    /// The channels, as the session record keeps them.
    pub fn names(&self) -> BTreeSet<String> {
        self.0.lock().iter().map(|c| c.to_string()).collect()
    }
}

pub fn now_millis() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH);
    now.map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_stop_above_the_bound_and_say_so() {
        // Up to 3 members, every change is sent.
        assert!(announced(true, 1, 3));
        assert!(announced(true, 3, 3));
        assert!(announced(false, 2, 3));
        // The join that crosses the bound is sent (count 4 tells the client), later ones not.
        assert!(announced(true, 4, 3));
        assert!(!announced(true, 5, 3));
        // Leaves while above it are not; the one that comes back to the bound is.
        assert!(!announced(false, 4, 3));
        assert!(announced(false, 3, 3));
        // 0: no frames at all.
        assert!(!announced(true, 1, 0));
        assert!(!announced(false, 0, 0));
    }

    #[test]
    fn client_ids_are_stable_per_connection_and_hide_its_number() {
        let presence = Presence::new(&["room.*".into()], "n1".into(), Arc::new(Metrics::new()));
        let id = presence.client_id(7);
        assert_eq!(id.len(), 16);
        assert_eq!(presence.client_id(7), id);
        assert_ne!(presence.client_id(8), id);
        assert_ne!(id, format!("{:016x}", 7));
        // Another process (another key) gives the same connection another id.
        let other = Presence::new(&["room.*".into()], "n1".into(), Arc::new(Metrics::new()));
        assert_ne!(other.client_id(7), id);
        assert!(presence.covers("room.1") && !presence.covers("news"));
    }

    #[test]
    fn opt_ins_are_a_set() {
        let opt_ins = OptIns::default();
        let room: Arc<str> = Arc::from("room.1");
        opt_ins.add(&room);
        opt_ins.add(&room);
        opt_ins.add(&Arc::from("room.2"));
        opt_ins.remove("room.2");
        assert_eq!(opt_ins.names(), BTreeSet::from(["room.1".to_owned()]));
    }
}
