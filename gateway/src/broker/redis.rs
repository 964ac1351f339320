//! The Redis broker: channel sequences, history and sessions in Redis, and one pub/sub
//! subscription per channel per node. Standalone Redis, or a Redis Cluster with sharded pub/sub.
//!
//! Keys (every key of a channel carries the hash tag `{channel}`, so a cluster keeps them, and the
//! channel's pub/sub topic, on one shard):
//! - `bgw:{ch}:seq`: the channel's last seq; `bgw:{ch}:epoch`: the name of its sequence. Both
//!   live for [`META_TTL`] after the last publish or read.
//! - `bgw:{ch}:hist`: a stream of the retained messages, entry id `<seq>-0`, fields `d` (data)
//!   and `t` (publish time, ms); capped by `--history-size`, expires `--history-ttl` after the
//!   last publish, and entries older than that are not replayed.
//! - `bgw:{ch}:msg`: the pub/sub topic, payload `<seq>:<epoch>:<data>`.
//! - `bgw:session:{id}`: a hash with `record` (JSON) and `owner` (JSON), expiring after the
//!   session TTL.
//! - `bgw:node:{node}`: a node's control topic, for session takeovers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::{Pool, Runtime};
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, RedisError, Script, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    Broker, BrokerError, Delivery, Event, Events, History, Owner, Published, SessionRecord,
};
use crate::ids;
use crate::metrics::Metrics;

/// How long a channel's seq and epoch outlive its last publish or read. Much longer than any
/// history or session, so that a client's position stays comparable while it can resume.
const META_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Pushes that may wait for the hub. A full queue drops a push; the hub sees the gap at the
/// channel's next message and repairs it from history.
const EVENT_QUEUE: usize = 65_536;

/// How often the node checks its pub/sub link; after an outage it resubscribes and repairs.
const LINK_CHECK: Duration = Duration::from_millis(500);

/// Connections of the command pool: publishes and history reads of one node in flight at once.
const POOL_SIZE: usize = 32;

/// Redis answers each command within this, or the broker is unavailable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

pub struct RedisBroker {
    node: String,
    history_size: usize,
    history_ttl: Duration,
    commands: Commands,
    pubsub: PubSub,
    scripts: Scripts,
    /// Set when the pub/sub link dropped, until it is restored and the hub has resynced.
    link_lost: Arc<AtomicBool>,
    events: mpsc::Sender<Event>,
}

