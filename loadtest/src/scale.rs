//! `scale`: many nodes on one Redis and a client spread over worker processes and source
//! addresses; ramps up through steps of connections at a bounded handshake rate, broadcasts at
//! each step and measures the time until the last connection has each message, with loss
//! counted exactly, and what every side's memory and CPU cost. At the largest size it can drain
//! one node (SIGTERM) and kill another (SIGKILL) and time their connections' resumes. Writes CSV
//! and SVG charts, and stops everything it started.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args as ClapArgs;
use hdrhistogram::Histogram;
use nix::sys::signal::Signal;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use shared::admin::AdminClient;

use crate::report::{progress, Report};
use crate::scale_chart::{self, Row, Table};
use crate::scale_cluster::{self, Cluster, Spawn};
use crate::scale_fleet::Fleet;
use crate::scale_probe;
use crate::socket::now_micros;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Connection counts to reach in turn, comma-separated (each step adds to the one before).
    #[arg(long, value_delimiter = ',', default_value = "10000")]
    steps: Vec<u64>,
    /// Nodes to start (default: enough for the largest step at --per-node each).
    #[arg(long)]
    nodes: Option<usize>,
    /// Connections a node is planned for; its --max-connections is this plus the share of two
    /// lost nodes, and stays under its open-file limit.
    #[arg(long, default_value_t = 17_500)]
    per_node: usize,
    /// Connections a worker process holds at most (under its open-file limit).
    #[arg(long, default_value_t = 18_000)]
    per_worker: usize,
    /// Use the cluster `deploy/local/up.sh` started (its state directory) instead of starting
    /// one; it is left running.
    #[arg(long)]
    cluster_dir: Option<PathBuf>,
    /// The gateway binary (default: beside this one, else `gateway` on the PATH).
    #[arg(long)]
    gateway: Option<PathBuf>,
    /// Node i listens on BASE+i for clients and BASE+1000+i for the admin API (below 32768, so
    /// never an ephemeral port of a client socket).
    #[arg(long, default_value_t = 20_000)]
    base_port: u16,
    #[arg(long, default_value_t = 16_379)]
    redis_port: u16,
    /// Worker w binds its sockets to this address + w (one source address has ~28k ports).
    #[arg(long, default_value = "127.0.1.1")]
    first_source: Ipv4Addr,
    /// Handshakes a second, all workers together.
    #[arg(long, default_value_t = 3000.0)]
    rate: f64,
    /// Channels; connection g subscribes to g mod C. A broadcast publishes to every channel.
    #[arg(short = 'c', long, default_value_t = 1)]
    channels: usize,
    /// Broadcasts at each step.
    #[arg(long, default_value_t = 10)]
    broadcasts: u64,
    /// Time between broadcasts.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// How long the connections may take to receive every broadcast of a step.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    delivery_timeout: Duration,
    /// Longest a step's ramp may take.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    ramp_timeout: Duration,
    /// The nodes' --heartbeat-interval (started nodes only).
    #[arg(long, default_value = "25s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Stop ramping when the machine's available memory falls below this (MiB).
    #[arg(long, default_value_t = 2048)]
    min_available_mib: u64,
    /// At the largest size: SIGTERM the first node and time its connections' resumes.
    #[arg(long)]
    drain: bool,
    /// At the largest size: SIGKILL the second node and time its connections' resumes.
    #[arg(long)]
    kill: bool,
    /// Time between broadcasts while a node is drained or killed (they must keep flowing, so
    /// that a loss would show; a broadcast to a million takes seconds on 2 cores).
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    loss_interval: Duration,
    /// Publishing connections to the admin API.
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    /// Where the CSV files, charts and the started cluster's logs go.
    #[arg(long, default_value = "target/scale")]
    out: PathBuf,
}

/// Every figure of the workers at one moment, summed.
#[derive(Default)]
struct Totals {
    open: u64,
    failed: u64,
    received: u64,
    gaps: u64,
    repeated: u64,
    missing: u64,
    moved: u64,
    fresh_sessions: u64,
    recovered_false: u64,
    errors: u64,
    resume_failures: u64,
    rss: u64,
    failures: serde_json::Map<String, Value>,
    rounds: std::collections::BTreeMap<u64, Histogram<u64>>,
    resume: Option<Histogram<u64>>,
    resumed_at: Option<Histogram<u64>>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds")
}

