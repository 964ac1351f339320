//! A small async client of PROTOCOL.md (feature `client`): connect, hello, subscribe with
//! positions, and on any loss of the connection, reconnect with backoff and resume, so that the
//! application sees every message of its channels once, in order.
//!
//! ```no_run
//! # async fn run() -> Result<(), shared::client::ClientError> {
//! use shared::client::{Client, ClientConfig, Event};
//! let (client, mut events) = Client::start(ClientConfig::new("ws://127.0.0.1:8080/ws"));
//! client.subscribe("news", None);
//! while let Some(event) = events.recv().await {
//!     if let Event::Message { channel, seq, data } = event {
//!         println!("{channel} #{seq}: {}", data.get());
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::frame::{numeric_id, ChannelState, Presence};
use crate::{ClientFrame, Position, ServerFrame};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a [`Client`] connects and reconnects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Where to connect; each reconnect tries the next one (nodes, or one load balancer).
    pub urls: Vec<String>,
    pub token: Option<String>,
    /// The first reconnect delay; each failed attempt doubles it, up to `max_backoff`. Every
    /// delay is multiplied by (0.5 + a random number below 1), so clients spread out.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Failed attempts in a row after which the client gives up with [`Event::Failed`].
    pub max_attempts: u32,
    /// No `pong` to an application `ping` within this: the connection is dead.
    pub pong_timeout: Duration,
    /// Frames the client holds while it is not connected; more are refused.
    pub send_queue: usize,
}

impl ClientConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            urls: vec![url.into()],
            token: None,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            max_attempts: 10,
            pong_timeout: Duration::from_secs(10),
            send_queue: 1024,
        }
    }
}

/// What happens to a [`Client`], in order.
#[derive(Debug)]
pub enum Event {
    /// A `welcome`: a new session, or a resumed one (`resumed`), on `node`.
    Connected {
        node: String,
        session: String,
        resumed: bool,
        channels: BTreeMap<String, ChannelState>,
    },
    /// A subscription started, or restarted where continuity was lost (`recovered: false`:
    /// messages were missed).
    Subscribed {
        channel: String,
        seq: u64,
        epoch: String,
        recovered: bool,
    },
    /// A message, never a repeat of one already delivered.
    Message {
        channel: String,
        seq: u64,
        data: Box<RawValue>,
    },
    /// A subscription of a presence channel started (a `join`), where this client asked for
    /// them ([`Client::subscribe_with_presence`]).
    Joined(Presence),
    /// A subscription of a presence channel ended (a `leave`).
    Left(Presence),
    /// A reply to a publish.
    Published { channel: String, seq: u64 },
    /// An `error` frame.
    Error { code: u16, message: String },
    /// The connection was lost (close code, if one came) and the client will retry after `delay`.
    Reconnecting {
        code: Option<u16>,
        attempt: u32,
        delay: Duration,
    },
    /// The client gave up: too many failed attempts, or the server refused the token (4001).
    Failed(ClientError),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("unauthorized (close 4001): a new token is needed")]
    Unauthorized,
    #[error("gave up after {0} failed attempts: {1}")]
    GaveUp(u32, String),
    #[error("the send queue is full")]
    QueueFull,
}

/// The handle of a running client; dropping it stops the client.
pub struct Client {
    commands: mpsc::Sender<Command>,
}

enum Command {
    /// The channel, where from, and whether with its `join` and `leave` frames.
    Subscribe(String, Option<Position>, bool),
    Unsubscribe(String),
    Publish(String, Box<RawValue>),
}

impl Client {
    /// Starts the client's task, which connects at once.
    pub fn start(config: ClientConfig) -> (Client, mpsc::Receiver<Event>) {
        let (commands, command_rx) = mpsc::channel(config.send_queue);
        let (events, event_rx) = mpsc::channel(4096);
        tokio::spawn(run(config, command_rx, events));
        (Client { commands }, event_rx)
    }

    /// Subscribes, from `since` when given; the subscription is restored on every reconnect.
    pub fn subscribe(&self, channel: &str, since: Option<Position>) -> Result<(), ClientError> {
        self.command(Command::Subscribe(channel.to_owned(), since, false))
    }

