//! The channel hub: the broker's events in, the node's local subscriptions, and each channel's
//! continuity.
//!
//! The hub takes every message the broker delivers, keeps its channel continuous (it drops
//! repeats, and repairs a gap in seq from history before it passes later messages on), encodes
//! it once into its whole WebSocket frame and hands that to the [`fanout`](crate::fanout)
//! shards that hold the channel's subscribers. How it keeps a channel continuous is in
//! [`continuity`].

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use shared::{Position, ServerFrame};
use tokio::sync::Mutex as AsyncMutex;
use tracing::{debug, warn};

use crate::broker::{Broker, BrokerError, Delivery, Event, Events};
use crate::connection::Transport;
use crate::fanout::{Command, Fanout, Message, Subscriber};
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::session::{Cursor, Sessions};
use crate::shutdown::Tasks;
use crate::wire;

mod continuity;

use self::continuity::Continuity;

pub struct Hub {
    broker: Arc<dyn Broker>,
    /// Where repairs and resyncs run, tracked with the node's other tasks.
    tasks: Arc<Tasks>,
    metrics: Arc<Metrics>,
    fanout: Fanout,
    channels: Mutex<HashMap<Arc<str>, Channel>>,
    /// Serialises the node's broker subscribe and unsubscribe calls, so that the last local
    /// unsubscribe of a channel cannot undo the first subscribe of its next subscriber.
    links: AsyncMutex<()>,
}

struct Channel {
    name: Arc<str>,
    /// The name as a JSON string, for the frames of its messages.
    json: Box<str>,
    /// Whether the broker delivers this channel to the node.
    linked: bool,
    /// The sequence the hub passes on, once it knows it.
    epoch: Option<Arc<str>>,
    /// The last seq passed on to subscribers.
    last_seq: u64,
    /// Messages held back while a gap is repaired from history.
    repairing: Option<Vec<Delivery>>,
    /// Local subscribers on each fan-out shard.
    subscribers: Box<[u32]>,
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
    /// Where the subscription stands, from its start on: the session's position of it.
    pub cursor: Arc<Cursor>,
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

    /// The position the subscription starts from: before its replay, or at the channel's top.
    fn start(&self) -> u64 {
        self.replay.first().map_or(self.seq, |(seq, _)| seq - 1)
    }
}

