//! `loadtest`: the scenarios that prove the gateway's numbers. Each runs for a bounded time,
//! shows its progress, and ends with a table of figures (`--json` for machines).

mod admin;
mod churn;
mod connections;
mod drain;
mod fanout;
mod report;
mod socket;

use clap::{Parser, Subcommand};

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
    /// latency percentiles, and lost, repeated and out-of-order messages.
    Fanout(fanout::Args),
    /// Clients drop their sockets and resume at a rate while messages flow: resumes and loss.
    Churn(churn::Args),
    /// SIGTERM one node mid-stream: how long its clients take to resume elsewhere, and loss.
    Drain(drain::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let report = match cli.scenario {
        Scenario::Connections(args) => connections::run(args).await?,
        Scenario::Fanout(args) => fanout::run(args).await?,
        Scenario::Churn(args) => churn::run(args).await?,
        Scenario::Drain(args) => drain::run(args).await?,
    };
    report.print(cli.json);
    Ok(())
}
