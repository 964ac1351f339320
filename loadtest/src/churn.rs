//! `churn`: clients drop their sockets (no close handshake, as a network would) and resume at
//! a rate while messages flow; every client must still see every message once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use futures_util::StreamExt;
use serde_json::value::RawValue;
use shared::admin::AdminClient;
use shared::{Position, ServerFrame};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::report::{progress, Report};
use crate::socket::{self, Targets};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    targets: Targets,
    /// Clients, all on one channel.
    #[arg(short = 'n', long, default_value_t = 50)]
    clients: usize,
    /// Publishes a second.
    #[arg(short = 'r', long, default_value_t = 50)]
    rate: u64,
    /// How long to publish.
    #[arg(short = 't', long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Socket drops a second, over all clients.
    #[arg(long, default_value_t = 10.0)]
    drops: f64,
    /// How long clients may take to catch up after publishing stops.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
}

#[derive(Default)]
struct Tally {
    unique: u64,
    repeated: u64,
    gaps: u64,
    resumes: u64,
    not_recovered: u64,
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let channel = format!("churn.{:08x}", rand::random::<u32>());
    let targets = Arc::new(args.targets.clone());
    let (stop, stopped) = watch::channel(false);
    // Each client's last seq, so that the end can wait until every one has the last message.
    let positions: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.clients).map(|_| AtomicU64::new(0)).collect());
    let mut published = 0;
    // Each client drops its socket after a random time of mean `clients / drops` seconds.
    let mean_life = Duration::from_secs_f64(args.clients as f64 / args.drops.max(0.001));

    let mut clients = Vec::new();
    for i in 0..args.clients {
        let mut ws = targets.open(i).await?;
        let welcome = socket::hello(&mut ws, None, BTreeMap::new()).await?;
        let position = socket::subscribe(&mut ws, &channel).await?;
        let client = Churner {
            i,
            targets: targets.clone(),
            channel: channel.clone(),
            session: welcome.session,
            position,
            mean_life,
        };
        clients.push(tokio::spawn(client.run(
            ws,
            stopped.clone(),
            positions.clone(),
        )));
    }

    let total = (args.rate as f64 * args.duration.as_secs_f64()) as u64;
    let bar = progress(total, "publishing");
    let mut admin = AdminClient::connect(&args.targets.admin[0], None).await?;
    let started = Instant::now();
    let mut publish_errors = 0;
    for k in 0..total {
        tokio::time::sleep_until(
            (started + Duration::from_secs_f64(k as f64 / args.rate.max(1) as f64)).into(),
        )
        .await;
        let data = RawValue::from_string(k.to_string())?;
        match admin.publish(&channel, &data, None).await {
            Ok(answer) => published = answer.seq,
            Err(_) => publish_errors += 1,
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let until = Instant::now() + args.grace;
    while positions
        .iter()
        .any(|p| p.load(Ordering::Relaxed) < published)
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);

    let mut tally = Tally::default();
    for client in clients {
        let t = client.await??;
        tally.unique += t.unique;
        tally.repeated += t.repeated;
        tally.gaps += t.gaps;
        tally.resumes += t.resumes;
        tally.not_recovered += t.not_recovered;
    }
    let expected = published * args.clients as u64;
    let mut report = Report::new("churn");
    report
        .add("clients", args.clients as u64)
        .add("published", published)
        .add("publish_errors", publish_errors)
        .add("resumes", tally.resumes)
        .add("resumes_not_recovered", tally.not_recovered)
        .add("delivered", tally.unique)
        .add("lost", expected.saturating_sub(tally.unique))
        .add("repeated", tally.repeated)
        .add("gaps", tally.gaps);
    Ok(report)
}

struct Churner {
    i: usize,
    targets: Arc<Targets>,
    channel: String,
    session: String,
    /// The last seq received, in its epoch: the client's own position.
    position: Position,
    mean_life: Duration,
}

impl Churner {
    async fn run(
        mut self,
        mut ws: socket::Ws,
        mut stopped: watch::Receiver<bool>,
        positions: Arc<Vec<AtomicU64>>,
    ) -> anyhow::Result<Tally> {
        let mut tally = Tally::default();
        loop {
            let life = self.mean_life.mul_f64(-(1.0 - rand::random::<f64>()).ln());
            let drop_at = tokio::time::Instant::now() + life;
            loop {
                let message = tokio::select! {
                    _ = stopped.changed() => return Ok(tally),
                    () = tokio::time::sleep_until(drop_at) => break,
                    message = ws.next() => message,
                };
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(_)) => continue,
                    _ => break,
                };
                match serde_json::from_str(&text)? {
                    ServerFrame::Message { seq, .. } => {
                        let last = self.position.seq;
                        if seq <= last {
                            tally.repeated += 1;
                            continue;
                        }
                        if seq != last + 1 {
                            tally.gaps += 1;
                        }
                        self.position.seq = seq;
                        tally.unique += 1;
                        positions[self.i].store(seq, Ordering::Relaxed);
                    }
                    ServerFrame::Subscribed {
                        recovered: false, ..
                    } => tally.not_recovered += 1,
                    _ => {}
                }
            }
            // Drop the socket without a close, and resume from the client's own position.
            drop(ws);
            tally.resumes += 1;
            ws = self.targets.open(self.i + tally.resumes as usize).await?;
            let since = BTreeMap::from([(self.channel.clone(), self.position.clone())]);
            let welcome = socket::hello(&mut ws, Some(&self.session), since).await?;
            anyhow::ensure!(welcome.resumed, "the session did not resume: {welcome:?}");
            if welcome
                .channels
                .get(&self.channel)
                .is_some_and(|c| !c.recovered)
            {
                tally.not_recovered += 1;
            }
        }
    }
}
