//! The docker-compose stack (`deploy/docker-compose.yml`) as it runs: browsers through its nginx,
//! a publisher on gateway-1's admin port, and one node stopped (drained) mid-stream with nothing
//! lost. It needs the stack up, so it is ignored unless asked for: `deploy/test-compose.sh`
//! starts the stack and runs it with
//!
//! - `BGW_TEST_COMPOSE_CLIENT`: nginx's address on the host (`127.0.0.1:8080`);
//! - `BGW_TEST_COMPOSE_ADMIN`: gateway-1's admin address on the host (`127.0.0.1:9091`);
//! - `BGW_TEST_COMPOSE_STOP`: the command that stops a service, to which the test appends the
//!   service's name (`docker compose -f deploy/docker-compose.yml stop`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::{channel, position, upgrade_request, Admin, Client, DEADLINE};
use shared::ServerFrame;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;

/// Messages published in all, at [`RATE`] a second: long enough to outlast the node's drain
/// (2 s delay, then closes spread over 10 s) and the resumes after it.
const TOTAL: u64 = 400;
const RATE: u64 = 20;
/// The publish after which the node is stopped.
const STOP_AFTER: u64 = 20;
/// Longest the whole exchange may take.
const RUN_DEADLINE: Duration = Duration::from_secs(120);

struct Stack {
    client: SocketAddr,
    admin: SocketAddr,
    stop: String,
}

impl Stack {
    fn from_env() -> Stack {
        let var = |name: &str| {
            std::env::var(name)
                .unwrap_or_else(|_| panic!("{name} is not set: run deploy/test-compose.sh"))
        };
        Stack {
            client: var("BGW_TEST_COMPOSE_CLIENT").parse().expect("an address"),
            admin: var("BGW_TEST_COMPOSE_ADMIN").parse().expect("an address"),
            stop: var("BGW_TEST_COMPOSE_STOP"),
        }
    }

    /// The origin of a page that nginx serves: what a browser there sends.
    fn origin(&self) -> String {
        format!("http://{}", self.client)
    }

    fn request(&self, key: &str, origin: &str) -> Request {
        let url = format!("ws://{}/ws?key={key}", self.client);
        upgrade_request(&url, &[("origin", origin)])
    }

