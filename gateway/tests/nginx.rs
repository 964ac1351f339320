//! The shipped nginx config (`nginx/nginx.conf`) in front of 3 real nodes on one Redis: sticky
//! keys, spread, a drained node's clients moving with nothing lost, and no tokens in the log.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use common::{
    channel, free_port, http_raw, position, refusal_status, upgrade_request, wait_for, Client,
    Gateway, RedisServer, DEADLINE,
};
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::header::SET_COOKIE;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// nginx with the shipped config, run as its header says (`nginx -p DIR -c nginx.conf`) in a
/// directory that holds nothing but the config and `upstreams.conf`. Only the `listen` line
/// changes: a free loopback port instead of 8080.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    fn start(nodes: &[&Gateway]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("bgw-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../nginx/nginx.conf"))
                .unwrap();
        assert!(
            shipped.contains("listen 8080 "),
            "the shipped config listens on 8080"
        );
        let config = shipped.replace("listen 8080 ", &format!("listen 127.0.0.1:{port} "));
        std::fs::write(dir.join("nginx.conf"), config).unwrap();
        let upstreams: String = nodes
            .iter()
            .map(|node| {
                format!(
                    "server {} max_fails=1 fail_timeout=10s;\n",
                    node.client_addr
                )
            })
            .collect();
        std::fs::write(dir.join("upstreams.conf"), upstreams).unwrap();
        // Its logs outside the directory, which must hold nothing else at the start.
        let log_dir = dir.with_extension("logs");
        std::fs::create_dir_all(&log_dir).unwrap();
        let log = std::fs::File::create(log_dir.join("access.log")).unwrap();
        let errors = std::fs::File::create(log_dir.join("error.log")).unwrap();
        let mut child = Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .args(["-c", "nginx.conf"])
            .stdout(log)
            .stderr(errors)
            .spawn()
            .expect("nginx runs (deploy/test.sh installs it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_for(DEADLINE, || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nginx exited ({status}) in a directory with only its config:\n{}",
                    std::fs::read_to_string(log_dir.join("error.log")).unwrap_or_default()
                );
            }
            std::net::TcpStream::connect(addr).is_ok()
        });
        Self { child, addr, dir }
    }

    /// An upgrade request to `/ws?key=KEY` through nginx, as a browser on nginx's own origin
    /// sends it: `Host` and `Origin` with the port.
    fn browser_request(&self, key: &str, origin: &str) -> Request {
        let url = format!("ws://{}/ws?key={key}", self.addr);
        upgrade_request(&url, &[("origin", origin)])
    }

    fn own_origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("logs").join("access.log")).unwrap()
    }

    async fn connect(&self, query: &str) -> Client {
        let request = upgrade_request(&format!("ws://{}/ws?{query}", self.addr), &[]);
        self.connect_request(request).await
    }

    async fn connect_request(&self, request: Request) -> Client {
        let (ws, response) =
            tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request))
                .await
                .expect("the upgrade through nginx timed out")
                .expect("the upgrade through nginx succeeded");
        Client::from_parts(ws, response)
    }

    /// The node a client with sticky `key` lands on.
    async fn node_of(&self, key: &str) -> String {
        let mut client = self.connect(&format!("key={key}")).await;
        let node = client.hello().await.node;
        client.close().await;
        node
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT makes the master stop its workers too; SIGKILL would orphan them.
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(self.dir.with_extension("logs"));
    }
}