impl Hub {
    pub fn new(broker: Arc<dyn Broker>, metrics: Arc<Metrics>, tasks: Arc<Tasks>) -> Self {
        let shards = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            fanout: Fanout::start(shards, metrics.clone(), &tasks),
            tasks,
            broker,
            metrics,
            channels: Mutex::new(HashMap::new()),
            links: AsyncMutex::new(()),
        }
    }

    /// Takes the broker's events until it stops: messages and presence changes to the fan-out,
    /// takeovers to the sessions, and after an outage a resync of every channel.
    pub async fn run(
        self: Arc<Self>,
        mut events: Events,
        sessions: Arc<Sessions>,
        presence: Arc<Presence>,
    ) {
        let stop = self.tasks.stop();
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                () = stop.cancelled() => None,
            };
            let Some(event) = event else { return };
            self.metrics.broker_events_queued.set(events.len() as i64);
            match event {
                Event::Message(delivery) => {
                    self.deliver(delivery);
                    // A node whose sockets are slower than its broker slows its broker link.
                    self.fanout.ready().await;
                }
                Event::TakenOver { session, conn } => sessions.taken_over(&session, conn),
                Event::Resync => {
                    let hub = self.clone();
                    self.tasks
                        .spawn("hub resync", async move { hub.resync().await });
                }
                Event::Control(control) => {
                    let (hub, sessions) = (self.clone(), sessions.clone());
                    let presence = presence.clone();
                    self.tasks.spawn("control request", async move {
                        crate::control::apply(control, &hub, &*hub.broker, &sessions, &presence)
                            .await
                    });
                }
                Event::Presence { joined, presence } => self.announce(joined, presence),
            }
        }
    }

    /// Local subscribers of each channel that has any, for the cluster's channel list.
    pub fn channel_counts(&self) -> Vec<(Arc<str>, u64)> {
        self.channels
            .lock()
            .iter()
            .map(|(name, entry)| {
                let count = entry.subscribers.iter().map(|&n| u64::from(n)).sum();
                (name.clone(), count)
            })
            .filter(|(_, count)| *count > 0)
            .collect()
    }

    /// How many channels have local subscribers.
    pub fn channel_count(&self) -> usize {
        self.channels.lock().len()
    }

    /// Registers `conn` for the channel's live messages (held back for now), then reads what it
    /// asked to replay. No message can fall between history and live: whatever is published
    /// after the registration is held, and activation passes on only what history did not have.
    /// With `presence`, the subscriber also gets the channel's `join` and `leave` frames.
    pub async fn prepare(
        &self,
        conn: u64,
        transport: &Arc<Transport>,
        channel: &str,
        since: Option<&Position>,
        presence: bool,
    ) -> Result<Prepared, BrokerError> {
        let shard = self.fanout.shard_of(conn);
        // Registered before the start is known; set to it below, before anything is written.
        let cursor = Arc::new(Cursor::new(0, Arc::from("")));
        let name = {
            let mut channels = self.channels.lock();
            let entry = match channels.get_mut(channel) {
                Some(entry) => entry,
                None => {
                    let name: Arc<str> = Arc::from(channel);
                    let shards = self.fanout.shard_count();
                    channels
                        .entry(name.clone())
                        .or_insert_with(|| Channel::new(name, shards))
                }
            };
            entry.subscribers[shard] += 1;
            let subscriber = Subscriber::new(conn, transport.clone(), cursor.clone());
            self.fanout.send(
                shard,
                Command::Register {
                    channel: entry.name.clone(),
                    subscriber,
                },
            );
            if presence {
                let channel = entry.name.clone();
                self.fanout.send(shard, Command::Watch { channel, conn });
            }
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
        let prepared = Prepared {
            channel: name,
            epoch: history.epoch,
            seq: history.top,
            recovered,
            cursor,
            replay,
        };
        prepared.cursor.restart(&prepared.epoch, prepared.start());
        Ok(prepared)
    }

    /// Sends the replay of a prepared subscription, then the live messages held since, and
    /// from then on passes live messages straight on.
    pub fn activate(&self, conn: u64, prepared: Prepared) {
        let json = serde_json::to_string(&*prepared.channel).expect("a str always serialises");
        let replay = prepared
            .replay
            .iter()
            .take_while(|(seq, _)| *seq <= prepared.seq)
            .filter(|(_, data)| std::str::from_utf8(data).is_ok())
            .map(|(seq, data)| wire::message(&json, *seq, data))
            .collect();
        let mut channels = self.channels.lock();
        let Some(channel) = channels.get_mut(&prepared.channel) else {
            return;
        };
        if channel.epoch.is_none() {
            channel.epoch = Some(prepared.epoch.clone());
            channel.last_seq = prepared.seq;
        }
        self.fanout.send(
            self.fanout.shard_of(conn),
            Command::Activate {
                channel: channel.name.clone(),
                conn,
                replay,
                start: prepared.seq,
            },
        );
    }

    /// Removes `conn` from the channel; the last local subscriber unlinks it from the broker.
    pub async fn remove(&self, conn: u64, channel: &str) {
        let shard = self.fanout.shard_of(conn);
        {
            let mut channels = self.channels.lock();
            let Some(entry) = channels.get_mut(channel) else {
                return;
            };
            entry.subscribers[shard] = entry.subscribers[shard].saturating_sub(1);
            self.fanout.send(
                shard,
                Command::Remove {
                    channel: entry.name.clone(),
                    conn,
                },
            );
        }
        let _link = self.links.lock().await;
        let unlinked = {
            let mut channels = self.channels.lock();
            match channels.get(channel) {
                Some(entry) if entry.subscribers.iter().all(|&n| n == 0) => {
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
    fn deliver(self: &Arc<Self>, delivery: Delivery) {
        let mut channels = self.channels.lock();
        let Some(channel) = channels.get_mut(&delivery.channel) else {
            return;
        };
        if let Some(held) = &mut channel.repairing {
            held.push(delivery);
            return;
        }
        match channel.continuity(&delivery) {
            Continuity::Next => channel.pass_on(&delivery, &self.fanout, &self.metrics),
            Continuity::Repeat => self.metrics.drops.with_label_values(&["repeat"]).inc(),
            Continuity::NewEpoch => {
                channel.restart(
                    &delivery.epoch,
                    delivery.seq.saturating_sub(1),
                    &self.fanout,
                );
                channel.pass_on(&delivery, &self.fanout, &self.metrics);
            }
            Continuity::Gap => {
                debug!(channel = %channel.name, last = channel.last_seq, seq = delivery.seq, "gap, repairing from history");
                self.metrics.repairs.inc();
                let after = channel.last_seq;
                channel.repairing = Some(vec![delivery]);
                let hub = self.clone();
                let name = channel.name.clone();
                self.tasks
                    .spawn("hub repair", async move { hub.repair(name, after).await });
            }
        }
    }

    /// Passes a member's join or leave on to the local subscribers of its channel that asked
    /// for them: one frame for the node, written only to them.
    fn announce(&self, joined: bool, presence: shared::frame::Presence) {
        // A member recorded by a node of an earlier version, keyed by its session, has no
        // presence id: its expiry is no frame.
        if presence.client.is_empty() {
            return;
        }
        let (name, shards): (Arc<str>, Vec<usize>) = {
            let channels = self.channels.lock();
            let Some(channel) = channels.get(presence.channel.as_str()) else {
                return;
            };
            (channel.name.clone(), channel.shards().collect())
        };
        let frame = if joined {
            ServerFrame::Join(presence)
        } else {
            ServerFrame::Leave(presence)
        };
        let frame = wire::text(frame.to_json().as_bytes());
        for shard in shards {
            let (channel, frame) = (name.clone(), frame.clone());
            self.fanout
                .send(shard, Command::Presence { channel, frame });
        }
    }
}

impl Channel {
    fn new(name: Arc<str>, shards: usize) -> Self {
        Self {
            json: serde_json::to_string(&*name)
                .expect("a str always serialises")
                .into(),
            name,
            linked: false,
            epoch: None,
            last_seq: 0,
            repairing: None,
            subscribers: vec![0; shards].into(),
        }
    }

    /// Encodes the message's frame once, for every subscriber on every shard.
    fn pass_on(&mut self, delivery: &Delivery, fanout: &Fanout, metrics: &Metrics) {
        self.epoch = Some(delivery.epoch.clone());
        self.last_seq = delivery.seq;
        // Bytes that are not text, which no publish through a gateway writes, are no frame.
        if std::str::from_utf8(&delivery.data).is_err() {
            metrics.drops.with_label_values(&["not_utf8"]).inc();
            return;
        }
        let message = Message {
            channel: self.name.clone(),
            seq: delivery.seq,
            frame: wire::message(&self.json, delivery.seq, &delivery.data),
            received: std::time::Instant::now(),
        };
        for shard in self.shards() {
            fanout.send(shard, Command::Message(message.clone()));
        }
    }

    /// The fan-out shards with subscribers of this channel.
    fn shards(&self) -> impl Iterator<Item = usize> + '_ {
        self.subscribers
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(shard, _)| shard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_knows_its_shards() {
        let mut channel = Channel::new(Arc::from("a.b"), 3);
        assert_eq!(&*channel.json, "\"a.b\"");
        assert_eq!(channel.shards().count(), 0);
        channel.subscribers[2] = 4;
        channel.subscribers[0] = 1;
        assert_eq!(channel.shards().collect::<Vec<_>>(), vec![0, 2]);
    }
}
