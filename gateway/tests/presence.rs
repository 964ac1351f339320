//! Presence (`--presence`, `GET /v1/presence`): who is subscribed to a presence channel on every
//! node, with user, node and since when; a member that unsubscribes leaves; a killed node
//! leaves no ghost. On the embedded broker, one Redis and a Redis Cluster.
//!
//! The `join` and `leave` frames (`"presence": true` on `subscribe`): seen across nodes, sent
//! only to the subscribers that asked, on every way a subscription starts or ends (subscribe,
//! unsubscribe, resume, a closed connection, a drained node, a killed node's members
//! expiring), never with a session id, and not above `--presence-max-join-leave`.

mod common;

use std::collections::BTreeSet;

use common::{
    claims, hs256, wait_until, Client, Gateway, RedisCluster, RedisServer, DEADLINE, SECRET,
};
use serde_json::{json, Value};
use shared::ServerFrame;

const KEY: &str = "presence-test-key";

/// A node that reports every 200 ms: a killed node's members expire within 600 ms.
fn node(url: Option<&str>) -> Gateway {
    node_with(url, REPORTS, &[])
}

const REPORTS: &str = "200ms";
/// A report interval no test waits for: what happens within it is each change's own doing,
/// not a report's repair.
const NO_REPORTS: &str = "60s";

fn node_with(url: Option<&str>, report_interval: &str, extra: &[&str]) -> Gateway {
    let mut flags = vec![
        "--api-key",
        KEY,
        "--jwt-secret",
        SECRET,
        "--presence",
        "prs.*",
        "--node-report-interval",
        report_interval,
    ];
    if let Some(url) = url {
        flags.extend(["--redis-url", url]);
    }
    flags.extend(extra);
    Gateway::start(&flags)
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

// ---------------------------------------------------------------------------------------------
// `join` and `leave` frames

fn token(user: &str) -> String {
    hs256(&claims(user, &["*"], &[]), SECRET)
}

/// A subscriber of `channel`, with its `join` and `leave` frames when `presence`, once its own
/// join came (before it, the frames of changes made before its subscription may come). Returns
/// the client, its session id and its presence id (when it asked for the frames).
async fn member(
    node: &Gateway,
    user: &str,
    channel: &str,
    presence: bool,
) -> (Client, String, Option<String>) {
    let mut client = node.connect().await;
    let session = client.hello_token(&token(user)).await.session;
    let subscribe = json!({"type": "subscribe", "id": 1, "channel": channel, "presence": presence});
    client.send_text(&subscribe.to_string()).await;
    let subscribed = client.recv_subscribed().await;
    assert_eq!(subscribed.channel, channel);
    if !presence {
        return (client, session, None);
    }
    loop {
        let frame: Value = serde_json::from_str(&client.recv_text().await).unwrap();
        assert!(
            ["join", "leave"].contains(&frame["type"].as_str().unwrap()),
            "{frame}"
        );
        if frame["type"] == "join" && frame["user"] == user {
            let own = frame["client"].as_str().unwrap().to_owned();
            return (client, session, Some(own));
        }
    }
}

/// The next frame: a `kind` (join or leave) of `user` in `channel` (with presence id `id` when
/// given), with exactly the fields of the protocol.
async fn expect(
    client: &mut Client,
    kind: &str,
    channel: &str,
    user: &str,
    id: Option<&str>,
) -> Value {
    let text = client.recv_text().await;
    let frame: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(frame["type"], kind, "{text}");
    assert_eq!(
        (&frame["channel"], &frame["user"]),
        (&json!(channel), &json!(user)),
        "{text}"
    );
    let fields: BTreeSet<&str> = frame
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from(["type", "channel", "user", "client", "count"]),
        "{text}"
    );
    let client_id = frame["client"].as_str().unwrap();
    assert_eq!(client_id.len(), 16, "{text}");
    if let Some(id) = id {
        assert_eq!(client_id, id, "{text}");
    }
    frame
}

