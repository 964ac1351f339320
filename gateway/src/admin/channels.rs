//! The channels that have subscribers anywhere in the cluster, with their counts
//! (`GET /v1/channels`), from the nodes' reports ([`crate::channels`]).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use shared::ChannelPattern;

use super::{broker_error, error, json_response, limit_in, Body};
use crate::node::Node;

const DEFAULT_LIMIT: usize = 100;

/// Most channels of one answer: enough for a dashboard, small enough to answer at once.
const MAX_LIMIT: usize = 10_000;

pub async fn list(req: Request<Incoming>, node: &Node) -> Response<Body> {
    let (pattern, limit) = match parse(req.uri().query().unwrap_or("")) {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let mut channels = match node.broker.channels().await {
        Ok(channels) => channels,
        Err(e) => return broker_error(&e, "channel list"),
    };
    if let Some(pattern) = &pattern {
        channels.retain(|(channel, _)| pattern.matches(channel));
    }
    // The busiest first; ties by name, so that the answer is stable.
    channels.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let more = channels.len() > limit;
    let listed: Vec<_> = channels
        .iter()
        .take(limit)
        .map(|(channel, count)| json!({"channel": channel, "subscribers": count}))
        .collect();
    json_response(StatusCode::OK, json!({"channels": listed, "more": more}))
}

fn parse(query: &str) -> Result<(Option<ChannelPattern>, usize), String> {
    let (mut pattern, mut limit) = (None, DEFAULT_LIMIT);
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "pattern" => pattern = Some(ChannelPattern::new(&value)),
            "limit" => limit = limit_in(&value, 1..=MAX_LIMIT)?,
            _ => {}
        }
    }
    Ok((pattern, limit))
}