    async fn try_connect(&self, key: &str, origin: &str) -> Result<Client, String> {
        match tokio::time::timeout(
            DEADLINE,
            tokio_tungstenite::connect_async(self.request(key, origin)),
        )
        .await
        {
            Ok(Ok((ws, response))) => Ok(Client::from_parts(ws, response)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Stops `service` (SIGTERM: it drains) with the stack's own command; its output.
    async fn stop(&self, service: &str) -> std::process::Output {
        let command = format!("{} {service}", self.stop);
        tokio::process::Command::new("sh")
            .args(["-c", &command])
            .kill_on_drop(true)
            .output()
            .await
            .unwrap_or_else(|e| panic!("{command}: {e}"))
    }
}

/// A browser subscribed to one channel, that reconnects through nginx and resumes.
struct Browser {
    key: String,
    client: Client,
    session: String,
    epoch: String,
    /// The nodes it was on, in order.
    nodes: Vec<String>,
    /// The last seq received; every one before it arrived once, in order.
    last: u64,
    /// The close codes it was sent.
    closes: Vec<u16>,
}

impl Browser {
    async fn open(stack: &Stack, key: &str, news: &str) -> Browser {
        let mut client = stack
            .try_connect(key, &stack.origin())
            .await
            .unwrap_or_else(|e| panic!("a browser on nginx's origin through nginx: {e}"));
        let welcome = client.hello().await;
        let subscribed = client.subscribe(news).await;
        Browser {
            key: key.to_owned(),
            client,
            session: welcome.session,
            epoch: subscribed.epoch,
            nodes: vec![welcome.node],
            last: subscribed.seq,
            closes: Vec::new(),
        }
    }

    /// Reads until it has every message up to `total`.
    async fn follow(mut self, stack: &Stack, news: &str, total: u64) -> Browser {
        let until = Instant::now() + RUN_DEADLINE;
        while self.last < total {
            assert!(
                Instant::now() < until,
                "{}: stuck at seq {}",
                self.key,
                self.last
            );
            match self.client.next_message().await {
                Some(Ok(Message::Text(text))) => match serde_json::from_str(&text) {
                    Ok(ServerFrame::Message { channel, seq, .. }) => {
                        assert_eq!(channel, news);
                        assert_eq!(seq, self.last + 1, "{}: a gap or a repeat", self.key);
                        self.last = seq;
                    }
                    other => panic!("{}: unexpected {other:?}", self.key),
                },
                Some(Ok(Message::Close(frame))) => {
                    self.closes.push(frame.map_or(1005, |f| u16::from(f.code)));
                    self.reconnect(stack, news, until).await;
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => self.reconnect(stack, news, until).await,
            }
        }
        self
    }

    /// Connects again through nginx and resumes from its own position, as the browser client
    /// does: the same sticky key, which nginx now maps to a live node.
    async fn reconnect(&mut self, stack: &Stack, news: &str, until: Instant) {
        loop {
            assert!(Instant::now() < until, "{}: never reconnected", self.key);
            match stack.try_connect(&self.key, &stack.origin()).await {
                Ok(mut client) => {
                    let since =
                        BTreeMap::from([(news.to_owned(), position(self.last, Some(&self.epoch)))]);
                    let welcome = client.resume(None, &self.session, since).await;
                    assert!(welcome.resumed, "{}: {welcome:?}", self.key);
                    assert!(
                        welcome.channels[news].recovered,
                        "{}: {welcome:?}",
                        self.key
                    );
                    self.nodes.push(welcome.node);
                    self.client = client;
                    return;
                }
                // nginx between a stopped node and the next one.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the docker-compose stack: deploy/test-compose.sh runs it"]
async fn browsers_through_nginx_lose_nothing_while_a_node_drains() {
    let stack = Stack::from_env();
    let news = channel("compose");

    // Another page's origin is refused, before any upgrade.
    match stack.try_connect("evil", "http://evil.example").await {
        Ok(_) => panic!("a page of another origin was upgraded"),
        Err(e) => assert!(e.contains("403"), "{e}"),
    }

    // Browsers on nginx's origin, spread by their keys until a node other than gateway-1 (the
    // publisher's) holds at least two.
    let mut browsers = Vec::new();
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..40 {
        let browser = Browser::open(&stack, &format!("compose-{i}"), &news).await;
        *per_node.entry(browser.nodes[0].clone()).or_default() += 1;
        browsers.push(browser);
        let others = per_node.iter().filter(|(node, _)| *node != "gateway-1");
        if browsers.len() >= 12 && others.clone().any(|(_, n)| *n >= 2) {
            break;
        }
    }
    let victim = per_node
        .iter()
        .filter(|(node, _)| *node != "gateway-1")
        .max_by_key(|(_, n)| **n)
        .map(|(node, _)| node.clone())
        .expect("a browser on gateway-2 or gateway-3");
    eprintln!("browsers per node: {per_node:?}; stopping {victim}");

    let followers: Vec<_> = browsers
        .into_iter()
        .map(|browser| {
            let stack = Stack::from_env();
            let news = news.clone();
            tokio::spawn(async move { browser.follow(&stack, &news, TOTAL).await })
        })
        .collect();

    let mut admin = Admin::connect(stack.admin).await;
    let mut stopping = None;
    let start = Instant::now();
    for n in 1..=TOTAL {
        tokio::time::sleep_until(start + Duration::from_millis(n * 1000 / RATE)).await;
        let published = admin.publish_ok(&news, &n.to_string()).await;
        assert_eq!(published.seq, n);
        if n == STOP_AFTER {
            let stack = Stack::from_env();
            let victim = victim.clone();
            stopping = Some(tokio::spawn(async move { stack.stop(&victim).await }));
        }
    }

    let mut moved = BTreeSet::new();
    for follower in followers {
        let browser = tokio::time::timeout(RUN_DEADLINE, follower)
            .await
            .expect("a browser never caught up")
            .expect("a browser failed");
        assert_eq!(browser.last, TOTAL, "{}", browser.key);
        if browser.nodes[0] == victim {
            assert_eq!(
                browser.closes.first(),
                Some(&1001),
                "{}: drained",
                browser.key
            );
            assert!(
                browser.nodes.last() != Some(&victim),
                "{} moved off {victim}: {:?}",
                browser.key,
                browser.nodes
            );
            moved.insert(browser.key);
        } else {
            assert!(
                browser.closes.is_empty(),
                "{}: {:?}",
                browser.key,
                browser.closes
            );
        }
    }
    assert!(!moved.is_empty(), "some browsers were on {victim}");
    let stopped = stopping.expect("the node was stopped").await.unwrap();
    assert!(
        stopped.status.success(),
        "stopping {victim}: {}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    eprintln!(
        "{} browsers got all {TOTAL} messages once, in order; {} of them moved off {victim}",
        per_node.values().sum::<usize>(),
        moved.len()
    );
}
