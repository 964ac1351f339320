//! Acting on connections anywhere in the cluster: disconnect, unsubscribe and subscribe a user's
//! connections or one session's. The request goes to every node through the broker
//! ([`crate::control`]); the answer says it was sent, not how many connections it reached.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use shared::valid_channel;

use super::{broker_error, error, json_response, read_body, Body};
use crate::broker::{Control, Disconnect, Target};
use crate::node::Node;

/// Longest user (`sub`) or session id a request may name: far above any real one, and a bound
/// on what goes to every node.
const MAX_NAME_BYTES: usize = 256;

/// Whose connections: exactly one of the two.
#[derive(Deserialize)]
struct Whom {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    session: Option<String>,
}

#[derive(Deserialize)]
struct DisconnectRequest {
    #[serde(flatten)]
    whom: Whom,
    #[serde(default = "default_reason")]
    reason: Disconnect,
    #[serde(default)]
    end_session: bool,
}

fn default_reason() -> Disconnect {
    Disconnect::Disconnect
}

#[derive(Deserialize)]
struct ChannelRequest {
    #[serde(flatten)]
    whom: Whom,
    channel: String,
}

pub async fn disconnect(req: Request<Incoming>, node: &Node) -> Response<Body> {
    let request: DisconnectRequest = match parse(req, node).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    let target = match target(request.whom) {
        Ok(target) => target,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if let (Target::Session(id), true) = (&target, request.end_session) {
        // Also when no connection holds it now: it must not be resumed later.
        if let Err(e) = node.broker.end_session(id, node.config.session_ttl).await {
            return broker_error(&e, "session end");
        }
    }
    send(
        node,
        Control::Disconnect {
            target,
            close: request.reason,
            end_session: request.end_session,
        },
    )
    .await
}

pub async fn unsubscribe(req: Request<Incoming>, node: &Node) -> Response<Body> {
    channel_control(req, node, |target, channel| Control::Unsubscribe {
        target,
        channel,
    })
    .await
}

pub async fn subscribe(req: Request<Incoming>, node: &Node) -> Response<Body> {
    channel_control(req, node, |target, channel| Control::Subscribe {
        target,
        channel,
    })
    .await
}

async fn channel_control(
    req: Request<Incoming>,
    node: &Node,
    control: impl FnOnce(Target, String) -> Control,
) -> Response<Body> {
    let request: ChannelRequest = match parse(req, node).await {
        Ok(request) => request,
        Err(response) => return response,
    };
    if !valid_channel(&request.channel) {
        return error(StatusCode::BAD_REQUEST, "invalid channel name");
    }
    let target = match target(request.whom) {
        Ok(target) => target,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    send(node, control(target, request.channel)).await
}

async fn parse<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
    node: &Node,
) -> Result<T, Response<Body>> {
    let body = read_body(req, node).await?;
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}")))
}

fn target(whom: Whom) -> Result<Target, &'static str> {
    let target = match (whom.user, whom.session) {
        (Some(user), None) => Target::User(user),
        (None, Some(session)) => Target::Session(session),
        _ => return Err("name exactly one of user and session"),
    };
    let (Target::User(name) | Target::Session(name)) = &target;
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err("user or session: 1 to 256 bytes");
    }
    Ok(target)
}

async fn send(node: &Node, control: Control) -> Response<Body> {
    match node.broker.control(&control).await {
        Ok(()) => json_response(StatusCode::OK, json!({"sent": true})),
        Err(e) => broker_error(&e, "control"),
    }
}
