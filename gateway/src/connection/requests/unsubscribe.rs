//! `unsubscribe`: leaves a channel.

use shared::frame::Id;
use shared::{ErrorCode, ServerFrame};

use super::super::Connection;

impl Connection {
    pub(super) async fn unsubscribe(&mut self, id: Option<Id>, channel: String) {
        if !self.positions.remove(&channel) {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::NotSubscribed,
                "not subscribed",
            ));
        }
        self.node.hub.remove(self.id, &channel).await;
        if let Some(session) = &self.session {
            session.presence.remove(&channel);
            self.node.presence.left(session, &channel);
        }
        self.save_soon();
        self.reply(ServerFrame::Unsubscribed { id, channel });
    }
}
