//! The Redis broker: channel sequences, history and sessions in Redis, and one pub/sub
//! subscription per channel per node. One Redis, a Redis Cluster (sharded pub/sub), or the
//! master that Redis Sentinels name; over TLS with `rediss`.
//!
//! - [`target`]: the URL forms, TLS, and where writes go now;
//! - [`link`]: the pub/sub connection, reconnected in the background, whose health is the
//!   broker's availability; [`sentinel`]: which node is the master;
//! - [`pool`]: connections for commands; [`pipeline`]: the shared connections that pipeline
//!   concurrent publishes; [`scripts`]: the Lua that numbers and stores messages;
//! - [`keys`]: the key schema, and the payloads of the topics.

mod keys;
mod link;
mod pipeline;
mod pool;
mod scripts;
mod sentinel;
mod target;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use indexmap::IndexMap;
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use self::keys::{
    channel_keys, channel_topic, control_topic, node_channels_keys, once_key, presence_keys,
    session_key, user_connections_key, TakeoverNotice, CONTROL_TOPIC, NODES_KEY,
};
use self::link::{Link, LinkState};
use self::scripts::Scripts;
use self::target::{Target, TlsFiles};
use super::{
    Broker, BrokerError, Control, Events, History, HistoryLimits, Owner, Published, SessionRecord,
    SetupError, CHANNEL_TTL,
};
use crate::config::Config;
use crate::ids;
use crate::metrics::Metrics;
use crate::presence::{Change, Member};

pub use self::target::redact;

/// Pushes that may wait for the hub. A full queue drops a push; the hub sees the gap at the
/// channel's next message and repairs it from history.
const EVENT_QUEUE: usize = 65_536;

/// Sessions saved per pipeline: big enough to make a drain of 20k sessions a few round trips,
/// small enough not to stall Redis.
const SAVE_BATCH: usize = 1000;

/// Presence changes of one channel per script call: a report of a large room takes a few calls,
/// none of which holds Redis for long.
const PRESENCE_BATCH: usize = 500;

/// What the Redis broker needs of the configuration.
pub struct Settings {
    target: Target,
    history: HistoryLimits,
}

impl Settings {
    /// Parses the URL and reads the TLS files.
    pub fn from_config(
        url: &str,
        config: &Config,
        history: HistoryLimits,
    ) -> Result<Self, SetupError> {
        let read = |flag: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| SetupError::File {
                flag,
                path: path.to_owned(),
                source,
            })
        };
        let tls = TlsFiles {
            ca: config
                .redis_ca_file
                .as_deref()
                .map(|path| read("--redis-ca-file", path))
                .transpose()?,
            client: match (&config.redis_client_cert, &config.redis_client_key) {
                (Some(cert), Some(key)) => Some((
                    read("--redis-client-cert", cert)?,
                    read("--redis-client-key", key)?,
                )),
                _ => None,
            },
        };
        Ok(Self {
            target: Target::parse(url, &tls)?,
            history,
        })
    }
}

pub struct RedisBroker {
    /// This node's id: the key of its channel reports.
    node: String,
    history: HistoryLimits,
    target: Arc<Target>,
    link: Arc<LinkState>,
    commands: pool::Pool,
    /// Publishes, pipelined.
    shared: pipeline::Shared,
    scripts: Scripts,
}

