//! What back ends ask of connections anywhere in the cluster (admin API `POST /v1/disconnect`,
//! `/v1/unsubscribe`, `/v1/subscribe`): the admin API hands a [`Control`] to the broker, which
//! hands it to every node (a topic all nodes subscribe to on Redis); each node applies it here
//! to its own live sessions that match. Delivery is at most once: a node whose link to Redis is
//! down at that moment misses it. Controls are applied as they come, each in a task of its own,
//! so that a slow one (ending sessions in Redis) does not hold up messages.

use std::sync::Arc;

use shared::{valid_channel, CloseCode, ServerFrame};
use tracing::{debug, warn};

use crate::broker::{Broker, Control, Disconnect, Target};
use crate::hub::Hub;
use crate::presence::Presence;
use crate::session::{LiveSession, Sessions};
use crate::wire;

/// Applies `control` to the node's live sessions that it targets.
pub async fn apply(
    control: Control,
    hub: &Hub,
    broker: &dyn Broker,
    sessions: &Sessions,
    presence: &Presence,
) {
    let target = match &control {
        Control::Disconnect { target, .. }
        | Control::Unsubscribe { target, .. }
        | Control::Subscribe { target, .. } => target,
    };
    let matching: Vec<Arc<LiveSession>> = sessions
        .live()
        .into_iter()
        .filter(|session| matches(target, session))
        .collect();
    debug!(?control, sessions = matching.len(), "control");
    for session in matching {
        match &control {
            Control::Disconnect {
                close, end_session, ..
            } => {
                if *end_session {
                    // Ended before the close: the client's reconnect cannot resume it.
                    if let Err(e) = broker.end_session(&session.id, sessions.ttl).await {
                        warn!(error = %e, "ending a session failed");
                    }
                }
                let (code, reason) = close_of(*close);
                session.transport.close(code, reason);
            }
            Control::Unsubscribe { channel, .. } => {
                unsubscribe(hub, sessions, presence, &session, channel).await;
            }
            Control::Subscribe { channel, .. } => {
                subscribe(hub, sessions, presence, &session, channel).await;
            }
        }
    }
}

fn matches(target: &Target, session: &LiveSession) -> bool {
    match target {
        // Anonymous connections have an empty subject: no user names them.
        Target::User(user) => !user.is_empty() && session.subject == *user,
        Target::Session(id) => session.id == *id,
    }
}

/// The close code and reason of each choice (PROTOCOL.md, section 9).
pub fn close_of(close: Disconnect) -> (CloseCode, &'static str) {
    match close {
        Disconnect::Disconnect => (CloseCode::Disconnected, "disconnected"),
        Disconnect::Revoked => (CloseCode::Unauthorized, "access revoked"),
        Disconnect::Terminate => (CloseCode::Terminated, "terminated"),
    }
}

/// As the client's own `unsubscribe`, answered with `unsubscribed` without an id.
async fn unsubscribe(
    hub: &Hub,
    sessions: &Sessions,
    presence: &Presence,
    session: &Arc<LiveSession>,
    channel: &str,
) {
    if !session.positions.remove(channel) {
        return;
    }
    hub.remove(session.owner.conn, channel).await;
    session.presence.remove(channel);
    presence.left(session, channel);
    let frame = ServerFrame::Unsubscribed {
        id: None,
        channel: channel.to_owned(),
    };
    session
        .transport
        .send(&[wire::text(frame.to_json().as_bytes())], true);
    sessions.save_soon(session.clone());
}

/// As the client's own `subscribe` from now on, answered with `subscribed` without an id. The
/// back end decides: the token's channel claims and `--max-subscriptions` do not apply. The
/// subscription is a member of a presence channel, but does not get its frames.
async fn subscribe(
    hub: &Hub,
    sessions: &Sessions,
    presence: &Presence,
    session: &Arc<LiveSession>,
    channel: &str,
) {
    if !valid_channel(channel)
        || session.positions.contains(channel)
        || session.transport.closing().is_some()
    {
        return;
    }
    let conn = session.owner.conn;
    let prepared = match hub
        .prepare(conn, &session.transport, channel, None, false)
        .await
    {
        Ok(prepared) => prepared,
        Err(e) => {
            // `prepare` has undone its registration.
            warn!(conn, channel, error = %e, "server-side subscribe failed");
            return;
        }
    };
    // The connection may have ended meanwhile: it removed what its positions held then.
    if session.transport.closing().is_some() {
        hub.remove(conn, channel).await;
        return;
    }
    let cursor = prepared.cursor.clone();
    session.positions.insert(prepared.channel.clone(), cursor);
    let frame = prepared.subscribed_frame(None);
    session
        .transport
        .send(&[wire::text(frame.to_json().as_bytes())], true);
    let channel = prepared.channel.clone();
    hub.activate(conn, prepared);
    presence.joined(session, &channel);
    sessions.save_soon(session.clone());
}
