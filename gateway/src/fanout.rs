//! The fan-out: each message the hub passes on is written to the socket of every local subscriber
//! of its channel, from here.
//!
//! Subscribers are split over shards, one task each and as many as the runtime has workers, so
//! that a node writes with every core. A shard owns its subscribers: the hub tells it of
//! subscriptions and messages through one inbox, in the hub's order, and nothing else touches
//! them. A shard takes everything its inbox holds at once: at ordinary rates that is one message
//! and one write per subscriber; when messages come faster than the sockets take them, a batch
//! holds several, and each subscriber still gets one write.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use indexmap::IndexMap;
use shared::CloseCode;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::connection::Transport;
use crate::metrics::Metrics;
use crate::session::Cursor;
use crate::shutdown::Tasks;

/// Commands a shard takes at once.
const BATCH: usize = 256;
/// Messages that may wait in one shard's inbox before the hub waits for it: a bound on the
/// memory of a node whose sockets are slower than its broker, which then slows its broker link.
const MAX_PENDING: usize = 4096;
/// How many live messages a subscription may hold while it replays history: far more than a
/// history read takes at any sane publish rate, and a bound on a client that stalls it.
const MAX_HELD: usize = 10_000;

/// A local subscriber, as its shard keeps it.
pub struct Subscriber {
    pub conn: u64,
    pub transport: Arc<Transport>,
    /// Where the subscription stands, for the session saver.
    pub cursor: Arc<Cursor>,
    /// Live messages held while the subscription replays history; `None` once live.
    held: Option<Vec<(u64, Bytes)>>,
    /// The last seq this subscriber was given. A message the broker had already numbered when
    /// the subscription read its history can still arrive after activation: it was replayed,
    /// and is not written again.
    after: u64,
}

impl Subscriber {
    pub fn new(conn: u64, transport: Arc<Transport>, cursor: Arc<Cursor>) -> Self {
        Self {
            conn,
            transport,
            cursor,
            held: Some(Vec::new()),
            after: 0,
        }
    }
}

/// What the hub tells a shard, in the hub's order.
pub enum Command {
    /// A subscription starts: it holds live messages until it is activated.
    Register {
        channel: Arc<str>,
        subscriber: Subscriber,
    },
    /// The subscription's reply is written: its replay (frames up to `start`), then what it held
    /// after `start`, then live.
    Activate {
        channel: Arc<str>,
        conn: u64,
        replay: Vec<Bytes>,
        start: u64,
    },
    Remove {
        channel: Arc<str>,
        conn: u64,
    },
    /// The registered subscriber `conn` asked for the channel's `join` and `leave` frames.
    Watch {
        channel: Arc<str>,
        conn: u64,
    },
    /// A `join` or `leave` frame, for the live subscribers of the channel that asked for them.
    Presence {
        channel: Arc<str>,
        frame: Bytes,
    },
    Message(Message),
    /// Continuity is lost: every live subscriber gets `frame` (an unsolicited `subscribed`) and
    /// stands at `seq` of `epoch`.
    Restart {
        channel: Arc<str>,
        epoch: Arc<str>,
        seq: u64,
        frame: Bytes,
    },
}

/// One message of a channel, encoded once: the whole WebSocket frame.
#[derive(Clone)]
pub struct Message {
    pub channel: Arc<str>,
    pub seq: u64,
    pub frame: Bytes,
    /// When the node had it from its broker, for the delivery delay.
    pub received: std::time::Instant,
}

pub struct Fanout {
    shards: Box<[Shard]>,
}

struct Shard {
    inbox: mpsc::UnboundedSender<Command>,
    pending: Arc<Pending>,
}

/// Messages waiting in a shard's inbox, counted so that the hub can wait for the shard.
#[derive(Default)]
struct Pending {
    messages: AtomicUsize,
    drained: Notify,
}

