//! The Redis broker's sessions: records, their owners and takeovers, ended sessions, and the
//! positions each node saves for its sessions.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::keys::{control_topic, node_positions_keys, session_key, TakeoverNotice};
use super::requests::{classify, millis, pool_error, protocol, to_json, Request};
use super::{pool, scripts, RedisBroker, SAVE_BATCH};
use crate::broker::{BrokerError, NodePositions, Owner, SessionRecord, SessionStore};

#[async_trait]
impl SessionStore for RedisBroker {
    async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, BrokerError> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(session_key(id)).arg("record").arg("owner");
        let (record, owner): (Option<String>, Option<String>) =
            self.query_shared(Request::Cmd(cmd)).await?;
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
            self.query_shared(Request::Script(invocation)).await?;
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

    async fn save_positions(
        &self,
        node: &str,
        positions: &NodePositions,
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let [key, next] = node_positions_keys(node);
        let run = format!("{}:{}", positions.instance, positions.tick);
        let mut commands = vec![
            redis::cmd("DEL").arg(&next).to_owned(),
            redis::cmd("HSET").arg(&next).arg("run").arg(run).to_owned(),
        ];
        let channels: Vec<_> = positions.channels.iter().collect();
        for chunk in channels.chunks(SAVE_BATCH) {
            let mut hset = redis::cmd("HSET");
            hset.arg(&next);
            for (channel, position) in chunk {
                hset.arg(format!("c:{channel}")).arg(to_json(position)?);
            }
            commands.push(hset);
        }
        commands.push(redis::cmd("RENAME").arg(&next).arg(&key).to_owned());
        commands.push(redis::cmd("PEXPIRE").arg(&key).arg(millis(ttl)).to_owned());
        // In order, on one shard (both keys carry the node's hash tag).
        for cmd in commands {
            self.query::<Value>(Request::Cmd(cmd)).await?;
        }
        Ok(())
    }

    async fn load_positions(
        &self,
        node: &str,
        channels: &[&str],
    ) -> Result<Option<NodePositions>, BrokerError> {
        let [key, _] = node_positions_keys(node);
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&key).arg("run");
        for channel in channels {
            cmd.arg(format!("c:{channel}"));
        }
        let mut values: Vec<Option<String>> = self.query_shared(Request::Cmd(cmd)).await?;
        let saved = values.remove(0);
        let Some((instance, tick)) = saved.as_deref().and_then(|run| run.split_once(':')) else {
            return Ok(None);
        };
        let (Ok(instance), Ok(tick)) = (instance.parse(), tick.parse()) else {
            return Err(protocol("malformed node positions"));
        };
        let channels = channels
            .iter()
            .zip(values)
            .filter_map(|(channel, value)| {
                let position = serde_json::from_str(&value?).ok()?;
                Some((channel.to_string(), position))
            })
            .collect();
        Ok(Some(NodePositions {
            instance,
            tick,
            channels,
        }))
    }

    async fn take_over(&self, previous: &Owner, session: &str) -> Result<(), BrokerError> {
        let notice = to_json(&TakeoverNotice {
            session: session.to_owned(),
            conn: previous.conn,
        })?;
        let mut cmd = redis::cmd(self.publish_command());
        cmd.arg(control_topic(&previous.node)).arg(notice);
        self.query_shared::<i64>(Request::Cmd(cmd))
            .await
            .map(|_| ())
    }

    async fn end_session(&self, id: &str, ttl: Duration) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(scripts::END)
            .arg(1)
            .arg(session_key(id))
            .arg(millis(ttl));
        self.query::<i64>(Request::Cmd(cmd)).await.map(|_| ())
    }
}

fn decode_session(record: Option<String>, owner: Option<String>) -> Option<SessionRecord> {
    let mut record: SessionRecord = serde_json::from_str(&record?).ok()?;
    if let Some(owner) = owner.and_then(|o| serde_json::from_str(&o).ok()) {
        record.owner = owner;
    }
    Some(record)
}
