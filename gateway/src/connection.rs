//! One client connection after the upgrade: the protocol of PROTOCOL.md, its timers and limits.
//!
//! One task per connection runs two halves: the reader (frames in, timers, requests) and the
//! writer (drains the outbound queue: feeds every frame, flushes once). Everything sent to the
//! client goes through the outbound queue, so the hub, replies and closes keep one order.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use governor::clock::MonotonicClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use shared::frame::{ChannelState, Id};
use shared::{valid_channel, ClientFrame, CloseCode, ErrorCode, FrameError, Position, ServerFrame};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{sleep_until, timeout, Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, warn};

use crate::auth::Identity;
use crate::broker::{Owner, SessionRecord};
use crate::hub::Prepared;
use crate::ids;
use crate::node::Node;
use crate::outbound::{Close, Frame, Outbound};
use crate::session::{LiveSession, Positions};

/// How long a closing connection waits for the client's close reply before it lets go.
const CLOSE_LINGER: Duration = Duration::from_secs(3);

type Reply = Result<(), Close>;

/// Serves one upgraded connection until it closes.
pub async fn serve<S>(
    ws: WebSocketStream<S>,
    node: Arc<Node>,
    client: IpAddr,
    http_token: Option<String>,
    permit: OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let _permit = permit;
    node.metrics.connections.inc();
    let config = &node.config;
    let outbound = Arc::new(Outbound::new(config.max_queue_bytes));
    let positions = Arc::new(Positions::default());
    let rate = NonZeroU32::new(config.client_rate).unwrap_or(NonZeroU32::MIN);
    let mut conn = Connection {
        id: node.next_connection_id(),
        client,
        node: node.clone(),
        outbound: outbound.clone(),
        positions: positions.clone(),
        identity: None,
        session: None,
        http_token,
        limiter: RateLimiter::direct_with_clock(Quota::per_second(rate), MonotonicClock),
        expires_at: None,
    };
    let (sink, stream) = ws.split();
    tokio::select! {
        () = conn.read(stream) => {}
        () = write(sink, &outbound, &positions, &node) => {}
    }
    conn.end().await;
    node.metrics.connections.dec();
}

struct Connection {
    id: u64,
    /// The client's address (from X-Forwarded-For where a trusted proxy sent it), for logs.
    client: IpAddr,
    node: Arc<Node>,
    outbound: Arc<Outbound>,
    /// The connection's subscriptions, shared with the writer (which moves them as messages go
    /// out) and with the session saver.
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
}