impl RedisBroker {
    /// Starts the link to Redis in the background, and returns once its first attempt is over:
    /// connected, or not (then the node starts unready, and the link keeps trying).
    pub async fn start(
        settings: Settings,
        node: String,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Result<(Arc<Self>, Events), SetupError> {
        let (events, rx) = mpsc::channel(EVENT_QUEUE);
        let target = Arc::new(settings.target);
        let state = Arc::new(LinkState::default());
        let (first_attempt, first_attempt_over) = oneshot::channel();
        let link = Link {
            target: target.clone(),
            state: state.clone(),
            node: node.clone(),
            events,
            metrics,
        };
        tokio::spawn(link.run(stop, first_attempt));
        let _ = first_attempt_over.await;
        let broker = Arc::new(Self {
            node,
            history: settings.history,
            target,
            commands: pool::new(state.clone()),
            shared: pipeline::Shared::new(state.clone()),
            link: state,
            scripts: Scripts::new(),
        });
        Ok((broker, rx))
    }

    /// Runs one request on a pooled connection.
    async fn query<T: redis::FromRedisValue>(
        &self,
        request: Request<'_>,
    ) -> Result<T, BrokerError> {
        self.ensure_up()?;
        let mut pooled = self.commands.get().await.map_err(pool_error)?;
        let result = request.run(&mut pooled.conn).await;
        result.map_err(|e| {
            let e = classify(e);
            pooled.broken = matches!(e, BrokerError::Unavailable(_));
            e
        })
    }

    /// Runs one request on a shared connection, pipelined with the others in flight: for the
    /// small, frequent requests (publishes), not for long batches that would hold them up.
    async fn query_shared<T: redis::FromRedisValue>(
        &self,
        request: Request<'_>,
    ) -> Result<T, BrokerError> {
        self.ensure_up()?;
        let mut lease = self.shared.get().await.map_err(classify)?;
        match request.run(&mut lease.conn).await {
            Ok(reply) => Ok(reply),
            Err(e) => {
                let e = classify(e);
                if matches!(e, BrokerError::Unavailable(_)) {
                    lease.broken();
                }
                Err(e)
            }
        }
    }

    /// Fails at once while the link is down, rather than after a connection timeout.
    fn ensure_up(&self) -> Result<(), BrokerError> {
        if self.link.is_up() {
            Ok(())
        } else {
            Err(self.down())
        }
    }

    fn down(&self) -> BrokerError {
        BrokerError::Unavailable(format!("no link to Redis at {}", self.target.redacted))
    }

    /// `PUBLISH`, or `SPUBLISH` on a cluster, where topics are sharded.
    fn publish_command(&self) -> &'static str {
        if self.target.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// The arguments every channel script starts with: a fresh epoch, the channel TTL, and
    /// whether to follow the master's lineage (behind Sentinel; see `scripts.rs`).
    fn channel_invocation<'a>(
        &self,
        script: &'a redis::Script,
        channel: &str,
    ) -> redis::ScriptInvocation<'a> {
        let mut invocation = script.prepare_invoke();
        for key in channel_keys(channel) {
            invocation.key(key);
        }
        invocation
            .arg(ids::epoch())
            .arg(CHANNEL_TTL.as_secs())
            .arg(if self.target.is_sentinel() { "1" } else { "0" });
        invocation
    }
}

impl RedisBroker {
    /// The publish script, idempotent with `once` (its key and window).
    async fn publish_script(
        &self,
        channel: &str,
        data: Bytes,
        once: Option<(&str, Duration)>,
    ) -> Result<Published, BrokerError> {
        let mut invocation = self.channel_invocation(&self.scripts.publish, channel);
        invocation
            .arg(&data[..])
            .arg(self.history.size)
            .arg(millis(self.history.ttl))
            .arg(channel_topic(channel))
            .arg(self.publish_command());
        if let Some((key, window)) = once {
            invocation.key(once_key(channel, key)).arg(millis(window));
        }
        let (seq, epoch): (u64, String) = self.query_shared(Request::Script(invocation)).await?;
        Ok(Published {
            seq,
            epoch: epoch.into(),
        })
    }
}

/// One command or script call.
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

/// The cause of a Redis error: an outage (down, failing over, loading, read-only), or an answer
/// the gateway does not understand.
fn classify(e: RedisError) -> BrokerError {
    let outage = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
            ) | ErrorKind::AuthenticationFailed
                | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::MasterNameNotFoundBySentinel
        )
        // Out of memory, or a password that is not (yet) right: Redis refuses work for a while.
        || matches!(e.code(), Some("OOM" | "NOAUTH" | "WRONGPASS" | "NOPERM"));
    if outage {
        BrokerError::Unavailable(e.to_string())
    } else {
        BrokerError::Protocol(e.to_string())
    }
}

fn pool_error(e: deadpool::managed::PoolError<RedisError>) -> BrokerError {
    use deadpool::managed::PoolError;
    match e {
        PoolError::Backend(e) => classify(e),
        PoolError::Timeout(_) => {
            BrokerError::Unavailable("no Redis connection free in time".into())
        }
        e => BrokerError::Internal(e.to_string()),
    }
}

