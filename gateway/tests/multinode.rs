//! Several real gateway nodes on one real Redis (standalone or cluster): fan-out across nodes,
//! resume on any node, a node killed with SIGKILL, and Redis going away and coming back.

mod common;

use std::collections::BTreeMap;

use common::{wait_for, Client, Gateway, RedisCluster, RedisServer, Welcome, DEADLINE};
use serde_json::{json, Value};
use shared::{Position, ServerFrame};

/// A node on the Redis at `url`. Dropping it kills it with SIGKILL.
fn node(url: &str, id: &str) -> Gateway {
    Gateway::start(&["--redis-url", url, "--node-id", id])
}

/// Publishes `data` through `node`'s admin API: the status and the JSON answer.
async fn publish(node: &Gateway, channel: &str, data: Value) -> (u16, Value) {
    let (status, body) = node.publish(channel, &data.to_string()).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// `hello`, resuming `session` with `since` when given.
async fn hello(
    client: &mut Client,
    session: Option<&str>,
    since: BTreeMap<String, Position>,
) -> Welcome {
    client.send_hello(None, session, since).await;
    client.recv_welcome().await
}

/// The next `count` messages, as (seq, data).
async fn messages(client: &mut Client, count: usize) -> Vec<(u64, Value)> {
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let message = client.recv_message().await;
        out.push((
            message.seq,
            serde_json::from_str(&message.data).expect("JSON data"),
        ));
    }
    out
}

fn seqs(messages: &[(u64, Value)]) -> Vec<u64> {
    messages.iter().map(|(seq, _)| *seq).collect()
}

/// 3 nodes, 30 clients over them, 300 messages published through different nodes: every
/// client gets every message exactly once, in seq order.
async fn fan_out_across_nodes(url: &str) {
    let nodes: Vec<Gateway> = (0..3).map(|i| node(url, &format!("fan-{i}"))).collect();
    let mut clients = Vec::new();
    for i in 0..30 {
        let mut client = nodes[i % 3].connect().await;
        hello(&mut client, None, BTreeMap::new()).await;
        client.subscribe("fan").await;
        clients.push(client);
    }
    for n in 0..300u64 {
        let (status, reply) = publish(&nodes[n as usize % 3], "fan", json!({"n": n})).await;
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["seq"], n + 1);
    }
    for client in &mut clients {
        let got = messages(client, 300).await;
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
    let a = node(url, "resume-a");
    let b = node(url, "resume-b");
    let mut client = a.connect().await;
    let welcome = hello(&mut client, None, BTreeMap::new()).await;
    let session = welcome.session;
    assert_eq!(welcome.node, "resume-a");
    let epoch = client.subscribe("r").await.epoch;
    for n in 1..=5 {
        publish(&a, "r", json!(n)).await;
    }
    assert_eq!(seqs(&messages(&mut client, 5).await), [1, 2, 3, 4, 5]);
    client.close().await;

    // Published while the client is away; it kept seq 3 as its own position.
    for n in 6..=8 {
        publish(&b, "r", json!(n)).await;
    }
    let mut client = b.connect().await;
    let since = BTreeMap::from([(
        "r".to_owned(),
        Position {
            seq: 3,
            epoch: Some(epoch.clone()),
        },
    )]);
    let Welcome {
        session: resumed_session,
        node,
        resumed,
        channels,
        ..
    } = hello(&mut client, Some(&session), since).await;
    assert_eq!(
        (resumed_session.as_str(), node.as_str(), resumed),
        (session.as_str(), "resume-b", true)
    );
    assert_eq!(channels["r"].seq, 8);
    assert!(channels["r"].recovered);
    assert_eq!(
        seqs(&messages(&mut client, 5).await),
        [4, 5, 6, 7, 8],
        "its own position wins"
    );
    publish(&a, "r", json!(9)).await;
    assert_eq!(seqs(&messages(&mut client, 1).await), [9], "then live");
    client.close().await;

    // Without positions, the gateway's stored ones: it had everything up to 9.
    for n in 10..=11 {
        publish(&a, "r", json!(n)).await;
    }
    let mut client = a.connect().await;
    let Welcome {
        resumed, channels, ..
    } = hello(&mut client, Some(&session), BTreeMap::new()).await;
    assert!(resumed && channels["r"].recovered);
    assert_eq!(seqs(&messages(&mut client, 2).await), [10, 11]);
    publish(&b, "r", json!(12)).await;
    assert_eq!(seqs(&messages(&mut client, 1).await), [12]);
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
    let a = node(&redis.url(), "kill-a");
    let b = node(&redis.url(), "kill-b");
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut client = a.connect().await;
        let session = hello(&mut client, None, BTreeMap::new()).await.session;
        let epoch = client.subscribe("k").await.epoch;
        clients.push((client, session, epoch));
    }
    for n in 1..=10 {
        publish(&b, "k", json!(n)).await;
    }
    let mut positions = Vec::new();
    for (client, _, _) in &mut clients {
        let got = messages(client, 10).await;
        positions.push(got.last().unwrap().0);
    }
    drop(a); // SIGKILL
    for n in 11..=20 {
        publish(&b, "k", json!(n)).await;
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
        let Welcome {
            resumed, channels, ..
        } = hello(&mut client, Some(session), since).await;
        assert!(resumed && channels["k"].recovered);
        assert_eq!(
            seqs(&messages(&mut client, 10).await),
            (11..=20).collect::<Vec<_>>()
        );
    }
}