fn merge(into: &mut Histogram<u64>, buckets: &Value) {
    for bucket in buckets.as_array().into_iter().flatten() {
        let (Some(value), Some(count)) = (bucket[0].as_u64(), bucket[1].as_u64()) else {
            continue;
        };
        let _ = into.record_n(value.max(1), count);
    }
}

impl Totals {
    fn of(answers: &[Value]) -> Self {
        let mut t = Totals::default();
        let (mut resume, mut resumed_at) = (histogram(), histogram());
        for a in answers {
            let n = |key: &str| a[key].as_u64().unwrap_or(0);
            t.open += n("open");
            t.failed += n("failed");
            t.received += n("received");
            t.gaps += n("gaps");
            t.repeated += n("repeated");
            t.missing += n("missing");
            t.moved += n("moved");
            t.fresh_sessions += n("fresh_sessions");
            t.recovered_false += n("recovered_false");
            t.errors += n("errors");
            t.resume_failures += n("resume_failures");
            t.rss += n("rss");
            for (reason, count) in a["failures"].as_object().into_iter().flatten() {
                let sum = t.failures.get(reason).and_then(Value::as_u64).unwrap_or(0);
                t.failures
                    .insert(reason.clone(), (sum + count.as_u64().unwrap_or(0)).into());
            }
            for round in a["rounds"].as_array().into_iter().flatten() {
                let id = round[0].as_u64().unwrap_or(0);
                merge(t.rounds.entry(id).or_insert_with(histogram), &round[3]);
            }
            merge(&mut resume, &a["resume"][2]);
            merge(&mut resumed_at, &a["resumed_at"][2]);
        }
        t.resume = Some(resume);
        t.resumed_at = Some(resumed_at);
        t
    }
}

/// Publishes broadcast rounds: one message to every channel, each carrying its send time and
/// its round, over several admin connections at once.
struct Publisher {
    admins: Vec<AdminClient>,
    channels: Vec<String>,
    /// The last seq each channel got.
    last: Vec<u64>,
    errors: u64,
    pad: String,
}

impl Publisher {
    async fn connect(urls: &[String], count: usize, channels: Vec<String>) -> anyhow::Result<Self> {
        let mut admins = Vec::new();
        for p in 0..count.max(1) {
            admins.push(AdminClient::connect(&urls[p % urls.len()], None).await?);
        }
        Ok(Self {
            admins,
            last: vec![0; channels.len()],
            channels,
            errors: 0,
            pad: "x".repeat(16),
        })
    }

