//! The embedded in-process broker: one node, history and sessions in memory, the same
//! semantics as the Redis broker. It is what a node runs without `--redis-url`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    Broker, BrokerError, Control, Delivery, Event, Events, History, HistoryLimits, Owner,
    Published, SessionRecord, CHANNEL_TTL,
};
use crate::ids;
use crate::presence::{announced, Change, Member};

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
}

/// A session as the embedded broker keeps it: its record encoded (as Redis keeps it), which
/// takes a few hundred bytes less than the record's maps and strings, for every session of a
/// node.
struct StoredSession {
    owner: Owner,
    record: Box<str>,
    expires: Instant,
}

impl StoredSession {
    fn new(record: &SessionRecord, expires: Instant) -> Self {
        Self {
            owner: record.owner.clone(),
            record: serde_json::to_string(record)
                .expect("a session record always serialises")
                .into(),
            expires,
        }
    }
}

struct ChannelLog {
    epoch: Arc<str>,
    top: u64,
    /// `(seq, data, published at)`, oldest first.
    history: VecDeque<(u64, Bytes, Instant)>,
    /// The last publish or history read: a channel idle for [`CHANNEL_TTL`] is forgotten, as
    /// Redis expires its keys (a later publish starts a new epoch).
    used: Instant,
}

impl ChannelLog {
    fn new(now: Instant) -> Self {
        Self {
            epoch: ids::epoch().into(),
            top: 0,
            history: VecDeque::new(),
            used: now,
        }
    }

    fn trim(&mut self, limits: HistoryLimits, now: Instant) {
        while self.history.len() > limits.size {
            self.history.pop_front();
        }
        while let Some((_, _, at)) = self.history.front() {
            if now.duration_since(*at) <= limits.ttl {
                break;
            }
            self.history.pop_front();
        }
    }
}

/// The event of a member that joined or left `channel`, which has `count` members after it.
fn presence_event(channel: &str, joined: bool, member: &Member, count: usize) -> Event {
    Event::Presence {
        joined,
        presence: shared::frame::Presence {
            channel: channel.to_owned(),
            user: member.user.clone(),
            client: member.client.clone(),
            count: count as u64,
        },
    }
}

impl EmbeddedBroker {
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

