//! Sessions of the node's connections: the registry of live ones (for takeover and drain), and
//! the saver that writes their positions to the broker in batches.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use shared::{CloseCode, Position};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::broker::{Broker, Owner, SessionRecord};
use crate::metrics::Metrics;
use crate::outbound::Outbound;

/// How often positions of connections with new deliveries are saved. A crash loses at most this
/// much of the gateway's record (clients that send their own positions lose nothing), and every
/// save of the node goes in one batch.
const SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// A connection's subscriptions and the last position delivered on each.
#[derive(Default)]
pub struct Positions {
    map: Mutex<BTreeMap<String, Position>>,
    dirty: AtomicBool,
}

impl Positions {
    pub fn new(map: BTreeMap<String, Position>) -> Self {
        Self {
            map: Mutex::new(map),
            dirty: AtomicBool::new(true),
        }
    }

    pub fn contains(&self, channel: &str) -> bool {
        self.map.lock().contains_key(channel)
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn channels(&self) -> Vec<String> {
        self.map.lock().keys().cloned().collect()
    }

    pub fn insert(&self, channel: &str, position: Position) {
        self.map.lock().insert(channel.to_owned(), position);
        self.dirty.store(true, Ordering::Relaxed);
    }

    pub fn remove(&self, channel: &str) -> bool {
        let removed = self.map.lock().remove(channel).is_some();
        self.dirty.store(true, Ordering::Relaxed);
        removed
    }

    /// Moves the positions of subscribed channels; `epoch` where the sequence restarted.
    pub fn advance<'a>(&self, updates: impl Iterator<Item = (&'a str, u64, Option<&'a str>)>) {
        let mut map = self.map.lock();
        let mut moved = false;
        for (channel, seq, epoch) in updates {
            if let Some(position) = map.get_mut(channel) {
                position.seq = seq;
                if let Some(epoch) = epoch {
                    position.epoch = Some(epoch.to_owned());
                }
                moved = true;
            }
        }
        if moved {
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    fn snapshot(&self) -> BTreeMap<String, Position> {
        self.map.lock().clone()
    }
}

/// A session held by a connection of this node.
pub struct LiveSession {
    pub id: String,
    pub subject: String,
    pub owner: Owner,
    pub positions: Arc<Positions>,
    /// To close the connection when another takes the session over, or the node drains.
    pub outbound: Arc<Outbound>,
}

impl LiveSession {
    pub fn record(&self) -> SessionRecord {
        SessionRecord {
            id: self.id.clone(),
            subject: self.subject.clone(),
            subscriptions: self.positions.snapshot(),
            owner: self.owner.clone(),
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
            .outbound
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
            if session.positions.dirty.swap(false, Ordering::Relaxed) || scan == Scan::All {
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