    async fn round(&mut self, round: u64) {
        let count = self.admins.len();
        let (channels, pad) = (&self.channels, &self.pad);
        let results = futures_util::future::join_all(self.admins.iter_mut().enumerate().map(
            |(p, admin)| async move {
                let mut got = Vec::new();
                for c in (p..channels.len()).step_by(count) {
                    let data = format!(r#"{{"t":{},"r":{round},"p":"{pad}"}}"#, now_micros());
                    let data = RawValue::from_string(data).expect("the data of a round is JSON");
                    got.push((c, admin.publish(&channels[c], &data, None).await));
                }
                got
            },
        ))
        .await;
        for (c, result) in results.into_iter().flatten() {
            match result {
                Ok(answer) => self.last[c] = self.last[c].max(answer.seq),
                Err(_) => self.errors += 1,
            }
        }
    }
}

struct Sample {
    node_rss: Vec<u64>,
    redis_rss: u64,
    machine: scale_probe::Machine,
}

fn sample(cluster: &Cluster) -> anyhow::Result<Sample> {
    Ok(Sample {
        node_rss: cluster
            .live_nodes()
            .map(|n| scale_probe::rss(n.pid).unwrap_or(0))
            .collect(),
        redis_rss: cluster
            .redis_pid
            .and_then(|pid| scale_probe::rss(pid).ok())
            .unwrap_or(0),
        machine: scale_probe::machine()?,
    })
}

/// CPU time so far of the live nodes (summed) and of Redis.
fn cpu(cluster: &Cluster) -> (Duration, Duration) {
    let nodes = cluster
        .live_nodes()
        .filter_map(|n| crate::cpu::of_process(n.pid).ok())
        .sum();
    let redis = cluster
        .redis_pid
        .and_then(|pid| crate::cpu::of_process(pid).ok())
        .unwrap_or_default();
    (nodes, redis)
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let largest = *args.steps.iter().max().context("at least one step")?;
    anyhow::ensure!(
        args.steps.windows(2).all(|w| w[0] < w[1]),
        "steps go upward"
    );
    let workers = (largest as usize).div_ceil(args.per_worker).max(1);
    // Where connection tracking is on, loopback connections take an entry each (and keep it
    // for minutes after they close): a full table drops SYNs silently, and the ramp stalls on
    // connect timeouts.
    if let Some(max) = scale_probe::conntrack_max() {
        if max < largest + largest / 4 + 10_000 {
            eprintln!(
                "scale: net.netfilter.nf_conntrack_max is {max}: the ramp will stall near it; \
                 raise it (sysctl -w net.netfilter.nf_conntrack_max={})",
                (largest * 2).next_power_of_two()
            );
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let out = args.out.canonicalize()?;
    let mut cluster = match &args.cluster_dir {
        Some(dir) => Cluster::attach(dir).await?,
        None => {
            let nodes = args
                .nodes
                .unwrap_or_else(|| (largest as usize).div_ceil(args.per_node))
                .max(1 + usize::from(args.drain) + usize::from(args.kill));
            // A node takes its share of two lost nodes on top of its own, within its open
            // files (20,000 here, less what it needs besides its clients): past them, accept(2)
            // fails and upgrades end without an answer instead of a 503 to go elsewhere.
            let max_connections =
                (args.per_node + 2 * args.per_node / nodes.max(3) + 500).min(19_000);
            Cluster::start(&Spawn {
                nodes,
                gateway: args
                    .gateway
                    .clone()
                    .unwrap_or_else(scale_cluster::default_gateway),
                base_port: args.base_port,
                redis_port: args.redis_port,
                max_connections,
                heartbeat: args.heartbeat,
                dir: out.clone(),
            })
            .await?
        }
    };
    // Ctrl-C or SIGTERM ends the run early: the workers are killed with the measuring future
    // (kill on drop), the nodes and Redis stopped below.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        result = measure(&args, &mut cluster, workers, &out) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated")),
    };
    if args.cluster_dir.is_none() {
        cluster.stop(Duration::from_secs(40));
    }
    result
}

async fn measure(
    args: &Args,
    cluster: &mut Cluster,
    workers: usize,
    out: &std::path::Path,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        !(args.drain || args.kill)
            || cluster.nodes.len() > usize::from(args.drain) + usize::from(args.kill),
        "draining or killing needs a node that stays"
    );
    let run = rand::random::<u32>();
    let prefix = format!("scale.{run:08x}");
    let channels: Vec<String> = (0..args.channels)
        .map(|c| format!("{prefix}.{c}"))
        .collect();
    let sources: Vec<IpAddr> = (0..workers as u32)
        .map(|w| IpAddr::V4(Ipv4Addr::from(u32::from(args.first_source) + w)))
        .collect();
    let addrs: Vec<SocketAddr> = cluster.nodes.iter().map(|n| n.client).collect();
    let nodes = cluster.nodes.len();
    let margin = args.min_available_mib * 1024 * 1024;

    let base = sample(cluster)?;
    let mut fleet = Fleet::start(&sources, &addrs, &prefix, args.channels).await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let client_base = fleet.progress().rss;
    // The publishers talk to the last nodes: the first ones may be drained or killed.
    let admin_urls: Vec<String> = cluster
        .nodes
        .iter()
        .rev()
        .map(|n| n.admin.clone())
        .collect();
    let mut publisher = Publisher::connect(&admin_urls, args.publishers, channels).await?;

    eprintln!(
        "scale: {nodes} nodes, {workers} workers from {}, {} channel(s), steps {:?}; out {}",
        args.first_source,
        args.channels,
        args.steps,
        out.display()
    );
    let mut steps: Vec<Row> = Vec::new();
    let mut rounds: Vec<Row> = Vec::new();
    let mut round_id = 0u64;
    let mut bound = String::from("none: every step was reached");
    let mut previous = Totals::default();
    let mut reached = 0u64;
    let mut result = Ok(());
    for &target in &args.steps {
        let cpu_before = cpu(cluster);
        let opened_before = fleet.progress().open;
        let started = Instant::now();
        fleet.open(target, args.rate).await?;
        let bar = progress(target, "connecting");
        let mut stopped_by: Option<String> = None;
        let (mut last_change, mut last_count) = (Instant::now(), 0);
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let p = fleet.progress();
            let available = scale_probe::machine()?.mem_available;
            bar.set_position(p.open);
            bar.set_message(format!("{} failed, {} MiB free", p.failed, available >> 20));
            if p.open + p.failed >= target {
                break;
            }
            if p.open + p.failed != last_count {
                (last_change, last_count) = (Instant::now(), p.open + p.failed);
            }
            if available < margin {
                stopped_by = Some(format!(
                    "memory: {} MiB available, under the {} MiB margin, at {} connections",
                    available >> 20,
                    args.min_available_mib,
                    p.open
                ));
            } else if started.elapsed() > args.ramp_timeout {
                stopped_by = Some(format!("the ramp took over {:?}", args.ramp_timeout));
            } else if last_change.elapsed() > Duration::from_secs(60) {
                stopped_by = Some(format!("no handshake finished for 60 s at {}", p.open));
            }
            if stopped_by.is_some() {
                fleet.hold().await?;
                // Let the handshakes in flight finish.
                tokio::time::sleep(Duration::from_secs(3)).await;
                break;
            }
        }
        bar.finish_and_clear();
        let ramp = started.elapsed();
        let cpu_ramp = cpu(cluster);
        let p = fleet.progress();
        let opened = p.open - opened_before;
        eprintln!(
            "scale: {} open ({} failed) in {:.1}s",
            p.open,
            p.failed,
            ramp.as_secs_f64()
        );
        // Let allocators and lazily grown buffers settle before reading memory.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = sample(cluster)?;
        let client_rss = fleet.progress().rss;

        // Broadcasts.
        fleet.phase(now_micros()).await?;
        let cpu_before_broadcast = cpu(cluster);
        let broadcast_started = Instant::now();
        for k in 0..args.broadcasts {
            tokio::time::sleep_until((broadcast_started + args.interval * k as u32).into()).await;
            publisher.round(round_id + k).await;
        }
        let delivered = wait_delivered(&mut fleet, &publisher.last, args.delivery_timeout).await?;
        let cpu_after_broadcast = cpu(cluster);
        let broadcast_time = broadcast_started.elapsed().as_secs_f64();
        let totals = Totals::of(
            &fleet
                .ask(json!({"cmd": "report", "last": publisher.last}))
                .await?,
        );
        let lost = totals.missing + (totals.gaps - previous.gaps);

        let mut p50s = Vec::new();
        let mut p99s = Vec::new();
        let mut maxes = Vec::new();
        for (id, h) in &totals.rounds {
            if *id < round_id {
                continue;
            }
            let ms = |v: u64| v as f64 / 1000.0;
            p50s.push(ms(h.value_at_quantile(0.5)));
            p99s.push(ms(h.value_at_quantile(0.99)));
            maxes.push(ms(h.max()));
            rounds.push(vec![
                ("connections", totals.open as f64),
                ("round", *id as f64),
                ("receivers", h.len() as f64),
                ("p50_ms", ms(h.value_at_quantile(0.5))),
                ("p99_ms", ms(h.value_at_quantile(0.99))),
                ("max_ms", ms(h.max())),
            ]);
        }
        round_id += args.broadcasts;
        let node_total: u64 = now.node_rss.iter().sum();
        let node_base: u64 = base.node_rss.iter().sum();
        let open = totals.open.max(1) as f64;
        let slab = now.machine.slab.saturating_sub(base.machine.slab);
        let tcp_mem = now.machine.tcp_mem;
        let secs = |d: Duration| d.as_secs_f64();
        let row: Row = vec![
            ("connections", totals.open as f64),
            ("failed", totals.failed as f64),
            ("nodes", now.node_rss.len() as f64),
            ("workers", workers as f64),
            ("channels", args.channels as f64),
            ("ramp_s", secs(ramp)),
            ("handshakes_per_s", opened as f64 / secs(ramp)),
            (
                "node_cpu_us_per_handshake",
                secs(cpu_ramp.0 - cpu_before.0) * 1e6 / opened.max(1) as f64,
            ),
            ("node_rss_total_mib", node_total as f64 / 1048576.0),
            (
                "node_rss_max_mib",
                now.node_rss.iter().max().copied().unwrap_or(0) as f64 / 1048576.0,
            ),
            (
                "node_bytes_per_conn",
                node_total.saturating_sub(node_base) as f64 / open,
            ),
            ("client_rss_total_mib", client_rss as f64 / 1048576.0),
            (
                "client_bytes_per_conn",
                client_rss.saturating_sub(client_base) as f64 / open,
            ),
            ("kernel_slab_delta_mib", slab as f64 / 1048576.0),
            ("kernel_bytes_per_socket", slab as f64 / (2.0 * open)),
            ("tcp_buffers_mib", tcp_mem as f64 / 1048576.0),
            ("tcp_sockets", now.machine.tcp_inuse as f64),
            ("redis_rss_mib", now.redis_rss as f64 / 1048576.0),
            (
                "mem_used_delta_mib",
                base.machine
                    .mem_available
                    .saturating_sub(now.machine.mem_available) as f64
                    / 1048576.0,
            ),
            (
                "mem_available_mib",
                (now.machine.mem_available >> 20) as f64,
            ),
            ("broadcasts", args.broadcasts as f64),
            ("published", args.broadcasts as f64 * args.channels as f64),
            ("delivered_all", f64::from(u8::from(delivered))),
            ("p50_ms", median(&p50s)),
            ("p99_ms", median(&p99s)),
            ("last_receiver_median_ms", median(&maxes)),
            (
                "last_receiver_max_ms",
                maxes.iter().copied().fold(0.0, f64::max),
            ),
            ("lost", lost as f64),
            ("repeated", (totals.repeated - previous.repeated) as f64),
            (
                "node_cpu_percent_broadcast",
                secs(cpu_after_broadcast.0 - cpu_before_broadcast.0) * 100.0 / broadcast_time,
            ),
            (
                "redis_cpu_percent_broadcast",
                secs(cpu_after_broadcast.1 - cpu_before_broadcast.1) * 100.0 / broadcast_time,
            ),
            ("publish_errors", publisher.errors as f64),
        ];
        print_row(&row);
        steps.push(row);
        previous = totals;
        reached = previous.open;
        scale_chart::write_csv(&out.join("steps.csv"), &steps)?;
        scale_chart::write_csv(&out.join("rounds.csv"), &rounds)?;
        if !previous.failures.is_empty() {
            eprintln!(
                "scale: failures {}",
                Value::Object(previous.failures.clone())
            );
        }
        if let Some(why) = stopped_by {
            bound = why;
            break;
        }
        if scale_probe::machine()?.mem_available < margin {
            bound = "memory: under the margin after the broadcasts".into();
            break;
        }
    }

