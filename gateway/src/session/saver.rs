//! The saver: writes the node's sessions to the broker in batches.
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
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shared::Position;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{LiveSession, Sessions};
use crate::broker::{Follows, NodePositions, SessionRecord};

/// How often the node's positions are saved. A crash repeats at most about this much to a
/// client that resumes without its own positions.
const SAVE_INTERVAL: Duration = Duration::from_secs(2);

/// Most session records in one call to the broker: a failure retries only those from the
/// failed call on, and no call is so long that it times out on a busy broker.
const SAVE_CHUNK: usize = 2000;

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

impl Sessions {
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
    use crate::broker::{Broker, HistoryLimits, Owner};
    use crate::connection::{BacklogGauges, Transport};
    use crate::metrics::Metrics;
    use crate::presence::OptIns;
    use crate::session::{Cursor, Positions};

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

    /// Where a resume of `id` on another node (`n2`, on the same broker) starts.
    async fn resumed_at(sessions: &Sessions, id: &str) -> Position {
        let elsewhere = Sessions::new(
            sessions.broker.clone(),
            Arc::new(Metrics::new()),
            Duration::from_secs(60),
            "n2".into(),
        );
        let owner = Owner {
            node: "n2".into(),
            conn: 99,
        };
        let record = elsewhere.claim(id, "", &owner).await.unwrap().unwrap();
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

    #[tokio::test]
    async fn a_resume_on_the_same_node_sees_what_was_not_saved_yet() {
        let sessions = sessions(broker());
        let (session, cursor, _peer) = live("s1", 1, "news", 5).await;
        sessions.attach(session.clone());
        sessions.save(Scan::Urgent).await;
        cursor.advance(8);
        // Subscribed after the last save, and resumed before the next one.
        session.positions.insert(
            Arc::from("sport"),
            Arc::new(Cursor::new(3, Arc::from("e1"))),
        );
        let owner = Owner {
            node: "n1".into(),
            conn: 2,
        };
        let record = sessions.claim("s1", "", &owner).await.unwrap().unwrap();
        assert_eq!(record.subscriptions["news"], at(8));
        assert_eq!(record.subscriptions["sport"], at(3));
    }
}
