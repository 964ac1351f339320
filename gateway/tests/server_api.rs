//! The server API of the admin listener, on the embedded broker, one Redis and a Redis Cluster:
//! idempotent publishes, broadcast, batch, history read and removal; with Redis, through two
//! nodes (published through one, received on the other). And an idempotent retry after Redis
//! paused (the first attempt timed out, then ran) publishes once.

mod common;

use std::time::Duration;

use common::{Admin, Client, Gateway, RedisCluster, RedisServer, DEADLINE};
use serde_json::{json, Value};

const KEY: &str = "server-api-test-key";

/// A node with the API key, on `url` (or the embedded broker).
fn node(url: Option<&str>) -> Gateway {
    Gateway::start_on(url, &["--api-key", KEY])
}

/// A call of the server API with the key: the status and the JSON answer.
async fn call(node: &Gateway, method: &str, path: &str, body: Value) -> (u16, Value) {
    node.admin_with_key(KEY)
        .await
        .call(method, path, &body)
        .await
}

async fn history(node: &Gateway, query: &str) -> Value {
    let (status, answer) = call(node, "GET", &format!("/v1/history?{query}"), Value::Null).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

fn history_seqs(answer: &Value) -> Vec<u64> {
    answer["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

async fn subscriber(node: &Gateway, channels: &[&str]) -> Client {
    let mut client = node.connect().await;
    client.hello().await;
    for channel in channels {
        client.subscribe(channel).await;
    }
    client
}

/// Every operation of the server API, published through `a` and received through `b` (the
/// same node on the embedded broker).
async fn server_api(a: &Gateway, b: &Gateway) {
    let news = common::channel("api.news");
    let other = common::channel("api.other");
    let mut client = subscriber(b, &[&news, &other]).await;

    // Idempotent publish: the same key answers the first publish and publishes nothing.
    let once = json!({"channel": news, "data": {"n": 1}, "idempotency_key": "order-1"});
    let (status, first) = call(a, "POST", "/v1/publish", once.clone()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["seq"], 1);
    let (status, again) = call(b, "POST", "/v1/publish", once).await;
    assert_eq!(
        (status, &again),
        (200, &first),
        "a retry through another node"
    );
    let another = json!({"channel": news, "data": {"n": 2}, "idempotency_key": "order-2"});
    assert_eq!(call(a, "POST", "/v1/publish", another).await.1["seq"], 2);
    // Keys belong to their channel.
    let elsewhere = json!({"channel": other, "data": {"n": 1}, "idempotency_key": "order-1"});
    assert_eq!(call(a, "POST", "/v1/publish", elsewhere).await.1["seq"], 1);
    let got = recv(&mut client, 3).await;
    assert_eq!(
        of(&got, &news),
        [(1, json!({"n": 1})), (2, json!({"n": 2}))],
        "the retry was not delivered"
    );
    assert_eq!(of(&got, &other), [(1, json!({"n": 1}))]);

    // Broadcast: one message to many channels, each answered in order.
    let third = common::channel("api.third");
    let (status, answer) = call(
        a,
        "POST",
        "/v1/broadcast",
        json!({"channels": [news, third, other], "data": {"all": true}}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().expect("results");
    let placed: Vec<(&str, u64)> = results
        .iter()
        .map(|r| (r["channel"].as_str().unwrap(), r["seq"].as_u64().unwrap()))
        .collect();
    assert_eq!(placed, [(&*news, 3), (&*third, 1), (&*other, 2)]);
    let got = recv(&mut client, 2).await;
    assert_eq!(of(&got, &news), [(3, json!({"all": true}))]);
    assert_eq!(of(&got, &other), [(2, json!({"all": true}))]);

    // Batch: many messages, in order per channel, an idempotent repeat answered as the first.
    let batch = json!({"messages": [
        {"channel": news, "data": 4},
        {"channel": other, "data": 3},
        {"channel": news, "data": 5},
        {"channel": news, "data": "again", "idempotency_key": "order-1"},
        {"channel": news, "data": 6},
    ]});
    let (status, answer) = call(a, "POST", "/v1/batch", batch).await;
    assert_eq!(status, 200, "{answer}");
    let seqs: Vec<(String, u64)> = answer["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            (
                r["channel"].as_str().unwrap().to_owned(),
                r["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seqs,
        [
            (news.clone(), 4),
            (other.clone(), 3),
            (news.clone(), 5),
            (news.clone(), 1),
            (news.clone(), 6)
        ]
    );
    let got = recv(&mut client, 4).await;
    assert_eq!(
        of(&got, &news),
        [(4, json!(4)), (5, json!(5)), (6, json!(6))]
    );
    assert_eq!(of(&got, &other), [(3, json!(3))]);

    // A bad channel anywhere refuses the whole call: nothing is published.
    let (status, answer) = call(
        a,
        "POST",
        "/v1/broadcast",
        json!({"channels": [news, "bad name"], "data": 1}),
    )
    .await;
    assert_eq!(
        (status, &answer["error"]),
        (400, &json!("invalid channel name"))
    );
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({"channel": news, "data": i}))
        .collect();
    let (status, _) = call(a, "POST", "/v1/batch", json!({"messages": too_many})).await;
    assert_eq!(status, 400);
    let (status, _) = call(
        a,
        "POST",
        "/v1/publish",
        json!({"channel": news, "data": 1, "idempotency_key": "has space"}),
    )
    .await;
    assert_eq!(status, 400);

    // History: after a position, with a limit, and the channel's current seq and epoch.
    let page = history(b, &format!("channel={news}&since=1&limit=2")).await;
    assert_eq!(history_seqs(&page), [2, 3]);
    assert_eq!(
        (page["seq"].as_u64(), &page["more"]),
        (Some(6), &json!(true))
    );
    assert_eq!(page["epoch"], first["epoch"]);
    assert_eq!(page["messages"][0]["data"], json!({"n": 2}));
    let rest = history(b, &format!("channel={news}&since=3")).await;
    assert_eq!(history_seqs(&rest), [4, 5, 6]);
    assert_eq!(
        (&rest["more"], &rest["complete"]),
        (&json!(false), &json!(true))
    );

    // Removed: no messages, the sequence goes on.
    let (status, answer) = call(
        a,
        "DELETE",
        &format!("/v1/history?channel={news}"),
        Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let empty = history(b, &format!("channel={news}")).await;
    assert_eq!(history_seqs(&empty), Vec::<u64>::new());
    assert_eq!(
        (empty["seq"].as_u64(), &empty["complete"]),
        (Some(6), &json!(false))
    );
    let next = json!({"channel": news, "data": 7});
    assert_eq!(call(a, "POST", "/v1/publish", next).await.1["seq"], 7);

    // Without the key, nothing of the server API answers.
    let mut anonymous = Admin::connect(a.admin_addr).await;
    for (method, path) in [
        ("POST", "/v1/publish"),
        ("POST", "/v1/broadcast"),
        ("POST", "/v1/batch"),
        ("GET", "/v1/history?channel=news"),
        ("DELETE", "/v1/history?channel=news"),
    ] {
        let (status, _) = anonymous.request(method, path, &[], b"{}").await;
        assert_eq!(status, 401, "{method} {path}");
    }
}

/// The next `count` messages: channel, seq and data.
async fn recv(client: &mut Client, count: usize) -> Vec<(String, u64, Value)> {
    let mut got = Vec::with_capacity(count);
    for _ in 0..count {
        let message = client.recv_message().await;
        let data = serde_json::from_str(&message.data).unwrap();
        got.push((message.channel, message.seq, data));
    }
    got
}

/// The messages of `channel` among `got`, in the order they came.
fn of(got: &[(String, u64, Value)], channel: &str) -> Vec<(u64, Value)> {
    got.iter()
        .filter(|(c, _, _)| c == channel)
        .map(|(_, seq, data)| (*seq, data.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_api_on_the_embedded_broker() {
    let node = node(None);
    server_api(&node, &node).await;
}

/// `gateway history` and `gateway publish --idempotency-key` are clients of the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_publishes_once_and_reads_history() {
    let node = node(None);
    let channel = common::channel("api.cli");
    let gateway = async |args: &[&str]| {
        let out = node.cli(args, Some(KEY)).await;
        assert!(out.status.success(), "{args:?}: {out:?}");
        serde_json::from_slice::<Value>(&out.stdout).expect("a JSON answer")
    };
    for _ in 0..2 {
        let answer = gateway(&["publish", "--idempotency-key", "k1", &channel, "{\"a\":1}"]).await;
        assert_eq!(answer["seq"], 1);
    }
    gateway(&["publish", &channel, "2"]).await;
    let answer = gateway(&["history", "--since", "1", &channel]).await;
    assert_eq!(history_seqs(&answer), [2]);
    assert_eq!(answer["seq"], 2);
    gateway(&["history", "--remove", &channel]).await;
    assert_eq!(
        history_seqs(&gateway(&["history", &channel]).await),
        Vec::<u64>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_api_on_redis_across_nodes() {
    let redis = RedisServer::start(false);
    let (a, b) = (node(Some(&redis.url())), node(Some(&redis.url())));
    server_api(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_api_on_a_redis_cluster_across_nodes() {
    let cluster = RedisCluster::start();
    let (a, b) = (node(Some(&cluster.url())), node(Some(&cluster.url())));
    server_api(&a, &b).await;
}

/// Redis stalls (stopped with SIGSTOP) for longer than the node waits for an answer: the
/// publish answers 503, but the script is in Redis' socket buffer, and Redis runs it when it
/// wakes up. A retry with the same idempotency key gets that publish's answer and publishes
/// nothing more; without a key, the retry publishes again (which is what the key is for).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_retry_after_a_redis_pause_publishes_once() {
    let redis = RedisServer::start(false);
    let node = node(Some(&redis.url()));
    let once = common::channel("api.once");
    let twice = common::channel("api.twice");
    // Before the pause: the script loaded, and each of the node's shared publish connections
    // made (a connection made during the pause would time out before sending anything).
    for n in 0..4 {
        let warm = json!({"channel": "warm", "data": n});
        assert_eq!(call(&node, "POST", "/v1/publish", warm).await.0, 200);
    }
    redis.pause();
    let keyed = json!({"channel": once, "data": {"order": 7}, "idempotency_key": "order-7"});
    let plain = json!({"channel": twice, "data": {"order": 7}});
    // Longer than the node's 2 s command timeout.
    let (keyed_status, plain_status) = tokio::join!(
        call(&node, "POST", "/v1/publish", keyed.clone()),
        call(&node, "POST", "/v1/publish", plain.clone()),
    );
    redis.resume();
    assert_eq!(keyed_status.0, 503, "{}", keyed_status.1);
    assert_eq!(plain_status.0, 503, "{}", plain_status.1);

    // The back end retries until it gets an answer.
    let retry = |body: Value| {
        let node = &node;
        async move {
            let until = tokio::time::Instant::now() + DEADLINE;
            loop {
                let (status, answer) = call(node, "POST", "/v1/publish", body.clone()).await;
                if status == 200 {
                    return answer;
                }
                assert!(tokio::time::Instant::now() < until, "{status} {answer}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let keyed_answer = retry(keyed).await;
    let plain_answer = retry(plain).await;
    // The stalled publish without a key ran too, before or after its retry: two messages.
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let seqs = history_seqs(&history(&node, &format!("channel={twice}")).await);
        if seqs == [1, 2] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{seqs:?} {plain_answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // With the key: once, and the retry answered with its place.
    assert_eq!(keyed_answer["seq"], 1, "{keyed_answer}");
    assert_eq!(
        history_seqs(&history(&node, &format!("channel={once}")).await),
        [1],
        "published exactly once"
    );
}