enum Commands {
    Single(Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

#[derive(Clone)]
enum PubSub {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

struct Scripts {
    publish: Script,
    history: Script,
    claim: Script,
}

/// Where a takeover notice goes: the owner's node, about one of its connections.
#[derive(Serialize, Deserialize)]
struct TakeoverNotice {
    session: String,
    conn: u64,
}

impl RedisBroker {
    /// Connects to Redis. A URL `redis+cluster://host:port[,host:port...]` (or
    /// `rediss+cluster://`) names a Redis Cluster by its seed nodes; any other is standalone.
    pub async fn connect(
        url: &str,
        node: String,
        history_size: usize,
        history_ttl: Duration,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> anyhow::Result<(Arc<Self>, Events)> {
        let (events, rx) = mpsc::channel(EVENT_QUEUE);
        let link_lost = Arc::new(AtomicBool::new(false));
        let push = {
            let events = events.clone();
            let link_lost = link_lost.clone();
            move |push: PushInfo| -> Result<(), redis::aio::SendError> {
                on_push(push, &events, &link_lost, &metrics);
                Ok(())
            }
        };
        let (commands, pubsub) = match cluster_seeds(url) {
            Some(seeds) => {
                let infos = seeds
                    .iter()
                    .map(|seed| connection_info(seed))
                    .collect::<Result<Vec<_>, _>>()?;
                let client = redis::cluster::ClusterClientBuilder::new(infos.clone())
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(push)
                    .connection_timeout(COMMAND_TIMEOUT)
                    .response_timeout(COMMAND_TIMEOUT)
                    .build()?;
                let pubsub = client.get_async_connection().await?;
                let urls: Vec<String> = seeds.iter().map(|s| format!("redis://{s}")).collect();
                let pool = deadpool_redis::cluster::Config::from_urls(urls)
                    .builder()?
                    .max_size(POOL_SIZE)
                    .runtime(Runtime::Tokio1)
                    .build()?;
                (Commands::Cluster(pool), PubSub::Cluster(pubsub))
            }
            None => {
                let info = connection_info(url)?;
                let client = redis::Client::open(info.clone())?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_push_sender(push)
                    .set_automatic_resubscription()
                    .set_connection_timeout(Some(COMMAND_TIMEOUT))
                    .set_response_timeout(Some(COMMAND_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                let pubsub = client.get_connection_manager_with_config(config).await?;
                let manager = deadpool_redis::Manager::new_with_config(
                    info,
                    AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(COMMAND_TIMEOUT))
                        .set_response_timeout(Some(COMMAND_TIMEOUT)),
                )?;
                let pool = Pool::builder(manager)
                    .max_size(POOL_SIZE)
                    .runtime(Runtime::Tokio1)
                    .wait_timeout(Some(COMMAND_TIMEOUT))
                    .create_timeout(Some(COMMAND_TIMEOUT))
                    .build()?;
                (Commands::Single(pool), PubSub::Single(pubsub))
            }
        };
        let broker = Arc::new(Self {
            history_size,
            history_ttl,
            commands,
            pubsub,
            scripts: Scripts::new(),
            link_lost,
            events,
            node,
        });
        broker
            .pubsub
            .subscribe(&control_topic(&broker.node))
            .await?;
        tokio::spawn(broker.clone().watch_link(stop));
        info!(node = %broker.node, cluster = matches!(broker.pubsub, PubSub::Cluster(_)), "connected to Redis");
        Ok((broker, rx))
    }

    /// Pings the pub/sub link, which reconnects it after an outage. Once it answers again, the
    /// node's control topic is subscribed again and the hub resyncs every channel: it
    /// resubscribes and repairs from history what was published while the link was down.
    async fn watch_link(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(LINK_CHECK) => {}
            }
            match self.pubsub.ping().await {
                Ok(()) if self.link_lost.load(Ordering::Relaxed) => {
                    if self
                        .pubsub
                        .subscribe(&control_topic(&self.node))
                        .await
                        .is_ok()
                    {
                        self.link_lost.store(false, Ordering::Relaxed);
                        info!("Redis pub/sub link restored; resyncing channels");
                        let _ = self.events.send(Event::Resync).await;
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    if !self.link_lost.swap(true, Ordering::Relaxed) {
                        warn!(error = %e, "Redis pub/sub link lost");
                    }
                }
            }
        }
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        request: Request<'_>,
    ) -> Result<T, BrokerError> {
        let result = match &self.commands {
            Commands::Single(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                request.run(&mut conn).await
            }
            Commands::Cluster(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                request.run(&mut conn).await
            }
        };
        result.map_err(unavailable)
    }
}

/// One command, pipeline or script call.
enum Request<'a> {
    Script(redis::ScriptInvocation<'a>),
    Cmd(redis::Cmd),
}

impl Request<'_> {
    async fn run<T: redis::FromRedisValue, C: redis::aio::ConnectionLike + Send>(
        self,
        conn: &mut C,
    ) -> redis::RedisResult<T> {
        match self {
            Request::Script(invocation) => invocation.invoke_async(conn).await,
            Request::Cmd(cmd) => cmd.query_async(conn).await,
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// The seed nodes of a cluster URL, `None` for a standalone one.
fn cluster_seeds(url: &str) -> Option<Vec<String>> {
    let rest = url
        .strip_prefix("redis+cluster://")
        .or_else(|| url.strip_prefix("rediss+cluster://"))?;
    Some(
        rest.split(',')
            .map(|s| s.trim_end_matches('/').to_owned())
            .collect(),
    )
}

/// Connection settings for one Redis: RESP3 (pub/sub pushes) and TCP_NODELAY, which the
/// `redis` crate leaves off and which every small command pays for in latency.
fn connection_info(url: &str) -> Result<redis::ConnectionInfo, RedisError> {
    use redis::IntoConnectionInfo;
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("redis://{url}")
    };
    let info = url.as_str().into_connection_info()?;
    let redis_settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    Ok(info
        .set_redis_settings(redis_settings)
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true)))
}

fn channel_keys(channel: &str) -> [String; 3] {
    [
        format!("bgw:{{{channel}}}:seq"),
        format!("bgw:{{{channel}}}:epoch"),
        format!("bgw:{{{channel}}}:hist"),
    ]
}

fn channel_topic(channel: &str) -> String {
    format!("bgw:{{{channel}}}:msg")
}

fn control_topic(node: &str) -> String {
    format!("bgw:node:{{{node}}}")
}

fn session_key(id: &str) -> String {
    format!("bgw:session:{{{id}}}")
}

/// Turns a pub/sub push into an event for the hub.
fn on_push(
    push: PushInfo,
    events: &mpsc::Sender<Event>,
    link_lost: &AtomicBool,
    metrics: &Metrics,
) {
    let event = match push.kind {
        PushKind::Disconnection => {
            link_lost.store(true, Ordering::Relaxed);
            return;
        }
        PushKind::Message | PushKind::SMessage => {
            let [Value::BulkString(topic), Value::BulkString(payload)] = &push.data[..] else {
                return;
            };
            match parse_push(topic, payload) {
                Some(event) => event,
                None => {
                    metrics.drops.with_label_values(&["malformed_push"]).inc();
                    return;
                }
            }
        }
        _ => return,
    };
    if events.try_send(event).is_err() {
        metrics
            .drops
            .with_label_values(&["broker_queue_full"])
            .inc();
    }
}

fn parse_push(topic: &[u8], payload: &[u8]) -> Option<Event> {
    let topic = std::str::from_utf8(topic).ok()?;
    if topic.starts_with("bgw:node:") {
        let notice: TakeoverNotice = serde_json::from_slice(payload).ok()?;
        return Some(Event::TakenOver {
            session: notice.session,
            conn: notice.conn,
        });
    }
    let channel = topic.strip_prefix("bgw:{")?.strip_suffix("}:msg")?;
    let mut parts = payload.splitn(3, |b| *b == b':');
    let seq = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let epoch = std::str::from_utf8(parts.next()?).ok()?;
    let data = parts.next()?;
    Some(Event::Message(Delivery {
        channel: channel.into(),
        seq,
        epoch: epoch.into(),
        data: Bytes::copy_from_slice(data),
    }))
}

impl PubSub {
    async fn subscribe(&self, topic: &str) -> redis::RedisResult<()> {
        match self.clone() {
            PubSub::Single(mut conn) => conn.subscribe(topic).await,
            PubSub::Cluster(mut conn) => conn.ssubscribe(topic).await,
        }
    }

    async fn unsubscribe(&self, topic: &str) -> redis::RedisResult<()> {
        match self.clone() {
            PubSub::Single(mut conn) => conn.unsubscribe(topic).await,
            PubSub::Cluster(mut conn) => conn.sunsubscribe(topic).await,
        }
    }

    async fn ping(&self) -> redis::RedisResult<()> {
        let ping = redis::cmd("PING");
        match self.clone() {
            PubSub::Single(mut conn) => ping.query_async(&mut conn).await,
            PubSub::Cluster(mut conn) => ping.query_async(&mut conn).await,
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self, PubSub::Cluster(_))
    }
}

/// KEYS: session. ARGV: record, owner, ttl ms. Saves unless another owner holds the session.
const SAVE_SCRIPT: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'owner', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Sessions saved per pipeline: big enough to make a drain of 20k sessions a few round trips,
/// small enough not to stall Redis.
const SAVE_BATCH: usize = 1000;

impl Scripts {
    fn new() -> Self {
        Self {
            // KEYS: seq, epoch, hist. ARGV: data, history size, history ttl ms, meta ttl s,
            // a fresh epoch, topic, publish command.
            publish: Script::new(
                r"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[5]
  redis.call('SET', KEYS[2], epoch)
  redis.call('SET', KEYS[1], 0)
  redis.call('DEL', KEYS[3])
end
local seq = redis.call('INCR', KEYS[1])
if seq == 1 then redis.call('DEL', KEYS[3]) end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[2], seq .. '-0', 'd', ARGV[1], 't', ms)
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call(ARGV[7], ARGV[6], seq .. ':' .. epoch .. ':' .. ARGV[1])
return {seq, epoch}
",
            ),
            // KEYS: seq, epoch, hist. ARGV: after (or 'none'), a fresh epoch, meta ttl s,
            // history ttl ms. Returns {epoch, top, seq, data, seq, data, ...}.
            history: Script::new(
                r"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[2], epoch)
  redis.call('SET', KEYS[1], 0)
  redis.call('DEL', KEYS[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
local top = tonumber(redis.call('GET', KEYS[1]) or '0')
local out = {epoch, top}
if ARGV[1] == 'none' or tonumber(ARGV[1]) >= top then return out end
local now = redis.call('TIME')
local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[4])
for _, entry in ipairs(redis.call('XRANGE', KEYS[3], '(' .. ARGV[1] .. '-0', '+')) do
  local seq = tonumber(string.match(entry[1], '^(%d+)'))
  local fields = entry[2]
  local data, at = nil, 0
  for i = 1, #fields, 2 do
    if fields[i] == 'd' then data = fields[i + 1] elseif fields[i] == 't' then at = tonumber(fields[i + 1]) end
  end
  if data and at >= oldest then
    table.insert(out, seq)
    table.insert(out, data)
  end
end
return out
",
            ),
            // KEYS: session. ARGV: new owner, ttl ms. Returns {record, previous owner} or nil.
            claim: Script::new(
                r"
local found = redis.call('HMGET', KEYS[1], 'record', 'owner')
if not found[1] then return false end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return found
",
            ),
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, channel: &str, data: Bytes) -> Result<Published, BrokerError> {
        let [seq_key, epoch_key, hist_key] = channel_keys(channel);
        let command = if self.pubsub.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let mut invocation = self.scripts.publish.prepare_invoke();
        invocation
            .key(seq_key)
            .key(epoch_key)
            .key(hist_key)
            .arg(&data[..])
            .arg(self.history_size)
            .arg(millis(self.history_ttl))
            .arg(META_TTL.as_secs())
            .arg(ids::epoch())
            .arg(channel_topic(channel))
            .arg(command);
        let (seq, epoch): (u64, String) = self.query(Request::Script(invocation)).await?;
        Ok(Published {
            seq,
            epoch: epoch.into(),
        })
    }

    async fn history(&self, channel: &str, after: u64) -> Result<History, BrokerError> {
        let [seq_key, epoch_key, hist_key] = channel_keys(channel);
        let after_arg = if after == u64::MAX {
            "none".to_owned()
        } else {
            after.to_string()
        };
        let mut invocation = self.scripts.history.prepare_invoke();
        invocation
            .key(seq_key)
            .key(epoch_key)
            .key(hist_key)
            .arg(after_arg)
            .arg(ids::epoch())
            .arg(META_TTL.as_secs())
            .arg(millis(self.history_ttl));
        let reply: Vec<Value> = self.query(Request::Script(invocation)).await?;
        let malformed = || BrokerError::Unavailable("malformed history reply".into());
        let mut values = reply.into_iter();
        let epoch: String = values
            .next()
            .and_then(|v| redis::from_redis_value(v).ok())
            .ok_or_else(malformed)?;
        let top: u64 = values
            .next()
            .and_then(|v| redis::from_redis_value(v).ok())
            .ok_or_else(malformed)?;
        let mut messages = Vec::new();
        while let (Some(seq), Some(data)) = (values.next(), values.next()) {
            let seq: u64 = redis::from_redis_value(seq).map_err(|_| malformed())?;
            let data: Vec<u8> = redis::from_redis_value(data).map_err(|_| malformed())?;
            messages.push((seq, Bytes::from(data)));
        }
        let complete = after == u64::MAX
            || after == top
            || (after < top && messages.first().is_some_and(|(seq, _)| *seq == after + 1));
        Ok(History {
            epoch: epoch.into(),
            top,
            messages,
            complete,
        })
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.pubsub
            .subscribe(&channel_topic(channel))
            .await
            .map_err(unavailable)
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.pubsub
            .unsubscribe(&channel_topic(channel))
            .await
            .map_err(unavailable)
    }

    async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, BrokerError> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(session_key(id)).arg("record").arg("owner");
        let (record, owner): (Option<String>, Option<String>) =
            self.query(Request::Cmd(cmd)).await?;
        Ok(decode_session(record, owner))
    }

    async fn claim_session(
        &self,
        id: &str,
        owner: &Owner,
        ttl: Duration,
    ) -> Result<Option<SessionRecord>, BrokerError> {
        let mut invocation = self.scripts.claim.prepare_invoke();
        invocation
            .key(session_key(id))
            .arg(serde_json::to_string(owner).expect("an owner serialises"))
            .arg(millis(ttl));
        let found: Option<(Option<String>, Option<String>)> =
            self.query(Request::Script(invocation)).await?;
        Ok(found.and_then(|(record, owner)| decode_session(record, owner)))
    }

    async fn save_sessions(
        &self,
        records: &[SessionRecord],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let save = |record: &SessionRecord| {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(SAVE_SCRIPT)
                .arg(1)
                .arg(session_key(&record.id))
                .arg(serde_json::to_string(record).expect("a session serialises"))
                .arg(serde_json::to_string(&record.owner).expect("an owner serialises"))
                .arg(millis(ttl));
            cmd
        };
        match &self.commands {
            // A few round trips for the whole batch: pipelines on one connection.
            Commands::Single(pool) => {
                let mut conn = pool.get().await.map_err(unavailable)?;
                for chunk in records.chunks(SAVE_BATCH) {
                    let mut pipe = redis::pipe();
                    for record in chunk {
                        pipe.add_command(save(record)).ignore();
                    }
                    pipe.query_async::<()>(&mut conn)
                        .await
                        .map_err(unavailable)?;
                }
                Ok(())
            }
            // Sessions spread over the shards: concurrent calls, each routed to its shard.
            Commands::Cluster(_) => {
                for chunk in records.chunks(POOL_SIZE / 2) {
                    let calls = chunk
                        .iter()
                        .map(|record| self.query::<i64>(Request::Cmd(save(record))));
                    for result in futures_util::future::join_all(calls).await {
                        result?;
                    }
                }
                Ok(())
            }
        }
    }

    async fn take_over(&self, previous: &Owner, session: &str) -> Result<(), BrokerError> {
        let notice = serde_json::to_string(&TakeoverNotice {
            session: session.to_owned(),
            conn: previous.conn,
        })
        .expect("a notice serialises");
        let command = if self.pubsub.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let mut cmd = redis::cmd(command);
        cmd.arg(control_topic(&previous.node)).arg(notice);
        self.query::<i64>(Request::Cmd(cmd)).await.map(|_| ())
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.query::<String>(Request::Cmd(redis::cmd("PING")))
            .await?;
        if self.link_lost.load(Ordering::Relaxed) {
            return Err(BrokerError::Unavailable("pub/sub link down".into()));
        }
        Ok(())
    }
}

fn decode_session(record: Option<String>, owner: Option<String>) -> Option<SessionRecord> {
    let mut record: SessionRecord = serde_json::from_str(&record?).ok()?;
    if let Some(owner) = owner.and_then(|o| serde_json::from_str(&o).ok()) {
        record.owner = owner;
    }
    Some(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_parse() {
        let Some(Event::Message(d)) = parse_push(b"bgw:{news}:msg", b"42:ab12:{\"x\":\"a:b\"}")
        else {
            panic!()
        };
        assert_eq!(
            (&*d.channel, d.seq, &*d.epoch, &d.data[..]),
            ("news", 42, "ab12", &b"{\"x\":\"a:b\"}"[..])
        );
        assert!(matches!(
            parse_push(b"bgw:node:{n1}", br#"{"session":"s","conn":3}"#),
            Some(Event::TakenOver { conn: 3, .. })
        ));
        assert!(parse_push(b"bgw:{news}:msg", b"x:ab:1").is_none());
        assert!(parse_push(b"other", b"1:a:1").is_none());
    }

    #[test]
    fn cluster_urls() {
        assert_eq!(
            cluster_seeds("redis+cluster://127.0.0.1:7000,127.0.0.1:7001"),
            Some(vec![
                "127.0.0.1:7000".to_owned(),
                "127.0.0.1:7001".to_owned()
            ])
        );
        assert_eq!(cluster_seeds("redis://127.0.0.1:6379"), None);
    }
}
