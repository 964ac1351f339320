//! Sessions of the node's connections: the registry of live ones (for takeover and drain), and
//! the saver that writes them to the broker in batches.
//!
//! A broadcast moves the position of every subscriber, so saving each session whose position
//! moved costs the broker one write per connection per broadcast: at 250,000 connections that
//! was the bound of the whole cluster. Instead, a live session's record is written when its
//! subscriptions change (and to refresh its expiry), marked as following its node; every few
//! seconds the node saves, once, its own position on each channel: the lowest of its
//! subscribers' there. A resume reads both and takes the further one. Both are never ahead of
//! where the session stood, so the worst a node crash does is a repeat (of the last few
//! seconds, or back to the node's slowest subscriber of the channel); a connection that ends
//! saves its exact positions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use shared::{CloseCode, Position};
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::broker::{Broker, BrokerError, Follows, NodePositions, Owner, SessionRecord};
use crate::connection::Transport;
use crate::metrics::Metrics;
use crate::presence::OptIns;

/// How often the node's positions are saved. A crash repeats at most about this much to a
/// client that resumes without its own positions.
const SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// Most session records in one call to the broker: a failure retries only those from the
/// failed call on, and no call is so long that it times out on a busy broker.
const SAVE_CHUNK: usize = 2000;

/// Where one subscription stands: the last seq written to its socket, in `epoch`. The fan-out
/// moves `seq` with one plain store per write, and the saver reads it when it saves: no lock
/// per frame.
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

/// What a save takes, besides the departed and urgent sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    Urgent,
    /// The node's positions, and the live sessions they do not cover (a failed save, a
    /// subscription in another epoch than its channel's on this node), and this tick's share
    /// of the sessions whose expiry in the broker is due to be pushed back.
    Changed,
    /// The node's positions, and every live session: the drain.
    All,
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

    /// Saves the departed and urgent sessions, and then, as `scan` asks, no other, or the
    /// node's positions with the live sessions they do not cover, or with every live session.
    pub async fn save(&self, scan: Scan) {
        let mut batch: Vec<(SessionRecord, Option<Arc<LiveSession>>)> = Vec::new();
        batch.extend(self.departed.lock().drain(..).map(|record| (record, None)));
        // Made before the tick below moves on, so that the node's positions of that tick,
        // which count these sessions, may carry them further.
        let follows = self.follows();
        let urgent = std::mem::take(&mut *self.urgent.lock());
        for session in urgent {
            if !session.positions.ended.load(Ordering::Relaxed) {
                batch.push((session.record(Some(follows.clone())), Some(session)));
            }
        }
        let mut positions = None;
        if scan != Scan::Urgent {
            self.tick.fetch_add(1, Ordering::SeqCst);
            let follows = self.follows();
            let live = self.live();
            let (channels, uncovered) = node_positions(&live);
            for session in live {
                if scan == Scan::All
                    || self.refreshes(follows.tick, &session)
                    || session.positions.dirty.load(Ordering::Relaxed)
                    || uncovered.contains(&session.id)
                {
                    batch.push((session.record(Some(follows.clone())), Some(session)));
                }
            }
            positions = Some(NodePositions {
                instance: self.instance,
                tick: follows.tick,
                channels,
            });
        }
        self.save_records(batch).await;
        if let Some(positions) = positions {
            match self
                .broker
                .save_positions(&self.node, &positions, self.ttl)
                .await
            {
                Ok(()) => {
                    let saves = self.metrics.session_saves.with_label_values(&["positions"]);
                    saves.inc();
                }
                Err(e) => warn!(error = %e, "saving the node's positions failed"),
            }
        }
    }

    fn follows(&self) -> Follows {
        Follows {
            node: self.node.clone(),
            instance: self.instance,
            tick: self.tick.load(Ordering::SeqCst),
        }
    }

    /// Saves `batch` a chunk at a time; from a chunk that fails on, the departed records wait
    /// for the next save, and the live sessions are saved again then.
    async fn save_records(&self, batch: Vec<(SessionRecord, Option<Arc<LiveSession>>)>) {
        let mut chunks = batch.chunks(SAVE_CHUNK);
        while let Some(chunk) = chunks.next() {
            let records: Vec<SessionRecord> = chunk.iter().map(|(r, _)| r.clone()).collect();
            let Err(e) = self.broker.save_sessions(&records, self.ttl).await else {
                let saves = self.metrics.session_saves.with_label_values(&["record"]);
                saves.inc_by(records.len() as u64);
                continue;
            };
            let unsaved: Vec<_> = std::iter::once(chunk).chain(chunks).flatten().collect();
            warn!(sessions = unsaved.len(), error = %e, "saving sessions failed; retrying");
            let mut departed = self.departed.lock();
            for (record, session) in unsaved {
                match session {
                    Some(session) => session.positions.dirty.store(true, Ordering::Relaxed),
                    None => departed.push(record.clone()),
                }
            }
            return;
        }
    }

    /// Saves the node's positions every few seconds, and every session often enough that none
    /// of the connected ones expires in the broker; urgent saves in between, as they come.
    pub async fn run_saver(self: Arc<Self>, stop: CancellationToken) {
        // An interval, not a sleep restarted after each urgent save: during a ramp those come
        // every few milliseconds, and the positions would never be saved.
        let mut every = tokio::time::interval(SAVE_INTERVAL);
        every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            let scan = tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => Scan::Changed,
                _ = self.wake.notified() => Scan::Urgent,
            };
            self.save(scan).await;
        }
    }

    /// Whether the save at `tick` refreshes `session`: when its record is a third of the TTL
    /// old. Each session's turn comes a third of the TTL after its own last save, so that the
    /// refreshes spread as the connections came, and no tick saves every session at once (at
    /// 20,000 sessions a node, and dozens of nodes started together, that was a burst the
    /// broker took seconds to absorb).
    fn refreshes(&self, tick: u64, session: &LiveSession) -> bool {
        let ticks = (self.ttl / 3).as_millis() / SAVE_INTERVAL.as_millis();
        let recorded_at = session.positions.recorded_at.load(Ordering::Relaxed);
        tick.saturating_sub(recorded_at) >= (ticks as u64).max(1)
    }
}

