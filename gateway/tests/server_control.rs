//! The server API's control of connections on every node: subscribe and unsubscribe a user's
//! connections or one session's, disconnect them with a chosen close, and end a session so that
//! it cannot be resumed. On the embedded broker (one node), on one Redis and on a Redis Cluster
//! (two nodes, the request sent to one of them, the connections on both).

mod common;

use std::collections::BTreeMap;

use common::{claims, hs256, Client, Gateway, RedisCluster, RedisServer, SECRET};
use serde_json::{json, Value};
use shared::ServerFrame;

const KEY: &str = "server-control-test-key";

fn node(url: Option<&str>) -> Gateway {
    Gateway::start_on(url, &["--api-key", KEY, "--jwt-secret", SECRET])
}

fn token(sub: &str) -> String {
    hs256(&claims(sub, &["*"], &[]), SECRET)
}

async fn call(node: &Gateway, path: &str, body: Value) -> (u16, Value) {
    node.admin_with_key(KEY)
        .await
        .call("POST", path, &body)
        .await
}

async fn call_ok(node: &Gateway, path: &str, body: Value) {
    let (status, answer) = call(node, path, body).await;
    assert_eq!(status, 200, "{path}: {answer}");
}

/// A connection of `sub`, subscribed to `channels`; its session id.
async fn connect(node: &Gateway, sub: &str, channels: &[&str]) -> (Client, String) {
    let mut client = node.connect().await;
    let welcome = client.hello_token(&token(sub)).await;
    for channel in channels {
        client.subscribe(channel).await;
    }
    (client, welcome.session)
}

/// The next frame must be `subscribed` to `channel`, without an id.
async fn expect_server_subscribed(client: &mut Client, channel: &str) {
    match client.recv().await {
        ServerFrame::Subscribed { id, channel: c, .. } => {
            assert_eq!(
                (id.map(|i| i.get().to_owned()), c.as_str()),
                (None, channel)
            )
        }
        other => panic!("expected subscribed to {channel}, got {other:?}"),
    }
}

/// The next frame must be `unsubscribed` from `channel`, without an id.
async fn expect_server_unsubscribed(client: &mut Client, channel: &str) {
    match client.recv().await {
        ServerFrame::Unsubscribed { id, channel: c } => {
            assert_eq!(
                (id.map(|i| i.get().to_owned()), c.as_str()),
                (None, channel)
            )
        }
        other => panic!("expected unsubscribed from {channel}, got {other:?}"),
    }
}

async fn expect_message(client: &mut Client, channel: &str, data: Value) {
    let message = client.recv_message().await;
    assert_eq!(message.channel, channel, "{message:?}");
    assert_eq!(serde_json::from_str::<Value>(&message.data).unwrap(), data);
}

