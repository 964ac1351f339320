//! Raw sockets, for what no library client sends: a hand-made WebSocket (reserved bits,
//! unmasked frames, invalid UTF-8, a client that never reads) and raw HTTP requests.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use super::wait::DEADLINE;

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

/// Sends a raw upgrade request and returns the head of the answer, without waiting for the end
/// of a stream that a 101 leaves open.
pub async fn upgrade_head(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
    };
    timeout(DEADLINE, read).await.expect("upgrade response");
    String::from_utf8_lossy(&head).into_owned()
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