    let mut resumes: Vec<Row> = Vec::new();
    let mut curves: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for (event, signal, victim) in [
        ("drain", Signal::SIGTERM, 0usize),
        ("kill", Signal::SIGKILL, 1usize),
    ] {
        let wanted = if signal == Signal::SIGTERM {
            args.drain
        } else {
            args.kill
        };
        if !wanted || result.is_err() {
            continue;
        }
        match lose_node(
            args,
            cluster,
            &mut fleet,
            &mut publisher,
            &mut previous,
            event,
            signal,
            victim,
            &mut round_id,
        )
        .await
        {
            Ok((row, curve)) => {
                print_row(&row);
                resumes.push(row);
                curves.push((event.to_owned(), curve));
                scale_chart::write_csv(&out.join("resume.csv"), &resumes)?;
            }
            Err(e) => result = Err(e),
        }
    }
    fleet.quit().await;

    let table = Table {
        steps: &steps,
        curves: &curves,
    };
    scale_chart::draw(out, &table)?;
    result?;

    let mut report = Report::new("scale");
    report
        .add("largest_connections", reached)
        .add("nodes", nodes as u64)
        .add("workers", workers as u64)
        .add("bound", bound)
        .add("out", out.display().to_string());
    if let Some(last) = steps.last() {
        for (name, value) in last {
            report.add(format!("last_step_{name}"), *value);
        }
    }
    for row in &resumes {
        let event = if row[0].1 == 0.0 { "drain" } else { "kill" };
        for (name, value) in &row[1..] {
            report.add(format!("{event}_{name}"), *value);
        }
    }
    Ok(report)
}

