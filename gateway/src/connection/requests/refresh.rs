//! `refresh`: a new token for the same subject, before the old one expires.

use shared::frame::Id;
use shared::{ErrorCode, ServerFrame};
use tokio::time::Instant;
use tracing::debug;

use super::super::Connection;
use crate::auth::Identity;

impl Connection {
    pub(super) fn refresh(&mut self, id: Option<Id>, token: String) {
        let Some(verifier) = &self.node.verifier else {
            return self.reply(ServerFrame::Refreshed { id, expires: None });
        };
        let claims = match verifier.verify(Some(&token)) {
            Ok(claims) => claims,
            Err(e) => {
                debug!(conn = self.id, error = %e, "refresh refused");
                return self.reply(ServerFrame::error(
                    id,
                    ErrorCode::Unauthorized,
                    "invalid token",
                ));
            }
        };
        if claims.subject != self.identity().subject() {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::Forbidden,
                "token of another subject",
            ));
        }
        let identity = Identity::User(claims);
        self.expires_at = identity.expires_in().map(|left| Instant::now() + left);
        let expires = identity.expires();
        self.identity = Some(identity);
        self.reply(ServerFrame::Refreshed { id, expires });
    }
}
