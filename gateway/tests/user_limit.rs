//! `--max-connections-per-user` across the cluster: a user's connection above the limit, on any
//! node, is closed with 4013 at `hello`; a closed connection gives its slot back, and a killed
//! node's slots expire. On the embedded broker, one Redis and a Redis Cluster.

mod common;

use common::{claims, hs256, Client, Gateway, RedisCluster, RedisServer, DEADLINE, SECRET};
use tokio_tungstenite::tungstenite::Message;

fn node(url: Option<&str>) -> Gateway {
    Gateway::start_on(
        url,
        &[
            "--jwt-secret",
            SECRET,
            "--max-connections-per-user",
            "2",
            "--node-report-interval",
            "200ms",
        ],
    )
}

fn token(sub: &str) -> String {
    hs256(&claims(sub, &["*"], &[]), SECRET)
}

/// A connection of `sub` that got `welcome`.
async fn connect(node: &Gateway, sub: &str) -> Client {
    let mut client = node.connect().await;
    client.hello_token(&token(sub)).await;
    client
}

/// A connection of `sub` that is refused with 4013.
async fn refused(node: &Gateway, sub: &str) {
    let mut client = node.connect().await;
    client
        .send_hello(Some(&token(sub)), None, Default::default())
        .await;
    assert_eq!(
        client.expect_close().await,
        (4013, "too many connections".to_owned())
    );
}

/// Waits until a connection of `sub` gets `welcome` again.
async fn admitted_again(node: &Gateway, sub: &str) -> Client {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut client = node.connect().await;
        client
            .send_hello(Some(&token(sub)), None, Default::default())
            .await;
        match client.next_message().await {
            Some(Ok(Message::Text(text))) if text.contains(r#""type":"welcome""#) => return client,
            other => assert!(
                tokio::time::Instant::now() < until,
                "{sub} never admitted again: {other:?}"
            ),
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

async fn limit(a: &Gateway, b: &Gateway) -> (Client, Client) {
    let user = common::channel("user");
    let first = connect(a, &user).await;
    let second = connect(b, &user).await;
    refused(a, &user).await;
    refused(b, &user).await;
    // Others are not counted with this user.
    let _other = connect(a, &common::channel("user")).await;
    // A closed connection gives its slot back.
    first.close().await;
    let third = admitted_again(a, &user).await;
    refused(b, &user).await;
    (second, third)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_limit_on_the_embedded_broker() {
    let node = node(None);
    limit(&node, &node).await;
}

/// Without authentication there is no user: anonymous connections are not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_connections_are_not_limited() {
    let node = Gateway::start(&["--max-connections-per-user", "1"]);
    let _first = node.connect_hello().await;
    let _second = node.connect_hello().await;
}

/// `b`, holding one of the user's two slots, is killed: the slot expires and `a` admits the
/// user again.
async fn killed_node_frees_its_slots(url: &str) {
    let a = node(Some(url));
    let b = node(Some(url));
    let user = common::channel("user");
    let _on_a = connect(&a, &user).await;
    let _on_b = connect(&b, &user).await;
    refused(&a, &user).await;
    drop(b);
    admitted_again(&a, &user).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_limit_on_redis_across_nodes() {
    let redis = RedisServer::start(false);
    let (a, b) = (node(Some(&redis.url())), node(Some(&redis.url())));
    limit(&a, &b).await;
    killed_node_frees_its_slots(&redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_limit_on_a_redis_cluster_across_nodes() {
    let cluster = RedisCluster::start();
    let (a, b) = (node(Some(&cluster.url())), node(Some(&cluster.url())));
    limit(&a, &b).await;
    killed_node_frees_its_slots(&cluster.url()).await;
}