/// The next frame is the `message` of `channel` published now (nothing came before it).
async fn expect_nothing_before_a_message(node: &Gateway, client: &mut Client, channel: &str) {
    let auth = format!("Bearer {KEY}");
    let body = common::publish_body(channel, r#""marker""#);
    let (status, answer) = node
        .admin()
        .await
        .request(
            "POST",
            "/v1/publish",
            &[("authorization", &auth)],
            body.as_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let seq = serde_json::from_str::<Value>(&answer).unwrap()["seq"].clone();
    let message = client.recv_message().await;
    assert_eq!(
        (message.channel.as_str(), json!(message.seq)),
        (channel, seq)
    );
}

async fn unsubscribe(client: &mut Client, channel: &str) {
    let frame = json!({"type": "unsubscribe", "id": 2, "channel": channel});
    client.send_text(&frame.to_string()).await;
    match client.recv().await {
        ServerFrame::Unsubscribed { channel: c, .. } => assert_eq!(c, channel),
        other => panic!("expected unsubscribed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_on_the_embedded_broker_only_to_those_that_asked() {
    let node = node_with(None, NO_REPORTS, &[]);
    let channel = common::channel("prs");
    let (mut alice, _, _) = member(&node, "alice", &channel, true).await;
    let (mut carol, carol_session, _) = member(&node, "carol", &channel, false).await;
    let carol_join = expect(&mut alice, "join", &channel, "carol", None).await;
    assert_eq!(carol_join["count"], 2);
    let (mut bob, bob_session, _) = member(&node, "bob", &channel, false).await;
    let bob_join = expect(&mut alice, "join", &channel, "bob", None).await;
    assert_eq!(bob_join["count"], 3);
    let bob_id = bob_join["client"].as_str().unwrap();
    assert_ne!(bob_id, carol_join["client"].as_str().unwrap());

    unsubscribe(&mut bob, &channel).await;
    let left = expect(&mut alice, "leave", &channel, "bob", Some(bob_id)).await;
    assert_eq!(left["count"], 2);
    // Carol did not ask: her next frame is the next message, not bob's join or leave.
    expect_nothing_before_a_message(&node, &mut carol, &channel).await;
    assert_eq!(alice.recv_message().await.data, r#""marker""#);

    // A back end's subscribe and unsubscribe: a member, without the frames.
    let mut erin = node.connect().await;
    erin.hello_token(&token("erin")).await;
    let body = json!({"user": "erin", "channel": channel});
    assert_eq!(post(&node, "/v1/subscribe", &body).await, 200);
    assert_eq!(erin.recv_subscribed().await.id, None);
    let erin_join = expect(&mut alice, "join", &channel, "erin", None).await;
    assert_eq!(erin_join["count"], 3);
    expect_nothing_before_a_message(&node, &mut erin, &channel).await;
    for client in [&mut alice, &mut carol] {
        assert_eq!(client.recv_message().await.data, r#""marker""#);
    }
    assert_eq!(post(&node, "/v1/unsubscribe", &body).await, 200);
    let erin_id = erin_join["client"].as_str();
    expect(&mut alice, "leave", &channel, "erin", erin_id).await;

    // A closed connection leaves.
    carol.close().await;
    let carol_id = carol_join["client"].as_str().unwrap();
    let left = expect(&mut alice, "leave", &channel, "carol", Some(carol_id)).await;
    assert_eq!(left["count"], 1);
    for session in [&carol_session, &bob_session] {
        for frame in [&carol_join, &bob_join, &left] {
            assert!(!frame.to_string().contains(session.as_str()), "{frame}");
        }
    }

    // The members' list says who each presence id is.
    let (_, answer) = presence(&node, &format!("channel={channel}")).await;
    assert_eq!(answer["count"], 1, "{answer}");
    assert_eq!(answer["members"][0]["user"], "alice");
    assert_eq!(answer["members"][0]["client"].as_str().unwrap().len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_outside_presence_channels_is_refused() {
    let node = node(None);
    let mut client = node.connect().await;
    client.hello_token(&token("alice")).await;
    let other = common::channel("other");
    let subscribe = json!({"type": "subscribe", "id": 7, "channel": other, "presence": true});
    client.send_text(&subscribe.to_string()).await;
    let error = client.recv_error().await;
    assert_eq!(
        (error.id.as_deref(), error.code, error.message.as_str()),
        (Some("7"), 400, "presence is off for this channel")
    );
    // Nothing was subscribed: the same subscribe without presence is no repeat.
    client.subscribe(&other).await;
    let wrong = json!({"type": "subscribe", "id": 8, "channel": "prs.x", "presence": "yes"});
    client.send_text(&wrong.to_string()).await;
    let error = client.recv_error().await;
    assert_eq!(error.code, 400);
    assert!(error.message.contains("presence"), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_stop_above_the_bound_on_the_embedded_broker() {
    frames_stop_above_the_bound(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_stop_above_the_bound_on_redis() {
    let redis = RedisServer::start(false);
    frames_stop_above_the_bound(Some(&redis.url())).await;
}

async fn frames_stop_above_the_bound(url: Option<&str>) {
    let node = node_with(url, NO_REPORTS, &["--presence-max-join-leave", "2"]);
    let channel = common::channel("prs");
    let (mut alice, _, _) = member(&node, "alice", &channel, true).await;
    let (_m2, _, _) = member(&node, "m2", &channel, false).await;
    assert_eq!(
        expect(&mut alice, "join", &channel, "m2", None).await["count"],
        2
    );
    // The join that crosses the bound comes, and says so with its count.
    let (mut m3, _, _) = member(&node, "m3", &channel, false).await;
    let m3_join = expect(&mut alice, "join", &channel, "m3", None).await;
    assert_eq!(m3_join["count"], 3);
    // Above it, nothing: m4 joins and leaves unannounced.
    let (mut m4, _, _) = member(&node, "m4", &channel, false).await;
    wait_count(&node, &channel, 4).await;
    unsubscribe(&mut m4, &channel).await;
    // m3 takes the channel back to the bound: announced.
    unsubscribe(&mut m3, &channel).await;
    let m3_id = m3_join["client"].as_str().unwrap();
    let left = expect(&mut alice, "leave", &channel, "m3", Some(m3_id)).await;
    assert_eq!(left["count"], 2);
    expect_nothing_before_a_message(&node, &mut alice, &channel).await;
}

/// `POST path` with `body` on the admin API; the status.
async fn post(node: &Gateway, path: &str, body: &Value) -> u16 {
    let auth = format!("Bearer {KEY}");
    let body = body.to_string();
    let (status, answer) = node
        .admin()
        .await
        .request("POST", path, &[("authorization", &auth)], body.as_bytes())
        .await;
    assert!(status < 500, "{path}: {answer}");
    status
}

/// Waits until the channel has `count` members.
async fn wait_count(node: &Gateway, channel: &str, count: u64) {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (_, answer) = presence(node, &format!("channel={channel}&limit=0")).await;
        if answer["count"] == count {
            return;
        }
        assert!(tokio::time::Instant::now() < until, "{answer}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_keeps_the_opt_in() {
    let redis = RedisServer::start(false);
    let a = node_with(Some(&redis.url()), NO_REPORTS, &[]);
    let b = node_with(Some(&redis.url()), NO_REPORTS, &[]);
    let channel = common::channel("prs");
    let (alice, session, first) = member(&a, "alice", &channel, true).await;
    // The session holds the opt-in (saved at once after the subscribe, but not before its reply).
    let key = format!("bgw:session:{{{session}}}");
    let opted_in = format!(r#""presence":["{channel}"]"#);
    let until = tokio::time::Instant::now() + DEADLINE;
    while !redis
        .cli(&["HGET", &key, "record"])
        .is_some_and(|record| record.contains(&opted_in))
    {
        assert!(
            tokio::time::Instant::now() < until,
            "{key} never held {opted_in}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    alice.close().await;
    // Her leave is out: it cannot reach the resumed subscription.
    wait_count(&a, &channel, 0).await;
    // On another node: the subscription comes back with its frames, under a new presence id.
    let mut again = b.connect().await;
    let alice_token = token("alice");
    let welcome = again
        .resume(Some(&alice_token), &session, Default::default())
        .await;
    assert!(welcome.resumed);
    assert!(welcome.channels.contains_key(&channel), "{welcome:?}");
    let own = expect(&mut again, "join", &channel, "alice", None).await;
    assert_ne!(own["client"].as_str(), first.as_deref());
    member(&a, "bob", &channel, false).await;
    expect(&mut again, "join", &channel, "bob", None).await;
}

/// How the node with the other members ends.
enum End {
    /// Reporting rarely: its members leave only if the drain says so.
    Drain,
    /// Reporting every 200 ms: its members expire.
    Kill,
}

/// alice (with frames) on `a`; bob, then dave (with frames), on `b`: each sees the others come
/// and go across nodes, and the end of `b` takes dave away with a leave.
async fn across_nodes(url: &str, end: End) {
    let a = node(Some(url));
    let interval = match end {
        End::Drain => NO_REPORTS,
        End::Kill => REPORTS,
    };
    let drain = ["--drain-delay", "0s", "--drain-window", "100ms"];
    let b = node_with(Some(url), interval, &drain);
    let channel = common::channel("prs");
    let (mut alice, _, alice_id) = member(&a, "alice", &channel, true).await;
    let (mut bob, bob_session, _) = member(&b, "bob", &channel, false).await;
    let bob_join = expect(&mut alice, "join", &channel, "bob", None).await;
    assert_eq!(bob_join["count"], 2);
    let (mut dave, dave_session, dave_id) = member(&b, "dave", &channel, true).await;
    let dave_join = expect(&mut alice, "join", &channel, "dave", dave_id.as_deref()).await;
    assert_eq!(dave_join["count"], 3);

    // Bob asked for nothing: dave's join did not come to him.
    expect_nothing_before_a_message(&a, &mut bob, &channel).await;
    for watcher in [&mut alice, &mut dave] {
        assert_eq!(watcher.recv_message().await.data, r#""marker""#);
    }
    assert_ne!(alice_id, dave_id);

    unsubscribe(&mut bob, &channel).await;
    let bob_id = bob_join["client"].as_str();
    for watcher in [&mut alice, &mut dave] {
        let left = expect(watcher, "leave", &channel, "bob", bob_id).await;
        assert_eq!(left["count"], 2);
    }

    match end {
        // The drain closes dave with 1001: he leaves at once.
        End::Drain => b.terminate(),
        // Killed, dave's membership expires (three report intervals) and a's next report
        // notices it.
        End::Kill => drop(b),
    }
    let left = expect(&mut alice, "leave", &channel, "dave", dave_id.as_deref()).await;
    assert_eq!(left["count"], 1);
    for frame in [&bob_join, &dave_join, &left] {
        for session in [&bob_session, &dave_session] {
            assert!(!frame.to_string().contains(session.as_str()), "{frame}");
        }
    }
    wait_members(&a, &channel, &[("alice", &a.node)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_across_nodes_on_redis_and_a_drained_node() {
    let redis = RedisServer::start(false);
    across_nodes(&redis.url(), End::Drain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_across_nodes_on_a_redis_cluster_and_a_killed_node() {
    let cluster = RedisCluster::start();
    across_nodes(&cluster.url(), End::Kill).await;
}