    /// The broker with its sweep running until `stop`.
    pub fn start(
        node: String,
        history_limits: HistoryLimits,
        stop: CancellationToken,
    ) -> (Arc<Self>, Events) {
        let (broker, events) = Self::new(node, history_limits);
        let sweeper = broker.clone();
        tokio::spawn(async move {
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
            ..
        } = &mut *state;
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

    /// Numbers `data`, keeps it in history and hands it to the hub, all under the state's lock.
    fn append(
        &self,
        state: &mut State,
        permit: mpsc::Permit<'_, Event>,
        channel: &str,
        data: Bytes,
        now: Instant,
    ) -> Published {
        let State {
            channels,
            subscribed,
            ..
        } = state;
        let log = match channels.get_mut(channel) {
            Some(log) => log,
            None => channels
                .entry(Arc::from(channel))
                .or_insert_with(|| ChannelLog::new(now)),
        };
        log.used = now;
        log.top += 1;
        log.history.push_back((log.top, data.clone(), now));
        log.trim(self.history_limits, now);
        let published = Published {
            seq: log.top,
            epoch: log.epoch.clone(),
        };
        if let Some(name) = subscribed.get(channel) {
            permit.send(Event::Message(Delivery {
                channel: name.clone(),
                seq: published.seq,
                epoch: published.epoch.clone(),
                data,
            }));
        }
        published
    }

    fn live_session(state: &mut State, id: &str, now: Instant) -> Option<SessionRecord> {
        if state.ended.get(id).is_some_and(|until| *until > now) {
            return None;
        }
        match state.sessions.get(id) {
            Some(session) if session.expires > now => serde_json::from_str(&session.record).ok(),
            Some(_) => {
                state.sessions.remove(id);
                None
            }
            None => None,
        }
    }
}

#[async_trait]
impl Broker for EmbeddedBroker {
    async fn publish(&self, channel: &str, data: Bytes) -> Result<Published, BrokerError> {
        // Reserve the event's place first, so that seq order and delivery order are the same
        // order: both are decided under the lock in `append`.
        let permit = self
            .events
            .reserve()
            .await
            .map_err(|_| BrokerError::Internal("node stopped".into()))?;
        let now = Instant::now();
        Ok(self.append(&mut self.state.lock(), permit, channel, data, now))
    }

    async fn publish_once(
        &self,
        channel: &str,
        data: Bytes,
        key: &str,
        window: Duration,
    ) -> Result<Published, BrokerError> {
        let permit = self
            .events
            .reserve()
            .await
            .map_err(|_| BrokerError::Internal("node stopped".into()))?;
        let now = Instant::now();
        let mut state = self.state.lock();
        let id = (Arc::from(channel), key.to_owned());
        if let Some((first, expires)) = state.once.get(&id) {
            if *expires > now {
                return Ok(first.clone());
            }
        }
        let published = self.append(&mut state, permit, channel, data, now);
        state.once.insert(id, (published.clone(), now + window));
        Ok(published)
    }

    async fn remove_history(&self, channel: &str) -> Result<(), BrokerError> {
        if let Some(log) = self.state.lock().channels.get_mut(channel) {
            log.history.clear();
        }
        Ok(())
    }

    async fn history(&self, channel: &str, after: u64) -> Result<History, BrokerError> {
        let now = Instant::now();
        let mut state = self.state.lock();
        let log = state
            .channels
            .entry(Arc::from(channel))
            .or_insert_with(|| ChannelLog::new(now));
        log.used = now;
        log.trim(self.history_limits, now);
        let messages: Vec<(u64, Bytes)> = log
            .history
            .iter()
            .filter(|(seq, _, _)| *seq > after)
            .map(|(seq, data, _)| (*seq, data.clone()))
            .collect();
        let complete =
            after <= log.top && messages.first().is_none_or(|(seq, _)| *seq == after + 1);
        Ok(History {
            epoch: log.epoch.clone(),
            top: log.top,
            complete: complete && (after == log.top || !messages.is_empty()),
            messages,
        })
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.state.lock().subscribed.insert(Arc::from(channel));
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.state.lock().subscribed.remove(channel);
        Ok(())
    }

    async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, BrokerError> {
        Ok(Self::live_session(
            &mut self.state.lock(),
            id,
            Instant::now(),
        ))
    }

    async fn claim_session(
        &self,
        id: &str,
        owner: &Owner,
        ttl: Duration,
    ) -> Result<Option<SessionRecord>, BrokerError> {
        let now = Instant::now();
        let mut state = self.state.lock();
        let previous = Self::live_session(&mut state, id, now);
        if let Some(previous) = &previous {
            let claimed = SessionRecord {
                owner: owner.clone(),
                ..previous.clone()
            };
            state
                .sessions
                .insert(id.into(), StoredSession::new(&claimed, now + ttl));
        }
        Ok(previous)
    }

    async fn save_sessions(
        &self,
        records: &[SessionRecord],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let now = Instant::now();
        let mut state = self.state.lock();
        for record in records {
            if state
                .ended
                .get(&record.id)
                .is_some_and(|until| *until > now)
            {
                continue;
            }
            let owned_by_other = state
                .sessions
                .get(record.id.as_str())
                .is_some_and(|stored| stored.expires > now && stored.owner != record.owner);
            if !owned_by_other {
                state.sessions.insert(
                    record.id.as_str().into(),
                    StoredSession::new(record, now + ttl),
                );
            }
        }
        Ok(())
    }

    async fn take_over(&self, previous: &Owner, session: &str) -> Result<(), BrokerError> {
        // One node: the previous owner can only be this node, or a node that no longer runs.
        if previous.node == self.node {
            let event = Event::TakenOver {
                session: session.to_owned(),
                conn: previous.conn,
            };
            self.events
                .send(event)
                .await
                .map_err(|_| BrokerError::Internal("node stopped".into()))?;
        }
        Ok(())
    }

    async fn control(&self, control: &Control) -> Result<(), BrokerError> {
        self.events
            .send(Event::Control(control.clone()))
            .await
            .map_err(|_| BrokerError::Internal("node stopped".into()))
    }

    async fn end_session(&self, id: &str, ttl: Duration) -> Result<(), BrokerError> {
        let mut state = self.state.lock();
        state.sessions.remove(id);
        state.ended.insert(id.to_owned(), Instant::now() + ttl);
        Ok(())
    }

    async fn report_channels(
        &self,
        counts: &[(Arc<str>, u64)],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        self.state.lock().reported = (counts.to_vec(), Some(Instant::now() + ttl));
        Ok(())
    }

    async fn channels(&self) -> Result<Vec<(String, u64)>, BrokerError> {
        let state = self.state.lock();
        let (counts, expires) = &state.reported;
        if expires.is_none_or(|at| at <= Instant::now()) {
            return Ok(Vec::new());
        }
        Ok(counts.iter().map(|(c, n)| (c.to_string(), *n)).collect())
    }

    async fn acquire_connection(
        &self,
        user: &str,
        member: &str,
        limit: usize,
        ttl: Duration,
    ) -> Result<bool, BrokerError> {
        let now = Instant::now();
        let mut state = self.state.lock();
        let members = state.user_connections.entry(user.to_owned()).or_default();
        members.retain(|_, until| *until > now);
        if members.len() >= limit {
            return Ok(false);
        }
        members.insert(member.to_owned(), now + ttl);
        Ok(true)
    }

    async fn release_connection(&self, user: &str, member: &str) -> Result<(), BrokerError> {
        let mut state = self.state.lock();
        if let Some(members) = state.user_connections.get_mut(user) {
            members.remove(member);
            if members.is_empty() {
                state.user_connections.remove(user);
            }
        }
        Ok(())
    }

    async fn refresh_connections(
        &self,
        slots: &[(String, String)],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let until = Instant::now() + ttl;
        let mut state = self.state.lock();
        for (user, member) in slots {
            if let Some(held) = state
                .user_connections
                .get_mut(user)
                .and_then(|members| members.get_mut(member))
            {
                *held = until;
            }
        }
        Ok(())
    }

    async fn change_presence(
        &self,
        changes: &[Change],
        ttl: Duration,
        max: usize,
    ) -> Result<(), BrokerError> {
        let now = Instant::now();
        let mut events = Vec::new();
        // Each channel's expired members go first, once per call.
        let mut swept = HashSet::new();
        {
            let mut state = self.state.lock();
            let State {
                presence,
                subscribed,
                ..
            } = &mut *state;
            for change in changes {
                let members = presence.entry(change.channel.clone()).or_default();
                let mut announce = |joined: bool, member: &Member, count: usize| {
                    if subscribed.contains(&change.channel) && announced(joined, count as u64, max)
                    {
                        events.push(presence_event(&change.channel, joined, member, count));
                    }
                };
                let expired: Vec<String> = if swept.insert(change.channel.clone()) {
                    let expired = members.iter().filter(|(_, (_, until))| *until <= now);
                    expired.map(|(client, _)| client.clone()).collect()
                } else {
                    Vec::new()
                };
                for client in expired {
                    if let Some((member, _)) = members.remove(&client) {
                        announce(false, &member, members.len());
                    }
                }
                let client = &change.member.client;
                if change.joined {
                    let entry = (change.member.clone(), now + ttl);
                    if members.insert(client.clone(), entry).is_none() {
                        announce(true, &change.member, members.len());
                    }
                } else if let Some((member, _)) = members.remove(client) {
                    announce(false, &member, members.len());
                }
                if members.is_empty() {
                    presence.remove(&change.channel);
                }
            }
        }
        for event in events {
            self.events
                .send(event)
                .await
                .map_err(|_| BrokerError::Internal("node stopped".into()))?;
        }
        Ok(())
    }

    async fn presence(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<(u64, Vec<Member>), BrokerError> {
        let now = Instant::now();
        let state = self.state.lock();
        let mut members: Vec<Member> = state
            .presence
            .get(channel)
            .into_iter()
            .flat_map(|members| members.values())
            .filter(|(_, until)| *until > now)
            .map(|(member, _)| member.clone())
            .collect();
        // As on Redis, in no order the caller may rely on; sorted here for stable answers.
        members.sort_by(|a, b| a.session.cmp(&b.session));
        let count = members.len() as u64;
        members.truncate(limit);
        Ok((count, members))
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

    #[tokio::test]
    async fn idle_channels_are_forgotten_after_the_channel_ttl() {
        let limits = HistoryLimits {
            size: 10,
            ttl: Duration::from_secs(60),
        };
        let (broker, _events) = EmbeddedBroker::new("n".into(), limits);
        let old = broker
            .publish("old", Bytes::from_static(b"1"))
            .await
            .unwrap();
        broker.history("read", 0).await.unwrap();
        broker.subscribe("watched").await.unwrap();
        broker
            .publish("watched", Bytes::from_static(b"1"))
            .await
            .unwrap();
        assert_eq!(broker.channel_count(), 3);

        let now = Instant::now();
        broker.sweep(now + CHANNEL_TTL - Duration::from_secs(1));
        assert_eq!(broker.channel_count(), 3, "not idle for long enough yet");
        broker.sweep(now + CHANNEL_TTL + Duration::from_secs(1));
        assert_eq!(
            broker.channel_count(),
            1,
            "only the subscribed channel stays"
        );

        // As on Redis: the sequence of a forgotten channel starts again, in a new epoch.
        let again = broker
            .publish("old", Bytes::from_static(b"2"))
            .await
            .unwrap();
        assert_eq!(again.seq, 1);
        assert_ne!(again.epoch, old.epoch);
    }

    #[tokio::test]
    async fn an_idempotency_key_publishes_once_within_its_window() {
        let limits = HistoryLimits {
            size: 10,
            ttl: Duration::from_secs(60),
        };
        let (broker, _events) = EmbeddedBroker::new("n".into(), limits);
        let window = Duration::from_secs(300);
        let data = || Bytes::from_static(b"1");
        let first = broker.publish_once("a", data(), "k", window).await.unwrap();
        let again = broker.publish_once("a", data(), "k", window).await.unwrap();
        assert_eq!(again, first);
        let other_key = broker
            .publish_once("a", data(), "k2", window)
            .await
            .unwrap();
        assert_eq!(other_key.seq, 2);
        let other_channel = broker.publish_once("b", data(), "k", window).await.unwrap();
        assert_eq!(other_channel.seq, 1);
        assert_eq!(broker.history("a", 0).await.unwrap().messages.len(), 2);

        // A window that is over: the key is forgotten, and the same key publishes again.
        let gone = broker
            .publish_once("c", data(), "k", Duration::ZERO)
            .await
            .unwrap();
        let after = broker
            .publish_once("c", data(), "k", Duration::ZERO)
            .await
            .unwrap();
        assert_eq!((gone.seq, after.seq), (1, 2));
    }
}
