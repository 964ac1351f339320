//! The write path under a client that stops reading: frames go straight to the socket while it
//! takes them, into the connection's backlog once it would block, and straight again once the
//! backlog is written out, with one order throughout; a drain sends what waits before its 1001.

mod common;

use std::time::Duration;

use common::{channel, Gateway};

const BACKLOGGED: &str = "bgw_backlogged_connections";

/// Publishes 4 KiB messages until the node reports a backlog (the client's socket would block),
/// then `extra` more; returns the last seq.
async fn publish_until_backlogged(gw: &Gateway, channel: &str, extra: u64) -> u64 {
    let data = format!(r#""{}""#, "x".repeat(4 * 1024));
    let mut admin = gw.admin().await;
    let mut seq = 0;
    while gw.metric(BACKLOGGED).await < 1.0 {
        for _ in 0..32 {
            seq = admin.publish_ok(channel, &data).await.seq;
        }
        assert!(seq < 20_000, "no backlog after {seq} messages of 4 KiB");
    }
    for _ in 0..extra {
        seq = admin.publish_ok(channel, &data).await.seq;
    }
    seq
}

#[tokio::test]
async fn a_reader_that_stalls_gets_every_message_in_order_once_it_reads_again() {
    // A backlog far above what the test sends: no 4030 here.
    let gw = Gateway::start(&["--max-queue-bytes", "268435456"]);
    let news = channel("news");
    let (mut client, _) = gw.connect_hello().await;
    let start = client.subscribe(&news).await.seq;

    // The client reads nothing while the socket fills and the backlog grows.
    let last = publish_until_backlogged(&gw, &news, 64).await;
    assert!(gw.metric("bgw_backlog_bytes").await > 0.0);

    // It reads again: every message once, in order, across the direct writes, the backlog
    // and back.
    client.recv_run(&news, start, last - start).await;
    gw.wait_metric_until(BACKLOGGED, |n| n == 0.0, "the backlog written out")
        .await;
    assert_eq!(gw.metric("bgw_backlog_bytes").await, 0.0);

    // Written straight to the socket again.
    let next = gw.publish_ok(&news, r#"{"after":"backlog"}"#).await.seq;
    assert_eq!(client.recv_message().await.seq, next);
    assert_eq!(next, last + 1);

    // Each message's time through the node was observed.
    let observed = gw.metric("bgw_delivery_delay_seconds_count").await;
    assert!(observed >= (next - start) as f64, "{observed}");
}

#[tokio::test]
async fn a_drain_sends_what_waits_in_a_backlog_before_its_1001() {
    let mut gw = Gateway::start(&[
        "--max-queue-bytes",
        "268435456",
        "--drain-delay",
        "0s",
        "--drain-window",
        "0s",
        "--drain-timeout",
        "30s",
    ]);
    let news = channel("news");
    let (mut client, _) = gw.connect_hello().await;
    let start = client.subscribe(&news).await.seq;
    let last = publish_until_backlogged(&gw, &news, 16).await;

    gw.terminate();
    // Everything published, in order, then the close.
    client.recv_run(&news, start, last - start).await;
    let (code, reason) = client.expect_close().await;
    assert_eq!(code, 1001, "{reason}");
    assert!(gw.wait_exit(Duration::from_secs(30)).await.success());
}
