//! `publish`: K concurrent HTTP clients publish through one node's admin API as fast as it
//! answers, for T: publishes a second, latency percentiles, and errors. Each client keeps one
//! keep-alive connection and waits for each answer before the next publish (a closed loop, as
//! `wrk` with K connections), so the figure is what the node sustains, not what was offered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use clap::Args as ClapArgs;
use serde_json::value::RawValue;
use shared::admin::{AdminClient, PublishRequest};

use crate::report::{histogram, percentiles, Report};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Admin URL of the node.
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    admin: String,
    /// Bearer key of the admin API, where the node requires one.
    #[arg(long, env = "BGW_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Concurrent clients, each with its own connection.
    #[arg(short = 'k', long, default_value_t = 32)]
    clients: usize,
    /// Channels; publishes go round robin over them.
    #[arg(short = 'c', long, default_value_t = 1)]
    channels: usize,
    /// Bytes of each message's data.
    #[arg(short = 'p', long, default_value_t = 100)]
    payload: usize,
    /// How long to publish.
    #[arg(short = 't', long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

/// What one client did.
struct Done {
    published: u64,
    errors: u64,
    latency_us: hdrhistogram::Histogram<u64>,
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let run = rand::random::<u32>();
    // A JSON string of exactly `payload` bytes, quotes included.
    let data = RawValue::from_string(format!(
        "\"{}\"",
        "x".repeat(args.payload.saturating_sub(2))
    ))?;
    // Each channel's body is encoded once: the loop then sends the same bytes again and again.
    let bodies = (0..args.channels.max(1))
        .map(|i| {
            let body = serde_json::to_vec(&PublishRequest {
                channel: &format!("pub.{run:08x}.{i}"),
                data: &data,
                idempotency_key: None,
            })?;
            Ok(Bytes::from(body))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bodies = Arc::new(bodies);
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut clients = Vec::with_capacity(args.clients);
    for k in 0..args.clients {
        let admin = AdminClient::connect(&args.admin, args.api_key.as_deref()).await?;
        let client = Client { admin };
        let bodies = bodies.clone();
        clients.push(tokio::spawn(client.publish_until(deadline, bodies, k)));
    }
    let mut total = Done {
        published: 0,
        errors: 0,
        latency_us: histogram()?,
    };
    for client in clients {
        let done = client.await??;
        total.published += done.published;
        total.errors += done.errors;
        total.latency_us.add(&done.latency_us)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut report = Report::new("publish");
    report
        .add("clients", args.clients)
        .add("channels", args.channels)
        .add("payload_bytes", args.payload)
        .add("seconds", elapsed)
        .add("published", total.published)
        .add("errors", total.errors)
        .add("publishes_per_s", total.published as f64 / elapsed);
    percentiles(&mut report, "latency", &total.latency_us);
    Ok(report)
}

/// One publishing client: an admin API connection of its own.
struct Client {
    admin: AdminClient,
}

impl Client {
    /// Publishes one message after another until the deadline, client `k` starting at channel
    /// `k`. A failed publish counts as an error; a broken connection ends the run.
    async fn publish_until(
        mut self,
        deadline: Instant,
        bodies: Arc<Vec<Bytes>>,
        k: usize,
    ) -> anyhow::Result<Done> {
        let mut done = Done {
            published: 0,
            errors: 0,
            latency_us: histogram()?,
        };
        let mut next = k;
        while Instant::now() < deadline {
            let body = bodies[next % bodies.len()].clone();
            next += 1;
            let sent = Instant::now();
            let status = self.publish(body).await?;
            if status == 200 {
                done.published += 1;
                done.latency_us
                    .record(sent.elapsed().as_micros().max(1) as u64)?;
            } else {
                done.errors += 1;
            }
        }
        Ok(done)
    }

    async fn publish(&mut self, body: Bytes) -> anyhow::Result<u16> {
        let status = self.admin.post("/v1/publish", body).await?.status;
        if status == 401 {
            bail!("the admin API refused the key (401)");
        }
        Ok(status.as_u16())
    }
}
