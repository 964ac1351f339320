//! The embedded broker's count of each user's connections, for the limit per user.

use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::EmbeddedBroker;
use crate::broker::{BrokerError, UserSlots};

#[async_trait]
impl UserSlots for EmbeddedBroker {
    async fn acquire_connection(
        &self,
        user: &str,
        member: &str,
        limit: usize,
        ttl: Duration,
    ) -> Result<bool, BrokerError> {
        let now = Instant::now();
        let mut state = self.state.lock();
        let members = state.user_connections.entry(user.to_owned()).or_default();
        members.retain(|_, until| *until > now);
        if members.len() >= limit {
            return Ok(false);
        }
        members.insert(member.to_owned(), now + ttl);
        Ok(true)
    }

    async fn release_connection(&self, user: &str, member: &str) -> Result<(), BrokerError> {
        let mut state = self.state.lock();
        if let Some(members) = state.user_connections.get_mut(user) {
            members.remove(member);
            if members.is_empty() {
                state.user_connections.remove(user);
            }
        }
        Ok(())
    }

    async fn refresh_connections(
        &self,
        slots: &[(String, String)],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let until = Instant::now() + ttl;
        let mut state = self.state.lock();
        for (user, member) in slots {
            if let Some(held) = state
                .user_connections
                .get_mut(user)
                .and_then(|members| members.get_mut(member))
            {
                *held = until;
            }
        }
        Ok(())
    }
}
