//! The embedded broker's channels: their sequences and history, publishing (once, with an
//! idempotency key), and which channels the node wants delivered.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{EmbeddedBroker, State};
use crate::broker::{BrokerError, Channels, Delivery, Event, History, HistoryLimits, Published};
use crate::ids;

/// A channel as the embedded broker keeps it: its place in its sequence, and its history.
pub(super) struct ChannelLog {
    pub(super) epoch: Arc<str>,
    pub(super) top: u64,
    /// `(seq, data, published at)`, oldest first.
    pub(super) history: VecDeque<(u64, Bytes, Instant)>,
    /// The last publish or history read: a channel idle for [`CHANNEL_TTL`](crate::broker::CHANNEL_TTL) is forgotten, as
    /// Redis expires its keys (a later publish starts a new epoch).
    pub(super) used: Instant,
}

impl ChannelLog {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            epoch: ids::epoch().into(),
            top: 0,
            history: VecDeque::new(),
            used: now,
        }
    }

    pub(super) fn trim(&mut self, limits: HistoryLimits, now: Instant) {
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

impl EmbeddedBroker {
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
}

#[async_trait]
impl Channels for EmbeddedBroker {
    async fn publish(&self, channel: &str, data: Bytes) -> Result<Published, BrokerError> {
        // Reserve the event's place first, so that seq order and delivery order are the same
        // order: both are decided under the lock in `append`.
        let permit = self.event_slot().await?;
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
        let permit = self.event_slot().await?;
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
        Ok(History::new(log.epoch.clone(), log.top, after, messages))
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.state.lock().subscribed.insert(Arc::from(channel));
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.state.lock().subscribed.remove(channel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::CHANNEL_TTL;

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
