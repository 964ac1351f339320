//! One client connection after the upgrade: the protocol of PROTOCOL.md, its timers and limits.
//!
//! One task per connection runs one loop: it reads the client's frames (tungstenite's parser,
//! straight from the socket), answers requests (one file each in [`requests`]), keeps the
//! connection's deadlines, writes out the backlog when the socket takes it again, and closes.
//! Deliveries do not pass through this task: the fan-out writes them to the socket itself, and
//! the [`Transport`] keeps one order for everything written.

mod deadlines;
mod requests;
mod transport;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::MonotonicClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use shared::{CloseCode, ServerFrame};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{sleep_until, Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
use tokio_tungstenite::tungstenite::{error::ProtocolError, Error as WsError, Message};
use tracing::debug;

use crate::auth::Identity;
use crate::config::Config;
use crate::node::Node;
use crate::session::{LiveSession, Positions};
use crate::wire;
use deadlines::{Deadlines, Due};
use transport::Io;
pub use transport::{BacklogGauges, Close, Transport};

/// How long a closing connection waits for the client's close reply, and for its backlog to go
/// out, before it lets go.
const CLOSE_LINGER: Duration = Duration::from_secs(3);
/// Read buffer of a connection. tungstenite's default is 128 KiB, allocated up front: client
/// frames are small (a hello with a token is well under 1 KiB and takes a read or two; a larger
/// frame gets a buffer of its size), and memory per idle connection is what a gateway is judged
/// by.
const READ_BUFFER: usize = 256;

type Reply = Result<(), Close>;

/// Serves one upgraded connection until it closes. `read_ahead` holds what the client sent
/// after its upgrade request and the HTTP server had already read.
///
/// The connection is set up before the future is made, so that the future (which every open
/// connection holds for its whole life) keeps only what the loop needs, not the arguments it
/// was built from.
pub fn serve(
    stream: TcpStream,
    read_ahead: Vec<u8>,
    node: Arc<Node>,
    client: IpAddr,
    http_token: Option<String>,
    permit: OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send {
    node.metrics.connections.inc();
    let gauges = BacklogGauges {
        bytes: node.metrics.backlog_bytes.clone(),
        connections: node.metrics.backlogged_connections.clone(),
    };
    let transport = Arc::new(Transport::new(stream, node.config.max_queue_bytes, gauges));
    let rate = NonZeroU32::new(node.config.client_rate).unwrap_or(NonZeroU32::MIN);
    let mut conn = Connection {
        id: node.next_connection_id(),
        client,
        node,
        transport,
        positions: Arc::new(Positions::default()),
        identity: None,
        session: None,
        http_token,
        limiter: RateLimiter::direct_with_clock(Quota::per_second(rate), MonotonicClock),
        expires_at: None,
        unreadable: false,
        _permit: permit,
    };
    async move {
        let node = conn.node.clone();
        // Made here, not captured: what an async block captures it holds to the end.
        let ws = WebSocket::from_partially_read(
            Io(conn.transport.clone()),
            read_ahead,
            Role::Server,
            Some(ws_config(&node.config)),
        );
        node.drain.register(conn.id, &conn.transport);
        debug!(conn = conn.id, client = %conn.client, "connection opened");
        let started = Instant::now();
        let peer_close = conn.run(ws).await;
        node.drain.unregister(conn.id);
        conn.log_end(started.elapsed(), peer_close);
        // Boxed: its state is needed once, at the end, not in every open connection.
        Box::pin(conn.end()).await;
        node.metrics.connections.dec();
    }
}

fn ws_config(config: &Config) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(config.max_frame_bytes))
        .max_frame_size(Some(config.max_frame_bytes))
}

struct Connection {
    id: u64,
    /// The client's address (from X-Forwarded-For where a trusted proxy sent it), for logs.
    client: IpAddr,
    node: Arc<Node>,
    transport: Arc<Transport>,
    /// The connection's subscriptions, shared with the session saver.
    positions: Arc<Positions>,
    /// Set by `hello`.
    identity: Option<Identity>,
    session: Option<Arc<LiveSession>>,
    /// The token of the upgrade request (query or cookie); a token in `hello` wins over it.
    http_token: Option<String>,
    /// The client's frames per second. On the std clock: the default (quanta) clock calibrates
    /// itself with CPUID for every limiter, a cost paid by every handshake.
    limiter:
        RateLimiter<NotKeyed, InMemoryState, MonotonicClock, NoOpMiddleware<std::time::Instant>>,
    /// When the token expires, unless a `refresh` comes first.
    expires_at: Option<Instant>,
    /// A frame could not be parsed: nothing more is read through the parser.
    unreadable: bool,
    /// The connection's place under `--max-connections`.
    _permit: OwnedSemaphorePermit,
}

