//! `loadtest`: the scenarios that prove the gateway's numbers. Each runs for a bounded time,
//! shows its progress, and ends with a table of figures (`--json` for machines).

mod churn;
mod connections;
mod cpu;
mod delivery;
mod drain;
mod fanout;
mod floor;
mod publish;
mod raw;
mod report;
mod scale;
mod scale_chart;
mod scale_cluster;
mod scale_fleet;
mod scale_probe;
mod scale_worker;
mod scale_ws;
mod socket;
mod tcp_info;

use std::future::Future;

use clap::{Parser, Subcommand};

use crate::report::Report;

#[derive(Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Load scenarios for the broadcast gateway"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Print the final figures as one JSON object instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Scenario {
    /// Ramp to N idle connections over the targets and source addresses, hold them, and report
    /// the handshake rate and the gateway's memory per connection.
    Connections(connections::Args),
    /// S subscribers over C channels, R publishes a second for T seconds: deliveries a second,
    /// latency percentiles, lost, repeated and out-of-order messages, the TCP segments the
    /// subscribers received per delivery (below 1 where the server put several messages in one
    /// write), and with --server-pid the servers' CPU time per delivery.
    Fanout(fanout::Args),
    /// Clients drop their sockets and resume at a rate while messages flow: resumes and loss.
    Churn(churn::Args),
    /// SIGTERM one node mid-stream: how long its clients take to resume elsewhere, and loss.
    Drain(drain::Args),
    /// The floor under the fan-out's CPU per delivery: N loopback sockets to a reader process,
    /// R messages a second for T, each one write(2) per socket of the frame the gateway writes
    /// per delivery and nothing else. Reports the writer's CPU per write (user + system from
    /// getrusage, microsecond resolution).
    Floor(floor::Args),
    /// K concurrent HTTP clients publish through a node's admin API as fast as it answers, for
    /// T: publishes a second and latency percentiles.
    Publish(publish::Args),
    /// The reader process of `floor`.
    #[command(hide = true)]
    FloorReader(floor::ReaderArgs),
    /// N nodes on one Redis, the client spread over worker processes and source addresses:
    /// ramps through steps of connections, broadcasts at each and times the last receiver,
    /// records memory and CPU on every side, drains and kills a node at the largest size.
    /// Writes CSV and SVG charts to --out.
    Scale(scale::Args),
    /// A worker process of `scale`.
    #[command(hide = true)]
    ScaleWorker(scale_worker::WorkerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Every scenario holds a socket per client; the soft limit is often far below the hard one.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let report = match cli.scenario {
        // The floor's writer runs alone on its thread: no runtime, no other work in its CPU time.
        Scenario::Floor(args) => floor::run(args)?,
        Scenario::FloorReader(args) => return floor::read(args),
        // A worker is one thread holding thousands of sockets: its own runtime.
        Scenario::ScaleWorker(args) => return scale_worker::run(args),
        Scenario::Connections(args) => on_runtime(connections::run(args))?,
        Scenario::Fanout(args) => on_runtime(fanout::run(args))?,
        Scenario::Churn(args) => on_runtime(churn::run(args))?,
        Scenario::Drain(args) => on_runtime(drain::run(args))?,
        Scenario::Publish(args) => on_runtime(publish::run(args))?,
        Scenario::Scale(args) => on_runtime(scale::run(args))?,
    };
    report.print(cli.json);
    Ok(())
}

fn on_runtime(scenario: impl Future<Output = anyhow::Result<Report>>) -> anyhow::Result<Report> {
    tokio::runtime::Runtime::new()?.block_on(scenario)
}