impl Fanout {
    /// Starts `shards` shard tasks; they end when the node's tasks stop.
    pub fn start(shards: usize, metrics: Arc<Metrics>, tasks: &Tasks) -> Self {
        let shards = (0..shards.max(1))
            .map(|_| {
                let (inbox, commands) = mpsc::unbounded_channel();
                let pending = Arc::new(Pending::default());
                let shard = run(commands, pending.clone(), metrics.clone(), tasks.stop());
                tasks.spawn("fan-out shard", shard);
                Shard { inbox, pending }
            })
            .collect();
        Self { shards }
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard of a connection: all of a connection's subscriptions are written by one shard.
    pub fn shard_of(&self, conn: u64) -> usize {
        (conn % self.shards.len() as u64) as usize
    }

    pub fn send(&self, shard: usize, command: Command) {
        let shard = &self.shards[shard];
        if matches!(command, Command::Message(_)) {
            shard.pending.messages.fetch_add(1, Ordering::Relaxed);
        }
        // A shard's task ends only with the runtime.
        let _ = shard.inbox.send(command);
    }

    /// Waits until no shard has more than its bound of messages waiting.
    pub async fn ready(&self) {
        for shard in &*self.shards {
            loop {
                let drained = shard.pending.drained.notified();
                if shard.pending.messages.load(Ordering::Relaxed) < MAX_PENDING {
                    break;
                }
                drained.await;
            }
        }
    }
}

/// A shard's task: takes its inbox in batches until the node's tasks stop.
async fn run(
    mut commands: mpsc::UnboundedReceiver<Command>,
    pending: Arc<Pending>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut shard = ShardState {
        channels: HashMap::new(),
        watchers: HashMap::new(),
        metrics,
        run: Vec::new(),
        frames: Vec::new(),
    };
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let received = tokio::select! {
            received = commands.recv_many(&mut batch, BATCH) => received,
            () = stop.cancelled() => 0,
        };
        if received == 0 {
            return;
        }
        let mut messages = 0;
        for command in batch.drain(..) {
            match command {
                Command::Message(message) => {
                    messages += 1;
                    shard.run.push(message);
                }
                other => {
                    shard.write_run().await;
                    shard.apply(other);
                }
            }
        }
        shard.write_run().await;
        if messages > 0 {
            let before = pending.messages.fetch_sub(messages, Ordering::Relaxed);
            if before >= MAX_PENDING {
                pending.drained.notify_waiters();
            }
        }
    }
}

struct ShardState {
    channels: HashMap<Arc<str>, IndexMap<u64, Subscriber>>,
    /// The subscribers of each channel that asked for its presence frames: apart, so that
    /// subscribers that did not ask cost nothing.
    watchers: HashMap<Arc<str>, HashSet<u64>>,
    metrics: Arc<Metrics>,
    /// Messages of the batch not yet written, in the hub's order.
    run: Vec<Message>,
    /// The frames of one channel's messages in `run`, reused from batch to batch.
    frames: Vec<Bytes>,
}