impl Connection {
    async fn read<S>(&mut self, mut stream: SplitStream<WebSocketStream<S>>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = &self.node.config;
        let heartbeat = config.heartbeat_interval;
        let silence_limit = heartbeat + config.pong_timeout;
        let hello_deadline = Instant::now() + config.hello_timeout;
        let mut deadlines = Deadlines {
            ping: Instant::now() + heartbeat,
            silence: Instant::now() + silence_limit,
            hello: Some(hello_deadline),
            expiry: None,
            drain: None,
        };
        let outbound = self.outbound.clone();
        let node = self.node.clone();
        // One timer for every deadline: an idle connection holds one timer entry, not five.
        let timer = sleep_until(deadlines.next());
        tokio::pin!(timer);
        let peer_closed = loop {
            deadlines.hello = self.session.is_none().then_some(hello_deadline);
            deadlines.expiry = self.expires_at;
            if timer.deadline() != deadlines.next() {
                timer.as_mut().reset(deadlines.next());
            }
            tokio::select! {
                biased;
                _ = outbound.closed() => break false,
                () = node.closing.cancelled(), if deadlines.drain.is_none() => {
                    deadlines.drain = Some(Instant::now() + node.drain_delay());
                }
                message = stream.next() => {
                    deadlines.silence = Instant::now() + silence_limit;
                    match message {
                        None => return,
                        Some(Ok(Message::Close(_))) => break true,
                        Some(Ok(message)) => {
                            // Boxed: the state of a request (a hello that resumes a session
                            // is large) lives on the heap only while it is handled, not in
                            // every idle connection's task.
                            if let Err(close) = Box::pin(self.on_message(message)).await {
                                self.outbound.close(close.code, close.reason);
                            }
                        }
                        Some(Err(e)) => {
                            let Some(close) = read_error_close(&e) else { return };
                            self.outbound.close(close.code, close.reason);
                        }
                    }
                }
                () = &mut timer => match deadlines.due(Instant::now()) {
                    Some(Due::Drain) => self.outbound.close(CloseCode::GoingAway, "node draining"),
                    Some(Due::Expired) => self.outbound.close(CloseCode::Unauthorized, "token expired"),
                    Some(Due::Hello) => self.outbound.close(CloseCode::HelloTimeout, "no hello in time"),
                    Some(Due::Silent) => self.outbound.close(CloseCode::GoingAway, "heartbeat timeout"),
                    Some(Due::Ping) => {
                        deadlines.ping += heartbeat;
                        self.outbound.push(Frame::Ping);
                    }
                    None => {}
                },
            }
        };
        if let Some(close) = self.outbound.closing().filter(|_| !peer_closed) {
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
        }
        // Read on until the client answers the close (or the peer's close is answered), so that
        // the close frame is not lost to a reset of unread input. After a read error the stream
        // has ended at once: wait for the writer to send the close frame, which it would lose if
        // the connection ended now.
        // Boxed, like the close in the writer: the timer of a rare ending need not sit in every
        // idle connection's task.
        let outbound = &self.outbound;
        let linger = timeout(CLOSE_LINGER, async {
            while let Some(Ok(message)) = stream.next().await {
                if message.is_close() {
                    break;
                }
            }
            if outbound.closing().is_some() {
                outbound.close_written().await;
            }
        });
        let _ = Box::pin(linger).await;
    }

