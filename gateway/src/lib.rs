//! The broadcast gateway node.
//!
//! The data path, in the order a message travels it:
//! - [`listener`] accepts sockets and upgrades `GET /ws`; [`connection`] speaks the protocol
//!   with one client;
//! - a publish (from a client, or [`admin`]'s `POST /v1/publish`) goes to the [`broker`], which
//!   numbers it, keeps it in history and hands it to every node;
//! - the [`hub`] takes it from the broker, keeps its channel continuous and encodes its whole
//!   WebSocket frame once ([`wire`]);
//! - the [`fanout`] shards write that frame to the socket of every local subscriber, through
//!   each connection's [`Transport`](connection::Transport).
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod broker;
pub mod channels;
pub mod config;
pub mod connection;
pub mod control;
pub mod fanout;
pub mod handshake;
pub mod hub;
pub mod ids;
pub mod listener;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod session;
pub mod shutdown;
pub mod user_limit;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::auth::Verifier;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::shutdown::Tasks;

/// Why a node could not start, by cause; each names what to change. The error a read or a bind
/// failed with is the error's source.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The key that verifies client tokens cannot be read.
    #[error(transparent)]
    Key(#[from] auth::KeyError),
    /// The broker cannot be set up with this configuration.
    #[error(transparent)]
    Broker(#[from] broker::SetupError),
    #[error("cannot listen on {addr} ({flag})")]
    Listen {
        addr: SocketAddr,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error("cannot install the handlers of SIGTERM and SIGINT")]
    Signals(#[source] std::io::Error),
}

/// Runs a node until it is signalled and drained.
pub async fn serve(config: Config) -> Result<(), StartError> {
    config.validate()?;
    config.log();
    let node_id = config
        .node_id
        .clone()
        .unwrap_or_else(|| format!("node-{}", ids::random_hex(4)));
    let verifier = Verifier::from_config(&config)?;
    let metrics = Arc::new(Metrics::new());
    let tasks = Arc::new(Tasks::default());
    let background = tasks.stop();
    let broker::Connected {
        broker,
        events,
        kind,
    } = broker::connect(&config, &node_id, metrics.clone(), &tasks).await?;
    let mut signals = shutdown::Signals::install().map_err(StartError::Signals)?;
    raise_open_file_limit();
    let (client, client_addr) = bind(config.listen, "--listen / BGW_LISTEN").await?;
    let (admin, admin_addr) =
        bind(config.admin_listen, "--admin-listen / BGW_ADMIN_LISTEN").await?;
    let node = Arc::new(Node::new(
        node_id,
        config,
        broker,
        verifier,
        metrics,
        tasks.clone(),
    ));
    info!(
        client = %client_addr,
        admin = %admin_addr,
        node = %node.id,
        broker = kind,
        "listening"
    );

    let connections = TaskTracker::new();
    tasks.spawn(
        "broker events",
        node.hub
            .clone()
            .run(events, node.sessions.clone(), node.presence.clone()),
    );
    tasks.spawn(
        "session saver",
        node.sessions.clone().run_saver(background.clone()),
    );
    tasks.spawn(
        "admin listener",
        admin::run(admin, node.clone(), background.clone()),
    );
    tasks.spawn(
        "channel reporter",
        channels::run_reporter(node.clone(), background.clone()),
    );
    tasks.spawn(
        "presence announcer",
        presence::announcer::run(node.clone(), background.clone()),
    );
    tasks.spawn(
        "client listener",
        listener::run(
            client,
            node.clone(),
            background.clone(),
            connections.clone(),
        ),
    );

    signals.next().await;
    shutdown::drain(node, connections, &mut signals).await;
    background.cancel();
    Ok(())
}

/// A listener on `addr`, and the address it got (`addr` may ask for any port); an error names
/// the address and the flag that chose it.
async fn bind(
    addr: SocketAddr,
    flag: &'static str,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Listen { addr, flag, source };
    let listener = TcpListener::bind(addr).await.map_err(failed)?;
    let bound = listener.local_addr().map_err(failed)?;
    Ok((listener, bound))
}

/// Every socket is a file descriptor: the soft limit (often 1024 in containers) goes up to the
/// hard limit, which is what bounds a node's connections.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}
