//! Stopping a node: SIGTERM or SIGINT drains it, a second signal ends it at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::node::Node;

/// How long a drain waits for clients to finish their close handshakes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Drains the node: readiness fails, new sockets are refused, sessions are saved, and every
/// client is closed with 1001 so that it resumes on another node. A second signal cuts it short.
pub async fn drain(node: Arc<Node>, accept: CancellationToken, connections: TaskTracker) {
    info!(connections = node.metrics.connections.get(), "draining");
    node.draining.store(true, Ordering::Relaxed);
    accept.cancel();
    node.sessions.save(true).await;
    node.closing.cancel();
    connections.close();
    tokio::select! {
        () = connections.wait() => info!("drained"),
        () = tokio::time::sleep(DRAIN_TIMEOUT) => {
            warn!(connections = node.metrics.connections.get(), "drain timeout: connections still open");
        }
        _ = signalled() => warn!("second signal: exiting now"),
    }
    node.sessions.save(false).await;
}
