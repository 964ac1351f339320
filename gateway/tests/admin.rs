//! The admin listener (health, readiness, metrics, stats, the publish API) and the CLI
//! subcommands that use it (`gateway publish`, `gateway health`).

mod common;

use std::process::Output;

use common::{channel, cli, metric_value, publish_body, Gateway};
use serde_json::Value;

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn healthz_and_readyz() {
    let gw = Gateway::start(&[]);
    let (status, body) = gw.get("/healthz").await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = gw.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let ready = json(&body);
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["node"], gw.node.as_str());
    assert_eq!(ready["connections"], 0);

    let (_client, _) = gw.connect_hello().await;
    let (status, body) = gw.get("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["connections"], 1, "{body}");
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let gw = Gateway::start(&[]);
    let news = channel("news");
    let (mut client, _) = gw.connect_hello().await;
    client.subscribe(&news).await;
    gw.publish_ok(&news, "1").await;
    client.recv_message().await;
    // A shard counts its deliveries once its run of writes is over, which may be after the
    // client read the message.
    gw.wait_metric("bgw_deliveries_total", 1.0).await;

    let mut admin = gw.admin().await;
    let (status, metrics) = admin.get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "bgw_connections",
        "bgw_subscriptions",
        "bgw_frames_in_total",
        "bgw_frames_out_total",
        "bgw_deliveries_total",
        "bgw_published_total",
        "bgw_publish_duration_seconds",
        "bgw_repairs_total",
        "bgw_sessions_resumed_total",
        "bgw_sessions_taken_over_total",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{metrics}"
        );
    }
    assert_eq!(metric_value(&metrics, "bgw_connections"), 1.0);
    assert_eq!(metric_value(&metrics, "bgw_subscriptions"), 1.0);
    assert_eq!(metric_value(&metrics, "bgw_published_total"), 1.0);
    assert_eq!(metric_value(&metrics, "bgw_deliveries_total"), 1.0);
    assert_eq!(
        metric_value(&metrics, "bgw_publish_duration_seconds_count"),
        1.0
    );
    // hello, subscribe
    assert!(metric_value(&metrics, "bgw_frames_in_total") >= 2.0);
    // welcome, subscribed, message
    assert!(metric_value(&metrics, "bgw_frames_out_total") >= 3.0);
}

