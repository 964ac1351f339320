//! The embedded broker's sessions: records, their owners and takeovers, ended sessions, and
//! the positions each node saves for its sessions.

use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{EmbeddedBroker, State};
use crate::broker::{BrokerError, Event, NodePositions, Owner, SessionRecord, SessionStore};

/// A session as the embedded broker keeps it: its record encoded (as Redis keeps it), which
/// takes a few hundred bytes less than the record's maps and strings, for every session of a
/// node.
pub(super) struct StoredSession {
    pub(super) owner: Owner,
    pub(super) record: Box<str>,
    pub(super) expires: Instant,
}

impl StoredSession {
    pub(super) fn new(record: &SessionRecord, expires: Instant) -> Self {
        Self {
            owner: record.owner.clone(),
            record: serde_json::to_string(record)
                .expect("a session record always serialises")
                .into(),
            expires,
        }
    }
}

impl EmbeddedBroker {
    fn live_session(state: &mut State, id: &str, now: Instant) -> Option<SessionRecord> {
        if state.ended.get(id).is_some_and(|until| *until > now) {
            return None;
        }
        match state.sessions.get(id) {
            Some(session) if session.expires > now => serde_json::from_str(&session.record).ok(),
            Some(_) => {
                state.sessions.remove(id);
                None
            }
            None => None,
        }
    }
}

#[async_trait]
impl SessionStore for EmbeddedBroker {
    async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, BrokerError> {
        Ok(Self::live_session(
            &mut self.state.lock(),
            id,
            Instant::now(),
        ))
    }

    async fn claim_session(
        &self,
        id: &str,
        owner: &Owner,
        ttl: Duration,
    ) -> Result<Option<SessionRecord>, BrokerError> {
        let now = Instant::now();
        let mut state = self.state.lock();
        let previous = Self::live_session(&mut state, id, now);
        if let Some(previous) = &previous {
            let claimed = SessionRecord {
                owner: owner.clone(),
                ..previous.clone()
            };
            state
                .sessions
                .insert(id.into(), StoredSession::new(&claimed, now + ttl));
        }
        Ok(previous)
    }

    async fn save_sessions(
        &self,
        records: &[SessionRecord],
        ttl: Duration,
    ) -> Result<(), BrokerError> {
        let now = Instant::now();
        let mut state = self.state.lock();
        for record in records {
            if state
                .ended
                .get(&record.id)
                .is_some_and(|until| *until > now)
            {
                continue;
            }
            let owned_by_other = state
                .sessions
                .get(record.id.as_str())
                .is_some_and(|stored| stored.expires > now && stored.owner != record.owner);
            if !owned_by_other {
                state.sessions.insert(
                    record.id.as_str().into(),
                    StoredSession::new(record, now + ttl),
                );
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
        let expires = Instant::now() + ttl;
        let mut state = self.state.lock();
        state
            .positions
            .insert(node.to_owned(), (positions.clone(), expires));
        Ok(())
    }

    async fn load_positions(
        &self,
        node: &str,
        channels: &[&str],
    ) -> Result<Option<NodePositions>, BrokerError> {
        let now = Instant::now();
        let state = self.state.lock();
        let Some((saved, _)) = state.positions.get(node).filter(|(_, e)| *e > now) else {
            return Ok(None);
        };
        Ok(Some(NodePositions {
            instance: saved.instance,
            tick: saved.tick,
            channels: channels
                .iter()
                .filter_map(|c| Some((c.to_string(), saved.channels.get(*c)?.clone())))
                .collect(),
        }))
    }

    async fn take_over(&self, previous: &Owner, session: &str) -> Result<(), BrokerError> {
        // One node: the previous owner can only be this node, or a node that no longer runs.
        if previous.node == self.node {
            let event = Event::TakenOver {
                session: session.to_owned(),
                conn: previous.conn,
            };
            self.tell(event).await?;
        }
        Ok(())
    }

    async fn end_session(&self, id: &str, ttl: Duration) -> Result<(), BrokerError> {
        let mut state = self.state.lock();
        state.sessions.remove(id);
        state.ended.insert(id.to_owned(), Instant::now() + ttl);
        Ok(())
    }
}
