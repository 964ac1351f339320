//! A connection's outbound queue: bounded in bytes, one per connection, shared by the hub (which
//! pushes messages), the connection (which pushes replies) and the writer (which drains it).

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use shared::CloseCode;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A `message` frame, encoded once and shared by every subscriber of its channel.
#[derive(Debug)]
pub struct MessageFrame {
    pub channel: Arc<str>,
    pub seq: u64,
    pub text: Utf8Bytes,
}

/// One frame waiting for the socket.
#[derive(Debug, Clone)]
pub enum Frame {
    Message(Arc<MessageFrame>),
    /// A `subscribed` frame: where the client now stands in the channel.
    Subscribed {
        channel: Arc<str>,
        seq: u64,
        epoch: Arc<str>,
        text: Utf8Bytes,
    },
    /// Any other frame for this connection alone.
    Reply(Utf8Bytes),
    /// A WebSocket ping, for the heartbeat.
    Ping,
}

impl Frame {
    fn len(&self) -> usize {
        match self {
            Frame::Message(m) => m.text.len(),
            Frame::Subscribed { text, .. } | Frame::Reply(text) => text.len(),
            Frame::Ping => 0,
        }
    }
}

/// Why and how the server closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub code: CloseCode,
    pub reason: &'static str,
}

pub struct Outbound {
    /// The most bytes of frames that may wait; past it the client is too slow and is closed
    /// with 4030, to resume from history, rather than holding memory for it.
    limit: usize,
    state: Mutex<State>,
    wake: Notify,
    /// Told when the writer is done with the close frame (sent, or given up on).
    close_written: Notify,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    close: Option<Close>,
    close_written: bool,
}

impl Outbound {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            close_written: Notify::new(),
        }
    }

    /// Queues a frame. Returns false when the frame was not queued: the connection is closing,
    /// or it just passed its limit and is now closing as a slow consumer.
    pub fn push(&self, frame: Frame) -> bool {
        self.queue(frame, true)
    }

    /// Queues a message replayed from history without counting it against the limit: a replay
    /// is bounded by the channel's history instead, and a client that resumes after a 4030 has at
    /// least a queue's worth of messages to replay, which must not close it again.
    pub fn push_replay(&self, frame: Frame) -> bool {
        self.queue(frame, false)
    }

    fn queue(&self, frame: Frame, counted: bool) -> bool {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return false;
        }
        if counted {
            let len = frame.len();
            if state.bytes + len > self.limit && !state.frames.is_empty() {
                state.frames.clear();
                state.bytes = 0;
                state.close = Some(Close {
                    code: CloseCode::SlowConsumer,
                    reason: "slow consumer",
                });
                drop(state);
                self.wake.notify_waiters();
                return false;
            }
            state.bytes += len;
        }
        state.frames.push_back(frame);
        let first = state.frames.len() == 1;
        drop(state);
        if first {
            self.wake.notify_waiters();
        }
        true
    }

    /// Asks the writer to close the connection after the frames already queued. The first close
    /// asked for wins.
    pub fn close(&self, code: CloseCode, reason: &'static str) {
        let mut state = self.state.lock();
        if state.close.is_none() {
            state.close = Some(Close { code, reason });
            drop(state);
            self.wake.notify_waiters();
        }
    }

    /// The close asked for, if any.
    pub fn closing(&self) -> Option<Close> {
        self.state.lock().close
    }

    /// Waits for frames or a close, and takes them all. Returns the close asked for, which
    /// follows the frames taken.
    /// The queue is handed over whole, so that an idle connection keeps no queue allocation.
    pub async fn next_batch(&self) -> (VecDeque<Frame>, Option<Close>) {
        loop {
            let notified = self.wake.notified();
            {
                let mut state = self.state.lock();
                if !state.frames.is_empty() || state.close.is_some() {
                    state.bytes = 0;
                    return (std::mem::take(&mut state.frames), state.close);
                }
            }
            notified.await;
        }
    }

    /// The writer is done with the close frame.
    pub fn set_close_written(&self) {
        self.state.lock().close_written = true;
        self.close_written.notify_waiters();
    }

    /// Resolves once the writer is done with the close frame.
    pub async fn close_written(&self) {
        loop {
            let notified = self.close_written.notified();
            if self.state.lock().close_written {
                return;
            }
            notified.await;
        }
    }

    /// Resolves once a close has been asked for.
    pub async fn closed(&self) -> Close {
        loop {
            let notified = self.wake.notified();
            if let Some(close) = self.closing() {
                return close;
            }
            notified.await;
        }
    }
}
