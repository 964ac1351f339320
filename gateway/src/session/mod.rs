//! Sessions of the node's connections: the registry of live ones (for takeover and drain), and
//! the saver that writes them to the broker ([`saver`]).

mod saver;

pub use saver::Scan;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use shared::{CloseCode, Position};
use tokio::sync::Notify;
use tracing::warn;

use crate::broker::{Broker, BrokerError, Follows, Owner, SessionRecord};
use crate::connection::Transport;
use crate::metrics::Metrics;
use crate::presence::OptIns;

/// Where one subscription stands: the last seq written to its socket, in `epoch`. The fan-out
/// moves `seq` with one plain store per write, and the saver reads it when it saves: no lock
/// per frame.
#[derive(Debug)]
pub struct Cursor {
    seq: AtomicU64,
    epoch: Mutex<Arc<str>>,
}

impl Cursor {
    pub fn new(position: u64, epoch: Arc<str>) -> Self {
        Self {
            seq: AtomicU64::new(position),
            epoch: Mutex::new(epoch),
        }
    }

    pub fn advance(&self, seq: u64) {
        self.seq.store(seq, Ordering::Relaxed);
    }

    /// The channel's sequence restarted: a new epoch.
    pub fn restart(&self, epoch: &Arc<str>, seq: u64) {
        *self.epoch.lock() = epoch.clone();
        self.seq.store(seq, Ordering::Relaxed);
    }

    /// The epoch first: read the other way round, a restart in between would pair the old
    /// epoch with the new epoch's seq.
    fn get(&self) -> (Arc<str>, u64) {
        let epoch = self.epoch.lock().clone();
        (epoch, self.seq.load(Ordering::Relaxed))
    }

    fn position(&self) -> Position {
        let (epoch, seq) = self.get();
        Position {
            seq,
            epoch: Some(epoch.to_string()),
        }
    }
}

/// A connection's subscriptions, each with its cursor.
#[derive(Default)]
pub struct Positions {
    subscriptions: Mutex<Vec<(Arc<str>, Arc<Cursor>)>>,
    /// The set of subscriptions changed, or a save failed, since the last save.
    dirty: AtomicBool,
    /// The connection ended: its last record is the exact one of [`Sessions::detach`], which
    /// no record that follows the node may overwrite.
    ended: AtomicBool,
    /// The saver's tick when the session's record was last made.
    recorded_at: AtomicU64,
}

impl Positions {
    pub fn contains(&self, channel: &str) -> bool {
        self.subscriptions
            .lock()
            .iter()
            .any(|(c, _)| &**c == channel)
    }

    pub fn len(&self) -> usize {
        self.subscriptions.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn channels(&self) -> Vec<Arc<str>> {
        self.subscriptions
            .lock()
            .iter()
            .map(|(c, _)| c.clone())
            .collect()
    }

    pub fn insert(&self, channel: Arc<str>, cursor: Arc<Cursor>) {
        self.subscriptions.lock().push((channel, cursor));
        self.dirty.store(true, Ordering::Relaxed);
    }

    pub fn remove(&self, channel: &str) -> bool {
        let mut subscriptions = self.subscriptions.lock();
        let before = subscriptions.len();
        subscriptions.retain(|(c, _)| &**c != channel);
        let removed = subscriptions.len() != before;
        self.dirty.store(true, Ordering::Relaxed);
        removed
    }

    /// The positions as the broker keeps them; what they say counts as saved.
    fn snapshot(&self) -> BTreeMap<String, Position> {
        self.dirty.store(false, Ordering::Relaxed);
        self.subscriptions
            .lock()
            .iter()
            .map(|(channel, cursor)| (channel.to_string(), cursor.position()))
            .collect()
    }
}

/// A session held by a connection of this node.
pub struct LiveSession {
    pub id: String,
    pub subject: String,
    pub owner: Owner,
    pub positions: Arc<Positions>,
    /// To close the connection when another takes the session over.
    pub transport: Arc<Transport>,
    /// The subscriptions that asked for presence frames, saved with them.
    pub presence: OptIns,
}

impl LiveSession {
    fn record(&self, follows: Option<Follows>) -> SessionRecord {
        if let Some(follows) = &follows {
            self.positions
                .recorded_at
                .store(follows.tick, Ordering::Relaxed);
        }
        SessionRecord {
            id: self.id.clone(),
            subject: self.subject.clone(),
            subscriptions: self.positions.snapshot(),
            owner: self.owner.clone(),
            presence: self.presence.names(),
            follows,
        }
    }
}

pub struct Sessions {
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    pub ttl: Duration,
    node: String,
    /// This run of the node, which the records that follow its positions name.
    instance: u64,
    /// Saves of the node's positions so far.
    tick: AtomicU64,
    live: Mutex<HashMap<String, Arc<LiveSession>>>,
    /// Records of connections that ended, waiting for the next batch.
    departed: Mutex<Vec<SessionRecord>>,
    /// Sessions to save at once (new, resumed, or with a changed set of subscriptions), so that
    /// a resume right after finds them. Saving them does not scan every live session: a ramp
    /// of N connections would scan N sessions N times.
    urgent: Mutex<Vec<Arc<LiveSession>>>,
    wake: Notify,
}

impl Sessions {
    pub fn new(
        broker: Arc<dyn Broker>,
        metrics: Arc<Metrics>,
        ttl: Duration,
        node: String,
    ) -> Self {
        Self {
            broker,
            metrics,
            ttl,
            node,
            instance: rand::random(),
            tick: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            departed: Mutex::new(Vec::new()),
            urgent: Mutex::new(Vec::new()),
            wake: Notify::new(),
        }
    }

