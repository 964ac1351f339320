//! A connection's socket, shared: the connection's task reads from it, and whoever has frames for
//! it (the fan-out, the connection's task) writes them, in one order.
//!
//! A frame for a socket with nothing waiting is written at once by its sender, with a
//! non-blocking write: no queue, no allocation, no wake of the connection's task. Only when the
//! socket would block (or took part of a frame) does the rest wait in the connection's backlog,
//! bounded in bytes, which the connection's task writes out when the socket is writable again.
//! While a backlog waits, later frames join it, so the order on the wire is the order of sends.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use parking_lot::Mutex;
use prometheus::IntGauge;
use shared::CloseCode;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::wire;

/// Frames handed to one vectored write.
const MAX_SLICES: usize = 64;

/// Why and how the server closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub code: CloseCode,
    pub reason: &'static str,
}

pub struct Transport {
    stream: TcpStream,
    /// The most bytes that may wait in the backlog; past it the client is too slow and is closed
    /// with 4030, to resume from history, rather than holding memory for it.
    limit: usize,
    state: Mutex<State>,
    /// Wakes the connection's task: a backlog to write out, or a close asked for.
    attention: Notify,
    /// The node's gauges of backlogs, moved only when a backlog starts, changes or ends.
    gauges: BacklogGauges,
}

/// The node's gauges of bytes waiting in backlogs, and of connections with one.
#[derive(Clone)]
pub struct BacklogGauges {
    pub bytes: IntGauge,
    pub connections: IntGauge,
}

#[derive(Default)]
struct State {
    backlog: VecDeque<Bytes>,
    /// Bytes waiting in the backlog.
    bytes: usize,
    /// The head of the backlog was partly written: it goes out whole, whatever else is dropped,
    /// or the stream would be corrupt.
    head_started: bool,
    /// The close asked for; frames sent after it are dropped.
    close: Option<Close>,
    /// The close frame is written or queued: nothing may follow it on the wire.
    sealed: bool,
    /// The socket failed: there is no one left to write to.
    broken: bool,
}

impl Transport {
    pub fn new(stream: TcpStream, limit: usize, gauges: BacklogGauges) -> Self {
        Self {
            stream,
            limit,
            state: Mutex::new(State::default()),
            attention: Notify::new(),
            gauges,
        }
    }

