//! A worker process of `scale`: holds its share of the connections (fewer than the per-process
//! open-file limit) from one source address, one thread, and reports to the coordinator over its
//! stdout, one JSON object a line; the coordinator's commands come on stdin, likewise.
//!
//! Commands: `{"cmd":"open","target":N,"rate":R}` opens connections up to N in all, R a second;
//! `{"cmd":"phase","t0":MICROS}` starts a measuring phase (round and resume figures start over,
//! resumes are timed from t0 too); `{"cmd":"missing","last":[SEQ per channel]}` counts what the
//! connections still lack of what was published; `{"cmd":"report","last":[...]}` answers with
//! every figure; `{"cmd":"quit"}` exits (the kernel closes the sockets).
//!
//! Each connection is one task and a socket; while idle it owns no buffer (see `scale_ws`).
//! When its node closes it (1001 on a drain) or vanishes (kill -9), it resumes at once on another
//! node, spread by its index, with its session and its position, and counts the time that took.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use clap::Args as ClapArgs;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use shared::{ClientFrame, Position, ServerFrame};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

use crate::scale_ws::{self as ws, CLOSE, PING, PONG, TEXT};
use crate::socket::now_micros;

#[derive(ClapArgs, Debug)]
pub struct WorkerArgs {
    /// This worker's index among the workers.
    #[arg(long)]
    index: usize,
    /// How many workers there are (connection i of worker w is number i * workers + w).
    #[arg(long)]
    workers: usize,
    /// The local address every socket of this worker binds to.
    #[arg(long)]
    source: IpAddr,
    /// The client listeners of the nodes, comma-separated.
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<SocketAddr>,
    /// Channels are PREFIX.0 ... PREFIX.(C-1); connection number g subscribes to g mod C.
    #[arg(long)]
    prefix: String,
    #[arg(long)]
    channels: usize,
}

/// What the connections of this worker have seen, for the coordinator.
struct Stats {
    open: u64,
    failed: u64,
    received: u64,
    gaps: u64,
    repeated: u64,
    down: u64,
    moved: u64,
    fresh_sessions: u64,
    recovered_false: u64,
    errors: u64,
    resume_failures: u64,
    failures: BTreeMap<String, u64>,
    /// Per broadcast round: latency from publish to receipt, µs.
    rounds: BTreeMap<u64, Histogram<u64>>,
    /// Per resumed connection: from losing its node to `welcome` on another, µs.
    resume: Histogram<u64>,
    /// Per resumed connection: from the phase's t0 to its `welcome` elsewhere, µs.
    resumed_at: Histogram<u64>,
    t0: u64,
}

struct Ctx {
    args: WorkerArgs,
    hosts: Vec<String>,
    /// Shared by every connection: a connection reads into it, parses, and lets go before it
    /// awaits again.
    scratch: RefCell<Vec<u8>>,
    /// The last seq each connection has of its channel (0: none yet).
    last: RefCell<Vec<u64>>,
    epochs: RefCell<Vec<Option<Rc<str>>>>,
    stats: RefCell<Stats>,
    in_flight: Cell<usize>,
    mask: Cell<u64>,
}

impl Ctx {
    fn channel_of(&self, id: usize) -> usize {
        (id * self.args.workers + self.args.index) % self.args.channels
    }

    fn channel_name(&self, channel: usize) -> String {
        format!("{}.{channel}", self.args.prefix)
    }

    fn frame(&self, opcode: u8, payload: &[u8]) -> Vec<u8> {
        // xorshift: masks need not be secret here, only present.
        let mut x = self.mask.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.mask.set(x);
        ws::client_frame(opcode, payload, (x as u32).to_be_bytes())
    }

    /// A masked text frame of `frame`.
    fn encode(&self, frame: &ClientFrame) -> Vec<u8> {
        let text = serde_json::to_string(frame).expect("client frames serialise");
        self.frame(TEXT, text.as_bytes())
    }

    fn fail(&self, reason: &str) {
        let mut stats = self.stats.borrow_mut();
        let key: String = reason.chars().take(60).collect();
        if stats.failures.len() < 20 || stats.failures.contains_key(&key) {
            *stats.failures.entry(key).or_default() += 1;
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds")
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.nodes.is_empty() && args.channels > 0 && args.workers > 0);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(args))
}

