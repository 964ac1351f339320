//! `publish` from a client: where its token (or, with authentication off, `--client-publish`)
//! allows it.

use bytes::Bytes;
use shared::frame::Id;
use shared::{ErrorCode, ServerFrame};
use tracing::warn;

use super::super::Connection;

impl Connection {
    pub(super) async fn publish(&mut self, id: Option<Id>, channel: String, data: Bytes) {
        let node = self.node.clone();
        if self.refuse_invalid_channel(&id, &channel) {
            return;
        }
        if !self
            .identity()
            .may_publish(&channel, node.config.client_publish)
        {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::Forbidden,
                "not allowed to publish to this channel",
            ));
        }
        if data.len() > node.config.max_publish_bytes {
            return self.refuse_over_limit(
                id,
                "publish_size",
                ErrorCode::TooLarge,
                "message too large",
            );
        }
        match node.publish(&channel, data).await {
            Ok(published) => self.reply(ServerFrame::Published {
                id,
                channel,
                seq: published.seq,
            }),
            Err(e) => {
                warn!(conn = self.id, channel, error = %e, "publish failed");
                self.reply(ServerFrame::error(
                    id,
                    ErrorCode::Unavailable,
                    "broker unavailable",
                ));
            }
        }
    }
}
