//! Running a request on Redis: on a pooled connection, or pipelined with others on a shared
//! one; its error classified by cause; and the encodings of its arguments.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

use super::RedisBroker;
use crate::broker::BrokerError;

impl RedisBroker {
    /// Runs one request on a pooled connection.
    pub(super) async fn query<T: redis::FromRedisValue>(
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
    /// small, frequent requests (publishes, and the steps of a handshake and a resume: after a
    /// node dies, thousands of its clients resume on the others at once, and a pooled
    /// connection per step ran out of connections), not for long batches that would hold them
    /// up.
    pub(super) async fn query_shared<T: redis::FromRedisValue>(
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
    pub(super) fn ensure_up(&self) -> Result<(), BrokerError> {
        if self.link.is_up() {
            Ok(())
        } else {
            Err(self.down())
        }
    }

    pub(super) fn down(&self) -> BrokerError {
        BrokerError::Unavailable(format!("no link to Redis at {}", self.target.redacted))
    }
}

/// One command or script call.
pub(super) enum Request<'a> {
    Script(redis::ScriptInvocation<'a>),
    Cmd(redis::Cmd),
}

impl Request<'_> {
    pub(super) async fn run<T: redis::FromRedisValue, C: redis::aio::ConnectionLike + Send>(
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
pub(super) fn classify(e: RedisError) -> BrokerError {
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

pub(super) fn pool_error(e: deadpool::managed::PoolError<RedisError>) -> BrokerError {
    use deadpool::managed::PoolError;
    match e {
        PoolError::Backend(e) => classify(e),
        PoolError::Timeout(_) => {
            BrokerError::Unavailable("no Redis connection free in time".into())
        }
        e => BrokerError::Internal(e.to_string()),
    }
}

pub(super) fn protocol(what: &str) -> BrokerError {
    BrokerError::Protocol(what.to_owned())
}

pub(super) fn now_millis() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn millis(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

pub(super) fn to_json(value: &impl serde::Serialize) -> Result<String, BrokerError> {
    serde_json::to_string(value).map_err(|e| BrokerError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