fn protocol(what: &str) -> BrokerError {
    BrokerError::Protocol(what.to_owned())
}

fn now_millis() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| d.as_millis() as u64)
}

fn millis(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, channel: &str, data: Bytes) -> Result<Published, BrokerError> {
        self.publish_script(channel, data, None).await
    }

    async fn publish_once(
        &self,
        channel: &str,
        data: Bytes,
        key: &str,
        window: Duration,
    ) -> Result<Published, BrokerError> {
        self.publish_script(channel, data, Some((key, window)))
            .await
    }

    async fn remove_history(&self, channel: &str) -> Result<(), BrokerError> {
        let [_, _, hist, _] = channel_keys(channel);
        let mut cmd = redis::cmd("DEL");
        cmd.arg(hist);
        self.query::<i64>(Request::Cmd(cmd)).await.map(|_| ())
    }

    async fn history(&self, channel: &str, after: u64) -> Result<History, BrokerError> {
        let mut invocation = self.channel_invocation(&self.scripts.history, channel);
        invocation
            .arg(if after == u64::MAX {
                "none".to_owned()
            } else {
                after.to_string()
            })
            .arg(millis(self.history.ttl));
        let reply: Vec<Value> = self.query(Request::Script(invocation)).await?;
        let malformed = || protocol("malformed history reply");
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
        let complete = after == u64::MAX || after == top || is_every_seq(&messages, after, top);
        Ok(History {
            epoch: epoch.into(),
            top,
            messages,
            complete,
        })
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let current = self.link.current().ok_or_else(|| self.down())?;
        current
            .pubsub
            .subscribe(&channel_topic(channel))
            .await
            .map_err(classify)
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        // Without a link there is no subscription to drop.
        let Some(current) = self.link.current() else {
            return Ok(());
        };
        current
            .pubsub
            .unsubscribe(&channel_topic(channel))
            .await
            .map_err(classify)
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
            .arg(to_json(owner)?)
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
        let save = |record: &SessionRecord| -> Result<redis::Cmd, BrokerError> {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(scripts::SAVE)
                .arg(1)
                .arg(session_key(&record.id))
                .arg(to_json(record)?)
                .arg(to_json(&record.owner)?)
                .arg(millis(ttl));
            Ok(cmd)
        };
        if self.target.is_cluster() {
            // Sessions spread over the shards: concurrent calls, each routed to its shard.
            for chunk in records.chunks(pool::POOL_SIZE / 2) {
                let calls = chunk
                    .iter()
                    .map(|record| async { self.query::<i64>(Request::Cmd(save(record)?)).await });
                for result in futures_util::future::join_all(calls).await {
                    result?;
                }
            }
            return Ok(());
        }
        // A few round trips for the whole batch: pipelines on one connection.
        self.ensure_up()?;
        let mut pooled = self.commands.get().await.map_err(pool_error)?;
        for chunk in records.chunks(SAVE_BATCH) {
            let mut pipe = redis::pipe();
            for record in chunk {
                pipe.add_command(save(record)?).ignore();
            }
            if let Err(e) = pipe.query_async::<()>(&mut pooled.conn).await {
                let e = classify(e);
                pooled.broken = matches!(e, BrokerError::Unavailable(_));
                return Err(e);
            }
        }
        Ok(())
    }

    async fn take_over(&self, previous: &Owner, session: &str) -> Result<(), BrokerError> {
        let notice = to_json(&TakeoverNotice {
            session: session.to_owned(),
            conn: previous.conn,
        })?;
        let mut cmd = redis::cmd(self.publish_command());
        cmd.arg(control_topic(&previous.node)).arg(notice);
        self.query::<i64>(Request::Cmd(cmd)).await.map(|_| ())
    }

    async fn control(&self, control: &Control) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd(self.publish_command());
        cmd.arg(CONTROL_TOPIC).arg(to_json(control)?);
        self.query::<i64>(Request::Cmd(cmd)).await.map(|_| ())
    }

    async fn end_session(&self, id: &str, ttl: Duration) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(scripts::END)
            .arg(1)
            .arg(session_key(id))
            .arg(millis(ttl));
        self.query::<i64>(Request::Cmd(cmd)).await.map(|_| ())
    }

    async fn report_channels(
        &self,
        counts: &[(Arc<str>, u64)],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let [key, next] = node_channels_keys(&self.node);
        let expires = now_millis() + millis(ttl);
        let mut commands = Vec::new();
        if counts.is_empty() {
            commands.push(redis::cmd("DEL").arg(&key).to_owned());
        } else {
            commands.push(redis::cmd("DEL").arg(&next).to_owned());
            for chunk in counts.chunks(SAVE_BATCH) {
                let mut hset = redis::cmd("HSET");
                hset.arg(&next);
                for (channel, count) in chunk {
                    hset.arg(&**channel).arg(*count);
                }
                commands.push(hset);
            }
            commands.push(redis::cmd("RENAME").arg(&next).arg(&key).to_owned());
            commands.push(redis::cmd("PEXPIRE").arg(&key).arg(millis(ttl)).to_owned());
        }
        // Nodes whose reports expired long ago leave the set; a dead node's stays a while
        // (harmless: its hash is gone).
        commands.push(
            redis::cmd("ZREMRANGEBYSCORE")
                .arg(NODES_KEY)
                .arg("-inf")
                .arg(now_millis().saturating_sub(millis(ttl) * 10))
                .to_owned(),
        );
        commands.push(
            redis::cmd("ZADD")
                .arg(NODES_KEY)
                .arg(expires)
                .arg(&self.node)
                .to_owned(),
        );
        // One command at a time: on a cluster the keys live on different shards.
        for cmd in commands {
            self.query::<Value>(Request::Cmd(cmd)).await?;
        }
        Ok(())
    }

    async fn channels(&self) -> Result<Vec<(String, u64)>, BrokerError> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(NODES_KEY).arg(now_millis()).arg("+inf");
        let nodes: Vec<String> = self.query(Request::Cmd(cmd)).await?;
        let mut totals: std::collections::HashMap<String, u64> = Default::default();
        for node in nodes {
            let [key, _] = node_channels_keys(&node);
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(key);
            let counts: std::collections::HashMap<String, u64> =
                self.query(Request::Cmd(cmd)).await?;
            for (channel, count) in counts {
                *totals.entry(channel).or_default() += count;
            }
        }
        Ok(totals.into_iter().collect())
    }

    async fn acquire_connection(
        &self,
        user: &str,
        member: &str,
        limit: usize,
        ttl: Duration,
    ) -> Result<bool, BrokerError> {
        let now = now_millis();
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(scripts::ACQUIRE)
            .arg(1)
            .arg(user_connections_key(user))
            .arg(now)
            .arg(limit)
            .arg(now + millis(ttl))
            .arg(member)
            .arg(millis(ttl));
        let added: i64 = self.query(Request::Cmd(cmd)).await?;
        Ok(added == 1)
    }

    async fn release_connection(&self, user: &str, member: &str) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(user_connections_key(user)).arg(member);
        self.query::<i64>(Request::Cmd(cmd)).await.map(|_| ())
    }

    async fn refresh_connections(
        &self,
        slots: &[(String, String)],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let until = now_millis() + millis(ttl);
        // Concurrent, pipelined on the shared connections (and routed per shard on a cluster).
        for chunk in slots.chunks(SAVE_BATCH) {
            let refreshes = chunk.iter().map(|(user, member)| {
                let key = user_connections_key(user);
                let mut zadd = redis::cmd("ZADD");
                zadd.arg(&key).arg("XX").arg(until).arg(member);
                let mut expire = redis::cmd("PEXPIRE");
                expire.arg(key).arg(millis(ttl));
                async move {
                    self.query_shared::<i64>(Request::Cmd(zadd)).await?;
                    self.query_shared::<i64>(Request::Cmd(expire)).await
                }
            });
            for result in futures_util::future::join_all(refreshes).await {
                result?;
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
        let now = now_millis();
        // Each channel's changes in their order, in one script call (per chunk): the counts
        // that decide the bound follow the node's order.
        let mut by_channel: IndexMap<&str, Vec<&Change>> = IndexMap::new();
        for change in changes {
            by_channel.entry(&change.channel).or_default().push(change);
        }
        let call = |channel: &str, changes: &[&Change]| {
            let mut invocation = self.scripts.presence_change.prepare_invoke();
            for key in presence_keys(channel) {
                invocation.key(key);
            }
            invocation
                .arg(now)
                .arg(now + millis(ttl))
                .arg(millis(ttl))
                .arg(max)
                .arg(channel_topic(channel))
                .arg(self.publish_command());
            for change in changes {
                invocation
                    .arg(if change.joined { "j" } else { "l" })
                    .arg(&change.member.client)
                    .arg(to_json(&change.member)?);
            }
            Ok::<_, BrokerError>(invocation)
        };
        let channels: Vec<(&str, Vec<&Change>)> = by_channel.into_iter().collect();
        // Channels concurrently, pipelined on the shared connections (and routed per shard on a
        // cluster).
        for group in channels.chunks(pool::POOL_SIZE) {
            let calls = group.iter().map(|(channel, changes)| async move {
                for chunk in changes.chunks(PRESENCE_BATCH) {
                    let invocation = call(channel, chunk)?;
                    self.query_shared::<i64>(Request::Script(invocation))
                        .await?;
                }
                Ok::<_, BrokerError>(())
            });
            for result in futures_util::future::join_all(calls).await {
                result?;
            }
        }
        Ok(())
    }

    async fn presence(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<(u64, Vec<Member>), BrokerError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(scripts::PRESENCE_READ).arg(2);
        for key in presence_keys(channel) {
            cmd.arg(key);
        }
        cmd.arg(now_millis()).arg(limit);
        let reply: Vec<Value> = self.query(Request::Cmd(cmd)).await?;
        let mut values = reply.into_iter();
        let count: u64 = values
            .next()
            .and_then(|v| redis::from_redis_value(v).ok())
            .ok_or_else(|| protocol("malformed presence reply"))?;
        let mut members: Vec<Member> = values
            .filter_map(|v| redis::from_redis_value::<String>(v).ok())
            .filter_map(|record| serde_json::from_str(&record).ok())
            .collect();
        members.sort_by(|a, b| a.session.cmp(&b.session));
        Ok((count, members))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        self.query::<String>(Request::Cmd(redis::cmd("PING")))
            .await
            .map(|_| ())
    }

    fn available(&self) -> bool {
        self.link.is_up()
    }
}

/// Whether `messages` are every seq after `after` up to `top`, none missing.
fn is_every_seq(messages: &[(u64, Bytes)], after: u64, top: u64) -> bool {
    after < top
        && messages
            .iter()
            .zip(after + 1..)
            .all(|((seq, _), expected)| *seq == expected)
        && messages.last().is_some_and(|(seq, _)| *seq == top)
}

fn to_json(value: &impl serde::Serialize) -> Result<String, BrokerError> {
    serde_json::to_string(value).map_err(|e| BrokerError::Internal(e.to_string()))
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

    fn messages(seqs: &[u64]) -> Vec<(u64, Bytes)> {
        seqs.iter().map(|seq| (*seq, Bytes::new())).collect()
    }

    #[test]
    fn history_is_complete_only_without_holes() {
        assert!(is_every_seq(&messages(&[4, 5, 6]), 3, 6));
        assert!(!is_every_seq(&messages(&[5, 6]), 3, 6), "4 is missing");
        assert!(!is_every_seq(&messages(&[4, 6]), 3, 6), "5 is missing");
        assert!(!is_every_seq(&messages(&[4, 5]), 3, 6), "6 is missing");
        assert!(!is_every_seq(&messages(&[]), 3, 6));
        assert!(!is_every_seq(&messages(&[]), 7, 6), "ahead of the channel");
    }

    #[test]
    fn errors_are_classified_by_cause() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(classify(io), BrokerError::Unavailable(_)));
        let parse = RedisError::from((ErrorKind::UnexpectedReturnType, "not a number"));
        assert!(matches!(classify(parse), BrokerError::Protocol(_)));
        let auth = RedisError::from((ErrorKind::AuthenticationFailed, "WRONGPASS"));
        assert!(matches!(classify(auth), BrokerError::Unavailable(_)));
    }
}
