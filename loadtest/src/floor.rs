//! `floor`: what one delivery costs at the least on this machine. A writer (this process) and
//! a reader (a second process) over N loopback sockets; R messages a second, each one `write(2)`
//! per socket of the frame the gateway writes per delivery, and nothing else. The writer's CPU
//! per write is the floor under the gateway's CPU per delivery: measured in the same run, the
//! ratio of the two is what the gateway adds.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Args as ClapArgs;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};
use serde_json::{json, Value};

use crate::cpu;
use crate::delivery;
use crate::report::Report;
use crate::tcp_info;

/// Longest the reader may take to connect every socket, and to read the rest after the last
/// write.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a socket may stay full; then the reader is taken to have stopped reading.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Sockets: the subscribers of the fan-out to compare with.
    #[arg(short = 'n', long, default_value_t = 100)]
    sockets: usize,
    /// Messages a second; each message is one write to every socket.
    #[arg(short = 'r', long, default_value_t = 100)]
    rate: u64,
    /// How long to write.
    #[arg(short = 't', long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Payload bytes of the fan-out to compare with: message k is written as the frame the
    /// gateway writes for seq k of a `fanout -c 1 -p PAYLOAD` run (the same bytes).
    #[arg(short = 'p', long, default_value_t = 64)]
    payload: usize,
    /// Write frames of exactly this many bytes instead.
    #[arg(long)]
    frame_bytes: Option<usize>,
}

/// The reader's side: a second process that reads every socket to its end.
#[derive(ClapArgs, Debug)]
pub struct ReaderArgs {
    /// The writer's listener.
    #[arg(long)]
    connect: SocketAddr,
    /// Sockets to open.
    #[arg(short = 'n', long)]
    sockets: usize,
    /// Bytes each socket must carry.
    #[arg(long)]
    expect: u64,
}

/// What the writes met besides success.
#[derive(Default)]
struct Tally {
    /// `write(2)` refused with EAGAIN (the socket buffer was full): none expected at the rates
    /// of a benchmark.
    eagain: u64,
    /// Writes that took only part of a frame (the rest took another write).
    partial: u64,
    /// How late the latest message started: the writer's rate fell behind the asked one.
    late: Duration,
}

pub fn run(args: Args) -> anyhow::Result<Report> {
    ensure!(
        args.sockets > 0 && args.rate > 0,
        "-n and -r must be above zero"
    );
    let messages = (args.rate as f64 * args.duration.as_secs_f64()) as u64;
    let frame = |seq: u64| match args.frame_bytes {
        Some(bytes) => vec![b'x'; bytes],
        None => delivery::fanout_frame(seq, args.payload),
    };
    let per_socket: u64 = (1..=messages).map(|seq| frame(seq).len() as u64).sum();

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut reader = Reader::start(listener.local_addr()?, args.sockets, per_socket)?;
    let sockets = accept(&listener, args.sockets, &mut reader)?;

    let mut tally = Tally::default();
    let cpu_before = cpu::own()?;
    let started = Instant::now();
    for (k, seq) in (1..=messages).enumerate() {
        let due = started + Duration::from_secs_f64(k as f64 / args.rate as f64);
        let now = Instant::now();
        match due.checked_duration_since(now) {
            Some(wait) => std::thread::sleep(wait),
            None => tally.late = tally.late.max(now - due),
        }
        let frame = frame(seq);
        for socket in &sockets {
            write_frame(socket, &frame, &mut tally)?;
        }
    }
    let cpu = cpu::own()? - cpu_before;
    let writing = started.elapsed();
    drop(sockets);
    let read = reader.finish()?;

    let writes = messages * args.sockets as u64;
    let mut report = Report::new("floor");
    report
        .add("sockets", args.sockets as u64)
        .add("rate", args.rate)
        .add("duration_seconds", args.duration.as_secs_f64())
        .add("payload_bytes", args.payload as u64)
        .add("frame_bytes", frame(messages.max(1)).len() as u64)
        .add("writes", writes)
        .add("writes_per_second", writes as f64 / writing.as_secs_f64())
        .add("cpu_seconds", cpu.as_secs_f64())
        .add(
            "cpu_us_per_write",
            cpu.as_secs_f64() * 1e6 / writes.max(1) as f64,
        )
        .add("eagain", tally.eagain)
        .add("partial_writes", tally.partial)
        .add("late_max_ms", tally.late.as_secs_f64() * 1e3)
        .add("bytes_written", per_socket * args.sockets as u64)
        .add("bytes_read", read["bytes"].clone())
        .add("short_sockets", read["short_sockets"].clone())
        .add("reader_cpu_seconds", read["cpu_seconds"].clone());
    if let Some(segments) = read["segments"].as_u64() {
        report.add("segments_per_write", segments as f64 / writes.max(1) as f64);
    }
    Ok(report)
}