    /// Moves the gauges by what changed in the backlog since `before` (its bytes).
    fn account(&self, state: &State, before: usize) {
        if state.bytes != before {
            self.gauges.bytes.add(state.bytes as i64 - before as i64);
            match (before, state.bytes) {
                (0, _) => self.gauges.connections.inc(),
                (_, 0) => self.gauges.connections.dec(),
                _ => {}
            }
        }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends frames after everything sent before them. Returns false when they were dropped: the
    /// connection is closing, or it just passed its backlog limit and is now closing with 4030.
    /// `counted` frames count against the limit; a replay from history does not, since it is
    /// bounded by history, and a client that resumes after a 4030 must not be closed again by it.
    pub fn send(&self, frames: &[Bytes], counted: bool) -> bool {
        let mut state = self.state.lock();
        if state.close.is_some() || state.sealed || state.broken {
            return false;
        }
        if counted && !state.backlog.is_empty() {
            let len: usize = frames.iter().map(Bytes::len).sum();
            if state.bytes + len > self.limit {
                let before = state.bytes;
                state.drop_backlog();
                self.account(&state, before);
                state.close = Some(Close {
                    code: CloseCode::SlowConsumer,
                    reason: "slow consumer",
                });
                drop(state);
                self.attention.notify_one();
                return false;
            }
        }
        self.write_or_queue(&mut state, frames);
        true
    }

    /// Asks the connection's task to close with `code`, after the frames already sent. The first
    /// close asked for wins.
    pub fn close(&self, code: CloseCode, reason: &'static str) {
        let mut state = self.state.lock();
        if state.close.is_none() && !state.sealed {
            state.close = Some(Close { code, reason });
            drop(state);
            self.attention.notify_one();
        }
    }

    /// The close asked for, if any.
    pub fn closing(&self) -> Option<Close> {
        self.state.lock().close
    }

    /// Writes (or queues) the close frame after everything already sent; nothing follows it.
    pub fn seal(&self, close: Close) {
        let mut state = self.state.lock();
        if state.sealed || state.broken {
            return;
        }
        state.close.get_or_insert(close);
        self.write_or_queue(&mut state, &[wire::close(close.code.code(), close.reason)]);
        state.sealed = true;
    }

    /// Whether frames wait for the socket to become writable.
    pub fn has_backlog(&self) -> bool {
        let state = self.state.lock();
        !state.backlog.is_empty() && !state.broken
    }

    /// Bytes waiting in the backlog.
    pub fn backlog_bytes(&self) -> usize {
        self.state.lock().bytes
    }

    /// Resolves when the connection's task has something to do: a backlog or a close.
    pub async fn attention(&self) {
        self.attention.notified().await;
    }

    /// Writes as much of the backlog as the socket takes now. Returns true once it is empty; an
    /// error when the socket failed.
    pub fn write_backlog(&self) -> io::Result<bool> {
        let mut state = self.state.lock();
        let before = state.bytes;
        let result = self.write_backlog_locked(&mut state);
        self.account(&state, before);
        result
    }

    fn write_backlog_locked(&self, state: &mut State) -> io::Result<bool> {
        while !state.backlog.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = state.backlog.len().min(MAX_SLICES);
            for (slice, frame) in slices.iter_mut().zip(&state.backlog) {
                *slice = IoSlice::new(frame);
            }
            match self.stream.try_write_vectored(&slices[..count]) {
                Ok(written) => state.consume(written),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    state.broken = true;
                    state.drop_backlog();
                    return Err(e);
                }
            }
        }
        Ok(true)
    }

    /// Writes what the socket takes of `frames` now and queues the rest; behind a backlog, all
    /// of it waits.
    fn write_or_queue(&self, state: &mut State, frames: &[Bytes]) {
        let before = state.bytes;
        self.queue_unwritten(state, frames);
        self.account(state, before);
    }

    fn queue_unwritten(&self, state: &mut State, frames: &[Bytes]) {
        let mut written = 0;
        if state.backlog.is_empty() {
            match write_now(&self.stream, frames) {
                Ok(n) => written = n,
                Err(_) => {
                    // The connection's task finds the socket failed when it reads next.
                    state.broken = true;
                    self.attention.notify_one();
                    return;
                }
            }
        }
        let was_empty = state.backlog.is_empty();
        for frame in frames {
            if written >= frame.len() {
                written -= frame.len();
                continue;
            }
            let mut rest = frame.clone();
            if written > 0 {
                rest.advance(written);
                written = 0;
                state.head_started = true;
            }
            state.bytes += rest.len();
            state.backlog.push_back(rest);
        }
        if was_empty && !state.backlog.is_empty() {
            self.attention.notify_one();
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        let bytes = self.state.get_mut().bytes;
        if bytes > 0 {
            self.gauges.bytes.sub(bytes as i64);
            self.gauges.connections.dec();
        }
    }
}

impl State {
    /// Drops the backlog, except a partly written head.
    fn drop_backlog(&mut self) {
        let keep = usize::from(self.head_started);
        self.backlog.truncate(keep);
        self.bytes = self.backlog.front().map_or(0, Bytes::len);
    }

    /// Takes `written` bytes off the front of the backlog.
    fn consume(&mut self, mut written: usize) {
        self.bytes -= written;
        while written > 0 {
            let head = self.backlog.front_mut().expect("written bytes were queued");
            if written < head.len() {
                head.advance(written);
                self.head_started = true;
                return;
            }
            written -= head.len();
            self.backlog.pop_front();
            self.head_started = false;
        }
    }
}

/// Writes what the socket takes of `frames` without blocking; returns how many bytes.
fn write_now(stream: &TcpStream, frames: &[Bytes]) -> io::Result<usize> {
    let mut total = 0;
    let mut first = 0;
    let mut skip = 0;
    while first < frames.len() {
        let result = if frames.len() - first == 1 {
            stream.try_write(&frames[first][skip..])
        } else {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = (frames.len() - first).min(MAX_SLICES);
            for (i, slice) in slices.iter_mut().take(count).enumerate() {
                let frame = &frames[first + i];
                *slice = IoSlice::new(if i == 0 { &frame[skip..] } else { frame });
            }
            stream.try_write_vectored(&slices[..count])
        };
        let mut written = match result {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += written;
        while written > 0 {
            let left = frames[first].len() - skip;
            if written < left {
                skip += written;
                written = 0;
            } else {
                written -= left;
                first += 1;
                skip = 0;
            }
        }
    }
    Ok(total)
}

/// The socket as tungstenite sees it: it reads the client's frames from the socket, and what it
/// writes itself (the answer to a ping, the echo of a client's close) joins the connection's
/// order of frames.
pub struct Io(pub Arc<Transport>);

impl Read for Io {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.stream.try_read(buf)
    }
}