/// Connections of alice on both nodes and of bob on the second; controls sent through `a` or
/// `b` act on every one that they name, and on no other.
async fn control(a: &Gateway, b: &Gateway) {
    let room = common::channel("ctl.room");
    let extra = common::channel("ctl.extra");
    let (mut alice_a, alice_session) = connect(a, "alice", &[&room]).await;
    let (mut alice_b, _) = connect(b, "alice", &[&room]).await;
    let (mut bob, bob_session) = connect(b, "bob", &[&room]).await;

    // Server-side subscribe of a user: each of alice's connections, wherever they are.
    call_ok(
        a,
        "/v1/subscribe",
        json!({"user": "alice", "channel": extra}),
    )
    .await;
    expect_server_subscribed(&mut alice_a, &extra).await;
    expect_server_subscribed(&mut alice_b, &extra).await;
    call_ok(a, "/v1/publish", json!({"channel": extra, "data": {"n":1}})).await;
    expect_message(&mut alice_a, &extra, json!({"n": 1})).await;
    expect_message(&mut alice_b, &extra, json!({"n": 1})).await;
    // Bob was not subscribed: the next frame he gets is the answer to his ping.
    bob.ping().await;

    // Unsubscribe a user: both of alice's connections leave the room; bob stays.
    call_ok(
        b,
        "/v1/unsubscribe",
        json!({"user": "alice", "channel": room}),
    )
    .await;
    expect_server_unsubscribed(&mut alice_a, &room).await;
    expect_server_unsubscribed(&mut alice_b, &room).await;
    call_ok(b, "/v1/publish", json!({"channel": room, "data": {"n":2}})).await;
    expect_message(&mut bob, &room, json!({"n": 2})).await;
    alice_a.ping().await;
    alice_b.ping().await;

    // Unsubscribe one session.
    call_ok(
        a,
        "/v1/unsubscribe",
        json!({"session": bob_session, "channel": room}),
    )
    .await;
    expect_server_unsubscribed(&mut bob, &room).await;

    // Disconnect a user, revoked, sessions ended: 4001 on both nodes, and no resume.
    call_ok(
        b,
        "/v1/disconnect",
        json!({"user": "alice", "reason": "revoked", "end_session": true}),
    )
    .await;
    for client in [&mut alice_a, &mut alice_b] {
        assert_eq!(
            client.expect_close().await,
            (4001, "access revoked".to_owned())
        );
    }
    let mut again = b.connect().await;
    let welcome = again
        .resume(Some(&token("alice")), &alice_session, BTreeMap::new())
        .await;
    assert!(!welcome.resumed, "an ended session was resumed");
    bob.ping().await;

    // Disconnect one session with the default close: 4003, and its session resumes.
    call_ok(a, "/v1/disconnect", json!({"session": bob_session})).await;
    assert_eq!(bob.expect_close().await, (4003, "disconnected".to_owned()));
    let mut bob = a.connect().await;
    let welcome = bob
        .resume(Some(&token("bob")), &bob_session, BTreeMap::new())
        .await;
    assert!(welcome.resumed, "a session not ended resumes");

    // Terminate: 4004.
    call_ok(
        a,
        "/v1/disconnect",
        json!({"user": "bob", "reason": "terminate"}),
    )
    .await;
    assert_eq!(bob.expect_close().await, (4004, "terminated".to_owned()));

    // Requests that name no one, or two, or an unknown close, are refused.
    for body in [
        json!({}),
        json!({"user": "alice", "session": "s"}),
        json!({"user": ""}),
        json!({"user": "alice", "reason": "explode"}),
    ] {
        assert_eq!(
            call(a, "/v1/disconnect", body.clone()).await.0,
            400,
            "{body}"
        );
    }
    let bad = json!({"user": "alice", "channel": "bad name"});
    assert_eq!(call(a, "/v1/subscribe", bad).await.0, 400);
    let (status, _) = a
        .admin()
        .await
        .request("POST", "/v1/disconnect", &[], br#"{"user":"alice"}"#)
        .await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_on_the_embedded_broker() {
    let node = node(None);
    control(&node, &node).await;
}

/// `gateway disconnect` is a client of the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_disconnect_closes_a_users_connections() {
    let node = node(None);
    let (mut carol, _) = connect(&node, "carol", &[]).await;
    let out = node
        .cli(
            &["disconnect", "--user", "carol", "--reason", "terminate"],
            Some(KEY),
        )
        .await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(carol.expect_close().await, (4004, "terminated".to_owned()));
    let refused = node.cli(&["disconnect", "--user", "carol"], None).await;
    assert!(!refused.status.success(), "no key: 401, exit 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_on_redis_across_nodes() {
    let redis = RedisServer::start(false);
    let (a, b) = (node(Some(&redis.url())), node(Some(&redis.url())));
    control(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_on_a_redis_cluster_across_nodes() {
    let cluster = RedisCluster::start();
    let (a, b) = (node(Some(&cluster.url())), node(Some(&cluster.url())));
    control(&a, &b).await;
}