/// Accepts the reader's `n` sockets, non-blocking and without Nagle's delay, as the gateway
/// sets its own.
fn accept(listener: &TcpListener, n: usize, reader: &mut Reader) -> anyhow::Result<Vec<TcpStream>> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut sockets = Vec::with_capacity(n);
    while sockets.len() < n {
        match listener.accept() {
            Ok((socket, _)) => {
                socket.set_nonblocking(true)?;
                socket.set_nodelay(true)?;
                sockets.push(socket);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(status) = reader.child.try_wait()? {
                    bail!(
                        "the reader ended ({status}) after {} sockets",
                        sockets.len()
                    );
                }
                ensure!(
                    Instant::now() < deadline,
                    "the reader opened {} of {n} sockets in {SETUP_TIMEOUT:?}",
                    sockets.len()
                );
                let mut ready = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                poll(&mut ready, 100u16)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(sockets)
}

/// One `write(2)` of the frame (as the gateway's, and as a C program's, one per delivery);
/// more only when the socket takes part of it or is full, which the tally counts.
fn write_frame(socket: &TcpStream, frame: &[u8], tally: &mut Tally) -> anyhow::Result<()> {
    let mut rest = frame;
    let mut stalled_since: Option<Instant> = None;
    while !rest.is_empty() {
        match nix::unistd::write(socket, rest) {
            Ok(n) => {
                if n < rest.len() {
                    tally.partial += 1;
                }
                rest = &rest[n..];
            }
            Err(Errno::EAGAIN) => {
                tally.eagain += 1;
                let since = *stalled_since.get_or_insert_with(Instant::now);
                ensure!(
                    since.elapsed() < STALL_TIMEOUT,
                    "a socket stayed full for {STALL_TIMEOUT:?}: the reader stopped reading"
                );
                let mut ready = [PollFd::new(socket.as_fd(), PollFlags::POLLOUT)];
                poll(&mut ready, 100u16)?;
            }
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e).context("write(2) to a reader's socket"),
        }
    }
    Ok(())
}

/// The reader process: this binary again, with the hidden `floor-reader` subcommand.
struct Reader {
    child: Child,
}

impl Reader {
    fn start(listener: SocketAddr, sockets: usize, expect: u64) -> anyhow::Result<Self> {
        let child = Command::new(std::env::current_exe()?)
            .arg("floor-reader")
            .args(["--connect", &listener.to_string()])
            .args(["-n", &sockets.to_string()])
            .args(["--expect", &expect.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the reader")?;
        Ok(Self { child })
    }

    /// Waits (bounded) for the reader to read every socket to its end, and returns its tally.
    fn finish(&mut self) -> anyhow::Result<Value> {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            ensure!(
                Instant::now() < deadline,
                "the reader did not finish within {SETUP_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_string(&mut out)?;
        }
        ensure!(status.success(), "the reader failed ({status})");
        serde_json::from_str(&out).with_context(|| format!("the reader's tally: {out:?}"))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The reader: opens the sockets one after another, then reads all of them to their end on the
/// same runtime as `fanout`'s subscribers (tokio's, a thread per core), so that the writer
/// wakes a reader as the gateway wakes its clients. Prints the bytes read, how many sockets
/// carried other than `expect`, and its own CPU time.
pub fn read(args: ReaderArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let (bytes, short, segments) = runtime.block_on(async {
        let mut readers = Vec::with_capacity(args.sockets);
        for _ in 0..args.sockets {
            let socket = tokio::net::TcpStream::connect(args.connect).await?;
            readers.push(tokio::spawn(read_to_end(socket)));
        }
        let (mut bytes, mut short, mut segments) = (0u64, 0u64, Some(0u64));
        for reader in readers {
            let (read, segments_read) = reader.await??;
            bytes += read;
            short += u64::from(read != args.expect);
            segments = segments.zip(segments_read).map(|(sum, n)| sum + n);
        }
        anyhow::Ok((bytes, short, segments))
    })?;
    let cpu = cpu::own()?;
    let tally = json!({
        "bytes": bytes,
        "short_sockets": short,
        "segments": segments,
        "cpu_seconds": cpu.as_secs_f64(),
    });
    println!("{tally}");
    Ok(())
}

/// Reads `socket` to its end: the bytes, and the data segments they came in.
async fn read_to_end(socket: tokio::net::TcpStream) -> std::io::Result<(u64, Option<u64>)> {
    let mut bytes = 0;
    loop {
        socket.readable().await?;
        // On the stack of this poll only: ten thousand readers keep no buffer between reads.
        let mut buffer = [0u8; 16 * 1024];
        match socket.try_read(&mut buffer) {
            Ok(0) => return Ok((bytes, tcp_info::data_segments_in(&socket))),
            Ok(n) => bytes += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}
