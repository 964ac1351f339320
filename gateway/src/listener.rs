//! The client listener: HTTP/1.1 on `--listen`, where `GET /ws` upgrades to a WebSocket.
//! Every refusal happens before the upgrade, as an HTTP status a load balancer understands.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderMap, HeaderValue, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, ORIGIN, SEC_WEBSOCKET_ACCEPT,
    SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::connection;
use crate::handshake::{self, OriginRefusal};
use crate::node::Node;

type Body = Full<Bytes>;

/// The browser client (`gateway/web/`), built into the binary so that it stays a single file:
/// a demo page at `/`, the client's modules and its TypeScript types.
const INDEX_HTML: &str = include_str!("../web/index.html");
const CLIENT_JS: &str = include_str!("../web/client.js");
const CLIENT_D_TS: &str = include_str!("../web/client.d.ts");
const CONNECTION_JS: &str = include_str!("../web/connection.js");
const HUB_JS: &str = include_str!("../web/hub.js");
const LEADER_JS: &str = include_str!("../web/leader.js");
const SHARED_WORKER_JS: &str = include_str!("../web/shared-worker.js");

/// Accepts client sockets until `stop`, each served on a task that `tasks` tracks.
pub async fn run(
    listener: TcpListener,
    node: Arc<Node>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, most likely: let connections end before trying again.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let node = node.clone();
        let inner = tasks.clone();
        let rejections = node.metrics.rejections.clone();
        tasks.spawn(async move {
            let handshake_timeout = node.config.handshake_timeout;
            let service = service_fn(move |req| {
                let node = node.clone();
                let tasks = inner.clone();
                async move { Ok::<_, Infallible>(route(req, node, peer.ip(), &tasks)) }
            });
            let http = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            match tokio::time::timeout(handshake_timeout, http).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "client HTTP connection failed"),
                Err(_) => {
                    rejections.with_label_values(&["timeout"]).inc();
                    debug!(%peer, "handshake timeout");
                }
            }
        });
    }
}

