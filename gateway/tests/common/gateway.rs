//! One `gateway` process on loopback ports: started, read (its logs, `/metrics`), signalled,
//! and killed by its pid when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::time::timeout;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Error as WsError;

use super::admin::{Admin, Published};
use super::client::{Client, Welcome};
use super::wait::{wait_until, DEADLINE};

/// The flags that choose the broker of the conformance suite: the embedded broker by default,
/// Redis when `BGW_TEST_REDIS_URL` is set (`redis://127.0.0.1:6379/0`).
pub fn broker_flags() -> Vec<String> {
    match std::env::var("BGW_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => vec!["--redis-url".into(), url],
        _ => Vec::new(),
    }
}

/// One `gateway` process on `127.0.0.1:0` ports.
pub struct Gateway {
    child: Child,
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The node id the gateway logged.
    pub node: String,
    /// Every line the process wrote to stderr so far.
    logs: Arc<Mutex<String>>,
}

impl Gateway {
    /// Starts `gateway` with `flags` after the listen addresses, and waits for its `listening`
    /// line. `BGW_` variables of the test's environment are not passed on.
    pub fn start(flags: &[&str]) -> Gateway {
        let mut command = gateway_command();
        command
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(flags)
            .env("BGW_LOG", "info,gateway=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn the gateway binary");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(String::new()));
        let (found, listening) = mpsc::channel();
        let sink = logs.clone();
        // Reads stderr to its end, so that the pipe never fills and blocks the node.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let text = line.contains(" listening ") && line.contains("client=");
                let json = line.contains(r#""message":"listening""#);
                if text || json {
                    let _ = found.send(line.clone());
                }
                let mut logs = sink.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let line = match listening.recv_timeout(DEADLINE) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "gateway {flags:?} did not log its addresses ({e}); its logs:\n{}",
                    logs.lock().unwrap()
                );
            }
        };
        // `name=value` in text logs; `"name":"value"` in JSON logs (`--log-format json`).
        let field = |name: &str| -> String {
            let json = format!("\"{}\":", name.trim_end_matches('='));
            line.split_whitespace()
                .find_map(|token| token.strip_prefix(name))
                .or_else(|| {
                    line.split(',')
                        .find_map(|part| part.trim_start_matches('{').strip_prefix(&json))
                })
                .unwrap_or_else(|| panic!("no `{name}` in `{line}`"))
                .trim_end_matches('}')
                .trim_matches('"')
                .to_owned()
        };
        Gateway {
            client_addr: field("client=").parse().expect("client address"),
            admin_addr: field("admin=").parse().expect("admin address"),
            node: field("node="),
            child,
            logs,
        }
    }

    /// Starts a node on the Redis at `redis_url` (the embedded broker for `None`), with `flags`.
    pub fn start_on(redis_url: Option<&str>, flags: &[&str]) -> Gateway {
        let mut all = flags.to_vec();
        if let Some(url) = redis_url {
            all.extend(["--redis-url", url]);
        }
        Gateway::start(&all)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Sends SIGTERM to the process (the drain), once the process catches it: the node logs
    /// its addresses a moment before it installs its signal handlers, and a SIGTERM in between
    /// would kill it outright.
    pub fn terminate(&self) {
        let until = std::time::Instant::now() + DEADLINE;
        while !self.catches_sigterm() {
            assert!(
                std::time::Instant::now() < until,
                "the gateway never installed a SIGTERM handler"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Whether the process has a handler for SIGTERM (Linux: `SigCgt` of /proc/PID/status).
    fn catches_sigterm(&self) -> bool {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (15 - 1)) != 0)
    }

    /// Waits for the process to exit, up to `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        wait_until(deadline, "the gateway exiting", async || {
            let status = self.child.try_wait().expect("try_wait");
            status.ok_or_else(|| "still running".to_owned())
        })
        .await
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.client_addr)
    }

    /// An upgrade request to `/ws` (plus `query`, when not empty) that a test may add headers to.
    pub fn request(&self, query: &str) -> Request {
        let url = if query.is_empty() {
            self.ws_url()
        } else {
            format!("{}?{query}", self.ws_url())
        };
        url.into_client_request().expect("a valid request")
    }

    /// Connects to `/ws`, panicking when the upgrade fails.
    pub async fn connect(&self) -> Client {
        self.try_connect(self.request(""))
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.ws_url()))
    }

    pub async fn try_connect(&self, request: Request) -> Result<Client, WsError> {
        let (ws, response) = timeout(DEADLINE, connect_async(request))
            .await
            .expect("the upgrade timed out")?;
        Ok(Client::from_parts(ws, response))
    }

    /// Connects and says an anonymous `hello`.
    pub async fn connect_hello(&self) -> (Client, Welcome) {
        let mut client = self.connect().await;
        let welcome = client.hello().await;
        (client, welcome)
    }

    /// A keep-alive connection to the admin listener.
    pub async fn admin(&self) -> Admin {
        Admin::connect(self.admin_addr).await
    }

    /// A keep-alive connection to the admin listener that sends `key` with every request.
    pub async fn admin_with_key(&self, key: &str) -> Admin {
        Admin::with_key(self.admin_addr, key).await
    }

    /// `GET path` on the admin listener, on a connection of its own.
    pub async fn get(&self, path: &str) -> (u16, String) {
        self.admin().await.get(path).await
    }

    /// `POST /v1/publish` of `data` (raw JSON text, sent as is), on a connection of its own.
    pub async fn publish(&self, channel: &str, data: &str) -> (u16, String) {
        self.admin().await.publish(channel, data).await
    }

    /// Publishes and expects `200`.
    pub async fn publish_ok(&self, channel: &str, data: &str) -> Published {
        self.admin().await.publish_ok(channel, data).await
    }

    pub async fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    /// The value of one series of `/metrics` (`bgw_closes_total{code="4030"}`), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// Polls `/metrics` until `series` reaches `at_least`.
    pub async fn wait_metric(&self, series: &str, at_least: f64) {
        self.wait_metric_until(series, |v| v >= at_least, &format!(">= {at_least}"))
            .await;
    }

    /// Polls `/metrics` until `series` satisfies `check`.
    pub async fn wait_metric_until(&self, series: &str, check: impl Fn(f64) -> bool, what: &str) {
        wait_until(DEADLINE, &format!("{series} {what}"), async || {
            let value = self.metric(series).await;
            check(value).then_some(()).ok_or(format!("{value}"))
        })
        .await;
    }

    /// Polls `/readyz` until it answers `want`.
    pub async fn wait_ready(&self, want: u16) {
        let what = format!("/readyz of {} answering {want}", self.node);
        wait_until(DEADLINE, &what, async || {
            let (status, body) = self.get("/readyz").await;
            (status == want)
                .then_some(())
                .ok_or(format!("{status} {body}"))
        })
        .await;
    }

    /// Runs a subcommand of the `gateway` binary (`publish`, `history`...) against this node's
    /// admin listener, with `api_key` in `BGW_API_KEY`.
    pub async fn cli(&self, args: &[&str], api_key: Option<&str>) -> Output {
        let url = format!("http://{}", self.admin_addr);
        let args = [args, &["--admin-url", &url]].concat();
        let env: Vec<_> = api_key
            .map(|key| ("BGW_API_KEY", key))
            .into_iter()
            .collect();
        cli(&args, &env, None).await
    }

    /// Waits until the node has logged `needle`; its logs then.
    pub async fn wait_log(&self, needle: &str) -> String {
        wait_for_logs(self, |logs| logs.contains(needle)).await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Child::kill signals this process by its pid, and nothing else.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- logs of the gateway (pid {}) ----\n{}",
                self.child.id(),
                self.logs()
            );
        }
    }
}

