//! The Redis broker's channels: publishing (once, with an idempotency key) through the Lua that
//! numbers and stores messages, history, and the node's subscriptions to channel topics.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::Value;

use super::keys::{channel_keys, channel_topic, once_key};
use super::requests::{classify, millis, protocol, Request};
use super::RedisBroker;
use crate::broker::{BrokerError, Channels, History, Published, CHANNEL_TTL};
use crate::ids;

impl RedisBroker {
    /// `PUBLISH`, or `SPUBLISH` on a cluster, where topics are sharded.
    pub(super) fn publish_command(&self) -> &'static str {
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

#[async_trait]
impl Channels for RedisBroker {
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
        Ok(History::new(epoch.into(), top, after, messages))
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
}