impl ShardState {
    fn apply(&mut self, command: Command) {
        match command {
            Command::Register {
                channel,
                subscriber,
            } => {
                self.channels
                    .entry(channel)
                    .or_default()
                    .insert(subscriber.conn, subscriber);
            }
            Command::Activate {
                channel,
                conn,
                replay,
                start,
            } => {
                let Some(subscriber) = self
                    .channels
                    .get_mut(&channel)
                    .and_then(|subscribers| subscribers.get_mut(&conn))
                else {
                    return;
                };
                let held = subscriber.held.take().unwrap_or_default();
                if subscriber.transport.send(&replay, false) {
                    self.metrics.frames_out.inc_by(replay.len() as u64);
                }
                subscriber.after = start;
                let live: Vec<Bytes> = held
                    .into_iter()
                    .filter(|(seq, _)| *seq > start)
                    .map(|(seq, frame)| {
                        subscriber.after = seq;
                        frame
                    })
                    .collect();
                // The live messages it held are deliveries like any other; the replay is not.
                if !live.is_empty() && subscriber.transport.send(&live, true) {
                    self.metrics.deliveries.inc_by(live.len() as u64);
                    self.metrics.frames_out.inc_by(live.len() as u64);
                }
                subscriber.cursor.advance(subscriber.after);
                self.metrics.subscriptions.inc();
            }
            Command::Remove { channel, conn } => {
                if let Some(watchers) = self.watchers.get_mut(&channel) {
                    watchers.remove(&conn);
                    if watchers.is_empty() {
                        self.watchers.remove(&channel);
                    }
                }
                let Some(subscribers) = self.channels.get_mut(&channel) else {
                    return;
                };
                if let Some(removed) = subscribers.swap_remove(&conn) {
                    if removed.held.is_none() {
                        self.metrics.subscriptions.dec();
                    }
                }
                if subscribers.is_empty() {
                    self.channels.remove(&channel);
                }
            }
            Command::Restart {
                channel,
                epoch,
                seq,
                frame,
            } => {
                let Some(subscribers) = self.channels.get_mut(&channel) else {
                    return;
                };
                for subscriber in subscribers.values_mut() {
                    subscriber.after = seq;
                    match &mut subscriber.held {
                        // Not live yet: its replay ends where this starts; what it held is stale.
                        Some(held) => held.clear(),
                        None => {
                            subscriber.cursor.restart(&epoch, seq);
                            subscriber
                                .transport
                                .send(std::slice::from_ref(&frame), true);
                        }
                    }
                }
            }
            Command::Watch { channel, conn } => {
                self.watchers.entry(channel).or_default().insert(conn);
            }
            Command::Presence { channel, frame } => {
                let (Some(watchers), Some(subscribers)) =
                    (self.watchers.get(&channel), self.channels.get(&channel))
                else {
                    return;
                };
                let mut written = 0;
                for conn in watchers {
                    // Not while it replays: its `subscribed` must come first.
                    match subscribers.get(conn) {
                        Some(subscriber) if subscriber.held.is_none() => {
                            let frames = std::slice::from_ref(&frame);
                            written += u64::from(subscriber.transport.send(frames, true));
                        }
                        _ => {}
                    }
                }
                self.metrics.frames_out.inc_by(written);
            }
            // Taken into the run by the shard's loop.
            Command::Message(message) => self.run.push(message),
        }
    }

    /// Writes the messages of the run: per channel, each subscriber gets the frames it has not
    /// had, in one write.
    ///
    /// The shard yields to the runtime when its budget is spent (every hundred or so writes), so
    /// that publishes and the broker's events go on while it writes to thousands of sockets:
    /// messages that come meanwhile wait in the inbox, and the next run takes them together,
    /// one write per subscriber for all of them. That is how a node under overload puts many
    /// messages in one write, while at ordinary rates a run is one message.
    async fn write_run(&mut self) {
        if self.run.is_empty() {
            return;
        }
        // Per channel, in the hub's order: a stable sort on the channel's (unique) name pointer.
        self.run
            .sort_by_key(|message| Arc::as_ptr(&message.channel).cast::<u8>() as usize);
        let mut run = std::mem::take(&mut self.run);
        let mut delivered = 0;
        for group in run.chunk_by(|a, b| Arc::ptr_eq(&a.channel, &b.channel)) {
            let Some(subscribers) = self.channels.get_mut(&group[0].channel) else {
                continue;
            };
            self.frames.clear();
            self.frames.extend(group.iter().map(|m| m.frame.clone()));
            for subscriber in subscribers.values_mut() {
                tokio::task::consume_budget().await;
                if let Some(held) = &mut subscriber.held {
                    if held.len() + group.len() > MAX_HELD {
                        subscriber
                            .transport
                            .close(CloseCode::SlowConsumer, "slow consumer");
                        self.metrics
                            .drops
                            .with_label_values(&["slow_consumer"])
                            .inc();
                    } else {
                        held.extend(group.iter().map(|m| (m.seq, m.frame.clone())));
                    }
                    continue;
                }
                let first = group.partition_point(|m| m.seq <= subscriber.after);
                if first == group.len() {
                    continue;
                }
                if subscriber.transport.send(&self.frames[first..], true) {
                    delivered += (group.len() - first) as u64;
                }
                subscriber.after = group[group.len() - 1].seq;
                subscriber.cursor.advance(subscriber.after);
            }
            for message in group {
                let delay = message.received.elapsed().as_secs_f64();
                self.metrics.delivery_delay.observe(delay);
            }
        }
        self.metrics.deliveries.inc_by(delivered);
        self.metrics.frames_out.inc_by(delivered);
        run.clear();
        self.run = run;
    }
}
