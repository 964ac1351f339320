//! The embedded in-process broker: one node, history and sessions in memory, the same
//! semantics as the Redis broker. It is what a node runs without `--redis-url`.
//!
//! One state behind one lock, kept by job: [`channels`] (sequences, history, publishing),
//! [`sessions`] (records, owners, node positions), [`reports`] (channel counts, presence),
//! [`user_connections`]; here the state itself, its sweep, and the [`Broker`] trait, which hands
//! each call to the module of its job.

mod channels;
mod reports;
mod sessions;
mod user_connections;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use self::channels::ChannelLog;
use self::sessions::StoredSession;
use super::{
    Broker, BrokerError, Control, Event, Events, HistoryLimits, NodePositions, Published,
    CHANNEL_TTL,
};
use crate::presence::Member;
use crate::shutdown::Tasks;

/// How many events may wait for the hub before publishers wait: enough to absorb a burst while
/// the hub fans out one message to many subscribers.
const EVENT_QUEUE: usize = 4096;

/// How often expired history, sessions and idle channels are dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

pub struct EmbeddedBroker {
    node: String,
    history_limits: HistoryLimits,
    state: Mutex<State>,
    events: mpsc::Sender<Event>,
}

#[derive(Default)]
struct State {
    channels: HashMap<Arc<str>, ChannelLog>,
    /// Channels the node wants delivered.
    subscribed: HashSet<Arc<str>>,
    sessions: HashMap<Box<str>, StoredSession>,
    /// Idempotent publishes: `(channel, key)` to the first publish's place, until it expires.
    once: HashMap<(Arc<str>, String), (Published, Instant)>,
    /// Sessions ended by a back end, until they could no longer be saved: none is resumed or
    /// saved again.
    ended: HashMap<String, Instant>,
    /// The node's last report of its channels, and when it expires.
    reported: (Vec<(Arc<str>, u64)>, Option<Instant>),
    /// Each user's connections, and when each expires unless refreshed.
    user_connections: HashMap<String, HashMap<String, Instant>>,
    /// Members of presence channels, by channel and connection (presence id), each with its
    /// expiry.
    presence: HashMap<Arc<str>, HashMap<String, (Member, Instant)>>,
    /// Each node's last saved positions, and when they expire.
    positions: HashMap<String, (NodePositions, Instant)>,
}

impl EmbeddedBroker {
    /// Hands `event` to the node, in order.
    async fn tell(&self, event: Event) -> Result<(), BrokerError> {
        self.events.send(event).await.map_err(|_| node_stopped())
    }

    /// A place in the node's events, taken before the event it will hold is decided.
    async fn event_slot(&self) -> Result<mpsc::Permit<'_, Event>, BrokerError> {
        self.events.reserve().await.map_err(|_| node_stopped())
    }

    /// The broker, and the events it sends to the node.
    pub fn new(node: String, history_limits: HistoryLimits) -> (Arc<Self>, Events) {
        let (events, rx) = mpsc::channel(EVENT_QUEUE);
        let broker = Arc::new(Self {
            node,
            history_limits,
            state: Mutex::new(State::default()),
            events,
        });
        (broker, rx)
    }

    /// The broker with its sweep running on `tasks` until they stop.
    pub fn start(
        node: String,
        history_limits: HistoryLimits,
        tasks: &Tasks,
    ) -> (Arc<Self>, Events) {
        let (broker, events) = Self::new(node, history_limits);
        let sweeper = broker.clone();
        let stop = tasks.stop();
        tasks.spawn("embedded broker sweep", async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(SWEEP_INTERVAL) => sweeper.sweep(Instant::now()),
                }
            }
        });
        (broker, events)
    }

    /// Drops expired history and sessions, and channels idle for [`CHANNEL_TTL`], so that an
    /// idle gateway gives its memory back. A channel the node is subscribed to is kept.
    pub fn sweep(&self, now: Instant) {
        let mut state = self.state.lock();
        let limits = self.history_limits;
        let State {
            channels,
            subscribed,
            sessions,
            once,
            ended,
            user_connections,
            presence,
            positions,
            ..
        } = &mut *state;
        positions.retain(|_, (_, expires)| *expires > now);
        once.retain(|_, (_, expires)| *expires > now);
        ended.retain(|_, until| *until > now);
        user_connections.retain(|_, members| {
            members.retain(|_, until| *until > now);
            !members.is_empty()
        });
        presence.retain(|_, members| {
            members.retain(|_, (_, until)| *until > now);
            !members.is_empty()
        });
        channels.retain(|name, log| {
            log.trim(limits, now);
            subscribed.contains(name) || now.duration_since(log.used) < CHANNEL_TTL
        });
        sessions.retain(|_, session| session.expires > now);
    }

    /// How many channels the broker keeps a record of.
    pub fn channel_count(&self) -> usize {
        self.state.lock().channels.len()
    }
}

fn node_stopped() -> BrokerError {
    BrokerError::Internal("node stopped".into())
}

/// The broker's other traits are implemented in the modules of their jobs.
#[async_trait]
impl Broker for EmbeddedBroker {
    async fn control(&self, control: &Control) -> Result<(), BrokerError> {
        self.tell(Event::Control(control.clone())).await
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    fn available(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_sweep_runs_on_the_node_tasks_until_they_stop() {
        let limits = HistoryLimits {
            size: 10,
            ttl: Duration::from_secs(60),
        };
        let tasks = Tasks::default();
        let (_broker, _events) = EmbeddedBroker::start("n".into(), limits, &tasks);
        assert_eq!(tasks.running(), [("embedded broker sweep", 1)]);
        tasks.stop_all(Duration::from_secs(1)).await;
        assert!(tasks.running().is_empty());
    }
}