/// The node's position on each channel of `live`: the lowest of its subscribers', in the epoch
/// most of them are in; and the sessions with a subscription in another epoch (in the middle of
/// a restart), which those positions do not cover.
fn node_positions(live: &[Arc<LiveSession>]) -> (BTreeMap<String, Position>, HashSet<String>) {
    /// Per epoch: the lowest seq, and how many subscribers are there.
    type Epochs = HashMap<Arc<str>, (u64, usize)>;
    let mut lowest: HashMap<Arc<str>, Epochs> = HashMap::new();
    let mut cursors = Vec::new();
    for session in live {
        for (channel, cursor) in session.positions.subscriptions.lock().iter() {
            let (epoch, seq) = cursor.get();
            let entry = lowest
                .entry(channel.clone())
                .or_default()
                .entry(epoch.clone())
                .or_insert((seq, 0));
            entry.0 = entry.0.min(seq);
            entry.1 += 1;
            cursors.push((&session.id, channel.clone(), epoch));
        }
    }
    let chosen: HashMap<Arc<str>, (Arc<str>, u64)> = lowest
        .into_iter()
        .filter_map(|(channel, epochs)| {
            let (epoch, (seq, _)) = epochs.into_iter().max_by_key(|(_, (_, n))| *n)?;
            Some((channel, (epoch, seq)))
        })
        .collect();
    let uncovered = cursors
        .into_iter()
        .filter(|(_, channel, epoch)| chosen.get(channel).is_some_and(|(e, _)| e != epoch))
        .map(|(id, _, _)| id.clone())
        .collect();
    let positions = chosen
        .into_iter()
        .map(|(channel, (epoch, seq))| {
            let position = Position {
                seq,
                epoch: Some(epoch.to_string()),
            };
            (channel.to_string(), position)
        })
        .collect();
    (positions, uncovered)
}

#[cfg(test)]
mod tests {
    use prometheus::IntGauge;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::broker::embedded::EmbeddedBroker;
    use crate::broker::HistoryLimits;
    use crate::connection::BacklogGauges;

    fn sessions(broker: Arc<dyn Broker>) -> Sessions {
        let metrics = Arc::new(Metrics::new());
        Sessions::new(broker, metrics, Duration::from_secs(60), "n1".into())
    }

    fn broker() -> Arc<dyn Broker> {
        let limits = HistoryLimits {
            size: 10,
            ttl: Duration::from_secs(60),
        };
        EmbeddedBroker::new("n1".into(), limits).0
    }

    async fn transport() -> (Arc<Transport>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let gauges = BacklogGauges {
            bytes: IntGauge::new("b", "b").unwrap(),
            connections: IntGauge::new("c", "c").unwrap(),
        };
        let transport = Transport::new(accepted.unwrap().0, usize::MAX, gauges);
        (Arc::new(transport), client.unwrap())
    }

    /// A live session of connection `conn` on `channel`, delivered up to `seq`.
    async fn live(
        id: &str,
        conn: u64,
        channel: &str,
        seq: u64,
    ) -> (Arc<LiveSession>, Arc<Cursor>, TcpStream) {
        let (transport, peer) = transport().await;
        let positions = Arc::new(Positions::default());
        let cursor = Arc::new(Cursor::new(seq, Arc::from("e1")));
        positions.insert(Arc::from(channel), cursor.clone());
        let session = Arc::new(LiveSession {
            id: id.into(),
            subject: String::new(),
            owner: Owner {
                node: "n1".into(),
                conn,
            },
            positions,
            transport,
            presence: OptIns::new(Vec::new()),
        });
        (session, cursor, peer)
    }

    async fn resumed_at(sessions: &Sessions, id: &str) -> Position {
        let owner = Owner {
            node: "n2".into(),
            conn: 99,
        };
        let record = sessions.claim(id, "", &owner).await.unwrap().unwrap();
        record.subscriptions["news"].clone()
    }

