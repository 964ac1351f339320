//! A subscriber socket read without a WebSocket library, for `fanout`: at a million deliveries
//! a second on the cores the gateway uses too, a library's copy of every payload into a message
//! of its own, its UTF-8 check and a wake per message were more of the client's CPU than the
//! reading itself, and what the client spends the gateway cannot. The frames are those of
//! [`crate::scale_ws`]; this adds the handshake, a read buffer and pongs.

use std::ops::Range;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::scale_ws::{self as ws, client_frame};
use crate::socket::{authority, Targets};

pub use crate::scale_ws::{CLOSE, PING, TEXT};

/// Big enough for everything a busy subscriber's socket holds at once.
const BUFFER: usize = 16 * 1024;

pub struct Socket {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` read and not yet taken, from `start` to `end`.
    start: usize,
    end: usize,
}

/// Opens the `i`th socket of `targets`, says `hello` and subscribes to `channel`: the socket,
/// and the seq `subscribed` gave.
pub async fn subscribe(
    targets: &Targets,
    i: usize,
    channel: &str,
) -> anyhow::Result<(Socket, u64)> {
    let (mut stream, url) = targets.connect(i).await?;
    anyhow::ensure!(url.ends_with("/ws"), "{url}: the gateway's path is /ws");
    stream
        .write_all(ws::upgrade_request(authority(url)?).as_bytes())
        .await?;
    let mut socket = Socket {
        stream,
        buf: vec![0; BUFFER],
        start: 0,
        end: 0,
    };
    loop {
        anyhow::ensure!(socket.read().await?, "closed during the upgrade");
        match ws::upgrade_response(&socket.buf[..socket.end]) {
            Ok(Some(len)) => {
                socket.start = len;
                break;
            }
            Ok(None) => continue,
            Err(status) => anyhow::bail!("upgrade refused: {status}"),
        }
    }
    socket.send(br#"{"type":"hello"}"#).await?;
    socket.reply(br#""type":"welcome""#).await?;
    let subscribe = serde_json::to_vec(&shared::ClientFrame::Subscribe {
        id: None,
        channel: channel.to_owned(),
        since: None,
        presence: false,
    })?;
    socket.send(&subscribe).await?;
    let subscribed = socket.reply(br#""type":"subscribed""#).await?;
    let seq = ws::number_after(&subscribed, br#""seq":"#).context("subscribed has a seq")?;
    Ok((socket, seq))
}

impl Socket {
    /// Reads what the socket has; `false` when the peer closed it.
    pub async fn read(&mut self) -> anyhow::Result<bool> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        anyhow::ensure!(self.end < self.buf.len(), "a frame larger than the buffer");
        let read = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += read;
        Ok(read > 0)
    }

    /// The next whole frame read: its opcode and payload.
    pub fn next_frame(&mut self) -> anyhow::Result<Option<(u8, &[u8])>> {
        let Some((opcode, payload, len)) = self.frame()? else {
            return Ok(None);
        };
        self.start += len;
        Ok(Some((opcode, &self.buf[payload])))
    }

    fn frame(&self) -> anyhow::Result<Option<(u8, Range<usize>, usize)>> {
        let frame =
            ws::server_frame(&self.buf[self.start..self.end]).map_err(anyhow::Error::msg)?;
        Ok(frame.map(|(opcode, payload, len)| {
            let payload = self.start + payload.start..self.start + payload.end;
            (opcode, payload, len)
        }))
    }

    pub async fn pong(&mut self, payload: Vec<u8>) -> anyhow::Result<()> {
        let frame = client_frame(ws::PONG, &payload, rand::random());
        Ok(self.stream.write_all(&frame).await?)
    }

    async fn send(&mut self, text: &[u8]) -> anyhow::Result<()> {
        let frame = client_frame(TEXT, text, rand::random());
        Ok(self.stream.write_all(&frame).await?)
    }

    /// The next text frame, which must hold `kind`.
    async fn reply(&mut self, kind: &[u8]) -> anyhow::Result<Vec<u8>> {
        loop {
            while let Some((opcode, payload)) = self.next_frame()? {
                if opcode == TEXT {
                    let text = payload.to_vec();
                    anyhow::ensure!(
                        text.windows(kind.len()).any(|w| w == kind),
                        "expected {}, got {}",
                        String::from_utf8_lossy(kind),
                        String::from_utf8_lossy(&text)
                    );
                    return Ok(text);
                }
            }
            anyhow::ensure!(self.read().await?, "the connection closed");
        }
    }
}
