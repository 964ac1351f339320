//! The Rust client of `shared::client` against real nodes: it resumes by itself after its node
//! goes away, and the application sees every message once, in order.

mod common;

use std::time::Duration;

use common::{channel, free_port, Gateway, RedisServer, DEADLINE};
use shared::client::{Client, ClientConfig, Event};
use tokio::sync::mpsc::Receiver;

async fn next_message(events: &mut Receiver<Event>) -> (u64, String) {
    loop {
        let event = tokio::time::timeout(DEADLINE, events.recv())
            .await
            .expect("an event within the deadline")
            .expect("the client runs");
        match event {
            Event::Message { seq, data, .. } => return (seq, data.get().to_owned()),
            Event::Failed(e) => panic!("the client gave up: {e}"),
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_resumes_after_its_node_restarts() {
    let redis = RedisServer::start(false);
    let url = redis.url();
    let listen = format!("127.0.0.1:{}", free_port());
    let flags = [
        "--redis-url",
        &url,
        "--listen",
        &listen,
        "--drain-delay",
        "0s",
        "--drain-window",
        "100ms",
    ];
    let mut node = Gateway::start(&flags);
    let news = channel("client");

    let mut config = ClientConfig::new(format!("ws://{listen}/ws"));
    config.initial_backoff = Duration::from_millis(100);
    let (client, mut events) = Client::start(config);
    client.subscribe(&news, None).unwrap();
    loop {
        match tokio::time::timeout(DEADLINE, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Subscribed { recovered, .. } => break assert!(recovered),
            Event::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    for n in 1..=3 {
        node.publish_ok(&news, &n.to_string()).await;
    }
    for n in 1..=3 {
        assert_eq!(next_message(&mut events).await, (n, n.to_string()));
    }

    node.terminate();
    node.wait_exit(DEADLINE).await;
    let other = Gateway::start(&["--redis-url", &url]);
    for n in 4..=6 {
        other.publish_ok(&news, &n.to_string()).await;
    }
    let _node = Gateway::start(&flags);
    for n in 4..=6 {
        assert_eq!(
            next_message(&mut events).await,
            (n, n.to_string()),
            "missed ones, once"
        );
    }
    other.publish_ok(&news, "7").await;
    assert_eq!(
        next_message(&mut events).await,
        (7, "7".to_owned()),
        "then live"
    );
}