async fn serve(args: WorkerArgs) -> anyhow::Result<()> {
    let hosts = args.nodes.iter().map(|a| a.to_string()).collect();
    let channels = args.channels;
    let ctx = Rc::new(Ctx {
        mask: Cell::new(0x9E37_79B9_7F4A_7C15 ^ (args.index as u64 + 1)),
        args,
        hosts,
        scratch: RefCell::new(vec![0; 64 * 1024]),
        last: RefCell::new(Vec::new()),
        epochs: RefCell::new(vec![None; channels]),
        stats: RefCell::new(Stats {
            open: 0,
            failed: 0,
            received: 0,
            gaps: 0,
            repeated: 0,
            down: 0,
            moved: 0,
            fresh_sessions: 0,
            recovered_false: 0,
            errors: 0,
            resume_failures: 0,
            failures: BTreeMap::new(),
            rounds: BTreeMap::new(),
            resume: histogram(),
            resumed_at: histogram(),
            t0: now_micros(),
        }),
        in_flight: Cell::new(0),
    });
    tokio::task::spawn_local(progress(ctx.clone()));
    let target = Rc::new(Cell::new(0usize));
    let rate = Rc::new(Cell::new(1000f64));
    tokio::task::spawn_local(opener(ctx.clone(), target.clone(), rate.clone()));

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let command: Value = serde_json::from_str(&line)?;
        let last = || -> Vec<u64> {
            command["last"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(0)).collect())
                .unwrap_or_default()
        };
        match command["cmd"].as_str() {
            Some("open") => {
                target.set(command["target"].as_u64().unwrap_or(0) as usize);
                rate.set(command["rate"].as_f64().unwrap_or(1000.0).max(1.0));
            }
            Some("phase") => {
                let mut stats = ctx.stats.borrow_mut();
                stats.t0 = command["t0"].as_u64().unwrap_or_else(now_micros);
                stats.rounds.clear();
                stats.resume.reset();
                stats.resumed_at.reset();
            }
            Some("missing") => emit(json!({"event": "missing", "missing": missing(&ctx, &last())})),
            Some("report") => emit(report(&ctx, &last())),
            _ => break,
        }
    }
    // Stdin closed or `quit`: exit now; the kernel closes every socket.
    std::process::exit(0)
}

fn emit(value: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// Messages published (up to `last`, per channel) that the connections do not have.
fn missing(ctx: &Ctx, last: &[u64]) -> u64 {
    if last.is_empty() {
        return 0;
    }
    let seen = ctx.last.borrow();
    (0..seen.len())
        .map(|id| {
            let wanted = last.get(ctx.channel_of(id)).copied().unwrap_or(0);
            wanted.saturating_sub(seen[id])
        })
        .sum()
}

fn buckets(histogram: &Histogram<u64>) -> Value {
    histogram
        .iter_recorded()
        .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
        .collect()
}

fn report(ctx: &Ctx, last: &[u64]) -> Value {
    let missing = missing(ctx, last);
    let stats = ctx.stats.borrow();
    let rounds: Vec<Value> = stats
        .rounds
        .iter()
        .map(|(round, h)| json!([round, h.len(), h.max(), buckets(h)]))
        .collect();
    json!({
        "event": "report",
        "open": stats.open,
        "failed": stats.failed,
        "received": stats.received,
        "gaps": stats.gaps,
        "repeated": stats.repeated,
        "missing": missing,
        "down": stats.down,
        "moved": stats.moved,
        "fresh_sessions": stats.fresh_sessions,
        "recovered_false": stats.recovered_false,
        "errors": stats.errors,
        "resume_failures": stats.resume_failures,
        "failures": stats.failures,
        "rounds": rounds,
        "resume": [stats.resume.len(), stats.resume.max(), buckets(&stats.resume)],
        "resumed_at": [stats.resumed_at.len(), stats.resumed_at.max(), buckets(&stats.resumed_at)],
        "rss": own_rss(),
    })
}

fn own_rss() -> u64 {
    crate::scale_probe::rss(std::process::id()).unwrap_or(0)
}

async fn progress(ctx: Rc<Ctx>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let stats = ctx.stats.borrow();
        let line = json!({
            "event": "progress",
            "open": stats.open,
            "failed": stats.failed,
            "received": stats.received,
            "down": stats.down,
            "moved": stats.moved,
            "rss": own_rss(),
        });
        drop(stats);
        emit(line);
    }
}

