//! The channel hub: the node's local subscriptions, and the fan-out of each message the broker
//! delivers to every local subscriber of its channel.
//!
//! A message is encoded once into the text of its frame, and the same bytes go to every
//! subscriber's outbound queue. The hub also keeps each channel continuous: it drops repeats, and
//! repairs a gap in seq from history before it passes later messages on.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use indexmap::IndexMap;
use parking_lot::Mutex;
use shared::frame::encode_message;
use shared::{CloseCode, Position, ServerFrame};
use tokio::sync::Mutex as AsyncMutex;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tracing::{debug, warn};

use crate::broker::{Broker, BrokerError, Delivery};
use crate::metrics::{InProgress, Metrics};
use crate::outbound::{Frame, MessageFrame, Outbound};

/// How many live messages a subscription may hold while it replays history: far more than a
/// history read takes at any sane publish rate, and a bound on a client that stalls it.
const MAX_HELD: usize = 10_000;

pub struct Hub {
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    channels: Mutex<HashMap<Arc<str>, Channel>>,
    /// Serialises the node's broker subscribe and unsubscribe calls, so that the last local
    /// unsubscribe of a channel cannot undo the first subscribe of its next subscriber.
    links: AsyncMutex<()>,
}

struct Channel {
    name: Arc<str>,
    /// Whether the broker delivers this channel to the node.
    linked: bool,
    /// The sequence the hub passes on, once it knows it.
    epoch: Option<Arc<str>>,
    /// The last seq passed on to subscribers.
    last_seq: u64,
    /// Messages held back while a gap is repaired from history.
    repairing: Option<Vec<Delivery>>,
    subscribers: IndexMap<u64, Subscriber>,
}

struct Subscriber {
    outbound: Arc<Outbound>,
    /// Live messages held while the subscription replays history; `None` once live.
    held: Option<Vec<Arc<MessageFrame>>>,
    /// The last seq this subscriber was given. A message the broker had already numbered when
    /// the subscription read its history can still reach the hub after activation: it was
    /// replayed, and is not passed on again.
    after: u64,
}

/// A subscription that is registered for live messages and has read its history, but has not
/// yet sent it: the caller sends the `subscribed` (or `welcome`) frame first, then activates it.
#[derive(Debug)]
pub struct Prepared {
    pub channel: Arc<str>,
    pub epoch: Arc<str>,
    /// The channel's last seq when the subscription started.
    pub seq: u64,
    pub recovered: bool,
    replay: Vec<(u64, Bytes)>,
}

impl Prepared {
    /// The reply to the `subscribe` that asked for this subscription.
    pub fn subscribed_frame(&self, id: Option<shared::frame::Id>) -> ServerFrame {
        ServerFrame::Subscribed {
            id,
            channel: self.channel.to_string(),
            seq: self.seq,
            epoch: self.epoch.to_string(),
            recovered: self.recovered,
        }
    }

    /// The seq of the first message the subscription replays.
    pub fn first_replayed(&self) -> Option<u64> {
        self.replay.first().map(|(seq, _)| *seq)
    }
}

impl Hub {
    pub fn new(broker: Arc<dyn Broker>, metrics: Arc<Metrics>) -> Self {
        Self {
            broker,
            metrics,
            channels: Mutex::new(HashMap::new()),
            links: AsyncMutex::new(()),
        }
    }

    /// How many channels have local subscribers.
    pub fn channel_count(&self) -> usize {
        self.channels.lock().len()
    }

    /// Registers `conn` for the channel's live messages (held back for now), then reads what it
    /// asked to replay. No message can fall between history and live: whatever is published
    /// after the registration is held, and activation passes on only what history did not have.
    pub async fn prepare(
        &self,
        conn: u64,
        outbound: &Arc<Outbound>,
        channel: &str,
        since: Option<&Position>,
    ) -> Result<Prepared, BrokerError> {
        let name = {
            let mut channels = self.channels.lock();
            let entry = match channels.get_mut(channel) {
                Some(entry) => entry,
                None => {
                    let name: Arc<str> = Arc::from(channel);
                    channels
                        .entry(name.clone())
                        .or_insert_with(|| Channel::new(name))
                }
            };
            entry.subscribers.insert(
                conn,
                Subscriber {
                    outbound: outbound.clone(),
                    held: Some(Vec::new()),
                    after: 0,
                },
            );
            entry.name.clone()
        };
        let history = match self.link(&name).await {
            Ok(()) => {
                self.broker
                    .history(&name, since.map_or(u64::MAX, |p| p.seq))
                    .await
            }
            Err(e) => Err(e),
        };
        let history = match history {
            Ok(history) => history,
            Err(e) => {
                self.remove(conn, &name).await;
                return Err(e);
            }
        };
        let (recovered, replay) = match since {
            None => (true, Vec::new()),
            // Seq 0 is before any epoch's first message: all that is retained.
            Some(p) if p.seq == 0 => (history.complete, history.messages),
            Some(p)
                if p.epoch.as_deref().is_none_or(|e| e == &*history.epoch) && history.complete =>
            {
                (true, history.messages)
            }
            Some(_) => (false, Vec::new()),
        };
        Ok(Prepared {
            channel: name,
            epoch: history.epoch,
            seq: history.top,
            recovered,
            replay,
        })
    }

