//! The node's report of its channels: every `--node-report-interval`, the local subscriber
//! count of each channel that has any goes to the broker, which keeps it for three intervals.
//! `GET /v1/channels` sums the live reports of every node; a node that stops reporting (killed,
//! partitioned) drops out when its report expires. The same loop refreshes the slots of the
//! node's connections for `--max-connections-per-user` ([`crate::user_limit`]). The members of
//! presence channels have their own reports ([`crate::presence::announcer`]).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::node::Node;

/// Reports until `stop`.
pub async fn run_reporter(node: Arc<Node>, stop: CancellationToken) {
    let interval = node.config.node_report_interval;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if !node.broker.available() {
            continue;
        }
        let counts = node.hub.channel_counts();
        if let Err(e) = node.broker.report_channels(&counts, interval * 3).await {
            debug!(error = %e, "reporting channels failed");
        }
        let live = node.sessions.live();
        if let Err(e) = node.user_connections.refresh(&live).await {
            debug!(error = %e, "refreshing the users' connection slots failed");
        }
    }
}
