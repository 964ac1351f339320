//! `connections`: ramp to N idle connections, hold them, and measure the handshake rate and
//! the gateway's resident memory per connection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use futures_util::StreamExt;
use serde_json::Value;
use shared::admin::AdminClient;
use tokio::sync::{watch, Semaphore};

use crate::report::{progress, Report};
use crate::socket::{self, Targets};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    targets: Targets,
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    connections: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to hold the connections once open.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Subscribe every connection to this channel (idle otherwise).
    #[arg(long)]
    subscribe: Option<String>,
    /// Longest the ramp may take; connections not open by then count as failed.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    ramp_timeout: Duration,
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let (rss_before, connections_before) = total_stats(&args.targets.admin).await?;
    let bar = progress(args.connections as u64, "connecting");
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let failed = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = watch::channel(false);
    let targets = Arc::new(args.targets.clone());
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let permit = permits.clone().acquire_owned().await?;
        let (targets, failed, bar, mut stopped) = (
            targets.clone(),
            failed.clone(),
            bar.clone(),
            stopped.clone(),
        );
        let subscribe = args.subscribe.clone();
        tasks.push(tokio::spawn(async move {
            let opened = async {
                let mut ws = targets.open(i).await?;
                socket::hello(&mut ws, None, BTreeMap::new()).await?;
                if let Some(channel) = subscribe {
                    socket::subscribe(&mut ws, &channel).await?;
                }
                anyhow::Ok(ws)
            };
            let mut ws = match opened.await {
                Ok(ws) => ws,
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            drop(permit);
            bar.inc(1);
            // Read (and so answer pings) until told to stop.
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    message = ws.next() => if !matches!(message, Some(Ok(_))) { break },
                }
            }
        }));
        if started.elapsed() > args.ramp_timeout {
            break;
        }
    }
    // Every handshake has finished once every permit is back.
    let _all = permits.acquire_many(args.concurrency as u32).await?;
    let ramp = started.elapsed();
    bar.finish_and_clear();
    let failed = failed.load(Ordering::Relaxed);
    let open = args.connections as u64 - failed;

    // Let the nodes settle (allocator, lazily grown buffers) before reading their memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss_after, connections_after) = total_stats(&args.targets.admin).await?;
    tokio::time::sleep(args.hold).await;
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }

    let held = connections_after.saturating_sub(connections_before);
    let per_connection = (rss_after as f64 - rss_before as f64) / held.max(1) as f64;
    let mut report = Report::new("connections");
    report
        .add("connections", open)
        .add("failed", failed)
        .add("held_by_nodes", held)
        .add("ramp_seconds", ramp.as_secs_f64())
        .add("handshakes_per_second", open as f64 / ramp.as_secs_f64())
        .add("rss_before_bytes", rss_before)
        .add("rss_after_bytes", rss_after)
        .add("bytes_per_connection", per_connection);
    Ok(report)
}

/// The summed resident memory and connections of every node (`/v1/stats`).
async fn total_stats(admins: &[String]) -> anyhow::Result<(u64, u64)> {
    let (mut rss, mut connections) = (0, 0);
    for url in admins {
        let mut admin = AdminClient::connect(url, None).await?;
        let stats: Value = admin.get_json("/v1/stats").await?;
        rss += stats["rss_bytes"].as_u64().unwrap_or(0);
        connections += stats["connections"].as_u64().unwrap_or(0);
    }
    Ok((rss, connections))
}
