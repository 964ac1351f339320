//! The close codes of PROTOCOL.md and the limits behind them: every close the server starts,
//! with its code and reason, on real sockets.

mod common;

use std::collections::BTreeMap;

use common::{channel, position, Gateway, RawWs};
use futures_util::SinkExt;
use shared::ServerFrame;
use tokio_tungstenite::tungstenite::Message;

const PING: &str = r#"{"type":"ping"}"#;
const HELLO: &str = r#"{"type":"hello"}"#;

#[tokio::test]
async fn binary_frames_close_1003() {
    let gw = Gateway::start(&[]);
    let (mut client, _) = gw.connect_hello().await;
    client
        .send_message(Message::binary(&b"{\"type\":\"ping\"}"[..]))
        .await;
    assert_eq!(client.expect_close().await.0, 1003);
    client.expect_end().await;

    // Before hello too.
    let mut client = gw.connect().await;
    client.send_message(Message::binary(&b"\x00\x01"[..])).await;
    assert_eq!(client.expect_close().await.0, 1003);
    gw.wait_metric(r#"bgw_closes_total{code="1003"}"#, 2.0)
        .await;
}

#[tokio::test]
async fn text_that_is_not_a_json_object_closes_1007() {
    let gw = Gateway::start(&[]);
    for text in [
        "hello",
        "[1,2]",
        "42",
        r#""ping""#,
        "null",
        r#"{"type":"ping""#,
        "",
    ] {
        let (mut client, _) = gw.connect_hello().await;
        client.send_text(text).await;
        let (code, reason) = client.expect_close().await;
        assert_eq!(code, 1007, "{text:?}: {reason}");
    }
    // Before hello as well: it is not a frame at all.
    let mut client = gw.connect().await;
    client.send_text("not json").await;
    assert_eq!(client.expect_close().await.0, 1007);
}

#[tokio::test]
async fn invalid_utf8_closes_1007() {
    let gw = Gateway::start(&[]);
    let mut raw = RawWs::connect(gw.client_addr).await;
    raw.send_text(HELLO).await;
    let (opcode, welcome) = raw.read_frame().await.expect("welcome");
    assert_eq!(opcode, 0x1);
    assert!(String::from_utf8(welcome).unwrap().contains("welcome"));
    raw.send_frame(0x81, b"{\"type\":\"ping\",\"id\":\"\xff\xfe\"}", true)
        .await;
    assert_eq!(raw.expect_close().await.0, 1007);
}

#[tokio::test]
async fn frames_above_the_size_limit_close_1009() {
    let gw = Gateway::start(&["--max-frame-bytes", "1024"]);
    // Just below the limit is fine.
    let (mut client, _) = gw.connect_hello().await;
    let padding = "x".repeat(900);
    client
        .send_text(&format!(r#"{{"type":"ping","id":1,"pad":"{padding}"}}"#))
        .await;
    assert!(matches!(client.recv().await, ServerFrame::Pong { .. }));

    // One frame above it.
    let padding = "x".repeat(2000);
    client
        .send_text(&format!(r#"{{"type":"ping","pad":"{padding}"}}"#))
        .await;
    let (code, reason) = client.expect_close().await;
    assert_eq!(code, 1009, "{reason}");

    // A message of two small frames that is above it in all.
    let mut raw = RawWs::connect(gw.client_addr).await;
    raw.send_text(HELLO).await;
    raw.read_frame().await.expect("welcome");
    let half = "y".repeat(700);
    raw.send_frame(
        0x01,
        format!(r#"{{"type":"ping","a":"{half}"#).as_bytes(),
        true,
    )
    .await;
    raw.send_frame(0x80, format!(r#"{half}"}}"#).as_bytes(), true)
        .await;
    assert_eq!(raw.expect_close().await.0, 1009);
}

#[tokio::test]
async fn websocket_protocol_errors_close_1002() {
    let gw = Gateway::start(&[]);
    // A reserved bit that no extension gave a meaning.
    let mut raw = RawWs::connect(gw.client_addr).await;
    raw.send_text(HELLO).await;
    raw.read_frame().await.expect("welcome");
    raw.send_frame(0x80 | 0x40 | 0x1, PING.as_bytes(), true)
        .await;
    let (code, reason) = raw.expect_close().await;
    assert_eq!(code, 1002, "{reason}");

    // An unmasked frame from a client.
    let mut raw = RawWs::connect(gw.client_addr).await;
    raw.send_text(HELLO).await;
    raw.read_frame().await.expect("welcome");
    raw.send_frame(0x81, PING.as_bytes(), false).await;
    assert_eq!(raw.expect_close().await.0, 1002);

    // An unknown opcode, before hello.
    let mut raw = RawWs::connect(gw.client_addr).await;
    raw.send_frame(0x83, b"", true).await;
    assert_eq!(raw.expect_close().await.0, 1002);
}

#[tokio::test]
async fn a_first_frame_other_than_hello_closes_4002() {
    let gw = Gateway::start(&[]);
    for first in [
        PING,
        r#"{"type":"subscribe","channel":"news"}"#,
        r#"{"type":"refresh","token":"x"}"#,
        r#"{"type":"nope"}"#,
        r#"{"no":"type"}"#,
    ] {
        let mut client = gw.connect().await;
        client.send_text(first).await;
        let (code, reason) = client.expect_close().await;
        assert_eq!(code, 4002, "{first}: {reason}");
    }
}

#[tokio::test]
async fn a_second_hello_closes_4002() {
    let gw = Gateway::start(&[]);
    let (mut client, _) = gw.connect_hello().await;
    client.send_text(HELLO).await;
    let (code, reason) = client.expect_close().await;
    assert_eq!(code, 4002, "{reason}");
}

#[tokio::test]
async fn no_hello_in_time_closes_4008() {
    let gw = Gateway::start(&["--hello-timeout", "300ms"]);
    let mut client = gw.connect().await;
    let (code, reason) = client.expect_close().await;
    assert_eq!(code, 4008, "{reason}");
    client.expect_end().await;

    // A hello in time is welcome, and the timer is gone with it.
    let (mut client, _) = gw.connect_hello().await;
    gw.wait_metric(r#"bgw_closes_total{code="4008"}"#, 1.0)
        .await;
    client.ping().await;
}

#[tokio::test]
async fn too_many_frames_per_second_close_4029() {
    let gw = Gateway::start(&["--client-rate", "5"]);
    let (mut client, _) = gw.connect_hello().await;
    for _ in 0..50 {
        client.ws.feed(Message::text(PING)).await.expect("feed");
    }
    client.ws.flush().await.expect("flush");
    let (code, reason) = client.expect_close().await;
    assert_eq!(code, 4029, "{reason}");
    gw.wait_metric(r#"bgw_limit_hits_total{limit="rate"}"#, 1.0)
        .await;
}

#[tokio::test]
async fn a_slow_consumer_is_closed_4030_and_resumes_from_history() {
    let gw = Gateway::start(&["--max-queue-bytes", "65536"]);
    let news = channel("news");
    let (mut client, welcome) = gw.connect_hello().await;
    let subscribed = client.subscribe(&news).await;

    // The client stops reading; 8 KiB messages pile up until the node gives up on it.
    let data = format!(r#""{}""#, "x".repeat(8 * 1024));
    let mut admin = gw.admin().await;
    let mut published = 0;
    loop {
        for _ in 0..16 {
            published = admin.publish_ok(&news, &data).await.seq;
        }
        if gw.metric(r#"bgw_closes_total{code="4030"}"#).await >= 1.0 {
            break;
        }
        assert!(published < 50_000, "no 4030 after {published} messages");
    }

    // What reached the socket before the close comes in order, then the close.
    let mut last = subscribed.seq;
    let (code, reason) = loop {
        match client.next_message().await {
            Some(Ok(Message::Text(text))) => {
                let frame: ServerFrame = serde_json::from_str(&text).expect("a frame");
                let ServerFrame::Message { seq, .. } = frame else {
                    panic!("expected a message, got {frame:?}")
                };
                assert_eq!(seq, last + 1, "no gap before the close");
                last = seq;
            }
            Some(Ok(Message::Close(Some(close)))) => {
                break (u16::from(close.code), close.reason.to_string())
            }
            other => panic!("expected messages then a close, got {other:?}"),
        }
    };
    assert_eq!(code, 4030, "{reason}");
    assert!(last < published, "the queue was dropped");

    // It resumes, and history gives it what it missed.
    let mut client = gw.connect().await;
    let since = BTreeMap::from([(news.clone(), position(last, Some(&subscribed.epoch)))]);
    let resumed = client.resume(None, &welcome.session, since).await;
    assert!(resumed.resumed);
    let state = &resumed.channels[&news];
    assert_eq!((state.seq, state.recovered), (published, true));
    client.recv_run(&news, last, published - last).await;
}

#[tokio::test]
async fn a_client_that_answers_no_ping_is_dropped() {
    let gw = Gateway::start(&["--heartbeat-interval", "300ms", "--pong-timeout", "300ms"]);
    let (mut client, welcome) = gw.connect_hello().await;
    assert_eq!(welcome.heartbeat, 1, "a heartbeat under a second rounds up");
    // The client reads nothing, so it answers no ping: after interval + pong timeout of
    // silence, the node closes it.
    gw.wait_metric(r#"bgw_closes_total{code="1001"}"#, 1.0)
        .await;
    let (code, reason) = client.expect_close().await;
    assert_eq!(code, 1001);
    assert!(reason.contains("heartbeat"), "{reason}");
    client.expect_end().await;
}

#[tokio::test]
async fn a_client_that_answers_pings_stays() {
    let gw = Gateway::start(&["--heartbeat-interval", "300ms", "--pong-timeout", "1s"]);
    let (mut client, _) = gw.connect_hello().await;
    // Ten pings is 3 s, well past interval + pong timeout: tungstenite answers each one.
    let mut pings = 0;
    while pings < 10 {
        match client.next_message().await {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected pings, got {other:?}"),
        }
    }
    client.ping().await;
    assert_eq!(gw.metric(r#"bgw_closes_total{code="1001"}"#).await, 0.0);
}

#[tokio::test]
async fn sigterm_drains_with_1001() {
    let mut gw = Gateway::start(&["--drain-delay", "3s", "--drain-window", "200ms"]);
    let (mut client, _) = gw.connect_hello().await;
    gw.terminate();
    // Readiness fails at once.
    let until = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        let (status, body) = gw.get("/readyz").await;
        if status == 503 {
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["status"], "draining", "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(tokio::time::Instant::now() < until, "readyz never failed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A draining node refuses new clients before the upgrade, so that they try another node.
    assert_eq!(
        common::refusal_status(gw.try_connect(gw.request("")).await),
        503
    );
    // Then its clients are closed with 1001, and it exits.
    let (code, reason) = client.expect_close().await;
    assert_eq!(code, 1001, "{reason}");
    client.expect_end().await;
    let status = gw.wait_exit(common::DEADLINE * 2).await;
    assert!(status.success(), "{status}");
}
