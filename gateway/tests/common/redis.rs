//! Real `redis-server` processes for the tests: standalone (stopped and started again on the
//! same port for outage tests), over TLS with certificates made for the test, a 3-master
//! cluster, and a master with a replica watched by 3 Sentinels. Each listens on loopback, on a
//! port nobody else holds, in a directory of its own, and is killed by its pid when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::wait::wait_for;

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    persistent: bool,
    cluster: bool,
    /// Serve TLS only (on `port`), with these certificates.
    tls: Option<Arc<Certs>>,
    /// More arguments of `redis-server`.
    extra: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A standalone Redis; `persistent` turns the append-only file on, so that a restart keeps
    /// what was written.
    pub fn start(persistent: bool) -> Self {
        Self::launched(free_port(), None, &[], persistent)
    }

    /// A standalone Redis on `port`, over TLS with `tls`, with more arguments.
    pub fn start_with(port: u16, tls: Option<Arc<Certs>>, extra: &[&str]) -> Self {
        Self::launched(port, tls, extra, false)
    }

    fn launched(port: u16, tls: Option<Arc<Certs>>, extra: &[&str], persistent: bool) -> Self {
        let mut server = Self {
            port,
            dir: temp_dir("redis"),
            persistent,
            cluster: false,
            tls,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.launch();
        server
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            Some(certs) => {
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(certs.path("server.crt"))
                    .arg("--tls-key-file")
                    .arg(certs.path("server.key"))
                    .arg("--tls-ca-cert-file")
                    .arg(certs.path("ca.crt"))
                    .args(["--tls-auth-clients", "yes"]);
                if self.cluster {
                    cmd.args(["--tls-cluster", "yes"]);
                }
            }
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
        }
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--protected-mode",
            "no",
        ])
        .arg("--dir")
        .arg(&self.dir)
        .args(["--appendonly", if self.persistent { "yes" } else { "no" }])
        .args(["--appendfsync", "always"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if self.cluster {
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ]);
        }
        cmd.args(&self.extra);
        self.child = Some(
            cmd.spawn()
                .expect("redis-server runs (deploy/test.sh installs it)"),
        );
        wait_for(Duration::from_secs(10), || {
            self.cli(&["PING"]).is_some_and(|out| out.trim() == "PONG")
        });
    }

    /// Kills the server, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the same data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Runs `redis-cli` against this server; `None` when it failed.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        cli(self.port, self.tls.as_deref(), &self.extra, args)
    }

    /// Stops the process (SIGSTOP): it keeps its sockets open but answers nothing, as a stalled
    /// server would, until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("the server runs").id();
        let status = Command::new("kill")
            .args([name, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {name} {pid}");
    }
}

/// Runs `redis-cli` against the server on `port`; `None` when it failed. A password among the
/// server's `extra` arguments is used.
fn cli(port: u16, tls: Option<&Certs>, extra: &[String], args: &[&str]) -> Option<String> {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(certs) = tls {
        cmd.arg("--tls").args(certs.client_args());
    }
    if let Some(at) = extra.iter().position(|a| a == "--requirepass") {
        cmd.args(["--no-auth-warning", "-a", &extra[at + 1]]);
    }
    {
        let out = cmd.args(args).stderr(Stdio::null()).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three masters, no replicas, every slot covered.
pub struct RedisCluster {
    pub masters: Vec<RedisServer>,
    tls: bool,
}

impl RedisCluster {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A cluster over TLS with `tls` (clients and the cluster bus), or in the clear.
    pub fn start_with(tls: Option<Arc<Certs>>) -> Self {
        let masters: Vec<RedisServer> = (0..3)
            .map(|_| {
                let mut server = RedisServer {
                    port: free_cluster_port(),
                    dir: temp_dir("redis-cluster"),
                    persistent: false,
                    cluster: true,
                    tls: tls.clone(),
                    extra: Vec::new(),
                    child: None,
                };
                server.launch();
                server
            })
            .collect();
        let addrs: Vec<String> = masters
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port))
            .collect();
        let mut create = Command::new("redis-cli");
        if let Some(certs) = &tls {
            create.arg("--tls").args(certs.client_args());
        }
        let mut creating = create
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli runs");
        // It waits for the nodes to join for as long as it takes: here, 30 s at most.
        let mut status = None;
        wait_for(Duration::from_secs(30), || {
            status = creating.try_wait().expect("try_wait");
            status.is_some()
        });
        assert!(
            status.is_some_and(|s| s.success()),
            "redis-cli --cluster create failed"
        );
        let cluster = Self {
            masters,
            tls: tls.is_some(),
        };
        wait_for(Duration::from_secs(20), || {
            cluster.masters.iter().all(|m| {
                m.cli(&["CLUSTER", "INFO"])
                    .is_some_and(|info| info.contains("cluster_state:ok"))
            })
        });
        cluster
    }

    /// The URL the gateway takes: the seed nodes.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .masters
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port))
            .collect();
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}+cluster://{}", seeds.join(","))
    }
}

