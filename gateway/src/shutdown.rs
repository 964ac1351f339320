//! Stopping a node, in one place: SIGTERM or SIGINT drains it, a second signal ends it at once.
//!
//! [`Drain`] is the drain's state: the readiness latch that the admin listener and the client
//! listener read, and every open connection, each closed with 1001 in its slot of the drain
//! window. [`Tasks`] are the node's long-lived tasks, tracked by name, so that the drain waits
//! for all of them and says which were still running when its deadline passed.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use shared::CloseCode;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::connection::Transport;
use crate::node::Node;
use crate::session::Scan;

/// How often the drain logs how many connections are still open.
const DRAIN_PROGRESS: Duration = Duration::from_secs(1);

/// How long the node's own tasks may take to stop once the connections are gone.
const TASKS_TIMEOUT: Duration = Duration::from_secs(5);

/// SIGTERM and SIGINT, listened for from start-up on, so that a signal that comes before the
/// first wait is not the default (immediate) exit.
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// The drain's state: whether it began, and the connections it will close.
#[derive(Default)]
pub struct Drain {
    /// The readiness latch: set once, when the drain begins.
    started: AtomicBool,
    connections: Mutex<HashMap<u64, Weak<Transport>>>,
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// A connection opens; it is closed with 1001 when the drain reaches its slot.
    pub fn register(&self, conn: u64, transport: &Arc<Transport>) {
        self.connections
            .lock()
            .insert(conn, Arc::downgrade(transport));
    }

    pub fn unregister(&self, conn: u64) {
        self.connections.lock().remove(&conn);
    }

    /// Closes every open connection with 1001, spread evenly over `window`, so that the other
    /// nodes do not take every reconnect at once.
    async fn close_all(&self, window: Duration) {
        let open: Vec<Weak<Transport>> = self.connections.lock().values().cloned().collect();
        let start = Instant::now();
        let count = open.len().max(1);
        for (slot, transport) in open.into_iter().enumerate() {
            tokio::time::sleep_until(start + window.mul_f64(slot as f64 / count as f64)).await;
            if let Some(transport) = transport.upgrade() {
                transport.close(CloseCode::GoingAway, "node draining");
            }
        }
    }
}

/// The node's long-lived tasks, by name, and the token that stops them.
#[derive(Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
    running: Arc<Mutex<BTreeMap<&'static str, usize>>>,
}

impl Tasks {
    /// Runs `task` until it ends; `name` says what it is when the drain has to wait for it.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        *self.running.lock().entry(name).or_default() += 1;
        let running = self.running.clone();
        self.tracker.spawn(async move {
            task.await;
            let mut running = running.lock();
            if let Some(count) = running.get_mut(name) {
                *count -= 1;
                if *count == 0 {
                    running.remove(name);
                }
            }
        });
    }

    /// Cancelled when the node's tasks are to stop.
    pub fn stop(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// The tasks running now: each name, and how many run under it.
    pub fn running(&self) -> Vec<(&'static str, usize)> {
        self.running
            .lock()
            .iter()
            .map(|(name, count)| (*name, *count))
            .collect()
    }

    /// Stops every task and waits for them, up to `deadline`; names those still running then.
    pub(crate) async fn stop_all(&self, deadline: Duration) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            let running: Vec<String> = self
                .running()
                .iter()
                .map(|(name, count)| format!("{name} x{count}"))
                .collect();
            warn!(still_running = ?running, "the node's tasks did not all stop in time");
        } else {
            info!("every task of the node stopped");
        }
    }
}

/// Drains the node: readiness fails at once, and after the drain delay new handshakes get 503,
/// every session is saved in one batch, and every client is closed with 1001, spread over the
/// drain window, so that it resumes on another node. Then the node's own tasks stop. A second
/// signal cuts it short.
pub async fn drain(node: Arc<Node>, connections: TaskTracker, signals: &mut Signals) {
    let config = &node.config;
    info!(connections = node.metrics.connections.get(), delay = ?config.drain_delay, "draining");
    node.drain.started.store(true, Ordering::Relaxed);
    node.metrics.draining.set(1);
    tokio::select! {
        () = tokio::time::sleep(config.drain_delay) => {}
        () = signals.next() => return warn!("second signal: exiting now"),
    }
    node.sessions.save(Scan::All).await;
    connections.close();
    let closing = async {
        node.drain.close_all(config.drain_window).await;
        info!(
            connections = node.metrics.connections.get(),
            "every client asked to go (1001)"
        );
    };
    let closed = async {
        tokio::join!(closing, connections.wait());
    };
    let progress = async {
        let mut every = tokio::time::interval(DRAIN_PROGRESS);
        every.tick().await;
        loop {
            every.tick().await;
            info!(connections = node.metrics.connections.get(), "draining");
        }
    };
    tokio::select! {
        () = closed => info!("drained: every client closed"),
        () = progress => {}
        () = tokio::time::sleep(config.drain_timeout) => {
            warn!(connections = node.metrics.connections.get(), "drain timeout: exiting with connections still open");
        }
        () = signals.next() => return warn!(connections = node.metrics.connections.get(), "second signal: exiting now"),
    }
    node.sessions.save(Scan::Changed).await;
    // The members of the closed connections leave now, not when they expire.
    node.presence.flush(TASKS_TIMEOUT).await;
    node.tasks.stop_all(TASKS_TIMEOUT).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tasks_still_running_after_the_deadline_are_named() {
        let tasks = Tasks::default();
        for _ in 0..2 {
            let stop = tasks.stop();
            tasks.spawn("stops", async move { stop.cancelled().await });
        }
        tasks.spawn("stubborn", std::future::pending());
        assert_eq!(tasks.running(), [("stops", 2), ("stubborn", 1)]);
        tasks.stop_all(Duration::from_secs(1)).await;
        assert_eq!(tasks.running(), [("stubborn", 1)]);
    }
}
