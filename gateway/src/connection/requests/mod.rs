//! The client's requests, one file each; this file reads a frame and dispatches it.

mod hello;
mod publish;
mod refresh;
mod subscribe;
mod unsubscribe;

use bytes::Bytes;
use shared::frame::Id;
use shared::{valid_channel, ClientFrame, CloseCode, ErrorCode, FrameError, ServerFrame};
use tokio_tungstenite::tungstenite::Message;

use super::{close, Connection, Reply};

impl Connection {
    pub(super) async fn on_message(&mut self, message: Message) -> Reply {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return Err(close(
                    CloseCode::Unsupported,
                    "binary frames are not supported",
                ))
            }
            // Pings are answered by tungstenite; any frame shows the peer is alive.
            _ => return Ok(()),
        };
        self.node.metrics.frames_in.inc();
        if self.limiter.check().is_err() {
            self.node.metrics.limits.with_label_values(&["rate"]).inc();
            return Err(close(CloseCode::RateLimited, "rate limit exceeded"));
        }
        let frame = match ClientFrame::parse(&text) {
            Ok(frame) => frame,
            Err(FrameError::NotObject) => {
                return Err(close(
                    CloseCode::InvalidPayload,
                    "frame is not a JSON object",
                ))
            }
            Err(FrameError::BadRequest { .. }) if self.session.is_none() => {
                return Err(close(
                    CloseCode::ProtocolViolation,
                    "the first frame must be hello",
                ))
            }
            Err(FrameError::BadRequest { id, message }) => {
                self.reply(ServerFrame::error(id, ErrorCode::BadRequest, message));
                return Ok(());
            }
        };
        match (frame, self.session.is_some()) {
            (
                ClientFrame::Hello {
                    token,
                    session,
                    since,
                },
                false,
            ) => self.hello(token, session, since).await,
            (ClientFrame::Hello { .. }, true) => {
                Err(close(CloseCode::ProtocolViolation, "second hello"))
            }
            (_, false) => Err(close(
                CloseCode::ProtocolViolation,
                "the first frame must be hello",
            )),
            (
                ClientFrame::Subscribe {
                    id,
                    channel,
                    since,
                    presence,
                },
                true,
            ) => {
                self.subscribe(id, channel, since, presence).await;
                Ok(())
            }
            (ClientFrame::Unsubscribe { id, channel }, true) => {
                self.unsubscribe(id, channel).await;
                Ok(())
            }
            (ClientFrame::Publish { id, channel, data }, true) => {
                let data = Bytes::from(Box::<str>::from(data).into_boxed_bytes());
                self.publish(id, channel, data).await;
                Ok(())
            }
            (ClientFrame::Ping { id }, true) => {
                self.reply(ServerFrame::Pong { id });
                Ok(())
            }
            (ClientFrame::Refresh { id, token }, true) => {
                self.refresh(id, token);
                Ok(())
            }
        }
    }

    /// Refuses a request for a channel whose name the contract does not allow; true if refused.
    fn refuse_invalid_channel(&self, id: &Option<Id>, channel: &str) -> bool {
        let invalid = !valid_channel(channel);
        if invalid {
            let error =
                ServerFrame::error(id.clone(), ErrorCode::BadRequest, "invalid channel name");
            self.reply(error);
        }
        invalid
    }

    /// Refuses a request that a limit stops, and counts the limit.
    fn refuse_over_limit(&self, id: Option<Id>, limit: &str, code: ErrorCode, message: &str) {
        self.node.metrics.limits.with_label_values(&[limit]).inc();
        self.reply(ServerFrame::error(id, code, message));
    }

    /// The set of subscriptions changed: the session is saved now, not at the next interval.
    fn save_soon(&self) {
        if let Some(session) = &self.session {
            self.node.sessions.save_soon(session.clone());
        }
    }
}
