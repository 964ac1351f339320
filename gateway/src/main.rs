use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use gateway::config::{AdminArgs, Cli, Command, Config, LogFormat, Secret};
use hyper::StatusCode;
use serde_json::value::RawValue;
use shared::admin::{AdminClient, Answer, PublishRequest};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    gateway::config::forget_empty_env();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            None => serve(cli.serve).await,
            Some(Command::Serve(config)) => serve(*config).await,
            Some(Command::Publish(args)) => publish(args).await,
            Some(Command::Health(args)) => health(&args.admin_url).await,
            Some(Command::History(args)) => history(args).await,
            Some(Command::Disconnect(args)) => disconnect(args).await,
            Some(Command::Channels(args)) => channels(args).await,
            Some(Command::Presence(args)) => presence(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let filter = EnvFilter::try_from_env("BGW_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    gateway::serve(config).await?;
    Ok(ExitCode::SUCCESS)
}

async fn publish(args: gateway::config::PublishArgs) -> anyhow::Result<ExitCode> {
    let data = match args.data {
        Some(data) => data,
        None => std::io::read_to_string(std::io::stdin())?,
    };
    // `data` goes in as given: through a `serde_json::Value` its keys would be sorted and its
    // spacing dropped, and subscribers get the bytes that were published.
    let data: Box<RawValue> = serde_json::from_str(data.trim())
        .map_err(|e| anyhow::anyhow!("the message is not JSON: {e}"))?;
    let body = serde_json::to_vec(&PublishRequest {
        channel: &args.channel,
        data: &data,
        idempotency_key: args.idempotency_key.as_deref(),
    })?;
    let mut admin = connect(&args.admin_url, args.api_key.as_ref()).await?;
    printed(admin.post("/v1/publish", body).await?)
}

async fn history(args: gateway::config::HistoryArgs) -> anyhow::Result<ExitCode> {
    let channel: String = form_urlencoded::byte_serialize(args.channel.as_bytes()).collect();
    let mut admin = connect_to(&args.admin).await?;
    let answer = if args.remove {
        admin
            .delete(&format!("/v1/history?channel={channel}"))
            .await?
    } else {
        let path = format!(
            "/v1/history?channel={channel}&since={}&limit={}",
            args.since, args.limit
        );
        admin.get(&path).await?
    };
    printed(answer)
}

async fn disconnect(args: gateway::config::DisconnectArgs) -> anyhow::Result<ExitCode> {
    let mut body = serde_json::json!({
        "user": args.user,
        "session": args.session,
        "reason": args.reason,
        "end_session": args.end_session,
    });
    // Without the one not given: the API takes exactly one of them.
    if let Some(object) = body.as_object_mut() {
        object.retain(|_, value| !value.is_null());
    }
    let mut admin = connect_to(&args.admin).await?;
    printed(admin.post("/v1/disconnect", body.to_string()).await?)
}

async fn channels(args: gateway::config::ChannelsArgs) -> anyhow::Result<ExitCode> {
    let mut path = format!("/v1/channels?limit={}", args.limit);
    if let Some(pattern) = &args.pattern {
        let pattern: String = form_urlencoded::byte_serialize(pattern.as_bytes()).collect();
        path.push_str(&format!("&pattern={pattern}"));
    }
    printed(connect_to(&args.admin).await?.get(&path).await?)
}

async fn presence(args: gateway::config::PresenceArgs) -> anyhow::Result<ExitCode> {
    let channel: String = form_urlencoded::byte_serialize(args.channel.as_bytes()).collect();
    let mut path = format!("/v1/presence?channel={channel}");
    if let Some(limit) = args.limit {
        path.push_str(&format!("&limit={limit}"));
    }
    printed(connect_to(&args.admin).await?.get(&path).await?)
}

async fn health(admin_url: &str) -> anyhow::Result<ExitCode> {
    printed(connect(admin_url, None).await?.get("/readyz").await?)
}

async fn connect(url: &str, api_key: Option<&Secret>) -> anyhow::Result<AdminClient> {
    Ok(AdminClient::connect(url, api_key.map(Secret::expose)).await?)
}

async fn connect_to(admin: &AdminArgs) -> anyhow::Result<AdminClient> {
    connect(&admin.admin_url, admin.api_key.as_ref()).await
}

/// Prints an answer of the admin API; success when it is 200.
fn printed(answer: Answer) -> anyhow::Result<ExitCode> {
    println!("{}", answer.text());
    Ok(if answer.status == StatusCode::OK {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