/// What reading the socket came to.
enum Read {
    /// Everything there was is read.
    Drained,
    /// The client's close frame came, with its code (and its echo is sent, unless ours went
    /// first).
    PeerClosed(Option<u16>),
    /// The socket is gone.
    Gone,
}

impl Connection {
    /// Serves the connection until it ends; returns the client's close code when the client
    /// closed first.
    async fn run(&mut self, mut ws: WebSocket<Io>) -> Option<u16> {
        let node = self.node.clone();
        let mut deadlines = Deadlines::new(Instant::now(), &node.config);
        // One timer for every deadline: an idle connection holds one timer entry, not five.
        let timer = sleep_until(deadlines.next());
        tokio::pin!(timer);
        let mut sealed = false;
        // What the HTTP server read past the upgrade request is read first: the socket may not
        // turn readable again for it.
        let mut read_ahead = true;
        let mut peer_close = None;
        loop {
            if !sealed {
                if let Some(close) = self.transport.closing() {
                    sealed = true;
                    self.seal(close);
                    // A peer that stopped answering will not answer a close either.
                    if close.reason == HEARTBEAT_TIMEOUT {
                        return None;
                    }
                    deadlines.linger = Some(Instant::now() + CLOSE_LINGER);
                }
            }
            deadlines.hello = self.session.is_none().then_some(deadlines.hello_at);
            deadlines.expiry = self.expires_at;
            if timer.deadline() != deadlines.next() {
                timer.as_mut().reset(deadlines.next());
            }
            if std::mem::take(&mut read_ahead) {
                match Box::pin(self.read(&mut ws, &mut deadlines, sealed)).await {
                    Read::Drained => continue,
                    Read::PeerClosed(code) => {
                        peer_close = code;
                        break;
                    }
                    Read::Gone => break,
                }
            }
            // Readable, and writable too while a backlog waits: one wait on the socket.
            let interest = if self.transport.has_backlog() {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let transport = self.transport.clone();
            tokio::select! {
                biased;
                () = transport.attention() => {}
                ready = transport.stream().ready(interest) => {
                    let Ok(ready) = ready else { return None };
                    if ready.is_writable() && transport.write_backlog().is_err() {
                        return None;
                    }
                    if ready.is_readable() || ready.is_read_closed() {
                        // Boxed: an idle connection need not hold the state of a read.
                        match Box::pin(self.read(&mut ws, &mut deadlines, sealed)).await {
                            Read::Drained => {}
                            Read::PeerClosed(code) => {
                                peer_close = code;
                                break;
                            }
                            Read::Gone => break,
                        }
                    }
                }
                () = &mut timer => match deadlines.due(Instant::now()) {
                    Some(Due::Linger) => return None,
                    Some(Due::Expired) => self.transport.close(CloseCode::Unauthorized, "token expired"),
                    Some(Due::Hello) => self.transport.close(CloseCode::HelloTimeout, "no hello in time"),
                    Some(Due::Silent) => self.transport.close(CloseCode::GoingAway, HEARTBEAT_TIMEOUT),
                    Some(Due::Ping) => {
                        deadlines.ping += node.config.heartbeat_interval;
                        self.transport.send(&[wire::ping()], false);
                    }
                    None => {}
                },
            }
        }
        // The close handshake is done, or the client is gone: what waits (the echo of the
        // client's close, our close frame) goes out before the socket is let go, within the
        // linger.
        let until = deadlines
            .linger
            .unwrap_or_else(|| Instant::now() + CLOSE_LINGER);
        // Boxed: this wait happens once, at the end.
        Box::pin(self.write_out(until)).await;
        peer_close
    }

    /// Logs how the connection ended (never its token): who closed it, with which code, after
    /// how long.
    fn log_end(&self, lived: Duration, peer_close: Option<u16>) {
        let subject = self.identity.as_ref().map(Identity::subject);
        let lived_ms = lived.as_millis() as u64;
        let (closed_by, code, reason) = match (self.transport.closing(), peer_close) {
            (Some(close), _) => ("server", Some(close.code.code()), close.reason),
            (None, Some(code)) => ("client", Some(code), ""),
            (None, None) => ("network", None, "the socket ended without a close frame"),
        };
        debug!(
            conn = self.id,
            client = %self.client,
            subject,
            lived_ms,
            closed_by,
            code,
            reason,
            "connection closed"
        );
    }

    /// Writes out what waits in the backlog, until `until`.
    async fn write_out(&self, until: Instant) {
        while let Ok(false) = self.transport.write_backlog() {
            match tokio::time::timeout_at(until, self.transport.stream().writable()).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }

    /// Reads and handles every frame the socket holds now. After our close frame, frames are read
    /// only to find the client's close.
    async fn read(
        &mut self,
        ws: &mut WebSocket<Io>,
        deadlines: &mut Deadlines,
        sealed: bool,
    ) -> Read {
        if self.unreadable {
            return self.discard();
        }
        let read = self.read_frames(ws, deadlines, sealed).await;
        // What tungstenite answered on its own (a pong, the echo of a close) goes out now.
        let _ = ws.flush();
        read
    }

    async fn read_frames(
        &mut self,
        ws: &mut WebSocket<Io>,
        deadlines: &mut Deadlines,
        sealed: bool,
    ) -> Read {
        loop {
            match ws.read() {
                // 1005: the close frame carried no code (RFC 6455 7.1.5).
                Ok(Message::Close(frame)) => {
                    return Read::PeerClosed(Some(frame.map_or(1005, |f| u16::from(f.code))))
                }
                Ok(message) => {
                    deadlines.silence = Instant::now() + deadlines.silence_limit;
                    if sealed || self.transport.closing().is_some() {
                        continue;
                    }
                    // Boxed: the state of a request (a hello that resumes a session is large)
                    // lives on the heap only while it is handled, not in every idle connection.
                    if let Err(close) = Box::pin(self.on_message(message)).await {
                        self.transport.close(close.code, close.reason);
                        return Read::Drained;
                    }
                }
                Err(WsError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Read::Drained
                }
                Err(e) => {
                    let Some(close) = read_error_close(&e) else {
                        return Read::Gone;
                    };
                    // The parser's state is undefined after an error: the rest is discarded.
                    self.unreadable = true;
                    self.transport.close(close.code, close.reason);
                    return Read::Drained;
                }
            }
        }
    }

    /// Reads and drops what the client sends after a frame that could not be parsed, until it
    /// closes its side.
    fn discard(&self) -> Read {
        let mut buf = [0; 512];
        loop {
            match self.transport.stream().try_read(&mut buf) {
                Ok(0) => return Read::Gone,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Read::Drained,
                Err(_) => return Read::Gone,
            }
        }
    }

    /// Writes the close frame after everything sent before it.
    fn seal(&self, close: Close) {
        debug!(
            conn = self.id,
            client = %self.client,
            code = close.code.code(),
            reason = close.reason,
            "closing"
        );
        self.node
            .metrics
            .closes
            .with_label_values(&[&close.code.code().to_string()])
            .inc();
        self.transport.seal(close);
    }

    fn identity(&self) -> &Identity {
        self.identity.as_ref().unwrap_or(&Identity::Anonymous)
    }

    fn reply(&self, frame: ServerFrame) {
        self.node.metrics.frames_out.inc();
        self.transport
            .send(&[wire::text(frame.to_json().as_bytes())], true);
    }

    /// Leaves the hub (and presence) and hands the session to the saver, which keeps it for
    /// the TTL.
    async fn end(&mut self) {
        for channel in self.positions.channels() {
            self.node.hub.remove(self.id, &channel).await;
            if let Some(session) = &self.session {
                self.node.presence.left(session, &channel);
            }
        }
        if let Some(session) = self.session.take() {
            self.node.sessions.detach(&session);
            self.node
                .user_connections
                .release(&session.subject, self.id);
        }
    }
}

/// The reason of the close for a peer that went silent; such a peer is let go at once.
const HEARTBEAT_TIMEOUT: &str = "heartbeat timeout";

fn close(code: CloseCode, reason: &'static str) -> Close {
    Close { code, reason }
}

/// The close a read error calls for; `None` when the socket is gone and nothing can be sent.
fn read_error_close(error: &WsError) -> Option<Close> {
    match error {
        WsError::Capacity(_) => Some(close(CloseCode::TooBig, "frame too large")),
        WsError::Utf8(_) => Some(close(CloseCode::InvalidPayload, "invalid UTF-8")),
        // The client went away without a close frame: nothing to send, and not a server close.
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some(close(CloseCode::ProtocolError, "WebSocket protocol error")),
        _ => None,
    }
}