/// The `gateway` binary, without the `BGW_` variables of the test's own environment: a test
/// passes those it means.
pub fn gateway_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gateway"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("BGW_") {
            command.env_remove(name);
        }
    }
    command
}

/// Runs the `gateway` binary with `args`, `env` (and `stdin`, if any) to its end, within the
/// deadline; what it printed and how it exited.
pub async fn cli(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut command = tokio::process::Command::from(gateway_command());
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("run the gateway binary");
    let mut input = child.stdin.take().expect("stdin is piped");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).await.expect("write stdin");
    }
    drop(input);
    timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("gateway {args:?} did not finish"))
        .expect("wait for the gateway binary")
}

/// The node's logs once `ready` holds for them, or a panic at the deadline.
pub async fn wait_for_logs(gw: &Gateway, ready: impl Fn(&str) -> bool) -> String {
    wait_until(DEADLINE, "the logs showing it", async || {
        let logs = gw.logs();
        if ready(&logs) {
            Ok(logs)
        } else {
            Err("see the node's logs, printed with the failure".to_owned())
        }
    })
    .await
}

/// The events of a JSON log (`--log-format json`) whose message starts with `message`.
pub fn log_events(logs: &str, message: &str) -> Vec<Value> {
    logs.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| {
            event["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .collect()
}

/// The value of `series` in a Prometheus text exposition; 0 when absent.
pub fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().expect("a metric value"))
        })
        .unwrap_or(0.0)
}
