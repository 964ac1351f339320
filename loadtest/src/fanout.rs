//! `fanout`: S subscribers over C channels, R publishes a second for T seconds through the admin
//! API, each payload carrying its send time: deliveries a second, latency, and lost, repeated
//! and out-of-order messages, TCP segments per delivery; with `--server-pid`, the servers' CPU
//! time per delivery.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use hdrhistogram::Histogram;
use serde_json::value::RawValue;
use shared::admin::AdminClient;
use tokio::sync::watch;

use crate::delivery;
use crate::raw;
use crate::report::{percentiles, progress, Report};
use crate::socket::{message_seq_and_time, now_micros, Targets};
use crate::tcp_info;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    targets: Targets,
    /// Subscribers.
    #[arg(short = 's', long, default_value_t = 100)]
    subscribers: usize,
    /// Channels; subscriber i listens to channel i mod C.
    #[arg(short = 'c', long, default_value_t = 1)]
    channels: usize,
    /// Publishes a second, over all channels.
    #[arg(short = 'r', long, default_value_t = 100)]
    rate: u64,
    /// How long to publish.
    #[arg(short = 't', long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Payload bytes of each message (at least 29: its send time).
    #[arg(short = 'p', long, default_value_t = 64)]
    payload: usize,
    /// Publishing connections to the admin API.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// How long subscribers may take to receive the last messages after publishing stops.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Process ids of the servers (every gateway node, and Redis where used), comma-separated:
    /// reports their CPU time (utime + stime from /proc/PID/stat, in clock ticks of 10 ms)
    /// from just before the first publish until every subscriber has every message (or the
    /// grace period ends), divided by the messages subscribers received in that time.
    #[arg(long = "server-pid", value_delimiter = ',')]
    server_pids: Vec<u32>,
}

