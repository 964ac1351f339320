//! The broker conformance suite at the trait level: every check runs against the embedded broker
//! and against a real Redis (standalone and Cluster), through the `Broker` traits the node uses,
//! so that the two implementations cannot drift apart where the protocol suite does not look
//! (sessions, node positions, reports, user slots).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use common::{channel, RedisCluster, RedisServer, DEADLINE};
use gateway::broker::{self, Broker, Event, Events, NodePositions, Owner, SessionRecord};
use gateway::config::Cli;
use gateway::metrics::Metrics;
use gateway::shutdown::Tasks;
use shared::Position;

const TTL: Duration = Duration::from_secs(60);

/// A broker under test, and the node's end of its events.
struct Under {
    broker: Arc<dyn Broker>,
    events: Events,
    tasks: Tasks,
}

impl Drop for Under {
    fn drop(&mut self) {
        self.tasks.stop().cancel();
    }
}

/// The broker that `flags` configure (none: the embedded one), linked and ready.
async fn connect(flags: &[&str]) -> Under {
    let mut args = vec!["gateway"];
    args.extend_from_slice(flags);
    let config = Cli::parse_from(args).serve;
    let tasks = Tasks::default();
    let node = channel("node");
    let connected = broker::connect(&config, &node, Arc::new(Metrics::new()), &tasks)
        .await
        .expect("the broker starts");
    let until = tokio::time::Instant::now() + DEADLINE;
    while !connected.broker.available() {
        assert!(
            tokio::time::Instant::now() < until,
            "the broker never came up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Under {
        broker: connected.broker,
        events: connected.events,
        tasks,
    }
}

/// The next message event, skipping others.
async fn next_message(events: &mut Events) -> (u64, Bytes) {
    loop {
        let event = tokio::time::timeout(DEADLINE, events.recv())
            .await
            .expect("an event in time")
            .expect("the broker runs");
        if let Event::Message(delivery) = event {
            return (delivery.seq, delivery.data);
        }
    }
}

async fn publishes_are_numbered_and_delivered_in_order(mut b: Under) {
    let news = channel("news");
    b.broker.subscribe(&news).await.unwrap();
    let first = b.broker.publish(&news, Bytes::from("\"a\"")).await.unwrap();
    let second = b.broker.publish(&news, Bytes::from("\"b\"")).await.unwrap();
    assert_eq!((first.seq, second.seq), (1, 2));
    assert_eq!(first.epoch, second.epoch);
    assert_eq!(next_message(&mut b.events).await, (1, Bytes::from("\"a\"")));
    assert_eq!(next_message(&mut b.events).await, (2, Bytes::from("\"b\"")));
}

async fn an_idempotency_key_publishes_once(b: Under) {
    let news = channel("once");
    let window = Duration::from_secs(60);
    let first = b.broker.publish_once(&news, Bytes::from("1"), "k", window);
    let first = first.await.unwrap();
    let again = b.broker.publish_once(&news, Bytes::from("1"), "k", window);
    assert_eq!(again.await.unwrap(), first);
    let other = b.broker.publish_once(&news, Bytes::from("2"), "j", window);
    assert_eq!(other.await.unwrap().seq, first.seq + 1);
    assert_eq!(b.broker.history(&news, 0).await.unwrap().messages.len(), 2);
}

async fn history_after_a_position_and_its_removal(b: Under) {
    let news = channel("hist");
    for n in 1..=3 {
        b.broker
            .publish(&news, Bytes::from(n.to_string()))
            .await
            .unwrap();
    }
    let history = b.broker.history(&news, 1).await.unwrap();
    let seqs: Vec<u64> = history.messages.iter().map(|(seq, _)| *seq).collect();
    assert_eq!((seqs, history.top, history.complete), (vec![2, 3], 3, true));
    let at_top = b.broker.history(&news, 3).await.unwrap();
    assert!(at_top.messages.is_empty() && at_top.complete);
    b.broker.remove_history(&news).await.unwrap();
    let removed = b.broker.history(&news, 1).await.unwrap();
    assert!(removed.messages.is_empty() && !removed.complete);
    let next = b.broker.publish(&news, Bytes::from("4")).await.unwrap();
    assert_eq!(
        next.seq, 4,
        "the sequence goes on after the history is removed"
    );
}

fn record(id: &str, conn: u64, seq: u64) -> SessionRecord {
    SessionRecord {
        id: id.to_owned(),
        subject: "alice".into(),
        subscriptions: BTreeMap::from([(
            "news".to_owned(),
            Position {
                seq,
                epoch: Some("e".into()),
            },
        )]),
        owner: Owner {
            node: "n1".into(),
            conn,
        },
        presence: Default::default(),
        follows: None,
    }
}

async fn sessions_are_saved_claimed_and_ended(b: Under) {
    let id = channel("session");
    assert_eq!(b.broker.load_session(&id).await.unwrap(), None);
    b.broker
        .save_sessions(&[record(&id, 1, 5)], TTL)
        .await
        .unwrap();
    assert_eq!(
        b.broker.load_session(&id).await.unwrap(),
        Some(record(&id, 1, 5))
    );
    let new_owner = Owner {
        node: "n2".into(),
        conn: 9,
    };
    let claimed = b.broker.claim_session(&id, &new_owner, TTL).await.unwrap();
    assert_eq!(claimed, Some(record(&id, 1, 5)), "the session as it was");
    // The connection that lost it cannot overwrite its successor's session.
    b.broker
        .save_sessions(&[record(&id, 1, 7)], TTL)
        .await
        .unwrap();
    let now = b.broker.load_session(&id).await.unwrap().unwrap();
    assert_eq!(
        (now.owner, now.subscriptions),
        (new_owner, record(&id, 1, 5).subscriptions)
    );
    b.broker.end_session(&id, TTL).await.unwrap();
    assert_eq!(b.broker.load_session(&id).await.unwrap(), None);
    b.broker
        .save_sessions(&[record(&id, 9, 8)], TTL)
        .await
        .unwrap();
    assert_eq!(
        b.broker.load_session(&id).await.unwrap(),
        None,
        "an ended session stays so"
    );
}

async fn node_positions_are_replaced_whole(b: Under) {
    let node = channel("positions");
    assert_eq!(b.broker.load_positions(&node, &["a"]).await.unwrap(), None);
    let at = |seq| Position {
        seq,
        epoch: Some("e".into()),
    };
    let first = NodePositions {
        instance: 7,
        tick: 1,
        channels: BTreeMap::from([("a".to_owned(), at(3)), ("b".to_owned(), at(4))]),
    };
    b.broker.save_positions(&node, &first, TTL).await.unwrap();
    let read = b.broker.load_positions(&node, &["a", "c"]).await.unwrap();
    let expected = NodePositions {
        instance: 7,
        tick: 1,
        channels: BTreeMap::from([("a".to_owned(), at(3))]),
    };
    assert_eq!(
        read,
        Some(expected),
        "only the channels asked for, and held"
    );
    let second = NodePositions {
        instance: 7,
        tick: 2,
        channels: BTreeMap::from([("b".to_owned(), at(9))]),
    };
    b.broker.save_positions(&node, &second, TTL).await.unwrap();
    let read = b.broker.load_positions(&node, &["a", "b"]).await.unwrap();
    assert_eq!(read, Some(second), "a save replaces the one before");
}

async fn user_slots_are_bounded(b: Under) {
    let user = channel("user");
    assert!(b
        .broker
        .acquire_connection(&user, "n/1", 2, TTL)
        .await
        .unwrap());
    assert!(b
        .broker
        .acquire_connection(&user, "n/2", 2, TTL)
        .await
        .unwrap());
    assert!(!b
        .broker
        .acquire_connection(&user, "n/3", 2, TTL)
        .await
        .unwrap());
    b.broker.release_connection(&user, "n/1").await.unwrap();
    assert!(b
        .broker
        .acquire_connection(&user, "n/3", 2, TTL)
        .await
        .unwrap());
}

async fn channel_reports_are_listed(b: Under) {
    let name: Arc<str> = Arc::from(channel("reported"));
    b.broker
        .report_channels(&[(name.clone(), 3)], TTL)
        .await
        .unwrap();
    let listed = b.broker.channels().await.unwrap();
    assert!(listed.contains(&(name.to_string(), 3)), "{listed:?}");
    b.broker.report_channels(&[], TTL).await.unwrap();
    let listed = b.broker.channels().await.unwrap();
    assert!(
        !listed.iter().any(|(c, _)| **c == *name),
        "a new report replaces the old"
    );
}

/// Each check, as a test on the embedded broker, on one Redis and on a Redis Cluster.
macro_rules! on_every_broker {
    ($($check:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $check() {
                    super::$check(super::connect(&[]).await).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let redis = super::RedisServer::start(false);
                    super::$check(super::connect(&["--redis-url", &redis.url()]).await).await;
                }
            )*
        }
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let cluster = super::RedisCluster::start();
                    super::$check(super::connect(&["--redis-url", &cluster.url()]).await).await;
                }
            )*
        }
    };
}

on_every_broker!(
    publishes_are_numbered_and_delivered_in_order,
    an_idempotency_key_publishes_once,
    history_after_a_position_and_its_removal,
    sessions_are_saved_claimed_and_ended,
    node_positions_are_replaced_whole,
    user_slots_are_bounded,
    channel_reports_are_listed,
);
