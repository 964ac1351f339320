//! Stopping a node: SIGTERM or SIGINT drains it, a second signal ends it at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::node::Node;

/// Waits for SIGTERM or SIGINT.
pub async fn signalled() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Drains the node: readiness fails at once, and after the drain delay new handshakes get 503,
/// every session is saved in one batch, and every client is closed with 1001, spread over the
/// drain window, so that it resumes on another node. A second signal cuts it short.
pub async fn drain(node: Arc<Node>, connections: TaskTracker) {
    let config = &node.config;
    info!(connections = node.metrics.connections.get(), delay = ?config.drain_delay, "draining");
    node.draining.store(true, Ordering::Relaxed);
    node.metrics.draining.set(1);
    tokio::select! {
        () = tokio::time::sleep(config.drain_delay) => {}
        _ = signalled() => return warn!("second signal: exiting now"),
    }
    node.sessions.save(true).await;
    node.close_all();
    connections.close();
    tokio::select! {
        () = connections.wait() => info!("drained: every client closed"),
        () = tokio::time::sleep(config.drain_timeout) => {
            warn!(connections = node.metrics.connections.get(), "drain timeout: exiting with connections still open");
        }
        _ = signalled() => warn!(connections = node.metrics.connections.get(), "second signal: exiting now"),
    }
    node.sessions.save(false).await;
}