fn route(
    req: Request<Incoming>,
    node: Arc<Node>,
    peer: IpAddr,
    tasks: &TaskTracker,
) -> Response<Body> {
    let headers = req.headers();
    let is_upgrade = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    // A handshake whose Upgrade header a proxy dropped still carries its key.
    let is_handshake = is_upgrade || headers.contains_key(SEC_WEBSOCKET_KEY);
    match req.uri().path() {
        "/ws" if is_upgrade => upgrade(req, node, peer, tasks),
        "/ws" if is_handshake => Refusal::new(
            "bad_request",
            StatusCode::UPGRADE_REQUIRED,
            "a WebSocket handshake without `Upgrade: websocket` (a proxy that drops it?)",
        )
        .answer(&node, peer, headers),
        "/ws" => status(
            StatusCode::UPGRADE_REQUIRED,
            "this is a WebSocket endpoint: connect to /ws\n",
        ),
        _ if is_handshake => Refusal::new(
            "not_found",
            StatusCode::NOT_FOUND,
            "a WebSocket handshake to another path than /ws",
        )
        .answer(&node, peer, headers),
        "/" => file("text/html; charset=utf-8", INDEX_HTML),
        "/client.js" => file("text/javascript; charset=utf-8", CLIENT_JS),
        "/client.d.ts" => file("text/plain; charset=utf-8", CLIENT_D_TS),
        "/connection.js" => file("text/javascript; charset=utf-8", CONNECTION_JS),
        "/hub.js" => file("text/javascript; charset=utf-8", HUB_JS),
        "/leader.js" => file("text/javascript; charset=utf-8", LEADER_JS),
        "/shared-worker.js" => file("text/javascript; charset=utf-8", SHARED_WORKER_JS),
        _ => status(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn upgrade(
    mut req: Request<Incoming>,
    node: Arc<Node>,
    peer: IpAddr,
    tasks: &TaskTracker,
) -> Response<Body> {
    let headers = req.headers();
    let accept = match check(&req, &node, peer) {
        Ok(accept) => accept,
        Err(refusal) => return refusal.answer(&node, peer, headers),
    };
    if !node.broker.available() {
        return Refusal::new(
            "broker_unavailable",
            StatusCode::SERVICE_UNAVAILABLE,
            "the node's broker is unavailable",
        )
        .answer(&node, peer, headers);
    }
    let Ok(permit) = node.capacity.clone().try_acquire_owned() else {
        return Refusal::new(
            "capacity",
            StatusCode::SERVICE_UNAVAILABLE,
            "node at capacity (--max-connections)",
        )
        .answer(&node, peer, headers);
    };
    let protocol = handshake::subprotocol(headers);
    let token = handshake::token(req.uri(), headers, &node.config.token_cookie);
    let client = handshake::client_address(peer, headers, &node.config.trusted_proxies);
    let upgrading = hyper::upgrade::on(&mut req);
    node.metrics.handshakes.inc();
    tasks.spawn(async move {
        // The socket itself, out of hyper's wrappers: the fan-out writes to it directly.
        match upgrading.await.map(|u| u.downcast::<TokioIo<TcpStream>>()) {
            Ok(Ok(parts)) => {
                // Copied out: the bytes are a view of hyper's 8 KiB read buffer, which would
                // live as long as the connection.
                let read_ahead = parts.read_buf.to_vec();
                drop(parts.read_buf);
                let stream = parts.io.into_inner();
                connection::serve(stream, read_ahead, node, client, token, permit).await;
            }
            Ok(Err(_)) => warn!("an upgraded connection that is not a TCP socket"),
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
    let mut response = Response::new(Body::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    if let Some(protocol) = protocol {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response
}

/// The checks of an upgrade before the node commits a connection to it, in the order a client
/// would want to learn of them: its own mistakes, then its origin, then the node's state. The
/// `Sec-WebSocket-Accept` of the answer when they pass.
fn check(req: &Request<Incoming>, node: &Node, peer: IpAddr) -> Result<String, Refusal> {
    let headers = req.headers();
    // RFC 6455 4.1: the opening handshake is HTTP/1.1 or later.
    if req.version() < Version::HTTP_11 {
        return Err(Refusal::new(
            "http_version",
            StatusCode::BAD_REQUEST,
            "WebSocket handshakes need HTTP/1.1 or later",
        ));
    }
    let version_ok = headers
        .get(SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let key = headers.get(SEC_WEBSOCKET_KEY);
    let (Some(key), true, &Method::GET) = (key, version_ok, req.method()) else {
        return Err(Refusal::new(
            "bad_request",
            StatusCode::BAD_REQUEST,
            "bad WebSocket upgrade request (GET with Sec-WebSocket-Key and version 13)",
        ));
    };
    let from_proxy = handshake::is_trusted_proxy(peer, &node.config.trusted_proxies);
    if let Err(why) = handshake::check_origin(headers, &node.config.allowed_origins, from_proxy) {
        return Err(
            Refusal::new("origin", StatusCode::FORBIDDEN, "origin not allowed").because(why),
        );
    }
    if node.is_draining() {
        return Err(Refusal::new(
            "draining",
            StatusCode::SERVICE_UNAVAILABLE,
            "node is draining",
        ));
    }
    Ok(derive_accept_key(key.as_bytes()))
}

/// A handshake answered with an HTTP status instead of 101.
struct Refusal {
    /// The label of `bgw_handshake_rejections_total`.
    reason: &'static str,
    status: StatusCode,
    /// What the client is told, in the body, and the operator, in the log.
    message: &'static str,
    /// Why the origin was refused, when it was.
    origin: Option<OriginRefusal>,
}

impl Refusal {
    fn new(reason: &'static str, status: StatusCode, message: &'static str) -> Self {
        Self {
            reason,
            status,
            message,
            origin: None,
        }
    }

    fn because(self, origin: OriginRefusal) -> Self {
        Self {
            origin: Some(origin),
            ..self
        }
    }

    /// Counts the refusal and logs it at info, with what an operator needs to see why (never the
    /// query string, which may carry a token), then answers it.
    fn answer(self, node: &Node, peer: IpAddr, headers: &HeaderMap) -> Response<Body> {
        node.metrics
            .rejections
            .with_label_values(&[self.reason])
            .inc();
        let client = handshake::client_address(peer, headers, &node.config.trusted_proxies);
        let from_proxy = handshake::is_trusted_proxy(peer, &node.config.trusted_proxies);
        let shown = |value: Option<&str>| value.unwrap_or("-").to_owned();
        let header = |name| {
            shown(
                headers
                    .get(name)
                    .and_then(|v: &HeaderValue| v.to_str().ok()),
            )
        };
        match self.origin {
            Some(why) => info!(
                %peer,
                %client,
                reason = self.reason,
                status = self.status.as_u16(),
                origin = header(ORIGIN),
                host = shown(handshake::request_host(headers, from_proxy)),
                allowed_origins = ?node.config.allowed_origins,
                "handshake refused: {why}"
            ),
            None => info!(
                %peer,
                %client,
                reason = self.reason,
                status = self.status.as_u16(),
                "handshake refused: {}",
                self.message
            ),
        }
        let mut response = status(self.status, "");
        *response.body_mut() = Body::from(format!("{}\n", self.message));
        if self.status == StatusCode::BAD_REQUEST {
            response
                .headers_mut()
                .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
        response
    }
}

/// One of the built-in files; `no-cache` so that a browser picks up a new binary's version.
fn file(content_type: &'static str, body: &'static str) -> Response<Body> {
    let mut response = status(StatusCode::OK, body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

pub fn status(code: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = code;
    if code == StatusCode::UPGRADE_REQUIRED {
        response
            .headers_mut()
            .insert(UPGRADE, HeaderValue::from_static("websocket"));
    }
    response
}