/// What one subscriber saw.
struct Seen {
    received: u64,
    repeated: u64,
    out_of_order: u64,
    unique: u64,
    latency_us: Histogram<u64>,
    /// TCP data segments received from the subscription on, less those of pings.
    segments: Option<u64>,
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let run = rand::random::<u32>();
    let channel = |i: usize| delivery::channel(run, i % args.channels);
    let targets = Arc::new(args.targets.clone());
    let (stop, stopped) = watch::channel(false);
    // One counter per subscriber: a single shared one, touched per message, would cost more
    // than the message.
    let delivered: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.subscribers).map(|_| AtomicU64::new(0)).collect());

    let bar = progress(args.subscribers as u64, "subscribing");
    let mut subscribers = Vec::with_capacity(args.subscribers);
    for i in 0..args.subscribers {
        let (socket, start) = raw::subscribe(&targets, i, &channel(i)).await?;
        let segments = tcp_info::data_segments_in(&socket.stream);
        subscribers.push(tokio::spawn(subscriber(
            socket,
            (start, segments),
            stopped.clone(),
            (delivered.clone(), i),
        )));
        bar.inc(1);
    }
    bar.finish_and_clear();

    // Publish: message k goes to channel k mod C at start + k/R.
    let total = (args.rate as f64 * args.duration.as_secs_f64()) as u64;
    let pad = delivery::padding(args.payload);
    let bar = progress(total, "publishing");
    let cpu_before = server_cpu(&args.server_pids)?;
    let started = Instant::now();
    let mut publishers = Vec::new();
    for p in 0..args.publishers.max(1) {
        let url = &args.targets.admin[p % args.targets.admin.len()];
        let mut admin = AdminClient::connect(url, None).await?;
        let (bar, pad, channels) = (
            bar.clone(),
            pad.clone(),
            (0..args.channels).map(channel).collect::<Vec<_>>(),
        );
        let (rate, step) = (args.rate.max(1), args.publishers.max(1) as u64);
        publishers.push(tokio::spawn(async move {
            let mut published = vec![0u64; channels.len()];
            let mut errors = 0u64;
            let mut k = p as u64;
            while k < total {
                let due = started + Duration::from_secs_f64(k as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let c = (k % channels.len() as u64) as usize;
                let data = RawValue::from_string(delivery::data(now_micros(), &pad))
                    .expect("the data of a delivery is JSON");
                match admin.publish(&channels[c], &data, None).await {
                    Ok(_) => published[c] += 1,
                    Err(_) => errors += 1,
                }
                bar.inc(1);
                k += step;
            }
            (published, errors)
        }));
    }
    let mut published = vec![0u64; args.channels];
    let mut publish_errors = 0;
    for task in publishers {
        let (counts, errors) = task.await?;
        published
            .iter_mut()
            .zip(counts)
            .for_each(|(sum, n)| *sum += n);
        publish_errors += errors;
    }
    let publishing = started.elapsed();
    bar.finish_and_clear();

    // Wait until every subscriber has what its channel got, or the grace period ends.
    let expected: u64 = (0..args.subscribers)
        .map(|i| published[i % args.channels])
        .sum();
    let until = Instant::now() + args.grace;
    let total_delivered = || {
        delivered
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    while total_delivered() < expected && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu_after = server_cpu(&args.server_pids)?;
    let delivered_in_window = total_delivered();
    let _ = stop.send(true);

    let mut histogram = crate::report::histogram()?;
    let (mut received, mut repeated, mut out_of_order, mut unique) = (0, 0, 0, 0);
    let mut segments = Some(0);
    for task in subscribers {
        let seen = task.await??;
        received += seen.received;
        repeated += seen.repeated;
        out_of_order += seen.out_of_order;
        unique += seen.unique;
        segments = segments.zip(seen.segments).map(|(sum, n)| sum + n);
        histogram.add(&seen.latency_us)?;
    }
    let lost = expected.saturating_sub(unique);
    let mut report = Report::new("fanout");
    report
        .add("subscribers", args.subscribers as u64)
        .add("channels", args.channels as u64)
        .add("rate", args.rate)
        .add("duration_seconds", args.duration.as_secs_f64())
        .add("payload_bytes", args.payload as u64)
        .add("published", published.iter().sum::<u64>())
        .add("publish_errors", publish_errors)
        .add("deliveries", received)
        .add(
            "deliveries_per_second",
            received as f64 / publishing.as_secs_f64(),
        )
        .add("lost", lost)
        .add("repeated", repeated)
        .add("out_of_order", out_of_order);
    percentiles(&mut report, "latency", &histogram);
    if let Some(segments) = segments {
        report.add(
            "segments_per_delivery",
            segments as f64 / received.max(1) as f64,
        );
    }
    let last_seq = published[0].max(1);
    report.add(
        "frame_bytes",
        delivery::frame(&channel(0), last_seq, &delivery::data(now_micros(), &pad)).len() as u64,
    );
    if !args.server_pids.is_empty() {
        let spent: Vec<Duration> = cpu_after
            .iter()
            .zip(&cpu_before)
            .map(|(after, before)| after.saturating_sub(*before))
            .collect();
        let total: Duration = spent.iter().sum();
        let by_pid: serde_json::Map<String, serde_json::Value> = args
            .server_pids
            .iter()
            .zip(&spent)
            .map(|(pid, cpu)| (pid.to_string(), cpu.as_secs_f64().into()))
            .collect();
        report
            .add("server_cpu_seconds", total.as_secs_f64())
            .add("server_cpu_seconds_by_pid", by_pid)
            .add("server_cpu_tick_ms", crate::cpu::tick().as_secs_f64() * 1e3)
            .add("server_deliveries", delivered_in_window)
            .add(
                "server_us_per_delivery",
                total.as_secs_f64() * 1e6 / delivered_in_window.max(1) as f64,
            );
    }
    Ok(report)
}

/// The CPU time each server process has used so far.
fn server_cpu(pids: &[u32]) -> anyhow::Result<Vec<Duration>> {
    pids.iter()
        .map(|&pid| crate::cpu::of_process(pid))
        .collect()
}

async fn subscriber(
    mut socket: raw::Socket,
    (start, segments_before): (u64, Option<u64>),
    mut stopped: watch::Receiver<bool>,
    (counters, index): (Arc<Vec<AtomicU64>>, usize),
) -> anyhow::Result<Seen> {
    let delivered = &counters[index];
    let mut seen = Seen {
        received: 0,
        repeated: 0,
        out_of_order: 0,
        unique: 0,
        latency_us: crate::report::histogram()?,
        segments: None,
    };
    let mut last = start;
    let mut pings = 0;
    'read: loop {
        tokio::select! {
            _ = stopped.changed() => break,
            read = socket.read() => if !read? { break },
        }
        while let Some((opcode, payload)) = socket.next_frame()? {
            match opcode {
                raw::TEXT => {}
                raw::PING => {
                    pings += 1;
                    let payload = payload.to_vec();
                    socket.pong(payload).await?;
                    continue;
                }
                raw::CLOSE => break 'read,
                _ => continue,
            }
            // Not a `ServerFrame`: this loop reads every delivery of the run, and the partial
            // read keeps the client cheaper than the gateway it measures.
            let Some((seq, sent)) = message_seq_and_time(payload) else {
                continue;
            };
            seen.received += 1;
            seen.latency_us
                .saturating_record(now_micros().saturating_sub(sent));
            if seq <= last {
                seen.repeated += 1;
            } else {
                if seq != last + 1 {
                    seen.out_of_order += 1;
                }
                seen.unique += 1;
                last = seq;
                delivered.store(seen.unique, Ordering::Relaxed);
            }
        }
    }
    if let (Some(before), Some(after)) =
        (segments_before, tcp_info::data_segments_in(&socket.stream))
    {
        seen.segments = Some(after.saturating_sub(before).saturating_sub(pings));
    }
    Ok(seen)
}
