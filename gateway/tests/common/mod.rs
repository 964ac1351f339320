//! The test harness: starts the real `gateway` binary on loopback ports and drives it over real
//! sockets, with the `shared` protocol types.
//!
//! - [`Gateway`]: one node process, killed by its pid when dropped (its logs are printed when
//!   the test failed);
//! - [`Client`]: a WebSocket client that speaks the protocol, every read with a deadline;
//! - [`RawWs`]: a hand-made WebSocket over raw TCP, for frames no library client would send;
//! - [`Admin`]: a keep-alive HTTP client of the admin listener;
//! - tokens: HS256, RS256 and ES256 JWTs signed with the keys of `tests/keys/`.
#![allow(dead_code)] // each test file uses its own part of the harness

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use shared::frame::{numeric_id, ChannelState};
use shared::{ClientFrame, Position, ServerFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

/// How long any one wait of a test may take: generous, for a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// The flags that choose the broker of the conformance suite: the embedded broker by default,
/// Redis when `BGW_TEST_REDIS_URL` is set (`redis://127.0.0.1:6379/0`).
pub fn broker_flags() -> Vec<String> {
    match std::env::var("BGW_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => vec!["--redis-url".into(), url],
        _ => Vec::new(),
    }
}

/// A channel name no other test (or earlier run, on a shared Redis) uses.
pub fn channel(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}.{}.{}.{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------------
// The node process

/// One `gateway` process on `127.0.0.1:0` ports.
pub struct Gateway {
    child: Child,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The node id the gateway logged.
    pub node: String,
    /// Every line the process wrote to stderr so far.
    logs: Arc<Mutex<String>>,
}

impl Gateway {
    /// Starts `gateway` with `flags` after the listen addresses, and waits for its `listening`
    /// line. `BGW_` variables of the test's environment are not passed on.
    pub fn start(flags: &[&str]) -> Gateway {
        let mut command = Command::new(env!("CARGO_BIN_EXE_gateway"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("BGW_") {
                command.env_remove(name);
            }
        }
        command
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(flags)
            .env("BGW_LOG", "info,gateway=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn the gateway binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(String::new()));
        let (found, listening) = mpsc::channel();
        let sink = logs.clone();
        // Reads stderr to its end, so that the pipe never fills and blocks the node.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let text = line.contains(" listening ") && line.contains("client=");
                let json = line.contains(r#""message":"listening""#);
                if text || json {
                    let _ = found.send(line.clone());
                }
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let line = match listening.recv_timeout(DEADLINE) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "gateway {flags:?} did not log its addresses ({e}); its logs:\n{}",
                    logs.lock().unwrap()
                );
            }
        };
        // `name=value` in text logs; `"name":"value"` in JSON logs (`--log-format json`).
        let field = |name: &str| -> String {
            let json = format!("\"{}\":", name.trim_end_matches('='));
            line.split_whitespace()
                .find_map(|token| token.strip_prefix(name))
                .or_else(|| {
                    line.split(',')
                        .find_map(|part| part.trim_start_matches('{').strip_prefix(&json))
                })
                .unwrap_or_else(|| panic!("no `{name}` in `{line}`"))
                .trim_end_matches('}')
                .trim_matches('"')
                .to_owned()
        };
        Gateway {
            client_addr: field("client=").parse().expect("client address"),
            admin_addr: field("admin=").parse().expect("admin address"),
            node: field("node="),
            child,
            logs,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Sends SIGTERM to the process (the drain), once the process catches it: the node logs
    /// its addresses a moment before it installs its signal handlers, and a SIGTERM in between
    /// would kill it outright.
    pub fn terminate(&self) {
        let until = std::time::Instant::now() + DEADLINE;
        while !self.catches_sigterm() {
            assert!(
                std::time::Instant::now() < until,
                "the gateway never installed a SIGTERM handler"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Whether the process has a handler for SIGTERM (Linux: `SigCgt` of /proc/PID/status).
    fn catches_sigterm(&self) -> bool {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
    }

    /// Waits for the process to exit, up to `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < until,
                "the gateway did not exit within {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.client_addr)
    }

    /// An upgrade request to `/ws` (plus `query`, when not empty) that a test may add headers to.
    pub fn request(&self, query: &str) -> Request {
        let url = if query.is_empty() {
            self.ws_url()
        } else {
            format!("{}?{query}", self.ws_url())
        };
        url.into_client_request().expect("a valid request")
    }

    /// Connects to `/ws`, panicking when the upgrade fails.
    pub async fn connect(&self) -> Client {
        self.try_connect(self.request(""))
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.ws_url()))
    }

    pub async fn try_connect(&self, request: Request) -> Result<Client, WsError> {
        let (ws, response) = timeout(DEADLINE, connect_async(request))
            .await
            .expect("the upgrade timed out")?;
        Ok(Client {
            ws,
            response,
            next_id: 1,
        })
    }

    /// Connects and says an anonymous `hello`.
    pub async fn connect_hello(&self) -> (Client, Welcome) {
        let mut client = self.connect().await;
        let welcome = client.hello().await;
        (client, welcome)
    }

    /// A keep-alive connection to the admin listener.
    pub async fn admin(&self) -> Admin {
        Admin::connect(self.admin_addr).await
    }

    /// `GET path` on the admin listener, on a connection of its own.
    pub async fn get(&self, path: &str) -> (u16, String) {
        self.admin().await.get(path).await
    }

    /// `POST /v1/publish` of `data` (raw JSON text, sent as is), on a connection of its own.
    pub async fn publish(&self, channel: &str, data: &str) -> (u16, String) {
        self.admin().await.publish(channel, data).await
    }

    /// Publishes and expects `200`.
    pub async fn publish_ok(&self, channel: &str, data: &str) -> Published {
        self.admin().await.publish_ok(channel, data).await
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    /// The value of one series of `/metrics` (`bgw_closes_total{code="4030"}`), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// Polls `/metrics` until `series` reaches `at_least`.
    pub async fn wait_metric(&self, series: &str, at_least: f64) {
        self.wait_metric_until(series, |v| v >= at_least, &format!(">= {at_least}"))
            .await;
    }

    /// Polls `/metrics` until `series` satisfies `check`.
    pub async fn wait_metric_until(&self, series: &str, check: impl Fn(f64) -> bool, what: &str) {
        let until = Instant::now() + DEADLINE;
        loop {
            let value = self.metric(series).await;
            if check(value) {
                return;
            }
            assert!(
                Instant::now() < until,
                "{series} is {value}, expected {what} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Child::kill signals this process by its pid, and nothing else.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- logs of the gateway (pid {}) ----\n{}",
                self.child.id(),
                self.logs()
            );
        }
    }
}

/// The value of `series` in a Prometheus text exposition; 0 when absent.
/// The node's logs once `ready` holds for them, or a panic at the deadline.
pub async fn wait_for_logs(gw: &Gateway, ready: impl Fn(&str) -> bool) -> String {
    let until = Instant::now() + DEADLINE;
    loop {
        let logs = gw.logs();
        if ready(&logs) {
            return logs;
        }
        assert!(Instant::now() < until, "the logs never showed it:\n{logs}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().expect("a metric value"))
        })
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// WebSocket clients

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol client over tokio-tungstenite.
pub struct Client {
    pub ws: Ws,
    /// The server's answer to the upgrade.
    pub response: Response,
    next_id: u64,
}

/// A `welcome` frame.
#[derive(Debug, Clone)]
pub struct Welcome {
    pub session: String,
    pub node: String,
    pub resumed: bool,
    pub heartbeat: u64,
    pub channels: BTreeMap<String, ChannelState>,
}

/// A `subscribed` frame; `id` is the raw JSON of the id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    pub id: Option<String>,
    pub channel: String,
    pub seq: u64,
    pub epoch: String,
    pub recovered: bool,
}

/// A `message` frame; `data` is the raw JSON text as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub channel: String,
    pub seq: u64,
    pub data: String,
}

/// An `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub id: Option<String>,
    pub code: u16,
    pub message: String,
}

impl Client {
    /// A client over a WebSocket a test opened itself (through a proxy, say).
    pub fn from_parts(ws: Ws, response: Response) -> Client {
        Client {
            ws,
            response,
            next_id: 1,
        }
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        let text = serde_json::to_string(frame).expect("client frames serialise");
        self.send_text(&text).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_message(Message::text(text)).await;
    }

    pub async fn send_message(&mut self, message: Message) {
        timeout(DEADLINE, self.ws.send(message))
            .await
            .expect("send timed out")
            .expect("send failed");
    }

    /// The next message of the socket (pings and pongs included), within the deadline.
    pub async fn next_message(&mut self) -> Option<Result<Message, WsError>> {
        timeout(DEADLINE, self.ws.next())
            .await
            .unwrap_or_else(|_| panic!("nothing from the server within {DEADLINE:?}"))
    }

    /// The next text frame, skipping WebSocket pings and pongs.
    pub async fn recv_text(&mut self) -> String {
        loop {
            match self.next_message().await {
                Some(Ok(Message::Text(text))) => return text.to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next frame of the protocol.
    pub async fn recv(&mut self) -> ServerFrame {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not a server frame ({e}): {text}"))
    }

    pub async fn recv_welcome(&mut self) -> Welcome {
        match self.recv().await {
            ServerFrame::Welcome {
                session,
                node,
                resumed,
                heartbeat,
                channels,
            } => Welcome {
                session,
                node,
                resumed,
                heartbeat,
                channels,
            },
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    pub async fn recv_subscribed(&mut self) -> Subscribed {
        match self.recv().await {
            ServerFrame::Subscribed {
                id,
                channel,
                seq,
                epoch,
                recovered,
            } => Subscribed {
                id: id.map(|id| id.get().to_owned()),
                channel,
                seq,
                epoch,
                recovered,
            },
            other => panic!("expected subscribed, got {other:?}"),
        }
    }

    pub async fn recv_message(&mut self) -> Msg {
        match self.recv().await {
            ServerFrame::Message { channel, seq, data } => Msg {
                channel,
                seq,
                data: data.get().to_owned(),
            },
            other => panic!("expected message, got {other:?}"),
        }
    }

    pub async fn recv_error(&mut self) -> ErrorReply {
        match self.recv().await {
            ServerFrame::Error { id, code, message } => ErrorReply {
                id: id.map(|id| id.get().to_owned()),
                code,
                message,
            },
            other => panic!("expected error, got {other:?}"),
        }
    }

    /// Reads on (skipping any frame) until the server's close frame, and returns its code and
    /// reason. Every close the server starts carries a reason, so an empty one fails.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.next_message().await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    let code = u16::from(frame.code);
                    assert!(!frame.reason.is_empty(), "close {code} without a reason");
                    return (code, frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => panic!("a close frame without a code"),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Waits for the server to drop the connection after the close handshake.
    pub async fn expect_end(&mut self) {
        loop {
            match self.next_message().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Closes the connection normally and waits for the server's side to end.
    pub async fn close(mut self) {
        let _ = timeout(DEADLINE, self.ws.close(None)).await;
        self.expect_end().await;
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub async fn send_hello(
        &mut self,
        token: Option<&str>,
        session: Option<&str>,
        since: BTreeMap<String, Position>,
    ) {
        self.send(&ClientFrame::Hello {
            token: token.map(str::to_owned),
            session: session.map(str::to_owned),
            since,
        })
        .await;
    }

    /// `hello` without token or session; expects `welcome`.
    pub async fn hello(&mut self) -> Welcome {
        self.send_hello(None, None, BTreeMap::new()).await;
        self.recv_welcome().await
    }

    /// `hello` with a token; expects `welcome`.
    pub async fn hello_token(&mut self, token: &str) -> Welcome {
        self.send_hello(Some(token), None, BTreeMap::new()).await;
        self.recv_welcome().await
    }

    /// `hello` that resumes `session`, with the client's own positions; expects `welcome`.
    pub async fn resume(
        &mut self,
        token: Option<&str>,
        session: &str,
        since: BTreeMap<String, Position>,
    ) -> Welcome {
        self.send_hello(token, Some(session), since).await;
        self.recv_welcome().await
    }

    /// Subscribes from now on; expects `subscribed` with the request's id.
    pub async fn subscribe(&mut self, channel: &str) -> Subscribed {
        self.subscribe_with(channel, None).await
    }

    /// Subscribes from a position; expects `subscribed` with the request's id.
    pub async fn subscribe_since(&mut self, channel: &str, since: Position) -> Subscribed {
        self.subscribe_with(channel, Some(since)).await
    }

    async fn subscribe_with(&mut self, channel: &str, since: Option<Position>) -> Subscribed {
        let id = self.id();
        self.send(&ClientFrame::Subscribe {
            id: Some(numeric_id(id)),
            channel: channel.to_owned(),
            since,
            presence: false,
        })
        .await;
        let subscribed = self.recv_subscribed().await;
        assert_eq!(subscribed.id, Some(id.to_string()), "{subscribed:?}");
        assert_eq!(subscribed.channel, channel);
        subscribed
    }

    /// Sends `ping` with an id; the next frame must be the `pong` that echoes it.
    pub async fn ping(&mut self) {
        let id = self.id();
        self.send(&ClientFrame::Ping {
            id: Some(numeric_id(id)),
        })
        .await;
        match self.recv().await {
            ServerFrame::Pong { id: Some(echoed) } => assert_eq!(echoed.get(), id.to_string()),
            other => panic!("expected pong {id}, got {other:?}"),
        }
    }

    /// Receives `count` messages of `channel` and checks that their seqs follow `after`.
    pub async fn recv_run(&mut self, channel: &str, after: u64, count: u64) -> Vec<Msg> {
        let mut run = Vec::new();
        for expected in after + 1..=after + count {
            let message = self.recv_message().await;
            assert_eq!(
                (message.channel.as_str(), message.seq),
                (channel, expected),
                "{message:?}"
            );
            run.push(message);
        }
        run
    }
}

/// A position in a channel's sequence.
pub fn position(seq: u64, epoch: Option<&str>) -> Position {
    Position {
        seq,
        epoch: epoch.map(str::to_owned),
    }
}

/// A hand-made WebSocket client over raw TCP, for what a library client refuses to send
/// (reserved bits, unmasked frames, invalid UTF-8) or for a client that never reads.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawWs {
    /// Opens a TCP connection and upgrades it on `/ws`.
    pub async fn connect(addr: SocketAddr) -> RawWs {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = timeout(DEADLINE, stream.read(&mut chunk))
                .await
                .expect("upgrade response timed out")
                .expect("read");
            assert!(n > 0, "connection closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "accept key: {head}"
        );
        buf.drain(..end);
        RawWs { stream, buf }
    }

    /// Writes one frame: `first` is the FIN, RSV and opcode byte; `mask` masks the payload as a
    /// client must.
    pub async fn send_frame(&mut self, first: u8, payload: &[u8], mask: bool) {
        let mut frame = vec![first];
        let mask_bit = if mask { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(mask_bit | n as u8),
            n if n <= u16::MAX as usize => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if mask {
            let key = [0x37, 0xfa, 0x21, 0x3d];
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        self.stream.write_all(&frame).await.expect("write frame");
    }

    /// A masked text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(0x81, text.as_bytes(), true).await;
    }

    /// Reads one frame: its opcode and payload; `None` when the server closed the socket.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        self.try_read_frame(DEADLINE)
            .await
            .expect("nothing from the server within the deadline")
    }

    /// Reads one frame, or gives up after `wait` (`Err`).
    pub async fn try_read_frame(
        &mut self,
        wait: Duration,
    ) -> Result<Option<(u8, Vec<u8>)>, tokio::time::error::Elapsed> {
        let until = Instant::now() + wait;
        loop {
            if let Some((opcode, payload, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(Some((opcode, payload)));
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = match tokio::time::timeout_at(until, self.stream.read(&mut chunk)).await? {
                Ok(n) => n,
                Err(_) => return Ok(None),
            };
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads frames until the server's close frame; returns its code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.read_frame().await {
                Some((0x8, payload)) => {
                    assert!(payload.len() > 2, "close frame without code and reason");
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    let reason = String::from_utf8(payload[2..].to_vec()).expect("UTF-8 reason");
                    return (code, reason);
                }
                Some(_) => continue,
                None => panic!("the server closed the socket without a close frame"),
            }
        }
    }
}

/// One server frame (unmasked) at the start of `buf`: opcode, payload, bytes used.
fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "the server masked a frame");
    let (len, start) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buf.len() < start + len {
        return None;
    }
    Some((buf[0] & 0x0f, buf[start..start + len].to_vec(), start + len))
}

/// Sends a raw HTTP/1.1 request and returns the status and the response.
pub async fn http_raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let response = http_exchange(addr, request.as_bytes()).await;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    (status, response)
}

/// Sends raw bytes and returns what came back: the head and the body, as long as its
/// Content-Length says, or up to the end of the stream without one.
pub async fn http_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut response = Vec::new();
    let read = async {
        loop {
            if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&response[..end]).to_ascii_lowercase();
                let length = head.lines().find_map(|line| {
                    line.strip_prefix("content-length:")
                        .and_then(|n| n.trim().parse::<usize>().ok())
                });
                if length.is_some_and(|n| response.len() >= end + 4 + n) {
                    return;
                }
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => response.extend_from_slice(&chunk[..n]),
            }
        }
    };
    timeout(DEADLINE, read)
        .await
        .expect("HTTP response timed out");
    String::from_utf8_lossy(&response).into_owned()
}

/// The HTTP status of a refused upgrade.
pub fn refusal_status(result: Result<Client, WsError>) -> u16 {
    match result {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}

// ---------------------------------------------------------------------------------------------
// The admin API

/// A keep-alive HTTP/1.1 connection to the admin listener.
pub struct Admin {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

/// The answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub seq: u64,
    pub epoch: String,
}

impl Admin {
    pub async fn connect(addr: SocketAddr) -> Admin {
        let stream = TcpStream::connect(addr).await.expect("connect to admin");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("admin HTTP handshake");
        tokio::spawn(connection);
        Admin { addr, sender }
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String) {
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string());
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(Bytes::copy_from_slice(body)))
            .expect("a valid request");
        let exchange = async {
            self.sender.ready().await?;
            let response = self.sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned()))
        };
        timeout(DEADLINE, exchange)
            .await
            .unwrap_or_else(|_| panic!("{method} {path} timed out"))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    pub async fn get(&mut self, path: &str) -> (u16, String) {
        self.request("GET", path, &[], b"").await
    }

    /// `POST /v1/publish` with `data` as raw JSON text.
    pub async fn publish(&mut self, channel: &str, data: &str) -> (u16, String) {
        let body = publish_body(channel, data);
        self.request(
            "POST",
            "/v1/publish",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
        .await
    }

    pub async fn publish_ok(&mut self, channel: &str, data: &str) -> Published {
        let (status, body) = self.publish(channel, data).await;
        assert_eq!(status, 200, "publish to {channel}: {body}");
        let reply: Value = serde_json::from_str(&body).expect("JSON answer");
        assert_eq!(reply["channel"], channel, "{body}");
        Published {
            seq: reply["seq"].as_u64().expect("seq"),
            epoch: reply["epoch"].as_str().expect("epoch").to_owned(),
        }
    }
}

/// The body of an admin publish, with `data` copied verbatim.
pub fn publish_body(channel: &str, data: &str) -> String {
    format!(
        r#"{{"channel":{},"data":{data}}}"#,
        serde_json::to_string(channel).unwrap()
    )
}

// ---------------------------------------------------------------------------------------------
// Tokens

/// The HS256 secret of the tests.
pub const SECRET: &str = "integration-test-secret-5b2f0c6e";

/// Path of a file of `tests/keys/` (test keys, generated with openssl, used nowhere else).
pub fn key_path(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for `sub` with subscribe and publish patterns, expiring in an hour.
pub fn claims(sub: &str, channels: &[&str], publish: &[&str]) -> Value {
    json!({"sub": sub, "exp": now() + 3600, "channels": channels, "publish": publish})
}

pub fn hs256(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign HS256")
}

pub fn rs256(claims: &Value) -> String {
    let pem = std::fs::read(key_path("rsa_private.pem")).expect("RSA test key");
    let key = EncodingKey::from_rsa_pem(&pem).expect("RSA key");
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &key).expect("sign RS256")
}

pub fn es256(claims: &Value) -> String {
    let pem = std::fs::read(key_path("ec_private.pem")).expect("EC test key");
    let key = EncodingKey::from_ec_pem(&pem).expect("EC key");
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &key).expect("sign ES256")
}

/// A token with `alg: none` and no signature.
pub fn unsigned(claims: &Value) -> String {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

/// Base64url without padding, as JWTs use it.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}
