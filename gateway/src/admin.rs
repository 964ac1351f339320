//! The admin listener: health, readiness, metrics, stats and the publish API, for load
//! balancers, Prometheus and back-end services. Never exposed to the internet.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use shared::valid_channel;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::node::Node;

/// How long readiness waits for the broker's answer before it calls the broker unreachable.
const BROKER_PING_TIMEOUT: Duration = Duration::from_secs(1);

type Body = Full<Bytes>;

pub async fn run(listener: TcpListener, node: Arc<Node>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let node = node.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let node = node.clone();
                async move { Ok::<_, Infallible>(route(req, &node).await) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection failed");
            }
        });
    }
}

async fn route(req: Request<Incoming>, node: &Node) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, json!({"status": "ok"})),
        (&Method::GET, "/readyz") => readyz(node).await,
        (&Method::GET, "/metrics") => metrics(node).await,
        (&Method::GET, "/v1/stats") => stats(node),
        (&Method::POST, "/v1/publish") => publish(req, node).await,
        (_, "/healthz" | "/readyz" | "/metrics" | "/v1/stats" | "/v1/publish") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Ready when not draining and the broker is reachable: its link is up (no I/O, so that a
/// node whose Redis is down answers at once) and it answers a ping.
async fn readyz(node: &Node) -> Response<Body> {
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
async fn metrics(node: &Node) -> Response<Body> {
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

fn stats(node: &Node) -> Response<Body> {
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

#[derive(Deserialize)]
struct PublishRequest<'a> {
    channel: String,
    #[serde(borrow)]
    data: &'a RawValue,
}

async fn publish(req: Request<Incoming>, node: &Node) -> Response<Body> {
    if let Some(key) = &node.config.api_key {
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|given| {
            constant_time_eq::constant_time_eq(given.as_bytes(), key.expose().as_bytes())
        }) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
        }
    }
    let limit = node.config.max_publish_bytes;
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            node.metrics
                .limits
                .with_label_values(&["publish_size"])
                .inc();
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body above the publish size limit",
            );
        }
        Err(_) => return error(StatusCode::BAD_REQUEST, "could not read the body"),
    };
    let request: PublishRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("bad JSON: {e}")),
    };
    if !valid_channel(&request.channel) {
        return error(StatusCode::BAD_REQUEST, "invalid channel name");
    }
    let data = body.slice_ref(request.data.get().as_bytes());
    match node.publish(&request.channel, data).await {
        Ok(published) => json_response(
            StatusCode::OK,
            json!({"channel": request.channel, "seq": published.seq, "epoch": &*published.epoch}),
        ),
        Err(e) => {
            warn!(error = %e, "admin publish failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable")
        }
    }
}

fn json_response(code: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error(code: StatusCode, message: &str) -> Response<Body> {
    json_response(code, json!({"error": message}))
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