    /// Sends the replay of a prepared subscription, then the live messages held since, and
    /// from then on passes live messages straight on.
    pub fn activate(&self, conn: u64, prepared: Prepared) {
        let mut channels = self.channels.lock();
        let Some(channel) = channels.get_mut(&prepared.channel) else {
            return;
        };
        if channel.epoch.is_none() {
            channel.epoch = Some(prepared.epoch.clone());
            channel.last_seq = prepared.seq;
        }
        let Some(subscriber) = channel.subscribers.get_mut(&conn) else {
            return;
        };
        for (seq, data) in prepared.replay {
            if seq > prepared.seq {
                break;
            }
            if let Some(frame) = MessageFrame::encode(&prepared.channel, seq, &data) {
                subscriber
                    .outbound
                    .push_replay(Frame::Message(Arc::new(frame)));
            }
        }
        // The replay ends at the start; held live messages take over after it.
        subscriber.after = prepared.seq;
        for frame in subscriber.held.take().unwrap_or_default() {
            if frame.seq > subscriber.after {
                subscriber.after = frame.seq;
                subscriber.outbound.push(Frame::Message(frame));
            }
        }
        self.metrics.subscriptions.inc();
    }

    /// Removes `conn` from the channel; the last local subscriber unlinks it from the broker.
    pub async fn remove(&self, conn: u64, channel: &str) {
        let active = {
            let mut channels = self.channels.lock();
            let Some(entry) = channels.get_mut(channel) else {
                return;
            };
            match entry.subscribers.swap_remove(&conn) {
                Some(subscriber) => subscriber.held.is_none(),
                None => return,
            }
        };
        if active {
            self.metrics.subscriptions.dec();
        }
        let _link = self.links.lock().await;
        let unlinked = {
            let mut channels = self.channels.lock();
            match channels.get(channel) {
                Some(entry) if entry.subscribers.is_empty() => {
                    let linked = entry.linked;
                    channels.remove(channel);
                    linked
                }
                _ => false,
            }
        };
        if unlinked {
            if let Err(e) = self.broker.unsubscribe(channel).await {
                warn!(channel, error = %e, "broker unsubscribe failed");
            }
        }
    }

    async fn link(&self, channel: &str) -> Result<(), BrokerError> {
        let _link = self.links.lock().await;
        let linked = self.channels.lock().get(channel).is_some_and(|c| c.linked);
        if !linked {
            self.broker.subscribe(channel).await?;
            if let Some(entry) = self.channels.lock().get_mut(channel) {
                entry.linked = true;
            }
        }
        Ok(())
    }

    /// Passes one message from the broker on to the channel's local subscribers.
    pub fn deliver(self: &Arc<Self>, delivery: Delivery) {
        let mut channels = self.channels.lock();
        let Some(channel) = channels.get_mut(&delivery.channel) else {
            return;
        };
        if let Some(held) = &mut channel.repairing {
            held.push(delivery);
            return;
        }
        match channel.continuity(&delivery) {
            Continuity::Next => channel.pass_on(&delivery, &self.metrics),
            Continuity::Repeat => self.metrics.drops.with_label_values(&["repeat"]).inc(),
            Continuity::NewEpoch => {
                channel.restart(&delivery.epoch, delivery.seq.saturating_sub(1));
                channel.pass_on(&delivery, &self.metrics);
            }
            Continuity::Gap => {
                debug!(channel = %channel.name, last = channel.last_seq, seq = delivery.seq, "gap, repairing from history");
                self.metrics.repairs.inc();
                let after = channel.last_seq;
                channel.repairing = Some(vec![delivery]);
                let hub = self.clone();
                let name = channel.name.clone();
                tokio::spawn(async move { hub.repair(name, after).await });
            }
        }
    }

    /// After a broker outage: links every channel again and repairs each from history, so that
    /// what was published while the link was down reaches subscribers without a new message.
    pub async fn resync(self: &Arc<Self>) {
        let _resyncing = InProgress::start(&self.metrics.resyncs_in_progress);
        let names: Vec<Arc<str>> = self.channels.lock().keys().cloned().collect();
        for name in names {
            {
                let _link = self.links.lock().await;
                if let Err(e) = self.broker.subscribe(&name).await {
                    warn!(channel = %name, error = %e, "resubscribe failed");
                    continue;
                }
            }
            let after = {
                let mut channels = self.channels.lock();
                let Some(channel) = channels.get_mut(&name) else {
                    continue;
                };
                if channel.repairing.is_some() || channel.epoch.is_none() {
                    continue;
                }
                channel.repairing = Some(Vec::new());
                channel.last_seq
            };
            self.metrics.repairs.inc();
            self.clone().repair(name, after).await;
        }
    }