    async fn on_message(&mut self, message: Message) -> Reply {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return Err(close(
                    CloseCode::Unsupported,
                    "binary frames are not supported",
                ))
            }
            // Pings are answered by tungstenite; any frame shows the peer is alive.
            _ => return Ok(()),
        };
        self.node.metrics.frames_in.inc();
        if self.limiter.check().is_err() {
            self.node.metrics.limits.with_label_values(&["rate"]).inc();
            return Err(close(CloseCode::RateLimited, "rate limit exceeded"));
        }
        let frame = match ClientFrame::parse(&text) {
            Ok(frame) => frame,
            Err(FrameError::NotObject) => {
                return Err(close(
                    CloseCode::InvalidPayload,
                    "frame is not a JSON object",
                ))
            }
            Err(FrameError::BadRequest { .. }) if self.session.is_none() => {
                return Err(close(
                    CloseCode::ProtocolViolation,
                    "the first frame must be hello",
                ))
            }
            Err(FrameError::BadRequest { id, message }) => {
                self.reply(ServerFrame::error(id, ErrorCode::BadRequest, message));
                return Ok(());
            }
        };
        match (frame, self.session.is_some()) {
            (
                ClientFrame::Hello {
                    token,
                    session,
                    since,
                },
                false,
            ) => self.hello(token, session, since).await,
            (ClientFrame::Hello { .. }, true) => {
                Err(close(CloseCode::ProtocolViolation, "second hello"))
            }
            (_, false) => Err(close(
                CloseCode::ProtocolViolation,
                "the first frame must be hello",
            )),
            (ClientFrame::Subscribe { id, channel, since }, true) => {
                self.subscribe(id, channel, since).await;
                Ok(())
            }
            (ClientFrame::Unsubscribe { id, channel }, true) => {
                self.unsubscribe(id, channel).await;
                Ok(())
            }
            (ClientFrame::Publish { id, channel, data }, true) => {
                self.publish(
                    id,
                    channel,
                    Bytes::from(Box::<str>::from(data).into_boxed_bytes()),
                )
                .await;
                Ok(())
            }
            (ClientFrame::Ping { id }, true) => {
                self.reply(ServerFrame::Pong { id });
                Ok(())
            }
            (ClientFrame::Refresh { id, token }, true) => {
                self.refresh(id, token);
                Ok(())
            }
        }
    }

    async fn hello(
        &mut self,
        token: Option<String>,
        session: Option<String>,
        since: BTreeMap<String, Position>,
    ) -> Reply {
        let node = self.node.clone();
        let identity = match &node.verifier {
            None => Identity::Anonymous,
            Some(verifier) => {
                match verifier.verify(token.as_deref().or(self.http_token.as_deref())) {
                    Ok(claims) => Identity::User(claims),
                    Err(e) => {
                        debug!(conn = self.id, error = %e, "hello refused");
                        return Err(close(CloseCode::Unauthorized, "unauthorized"));
                    }
                }
            }
        };
        self.expires_at = identity.expires_in().map(|left| Instant::now() + left);
        let owner = Owner {
            node: node.id.clone(),
            conn: self.id,
        };
        let resumed = match session {
            Some(id) => self.claim(&id, identity.subject(), &owner).await?,
            None => None,
        };
        let mut prepared = Vec::new();
        let session_id = match &resumed {
            Some(record) => {
                for (channel, stored) in &record.subscriptions {
                    if !identity.may_subscribe(channel)
                        || prepared.len() >= node.config.max_subscriptions
                    {
                        continue;
                    }
                    let since = since.get(channel).unwrap_or(stored);
                    match node
                        .hub
                        .prepare(self.id, &self.outbound, channel, Some(since))
                        .await
                    {
                        Ok(p) => {
                            self.positions.insert(channel, p.start());
                            prepared.push(p);
                        }
                        Err(e) => {
                            warn!(conn = self.id, error = %e, "resume failed");
                            return Err(close(CloseCode::Internal, "broker unavailable"));
                        }
                    }
                }
                node.metrics.sessions_resumed.inc();
                record.id.clone()
            }
            None => ids::session_id(),
        };
        let live = Arc::new(LiveSession {
            id: session_id.clone(),
            subject: identity.subject().to_owned(),
            owner,
            positions: self.positions.clone(),
            outbound: self.outbound.clone(),
        });
        node.sessions.attach(live.clone());
        self.session = Some(live);
        self.identity = Some(identity);
        let channels = prepared
            .iter()
            .map(|p| {
                let state = ChannelState {
                    seq: p.seq,
                    epoch: p.epoch.to_string(),
                    recovered: p.recovered,
                };
                (p.channel.to_string(), state)
            })
            .collect();
        self.reply(ServerFrame::Welcome {
            session: session_id,
            node: node.id.clone(),
            resumed: resumed.is_some(),
            // Whole seconds, rounded up: an interval under a second is not 0 (no heartbeat).
            heartbeat: node.config.heartbeat_interval.as_millis().div_ceil(1000) as u64,
            channels,
        });
        for p in prepared {
            node.hub.activate(self.id, p);
        }
        Ok(())
    }

    /// Takes the session over when it exists and belongs to `subject`; its previous connection,
    /// wherever it is, is closed with 4009.
    async fn claim(
        &self,
        id: &str,
        subject: &str,
        owner: &Owner,
    ) -> Result<Option<SessionRecord>, Close> {
        let broker = &self.node.broker;
        let unavailable = |e| {
            warn!(conn = self.id, error = %e, "session lookup failed");
            close(CloseCode::Internal, "broker unavailable")
        };
        match broker.load_session(id).await.map_err(unavailable)? {
            Some(record) if record.subject == subject => {}
            _ => return Ok(None),
        }
        let Some(record) = broker
            .claim_session(id, owner, self.node.sessions.ttl)
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        // A previous connection on this node is closed when the session attaches here.
        if record.owner.node != owner.node {
            if let Err(e) = broker.take_over(&record.owner, id).await {
                warn!(conn = self.id, error = %e, "could not reach the session's previous node");
            }
        }
        Ok(Some(record))
    }

    async fn subscribe(&mut self, id: Option<Id>, channel: String, since: Option<Position>) {
        let node = self.node.clone();
        if !valid_channel(&channel) {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::BadRequest,
                "invalid channel name",
            ));
        }
        if !self.identity().may_subscribe(&channel) {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::Forbidden,
                "not allowed to subscribe to this channel",
            ));
        }
        if self.positions.contains(&channel) {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::BadRequest,
                "already subscribed",
            ));
        }
        if self.positions.len() >= node.config.max_subscriptions {
            return self.refuse_over_limit(
                id,
                "subscriptions",
                ErrorCode::TooMany,
                "too many subscriptions",
            );
        }
        match node
            .hub
            .prepare(self.id, &self.outbound, &channel, since.as_ref())
            .await
        {
            Ok(prepared) => {
                self.positions.insert(&channel, prepared.start());
                self.reply(prepared.subscribed_frame(id));
                node.hub.activate(self.id, prepared);
                self.save_soon();
            }
            Err(e) => {
                warn!(conn = self.id, channel, error = %e, "subscribe failed");
                self.reply(ServerFrame::error(
                    id,
                    ErrorCode::Unavailable,
                    "broker unavailable",
                ));
            }
        }
    }

    async fn unsubscribe(&mut self, id: Option<Id>, channel: String) {
        if !self.positions.remove(&channel) {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::NotSubscribed,
                "not subscribed",
            ));
        }
        self.node.hub.remove(self.id, &channel).await;
        self.save_soon();
        self.reply(ServerFrame::Unsubscribed { id, channel });
    }

    async fn publish(&mut self, id: Option<Id>, channel: String, data: Bytes) {
        let node = self.node.clone();
        if !valid_channel(&channel) {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::BadRequest,
                "invalid channel name",
            ));
        }
        if !self
            .identity()
            .may_publish(&channel, node.config.client_publish)
        {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::Forbidden,
                "not allowed to publish to this channel",
            ));
        }
        if data.len() > node.config.max_publish_bytes {
            return self.refuse_over_limit(
                id,
                "publish_size",
                ErrorCode::TooLarge,
                "message too large",
            );
        }
        match node.publish(&channel, data).await {
            Ok(published) => self.reply(ServerFrame::Published {
                id,
                channel,
                seq: published.seq,
            }),
            Err(e) => {
                warn!(conn = self.id, channel, error = %e, "publish failed");
                self.reply(ServerFrame::error(
                    id,
                    ErrorCode::Unavailable,
                    "broker unavailable",
                ));
            }
        }
    }

    fn refresh(&mut self, id: Option<Id>, token: String) {
        let Some(verifier) = &self.node.verifier else {
            return self.reply(ServerFrame::Refreshed { id, expires: None });
        };
        let claims = match verifier.verify(Some(&token)) {
            Ok(claims) => claims,
            Err(e) => {
                debug!(conn = self.id, error = %e, "refresh refused");
                return self.reply(ServerFrame::error(
                    id,
                    ErrorCode::Unauthorized,
                    "invalid token",
                ));
            }
        };
        if claims.subject != self.identity().subject() {
            return self.reply(ServerFrame::error(
                id,
                ErrorCode::Forbidden,
                "token of another subject",
            ));
        }
        let identity = Identity::User(claims);
        self.expires_at = identity.expires_in().map(|left| Instant::now() + left);
        let expires = identity.expires();
        self.identity = Some(identity);
        self.reply(ServerFrame::Refreshed { id, expires });
    }

    /// The set of subscriptions changed: the session is saved now, not at the next interval.
    fn save_soon(&self) {
        if let Some(session) = &self.session {
            self.node.sessions.save_soon(session.clone());
        }
    }

    /// Refuses a request that a limit stops, and counts the limit.
    fn refuse_over_limit(&self, id: Option<Id>, limit: &str, code: ErrorCode, message: &str) {
        self.node.metrics.limits.with_label_values(&[limit]).inc();
        self.reply(ServerFrame::error(id, code, message));
    }

    fn identity(&self) -> &Identity {
        self.identity.as_ref().unwrap_or(&Identity::Anonymous)
    }

    fn reply(&self, frame: ServerFrame) {
        self.outbound.push(Frame::Reply(frame.to_json().into()));
    }

    /// Leaves the hub and hands the session to the saver, which keeps it for the TTL.
    async fn end(&mut self) {
        for channel in self.positions.channels() {
            self.node.hub.remove(self.id, &channel).await;
        }
        if let Some(session) = self.session.take() {
            self.node.sessions.detach(&session);
        }
    }
}