    /// Registers a connection's session. Another connection of this node that held it is
    /// closed with 4009.
    pub fn attach(&self, session: Arc<LiveSession>) {
        let previous = self.live.lock().insert(session.id.clone(), session.clone());
        if let Some(previous) = previous.filter(|p| p.owner != session.owner) {
            self.close_taken_over(&previous);
        }
        self.save_soon(session);
    }

    /// Takes the session `id` over for `owner` when it exists and belongs to `subject`, and
    /// returns it as it was; its previous connection, wherever it is, is closed with 4009 (one on
    /// this node when the session attaches here, one elsewhere through its node's control topic).
    pub async fn claim(
        &self,
        id: &str,
        subject: &str,
        owner: &Owner,
    ) -> Result<Option<SessionRecord>, BrokerError> {
        match self.broker.load_session(id).await? {
            Some(record) if record.subject == subject => {}
            _ => return Ok(None),
        }
        let Some(mut record) = self.broker.claim_session(id, owner, self.ttl).await? else {
            return Ok(None);
        };
        if let Some(follows) = record.follows.take() {
            self.catch_up(&mut record, &follows).await;
        }
        // The connection that holds the session is on this node: what it holds now is newer
        // than any save (a subscription made just before is not saved yet).
        let held = self
            .live
            .lock()
            .get(id)
            .filter(|s| s.owner == record.owner)
            .cloned();
        if let Some(held) = held {
            let now = held.record(None);
            record.subscriptions = now.subscriptions;
            record.presence = now.presence;
        }
        if record.owner.node != owner.node {
            if let Err(e) = self.broker.take_over(&record.owner, id).await {
                warn!(session_owner = %record.owner.node, error = %e, "could not reach the session's previous node");
            }
        }
        Ok(Some(record))
    }

    /// Moves the record's positions on to those its node saved after it, where further.
    async fn catch_up(&self, record: &mut SessionRecord, follows: &Follows) {
        let channels: Vec<&str> = record.subscriptions.keys().map(String::as_str).collect();
        let saved = match self.broker.load_positions(&follows.node, &channels).await {
            Ok(Some(saved)) => saved,
            Ok(None) => return,
            Err(e) => {
                // The record's own positions are never ahead: a repeat at worst.
                warn!(node = %follows.node, error = %e, "reading the node's positions failed");
                return;
            }
        };
        if saved.instance != follows.instance || saved.tick <= follows.tick {
            return;
        }
        for (channel, position) in &mut record.subscriptions {
            if let Some(further) = saved.channels.get(channel) {
                if further.epoch == position.epoch && further.seq > position.seq {
                    position.seq = further.seq;
                }
            }
        }
    }

    /// A connection ended: its session is saved one last time, and outlives it for the TTL.
    pub fn detach(&self, session: &LiveSession) {
        let mut live = self.live.lock();
        if live
            .get(&session.id)
            .is_some_and(|s| s.owner == session.owner)
        {
            live.remove(&session.id);
        }
        drop(live);
        session.positions.ended.store(true, Ordering::Relaxed);
        self.departed.lock().push(session.record(None));
        self.wake.notify_one();
    }

    /// Another node resumed a session: close its connection here, if it is still here.
    pub fn taken_over(&self, session: &str, conn: u64) {
        let mut live = self.live.lock();
        let Some(held) = live.get(session).filter(|s| s.owner.conn == conn).cloned() else {
            return;
        };
        live.remove(session);
        drop(live);
        self.close_taken_over(&held);
    }

    fn close_taken_over(&self, session: &LiveSession) {
        self.metrics.sessions_taken_over.inc();
        session
            .transport
            .close(CloseCode::TakenOver, "session taken over");
    }

    /// Asks for a save of `session` now, batched with others that come meanwhile: after a
    /// subscribe or an unsubscribe.
    pub fn save_soon(&self, session: Arc<LiveSession>) {
        self.urgent.lock().push(session);
        self.wake.notify_one();
    }

    /// Every live session, for the drain.
    pub fn live(&self) -> Vec<Arc<LiveSession>> {
        self.live.lock().values().cloned().collect()
    }
}
