//! Sessions of the node's connections: the registry of live ones (for takeover and drain), and
//! the saver that writes their positions to the broker in batches.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use shared::{CloseCode, Position};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::broker::{Broker, BrokerError, Owner, SessionRecord};
use crate::connection::Transport;
use crate::metrics::Metrics;
use crate::presence::OptIns;

/// How often positions of connections with new deliveries are saved. A crash loses at most this
/// much of the gateway's record (clients that send their own positions lose nothing), and every
/// save of the node goes in one batch.
const SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// Where one subscription stands: the last seq written to its socket, in `epoch`. The fan-out
/// moves `seq` with one plain store per write, and the saver reads it when it saves: no lock
/// per frame.
pub struct Cursor {
    seq: AtomicU64,
    /// `seq` when the session was last saved.
    saved: AtomicU64,
    epoch: Mutex<Arc<str>>,
}

impl Cursor {
    pub fn new(position: u64, epoch: Arc<str>) -> Self {
        Self {
            seq: AtomicU64::new(position),
            saved: AtomicU64::new(u64::MAX),
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

    fn position(&self) -> Position {
        Position {
            seq: self.seq.load(Ordering::Relaxed),
            epoch: Some(self.epoch.lock().to_string()),
        }
    }

    fn moved(&self) -> bool {
        self.seq.load(Ordering::Relaxed) != self.saved.load(Ordering::Relaxed)
    }
}

/// A connection's subscriptions, each with its cursor.
#[derive(Default)]
pub struct Positions {
    subscriptions: Mutex<Vec<(Arc<str>, Arc<Cursor>)>>,
    /// The set of subscriptions changed, or a save failed, since the last save.
    dirty: AtomicBool,
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

    /// Whether a save would write anything new.
    fn changed(&self) -> bool {
        self.dirty.load(Ordering::Relaxed)
            || self.subscriptions.lock().iter().any(|(_, c)| c.moved())
    }

    /// The positions as the broker keeps them; what they say counts as saved.
    fn snapshot(&self) -> BTreeMap<String, Position> {
        self.dirty.store(false, Ordering::Relaxed);
        self.subscriptions
            .lock()
            .iter()
            .map(|(channel, cursor)| {
                let position = cursor.position();
                cursor.saved.store(position.seq, Ordering::Relaxed);
                (channel.to_string(), position)
            })
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
    pub fn record(&self) -> SessionRecord {
        SessionRecord {
            id: self.id.clone(),
            subject: self.subject.clone(),
            subscriptions: self.positions.snapshot(),
            owner: self.owner.clone(),
            presence: self.presence.names(),
        }
    }
}

/// Which live sessions a save takes, besides the departed and urgent ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    Urgent,
    /// Those whose positions moved since the last save.
    Changed,
    /// Every one: refreshes their expiry in the broker, and the drain.
    All,
}

pub struct Sessions {
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    pub ttl: Duration,
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
    pub fn new(broker: Arc<dyn Broker>, metrics: Arc<Metrics>, ttl: Duration) -> Self {
        Self {
            broker,
            metrics,
            ttl,
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
        let Some(record) = self.broker.claim_session(id, owner, self.ttl).await? else {
            return Ok(None);
        };
        if record.owner.node != owner.node {
            if let Err(e) = self.broker.take_over(&record.owner, id).await {
                warn!(session_owner = %record.owner.node, error = %e, "could not reach the session's previous node");
            }
        }
        Ok(Some(record))
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
        self.departed.lock().push(session.record());
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

    /// Saves, in one batch, the departed and urgent sessions, and then, as `scan` asks, no
    /// other, the live sessions with unsaved positions, or every live session.
    pub async fn save(&self, scan: Scan) {
        let mut batch = std::mem::take(&mut *self.departed.lock());
        let departed = batch.len();
        let urgent = std::mem::take(&mut *self.urgent.lock());
        batch.extend(urgent.iter().map(|session| session.record()));
        let live = match scan {
            Scan::Urgent => Vec::new(),
            Scan::Changed | Scan::All => self.live(),
        };
        for session in &live {
            if scan == Scan::All || session.positions.changed() {
                batch.push(session.record());
            }
        }
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.broker.save_sessions(&batch, self.ttl).await {
            warn!(sessions = batch.len(), error = %e, "saving sessions failed; retrying");
            self.departed.lock().extend(batch.drain(..departed));
            for session in live.iter().chain(&urgent) {
                session.positions.dirty.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Saves changed sessions every few seconds, and every session often enough that none of
    /// the connected ones expires in the broker.
    pub async fn run_saver(self: Arc<Self>, stop: CancellationToken) {
        let refresh_every = (self.ttl / 3).max(SAVE_INTERVAL);
        let mut last_refresh = tokio::time::Instant::now();
        loop {
            let woken = tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => true,
                _ = tokio::time::sleep(SAVE_INTERVAL) => false,
            };
            let scan = if woken {
                Scan::Urgent
            } else if last_refresh.elapsed() >= refresh_every {
                last_refresh = tokio::time::Instant::now();
                Scan::All
            } else {
                Scan::Changed
            };
            self.save(scan).await;
        }
    }
}