fn print_row(row: &Row) {
    let text: Vec<String> = row.iter().map(|(k, v)| format!("{k}={v:.2}")).collect();
    eprintln!("scale: {}", text.join(" "));
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// Waits until the connections have everything published (`last`), or `limit` passes.
async fn wait_delivered(fleet: &mut Fleet, last: &[u64], limit: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + limit;
    loop {
        let missing: u64 = fleet
            .ask(json!({"cmd": "missing", "last": last}))
            .await?
            .iter()
            .map(|a| a["missing"].as_u64().unwrap_or(0))
            .sum();
        if missing == 0 && fleet.progress().down == 0 {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Drains or kills node `victim` while broadcasts go on (5 a second), and measures how long its
/// connections take to resume elsewhere and whether any message is lost.
#[allow(clippy::too_many_arguments)]
async fn lose_node(
    args: &Args,
    cluster: &mut Cluster,
    fleet: &mut Fleet,
    publisher: &mut Publisher,
    previous: &mut Totals,
    event: &str,
    signal: Signal,
    victim: usize,
    round_id: &mut u64,
) -> anyhow::Result<(Row, Vec<(f64, f64)>)> {
    let held = AdminClient::connect(&cluster.nodes[victim].admin, None)
        .await?
        .get_json::<Value>("/v1/stats")
        .await?["connections"]
        .as_u64()
        .unwrap_or(0);
    let moved_before = fleet.progress().moved;
    let t0 = now_micros();
    fleet.phase(t0).await?;
    let started = Instant::now();
    let signal_at = Duration::from_secs(1);
    let mut signalled = false;
    // Seconds from t0 to the signal: resumes are charted from the signal.
    let mut signal_offset = signal_at.as_secs_f64();
    let limit = Duration::from_secs(180);
    let tick = args.loss_interval;
    let bar = progress(held, event);
    let mut k = 0u64;
    loop {
        tokio::time::sleep_until((started + tick * k as u32).into()).await;
        publisher.round(*round_id).await;
        *round_id += 1;
        k += 1;
        if !signalled && started.elapsed() >= signal_at {
            signal_offset = now_micros().saturating_sub(t0) as f64 / 1e6;
            cluster.signal(victim, signal)?;
            signalled = true;
            eprintln!(
                "scale: {signal} to {} (pid {}, {held} connections)",
                cluster.nodes[victim].name, cluster.nodes[victim].pid
            );
        }
        let p = fleet.progress();
        bar.set_position(p.moved - moved_before);
        let gone = !scale_cluster::alive(cluster.nodes[victim].pid);
        if signalled && gone && p.moved - moved_before >= held && p.down == 0 {
            break;
        }
        if started.elapsed() > limit {
            bar.finish_and_clear();
            eprintln!("scale: {event}: not every connection resumed within {limit:?}");
            break;
        }
    }
    bar.finish_and_clear();
    // A few more broadcasts after the last resume, to see that live delivery goes on.
    for _ in 0..2 {
        tokio::time::sleep(tick).await;
        publisher.round(*round_id).await;
        *round_id += 1;
    }
    let delivered = wait_delivered(fleet, &publisher.last, args.delivery_timeout).await?;
    let totals = Totals::of(
        &fleet
            .ask(json!({"cmd": "report", "last": publisher.last}))
            .await?,
    );
    let lost = totals.missing + (totals.gaps - previous.gaps);
    let resume = totals.resume.clone().unwrap_or_else(histogram);
    let resumed_at = totals.resumed_at.clone().unwrap_or_else(histogram);
    let ms = |v: u64| v as f64 / 1000.0;
    let since_signal = |v: u64| (v as f64 / 1e6 - signal_offset).max(0.0);
    let mut curve = vec![(0.0, 0.0)];
    let mut count = 0u64;
    for v in resumed_at.iter_recorded() {
        count += v.count_at_value();
        curve.push((since_signal(v.value_iterated_to()), count as f64));
    }
    let row: Row = vec![
        ("event", if signal == Signal::SIGTERM { 0.0 } else { 1.0 }),
        ("connections", totals.open as f64),
        ("node_held", held as f64),
        ("moved", (totals.moved - previous.moved) as f64),
        ("resume_p50_ms", ms(resume.value_at_quantile(0.5))),
        ("resume_p99_ms", ms(resume.value_at_quantile(0.99))),
        ("resume_max_ms", ms(resume.max())),
        ("all_resumed_after_signal_s", since_signal(resumed_at.max())),
        (
            "fresh_sessions",
            (totals.fresh_sessions - previous.fresh_sessions) as f64,
        ),
        (
            "recovered_false",
            (totals.recovered_false - previous.recovered_false) as f64,
        ),
        ("resume_failures", totals.resume_failures as f64),
        ("delivered_all", f64::from(u8::from(delivered))),
        ("lost", lost as f64),
        ("repeated", (totals.repeated - previous.repeated) as f64),
    ];
    if !totals.failures.is_empty() {
        eprintln!(
            "scale: {event}: failures {}",
            Value::Object(totals.failures.clone())
        );
    }
    if totals.open == 0 {
        bail!("no connection left");
    }
    *previous = totals;
    Ok((row, curve))
}
