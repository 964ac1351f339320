//! The Redis broker's count of each user's connections over the cluster, for the limit per
//! user.

use std::time::Duration;

use async_trait::async_trait;

use super::keys::user_connections_key;
use super::requests::{millis, now_millis, Request};
use super::{scripts, RedisBroker, SAVE_BATCH};
use crate::broker::{BrokerError, UserSlots};

#[async_trait]
impl UserSlots for RedisBroker {
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
        let added: i64 = self.query_shared(Request::Cmd(cmd)).await?;
        Ok(added == 1)
    }

    async fn release_connection(&self, user: &str, member: &str) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("ZREM");
        cmd.arg(user_connections_key(user)).arg(member);
        self.query_shared::<i64>(Request::Cmd(cmd))
            .await
            .map(|_| ())
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
}