impl Prepared {
    /// The position a subscription starts from: before its replay, or at the channel's top.
    fn start(&self) -> Position {
        Position {
            seq: self.first_replayed().map_or(self.seq, |seq| seq - 1),
            epoch: Some(self.epoch.to_string()),
        }
    }
}

/// When each of a connection's timers is due.
struct Deadlines {
    /// The next WebSocket ping.
    ping: Instant,
    /// Heartbeat interval + pong timeout after the last frame from the client.
    silence: Instant,
    /// Until `hello`.
    hello: Option<Instant>,
    /// The token's expiry.
    expiry: Option<Instant>,
    /// This connection's slot of the drain window.
    drain: Option<Instant>,
}

enum Due {
    Drain,
    Expired,
    Hello,
    Silent,
    Ping,
}

impl Deadlines {
    fn next(&self) -> Instant {
        [self.hello, self.expiry, self.drain]
            .into_iter()
            .flatten()
            .fold(self.ping.min(self.silence), Instant::min)
    }

    /// The deadline that has passed, the one that closes first.
    fn due(&self, now: Instant) -> Option<Due> {
        let passed = |at: Option<Instant>| at.is_some_and(|at| at <= now);
        if passed(self.drain) {
            Some(Due::Drain)
        } else if passed(self.expiry) {
            Some(Due::Expired)
        } else if passed(self.hello) {
            Some(Due::Hello)
        } else if self.silence <= now {
            Some(Due::Silent)
        } else if self.ping <= now {
            Some(Due::Ping)
        } else {
            None
        }
    }
}

