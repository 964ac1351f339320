//! The conformance suite: the protocol as a client and a publisher see it, whatever the broker.
//!
//! Every node of this file starts through [`start`], which adds the broker flags of
//! [`common::broker_flags`]: the embedded broker by default, Redis when `BGW_TEST_REDIS_URL` is
//! set. Channel names are unique per test, so that runs may share one Redis.

mod common;

use std::collections::BTreeMap;

use common::{channel, position, Gateway};
use serde_json::Value;
use shared::{ClientFrame, ServerFrame};

/// A node on the broker under test, with `flags`.
fn start(flags: &[&str]) -> Gateway {
    let broker = common::broker_flags();
    let mut all: Vec<&str> = broker.iter().map(String::as_str).collect();
    all.extend_from_slice(flags);
    Gateway::start(&all)
}

#[tokio::test]
async fn welcome_describes_a_fresh_session() {
    let gw = start(&[]);
    let (_a, first) = gw.connect_hello().await;
    let (_b, second) = gw.connect_hello().await;
    assert!(!first.resumed);
    assert_eq!(first.node, gw.node);
    assert_eq!(first.heartbeat, 25, "the default heartbeat, in seconds");
    assert!(first.channels.is_empty());
    // At least 128 random bits: 32 hex digits, or 22 characters of base64.
    assert!(first.session.len() >= 22, "{first:?}");
    assert_ne!(first.session, second.session);
}

#[tokio::test]
async fn hello_since_without_session_is_ignored() {
    let gw = start(&[]);
    let news = channel("news");
    gw.publish_ok(&news, "1").await;
    let mut client = gw.connect().await;
    let since = BTreeMap::from([(news.clone(), position(0, None))]);
    client.send_hello(None, None, since).await;
    let welcome = client.recv_welcome().await;
    assert!(!welcome.resumed);
    assert!(welcome.channels.is_empty(), "{welcome:?}");
    // Nothing was subscribed: the next frame answers the next request.
    client.ping().await;
}

