//! The command pool: connections for publishes, history reads and sessions, to wherever the
//! link goes now. A connection is dropped when a command on it failed for want of Redis, and when
//! the link reconnected since it was made (after a Sentinel failover it would still reach the old
//! master).

use std::sync::Arc;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use deadpool::Runtime;
use redis::{ErrorKind, RedisError};

use super::endpoint::{Connection, COMMAND_TIMEOUT};
use super::link::LinkState;

/// Connections of the pool: publishes and history reads of one node in flight at once.
pub const POOL_SIZE: usize = 32;

pub type Pool = managed::Pool<Connector>;

pub struct Connector {
    link: Arc<LinkState>,
}

pub struct Pooled {
    pub conn: Connection,
    generation: u64,
    /// Set when a command failed for want of Redis: the connection is not used again.
    pub broken: bool,
}

pub fn new(link: Arc<LinkState>) -> Pool {
    Pool::builder(Connector { link })
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(COMMAND_TIMEOUT))
        .create_timeout(Some(COMMAND_TIMEOUT))
        .build()
        .expect("the pool has a runtime")
}

impl managed::Manager for Connector {
    type Type = Pooled;
    type Error = RedisError;

    async fn create(&self) -> Result<Pooled, RedisError> {
        let Some(current) = self.link.current() else {
            return Err(RedisError::from((ErrorKind::Io, "not connected to Redis")));
        };
        let no_pushes = None::<fn(redis::PushInfo) -> Result<(), redis::aio::SendError>>;
        Ok(Pooled {
            conn: current.endpoint.connect(no_pushes).await?,
            generation: current.generation,
            broken: false,
        })
    }

    async fn recycle(&self, pooled: &mut Pooled, _: &Metrics) -> RecycleResult<RedisError> {
        if pooled.broken {
            return Err(RecycleError::message("a command failed on it"));
        }
        if pooled.generation != self.link.generation() {
            return Err(RecycleError::message("the link reconnected since"));
        }
        Ok(())
    }
}