/// What an operator's dashboard and alerts read is there from the first scrape: the process
/// metrics, the build, the broker's state, the connection limit, and every labelled counter
/// at 0; handshakes and refusals count; a client that leaves without a close frame is no
/// server close.
#[tokio::test]
async fn operator_metrics_are_there_from_the_first_scrape() {
    let gw = Gateway::start(&["--max-connections", "7"]);
    let metrics = gw.metrics().await;
    assert_eq!(metric_value(&metrics, "bgw_max_connections"), 7.0);
    assert_eq!(metric_value(&metrics, "bgw_broker_up"), 1.0);
    assert_eq!(metric_value(&metrics, "bgw_draining"), 0.0);
    let build = metrics
        .lines()
        .find(|l| l.starts_with("bgw_build_info{"))
        .unwrap_or_else(|| panic!("no bgw_build_info:\n{metrics}"));
    assert!(build.contains(r#"version="0.1.0""#), "{build}");
    for series in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(metric_value(&metrics, series) > 0.0, "{series}:\n{metrics}");
    }
    for series in [
        r#"bgw_closes_total{code="4030"}"#,
        r#"bgw_closes_total{code="1001"}"#,
        r#"bgw_drops_total{reason="unrecoverable_gap"}"#,
        r#"bgw_handshake_rejections_total{reason="capacity"}"#,
        r#"bgw_limit_hits_total{limit="rate"}"#,
        "bgw_publish_errors_total",
    ] {
        assert!(
            metrics.lines().any(|l| l == format!("{series} 0")),
            "{series} does not start at 0:\n{metrics}"
        );
    }

    let (mut client, _) = gw.connect_hello().await;
    client.subscribe(&channel("news")).await;
    let (status, _) = common::http_raw(
        gw.client_addr,
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    let metrics = gw.metrics().await;
    assert_eq!(metric_value(&metrics, "bgw_handshakes_total"), 1.0);
    assert_eq!(metric_value(&metrics, "bgw_channels"), 1.0);
    assert_eq!(
        metric_value(
            &metrics,
            r#"bgw_handshake_rejections_total{reason="bad_request"}"#
        ),
        1.0
    );

    drop(client);
    gw.wait_metric_until("bgw_connections", |v| v == 0.0, "0")
        .await;
    let metrics = gw.metrics().await;
    let closes: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("bgw_closes_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(closes.is_empty(), "{closes:?}");
    assert_eq!(metric_value(&metrics, "bgw_channels"), 0.0);
}

#[tokio::test]
async fn stats_count_connections_channels_and_messages() {
    let gw = Gateway::start(&[]);
    let (a, b) = (channel("a"), channel("b"));
    let (mut client, _) = gw.connect_hello().await;
    client.subscribe(&a).await;
    client.subscribe(&b).await;
    gw.publish_ok(&a, "1").await;
    client.recv_message().await;

    let (status, body) = gw.get("/v1/stats").await;
    assert_eq!(status, 200, "{body}");
    let stats = json(&body);
    assert_eq!(stats["node"], gw.node.as_str());
    assert_eq!(stats["connections"], 1, "{body}");
    assert_eq!(stats["channels"], 2, "{body}");
    assert!(stats["messages_in"].as_u64().unwrap() >= 3, "{body}");
    assert!(stats["messages_out"].as_u64().unwrap() >= 4, "{body}");
}

#[tokio::test]
async fn publish_answers_seq_and_epoch() {
    let gw = Gateway::start(&[]);
    let news = channel("news");
    let mut admin = gw.admin().await;
    let (status, body) = admin.publish(&news, r#"{"x": 1}"#).await;
    assert_eq!(status, 200, "{body}");
    let first = json(&body);
    assert_eq!(first["channel"], news.as_str());
    assert_eq!(first["seq"], 1);
    let epoch = first["epoch"].as_str().expect("epoch").to_owned();
    assert!(!epoch.is_empty());
    let second = admin.publish_ok(&news, "null").await;
    assert_eq!((second.seq, second.epoch.as_str()), (2, epoch.as_str()));
    // Another channel has its own sequence.
    assert_eq!(admin.publish_ok(&channel("other"), "[]").await.seq, 1);
}

#[tokio::test]
async fn publish_refuses_bad_requests_with_400() {
    let gw = Gateway::start(&[]);
    let mut admin = gw.admin().await;
    let long = "a".repeat(129);
    for body in [
        "{".to_owned(),
        "not json".to_owned(),
        "[1]".to_owned(),
        r#"{"channel":"news"}"#.to_owned(),
        r#"{"data":1}"#.to_owned(),
        r#"{"channel":7,"data":1}"#.to_owned(),
        r#"{"channel":"news","data":}"#.to_owned(),
        publish_body("a b", "1"),
        publish_body("", "1"),
        publish_body(&long, "1"),
        publish_body("né", "1"),
        String::new(),
    ] {
        let (status, answer) = admin
            .request("POST", "/v1/publish", &[], body.as_bytes())
            .await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(json(&answer)["error"].is_string(), "{answer}");
    }
    // Nothing was published.
    assert_eq!(admin.publish_ok("news", "1").await.seq, 1);
}

#[tokio::test]
async fn publish_above_the_size_limit_is_413() {
    let gw = Gateway::start(&["--max-publish-bytes", "100"]);
    let news = channel("news");
    let (status, _) = gw.publish(&news, r#""small""#).await;
    assert_eq!(status, 200);
    let big = format!(r#""{}""#, "x".repeat(200));
    let (status, body) = gw.publish(&news, &big).await;
    assert_eq!(status, 413, "{body}");
    gw.wait_metric(r#"bgw_limit_hits_total{limit="publish_size"}"#, 1.0)
        .await;
    // It was not published.
    assert_eq!(gw.publish_ok(&news, "2").await.seq, 2);
}

#[tokio::test]
async fn an_api_key_guards_publishing() {
    let gw = Gateway::start(&["--api-key", "k3y-Secret"]);
    let news = channel("news");
    let body = publish_body(&news, "1");
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", "Bearer k3y-Secre")],
        vec![("authorization", "k3y-Secret")],
        vec![("authorization", "Basic k3y-Secret")],
    ] {
        let (status, answer) = gw
            .admin()
            .await
            .request("POST", "/v1/publish", &headers, body.as_bytes())
            .await;
        assert_eq!(status, 401, "{headers:?}: {answer}");
    }
    let (status, answer) = gw
        .admin()
        .await
        .request(
            "POST",
            "/v1/publish",
            &[("authorization", "Bearer k3y-Secret")],
            body.as_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        json(&answer)["seq"],
        1,
        "the refused ones were not published"
    );
    // Probes need no key.
    assert_eq!(gw.get("/healthz").await.0, 200);
    assert_eq!(gw.get("/readyz").await.0, 200);
}

#[tokio::test]
async fn unknown_paths_404_and_wrong_methods_405() {
    let gw = Gateway::start(&[]);
    let mut admin = gw.admin().await;
    for path in ["/", "/nope", "/v1", "/v1/publish/x", "/ws"] {
        assert_eq!(admin.get(path).await.0, 404, "{path}");
    }
    for (method, path) in [
        ("GET", "/v1/publish"),
        ("PUT", "/v1/publish"),
        ("POST", "/healthz"),
        ("POST", "/readyz"),
        ("DELETE", "/metrics"),
        ("POST", "/v1/stats"),
    ] {
        let (status, _) = admin.request(method, path, &[], b"").await;
        assert_eq!(status, 405, "{method} {path}");
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn cli_publish_delivers_the_bytes_given() {
    let gw = Gateway::start(&[]);
    let url = format!("http://{}", gw.admin_addr);
    let news = channel("news");
    let (mut client, _) = gw.connect_hello().await;
    client.subscribe(&news).await;

    let data = r#"{"b": 1, "a": [ 2, 3 ]}"#;
    let output = cli(&["publish", "--admin-url", &url, &news, data], &[], None).await;
    assert!(output.status.success(), "{output:?}");
    let answer = json(stdout(&output).trim());
    assert_eq!(answer["seq"], 1);
    let message = client.recv_message().await;
    assert_eq!(message.data, data, "the CLI must not rewrite the message");

    // From standard input, with the admin URL from the environment.
    let output = cli(
        &["publish", &news],
        &[("BGW_ADMIN_URL", &url)],
        Some("  [1, 2]\n"),
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let message = client.recv_message().await;
    assert_eq!((message.seq, message.data.as_str()), (2, "[1, 2]"));

    // Not JSON: refused before anything is sent.
    let output = cli(&["publish", "--admin-url", &url, &news, "{oops"], &[], None).await;
    assert!(!output.status.success(), "{output:?}");
    // A bad channel: the node's 400, and a failure.
    let output = cli(&["publish", "--admin-url", &url, "a b", "1"], &[], None).await;
    assert!(!output.status.success(), "{output:?}");
    assert!(stdout(&output).contains("error"), "{output:?}");
    assert_eq!(gw.publish_ok(&news, "3").await.seq, 3);
}

#[tokio::test]
async fn cli_publish_with_an_api_key() {
    let gw = Gateway::start(&["--api-key", "k3y"]);
    let url = format!("http://{}", gw.admin_addr);
    let news = channel("news");
    let output = cli(&["publish", "--admin-url", &url, &news, "1"], &[], None).await;
    assert!(!output.status.success(), "no key: {output:?}");
    let output = cli(
        &[
            "publish",
            "--admin-url",
            &url,
            "--api-key",
            "nope",
            &news,
            "1",
        ],
        &[],
        None,
    )
    .await;
    assert!(!output.status.success(), "wrong key: {output:?}");
    let output = cli(
        &[
            "publish",
            "--admin-url",
            &url,
            "--api-key",
            "k3y",
            &news,
            "1",
        ],
        &[],
        None,
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let output = cli(
        &["publish", "--admin-url", &url, &news, "2"],
        &[("BGW_API_KEY", "k3y")],
        None,
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(json(stdout(&output).trim())["seq"], 2);
}

#[tokio::test]
async fn cli_health() {
    let gw = Gateway::start(&["--drain-delay", "5s"]);
    let url = format!("http://{}", gw.admin_addr);
    let output = cli(&["health", "--admin-url", &url], &[], None).await;
    assert!(output.status.success(), "{output:?}");
    assert_eq!(json(stdout(&output).trim())["status"], "ready");

    // Nothing listens on a port that was just freed.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let closed = format!("http://127.0.0.1:{port}");
    let output = cli(&["health", "--admin-url", &closed], &[], None).await;
    assert!(!output.status.success(), "{output:?}");
    assert!(!output.stderr.is_empty(), "says why: {output:?}");

    // A draining node is not healthy for a load balancer.
    gw.terminate();
    gw.wait_metric("bgw_draining", 1.0).await;
    let output = cli(&["health", "--admin-url", &url], &[], None).await;
    assert!(!output.status.success(), "{output:?}");
    assert_eq!(json(stdout(&output).trim())["status"], "draining");
}
