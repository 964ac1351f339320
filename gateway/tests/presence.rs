//! Presence (`--presence`, `GET /v1/presence`): who is subscribed to a presence channel on every
//! node, with user, node and since when; a member that unsubscribes leaves; a killed node
//! leaves no ghost. On the embedded broker, one Redis and a Redis Cluster.

mod common;

use std::collections::BTreeSet;

use common::{
    claims, hs256, wait_until, Client, Gateway, RedisCluster, RedisServer, DEADLINE, SECRET,
};
use serde_json::Value;

const KEY: &str = "presence-test-key";

fn node(url: Option<&str>) -> Gateway {
    Gateway::start_on(
        url,
        &[
            "--api-key",
            KEY,
            "--jwt-secret",
            SECRET,
            "--presence",
            "prs.*",
            "--node-report-interval",
            "200ms",
        ],
    )
}

async fn subscriber(node: &Gateway, user: &str, channel: &str) -> Client {
    let mut client = node.connect().await;
    client
        .hello_token(&hs256(&claims(user, &["*"], &[]), SECRET))
        .await;
    client.subscribe(channel).await;
    client
}

async fn presence(node: &Gateway, query: &str) -> (u16, Value) {
    node.admin_with_key(KEY)
        .await
        .call("GET", &format!("/v1/presence?{query}"), &Value::Null)
        .await
}

/// Waits until the channel's members are `want`, as (user, node).
async fn wait_members(node: &Gateway, channel: &str, want: &[(&str, &str)]) -> Value {
    let want: BTreeSet<(String, String)> = want
        .iter()
        .map(|(u, n)| (u.to_string(), n.to_string()))
        .collect();
    let what = format!("presence of {channel} {want:?}");
    wait_until(DEADLINE, &what, async || {
        let (status, answer) = presence(node, &format!("channel={channel}")).await;
        assert_eq!(status, 200, "{answer}");
        let got: BTreeSet<(String, String)> = answer["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| {
                (
                    m["user"].as_str().unwrap().to_owned(),
                    m["node"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        if got == want && answer["count"] == want.len() {
            Ok(answer)
        } else {
            Err(answer.to_string())
        }
    })
    .await
}

/// alice on `a`, bob on `b`; alice leaves; then `b` dies (SIGKILL), leaving no ghost.
async fn members(a: &Gateway, b: Gateway) {
    let channel = common::channel("prs");
    let mut alice = subscriber(a, "alice", &channel).await;
    let _bob = subscriber(&b, "bob", &channel).await;
    let answer = wait_members(a, &channel, &[("alice", &a.node), ("bob", &b.node)]).await;
    for member in answer["members"].as_array().unwrap() {
        assert!(
            member["since"].as_u64().unwrap() > 1_600_000_000_000,
            "{member}"
        );
        assert!(!member["session"].as_str().unwrap().is_empty());
    }
    // A page: the count counts them all.
    let (_, page) = presence(&b, &format!("channel={channel}&limit=1")).await;
    assert_eq!(page["members"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!((&page["count"], &page["more"]), (&2.into(), &true.into()));

    alice
        .send_text(&format!(
            r#"{{"type":"unsubscribe","channel":"{channel}"}}"#
        ))
        .await;
    wait_members(a, &channel, &[("bob", &b.node)]).await;
    drop(b);
    wait_members(a, &channel, &[]).await;
    // Channels outside --presence keep none.
    let (status, _) = presence(a, "channel=other").await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_the_embedded_broker() {
    let a = node(None);
    let channel = common::channel("prs");
    let _alice = subscriber(&a, "alice", &channel).await;
    let _bob = subscriber(&a, "bob", &channel).await;
    wait_members(&a, &channel, &[("alice", &a.node), ("bob", &a.node)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_redis_across_nodes_without_ghosts() {
    let redis = RedisServer::start(false);
    let a = node(Some(&redis.url()));
    let b = node(Some(&redis.url()));
    members(&a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_a_redis_cluster_across_nodes_without_ghosts() {
    let cluster = RedisCluster::start();
    let a = node(Some(&cluster.url()));
    let b = node(Some(&cluster.url()));
    members(&a, b).await;
}
