//! Asking Redis Sentinels which node is the master now.
//!
//! The node asks at every connection and at every check of its link (see `link.rs`), so that it
//! leaves a master that was replaced within a check, rather than when the Sentinels get round to
//! demoting it (which can take seconds, during which it still takes writes that the new master
//! never sees). One connection to the first Sentinel that answers is kept for those questions.

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError};
use tokio::sync::Mutex;

use super::endpoint::COMMAND_TIMEOUT;

pub struct Sentinels {
    /// One client per Sentinel, in the order of the URL.
    nodes: Vec<Client>,
    /// The name of the master, as the Sentinels monitor it.
    name: String,
    /// A connection to the last Sentinel that answered.
    asked: Mutex<Option<MultiplexedConnection>>,
}

impl Sentinels {
    pub fn new(nodes: Vec<Client>, name: String) -> Self {
        Self {
            nodes,
            name,
            asked: Mutex::new(None),
        }
    }

    /// The address of the master: the answer of the last Sentinel that answered, else of the
    /// first one in the URL's order that does.
    pub async fn master(&self) -> Result<(String, u16), RedisError> {
        let mut asked = self.asked.lock().await;
        if let Some(conn) = asked.as_mut() {
            match self.ask(conn).await {
                Ok(address) => return Ok(address),
                Err(_) => *asked = None,
            }
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let mut last = None;
        for node in &self.nodes {
            let answer = match node
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                Ok(mut conn) => self.ask(&mut conn).await.map(|address| (address, conn)),
                Err(e) => Err(e),
            };
            match answer {
                Ok((address, conn)) => {
                    *asked = Some(conn);
                    return Ok(address);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            RedisError::from((ErrorKind::EmptySentinelList, "no Sentinel in the URL"))
        }))
    }

    async fn ask(&self, conn: &mut MultiplexedConnection) -> Result<(String, u16), RedisError> {
        let answer: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.name)
            .query_async(conn)
            .await?;
        answer.ok_or_else(|| {
            RedisError::from((
                ErrorKind::MasterNameNotFoundBySentinel,
                "the Sentinel knows no master of that name",
                self.name.clone(),
            ))
        })
    }
}