    /// Subscribes as [`Client::subscribe`] does, with the channel's `join` and `leave` frames
    /// ([`Event::Joined`], [`Event::Left`]); the channel must keep presence on the server.
    pub fn subscribe_with_presence(
        &self,
        channel: &str,
        since: Option<Position>,
    ) -> Result<(), ClientError> {
        self.command(Command::Subscribe(channel.to_owned(), since, true))
    }

    pub fn unsubscribe(&self, channel: &str) -> Result<(), ClientError> {
        self.command(Command::Unsubscribe(channel.to_owned()))
    }

    pub fn publish(&self, channel: &str, data: Box<RawValue>) -> Result<(), ClientError> {
        self.command(Command::Publish(channel.to_owned(), data))
    }

    fn command(&self, command: Command) -> Result<(), ClientError> {
        self.commands
            .try_send(command)
            .map_err(|_| ClientError::QueueFull)
    }
}

/// The reconnect delay before attempt `attempt` (1-based): `initial * 2^(attempt-1)`, capped,
/// times `0.5 + jitter` with `jitter` in [0, 1).
pub fn backoff(config: &ClientConfig, attempt: u32, jitter: f64) -> Duration {
    let doubled = config
        .initial_backoff
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    doubled
        .min(config.max_backoff)
        .mul_f64(0.5 + jitter.clamp(0.0, 1.0))
}

/// What the client keeps across connections.
#[derive(Default)]
struct State {
    session: Option<String>,
    /// Subscribed channels and the last position delivered on each.
    positions: BTreeMap<String, Option<Position>>,
    /// The subscribed channels whose `join` and `leave` frames were asked for.
    presence: BTreeSet<String>,
    /// Frames waiting for a connection.
    queued: VecDeque<ClientFrame>,
    next_id: u64,
    /// Connection attempts so far: which URL is next.
    connects: usize,
}

enum Ended {
    /// The connection ended; reconnect after the backoff (`now`: at once, with jitter).
    Lost {
        code: Option<u16>,
        now: bool,
    },
    Unauthorized,
    Stopped,
}

async fn run(
    config: ClientConfig,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
) {
    let mut state = State::default();
    let mut attempt = 0u32;
    loop {
        let (code, now) = match connect(&config, &mut state, &events).await {
            Ok(ws) => {
                attempt = 0;
                match serve(&config, ws, &mut state, &mut commands, &events).await {
                    Ended::Stopped => return,
                    Ended::Unauthorized => {
                        let _ = events.send(Event::Failed(ClientError::Unauthorized)).await;
                        return;
                    }
                    Ended::Lost { code, now } => (code, now),
                }
            }
            Err(ConnectError::Unauthorized) => {
                let _ = events.send(Event::Failed(ClientError::Unauthorized)).await;
                return;
            }
            Err(ConnectError::Other(error)) => {
                if attempt >= config.max_attempts {
                    let gave_up = ClientError::GaveUp(attempt, error);
                    let _ = events.send(Event::Failed(gave_up)).await;
                    return;
                }
                (None, false)
            }
        };
        // A draining node (1001) asks for a reconnect now, spread by a little jitter.
        let delay = if now {
            Duration::from_millis(rand::random_range(0..500))
        } else {
            attempt += 1;
            backoff(&config, attempt, rand::random())
        };
        let reconnecting = Event::Reconnecting {
            code,
            attempt,
            delay,
        };
        if events.send(reconnecting).await.is_err() {
            return;
        }
        sleep(delay).await;
    }
}

enum ConnectError {
    Unauthorized,
    Other(String),
}

