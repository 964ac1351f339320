//! `--max-connections-per-user`: how many connections one user (a token's `sub`) may hold at
//! once across the cluster. Each connection of a user takes a slot in the broker at `hello`
//! (refused with 4013 when the user has them all) and gives it back when it ends; the node
//! refreshes the slots of its live connections with its reports, and a slot expires three
//! report intervals after its last refresh, so that the slots of a dead node come free.
//! Anonymous connections have no user and are not limited.

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use crate::broker::{Broker, BrokerError};
use crate::session::LiveSession;

pub struct UserConnections {
    /// `None`: no limit, and no broker work at all.
    limit: Option<usize>,
    broker: Arc<dyn Broker>,
    node: String,
    /// How long a slot lives without a refresh: three report intervals.
    ttl: Duration,
}

impl UserConnections {
    pub fn new(
        limit: Option<usize>,
        broker: Arc<dyn Broker>,
        node: String,
        report_interval: Duration,
    ) -> Self {
        Self {
            limit,
            broker,
            node,
            ttl: report_interval * 3,
        }
    }

    /// Takes a slot of `user` for the connection `conn`: `false` when the user holds the
    /// maximum already.
    pub async fn acquire(&self, user: &str, conn: u64) -> Result<bool, BrokerError> {
        match self.limit {
            Some(limit) if !user.is_empty() => {
                self.broker
                    .acquire_connection(user, &self.member(conn), limit, self.ttl)
                    .await
            }
            _ => Ok(true),
        }
    }

    /// Gives the slot back, in the background: the connection is over either way, and a slot
    /// that could not be given back expires.
    pub fn release(&self, user: &str, conn: u64) {
        if self.limit.is_none() || user.is_empty() {
            return;
        }
        let (broker, user, member) = (self.broker.clone(), user.to_owned(), self.member(conn));
        tokio::spawn(async move {
            if let Err(e) = broker.release_connection(&user, &member).await {
                debug!(error = %e, "releasing a user's connection slot failed");
            }
        });
    }

    /// Keeps the slots of the node's live connections from expiring.
    pub async fn refresh(&self, live: &[Arc<LiveSession>]) -> Result<(), BrokerError> {
        if self.limit.is_none() {
            return Ok(());
        }
        let slots: Vec<(String, String)> = live
            .iter()
            .filter(|session| !session.subject.is_empty())
            .map(|session| (session.subject.clone(), self.member(session.owner.conn)))
            .collect();
        self.broker.refresh_connections(&slots, self.ttl).await
    }

    fn member(&self, conn: u64) -> String {
        format!("{}/{conn}", self.node)
    }
}
