//! Presence, for the channels that match `--presence`: who is subscribed (session, user, node,
//! since when), and how many.
//!
//! The node reports its own members with its other reports ([`crate::channels`]): every
//! `--node-report-interval` it scans the subscriptions of its live sessions, and tells the
//! broker which members of presence channels it holds (each refreshed, expiring after three
//! intervals) and which left since the last scan. Nothing is added to the path of a subscribe:
//! a member appears within one interval, and the members of a node that dies expire, so that it
//! leaves no ghosts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use shared::ChannelPattern;

use crate::broker::{Broker, BrokerError};
use crate::session::LiveSession;

/// A member that left: its channel and session.
pub type Left = (Arc<str>, String);

/// One subscriber of a presence channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub session: String,
    /// The token's `sub`; empty for an anonymous client.
    pub user: String,
    pub node: String,
    /// When this node first saw the subscription, in ms since the epoch.
    pub since: u64,
}

pub struct Presence {
    patterns: Vec<ChannelPattern>,
    node: String,
    /// The members this node reported last, by `(channel, session)`.
    reported: Mutex<HashMap<(Arc<str>, String), Member>>,
}

impl Presence {
    pub fn new(patterns: &[String], node: String) -> Self {
        Self {
            patterns: patterns.iter().map(|p| ChannelPattern::new(p)).collect(),
            node,
            reported: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `channel` keeps presence.
    pub fn covers(&self, channel: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(channel))
    }

    /// Reports the node's members now, and those that left since the last report.
    pub async fn report(
        &self,
        broker: &dyn Broker,
        live: &[Arc<LiveSession>],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        if self.patterns.is_empty() {
            return Ok(());
        }
        let (members, left) = self.scan(live, now_millis());
        broker.report_presence(&members, &left, ttl).await
    }

    /// The members of presence channels in `live`, and the `(channel, session)` of those
    /// reported before that are gone.
    fn scan(&self, live: &[Arc<LiveSession>], now: u64) -> (Vec<(Arc<str>, Member)>, Vec<Left>) {
        let mut reported = self.reported.lock();
        let mut current = HashMap::new();
        for session in live {
            for channel in session.positions.channels() {
                if !self.covers(&channel) {
                    continue;
                }
                let key = (channel, session.id.clone());
                let member = reported.get(&key).cloned().unwrap_or_else(|| Member {
                    session: session.id.clone(),
                    user: session.subject.clone(),
                    node: self.node.clone(),
                    since: now,
                });
                current.insert(key, member);
            }
        }
        let left = reported
            .keys()
            .filter(|key| !current.contains_key(*key))
            .cloned()
            .collect();
        let members = current
            .iter()
            .map(|((channel, _), member)| (channel.clone(), member.clone()))
            .collect();
        *reported = current;
        (members, left)
    }
}

pub fn now_millis() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH);
    now.map_or(0, |d| d.as_millis() as u64)
}
