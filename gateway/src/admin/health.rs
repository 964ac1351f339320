//! Health, readiness, metrics and stats: for load balancers, Prometheus and people.

use std::time::Duration;

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::json;

use super::{json_response, Body};
use crate::node::Node;

/// How long readiness waits for the broker's answer before it calls the broker unreachable.
const BROKER_PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Ready when not draining and the broker is reachable: its link is up (no I/O, so that a
/// node whose Redis is down answers at once) and it answers a ping.
pub async fn readyz(node: &Node) -> Response<Body> {
    let broker_up = broker_up(node).await;
    let (code, status) = match (node.is_draining(), broker_up) {
        (true, _) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable"),
        (false, true) => (StatusCode::OK, "ready"),
    };
    let body =
        json!({"status": status, "node": node.id, "connections": node.metrics.connections.get()});
    json_response(code, body)
}

/// The Prometheus text exposition. Gauges that are cheap to read but would cost a write on a
/// busy path (channels) or come from configuration are set here, at scrape time; so is the
/// broker's state, from the same ping as readiness, so that it is as fresh as the scrape.
pub async fn metrics(node: &Node) -> Response<Body> {
    broker_up(node).await;
    let m = &node.metrics;
    m.channels.set(gauge_value(node.hub.channel_count()));
    m.max_connections
        .set(gauge_value(node.config.max_connections));
    let mut response = Response::new(Body::from(m.render()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Whether the broker answers within the ping timeout; `bgw_broker_up` follows the answer.
async fn broker_up(node: &Node) -> bool {
    let up = node.broker.available()
        && matches!(
            tokio::time::timeout(BROKER_PING_TIMEOUT, node.broker.ping()).await,
            Ok(Ok(()))
        );
    node.metrics.broker_up.set(i64::from(up));
    up
}

pub fn stats(node: &Node) -> Response<Body> {
    let m = &node.metrics;
    let body = json!({
        "node": node.id,
        "connections": m.connections.get(),
        "channels": node.hub.channel_count(),
        "subscriptions": m.subscriptions.get(),
        "messages_in": m.frames_in.get(),
        "messages_out": m.frames_out.get(),
        "deliveries": m.deliveries.get(),
        "published": m.published.get(),
        "rss_bytes": rss_bytes(),
    });
    json_response(StatusCode::OK, body)
}

/// The process's resident memory, for `loadtest` and operators; 0 where /proc is missing.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}
