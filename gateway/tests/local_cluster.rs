//! The one-command local cluster (`deploy/local/up.sh`): Redis, 3 nodes of the binary under test
//! and nginx with the shipped config, on free loopback ports in a state directory of the test's
//! own. A WebSocket through its nginx gets what is published through a node's admin port, and
//! `deploy/local/down.sh` then stops every process `up.sh` started.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    channel, free_port, refusal_status, upgrade_request, wait_for, Admin, Client, DEADLINE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const NODES: u16 = 3;

/// How long `up.sh` and `down.sh` may take: the nodes wait out their 2 s drain delay on the way
/// down, and a loaded 2-core machine is slow.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(90);

/// The ports of one cluster: nginx on `client`, node i on `client + i`, its admin listener on
/// `admin + i - 1`.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    admin: u16,
    redis: u16,
}

impl Ports {
    /// Runs of free ports below the ephemeral range (where `127.0.0.1:0` listeners of other
    /// tests land), probed by binding them.
    fn free() -> Ports {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let mut next = 15_000 + (std::process::id().wrapping_mul(7919) ^ nanos) % 15_000;
        let mut held = Vec::new();
        let mut run = |len: u16| -> u16 {
            loop {
                let base = 15_000 + (next % 15_000) as u16;
                next += u32::from(len) + 1;
                let bound: Vec<TcpListener> = (base..base + len)
                    .map_while(|port| TcpListener::bind(("127.0.0.1", port)).ok())
                    .collect();
                if bound.len() == usize::from(len) {
                    held.extend(bound);
                    return base;
                }
            }
        };
        let client = run(NODES + 1);
        let admin = run(NODES);
        drop(held);
        Ports {
            client,
            admin,
            redis: free_port(),
        }
    }

    fn admin_addr(&self, node: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin + node - 1))
    }
}

/// One process `up.sh` recorded: `name pid start` in its pids file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Recorded {
    name: String,
    pid: u32,
    start: String,
}

/// Field 3 (state) and 22 (start time) of /proc/PID/stat; `None` when there is no such pid.
fn proc_stat(pid: u32) -> Option<(String, String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    Some((
        fields[0].to_owned(),
        fields[19].to_owned(),
        fields[1].parse().ok()?,
    ))
}

impl Recorded {
    /// Still the process that was started, and not exited. (A zombie has exited: on machines
    /// whose pid 1 does not reap orphans it stays one.)
    fn running(&self) -> bool {
        proc_stat(self.pid).is_some_and(|(state, start, _)| state != "Z" && start == self.start)
    }
}

/// The live children of `pid` (nginx's workers), as if recorded.
fn children(pid: u32) -> Vec<Recorded> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if let Some((state, start, parent)) = proc_stat(child) {
            if parent == pid && state != "Z" {
                found.push(Recorded {
                    name: format!("child of {pid}"),
                    pid: child,
                    start,
                });
            }
        }
    }
    found
}

/// A cluster of `up.sh` in a state directory of its own. Dropping it runs `down.sh` (when the
/// test did not get that far) and removes the directory.
struct LocalCluster {
    dir: PathBuf,
    ports: Ports,
    stopped: bool,
}

impl LocalCluster {
    fn script(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/local/{name}"))
    }