fn nodes(redis: &RedisServer, flags: &[&str]) -> Vec<Gateway> {
    let url = redis.url();
    (0..3)
        .map(|i| {
            let id = format!("ngx-{i}");
            let mut all = vec!["--redis-url", url.as_str(), "--node-id", id.as_str()];
            all.extend_from_slice(flags);
            Gateway::start(&all)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_through_nginx_and_stick_to_their_node() {
    let redis = RedisServer::start(false);
    let nodes = nodes(&redis, &[]);
    let nginx = Nginx::start(&nodes.iter().collect::<Vec<_>>());

    // A whole exchange through the proxy.
    let news = channel("ngx");
    let mut client = nginx.connect("key=alpha").await;
    let node = client.hello().await.node;
    client.subscribe(&news).await;
    nodes[0].publish_ok(&news, r#"{"via":"admin"}"#).await;
    let message = client.recv_message().await;
    assert_eq!(
        (message.seq, message.data.as_str()),
        (1, r#"{"via":"admin"}"#)
    );
    client.close().await;

    // Same key, same node.
    for _ in 0..3 {
        assert_eq!(nginx.node_of("alpha").await, node);
    }
    // Keys spread over every node.
    let mut seen = BTreeSet::new();
    for i in 0..60 {
        seen.insert(nginx.node_of(&format!("key-{i}")).await);
    }
    assert_eq!(seen.len(), 3, "60 keys land on every node: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_connection_gets_a_cookie_that_brings_it_back() {
    let redis = RedisServer::start(false);
    let nodes = nodes(&redis, &[]);
    let nginx = Nginx::start(&nodes.iter().collect::<Vec<_>>());
    let url = format!("ws://{}/ws", nginx.addr);
    let mut first = nginx.connect_request(upgrade_request(&url, &[])).await;
    let cookie = first
        .response
        .headers()
        .get(SET_COOKIE)
        .expect("the 101 sets the sticky cookie")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cookie.starts_with("bgw_key="), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_owned();
    let node = first.hello().await.node;
    first.close().await;
    for _ in 0..3 {
        let request = upgrade_request(&url, &[("cookie", &pair)]);
        let mut again = nginx.connect_request(request).await;
        assert!(
            again.response.headers().get(SET_COOKIE).is_none(),
            "a known key is not set again"
        );
        assert_eq!(again.hello().await.node, node);
        again.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_nodes_keys_move_and_resume_with_nothing_lost() {
    let redis = RedisServer::start(false);
    let drain = [
        "--drain-delay",
        "200ms",
        "--drain-window",
        "200ms",
        "--drain-timeout",
        "10s",
    ];
    let mut nodes = nodes(&redis, &drain);
    let nginx = Nginx::start(&nodes.iter().collect::<Vec<_>>());

    let mut before = BTreeMap::new();
    for i in 0..30 {
        let key = format!("key-{i}");
        before.insert(key.clone(), nginx.node_of(&key).await);
    }
    let news = channel("move");
    let mut client = nginx.connect("key=key-0").await;
    let welcome = client.hello().await;
    let epoch = client.subscribe(&news).await.epoch;
    let home = nodes.iter().position(|n| n.node == welcome.node).unwrap();
    let mut home = nodes.remove(home);
    let publisher = &nodes[0];
    for n in 1..=5 {
        publisher.publish_ok(&news, &n.to_string()).await;
    }
    client.recv_run(&news, 0, 5).await;

    home.terminate();
    assert_eq!(client.expect_close().await.0, 1001);
    for n in 6..=10 {
        publisher.publish_ok(&news, &n.to_string()).await;
    }
    let status = home.wait_exit(DEADLINE).await;
    assert!(status.success());

    let mut client = nginx.connect("key=key-0").await;
    let since = BTreeMap::from([(news.clone(), position(5, Some(&epoch)))]);
    let resumed = client.resume(None, &welcome.session, since).await;
    assert!(resumed.resumed && resumed.channels[&news].recovered);
    assert_ne!(
        resumed.node, welcome.node,
        "the key moved off the drained node"
    );
    client.recv_run(&news, 5, 5).await;
    publisher.publish_ok(&news, "11").await;
    client.recv_run(&news, 10, 1).await;

    // Only the drained node's keys moved.
    for (key, node) in before {
        if node != welcome.node {
            assert_eq!(nginx.node_of(&key).await, node, "{key} stayed on its node");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_tokens_never_reach_the_access_log() {
    let redis = RedisServer::start(false);
    let nodes = nodes(&redis, &[]);
    let nginx = Nginx::start(&nodes.iter().collect::<Vec<_>>());
    let mut client = nginx.connect("key=k&token=SECRET-TOKEN-123").await;
    client.hello().await;
    client.close().await;
    let mut log = String::new();
    wait_for(DEADLINE, || {
        log = nginx.access_log();
        log.contains("GET /ws")
    });
    assert!(!log.contains("SECRET-TOKEN-123"), "{log}");
    assert!(!log.contains("token="), "{log}");
    // A text frame still flows: the proxy is not buffering.
    let mut client = nginx.connect("key=k").await;
    client
        .send_message(Message::text(r#"{"type":"hello"}"#))
        .await;
    tokio::time::timeout(Duration::from_secs(5), client.recv_welcome())
        .await
        .expect("welcome through nginx");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_on_nginxs_origin_connects_and_others_get_403() {
    let redis = RedisServer::start(false);
    // The nodes trust nginx, as every deploy has them: its X-Forwarded-Host counts.
    let nodes = nodes(&redis, &["--trusted-proxies", "127.0.0.1"]);
    let nginx = Nginx::start(&nodes.iter().collect::<Vec<_>>());
    let own = nginx.own_origin();
    assert!(own.contains(':'), "the origin has a port: {own}");

    // Keys on every node: each of them accepts the browser.
    let mut seen = BTreeSet::new();
    for i in 0..30 {
        let request = nginx.browser_request(&format!("browser-{i}"), &own);
        let mut client = nginx.connect_request(request).await;
        seen.insert(client.hello().await.node);
        client.close().await;
    }
    assert_eq!(
        seen.len(),
        3,
        "every node took the browser's origin: {seen:?}"
    );

    // A whole exchange.
    let news = channel("origin");
    let mut client = nginx
        .connect_request(nginx.browser_request("page", &own))
        .await;
    client.hello().await;
    client.subscribe(&news).await;
    nodes[1].publish_ok(&news, r#""through nginx""#).await;
    assert_eq!(client.recv_message().await.data, r#""through nginx""#);

    // Another page, or one that claims nginx's host in its own X-Forwarded-Host: 403.
    for origin in ["http://evil.example", "http://127.0.0.1", "null"] {
        let request = nginx.browser_request("page", origin);
        let refused = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(request))
            .await
            .expect("the refusal timed out")
            .map(|(ws, response)| Client::from_parts(ws, response));
        assert_eq!(refusal_status(refused), 403, "{origin}");
    }
    let mut forged = nginx.browser_request("page", "http://evil.example");
    forged
        .headers_mut()
        .insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
    let refused = tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(forged))
        .await
        .expect("the refusal timed out")
        .map(|(ws, response)| Client::from_parts(ws, response));
    assert_eq!(
        refusal_status(refused),
        403,
        "nginx replaces a client's X-Forwarded-Host"
    );

    // The demo page that opens that WebSocket comes through nginx too.
    let (status, page) = http_raw(
        nginx.addr,
        &format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            nginx.addr
        ),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("<html") || page.contains("<!doctype"),
        "{page}"
    );
}