fn close(code: CloseCode, reason: &'static str) -> Close {
    Close { code, reason }
}

/// The close a read error calls for; `None` when the socket is gone and nothing can be sent.
fn read_error_close(error: &WsError) -> Option<Close> {
    match error {
        WsError::Capacity(_) => Some(close(CloseCode::TooBig, "frame too large")),
        WsError::Utf8(_) => Some(close(CloseCode::InvalidPayload, "invalid UTF-8")),
        WsError::Protocol(_) => Some(close(CloseCode::ProtocolError, "WebSocket protocol error")),
        _ => None,
    }
}

/// Drains the outbound queue into the socket: every queued frame is fed, then one flush. After
/// a close frame it waits for the reader, which sees the close handshake through. Returns when
/// the socket fails.
async fn write<S>(
    mut sink: SplitSink<WebSocketStream<S>, Message>,
    outbound: &Outbound,
    positions: &Positions,
    node: &Node,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = StdInstant::now();
    loop {
        let (frames, close) = outbound.next_batch().await;
        positions.advance(frames.iter().filter_map(|frame| match frame {
            Frame::Message(m) => Some((&*m.channel, m.seq, None)),
            Frame::Subscribed {
                channel,
                seq,
                epoch,
                ..
            } => Some((&**channel, *seq, Some(&**epoch))),
            _ => None,
        }));
        let count = frames.len() as u64;
        for frame in frames {
            let message = match frame {
                Frame::Message(m) => Message::Text(m.text.clone()),
                Frame::Subscribed { text, .. } | Frame::Reply(text) => Message::Text(text),
                Frame::Ping => Message::Ping(Bytes::new()),
            };
            if sink.feed(message).await.is_err() {
                return;
            }
        }
        node.metrics.frames_out.inc_by(count);
        if let Some(close) = close {
            let frame = CloseFrame {
                code: WsCloseCode::from(close.code.code()),
                reason: close.reason.into(),
            };
            let _ = Box::pin(timeout(
                CLOSE_LINGER,
                sink.send(Message::Close(Some(frame))),
            ))
            .await;
            outbound.set_close_written();
            debug!(lived = ?started.elapsed(), "close sent");
            return std::future::pending().await;
        }
        // A client that stops reading blocks the flush; a close asked for meanwhile (a slow
        // consumer) is sent after what is already buffered.
        tokio::select! {
            flushed = sink.flush() => if flushed.is_err() { return },
            _ = outbound.closed() => {}
        }
    }
}