    fn at(seq: u64) -> Position {
        Position {
            seq,
            epoch: Some("e1".into()),
        }
    }

    #[tokio::test]
    async fn a_resume_takes_the_node_position_saved_after_the_record() {
        let sessions = sessions(broker());
        let (session, cursor, _peer) = live("s1", 1, "news", 5).await;
        sessions.attach(session);
        sessions.save(Scan::Urgent).await;
        cursor.advance(9);
        sessions.save(Scan::Changed).await;
        cursor.advance(12);
        assert_eq!(
            resumed_at(&sessions, "s1").await,
            at(9),
            "the last saved node position, not the record's 5 (and 12 was never saved)"
        );
    }

    #[tokio::test]
    async fn a_node_position_older_than_the_record_is_not_taken() {
        let sessions = sessions(broker());
        let (ahead, _, _a) = live("ahead", 1, "news", 9).await;
        sessions.attach(ahead);
        sessions.save(Scan::Changed).await;
        // Subscribed after that save, replaying from 2: the node's 9 is past it.
        let (behind, _, _b) = live("behind", 2, "news", 2).await;
        sessions.attach(behind);
        sessions.save(Scan::Urgent).await;
        assert_eq!(resumed_at(&sessions, "behind").await, at(2));
    }

    #[tokio::test]
    async fn the_node_position_is_its_slowest_subscriber() {
        let sessions = sessions(broker());
        let (fast, fast_cursor, _a) = live("fast", 1, "news", 1).await;
        let (slow, slow_cursor, _b) = live("slow", 2, "news", 1).await;
        sessions.attach(fast);
        sessions.attach(slow);
        sessions.save(Scan::Urgent).await;
        fast_cursor.advance(30);
        slow_cursor.advance(20);
        sessions.save(Scan::Changed).await;
        assert_eq!(
            resumed_at(&sessions, "fast").await,
            at(20),
            "a repeat, no loss"
        );
    }

    #[tokio::test]
    async fn another_run_of_the_node_is_not_followed() {
        let broker = broker();
        let first = sessions(broker.clone());
        let (session, _, _peer) = live("s1", 1, "news", 5).await;
        first.attach(session);
        first.save(Scan::Urgent).await;
        // The node restarted under its name; its subscriber of `news` is further on.
        let second = sessions(broker);
        let (other, _, _p) = live("s2", 1, "news", 40).await;
        second.attach(other);
        second.save(Scan::Changed).await;
        second.save(Scan::Changed).await;
        assert_eq!(resumed_at(&second, "s1").await, at(5));
    }

    #[tokio::test]
    async fn a_connection_that_ended_keeps_its_exact_positions() {
        let sessions = sessions(broker());
        let (session, cursor, _peer) = live("s1", 1, "news", 5).await;
        let (other, other_cursor, _p) = live("s2", 2, "news", 5).await;
        sessions.attach(session.clone());
        sessions.attach(other);
        sessions.save(Scan::Urgent).await;
        cursor.advance(7);
        sessions.detach(&session);
        // A save asked for before the end must not overwrite the exact record.
        sessions.save_soon(session);
        other_cursor.advance(50);
        sessions.save(Scan::Changed).await;
        let resumed = resumed_at(&sessions, "s1").await;
        assert_eq!(resumed, at(7));
    }

    #[tokio::test]
    async fn a_subscriber_in_another_epoch_is_saved_on_its_own() {
        let sessions = sessions(broker());
        let (a, _, _pa) = live("a", 1, "news", 5).await;
        let (b, _, _pb) = live("b", 2, "news", 5).await;
        let (c, c_cursor, _pc) = live("c", 3, "news", 5).await;
        for session in [a, b, c] {
            sessions.attach(session);
        }
        sessions.save(Scan::Urgent).await;
        c_cursor.restart(&Arc::from("e2"), 3);
        sessions.save(Scan::Changed).await;
        let owner = Owner {
            node: "n2".into(),
            conn: 99,
        };
        let record = sessions.claim("c", "", &owner).await.unwrap().unwrap();
        let expected = Position {
            seq: 3,
            epoch: Some("e2".into()),
        };
        assert_eq!(record.subscriptions["news"], expected);
    }

    #[tokio::test]
    async fn a_session_is_refreshed_a_third_of_the_ttl_after_its_last_save() {
        let sessions = sessions(broker());
        let records = sessions
            .metrics
            .session_saves
            .with_label_values(&["record"]);
        let (session, cursor, _peer) = live("s1", 1, "news", 5).await;
        sessions.attach(session);
        sessions.save(Scan::Urgent).await;
        assert_eq!(records.get(), 1);
        // A third of the 60 s TTL is 10 saves of 2 s.
        for seq in 6..15 {
            cursor.advance(seq);
            sessions.save(Scan::Changed).await;
        }
        assert_eq!(records.get(), 1, "moved positions alone write no record");
        sessions.save(Scan::Changed).await;
        assert_eq!(records.get(), 2, "the refresh");
    }
}
