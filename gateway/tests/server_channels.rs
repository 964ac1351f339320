//! `GET /v1/channels`: the channels that have subscribers anywhere, with their counts summed
//! over the nodes' reports; a killed node's counts vanish when its report expires. On the
//! embedded broker, one Redis and a Redis Cluster.

mod common;

use common::{wait_until, Client, Gateway, RedisCluster, RedisServer, DEADLINE};
use serde_json::Value;

const KEY: &str = "server-channels-test-key";

fn node(url: Option<&str>) -> Gateway {
    Gateway::start_on(url, &["--api-key", KEY, "--node-report-interval", "200ms"])
}

async fn subscriber(node: &Gateway, channel: &str) -> Client {
    let mut client = node.connect().await;
    client.hello().await;
    client.subscribe(channel).await;
    client
}

/// `GET /v1/channels` with `query`: (channel, subscribers) in the order answered.
async fn channels(node: &Gateway, query: &str) -> Vec<(String, u64)> {
    let (status, answer) = node
        .admin_with_key(KEY)
        .await
        .call("GET", &format!("/v1/channels?{query}"), &Value::Null)
        .await;
    assert_eq!(status, 200, "{answer}");
    answer["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .map(|c| {
            (
                c["channel"].as_str().unwrap().to_owned(),
                c["subscribers"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Waits until the list for `query` is `want`.
async fn wait_channels(node: &Gateway, query: &str, want: &[(String, u64)]) {
    wait_until(
        DEADLINE,
        &format!("channels?{query} {want:?}"),
        async || {
            let got = channels(node, query).await;
            (got == want).then_some(()).ok_or(format!("{got:?}"))
        },
    )
    .await;
}

/// Subscribers on two nodes, counted together; `b` is then killed (SIGKILL), and its counts
/// vanish.
async fn list(a: &Gateway, b: Gateway) {
    let prefix = common::channel("chl");
    let (one, two, other) = (
        format!("{prefix}.room.1"),
        format!("{prefix}.room.2"),
        format!("{prefix}.other"),
    );
    let _clients = [
        subscriber(a, &one).await,
        subscriber(a, &one).await,
        subscriber(&b, &one).await,
        subscriber(&b, &two).await,
        subscriber(a, &other).await,
    ];
    let rooms = format!("pattern={prefix}.room.*");
    wait_channels(a, &rooms, &[(one.clone(), 3), (two.clone(), 1)]).await;
    wait_channels(
        &b,
        &format!("pattern={prefix}.*&limit=1"),
        &[(one.clone(), 3)],
    )
    .await;
    drop(b);
    wait_channels(a, &rooms, &[(one.clone(), 2)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_on_the_embedded_broker() {
    let node = node(None);
    let prefix = common::channel("chl");
    let one = format!("{prefix}.room.1");
    let mut client = subscriber(&node, &one).await;
    wait_channels(&node, &format!("pattern={prefix}.*"), &[(one.clone(), 1)]).await;
    // `gateway channels` is a client of the API.
    let pattern = format!("{prefix}.*");
    let out = node
        .cli(&["channels", "--pattern", &pattern], Some(KEY))
        .await;
    assert!(out.status.success(), "{out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(printed["channels"][0]["channel"], one.as_str());
    client
        .send_text(&format!(r#"{{"type":"unsubscribe","channel":"{one}"}}"#))
        .await;
    wait_channels(&node, &format!("pattern={prefix}.*"), &[]).await;
    let (status, _) = node
        .admin()
        .await
        .request("GET", "/v1/channels", &[], b"")
        .await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_on_redis_across_nodes_and_a_killed_node_vanishes() {
    let redis = RedisServer::start(false);
    let a = node(Some(&redis.url()));
    let b = node(Some(&redis.url()));
    list(&a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_on_a_redis_cluster_across_nodes_and_a_killed_node_vanishes() {
    let cluster = RedisCluster::start();
    let a = node(Some(&cluster.url()));
    let b = node(Some(&cluster.url()));
    list(&a, b).await;
}
