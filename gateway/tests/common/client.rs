//! A WebSocket client that speaks the protocol with the `shared` frame types, every read with a
//! deadline; and the names and positions tests give it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use shared::frame::{numeric_id, ChannelState};
use shared::{ClientFrame, Position, ServerFrame};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::wait::DEADLINE;

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

/// An upgrade request to `url` with `headers` (an `Origin`, a `Cookie`...).
pub fn upgrade_request(url: &str, headers: &[(&str, &str)]) -> Request {
    let mut request = url.into_client_request().expect("a valid request");
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("a header name");
        let value = HeaderValue::from_str(value).expect("a header value");
        request.headers_mut().insert(name, value);
    }
    request
}

/// The HTTP status of a refused upgrade.
pub fn refusal_status(result: Result<Client, WsError>) -> u16 {
    match result {
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, got an upgrade"),
    }
}