impl Write for Io {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.0.state.lock();
        if !state.sealed && !state.broken {
            self.0
                .write_or_queue(&mut state, &[Bytes::copy_from_slice(buf)]);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (accepted.unwrap().0, client.unwrap())
    }

    /// A socket whose peer does not read: the kernel's buffers fill, then writes would block.
    fn small_buffers(server: &TcpStream, client: &TcpStream) {
        socket2::SockRef::from(server)
            .set_send_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(client)
            .set_recv_buffer_size(4096)
            .unwrap();
    }

    fn gauges() -> BacklogGauges {
        BacklogGauges {
            bytes: IntGauge::new("b", "b").unwrap(),
            connections: IntGauge::new("c", "c").unwrap(),
        }
    }

    fn frame(i: u32, len: usize) -> Bytes {
        let mut body = format!("{i:08}").into_bytes();
        body.resize(len, b'.');
        wire::text(&body)
    }

    /// Writes the backlog out as the socket takes it, as the connection's task does.
    async fn write_out(transport: &Transport) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while !transport.write_backlog().unwrap() {
            tokio::time::timeout_at(deadline, transport.stream().writable())
                .await
                .expect("the backlog drains")
                .unwrap();
        }
    }

    /// Everything the peer reads, until `total` bytes.
    async fn read_all(peer: &mut TcpStream, total: usize) -> Vec<u8> {
        let mut out = vec![0; total];
        peer.read_exact(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn frames_blocked_mid_frame_come_out_whole_and_in_order() {
        let (server, mut client) = pair().await;
        small_buffers(&server, &client);
        let transport = Transport::new(server, usize::MAX, gauges());
        let frames: Vec<Bytes> = (0..400).map(|i| frame(i, 1000)).collect();
        let mut expected = Vec::new();
        // Singles and batches, as the fan-out sends them.
        for batch in frames.chunks(3) {
            assert!(transport.send(&batch[..1], true));
            assert!(transport.send(&batch[1..], true));
            batch.iter().for_each(|f| expected.extend_from_slice(f));
        }
        assert!(
            transport.has_backlog(),
            "a peer that does not read blocks the socket"
        );
        let reader =
            tokio::spawn(async move { read_all(&mut client, expected.len()).await == expected });
        write_out(&transport).await;
        assert!(reader.await.unwrap(), "bytes in order and whole");
        assert_eq!(
            transport.gauges.bytes.get(),
            0,
            "the gauges follow the backlog"
        );
        assert_eq!(transport.gauges.connections.get(), 0);
    }

    #[tokio::test]
    async fn a_full_backlog_closes_with_4030_after_the_partly_written_frame() {
        let (server, mut client) = pair().await;
        small_buffers(&server, &client);
        let transport = Transport::new(server, 20_000, gauges());
        let mut sent = 0;
        while transport.send(&[frame(sent, 1000)], true) {
            sent += 1;
            assert!(sent < 100_000, "the limit bites");
        }
        assert_eq!(
            transport.closing().map(|c| c.code),
            Some(CloseCode::SlowConsumer)
        );
        assert!(
            !transport.send(&[frame(0, 10)], true),
            "nothing after the close"
        );
        transport.seal(transport.closing().unwrap());
        // The client reads: complete frames, then the close frame, nothing cut.
        let reader = tokio::spawn(async move {
            let mut bytes = Vec::new();
            client.read_to_end(&mut bytes).await.unwrap();
            bytes
        });
        write_out(&transport).await;
        drop(transport);
        let bytes = reader.await.unwrap();
        let frame_len = frame(0, 1000).len();
        let (data, close) = bytes.split_at(bytes.len() - wire::close(4030, "slow consumer").len());
        assert_eq!(
            data.len() % frame_len,
            0,
            "only whole frames before the close"
        );
        assert_eq!(close, &wire::close(4030, "slow consumer")[..]);
    }
}
