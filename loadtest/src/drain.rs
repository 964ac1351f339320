//! `drain`: clients (the reconnecting client of `shared::client`) listen through a cluster
//! while messages flow; one node is sent SIGTERM mid-stream. Reports how long its clients took
//! to resume elsewhere, and whether anything was lost.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args as ClapArgs;
use serde_json::value::RawValue;
use shared::admin::AdminClient;
use shared::client::{Client, ClientConfig, Event};
use tokio::sync::{mpsc, watch};

use crate::report::{percentiles, progress, Report};
use crate::socket::Targets;

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    targets: Targets,
    /// Clients, all on one channel; client i starts on URL i mod the URL count.
    #[arg(short = 'n', long, default_value_t = 100)]
    clients: usize,
    /// Publishes a second.
    #[arg(short = 'r', long, default_value_t = 50)]
    rate: u64,
    /// How long to publish.
    #[arg(short = 't', long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The process id of the node to drain (a node you started).
    #[arg(long)]
    pid: u32,
    /// When to send SIGTERM, after publishing starts.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    after: Duration,
    /// How long clients may take to catch up after publishing stops.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    grace: Duration,
}

/// What one client saw: messages, and how long each resume after a 1001 took.
struct Seen {
    seqs: Vec<u64>,
    resumes: Vec<Duration>,
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let channel = format!("drain.{:08x}", rand::random::<u32>());
    let (stop, stopped) = watch::channel(false);
    let (subscribed_tx, mut subscribed) = mpsc::channel(args.clients);
    let mut clients = Vec::new();
    for i in 0..args.clients {
        let mut urls = args.targets.url.clone();
        let first = i % urls.len();
        urls.rotate_left(first);
        let mut config = ClientConfig::new(String::new());
        config.urls = urls;
        config.initial_backoff = Duration::from_millis(200);
        config.max_backoff = Duration::from_secs(2);
        let (client, events) = Client::start(config);
        client.subscribe(&channel, None)?;
        clients.push(tokio::spawn(follow(
            client,
            events,
            stopped.clone(),
            subscribed_tx.clone(),
        )));
    }
    for _ in 0..args.clients {
        subscribed.recv().await.context("every client subscribes")?;
    }

    let total = (args.rate as f64 * args.duration.as_secs_f64()) as u64;
    let bar = progress(total, "publishing");
    let mut admin = AdminClient::connect(&args.targets.admin[0], None).await?;
    let started = Instant::now();
    let mut signalled = false;
    let mut published = 0;
    for k in 0..total {
        tokio::time::sleep_until(
            (started + Duration::from_secs_f64(k as f64 / args.rate.max(1) as f64)).into(),
        )
        .await;
        if !signalled && started.elapsed() >= args.after {
            signalled = true;
            let status = std::process::Command::new("kill")
                .args(["-TERM", &args.pid.to_string()])
                .status()?;
            anyhow::ensure!(status.success(), "kill -TERM {} failed", args.pid);
        }
        let data = RawValue::from_string(k.to_string())?;
        if admin.publish(&channel, &data, None).await.is_ok() {
            published += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let until = Instant::now() + args.grace;
    tokio::time::sleep_until(until.into()).await;
    let _ = stop.send(true);

    let (mut lost, mut drained) = (0u64, 0u64);
    let mut resumes = crate::report::histogram()?;
    for client in clients {
        let seen = client.await?;
        let got: std::collections::BTreeSet<u64> = seen.seqs.iter().copied().collect();
        lost += (1..=published).filter(|seq| !got.contains(seq)).count() as u64;
        drained += u64::from(!seen.resumes.is_empty());
        for resume in seen.resumes {
            resumes.saturating_record(resume.as_micros() as u64);
        }
    }
    let mut report = Report::new("drain");
    report
        .add("clients", args.clients as u64)
        .add("published", published)
        .add("clients_moved", drained)
        .add("lost", lost);
    percentiles(&mut report, "resume", &resumes);
    Ok(report)
}

async fn follow(
    _client: Client,
    mut events: mpsc::Receiver<Event>,
    mut stopped: watch::Receiver<bool>,
    subscribed: mpsc::Sender<()>,
) -> Seen {
    let mut seen = Seen {
        seqs: Vec::new(),
        resumes: Vec::new(),
    };
    let mut lost_at: Option<Instant> = None;
    loop {
        let event = tokio::select! {
            _ = stopped.changed() => return seen,
            event = events.recv() => match event {
                Some(event) => event,
                None => return seen,
            },
        };
        match event {
            Event::Subscribed { .. } if seen.seqs.is_empty() && lost_at.is_none() => {
                let _ = subscribed.try_send(());
            }
            Event::Message { seq, .. } => seen.seqs.push(seq),
            Event::Reconnecting {
                code: Some(1001), ..
            } => {
                lost_at.get_or_insert_with(Instant::now);
            }
            Event::Connected { .. } => {
                if let Some(at) = lost_at.take() {
                    seen.resumes.push(at.elapsed());
                }
            }
            _ => {}
        }
    }
}
