//! `subscribe`: registers for live messages, replays what the client asked for, then live;
//! with `presence`, the channel's `join` and `leave` frames too.

use shared::frame::Id;
use shared::{ErrorCode, Position, ServerFrame};
use tracing::warn;

use super::super::Connection;

impl Connection {
    pub(super) async fn subscribe(
        &mut self,
        id: Option<Id>,
        channel: String,
        since: Option<Position>,
        presence: bool,
    ) {
        let node = self.node.clone();
        if self.refuse_invalid_channel(&id, &channel) {
            return;
        }
        if !self.identity().may_subscribe(&channel) {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::Forbidden,
                "not allowed to subscribe to this channel",
            ));
        }
        if presence && !node.presence.covers(&channel) {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::BadRequest,
                "presence is off for this channel",
            ));
        }
        if self.positions.contains(&channel) {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::BadRequest,
                "already subscribed",
            ));
        }
        if self.positions.len() >= node.config.max_subscriptions {
            return self.refuse_over_limit(
                id,
                "subscriptions",
                ErrorCode::TooMany,
                "too many subscriptions",
            );
        }
        match node
            .hub
            .prepare(self.id, &self.transport, &channel, since.as_ref(), presence)
            .await
        {
            Ok(prepared) => {
                let cursor = prepared.cursor.clone();
                self.positions.insert(prepared.channel.clone(), cursor);
                // The reply goes first; the replay follows it once activated.
                self.reply(prepared.subscribed_frame(id));
                let channel = prepared.channel.clone();
                node.hub.activate(self.id, prepared);
                if let Some(session) = &self.session {
                    if presence {
                        session.presence.add(&channel);
                    }
                    node.presence.joined(session, &channel);
                }
                self.save_soon();
            }
            Err(e) => {
                warn!(conn = self.id, channel, error = %e, "subscribe failed");
                self.reply(ServerFrame::error(
                    id,
                    ErrorCode::Unavailable,
                    "broker unavailable",
                ));
            }
        }
    }
}
