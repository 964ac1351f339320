//! Several real gateway nodes on one real Redis (standalone or cluster): fan-out across nodes,
//! resume on any node, a node killed with SIGKILL, and Redis going away and coming back.

mod redis_server;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use redis_server::{wait_for, RedisCluster, RedisServer};
use serde_json::{json, Value};
use shared::{Position, ServerFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const DEADLINE: Duration = Duration::from_secs(10);

/// A gateway process, killed by its pid when dropped.
struct Node {
    child: Child,
    client: String,
    admin: String,
}

impl Node {
    fn start(redis_url: &str, id: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(["--redis-url", redis_url, "--node-id", id])
            .env("BGW_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the gateway binary runs");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
        let (client, admin) = loop {
            let line = lines
                .next()
                .expect("the gateway logs `listening` before it exits")
                .expect("stderr is text");
            if line.contains(" listening ") {
                break (field(&line, "client="), field(&line, "admin="));
            }
        };
        // Keep draining stderr so that the gateway never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self {
            child,
            client,
            admin,
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn publish(&self, channel: &str, data: Value) -> (u16, Value) {
        admin(
            &self.admin,
            "POST",
            "/v1/publish",
            Some(json!({"channel": channel, "data": data})),
        )
        .await
    }

    async fn ready(&self) -> u16 {
        admin(&self.admin, "GET", "/readyz", None).await.0
    }

    async fn connect(&self) -> Client {
        Client::connect(&self.client).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn field(line: &str, name: &str) -> String {
    let start = line.find(name).expect("field in the listening line") + name.len();
    line[start..]
        .split_whitespace()
        .next()
        .expect("a value")
        .to_owned()
}

/// A minimal HTTP/1.1 exchange with an admin listener.
async fn admin(addr: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("admin listener answers");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("request sent");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response read");
    let status = response[9..12].parse().expect("a status code");
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    async fn connect(addr: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("upgrade accepted");
        Self { ws }
    }

    async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .expect("frame sent");
    }

    async fn recv(&mut self) -> ServerFrame {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("a frame within the deadline")
                .expect("the connection is open")
                .expect("a valid frame");
            if let Message::Text(text) = message {
                return serde_json::from_str(&text).expect("a server frame");
            }
        }
    }

    /// Sends hello and returns (session, node, resumed, channels).
    async fn hello(
        &mut self,
        session: Option<&str>,
        since: BTreeMap<String, Position>,
    ) -> (
        String,
        String,
        bool,
        BTreeMap<String, shared::frame::ChannelState>,
    ) {
        self.send(json!({"type": "hello", "session": session, "since": since}))
            .await;
        match self.recv().await {
            ServerFrame::Welcome {
                session,
                node,
                resumed,
                channels,
                ..
            } => (session, node, resumed, channels),
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Subscribes without a position; returns the epoch.
    async fn subscribe(&mut self, channel: &str) -> String {
        self.send(json!({"type": "subscribe", "channel": channel}))
            .await;
        match self.recv().await {
            ServerFrame::Subscribed { epoch, .. } => epoch,
            other => panic!("expected subscribed, got {other:?}"),
        }
    }

    /// The next `count` messages of `channel`, as (seq, data).
    async fn messages(&mut self, count: usize) -> Vec<(u64, Value)> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            match self.recv().await {
                ServerFrame::Message { seq, data, .. } => {
                    out.push((seq, serde_json::from_str(data.get()).unwrap()))
                }
                other => panic!("expected a message, got {other:?}"),
            }
        }
        out
    }

    async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Wait for the server's close reply, so that the node has seen the close.
        while let Some(Ok(_)) = self.ws.next().await {}
    }
}

fn seqs(messages: &[(u64, Value)]) -> Vec<u64> {
    messages.iter().map(|(seq, _)| *seq).collect()
}

async fn wait_ready(node: &Node, want: u16) {
    let until = tokio::time::Instant::now() + DEADLINE;
    while node.ready().await != want {
        assert!(
            tokio::time::Instant::now() < until,
            "/readyz never answered {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// 3 nodes, 30 clients over them, 300 messages published through different nodes: every
/// client gets every message exactly once, in seq order.
async fn fan_out_across_nodes(url: &str) {
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::start(url, &format!("fan-{i}")))
        .collect();
    let mut clients = Vec::new();
    for i in 0..30 {
        let mut client = nodes[i % 3].connect().await;
        client.hello(None, BTreeMap::new()).await;
        client.subscribe("fan").await;
        clients.push(client);
    }
    for n in 0..300u64 {
        let (status, reply) = nodes[n as usize % 3].publish("fan", json!({"n": n})).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["seq"], n + 1);
    }
    for client in &mut clients {
        let got = client.messages(300).await;
        assert_eq!(seqs(&got), (1..=300).collect::<Vec<_>>());
        assert!(got
            .iter()
            .enumerate()
            .all(|(i, (_, data))| data["n"] == i as u64));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_across_nodes_on_redis() {
    let redis = RedisServer::start(false);
    fan_out_across_nodes(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_across_nodes_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    fan_out_across_nodes(&cluster.url()).await;
}

/// A client that leaves node A resumes on node B: with its own positions it gets exactly what
/// it missed; without, the positions the gateway stored are used.
async fn resume_on_another_node(url: &str) {
    let a = Node::start(url, "resume-a");
    let b = Node::start(url, "resume-b");
    let mut client = a.connect().await;
    let (session, node, _, _) = client.hello(None, BTreeMap::new()).await;
    assert_eq!(node, "resume-a");
    let epoch = client.subscribe("r").await;
    for n in 1..=5 {
        a.publish("r", json!(n)).await;
    }
    assert_eq!(seqs(&client.messages(5).await), [1, 2, 3, 4, 5]);
    client.close().await;

    // Published while the client is away; it kept seq 3 as its own position.
    for n in 6..=8 {
        b.publish("r", json!(n)).await;
    }
    let mut client = b.connect().await;
    let since = BTreeMap::from([(
        "r".to_owned(),
        Position {
            seq: 3,
            epoch: Some(epoch.clone()),
        },
    )]);
    let (resumed_session, node, resumed, channels) = client.hello(Some(&session), since).await;
    assert_eq!(
        (resumed_session.as_str(), node.as_str(), resumed),
        (session.as_str(), "resume-b", true)
    );
    assert_eq!(channels["r"].seq, 8);
    assert!(channels["r"].recovered);
    assert_eq!(
        seqs(&client.messages(5).await),
        [4, 5, 6, 7, 8],
        "its own position wins"
    );
    a.publish("r", json!(9)).await;
    assert_eq!(seqs(&client.messages(1).await), [9], "then live");
    client.close().await;

    // Without positions, the gateway's stored ones: it had everything up to 9.
    for n in 10..=11 {
        a.publish("r", json!(n)).await;
    }
    let mut client = a.connect().await;
    let (_, _, resumed, channels) = client.hello(Some(&session), BTreeMap::new()).await;
    assert!(resumed && channels["r"].recovered);
    assert_eq!(seqs(&client.messages(2).await), [10, 11]);
    b.publish("r", json!(12)).await;
    assert_eq!(seqs(&client.messages(1).await), [12]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_another_node_on_redis() {
    let redis = RedisServer::start(false);
    resume_on_another_node(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_another_node_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    resume_on_another_node(&cluster.url()).await;
}

/// A node killed with SIGKILL: its clients resume on another node with their positions and
/// lose nothing of what was published meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_resume_elsewhere_with_zero_loss() {
    let redis = RedisServer::start(false);
    let mut a = Node::start(&redis.url(), "kill-a");
    let b = Node::start(&redis.url(), "kill-b");
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut client = a.connect().await;
        let (session, ..) = client.hello(None, BTreeMap::new()).await;
        let epoch = client.subscribe("k").await;
        clients.push((client, session, epoch));
    }
    for n in 1..=10 {
        b.publish("k", json!(n)).await;
    }
    let mut positions = Vec::new();
    for (client, _, _) in &mut clients {
        let got = client.messages(10).await;
        positions.push(got.last().unwrap().0);
    }
    a.kill();
    for n in 11..=20 {
        b.publish("k", json!(n)).await;
    }
    for ((_, session, epoch), last) in clients.iter().zip(positions) {
        let mut client = b.connect().await;
        let since = BTreeMap::from([(
            "k".to_owned(),
            Position {
                seq: last,
                epoch: Some(epoch.clone()),
            },
        )]);
        let (_, _, resumed, channels) = client.hello(Some(session), since).await;
        assert!(resumed && channels["k"].recovered);
        assert_eq!(
            seqs(&client.messages(10).await),
            (11..=20).collect::<Vec<_>>()
        );
    }
}

/// Redis stopped and started again (with persistence): readiness follows it, publishing fails
/// with 503 and then recovers, and connected clients get later messages without reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_survived_without_reconnecting() {
    let mut redis = RedisServer::start(true);
    let a = Node::start(&redis.url(), "outage-a");
    let b = Node::start(&redis.url(), "outage-b");
    let mut client = a.connect().await;
    client.hello(None, BTreeMap::new()).await;
    client.subscribe("o").await;
    b.publish("o", json!(1)).await;
    assert_eq!(seqs(&client.messages(1).await), [1]);

    redis.kill();
    wait_ready(&a, 503).await;
    wait_ready(&b, 503).await;
    assert_eq!(b.publish("o", json!("lost")).await.0, 503);

    redis.restart();
    wait_ready(&a, 200).await;
    wait_ready(&b, 200).await;
    let (status, reply) = b.publish("o", json!(2)).await;
    assert_eq!(
        (status, reply["seq"].as_u64()),
        (200, Some(2)),
        "history survived the restart"
    );
    assert_eq!(seqs(&client.messages(1).await), [2]);
    let (status, _) = a.publish("o", json!(3)).await;
    assert_eq!(status, 200);
    assert_eq!(seqs(&client.messages(1).await), [3]);
}

/// Wait helper used by a test that polls Redis itself.
#[test]
fn redis_harness_restarts_on_the_same_port() {
    let mut redis = RedisServer::start(true);
    assert!(redis.cli(&["SET", "k", "v"]).is_some());
    let port = redis.port;
    redis.restart();
    assert_eq!(redis.port, port);
    wait_for(DEADLINE, || {
        redis.cli(&["GET", "k"]).is_some_and(|v| v.trim() == "v")
    });
}

/// A push the node never got (written to Redis as a publish is, but not sent on pub/sub): the
/// next message shows the gap, and the node repairs it from history before passing that on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_push_is_repaired_from_history() {
    let redis = RedisServer::start(false);
    let a = Node::start(&redis.url(), "gap-a");
    let mut client = a.connect().await;
    client.hello(None, BTreeMap::new()).await;
    client.subscribe("g").await;
    a.publish("g", json!(1)).await;
    assert_eq!(seqs(&client.messages(1).await), [1]);

    let silent_publish = "local seq = redis.call('INCR', KEYS[1]) \
        redis.call('XADD', KEYS[2], seq .. '-0', 'd', ARGV[1], 't', ARGV[2]) return seq";
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let seq = redis.cli(&[
        "EVAL",
        silent_publish,
        "2",
        "bgw:{g}:seq",
        "bgw:{g}:hist",
        "\"lost\"",
        &now_ms,
    ]);
    assert_eq!(seq.as_deref().map(str::trim), Some("2"));

    a.publish("g", json!(3)).await;
    let got = client.messages(2).await;
    assert_eq!(got, [(2, json!("lost")), (3, json!(3))]);
}

/// A gap that history cannot fill: subscribers are told with an unsolicited `subscribed`
/// (`recovered: false`) before the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_history_cannot_fill_is_reported() {
    let redis = RedisServer::start(false);
    let a = Node::start(&redis.url(), "hole-a");
    let mut client = a.connect().await;
    client.hello(None, BTreeMap::new()).await;
    let epoch = client.subscribe("h").await;
    a.publish("h", json!(1)).await;
    assert_eq!(seqs(&client.messages(1).await), [1]);

    assert!(
        redis.cli(&["INCR", "bgw:{h}:seq"]).is_some(),
        "seq 2 is taken, and never retained"
    );
    a.publish("h", json!(3)).await;
    match client.recv().await {
        ServerFrame::Subscribed {
            id,
            channel,
            seq,
            epoch: now,
            recovered,
        } => {
            assert!(id.is_none());
            assert_eq!(
                (channel.as_str(), seq, now, recovered),
                ("h", 2, epoch, false)
            );
        }
        other => panic!("expected an unsolicited subscribed, got {other:?}"),
    }
    assert_eq!(seqs(&client.messages(1).await), [3]);
}
