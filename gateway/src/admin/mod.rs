//! The admin listener: health, readiness, metrics and stats for load balancers and Prometheus,
//! and the server API for back-end services (publishing, history). Never exposed to the
//! internet. Every route and its answers: `gateway/ADMIN-API.md`.
//!
//! - [`health`]: `/healthz`, `/readyz`, `/metrics`, `/v1/stats`;
//! - [`publish`]: one message, one message to many channels, many messages; idempotent;
//! - [`history`]: a channel's retained messages, read and removed;
//! - [`control`]: disconnect, unsubscribe and subscribe connections on every node;
//! - [`channels`]: the channels that have subscribers anywhere, with their counts;
//! - [`presence`]: who is subscribed to a presence channel.

mod channels;
mod control;
mod health;
mod history;
mod presence;
mod publish;

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
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::broker::BrokerError;
use crate::node::Node;

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

/// The server API's routes: each needs the API key.
const API_PATHS: [&str; 9] = [
    "/v1/channels",
    "/v1/presence",
    "/v1/publish",
    "/v1/broadcast",
    "/v1/batch",
    "/v1/history",
    "/v1/disconnect",
    "/v1/unsubscribe",
    "/v1/subscribe",
];

async fn route(req: Request<Incoming>, node: &Node) -> Response<Body> {
    let path = req.uri().path();
    if API_PATHS.contains(&path) && !authorized(&req, node) {
        return error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
    }
    match (req.method(), path) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, json!({"status": "ok"})),
        (&Method::GET, "/readyz") => health::readyz(node).await,
        (&Method::GET, "/metrics") => health::metrics(node).await,
        (&Method::GET, "/v1/stats") => health::stats(node),
        (&Method::POST, "/v1/publish") => publish::one(req, node).await,
        (&Method::POST, "/v1/broadcast") => publish::broadcast(req, node).await,
        (&Method::POST, "/v1/batch") => publish::batch(req, node).await,
        (&Method::GET, "/v1/history") => history::read(req, node).await,
        (&Method::DELETE, "/v1/history") => history::remove(req, node).await,
        (&Method::GET, "/v1/channels") => channels::list(req, node).await,
        (&Method::GET, "/v1/presence") => presence::read(req, node).await,
        (&Method::POST, "/v1/disconnect") => control::disconnect(req, node).await,
        (&Method::POST, "/v1/unsubscribe") => control::unsubscribe(req, node).await,
        (&Method::POST, "/v1/subscribe") => control::subscribe(req, node).await,
        (_, "/healthz" | "/readyz" | "/metrics" | "/v1/stats") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        (_, path) if API_PATHS.contains(&path) => {
            error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}

/// Whether the request carries the API key, compared in constant time; any request when no key
/// is set. Checked before the body is read.
fn authorized(req: &Request<Incoming>, node: &Node) -> bool {
    let Some(key) = &node.config.api_key else {
        return true;
    };
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|given| {
        constant_time_eq::constant_time_eq(given.as_bytes(), key.expose().as_bytes())
    })
}

/// The body, up to `--max-publish-bytes`; else the answer to give.
async fn read_body(req: Request<Incoming>, node: &Node) -> Result<Bytes, Response<Body>> {
    let limit = node.config.max_publish_bytes;
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            node.metrics
                .limits
                .with_label_values(&["publish_size"])
                .inc();
            Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body above the publish size limit",
            ))
        }
        Err(_) => Err(error(StatusCode::BAD_REQUEST, "could not read the body")),
    }
}

/// The answer to a broker failure: 503 when it is worth retrying, 500 otherwise.
fn broker_error(e: &BrokerError, what: &str) -> Response<Body> {
    warn!(error = %e, "admin {what} failed");
    match e {
        BrokerError::Unavailable(_) => error(StatusCode::SERVICE_UNAVAILABLE, "broker unavailable"),
        _ => error(StatusCode::INTERNAL_SERVER_ERROR, "broker error"),
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

/// The `limit` query parameter of a read: a number in `range`.
fn limit_in(value: &str, range: std::ops::RangeInclusive<usize>) -> Result<usize, String> {
    value
        .parse()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| format!("limit: {} to {}", range.start(), range.end()))
}

/// The `channel` query parameter of a read: required, and a valid name.
fn required_channel(channel: Option<String>) -> Result<String, String> {
    let channel = channel.ok_or("a channel is required: ?channel=NAME")?;
    if !shared::valid_channel(&channel) {
        return Err("invalid channel name".into());
    }
    Ok(channel)
}
