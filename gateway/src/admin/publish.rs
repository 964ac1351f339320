//! Publishing from back-end services: one message (`/v1/publish`), one message to many channels
//! (`/v1/broadcast`), many messages (`/v1/batch`). Each message may carry an idempotency key:
//! a retry with the same key, to the same channel, within `--idempotency-window` gets the first
//! publish's answer and publishes nothing.

use std::collections::HashMap;

use bytes::Bytes;
use futures_util::future::join_all;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use shared::valid_channel;

use super::{broker_error, error, json_response, read_body, Body};
use crate::broker::{BrokerError, Published};
use crate::node::Node;

/// Messages of one broadcast or batch. Each is a script run in Redis: a bound keeps one call
/// from holding the node's Redis connections (and Redis) for long.
pub const MAX_BATCH: usize = 1000;

/// Longest idempotency key: a UUID or a hash fits many times over.
const MAX_KEY_BYTES: usize = 128;

#[derive(Deserialize)]
struct Message<'a> {
    channel: String,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
struct Broadcast<'a> {
    channels: Vec<String>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    messages: Vec<Message<'a>>,
}

/// One message to publish, checked.
struct Checked<'a> {
    channel: &'a str,
    data: Bytes,
    key: Option<&'a str>,
}

pub async fn one(req: Request<Incoming>, node: &Node) -> Response<Body> {
    let body = match read_body(req, node).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let request: Message = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}")),
    };
    let message = match check(
        &body,
        &request.channel,
        request.data,
        &request.idempotency_key,
    ) {
        Ok(message) => message,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    match publish(node, &message).await {
        Ok(published) => json_response(StatusCode::OK, placed(message.channel, &published)),
        Err(e) => broker_error(&e, "publish"),
    }
}

pub async fn broadcast(req: Request<Incoming>, node: &Node) -> Response<Body> {
    let body = match read_body(req, node).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let request: Broadcast = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}")),
    };
    if let Err(message) = check_count(request.channels.len()) {
        return error(StatusCode::BAD_REQUEST, &message);
    }
    let mut messages = Vec::with_capacity(request.channels.len());
    for channel in &request.channels {
        match check(&body, channel, request.data, &request.idempotency_key) {
            Ok(message) => messages.push(message),
            Err(message) => return error(StatusCode::BAD_REQUEST, &message),
        }
    }
    json_response(StatusCode::OK, publish_all(node, &messages).await)
}

pub async fn batch(req: Request<Incoming>, node: &Node) -> Response<Body> {
    let body = match read_body(req, node).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let request: Batch = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}")),
    };
    if let Err(message) = check_count(request.messages.len()) {
        return error(StatusCode::BAD_REQUEST, &message);
    }
    let mut messages = Vec::with_capacity(request.messages.len());
    for message in &request.messages {
        match check(
            &body,
            &message.channel,
            message.data,
            &message.idempotency_key,
        ) {
            Ok(message) => messages.push(message),
            Err(message) => return error(StatusCode::BAD_REQUEST, &message),
        }
    }
    json_response(StatusCode::OK, publish_all(node, &messages).await)
}

/// The count of messages of one call, checked; else why it is refused (400).
fn check_count(n: usize) -> Result<(), String> {
    if n == 0 {
        return Err("nothing to publish".into());
    }
    if n > MAX_BATCH {
        return Err(format!("more than {MAX_BATCH} messages in one call"));
    }
    Ok(())
}

/// Checks a message, else says why it is refused (400); `data` is sliced out of the body, so
/// that subscribers get its bytes.
fn check<'a>(
    body: &Bytes,
    channel: &'a str,
    data: &RawValue,
    key: &'a Option<String>,
) -> Result<Checked<'a>, String> {
    if !valid_channel(channel) {
        return Err("invalid channel name".into());
    }
    if let Some(key) = key {
        if !valid_key(key) {
            return Err(
                "invalid idempotency key: 1 to 128 printable ASCII characters without spaces"
                    .into(),
            );
        }
    }
    Ok(Checked {
        channel,
        data: body.slice_ref(data.get().as_bytes()),
        key: key.as_deref(),
    })
}

fn valid_key(key: &str) -> bool {
    (1..=MAX_KEY_BYTES).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// Publishes every message and answers each one's place or error, in the order given.
/// Messages to one channel are published one after the other, in order, so that their seqs
/// follow that order; channels go concurrently (pipelined together on Redis).
async fn publish_all(node: &Node, messages: &[Checked<'_>]) -> Value {
    let mut by_channel: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, message) in messages.iter().enumerate() {
        by_channel.entry(message.channel).or_default().push(i);
    }
    let chains = by_channel.into_values().map(|indices| async move {
        let mut results = Vec::with_capacity(indices.len());
        for i in indices {
            results.push((i, publish(node, &messages[i]).await));
        }
        results
    });
    let mut results: Vec<Value> = vec![Value::Null; messages.len()];
    for (i, result) in join_all(chains).await.into_iter().flatten() {
        let channel = messages[i].channel;
        results[i] = match result {
            Ok(published) => placed(channel, &published),
            Err(e) => {
                tracing::warn!(error = %e, channel, "admin publish failed");
                json!({"channel": channel, "error": cause(&e)})
            }
        };
    }
    json!({ "results": results })
}

/// The error of one message of a broadcast or batch, as the single publish would say it.
fn cause(e: &BrokerError) -> &'static str {
    match e {
        BrokerError::Unavailable(_) => "broker unavailable",
        _ => "broker error",
    }
}

fn placed(channel: &str, published: &Published) -> Value {
    json!({"channel": channel, "seq": published.seq, "epoch": &*published.epoch})
}

/// One publish, idempotent where it has a key, counted as every publish is.
async fn publish(node: &Node, message: &Checked<'_>) -> Result<Published, BrokerError> {
    let data = message.data.clone();
    match message.key {
        Some(key) => node.publish_once(message.channel, data, key).await,
        None => node.publish(message.channel, data).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_keys_are_bounded_printable_ascii() {
        assert!(valid_key("order-42"));
        assert!(valid_key("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert!(valid_key(&"k".repeat(MAX_KEY_BYTES)));
        assert!(!valid_key(""));
        assert!(!valid_key(&"k".repeat(MAX_KEY_BYTES + 1)));
        assert!(!valid_key("with space"));
        assert!(!valid_key("tab\there"));
        assert!(!valid_key("é"));
    }
}