/// Opens connections up to `target`, `rate` a second, with a bounded number in flight.
async fn opener(ctx: Rc<Ctx>, target: Rc<Cell<usize>>, rate: Rc<Cell<f64>>) {
    let step = Duration::from_millis(10);
    let mut tick = tokio::time::interval(step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut credit = 0f64;
    loop {
        tick.tick().await;
        let next = ctx.last.borrow().len();
        if next >= target.get() {
            credit = 0.0;
            continue;
        }
        credit = (credit + rate.get() * step.as_secs_f64()).min(rate.get());
        while credit >= 1.0 && ctx.last.borrow().len() < target.get() && ctx.in_flight.get() < 500 {
            credit -= 1.0;
            let id = {
                let mut last = ctx.last.borrow_mut();
                last.push(0);
                last.len() - 1
            };
            tokio::task::spawn_local(connection(ctx.clone(), id));
        }
    }
}

/// How a socket's life ended.
enum Ended {
    /// Before it was live (connect, upgrade, hello or subscribe failed).
    Failed(String),
    /// After: the node closed it or vanished.
    Lost,
}

/// One connection's state across its sockets.
struct Conn {
    id: usize,
    channel: usize,
    session: String,
    /// Not yet live once: its failures count as failed connections.
    first: bool,
    /// Since when it has been without a node (µs), while it is.
    lost_at: Option<u64>,
}

async fn connection(ctx: Rc<Ctx>, id: usize) {
    let nodes = ctx.args.nodes.len();
    let mut node = (ctx.args.index + id) % nodes;
    let mut conn = Conn {
        id,
        channel: ctx.channel_of(id),
        session: String::new(),
        first: true,
        lost_at: None,
    };
    ctx.in_flight.set(ctx.in_flight.get() + 1);
    let mut attempts = 0usize;
    // The node the connection was on when it lost it: the others are tried in turn from it.
    let mut home = node;
    loop {
        match socket(&ctx, &mut conn, node).await {
            Ended::Failed(reason) => {
                ctx.fail(&reason);
                attempts += 1;
                if conn.first {
                    // Not live yet: the next attempt starts a session of its own.
                    conn.session.clear();
                }
                if conn.first && attempts >= 3 {
                    ctx.stats.borrow_mut().failed += 1;
                    ctx.in_flight.set(ctx.in_flight.get() - 1);
                    return;
                }
            }
            Ended::Lost => {
                conn.lost_at = Some(now_micros());
                ctx.stats.borrow_mut().down += 1;
                attempts = 0;
                home = node;
            }
        }
        if attempts > 100 {
            ctx.stats.borrow_mut().resume_failures += 1;
            return;
        }
        // Every node refused once: give them a moment.
        if attempts > 0 && attempts.is_multiple_of(nodes) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Another node: the next ones, spread by the connection's index, so that the
        // connections of a lost node do not all land on the same one.
        if nodes > 1 {
            node = (home + 1 + (id + attempts) % (nodes - 1)) % nodes;
        }
    }
}

/// The connection is live (subscribed, or its session resumed): count it.
fn went_live(ctx: &Ctx, conn: &mut Conn, resumed: bool) {
    let mut stats = ctx.stats.borrow_mut();
    if conn.first {
        conn.first = false;
        stats.open += 1;
        ctx.in_flight.set(ctx.in_flight.get() - 1);
    } else if let Some(at) = conn.lost_at.take() {
        stats.down -= 1;
        stats.moved += 1;
        let now = now_micros();
        stats
            .resume
            .saturating_record(now.saturating_sub(at).max(1));
        let since_t0 = now.saturating_sub(stats.t0).max(1);
        stats.resumed_at.saturating_record(since_t0);
        if !resumed {
            stats.fresh_sessions += 1;
        }
    }
}

/// One socket of `conn` to `node`: upgrade, hello (a resume when it has a session), subscribe
/// unless the resume restored the subscription, then read until the socket ends.
async fn socket(ctx: &Ctx, conn: &mut Conn, node: usize) -> Ended {
    let mut stream = match upgrade(ctx, node).await {
        Ok(stream) => stream,
        Err(e) => return Ended::Failed(e),
    };
    let hello = ClientFrame::Hello {
        token: None,
        session: (!conn.session.is_empty()).then(|| conn.session.clone()),
        since: since(ctx, conn).into_iter().collect(),
    };
    if let Err(e) = stream.write_all(&ctx.encode(&hello)).await {
        return Ended::Failed(format!("hello: {e}"));
    }
    let mut phase = Phase::Welcome;
    let mut leftover = Vec::new();
    loop {
        if let Err(e) = stream.readable().await {
            return ended(&phase, format!("read: {e}"));
        }
        let mut out = Vec::new();
        let result = {
            let mut scratch = ctx.scratch.borrow_mut();
            let held = leftover.len();
            if held + 4096 > scratch.len() {
                scratch.resize(held + 64 * 1024, 0);
            }
            scratch[..held].copy_from_slice(&leftover);
            match stream.try_read(&mut scratch[held..]) {
                Ok(0) => Err(ended(&phase, "the node closed the socket".into())),
                Ok(n) => {
                    frames(ctx, conn, &mut phase, &scratch[..held + n], &mut out).map(|used| {
                        // Only a frame split across reads keeps bytes (and memory) here.
                        leftover = scratch[used..held + n].to_vec();
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
                Err(e) => Err(ended(&phase, format!("read: {e}"))),
            }
        };
        if let Err(end) = result {
            return end;
        }
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&out).await {
                return ended(&phase, format!("write: {e}"));
            }
        }
    }
}

/// The position `conn` has of its channel, named, once it has one.
fn since(ctx: &Ctx, conn: &Conn) -> Option<(String, Position)> {
    let last = ctx.last.borrow()[conn.id];
    let epoch = ctx.epochs.borrow()[conn.channel].clone()?;
    let position = Position {
        seq: last,
        epoch: Some(epoch.to_string()),
    };
    (last > 0).then(|| (ctx.channel_name(conn.channel), position))
}

#[derive(PartialEq)]
enum Phase {
    Welcome,
    Subscribed,
    Live,
}

fn ended(phase: &Phase, reason: String) -> Ended {
    if *phase == Phase::Live {
        Ended::Lost
    } else {
        Ended::Failed(reason)
    }
}

/// Handles every whole frame in `buf`; returns how many bytes they took, or how the socket
/// ended.
fn frames(
    ctx: &Ctx,
    conn: &mut Conn,
    phase: &mut Phase,
    buf: &[u8],
    out: &mut Vec<u8>,
) -> Result<usize, Ended> {
    let mut at = 0;
    loop {
        let (opcode, payload, len) = match ws::server_frame(&buf[at..]) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(at),
            Err(e) => return Err(ended(phase, e)),
        };
        let payload = &buf[at + payload.start..at + payload.end];
        at += len;
        match opcode {
            PING => out.extend_from_slice(&ctx.frame(PONG, payload)),
            CLOSE => {
                let code = payload
                    .get(..2)
                    .map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
                return Err(ended(phase, format!("closed with {code}")));
            }
            TEXT => text(ctx, conn, phase, payload, out)?,
            _ => {}
        }
    }
}

/// A text frame. A `message` is read in part, without a `ServerFrame`: it is the frame of the
/// hot path (every connection gets every broadcast), and the worker must cost less than the
/// nodes it measures. The others come once per socket and are read whole.
fn text(
    ctx: &Ctx,
    conn: &mut Conn,
    phase: &mut Phase,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Ended> {
    if ws::string_after(payload, br#""type":""#) == Some("message") {
        message(ctx, conn, payload);
        return Ok(());
    }
    match (&*phase, serde_json::from_slice(payload)) {
        (
            Phase::Welcome,
            Ok(ServerFrame::Welcome {
                session,
                resumed,
                channels,
                ..
            }),
        ) => {
            let resuming = !conn.session.is_empty();
            conn.session = session;
            let channel = ctx.channel_name(conn.channel);
            // The resume restored the subscription only where `welcome.channels` names it (a
            // session whose subscribe had failed comes back without it).
            if let Some(state) = channels.get(&channel).filter(|_| resuming && resumed) {
                if !state.recovered {
                    ctx.stats.borrow_mut().recovered_false += 1;
                }
                *phase = Phase::Live;
                went_live(ctx, conn, true);
                return Ok(());
            }
            // A new session: subscribe, from the position the connection has if any.
            let subscribe = ClientFrame::Subscribe {
                id: None,
                channel,
                since: since(ctx, conn).map(|(_, position)| position),
                presence: false,
            };
            out.extend_from_slice(&ctx.encode(&subscribe));
            *phase = Phase::Subscribed;
        }
        (
            Phase::Subscribed,
            Ok(ServerFrame::Subscribed {
                seq,
                epoch,
                recovered,
                ..
            }),
        ) => {
            let mut epochs = ctx.epochs.borrow_mut();
            if epochs[conn.channel].as_deref() != Some(epoch.as_str()) {
                epochs[conn.channel] = Some(epoch.into());
            }
            drop(epochs);
            if conn.first {
                ctx.last.borrow_mut()[conn.id] = seq;
            } else if !recovered {
                ctx.stats.borrow_mut().recovered_false += 1;
            }
            *phase = Phase::Live;
            went_live(ctx, conn, false);
        }
        (Phase::Live, Ok(ServerFrame::Subscribed { seq, .. })) => {
            // Unsolicited: history no longer held what this connection missed.
            ctx.last.borrow_mut()[conn.id] = seq;
            ctx.stats.borrow_mut().recovered_false += 1;
        }
        (Phase::Live, _) => ctx.stats.borrow_mut().errors += 1,
        (_, _) => {
            let text = String::from_utf8_lossy(payload);
            return Err(Ended::Failed(format!(
                "unexpected {}",
                text.chars().take(80).collect::<String>()
            )));
        }
    }
    Ok(())
}

/// A `message`: its seq against the connection's position (gaps, repeats), and its latency in
/// its round.
fn message(ctx: &Ctx, conn: &Conn, payload: &[u8]) {
    let seq = ws::number_after(payload, br#""seq":"#).unwrap_or(0);
    let mut last = ctx.last.borrow_mut();
    let mut stats = ctx.stats.borrow_mut();
    stats.received += 1;
    let previous = last[conn.id];
    if seq <= previous {
        stats.repeated += 1;
        return;
    }
    stats.gaps += seq - previous - 1;
    last[conn.id] = seq;
    if let (Some(sent), Some(round)) = (
        ws::number_after(payload, br#""t":"#),
        ws::number_after(payload, br#""r":"#),
    ) {
        let latency = now_micros().saturating_sub(sent).max(1);
        stats
            .rounds
            .entry(round)
            .or_insert_with(histogram)
            .saturating_record(latency);
    }
}

/// A socket to `node` from this worker's source address, upgraded.
async fn upgrade(ctx: &Ctx, node: usize) -> Result<TcpStream, String> {
    let addr = ctx.args.nodes[node];
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    // The smallest buffers the kernel allows: the frames are small, and a million sockets'
    // buffers are the machine's memory.
    let _ = socket.set_recv_buffer_size(4096);
    let _ = socket.set_send_buffer_size(4096);
    // The port is chosen at connect(2), unique per destination, instead of at bind(2): bind
    // searches the range for a port free on the source address, which took 13 ms a call once a
    // worker held 15,000 sockets (and caps an address at ~28,000 sockets in all, not per node).
    let _ = nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    );
    socket
        .bind(SocketAddr::new(ctx.args.source, 0))
        .map_err(|e| format!("bind: {e}"))?;
    let mut stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .map_err(|_| "connect: timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(ws::upgrade_request(&ctx.hosts[node]).as_bytes())
        .await
        .map_err(|e| format!("upgrade: {e}"))?;
    let mut answer = Vec::with_capacity(256);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::timeout_at(deadline, stream.readable())
            .await
            .map_err(|_| "upgrade: timed out".to_string())?
            .map_err(|e| format!("upgrade: {e}"))?;
        let mut chunk = [0u8; 512];
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err("upgrade: closed".into()),
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("upgrade: {e}")),
        }
        match ws::upgrade_response(&answer) {
            // The node says nothing after the 101 until hello.
            Ok(Some(_)) => return Ok(stream),
            Ok(None) => continue,
            Err(status) => return Err(status),
        }
    }
}