#[tokio::test]
async fn ping_echoes_any_id() {
    let gw = start(&[]);
    let (mut client, _) = gw.connect_hello().await;
    client.send_text(r#"{"type":"ping"}"#).await;
    assert!(matches!(
        client.recv().await,
        ServerFrame::Pong { id: None }
    ));
    for id in ["7", r#""abc""#, "1.5", "-3", r#""""#] {
        client
            .send_text(&format!(r#"{{"type":"ping","id":{id}}}"#))
            .await;
        match client.recv().await {
            ServerFrame::Pong { id: Some(echoed) } => assert_eq!(echoed.get(), id),
            other => panic!("expected pong {id}, got {other:?}"),
        }
    }
    // Unknown fields are ignored.
    client
        .send_text(r#"{"extra":{"x":[1,2]},"type":"ping","id":3,"more":null}"#)
        .await;
    match client.recv().await {
        ServerFrame::Pong { id: Some(echoed) } => assert_eq!(echoed.get(), "3"),
        other => panic!("expected pong 3, got {other:?}"),
    }
}

#[tokio::test]
async fn subscribe_message_unsubscribe() {
    let gw = start(&[]);
    let news = channel("news");
    let barrier = channel("barrier");
    let (mut client, _) = gw.connect_hello().await;

    client
        .send_text(&format!(
            r#"{{"type":"subscribe","id":"s1","channel":"{news}"}}"#
        ))
        .await;
    let subscribed = client.recv_subscribed().await;
    assert_eq!(subscribed.id.as_deref(), Some(r#""s1""#));
    assert_eq!(subscribed.channel, news);
    assert_eq!(subscribed.seq, 0, "a new channel");
    assert!(!subscribed.epoch.is_empty());
    assert!(subscribed.recovered);

    let published = gw.publish_ok(&news, r#"{"n":1}"#).await;
    assert_eq!(published.seq, 1);
    assert_eq!(published.epoch, subscribed.epoch);
    let message = client.recv_message().await;
    assert_eq!(
        message,
        common::Msg {
            channel: news.clone(),
            seq: 1,
            data: r#"{"n":1}"#.into()
        }
    );

    client
        .send_text(&format!(
            r#"{{"type":"unsubscribe","id":9,"channel":"{news}"}}"#
        ))
        .await;
    match client.recv().await {
        ServerFrame::Unsubscribed { id, channel } => {
            assert_eq!(id.map(|id| id.get().to_owned()).as_deref(), Some("9"));
            assert_eq!(channel, news);
        }
        other => panic!("expected unsubscribed, got {other:?}"),
    }

    // After the unsubscribe, nothing more of `news`: a message of another channel, published
    // after it, is the next frame.
    client.subscribe(&barrier).await;
    gw.publish_ok(&news, "2").await;
    gw.publish_ok(&barrier, "3").await;
    let next = client.recv_message().await;
    assert_eq!(next.channel, barrier, "{next:?}");

    // Unsubscribing again: 404, with the id.
    client
        .send_text(&format!(
            r#"{{"type":"unsubscribe","id":10,"channel":"{news}"}}"#
        ))
        .await;
    let error = client.recv_error().await;
    assert_eq!((error.code, error.id.as_deref()), (404, Some("10")));
}

#[tokio::test]
async fn bad_requests_get_400_and_the_connection_goes_on() {
    let gw = start(&[]);
    let (mut client, _) = gw.connect_hello().await;
    let news = channel("news");
    let long = "a".repeat(129);
    let cases = [
        r#"{"type":"nope","id":1}"#.to_owned(),
        r#"{"id":2}"#.to_owned(),
        r#"{"type":7,"id":3}"#.to_owned(),
        r#"{"type":"subscribe","id":4,"channel":"bad name"}"#.to_owned(),
        format!(r#"{{"type":"subscribe","id":5,"channel":"{long}"}}"#),
        r#"{"type":"subscribe","id":6,"channel":""}"#.to_owned(),
        r#"{"type":"subscribe","id":7}"#.to_owned(),
        r#"{"type":"subscribe","id":8,"channel":42}"#.to_owned(),
        format!(r#"{{"type":"subscribe","id":9,"channel":"{news}","since":{{"seq":-1}}}}"#),
        format!(r#"{{"type":"subscribe","id":10,"channel":"{news}","since":"x"}}"#),
        r#"{"type":"unsubscribe","id":11}"#.to_owned(),
        r#"{"type":"publish","id":12,"channel":"x"}"#.to_owned(),
        r#"{"type":"publish","id":13,"channel":"né","data":1}"#.to_owned(),
        r#"{"type":"refresh","id":14}"#.to_owned(),
        r#"{"type":"subscribe","id":15,"channel":"a*"}"#.to_owned(),
    ];
    for (n, case) in cases.iter().enumerate() {
        client.send_text(case).await;
        let error = client.recv_error().await;
        assert_eq!(error.code, 400, "{case}: {error:?}");
        assert_eq!(error.id, Some((n + 1).to_string()), "{case}: {error:?}");
        assert!(!error.message.is_empty());
    }
    // The connection is still in service.
    let subscribed = client.subscribe(&news).await;
    assert_eq!(subscribed.seq, 0);
    client.ping().await;
}

#[tokio::test]
async fn subscribing_twice_is_a_bad_request() {
    let gw = start(&[]);
    let news = channel("news");
    let (mut client, _) = gw.connect_hello().await;
    client.subscribe(&news).await;
    client
        .send_text(&format!(
            r#"{{"type":"subscribe","id":5,"channel":"{news}"}}"#
        ))
        .await;
    let error = client.recv_error().await;
    assert_eq!((error.code, error.id.as_deref()), (400, Some("5")));
    // Still subscribed once: one message, once.
    gw.publish_ok(&news, "1").await;
    gw.publish_ok(&news, "2").await;
    client.recv_run(&news, 0, 2).await;
}

#[tokio::test]
async fn client_publish_is_forbidden_by_default() {
    let gw = start(&[]);
    let news = channel("news");
    let (mut client, _) = gw.connect_hello().await;
    client
        .send_text(&format!(
            r#"{{"type":"publish","id":"p","channel":"{news}","data":{{"x":1}}}}"#
        ))
        .await;
    let error = client.recv_error().await;
    assert_eq!((error.code, error.id.as_deref()), (403, Some(r#""p""#)));
    // Nothing was published.
    let subscribed = client.subscribe(&news).await;
    assert_eq!(subscribed.seq, 0);
}

#[tokio::test]
async fn client_publish_when_enabled() {
    let gw = start(&["--client-publish", "--max-publish-bytes", "64"]);
    let news = channel("news");
    let (mut publisher, _) = gw.connect_hello().await;
    let (mut reader, _) = gw.connect_hello().await;
    reader.subscribe(&news).await;
    publisher.subscribe(&news).await;

    let data = r#"{ "text" : "héllo\u00e9" ,"n":[1 , 2.50]}"#;
    publisher
        .send_text(&format!(
            r#"{{"type":"publish","id":1,"channel":"{news}","data":{data}}}"#
        ))
        .await;
    // The publisher gets its reply and, being subscribed, the message, in either order.
    let mut got_reply = false;
    let mut got_message = false;
    while !(got_reply && got_message) {
        match publisher.recv().await {
            ServerFrame::Published { id, channel, seq } => {
                assert_eq!(id.map(|id| id.get().to_owned()).as_deref(), Some("1"));
                assert_eq!((channel.as_str(), seq), (news.as_str(), 1));
                got_reply = true;
            }
            ServerFrame::Message {
                seq, data: bytes, ..
            } => {
                assert_eq!((seq, bytes.get()), (1, data));
                got_message = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let message = reader.recv_message().await;
    assert_eq!(
        (message.seq, message.data.as_str()),
        (1, data),
        "bytes as published"
    );

    // Above --max-publish-bytes: 413.
    let big = format!(r#""{}""#, "x".repeat(100));
    publisher
        .send_text(&format!(
            r#"{{"type":"publish","id":2,"channel":"{news}","data":{big}}}"#
        ))
        .await;
    let error = publisher.recv_error().await;
    assert_eq!((error.code, error.id.as_deref()), (413, Some("2")));
    // An invalid channel: 400.
    publisher
        .send_text(r#"{"type":"publish","id":3,"channel":"a b","data":1}"#)
        .await;
    assert_eq!(publisher.recv_error().await.code, 400);
    // The too-large message was not published: the next one is seq 2.
    gw.publish_ok(&news, "0").await;
    assert_eq!(reader.recv_message().await.seq, 2);
}

#[tokio::test]
async fn too_many_subscriptions_get_429() {
    let gw = start(&["--max-subscriptions", "2"]);
    let (a, b, c) = (channel("a"), channel("b"), channel("c"));
    let (mut client, _) = gw.connect_hello().await;
    client.subscribe(&a).await;
    client.subscribe(&b).await;
    client
        .send_text(&format!(r#"{{"type":"subscribe","id":3,"channel":"{c}"}}"#))
        .await;
    let error = client.recv_error().await;
    assert_eq!((error.code, error.id.as_deref()), (429, Some("3")));
    // An unsubscribe makes room again.
    client
        .send(&ClientFrame::Unsubscribe {
            id: None,
            channel: a.clone(),
        })
        .await;
    assert!(matches!(
        client.recv().await,
        ServerFrame::Unsubscribed { .. }
    ));
    client.subscribe(&c).await;
}

#[tokio::test]
async fn admin_publish_reaches_every_subscriber_byte_for_byte() {
    let gw = start(&[]);
    let news = channel("news");
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (mut client, _) = gw.connect_hello().await;
        client.subscribe(&news).await;
        clients.push(client);
    }
    let payloads = [
        r#"{ "a" : [ 1 ,2 ] ,  "s":"é\u00e9\n" }"#,
        "1.0e10",
        r#""just a string""#,
        "null",
        "[ ]",
        "  {\"padded\":true}\t",
    ];
    for data in payloads {
        gw.publish_ok(&news, data).await;
    }
    for client in &mut clients {
        let run = client.recv_run(&news, 0, payloads.len() as u64).await;
        for (message, data) in run.iter().zip(payloads) {
            assert_eq!(message.data, data.trim(), "data bytes as published");
        }
    }
}

#[tokio::test]
async fn without_since_only_later_messages() {
    let gw = start(&[]);
    let news = channel("news");
    for n in 1..=3 {
        gw.publish_ok(&news, &n.to_string()).await;
    }
    let (mut client, _) = gw.connect_hello().await;
    let subscribed = client.subscribe(&news).await;
    assert_eq!(subscribed.seq, 3, "the channel's last seq");
    assert!(subscribed.recovered);
    gw.publish_ok(&news, "4").await;
    let message = client.recv_message().await;
    assert_eq!((message.seq, message.data.as_str()), (4, "4"));
}

#[tokio::test]
async fn since_seq_zero_replays_all_retained() {
    let gw = start(&[]);
    let news = channel("news");
    let mut epoch = String::new();
    for n in 1..=5 {
        epoch = gw.publish_ok(&news, &format!(r#"{{"n":{n}}}"#)).await.epoch;
    }
    let (mut client, _) = gw.connect_hello().await;
    let subscribed = client.subscribe_since(&news, position(0, None)).await;
    assert_eq!((subscribed.seq, subscribed.recovered), (5, true));
    assert_eq!(subscribed.epoch, epoch);
    let replay = client.recv_run(&news, 0, 5).await;
    assert_eq!(replay[0].data, r#"{"n":1}"#);
    gw.publish_ok(&news, "6").await;
    client.recv_run(&news, 5, 1).await;
}

#[tokio::test]
async fn since_position_replays_what_follows_it() {
    let gw = start(&[]);
    let news = channel("news");
    let mut epoch = String::new();
    for n in 1..=5 {
        epoch = gw.publish_ok(&news, &n.to_string()).await.epoch;
    }
    let (mut client, _) = gw.connect_hello().await;
    let subscribed = client
        .subscribe_since(&news, position(3, Some(&epoch)))
        .await;
    assert_eq!((subscribed.seq, subscribed.recovered), (5, true));
    client.recv_run(&news, 3, 2).await;
    gw.publish_ok(&news, "6").await;
    client.recv_run(&news, 5, 1).await;

    // At the top already: nothing to replay, recovered.
    let (mut other, _) = gw.connect_hello().await;
    let subscribed = other
        .subscribe_since(&news, position(6, Some(&epoch)))
        .await;
    assert_eq!((subscribed.seq, subscribed.recovered), (6, true));
    gw.publish_ok(&news, "7").await;
    other.recv_run(&news, 6, 1).await;
}

#[tokio::test]
async fn since_of_another_epoch_is_not_recovered() {
    let gw = start(&[]);
    let news = channel("news");
    for n in 1..=5 {
        gw.publish_ok(&news, &n.to_string()).await;
    }
    let (mut client, _) = gw.connect_hello().await;
    let subscribed = client
        .subscribe_since(&news, position(2, Some("not-the-epoch")))
        .await;
    assert_eq!((subscribed.seq, subscribed.recovered), (5, false));
    // No replay: delivery goes on from the channel's current position.
    gw.publish_ok(&news, "6").await;
    client.recv_run(&news, 5, 1).await;
}

#[tokio::test]
async fn since_older_than_history_is_not_recovered() {
    let gw = start(&["--history-size", "3"]);
    let news = channel("news");
    let mut epoch = String::new();
    for n in 1..=6 {
        epoch = gw.publish_ok(&news, &n.to_string()).await.epoch;
    }
    // Seq 2 is lost (history holds 4..=6): recovered false, and no replay.
    let (mut client, _) = gw.connect_hello().await;
    let subscribed = client
        .subscribe_since(&news, position(2, Some(&epoch)))
        .await;
    assert_eq!((subscribed.seq, subscribed.recovered), (6, false));
    gw.publish_ok(&news, "7").await;
    client.recv_run(&news, 6, 1).await;

    // History now holds 5..=7: after seq 4, the replay is complete.
    let (mut client, _) = gw.connect_hello().await;
    let subscribed = client
        .subscribe_since(&news, position(4, Some(&epoch)))
        .await;
    assert_eq!((subscribed.seq, subscribed.recovered), (7, true));
    client.recv_run(&news, 4, 3).await;

    // `{"seq": 0}` asks for all that is retained: what is left, but not recovered.
    let (mut client, _) = gw.connect_hello().await;
    let subscribed = client.subscribe_since(&news, position(0, None)).await;
    assert_eq!((subscribed.seq, subscribed.recovered), (7, false));
    client.recv_run(&news, 4, 3).await;
}

#[tokio::test]
async fn since_ahead_of_the_channel_is_not_recovered() {
    let gw = start(&[]);
    let news = channel("news");
    let mut epoch = String::new();
    for n in 1..=5 {
        epoch = gw.publish_ok(&news, &n.to_string()).await.epoch;
    }
    // The client saw messages the channel does not have: nothing to replay, not recovered,
    // and delivery goes on from the channel's position. The largest seq is no exception.
    let mut top = 5;
    for ahead in [top + 4, u64::MAX] {
        let (mut client, _) = gw.connect_hello().await;
        let subscribed = client
            .subscribe_since(&news, position(ahead, Some(&epoch)))
            .await;
        assert_eq!(
            (subscribed.seq, subscribed.recovered),
            (top, false),
            "since {ahead}"
        );
        let live = gw.publish_ok(&news, r#""live""#).await;
        let message = client.recv_message().await;
        assert_eq!(message.seq, top + 1, "since {ahead}");
        top = live.seq;
    }
}

#[tokio::test]
async fn a_thousand_messages_in_order_without_gaps() {
    let gw = start(&[]);
    let news = channel("news");
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (mut client, _) = gw.connect_hello().await;
        client.subscribe(&news).await;
        readers.push(client);
    }
    const PUBLISHERS: u64 = 4;
    const EACH: u64 = 250;
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let mut admin = gw.admin().await;
        let news = news.clone();
        publishers.push(tokio::spawn(async move {
            for i in 0..EACH {
                admin
                    .publish_ok(&news, &format!(r#"{{"p":{p},"i":{i}}}"#))
                    .await;
            }
        }));
    }
    let readers = readers.into_iter().map(|mut client| {
        let news = news.clone();
        tokio::spawn(async move {
            let run = client.recv_run(&news, 0, PUBLISHERS * EACH).await;
            // Each publisher's messages keep the order it published them in.
            let mut next = [0u64; PUBLISHERS as usize];
            for message in run {
                let data: Value = serde_json::from_str(&message.data).unwrap();
                let p = data["p"].as_u64().unwrap() as usize;
                assert_eq!(data["i"].as_u64().unwrap(), next[p], "{message:?}");
                next[p] += 1;
            }
        })
    });
    let readers: Vec<_> = readers.collect();
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    for reader in readers {
        reader.await.expect("reader");
    }
}

/// A session with one subscription to `news` that received `received` messages, then left.
async fn departed_session(gw: &Gateway, news: &str, received: u64) -> (String, String) {
    let (mut client, welcome) = gw.connect_hello().await;
    let subscribed = client.subscribe(news).await;
    for _ in 0..received {
        gw.publish_ok(news, r#"{"before":"leaving"}"#).await;
    }
    client.recv_run(news, subscribed.seq, received).await;
    client.close().await;
    // The connection has ended on the node, and its session is saved.
    gw.wait_metric_until("bgw_connections", |v| v == 0.0, "0")
        .await;
    (welcome.session, subscribed.epoch)
}

#[tokio::test]
async fn resume_replays_from_stored_positions() {
    let gw = start(&[]);
    let news = channel("news");
    let (session, epoch) = departed_session(&gw, &news, 3).await;
    gw.publish_ok(&news, "4").await;
    gw.publish_ok(&news, "5").await;

    let mut client = gw.connect().await;
    let welcome = client.resume(None, &session, BTreeMap::new()).await;
    assert!(welcome.resumed, "{welcome:?}");
    assert_eq!(welcome.session, session);
    let state = &welcome.channels[&news];
    assert_eq!(
        (state.seq, state.epoch.as_str(), state.recovered),
        (5, epoch.as_str(), true)
    );
    assert_eq!(welcome.channels.len(), 1);
    // What it missed, exactly once, then live.
    let replay = client.recv_run(&news, 3, 2).await;
    assert_eq!(replay[1].data, "5");
    gw.publish_ok(&news, "6").await;
    client.recv_run(&news, 5, 1).await;
}

#[tokio::test]
async fn resume_prefers_the_clients_positions() {
    let gw = start(&[]);
    let news = channel("news");
    let (session, epoch) = departed_session(&gw, &news, 3).await;
    gw.publish_ok(&news, "4").await;

    let mut client = gw.connect().await;
    let since = BTreeMap::from([(news.clone(), position(1, Some(&epoch)))]);
    let welcome = client.resume(None, &session, since).await;
    assert!(welcome.resumed);
    assert!(welcome.channels[&news].recovered);
    assert_eq!(welcome.channels[&news].seq, 4);
    client.recv_run(&news, 1, 3).await;
    gw.publish_ok(&news, "5").await;
    client.recv_run(&news, 4, 1).await;
}

#[tokio::test]
async fn resume_from_a_lost_position_is_not_recovered() {
    let gw = start(&["--history-size", "2"]);
    let news = channel("news");
    let (session, epoch) = departed_session(&gw, &news, 1).await;
    for n in 2..=6 {
        gw.publish_ok(&news, &n.to_string()).await;
    }
    let mut client = gw.connect().await;
    let since = BTreeMap::from([(news.clone(), position(1, Some(&epoch)))]);
    let welcome = client.resume(None, &session, since).await;
    assert!(welcome.resumed);
    let state = &welcome.channels[&news];
    assert_eq!((state.seq, state.recovered), (6, false));
    // No replay; live from the channel's current position.
    gw.publish_ok(&news, "7").await;
    client.recv_run(&news, 6, 1).await;
}

#[tokio::test]
async fn unknown_session_starts_afresh() {
    let gw = start(&[]);
    let mut client = gw.connect().await;
    let welcome = client
        .resume(None, "00000000000000000000000000000000", BTreeMap::new())
        .await;
    assert!(!welcome.resumed);
    assert_ne!(welcome.session, "00000000000000000000000000000000");
    assert!(welcome.channels.is_empty());
}

#[tokio::test]
async fn a_session_never_resumes_under_another_subject() {
    let gw = start(&["--jwt-secret", common::SECRET]);
    let news = channel("news");
    let alice = common::hs256(&common::claims("alice", &["*"], &[]), common::SECRET);
    let bob = common::hs256(&common::claims("bob", &["*"], &[]), common::SECRET);
    let mut first = gw.connect().await;
    let welcome = first.hello_token(&alice).await;
    first.subscribe(&news).await;

    let mut other = gw.connect().await;
    let theirs = other
        .resume(Some(&bob), &welcome.session, BTreeMap::new())
        .await;
    assert!(!theirs.resumed);
    assert_ne!(theirs.session, welcome.session);
    assert!(theirs.channels.is_empty());
    // Alice's connection is not taken over, and bob has no subscription.
    first.ping().await;
    gw.publish_ok(&news, "1").await;
    first.recv_run(&news, 0, 1).await;
    other.ping().await;

    // Alice herself resumes it.
    let mut again = gw.connect().await;
    let resumed = again
        .resume(Some(&alice), &welcome.session, BTreeMap::new())
        .await;
    assert!(resumed.resumed);
    assert!(resumed.channels.contains_key(&news));
}

#[tokio::test]
async fn a_second_connection_takes_the_session_over() {
    let gw = start(&[]);
    let news = channel("news");
    let (mut first, welcome) = gw.connect_hello().await;
    first.subscribe(&news).await;
    gw.publish_ok(&news, "1").await;
    let last = first.recv_message().await;

    let mut second = gw.connect().await;
    let since = BTreeMap::from([(news.clone(), position(last.seq, None))]);
    let resumed = second.resume(None, &welcome.session, since).await;
    assert!(resumed.resumed);
    assert_eq!(resumed.session, welcome.session);
    assert!(resumed.channels.contains_key(&news));

    let (code, reason) = first.expect_close().await;
    assert_eq!(code, 4009, "{reason}");
    gw.publish_ok(&news, "2").await;
    second.recv_run(&news, 1, 1).await;
    gw.wait_metric("bgw_sessions_taken_over_total", 1.0).await;
}
