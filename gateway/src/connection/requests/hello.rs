//! `hello`: who the client is, and the session it starts or resumes.

use std::collections::BTreeMap;
use std::sync::Arc;

use shared::frame::ChannelState;
use shared::{CloseCode, Position, ServerFrame};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::super::{close, Connection, Reply};
use crate::auth::Identity;
use crate::broker::Owner;
use crate::ids;
use crate::presence::OptIns;
use crate::session::LiveSession;

impl Connection {
    pub(super) async fn hello(
        &mut self,
        token: Option<String>,
        session: Option<String>,
        since: BTreeMap<String, Position>,
    ) -> Reply {
        let node = self.node.clone();
        let identity = match &node.verifier {
            None => Identity::Anonymous,
            Some(verifier) => {
                match verifier.verify(token.as_deref().or(self.http_token.as_deref())) {
                    Ok(claims) => Identity::User(claims),
                    Err(e) => {
                        debug!(conn = self.id, error = %e, "hello refused");
                        return Err(close(CloseCode::Unauthorized, "unauthorized"));
                    }
                }
            }
        };
        // The upgrade's token has done its work.
        self.http_token = None;
        match node
            .user_connections
            .acquire(identity.subject(), self.id)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                let limits = &node.metrics.limits;
                limits.with_label_values(&["user_connections"]).inc();
                return Err(close(CloseCode::TooManyConnections, "too many connections"));
            }
            Err(e) => {
                warn!(conn = self.id, error = %e, "user connection count failed");
                return Err(close(CloseCode::Internal, "broker unavailable"));
            }
        }
        self.expires_at = identity.expires_in().map(|left| Instant::now() + left);
        let owner = Owner {
            node: node.id.clone(),
            conn: self.id,
        };
        let resumed = match session {
            Some(id) => node
                .sessions
                .claim(&id, identity.subject(), &owner)
                .await
                .map_err(|e| {
                    warn!(conn = self.id, error = %e, "session lookup failed");
                    close(CloseCode::Internal, "broker unavailable")
                })?,
            None => None,
        };
        let mut prepared = Vec::new();
        let mut opt_ins = Vec::new();
        let session_id = match &resumed {
            Some(record) => {
                for (channel, stored) in &record.subscriptions {
                    if !identity.may_subscribe(channel)
                        || prepared.len() >= node.config.max_subscriptions
                    {
                        continue;
                    }
                    let since = since.get(channel).unwrap_or(stored);
                    // A channel that no longer keeps presence is restored without it.
                    let presence =
                        record.presence.contains(channel) && node.presence.covers(channel);
                    match node
                        .hub
                        .prepare(self.id, &self.transport, channel, Some(since), presence)
                        .await
                    {
                        Ok(p) => {
                            if presence {
                                opt_ins.push(p.channel.clone());
                            }
                            self.positions.insert(p.channel.clone(), p.cursor.clone());
                            prepared.push(p);
                        }
                        Err(e) => {
                            warn!(conn = self.id, error = %e, "resume failed");
                            return Err(close(CloseCode::Internal, "broker unavailable"));
                        }
                    }
                }
                node.metrics.sessions_resumed.inc();
                record.id.clone()
            }
            None => ids::session_id(),
        };
        let live = Arc::new(LiveSession {
            id: session_id.clone(),
            subject: identity.subject().to_owned(),
            owner,
            positions: self.positions.clone(),
            transport: self.transport.clone(),
            presence: OptIns::new(opt_ins),
        });
        node.sessions.attach(live.clone());
        self.session = Some(live.clone());
        self.identity = Some(identity);
        let channels = prepared
            .iter()
            .map(|p| {
                let state = ChannelState {
                    seq: p.seq,
                    epoch: p.epoch.to_string(),
                    recovered: p.recovered,
                };
                (p.channel.to_string(), state)
            })
            .collect();
        self.reply(ServerFrame::Welcome {
            session: session_id,
            node: node.id.clone(),
            resumed: resumed.is_some(),
            // Whole seconds, rounded up: an interval under a second is not 0 (no heartbeat).
            heartbeat: node.config.heartbeat_interval.as_millis().div_ceil(1000) as u64,
            channels,
        });
        for p in prepared {
            let channel = p.channel.clone();
            node.hub.activate(self.id, p);
            node.presence.joined(&live, &channel);
        }
        Ok(())
    }
}
