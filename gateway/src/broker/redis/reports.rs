//! What the nodes report to the Redis broker of their subscribers: each node's channel counts
//! (summed over the live nodes), and the members of presence channels.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use indexmap::IndexMap;
use redis::Value;

use super::keys::{channel_topic, node_channels_keys, presence_keys, NODES_KEY};
use super::requests::{millis, now_millis, protocol, to_json, Request};
use super::{pool, scripts, RedisBroker, SAVE_BATCH};
use crate::broker::{BrokerError, Reports};
use crate::presence::{Change, Member};

/// Presence changes of one channel per script call: a report of a large room takes a few calls,
/// none of which holds Redis for long.
const PRESENCE_BATCH: usize = 500;

#[async_trait]
impl Reports for RedisBroker {
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
}
