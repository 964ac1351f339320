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
        self.save_soon();
        self.reply(ServerFrame::Unsubscribed { id, channel });
    }
}