    /// The script with this cluster's environment; `BGW_` variables of the test's own
    /// environment are not passed on.
    fn command(&self, name: &str) -> std::process::Command {
        let mut command = std::process::Command::new(Self::script(name));
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("BGW_") {
                command.env_remove(var);
            }
        }
        command
            .env("BGW_GATEWAY_BIN", env!("CARGO_BIN_EXE_gateway"))
            .env("BGW_LOCAL_DIR", &self.dir)
            .env("BGW_LOCAL_PORT", self.ports.client.to_string())
            .env("BGW_LOCAL_ADMIN_PORT", self.ports.admin.to_string())
            .env("BGW_LOCAL_REDIS_PORT", self.ports.redis.to_string())
            .stdin(Stdio::null());
        command
    }

    /// Runs a script to its end; its output, or a panic with it when it failed.
    async fn run(&self, name: &str, args: &[&str]) -> String {
        let mut command = Command::from(self.command(name));
        command.args(args).kill_on_drop(true);
        let output = tokio::time::timeout(SCRIPT_DEADLINE, command.output())
            .await
            .unwrap_or_else(|_| panic!("{name} did not finish within {SCRIPT_DEADLINE:?}"))
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{name} failed ({}):\n{stdout}\n{stderr}",
            output.status
        );
        stdout
    }

    async fn up(nodes: u16) -> (LocalCluster, String) {
        let ports = Ports::free();
        let dir = std::env::temp_dir().join(format!(
            "bgw-local-cluster-{}-{}",
            std::process::id(),
            ports.client
        ));
        let cluster = LocalCluster {
            dir,
            ports,
            stopped: false,
        };
        let output = cluster.run("up.sh", &[&nodes.to_string()]).await;
        (cluster, output)
    }

    fn recorded(&self) -> Vec<Recorded> {
        let pids = std::fs::read_to_string(self.dir.join("pids")).expect("up.sh wrote its pids");
        pids.lines()
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                assert_eq!(fields.len(), 3, "`name pid start`: {line:?}");
                Recorded {
                    name: fields[0].to_owned(),
                    pid: fields[1].parse().expect("a pid"),
                    start: fields[2].to_owned(),
                }
            })
            .collect()
    }

    async fn down(&mut self) -> String {
        self.stopped = true;
        self.run("down.sh", &[]).await
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.join("logs")) {
            for entry in entries.flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                all.push_str(&format!("--- {}\n{text}\n", entry.path().display()));
            }
        }
        all
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs of the local cluster:\n{}", self.logs());
        }
        if !self.stopped {
            let _ = self.command("down.sh").output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET path` on the loopback `port`, as a browser sends it; the whole response.
async fn http_get(port: u16, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response))
        .await
        .expect("the response timed out")
        .expect("read");
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_sh_starts_a_cluster_that_delivers_and_down_sh_stops_all_of_it() {
    let (mut cluster, output) = LocalCluster::up(NODES).await;
    let ports = cluster.ports;

    // It says where everything is.
    let client_url = format!("ws://127.0.0.1:{}/ws", ports.client);
    assert!(output.contains(&client_url), "{output}");
    assert!(
        output.contains(&format!("redis://127.0.0.1:{}", ports.redis)),
        "{output}"
    );
    for node in 1..=NODES {
        let admin = format!("http://127.0.0.1:{}", cluster.ports.admin_addr(node).port());
        assert!(output.contains(&admin), "{admin} in {output}");
    }
    assert!(output.contains("publish"), "{output}");

    // It recorded what it started: Redis, the nodes, nginx (whose workers are its children).
    let recorded = cluster.recorded();
    let names: BTreeSet<&str> = recorded.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["redis", "gateway-1", "gateway-2", "gateway-3", "nginx"]),
        "{recorded:?}"
    );
    let mut started = recorded.clone();
    for process in &recorded {
        assert!(process.running(), "{process:?} runs");
        started.extend(children(process.pid));
    }
    let nginx = recorded.iter().find(|r| r.name == "nginx").unwrap();
    assert!(
        !children(nginx.pid).is_empty(),
        "nginx's master has its workers"
    );

    // Every node is ready.
    for node in 1..=NODES {
        let mut admin = Admin::connect(ports.admin_addr(node)).await;
        let (status, body) = admin.get("/readyz").await;
        assert_eq!(status, 200, "gateway-{node}: {body}");
        assert!(body.contains(&format!("\"gateway-{node}\"")), "{body}");
    }

    // A browser on nginx's origin (the demo page it serves at /) through nginx gets what is
    // published on another node.
    let origin = format!("http://127.0.0.1:{}", ports.client);
    let page = http_get(ports.client, "/").await;
    assert!(page.starts_with("HTTP/1.1 200"), "the demo page: {page}");
    let browser = |origin: &str| {
        upgrade_request(
            &format!("{client_url}?key=local-cluster"),
            &[("origin", origin)],
        )
    };
    let (ws, response) =
        tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(browser(&origin)))
            .await
            .expect("the upgrade through nginx timed out")
            .expect("the upgrade of a browser on nginx's origin succeeded");
    let mut client = Client::from_parts(ws, response);
    let home = client.hello().await.node;
    let news = channel("local");
    client.subscribe(&news).await;
    let publisher = (1..=NODES)
        .find(|node| format!("gateway-{node}") != home)
        .expect("another node than the client's");
    let published = Admin::connect(ports.admin_addr(publisher))
        .await
        .publish_ok(&news, r#"{"hello":"local"}"#)
        .await;
    assert_eq!(published.seq, 1);
    let message = client.recv_message().await;
    assert_eq!(
        (message.seq, message.data.as_str()),
        (1, r#"{"hello":"local"}"#),
        "published through gateway-{publisher}, received on {home}"
    );
    client.close().await;
    // A page of another origin is refused, and the node it reached says why.
    let refused = tokio::time::timeout(
        DEADLINE,
        tokio_tungstenite::connect_async(browser("http://evil.example")),
    )
    .await
    .expect("the refusal through nginx timed out")
    .map(|(ws, response)| Client::from_parts(ws, response));
    assert_eq!(refusal_status(refused), 403);
    wait_for(DEADLINE, || {
        cluster
            .logs()
            .lines()
            .any(|line| line.contains("handshake refused") && line.contains("http://evil.example"))
    });

    // down.sh stops all of it, and nothing listens any more.
    cluster.down().await;
    wait_for(DEADLINE, || started.iter().all(|p| !p.running()));
    assert!(
        !cluster.dir.join("pids").exists(),
        "down.sh forgot the pids"
    );
    let client_addr = SocketAddr::from(([127, 0, 0, 1], ports.client));
    assert!(
        TcpStream::connect(client_addr).is_err(),
        "nginx still listens"
    );
    for node in 1..=NODES {
        assert!(
            TcpStream::connect(ports.admin_addr(node)).is_err(),
            "gateway-{node} still listens"
        );
    }

    // A second down.sh has nothing to stop.
    let again = cluster.run("down.sh", &[]).await;
    assert!(again.contains("nothing to stop"), "{again}");
}