/// Connects, says hello (resuming the session with the client's own positions), and restores
/// what the server did not.
async fn connect(
    config: &ClientConfig,
    state: &mut State,
    events: &mpsc::Sender<Event>,
) -> Result<Ws, ConnectError> {
    let other = |e: &dyn std::fmt::Display| ConnectError::Other(e.to_string());
    let url = &config.urls[state.connects % config.urls.len().max(1)];
    state.connects += 1;
    let (mut ws, _) = timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url.as_str()),
    )
    .await
    .map_err(|e| other(&e))?
    .map_err(|e| other(&e))?;
    let since = state
        .positions
        .iter()
        .filter_map(|(channel, position)| Some((channel.clone(), position.clone()?)))
        .collect();
    let hello = ClientFrame::Hello {
        token: config.token.clone(),
        session: state.session.clone(),
        since,
    };
    send(&mut ws, &hello).await.map_err(|e| other(&e))?;
    let welcome = loop {
        match timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                break serde_json::from_str::<ServerFrame>(&text).map_err(|e| other(&e))?
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                if frame.is_some_and(|f| u16::from(f.code) == 4001) {
                    return Err(ConnectError::Unauthorized);
                }
                return Err(ConnectError::Other("closed before welcome".into()));
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(other(&e)),
            Ok(None) => return Err(ConnectError::Other("closed before welcome".into())),
            Err(e) => return Err(other(&e)),
        }
    };
    let ServerFrame::Welcome {
        session,
        node,
        resumed,
        channels,
        ..
    } = welcome
    else {
        return Err(ConnectError::Other(format!(
            "expected welcome, got {welcome:?}"
        )));
    };
    state.session = Some(session.clone());
    for (channel, restored) in &channels {
        if let Some(position) = state.positions.get_mut(channel) {
            let start = start_of(
                position.as_ref(),
                restored.seq,
                &restored.epoch,
                restored.recovered,
            );
            *position = Some(start);
        }
    }
    // Whatever the server did not restore is subscribed again, from the client's positions.
    let restore: Vec<(String, Option<Position>)> = state
        .positions
        .iter()
        .filter(|(channel, _)| !channels.contains_key(*channel))
        .map(|(channel, position)| (channel.clone(), position.clone()))
        .collect();
    for (channel, since) in restore {
        state.next_id += 1;
        let frame = ClientFrame::Subscribe {
            id: Some(numeric_id(state.next_id)),
            presence: state.presence.contains(&channel),
            channel,
            since,
        };
        send(&mut ws, &frame).await.map_err(|e| other(&e))?;
    }
    while let Some(frame) = state.queued.pop_front() {
        send(&mut ws, &frame).await.map_err(|e| other(&e))?;
    }
    let _ = events
        .send(Event::Connected {
            node,
            session,
            resumed,
            channels,
        })
        .await;
    Ok(ws)
}

async fn send(
    ws: &mut Ws,
    frame: &ClientFrame,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let text = serde_json::to_string(frame).expect("client frames serialise");
    ws.send(Message::text(text)).await
}

/// Runs one connection until it ends.
async fn serve(
    config: &ClientConfig,
    mut ws: Ws,
    state: &mut State,
    commands: &mut mpsc::Receiver<Command>,
    events: &mpsc::Sender<Event>,
) -> Ended {
    let ping_every = config.pong_timeout.max(Duration::from_secs(1));
    let mut next_ping = Instant::now() + ping_every;
    let mut pong_due: Option<Instant> = None;
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else {
                    let _ = ws.close(None).await;
                    return Ended::Stopped;
                };
                let frame = state.frame_for(command);
                if send(&mut ws, &frame).await.is_err() {
                    state.queue(frame, config.send_queue);
                    return Ended::Lost { code: None, now: false };
                }
            }
            message = ws.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.map(|f| u16::from(f.code));
                        return match code {
                            Some(4001) => Ended::Unauthorized,
                            Some(code) if code == u16::from(WsCloseCode::Away) => Ended::Lost { code: Some(code), now: true },
                            code => Ended::Lost { code, now: false },
                        };
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return Ended::Lost { code: None, now: false },
                };
                let Ok(frame) = serde_json::from_str::<ServerFrame>(&text) else { continue };
                if let Some(event) = state.on_frame(frame, &mut pong_due) {
                    if events.send(event).await.is_err() {
                        return Ended::Stopped;
                    }
                }
            }
            () = sleep_until(next_ping) => {
                next_ping += ping_every;
                state.next_id += 1;
                if send(&mut ws, &ClientFrame::Ping { id: Some(numeric_id(state.next_id)) }).await.is_err() {
                    return Ended::Lost { code: None, now: false };
                }
                pong_due.get_or_insert(Instant::now() + config.pong_timeout);
            }
            () = sleep_until(pong_due.unwrap_or(next_ping)), if pong_due.is_some() => {
                return Ended::Lost { code: None, now: false };
            }
        }
    }
}

/// Where a (re)started subscription stands: before the replay that follows when the client's
/// position was recovered (or was 0, which replays all that is retained), else at `seq`.
fn start_of(position: Option<&Position>, seq: u64, epoch: &str, recovered: bool) -> Position {
    let start = match position {
        Some(p) if p.seq == 0 || (recovered && p.epoch.as_deref() == Some(epoch)) => p.seq.min(seq),
        _ => seq,
    };
    Position {
        seq: start,
        epoch: Some(epoch.to_owned()),
    }
}