    /// Fills a gap after `after` from history, then passes on what was held meanwhile. What
    /// history no longer has is lost: subscribers are told with `recovered: false`.
    async fn repair(self: Arc<Self>, name: Arc<str>, after: u64) {
        let _repairing = InProgress::start(&self.metrics.repairs_in_progress);
        let history = self.broker.history(&name, after).await;
        let mut channels = self.channels.lock();
        let Some(channel) = channels.get_mut(&name) else {
            return;
        };
        let held = channel.repairing.take().unwrap_or_default();
        if let Ok(history) = history {
            if channel.epoch.as_deref() == Some(&*history.epoch) {
                for (seq, data) in history.messages {
                    let delivery = Delivery {
                        channel: name.clone(),
                        seq,
                        epoch: history.epoch.clone(),
                        data,
                    };
                    if channel.continuity(&delivery) == Continuity::Next {
                        channel.pass_on(&delivery, &self.metrics);
                    }
                }
            }
        }
        for delivery in held {
            match channel.continuity(&delivery) {
                Continuity::Next => {}
                Continuity::Repeat => continue,
                Continuity::Gap | Continuity::NewEpoch => {
                    warn!(channel = %name, last = channel.last_seq, seq = delivery.seq, "history could not repair the gap");
                    self.metrics
                        .drops
                        .with_label_values(&["unrecoverable_gap"])
                        .inc();
                    channel.restart(&delivery.epoch, delivery.seq.saturating_sub(1));
                }
            }
            channel.pass_on(&delivery, &self.metrics);
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Continuity {
    Next,
    Repeat,
    Gap,
    NewEpoch,
}

impl Channel {
    fn new(name: Arc<str>) -> Self {
        Self {
            name,
            linked: false,
            epoch: None,
            last_seq: 0,
            repairing: None,
            subscribers: IndexMap::new(),
        }
    }

    fn continuity(&self, delivery: &Delivery) -> Continuity {
        match &self.epoch {
            // Nothing passed on yet: the first message sets where the channel stands.
            None => Continuity::Next,
            Some(epoch) if **epoch != *delivery.epoch => Continuity::NewEpoch,
            Some(_) if delivery.seq <= self.last_seq => Continuity::Repeat,
            Some(_) if delivery.seq == self.last_seq + 1 => Continuity::Next,
            Some(_) => Continuity::Gap,
        }
    }

    /// Continuity is lost: every live subscriber is told where the channel stands now, before
    /// its next message.
    fn restart(&mut self, epoch: &Arc<str>, seq: u64) {
        self.epoch = Some(epoch.clone());
        self.last_seq = seq;
        let text: Utf8Bytes = ServerFrame::Subscribed {
            id: None,
            channel: self.name.to_string(),
            seq,
            epoch: epoch.to_string(),
            recovered: false,
        }
        .to_json()
        .into();
        for subscriber in self.subscribers.values_mut() {
            subscriber.after = seq;
            match &mut subscriber.held {
                // Not live yet: its replay ends where this starts; what it held is stale.
                Some(held) => held.clear(),
                None => {
                    subscriber.outbound.push(Frame::Subscribed {
                        channel: self.name.clone(),
                        seq,
                        epoch: epoch.clone(),
                        text: text.clone(),
                    });
                }
            }
        }
    }

    fn pass_on(&mut self, delivery: &Delivery, metrics: &Metrics) {
        self.epoch = Some(delivery.epoch.clone());
        self.last_seq = delivery.seq;
        let Some(frame) = MessageFrame::encode(&self.name, delivery.seq, &delivery.data) else {
            metrics.drops.with_label_values(&["not_utf8"]).inc();
            return;
        };
        let frame = Arc::new(frame);
        let mut delivered = 0;
        for subscriber in self.subscribers.values_mut() {
            match &mut subscriber.held {
                Some(held) if held.len() >= MAX_HELD => {
                    subscriber
                        .outbound
                        .close(CloseCode::SlowConsumer, "slow consumer");
                    metrics.drops.with_label_values(&["slow_consumer"]).inc();
                }
                Some(held) => held.push(frame.clone()),
                None if delivery.seq <= subscriber.after => {}
                None => {
                    subscriber.after = delivery.seq;
                    if subscriber.outbound.push(Frame::Message(frame.clone())) {
                        delivered += 1;
                    }
                }
            }
        }
        metrics.deliveries.inc_by(delivered);
    }
}

impl MessageFrame {
    /// The frame of one message; `None` where the broker holds bytes that are not text, which
    /// no publish through a gateway writes.
    fn encode(channel: &Arc<str>, seq: u64, data: &Bytes) -> Option<Self> {
        let text = Utf8Bytes::try_from(encode_message(channel, seq, data)).ok()?;
        Some(Self {
            channel: channel.clone(),
            seq,
            text,
        })
    }
}
