//! Stopping a node: SIGTERM or SIGINT drains it, a second signal ends it at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::node::Node;
use crate::session::Scan;

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

/// Drains the node: readiness fails at once, and after the drain delay new handshakes get 503,
/// every session is saved in one batch, and every client is closed with 1001, spread over the
/// drain window, so that it resumes on another node. A second signal cuts it short.
pub async fn drain(node: Arc<Node>, connections: TaskTracker, signals: &mut Signals) {
    let config = &node.config;
    info!(connections = node.metrics.connections.get(), delay = ?config.drain_delay, "draining");
    node.draining.store(true, Ordering::Relaxed);
    node.metrics.draining.set(1);
    tokio::select! {
        () = tokio::time::sleep(config.drain_delay) => {}
        () = signals.next() => return warn!("second signal: exiting now"),
    }
    node.sessions.save(Scan::All).await;
    node.close_all();
    connections.close();
    tokio::select! {
        () = connections.wait() => info!("drained: every client closed"),
        () = tokio::time::sleep(config.drain_timeout) => {
            warn!(connections = node.metrics.connections.get(), "drain timeout: exiting with connections still open");
        }
        () = signals.next() => warn!(connections = node.metrics.connections.get(), "second signal: exiting now"),
    }
    node.sessions.save(Scan::Changed).await;
}
