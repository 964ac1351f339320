//! Presence of a channel that keeps it (`--presence`): its members across the cluster and
//! their count (`GET /v1/presence`).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use shared::ChannelPattern;

use super::{broker_error, error, json_response, limit_in, required_channel, Body};
use crate::node::Node;

pub async fn read(req: Request<Incoming>, node: &Node) -> Response<Body> {
    let max = node.config.presence_max_members;
    let (channel, limit) = match parse(req.uri().query().unwrap_or(""), max) {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let covered = node
        .config
        .presence
        .iter()
        .any(|pattern| ChannelPattern::new(pattern).matches(&channel));
    if !covered {
        return error(
            StatusCode::BAD_REQUEST,
            "presence is off for this channel (--presence)",
        );
    }
    match node.broker.presence(&channel, limit).await {
        Ok((count, members)) => json_response(
            StatusCode::OK,
            json!({
                "channel": channel,
                "count": count,
                "more": count > members.len() as u64,
                "members": members,
            }),
        ),
        Err(e) => broker_error(&e, "presence read"),
    }
}

fn parse(query: &str, max: usize) -> Result<(String, usize), String> {
    let (mut channel, mut limit) = (None, max);
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "channel" => channel = Some(value.into_owned()),
            "limit" => limit = limit_in(&value, 0..=max)?,
            _ => {}
        }
    }
    Ok((required_channel(channel)?, limit))
}
