//! Client sockets spread over targets and local source addresses (127.0.0.x), because one
//! source address has only ~28k ephemeral ports towards one target.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use shared::frame::ChannelState;
use shared::{ClientFrame, Position, ServerFrame};
use tokio::net::{lookup_host, TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

#[derive(Args, Clone, Debug)]
pub struct Targets {
    /// WebSocket URLs of the nodes (or of nginx), comma-separated; clients are spread over them.
    #[arg(long, value_delimiter = ',', default_value = "ws://127.0.0.1:8080/ws")]
    pub url: Vec<String>,
    /// Admin URLs of the nodes, comma-separated: publishes and stats go there.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:9090")]
    pub admin: Vec<String>,
    /// Local source addresses of client sockets, comma-separated (127.0.0.1,127.0.0.2,...).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub sources: Vec<IpAddr>,
}

impl Targets {
    /// Opens the `i`th client socket: target and source chosen round robin.
    pub async fn open(&self, i: usize) -> anyhow::Result<Ws> {
        let (stream, url) = self.connect(i).await?;
        // Small buffers: tens of thousands of these share the machine with the gateway.
        let config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
        Ok(ws)
    }

    /// The TCP connection of the `i`th client socket, not upgraded yet, and its URL.
    pub async fn connect(&self, i: usize) -> anyhow::Result<(TcpStream, &str)> {
        let url = &self.url[i % self.url.len()];
        let source = self.sources[(i / self.url.len()) % self.sources.len()];
        let addr: SocketAddr = lookup_host(authority(url)?)
            .await?
            .next()
            .context("the target resolves")?;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok((stream, url))
    }
}

/// `host:port` of a `ws://host:port/path` URL.
pub fn authority(url: &str) -> anyhow::Result<&str> {
    url.split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .context("a ws:// URL")
}

/// Sends a frame of the protocol.
pub async fn send(ws: &mut Ws, frame: &ClientFrame) -> anyhow::Result<()> {
    ws.send(Message::text(serde_json::to_string(frame)?))
        .await?;
    Ok(())
}

/// The next frame of the protocol.
pub async fn recv(ws: &mut Ws) -> anyhow::Result<ServerFrame> {
    loop {
        match ws.next().await.context("the connection closed")?? {
            Message::Text(text) => {
                return serde_json::from_str(&text)
                    .with_context(|| format!("not a server frame: {text}"))
            }
            Message::Close(frame) => bail!("closed: {frame:?}"),
            _ => continue,
        }
    }
}

/// What a `welcome` tells the scenarios.
#[derive(Debug)]
pub struct Welcome {
    pub session: String,
    pub resumed: bool,
    pub channels: BTreeMap<String, ChannelState>,
}

/// `hello`, a resume of `session` from the positions `since` when there is one, and the
/// `welcome` it gets.
pub async fn hello(
    ws: &mut Ws,
    session: Option<&str>,
    since: BTreeMap<String, Position>,
) -> anyhow::Result<Welcome> {
    let hello = ClientFrame::Hello {
        token: None,
        session: session.map(str::to_owned),
        since,
    };
    send(ws, &hello).await?;
    match recv(ws).await? {
        ServerFrame::Welcome {
            session,
            resumed,
            channels,
            ..
        } => Ok(Welcome {
            session,
            resumed,
            channels,
        }),
        other => bail!("expected welcome, got {other:?}"),
    }
}

/// Subscribes to `channel` from now on; the channel's position that `subscribed` gives.
pub async fn subscribe(ws: &mut Ws, channel: &str) -> anyhow::Result<Position> {
    let subscribe = ClientFrame::Subscribe {
        id: None,
        channel: channel.to_owned(),
        since: None,
        presence: false,
    };
    send(ws, &subscribe).await?;
    match recv(ws).await? {
        ServerFrame::Subscribed { seq, epoch, .. } => Ok(Position {
            seq,
            epoch: Some(epoch),
        }),
        other => bail!("expected subscribed to {channel}, got {other:?}"),
    }
}

/// The seq of a `message` frame and the send time its data carries (`{"t": micros, ...}`),
/// read without parsing the whole frame: at a million deliveries a second, the measuring
/// client must cost less than the gateway it measures.
pub fn message_seq_and_time(text: &[u8]) -> Option<(u64, u64)> {
    fn number_after(text: &[u8], key: &[u8]) -> Option<(u64, usize)> {
        let start = text.windows(key.len()).position(|w| w == key)? + key.len();
        let digits = text[start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        let number = text[start..start + digits]
            .iter()
            .try_fold(0u64, |n, digit| {
                n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
            })?;
        (digits > 0).then_some((number, start + digits))
    }
    if !text.starts_with(br#"{"type":"message""#) {
        return None;
    }
    let (seq, end) = number_after(text, br#""seq":"#)?;
    let (sent, _) = number_after(&text[end..], br#""t":"#)?;
    Some((seq, sent))
}

/// Microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_seq_and_time() {
        let text =
            r#"{"type":"message","channel":"c.1","seq":42,"data":{"t":1700000000123456,"p":"xx"}}"#;
        assert_eq!(
            super::message_seq_and_time(text.as_bytes()),
            Some((42, 1_700_000_000_123_456))
        );
        assert_eq!(super::message_seq_and_time(br#"{"type":"pong"}"#), None);
        assert_eq!(
            super::message_seq_and_time(br#"{"type":"message","seq":,"data":{"t":1}}"#),
            None
        );
    }
}