const RECORDS: &str = r#"bgw_session_saves_total{what="record"}"#;
const POSITIONS: &str = r#"bgw_session_saves_total{what="positions"}"#;

/// Waits for two more saves of `node`'s positions: the second reads positions that were
/// current when this was called.
async fn positions_saved(node: &Gateway) {
    let saved = node.metric(POSITIONS).await;
    node.wait_metric(POSITIONS, saved + 2.0).await;
}

/// A broadcast writes no session record: the node saves its own position on the channel, and a
/// client of a node killed after that resumes, without positions of its own, on another node
/// from there, with nothing lost and nothing repeated.
async fn killed_node_clients_resume_from_the_node_positions(url: &str) {
    let a = node(url, "positions-a");
    let b = node(url, "positions-b");
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut client = a.connect().await;
        let session = hello(&mut client, None, BTreeMap::new()).await.session;
        client.subscribe("p").await;
        clients.push((client, session));
    }
    positions_saved(&a).await;
    let records = a.metric(RECORDS).await;
    for n in 1..=10 {
        publish(&b, "p", json!(n)).await;
    }
    for (client, _) in &mut clients {
        assert_eq!(
            seqs(&messages(client, 10).await),
            (1..=10).collect::<Vec<_>>()
        );
    }
    positions_saved(&a).await;
    assert_eq!(
        a.metric(RECORDS).await,
        records,
        "a broadcast wrote session records"
    );
    drop(a); // SIGKILL
    for n in 11..=15 {
        publish(&b, "p", json!(n)).await;
    }
    for (_, session) in &clients {
        let mut client = b.connect().await;
        let welcome = hello(&mut client, Some(session), BTreeMap::new()).await;
        assert!(welcome.resumed && welcome.channels["p"].recovered);
        assert_eq!(
            seqs(&messages(&mut client, 5).await),
            (11..=15).collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_clients_resume_from_the_node_positions_on_redis() {
    let redis = RedisServer::start(false);
    killed_node_clients_resume_from_the_node_positions(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_clients_resume_from_the_node_positions_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    killed_node_clients_resume_from_the_node_positions(&cluster.url()).await;
}

/// Redis stopped and started again (with persistence): readiness follows it, publishing fails
/// with 503 and then recovers, and connected clients get later messages without reconnecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_survived_without_reconnecting() {
    let mut redis = RedisServer::start(true);
    let a = node(&redis.url(), "outage-a");
    let b = node(&redis.url(), "outage-b");
    let mut client = a.connect().await;
    hello(&mut client, None, BTreeMap::new()).await;
    client.subscribe("o").await;
    publish(&b, "o", json!(1)).await;
    assert_eq!(seqs(&messages(&mut client, 1).await), [1]);

    redis.kill();
    a.wait_ready(503).await;
    b.wait_ready(503).await;
    assert_eq!(publish(&b, "o", json!("lost")).await.0, 503);

    redis.restart();
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    let (status, reply) = publish(&b, "o", json!(2)).await;
    assert_eq!(
        (status, reply["seq"].as_u64()),
        (200, Some(2)),
        "history survived the restart"
    );
    assert_eq!(seqs(&messages(&mut client, 1).await), [2]);
    let (status, _) = publish(&a, "o", json!(3)).await;
    assert_eq!(status, 200);
    assert_eq!(seqs(&messages(&mut client, 1).await), [3]);
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
    let a = node(&redis.url(), "gap-a");
    let mut client = a.connect().await;
    hello(&mut client, None, BTreeMap::new()).await;
    client.subscribe("g").await;
    publish(&a, "g", json!(1)).await;
    assert_eq!(seqs(&messages(&mut client, 1).await), [1]);

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

    publish(&a, "g", json!(3)).await;
    let got = messages(&mut client, 2).await;
    assert_eq!(got, [(2, json!("lost")), (3, json!(3))]);
}

/// A gap that history cannot fill: subscribers are told with an unsolicited `subscribed`
/// (`recovered: false`) before the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_history_cannot_fill_is_reported() {
    let redis = RedisServer::start(false);
    let a = node(&redis.url(), "hole-a");
    let mut client = a.connect().await;
    hello(&mut client, None, BTreeMap::new()).await;
    let epoch = client.subscribe("h").await.epoch;
    publish(&a, "h", json!(1)).await;
    assert_eq!(seqs(&messages(&mut client, 1).await), [1]);

    assert!(
        redis.cli(&["INCR", "bgw:{h}:seq"]).is_some(),
        "seq 2 is taken, and never retained"
    );
    publish(&a, "h", json!(3)).await;
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
    assert_eq!(seqs(&messages(&mut client, 1).await), [3]);
}
