//! The nodes `scale` measures: a Redis and N gateway nodes that it starts itself on loopback
//! ports below the ephemeral range (and stops, by pid, whatever happens), or the cluster that
//! `deploy/local/up.sh N` started, read from its state directory (pids and addresses), which it
//! leaves running.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shared::admin::AdminClient;

pub struct Node {
    pub name: String,
    pub pid: u32,
    pub client: SocketAddr,
    pub admin: String,
    /// Signalled away by the scenario (drained or killed): left out of the figures after.
    pub gone: bool,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub redis_pid: Option<u32>,
    /// The processes this scenario started (nodes, then Redis last): stopped on drop.
    children: Vec<Child>,
}

pub struct Spawn {
    pub nodes: usize,
    pub gateway: PathBuf,
    pub base_port: u16,
    pub redis_port: u16,
    pub max_connections: usize,
    pub heartbeat: Duration,
    pub dir: PathBuf,
}

impl Cluster {
    /// Starts Redis and `spawn.nodes` nodes; their logs go to `spawn.dir/logs`.
    pub async fn start(spawn: &Spawn) -> anyhow::Result<Self> {
        let logs = spawn.dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = |name: &str| -> anyhow::Result<Stdio> {
            Ok(std::fs::File::create(logs.join(format!("{name}.log")))?.into())
        };
        let mut cluster = Cluster {
            nodes: Vec::new(),
            redis_pid: None,
            children: Vec::new(),
        };
        // Redis, one thread, shares 2 cores with dozens of nodes and workers here: at the
        // scheduler's fair share it answers the nodes' link checks too late and they drop their
        // links. A higher priority stands for the machine of its own it has in production
        // (`nice` runs it at the usual one where it may not raise it).
        let redis = Command::new("nice")
            .args(["-n", "-10", "redis-server"])
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &spawn.redis_port.to_string(),
            ])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&spawn.dir)
            .stdin(Stdio::null())
            .stdout(log("redis")?)
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?;
        cluster.redis_pid = Some(redis.id());
        cluster.children.push(redis);
        let redis_addr = format!("127.0.0.1:{}", spawn.redis_port);
        wait_until(Duration::from_secs(10), "redis-server", || {
            std::net::TcpStream::connect(&redis_addr).is_ok()
        })?;

        for i in 0..spawn.nodes {
            let client_port = spawn.base_port + i as u16;
            let admin_port = spawn.base_port + 1000 + i as u16;
            let name = format!("scale-{}", i + 1);
            let child = Command::new(&spawn.gateway)
                .args(["--listen", &format!("127.0.0.1:{client_port}")])
                .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
                .args(["--node-id", &name])
                .args(["--redis-url", &format!("redis://{redis_addr}")])
                .args(["--max-connections", &spawn.max_connections.to_string()])
                .args([
                    "--heartbeat-interval",
                    &humantime::format_duration(spawn.heartbeat).to_string(),
                ])
                .env_remove("BGW_API_KEY")
                .env_remove("BGW_JWT_SECRET")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log(&name)?)
                .spawn()
                .with_context(|| format!("starting {}", spawn.gateway.display()))?;
            cluster.nodes.push(Node {
                name,
                pid: child.id(),
                client: SocketAddr::from(([127, 0, 0, 1], client_port)),
                admin: format!("http://127.0.0.1:{admin_port}"),
                gone: false,
            });
            // Nodes last in, first out: Redis stays the last child.
            cluster.children.insert(cluster.children.len() - 1, child);
        }
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// The cluster of `deploy/local/up.sh`, from its state directory: `pids` (name pid start)
    /// and `cluster.env` (BGW_LOCAL_NODE_ADDR_i, BGW_LOCAL_ADMIN_URL_i).
    pub async fn attach(dir: &Path) -> anyhow::Result<Self> {
        let env = std::fs::read_to_string(dir.join("cluster.env"))
            .with_context(|| format!("reading {}/cluster.env", dir.display()))?;
        let pids = std::fs::read_to_string(dir.join("pids"))?;
        let value = |key: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        let mut cluster = Cluster {
            nodes: Vec::new(),
            redis_pid: None,
            children: Vec::new(),
        };
        for line in pids.lines() {
            let mut fields = line.split_whitespace();
            let (Some(name), Some(pid)) = (fields.next(), fields.next()) else {
                continue;
            };
            let pid: u32 = pid.parse()?;
            if name == "redis" {
                cluster.redis_pid = Some(pid);
            }
            let Some(i) = name.strip_prefix("gateway-") else {
                continue;
            };
            let client = value(&format!("BGW_LOCAL_NODE_ADDR_{i}"))
                .with_context(|| format!("BGW_LOCAL_NODE_ADDR_{i} in cluster.env"))?;
            let admin = value(&format!("BGW_LOCAL_ADMIN_URL_{i}"))
                .with_context(|| format!("BGW_LOCAL_ADMIN_URL_{i} in cluster.env"))?;
            cluster.nodes.push(Node {
                name: name.to_owned(),
                pid,
                client: client.parse()?,
                admin,
                gone: false,
            });
        }
        anyhow::ensure!(
            !cluster.nodes.is_empty(),
            "no gateway node in {}",
            dir.display()
        );
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        for node in &self.nodes {
            loop {
                if let Ok(mut admin) = AdminClient::connect(&node.admin, None).await {
                    if admin
                        .get_json::<serde_json::Value>("/v1/stats")
                        .await
                        .is_ok()
                    {
                        break;
                    }
                }
                if Instant::now() > deadline {
                    bail!("{} ({}) not up within 60 s", node.name, node.admin);
                }
                if !alive(node.pid) {
                    bail!("{} (pid {}) exited; see its log", node.name, node.pid);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    pub fn live_nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| !n.gone)
    }

    /// Sends `signal` to node `i` and counts it out of the figures from now on.
    pub fn signal(&mut self, i: usize, signal: Signal) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        kill(Pid::from_raw(node.pid as i32), signal)
            .with_context(|| format!("{signal} to {} (pid {})", node.name, node.pid))?;
        node.gone = true;
        Ok(())
    }

    /// Stops what this scenario started: SIGTERM to the nodes (they drain and exit), Redis after
    /// them, SIGKILL to whatever outlives `timeout`.
    pub fn stop(&mut self, timeout: Duration) {
        let mut children = std::mem::take(&mut self.children);
        let redis = children.pop();
        stop_all(&mut children, timeout);
        if let Some(redis) = redis {
            stop_all(&mut [redis], timeout);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn stop_all(children: &mut [Child], timeout: Duration) {
    for child in children.iter() {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + timeout;
    for child in children.iter_mut() {
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Whether process `pid` exists and has not exited (a zombie has).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat[stat.rfind(')')? + 1..].split_whitespace().next()?;
            Some(state != "Z")
        })
        .unwrap_or(false)
}

fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} not ready within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The gateway binary: beside this one (`target/release/`), else `gateway` on the PATH.
pub fn default_gateway() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("gateway")))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("gateway"))
}