/// A CA, and a server and a client certificate it signed, made with the openssl CLI in a
/// directory of their own. The server's is for `127.0.0.1` (an IP address SAN).
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn generate() -> Arc<Certs> {
        let dir = temp_dir("certs");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdin(Stdio::null())
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=bgw test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        // A cluster node is also the client of the other nodes' bus, with its server certificate.
        for (name, usage) in [
            ("server", "serverAuth,clientAuth"),
            ("client", "clientAuth"),
        ] {
            std::fs::write(
                dir.join(format!("{name}.ext")),
                format!(
                    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
                     extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
                ),
            )
            .expect("write an extension file");
            let (key, csr, crt, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN=bgw test {name}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ]);
        }
        Arc::new(Certs { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The gateway's flags for the CA and the client certificate.
    pub fn gateway_flags(&self) -> Vec<String> {
        let path = |name: &str| self.path(name).display().to_string();
        vec![
            "--redis-ca-file".into(),
            path("ca.crt"),
            "--redis-client-cert".into(),
            path("client.crt"),
            "--redis-client-key".into(),
            path("client.key"),
        ]
    }

    fn client_args(&self) -> Vec<PathBuf> {
        let flag = |f: &str| PathBuf::from(f);
        vec![
            flag("--cacert"),
            self.path("ca.crt"),
            flag("--cert"),
            self.path("client.crt"),
            flag("--key"),
            self.path("client.key"),
        ]
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A master and its replica, watched by three Sentinels that know the master as `mymaster`.
pub struct Sentinels {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub ports: Vec<u16>,
    children: Vec<Child>,
    dir: PathBuf,
    tls: Option<Arc<Certs>>,
}

impl Sentinels {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Over TLS with `tls` (clients, replication and the Sentinels), or in the clear.
    pub fn start_with(tls: Option<Arc<Certs>>) -> Self {
        let tls_replication: &[&str] = if tls.is_some() {
            &["--tls-replication", "yes"]
        } else {
            &[]
        };
        let master = RedisServer::start_with(free_port(), tls.clone(), tls_replication);
        let master_port = master.port.to_string();
        let mut replica_args = vec!["--replicaof", "127.0.0.1", &master_port];
        replica_args.extend(tls_replication);
        let replica = RedisServer::start_with(free_port(), tls.clone(), &replica_args);
        wait_for(Duration::from_secs(20), || {
            replica
                .cli(&["INFO", "replication"])
                .is_some_and(|info| info.contains("master_link_status:up"))
        });
        let dir = temp_dir("sentinels");
        let mut set = Self {
            master,
            replica,
            ports: Vec::new(),
            children: Vec::new(),
            dir,
            tls,
        };
        for i in 0..3 {
            let port = free_port();
            let conf = set.dir.join(format!("sentinel-{i}.conf"));
            let work = set.dir.join(format!("sentinel-{i}"));
            std::fs::create_dir_all(&work).expect("a sentinel dir");
            let listen = match &set.tls {
                Some(certs) => format!(
                    "port 0\ntls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                     tls-ca-cert-file {}\ntls-replication yes\n",
                    certs.path("server.crt").display(),
                    certs.path("server.key").display(),
                    certs.path("ca.crt").display()
                ),
                None => format!("port {port}\n"),
            };
            std::fs::write(
                &conf,
                format!(
                    "{listen}bind 127.0.0.1\ndir {}\n\
                     sentinel monitor mymaster 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds mymaster 5000\n\
                     sentinel failover-timeout mymaster 20000\n",
                    work.display(),
                    set.master.port
                ),
            )
            .expect("write a sentinel config");
            let child = Command::new("redis-sentinel")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-sentinel runs (deploy/test.sh installs it)");
            set.children.push(child);
            set.ports.push(port);
        }
        // A failover needs a replica that every Sentinel has seen.
        let replica = format!("{}", set.replica.port);
        for port in set.ports.clone() {
            wait_for(Duration::from_secs(20), || {
                set.sentinel(port, &["SENTINEL", "REPLICAS", "mymaster"])
                    .is_some_and(|out| out.lines().any(|line| line.trim() == replica))
            });
        }
        set
    }

    /// The URL the gateway takes.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}+sentinel://{}/mymaster", hosts.join(","))
    }

    /// Runs `redis-cli` against the Sentinel on `port`.
    pub fn sentinel(&self, port: u16, args: &[&str]) -> Option<String> {
        cli(port, self.tls.as_deref(), &[], args)
    }

    /// The port of the master the first Sentinel names.
    pub fn master_port(&self) -> Option<u16> {
        let out = self.sentinel(
            self.ports[0],
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
        )?;
        out.lines().nth(1)?.trim().parse().ok()
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A free port whose cluster bus port (port + 10000) is free too, and exists.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= u16::MAX - 10_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "bgw-{prefix}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    dir
}
