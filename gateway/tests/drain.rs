//! SIGTERM drains a node: readiness fails at once, new handshakes are refused, every client is
//! closed with 1001 and resumes on another node with every message exactly once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{channel, log_events, position, Client, Gateway, RedisServer, DEADLINE};
use shared::ServerFrame;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 40;
const MESSAGES: u64 = 150;

/// Reads `channel` until seq `MESSAGES`; on close 1001 resumes on `other` from its last seq.
/// Returns every seq received, and whether a 1001 came.
async fn follow(
    mut client: Client,
    other: Arc<Gateway>,
    session: String,
    channel: String,
    epoch: String,
) -> (Vec<u64>, bool) {
    let mut seqs = Vec::new();
    let mut drained = false;
    while seqs.last() != Some(&MESSAGES) {
        match client.next_message().await {
            Some(Ok(Message::Text(text))) => {
                match serde_json::from_str(&text).expect("a server frame") {
                    ServerFrame::Message { seq, .. } => seqs.push(seq),
                    other => panic!("unexpected {other:?}"),
                }
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1001, "{frame:?}");
                assert!(!drained, "closed twice");
                drained = true;
                client = other.connect().await;
                let last = seqs.last().copied().unwrap_or(0);
                let since = BTreeMap::from([(channel.clone(), position(last, Some(&epoch)))]);
                let welcome = client.resume(None, &session, since).await;
                assert!(
                    welcome.resumed && welcome.channels[&channel].recovered,
                    "{welcome:?}"
                );
                assert_eq!(welcome.node, other.node);
            }
            Some(Ok(_)) => {}
            other => panic!("the connection ended without a close frame: {other:?}"),
        }
    }
    (seqs, drained)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_client_to_another_node_with_nothing_lost() {
    let redis = RedisServer::start(false);
    let url = redis.url();
    let drain = [
        "--drain-delay",
        "300ms",
        "--drain-window",
        "1s",
        "--drain-timeout",
        "15s",
    ];
    let mut a = Gateway::start(
        &[
            &["--redis-url", &url, "--node-id", "drain-a"][..],
            &drain[..],
        ]
        .concat(),
    );
    let b = Arc::new(Gateway::start(&[
        "--redis-url",
        &url,
        "--node-id",
        "drain-b",
    ]));
    let news = channel("drain");

    let mut followers = Vec::new();
    for _ in 0..CLIENTS {
        let (mut client, welcome) = a.connect_hello().await;
        let subscribed = client.subscribe(&news).await;
        followers.push(tokio::spawn(follow(
            client,
            b.clone(),
            welcome.session,
            news.clone(),
            subscribed.epoch,
        )));
    }

    let publisher = {
        let b = b.clone();
        let news = news.clone();
        tokio::spawn(async move {
            let mut admin = b.admin().await;
            for n in 1..=MESSAGES {
                let published = admin.publish_ok(&news, &n.to_string()).await;
                assert_eq!(published.seq, n);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    // Mid-stream.
    b.wait_metric("bgw_published_total", 30.0).await;
    a.terminate();
    let until = Instant::now() + Duration::from_secs(1);
    loop {
        let (status, body) = a.get("/readyz").await;
        if status == 503 {
            assert!(body.contains("\"draining\""), "{body}");
            break;
        }
        assert!(
            Instant::now() < until,
            "/readyz still {status} a second after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = a.try_connect(a.request("")).await;
    assert!(
        matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503),
        "a draining node refuses new sockets with 503: {:?}",
        refused.map(|_| ())
    );

    let status = a.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "the drained node exits 0: {status:?}");
    assert!(a.logs().contains("drained"), "{}", a.logs());
    // Every task of the node stopped: a task still running would be named in the log.
    assert!(a.logs().contains(TASKS_STOPPED), "{}", a.logs());

    publisher.await.expect("the publisher finished");
    for follower in followers {
        let (seqs, drained) = tokio::time::timeout(DEADLINE * 3, follower)
            .await
            .expect("every client got every message")
            .expect("the client task did not panic");
        assert!(drained, "every client saw close 1001");
        assert_eq!(
            seqs,
            (1..=MESSAGES).collect::<Vec<_>>(),
            "every message exactly once, in order"
        );
    }
}

/// A second SIGTERM ends the drain at once, whatever its delay.
#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut node = Gateway::start(&[
        "--drain-delay",
        "60s",
        "--drain-window",
        "1s",
        "--drain-timeout",
        "60s",
    ]);
    let (_client, _) = node.connect_hello().await;
    node.terminate();
    node.wait_ready(503).await;
    node.terminate();
    let status = node.wait_exit(DEADLINE).await;
    assert!(status.success(), "{status:?}");
    assert!(node.logs().contains("second signal"), "{}", node.logs());
}

/// A client that never answers the close does not hold the node past the drain timeout, and
/// the node says what was still open.
#[tokio::test]
async fn the_drain_timeout_ends_a_drain_that_clients_hold_up() {
    let mut node = Gateway::start(&[
        "--drain-delay",
        "0s",
        "--drain-window",
        "100ms",
        "--drain-timeout",
        "1s",
    ]);
    let mut silent = common::RawWs::connect(node.client_addr).await;
    silent.send_text(r#"{"type":"hello"}"#).await;
    node.wait_metric("bgw_connections", 1.0).await;
    node.terminate();
    let status = node.wait_exit(DEADLINE).await;
    assert!(status.success(), "{status:?}");
    assert!(node.logs().contains("drain timeout"), "{}", node.logs());
}

/// The names the node gives its long-lived tasks: the string that opens each
/// `tasks.spawn("name", ...)` of its source. The drain names a task still running by it.
fn task_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("the gateway's source") {
            let path = entry.expect("a source entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let source = std::fs::read_to_string(&path).expect("a source file");
            for (_, after) in source
                .match_indices(".spawn(")
                .map(|(at, _)| source.split_at(at + 7))
            {
                if let Some(name) = after.trim_start().strip_prefix('"') {
                    names.insert(name[..name.find('"').expect("a closed string")].to_owned());
                }
            }
        }
    }
    names
}

/// What the drain logs when every task of the node stopped in time.
const TASKS_STOPPED: &str = "every task of the node stopped";
/// What it logs, with the names in `still_running`, when some did not.
const TASKS_LATE: &str = "the node's tasks did not all stop in time";

/// What the drain's log says of the node's tasks once its clients are gone: `Ok` when every
/// one stopped, or the tasks it names as still running at its deadline, as (name, count).
fn tasks_outcome(logs: &str) -> Result<(), Vec<(String, u64)>> {
    let messages: Vec<String> = log_events(logs, "")
        .iter()
        .map(|event| event["fields"]["message"].as_str().unwrap().to_owned())
        .collect();
    let clients_gone = messages
        .iter()
        .position(|m| m.starts_with("drained") || m.starts_with("drain timeout"))
        .unwrap_or_else(|| panic!("the drain never ended:\n{logs}"));
    let said: Vec<usize> = (0..messages.len())
        .filter(|&i| messages[i] == TASKS_STOPPED || messages[i] == TASKS_LATE)
        .collect();
    assert!(
        said.len() == 1 && said[0] > clients_gone,
        "the drain says once, after its clients are gone, what became of the node's tasks:\n{logs}"
    );
    let late = log_events(logs, TASKS_LATE);
    let Some(late) = late.first() else {
        return Ok(());
    };
    // `still_running` is the list of `name xN`, as the node formats it.
    let listed = late["fields"]["still_running"]
        .as_str()
        .expect("still_running");
    let named: Vec<String> = serde_json::from_str(listed).expect("a list of tasks");
    assert!(!named.is_empty(), "late, but naming no task: {late}");
    Err(named
        .iter()
        .map(|task| {
            let (name, count) = task.rsplit_once(" x").expect("`name xN`");
            (name.to_owned(), count.parse().expect("a count"))
        })
        .collect())
}

/// Drains a node on Redis with live, subscribed connections (Redis stalled by SIGSTOP from
/// the signal on, when `stall`), and returns what its log says of its tasks.
async fn drain_and_read_tasks(stall: bool) -> Result<(), Vec<(String, u64)>> {
    let redis = RedisServer::start(false);
    let mut node = Gateway::start(&[
        "--redis-url",
        &redis.url(),
        "--log-format",
        "json",
        "--drain-delay",
        "0s",
        "--drain-window",
        "300ms",
        "--drain-timeout",
        "5s",
    ]);
    let news = channel("tasks");
    let mut clients = Vec::new();
    for _ in 0..10 {
        let (mut client, _) = node.connect_hello().await;
        client.subscribe(&news).await;
        clients.push(client);
    }
    for n in 1..=5 {
        node.publish_ok(&news, &n.to_string()).await;
    }
    // Every client reads on (its messages, then the close), so that it answers the close and
    // the drain ends with its clients gone.
    let closes: Vec<_> = clients
        .into_iter()
        .map(|mut client| tokio::spawn(async move { client.expect_close().await.0 }))
        .collect();
    if stall {
        redis.pause();
    }
    node.terminate();
    // The drain timeout, a session save on each side of it (2 s each at the most), and the
    // tasks' own deadline (5 s).
    let status = node.wait_exit(Duration::from_secs(30)).await;
    if stall {
        redis.resume();
    }
    assert!(status.success(), "the drained node exits 0: {status:?}");
    for close in closes {
        assert_eq!(close.await.expect("the client did not panic"), 1001);
    }
    tasks_outcome(&node.logs())
}

/// A drain with live connections and a Redis that answers: every task of the node stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_stops_every_task_and_says_so() {
    if let Err(running) = drain_and_read_tasks(false).await {
        panic!("tasks still running after a drain: {running:?}");
    }
}

/// A drain while Redis is stalled: the node still exits, and its log accounts for every task:
/// either all stopped, or it names those still running, by the names the node gives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_with_redis_stalled_names_any_task_still_running() {
    if let Err(running) = drain_and_read_tasks(true).await {
        let known = task_names();
        for (name, count) in running {
            assert!(
                known.contains(&name),
                "`{name}` is no task of the node ({known:?})"
            );
            assert!(count >= 1, "{name} x{count}");
        }
    }
}