impl State {
    fn frame_for(&mut self, command: Command) -> ClientFrame {
        self.next_id += 1;
        let id = Some(numeric_id(self.next_id));
        match command {
            Command::Subscribe(channel, since, presence) => {
                self.positions.insert(channel.clone(), since.clone());
                if presence {
                    self.presence.insert(channel.clone());
                }
                ClientFrame::Subscribe {
                    id,
                    channel,
                    since,
                    presence,
                }
            }
            Command::Unsubscribe(channel) => {
                self.positions.remove(&channel);
                self.presence.remove(&channel);
                ClientFrame::Unsubscribe { id, channel }
            }
            Command::Publish(channel, data) => ClientFrame::Publish { id, channel, data },
        }
    }

    fn queue(&mut self, frame: ClientFrame, limit: usize) {
        // Subscriptions are restored from `positions`; only publishes wait in the queue.
        if matches!(frame, ClientFrame::Publish { .. }) && self.queued.len() < limit {
            self.queued.push_back(frame);
        }
    }

    /// Moves positions, drops repeats, and turns a frame into the application's event.
    fn on_frame(&mut self, frame: ServerFrame, pong_due: &mut Option<Instant>) -> Option<Event> {
        match frame {
            ServerFrame::Message { channel, seq, data } => {
                let position = self.positions.get_mut(&channel)?;
                if position.as_ref().is_some_and(|p| seq <= p.seq) {
                    return None;
                }
                let epoch = position.as_ref().and_then(|p| p.epoch.clone());
                *position = Some(Position { seq, epoch });
                Some(Event::Message { channel, seq, data })
            }
            ServerFrame::Subscribed {
                channel,
                seq,
                epoch,
                recovered,
                ..
            } => {
                if let Some(position) = self.positions.get_mut(&channel) {
                    *position = Some(start_of(position.as_ref(), seq, &epoch, recovered));
                }
                Some(Event::Subscribed {
                    channel,
                    seq,
                    epoch,
                    recovered,
                })
            }
            ServerFrame::Welcome { .. } | ServerFrame::Unsubscribed { .. } => None,
            ServerFrame::Pong { .. } => {
                *pong_due = None;
                None
            }
            ServerFrame::Published { channel, seq, .. } => Some(Event::Published { channel, seq }),
            ServerFrame::Error { code, message, .. } => Some(Event::Error { code, message }),
            ServerFrame::Refreshed { .. } => None,
            ServerFrame::Join(presence) => Some(Event::Joined(presence)),
            ServerFrame::Leave(presence) => Some(Event::Left(presence)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let config = ClientConfig::new("ws://x");
        assert_eq!(backoff(&config, 1, 0.5), Duration::from_secs(1));
        assert_eq!(backoff(&config, 2, 0.5), Duration::from_secs(2));
        assert_eq!(backoff(&config, 3, 0.5), Duration::from_secs(4));
        assert_eq!(backoff(&config, 6, 0.5), Duration::from_secs(30));
        assert_eq!(backoff(&config, 60, 0.5), Duration::from_secs(30));
        assert_eq!(backoff(&config, 1, 0.0), Duration::from_millis(500));
        assert!(backoff(&config, 1, 0.999) < Duration::from_millis(1500));
    }

    #[test]
    fn repeats_are_dropped_and_positions_move() {
        let mut state = State::default();
        state.positions.insert("c".into(), None);
        let mut pong = None;
        let subscribed = ServerFrame::Subscribed {
            id: None,
            channel: "c".into(),
            seq: 4,
            epoch: "e".into(),
            recovered: true,
        };
        assert!(state.on_frame(subscribed, &mut pong).is_some());
        let message = |seq| ServerFrame::Message {
            channel: "c".into(),
            seq,
            data: RawValue::from_string("1".into()).unwrap(),
        };
        assert!(state.on_frame(message(5), &mut pong).is_some());
        assert!(state.on_frame(message(5), &mut pong).is_none(), "a repeat");
        assert!(
            state.on_frame(message(4), &mut pong).is_none(),
            "an old one"
        );
        assert_eq!(
            state.positions["c"],
            Some(Position {
                seq: 5,
                epoch: Some("e".into())
            })
        );
    }
}
