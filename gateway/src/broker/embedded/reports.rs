//! What the nodes report to the embedded broker of their subscribers: each channel's count,
//! and the members of presence channels.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{EmbeddedBroker, State};
use crate::broker::{BrokerError, Event, Reports};
use crate::presence::{announced, Change, Member};

#[async_trait]
impl Reports for EmbeddedBroker {
    async fn report_channels(
        &self,
        counts: &[(Arc<str>, u64)],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        self.state.lock().reported = (counts.to_vec(), Some(Instant::now() + ttl));
        Ok(())
    }

    async fn channels(&self) -> Result<Vec<(String, u64)>, BrokerError> {
        let state = self.state.lock();
        let (counts, expires) = &state.reported;
        if expires.is_none_or(|at| at <= Instant::now()) {
            return Ok(Vec::new());
        }
        Ok(counts.iter().map(|(c, n)| (c.to_string(), *n)).collect())
    }

    async fn change_presence(
        &self,
        changes: &[Change],
        ttl: Duration,
        max: usize,
    ) -> Result<(), BrokerError> {
        let now = Instant::now();
        let mut events = Vec::new();
        // Each channel's expired members go first, once per call.
        let mut swept = HashSet::new();
        {
            let mut state = self.state.lock();
            let State {
                presence,
                subscribed,
                ..
            } = &mut *state;
            for change in changes {
                let members = presence.entry(change.channel.clone()).or_default();
                let mut announce = |joined: bool, member: &Member, count: usize| {
                    if subscribed.contains(&change.channel) && announced(joined, count as u64, max)
                    {
                        events.push(presence_event(&change.channel, joined, member, count));
                    }
                };
                let expired: Vec<String> = if swept.insert(change.channel.clone()) {
                    let expired = members.iter().filter(|(_, (_, until))| *until <= now);
                    expired.map(|(client, _)| client.clone()).collect()
                } else {
                    Vec::new()
                };
                for client in expired {
                    if let Some((member, _)) = members.remove(&client) {
                        announce(false, &member, members.len());
                    }
                }
                let client = &change.member.client;
                if change.joined {
                    let entry = (change.member.clone(), now + ttl);
                    if members.insert(client.clone(), entry).is_none() {
                        announce(true, &change.member, members.len());
                    }
                } else if let Some((member, _)) = members.remove(client) {
                    announce(false, &member, members.len());
                }
                if members.is_empty() {
                    presence.remove(&change.channel);
                }
            }
        }
        for event in events {
            self.tell(event).await?;
        }
        Ok(())
    }

    async fn presence(
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

/// The event of a member that joined or left `channel`, which has `count` members after it.
fn presence_event(channel: &str, joined: bool, member: &Member, count: usize) -> Event {
    Event::Presence {
        joined,
        presence: shared::frame::Presence {
            channel: channel.to_owned(),
            user: member.user.clone(),
            client: member.client.clone(),
            count: count as u64,
        },
    }
}
