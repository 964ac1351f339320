//! What the nodes report to the embedded broker of their subscribers: each channel's count,
//! and the members of presence channels.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::EmbeddedBroker;
use crate::broker::BrokerError;
use crate::presence::Member;

impl EmbeddedBroker {
    pub(super) async fn report_channels(
        &self,
        counts: &[(Arc<str>, u64)],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        self.state.lock().reported = (counts.to_vec(), Some(Instant::now() + ttl));
        Ok(())
    }

    pub(super) async fn channels(&self) -> Result<Vec<(String, u64)>, BrokerError> {
        let state = self.state.lock();
        let (counts, expires) = &state.reported;
        if expires.is_none_or(|at| at <= Instant::now()) {
            return Ok(Vec::new());
        }
        Ok(counts.iter().map(|(c, n)| (c.to_string(), *n)).collect())
    }

    pub(super) async fn report_presence(
        &self,
        members: &[(Arc<str>, Member)],
        left: &[(Arc<str>, String)],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let until = Instant::now() + ttl;
        let mut state = self.state.lock();
        for (channel, session) in left {
            if let Some(members) = state.presence.get_mut(channel) {
                members.remove(session);
            }
        }
        for (channel, member) in members {
            state
                .presence
                .entry(channel.clone())
                .or_default()
                .insert(member.session.clone(), (member.clone(), until));
        }
        Ok(())
    }

    pub(super) async fn presence(
        &self,
        channel: &str,
        limit: usize,
    ) -> Result<(u64, Vec<Member>), BrokerError> {
        let now = Instant::now();
        let state = self.state.lock();
        let mut members: Vec<Member> = state
            .presence
            .get(channel)
            .into_iter()
            .flat_map(|members| members.values())
            .filter(|(_, until)| *until > now)
            .map(|(member, _)| member.clone())
            .collect();
        // As on Redis, in no order the caller may rely on; sorted here for stable answers.
        members.sort_by(|a, b| a.session.cmp(&b.session));
        let count = members.len() as u64;
        members.truncate(limit);
        Ok((count, members))
    }
}
