//! A channel's history for back-end services: its retained messages after a position, with
//! its current `{seq, epoch}` (`GET /v1/history`), and their removal (`DELETE /v1/history`).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use serde_json::value::RawValue;

use super::{broker_error, error, json_response, limit_in, required_channel, Body};
use crate::node::Node;

/// Messages of one answer when the request names no limit.
const DEFAULT_LIMIT: usize = 100;

/// Most messages of one answer: a page, not the whole history at once (which `--history-size`
/// may make large); the caller continues from the last seq.
const MAX_LIMIT: usize = 1000;

/// What the query string asks for.
struct Query {
    channel: String,
    since: u64,
    limit: usize,
}

pub async fn read(req: Request<Incoming>, node: &Node) -> Response<Body> {
    let query = match parse(req.uri().query().unwrap_or("")) {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let history = match node.broker.history(&query.channel, query.since).await {
        Ok(history) => history,
        Err(e) => return broker_error(&e, "history read"),
    };
    let more = history.messages.len() > query.limit;
    let mut messages = Vec::with_capacity(history.messages.len().min(query.limit));
    for (seq, data) in history.messages.iter().take(query.limit) {
        // Published data is JSON; anything else in the store is not the gateway's.
        let Ok(data) = serde_json::from_slice::<&RawValue>(data) else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "malformed stored message",
            );
        };
        messages.push(json!({"seq": seq, "data": data}));
    }
    json_response(
        StatusCode::OK,
        json!({
            "channel": query.channel,
            "epoch": &*history.epoch,
            "seq": history.top,
            "messages": messages,
            "complete": history.complete,
            "more": more,
        }),
    )
}

pub async fn remove(req: Request<Incoming>, node: &Node) -> Response<Body> {
    let query = match parse(req.uri().query().unwrap_or("")) {
        Ok(query) => query,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    match node.broker.remove_history(&query.channel).await {
        Ok(()) => json_response(StatusCode::OK, json!({"channel": query.channel})),
        Err(e) => broker_error(&e, "history removal"),
    }
}

fn parse(query: &str) -> Result<Query, String> {
    let (mut channel, mut since, mut limit) = (None, 0, DEFAULT_LIMIT);
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        match &*name {
            "channel" => channel = Some(value.into_owned()),
            "since" => {
                since = value
                    .parse()
                    .map_err(|_| format!("since: `{value}` is not a seq"))?;
            }
            "limit" => limit = limit_in(&value, 1..=MAX_LIMIT)?,
            _ => {}
        }
    }
    let channel = required_channel(channel)?;
    Ok(Query {
        channel,
        since,
        limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_with_defaults_and_bounds() {
        let q = parse("channel=news").unwrap();
        assert_eq!((q.channel.as_str(), q.since, q.limit), ("news", 0, 100));
        let q = parse("channel=a%2Fb&since=40&limit=1000").unwrap();
        assert_eq!((q.channel.as_str(), q.since, q.limit), ("a/b", 40, 1000));
        assert!(parse("since=4").is_err(), "no channel");
        assert!(parse("channel=bad%20name").is_err());
        assert!(parse("channel=a&since=-1").is_err());
        assert!(parse("channel=a&limit=0").is_err());
        assert!(parse("channel=a&limit=1001").is_err());
    }
}
