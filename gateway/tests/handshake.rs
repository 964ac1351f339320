//! The client listener before the upgrade: subprotocol, Origin, capacity, plain HTTP.

mod common;

use common::{http_raw, refusal_status, upgrade_head, upgrade_request, wait_for_logs, Gateway};
use tokio_tungstenite::tungstenite::http::HeaderValue;

fn with_header(
    gw: &Gateway,
    name: &'static str,
    value: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    upgrade_request(&gw.ws_url(), &[(name, value)])
}

fn protocol_of(client: &common::Client) -> Option<String> {
    client
        .response
        .headers()
        .get("sec-websocket-protocol")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn bgw_v1_is_selected_when_offered() {
    let gw = Gateway::start(&[]);
    for offered in ["bgw.v1", "chat, bgw.v1", "x.v2,bgw.v1 , y"] {
        let mut client = gw
            .try_connect(with_header(&gw, "sec-websocket-protocol", offered))
            .await
            .unwrap_or_else(|e| panic!("{offered}: {e}"));
        assert_eq!(client.response.status(), 101);
        assert_eq!(protocol_of(&client).as_deref(), Some("bgw.v1"), "{offered}");
        client.hello().await;
    }
}

#[tokio::test]
async fn no_subprotocol_when_none_or_another_is_offered() {
    let gw = Gateway::start(&[]);
    // None offered: none selected, and the client speaks version 1 all the same.
    let mut client = gw.connect().await;
    assert_eq!(protocol_of(&client), None);
    client.hello().await;
    client.ping().await;

    // Only unknown ones offered: the upgrade goes through without a subprotocol.
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: chat\r\n\r\n",
        gw.client_addr
    );
    let head = upgrade_head(gw.client_addr, &request)
        .await
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(!head.contains("sec-websocket-protocol"), "{head}");
}

#[tokio::test]
async fn without_an_allow_list_the_origin_must_be_the_host() {
    let gw = Gateway::start(&[]);
    // No Origin (not a browser): accepted.
    gw.connect().await.hello().await;
    // The Origin of the page the gateway itself serves.
    let own = format!("http://{}", gw.client_addr);
    let mut client = gw
        .try_connect(with_header(&gw, "origin", &own))
        .await
        .expect("same origin");
    client.hello().await;
    // Any other: 403 before the upgrade.
    for origin in [
        "http://evil.example.com",
        &format!("http://{}.evil", gw.client_addr),
        "null",
    ] {
        let refused = gw.try_connect(with_header(&gw, "origin", origin)).await;
        assert_eq!(refusal_status(refused), 403, "{origin}");
    }
    gw.wait_metric(r#"bgw_handshake_rejections_total{reason="origin"}"#, 3.0)
        .await;
}

#[tokio::test]
async fn the_allow_list_takes_exact_origins_and_wildcards() {
    let gw = Gateway::start(&[
        "--allowed-origins",
        "https://app.example.com,https://*.example.org",
    ]);
    for origin in [
        "https://app.example.com",
        "https://a.example.org",
        "https://a.b.example.org",
        "HTTPS://App.Example.com",
    ] {
        let mut client = gw
            .try_connect(with_header(&gw, "origin", origin))
            .await
            .unwrap_or_else(|e| panic!("{origin}: {e}"));
        client.hello().await;
    }
    for origin in [
        "https://example.org",
        "http://a.example.org",
        "https://evilexample.org",
        "https://app.example.com.evil",
        "https://other.example.com",
        &format!("http://{}", gw.client_addr),
    ] {
        let refused = gw.try_connect(with_header(&gw, "origin", origin)).await;
        assert_eq!(refusal_status(refused), 403, "{origin}");
    }
    // No Origin at all is still a non-browser client.
    gw.connect().await.hello().await;
}

#[tokio::test]
async fn a_node_at_capacity_answers_503() {
    let gw = Gateway::start(&["--max-connections", "1"]);
    let (first, _) = gw.connect_hello().await;
    assert_eq!(refusal_status(gw.try_connect(gw.request("")).await), 503);
    gw.wait_metric(r#"bgw_handshake_rejections_total{reason="capacity"}"#, 1.0)
        .await;
    // The place is free again once the first connection has ended.
    first.close().await;
    let until = tokio::time::Instant::now() + common::DEADLINE;
    loop {
        match gw.try_connect(gw.request("")).await {
            Ok(mut client) => {
                client.hello().await;
                break;
            }
            Err(e) => {
                assert_eq!(refusal_status(Err(e)), 503);
                assert!(tokio::time::Instant::now() < until, "capacity never freed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn plain_http_gets_426_and_unknown_paths_404() {
    let gw = Gateway::start(&[]);
    let get = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            gw.client_addr
        )
    };
    for path in ["/ws", "/ws?token=x"] {
        let (status, response) = http_raw(gw.client_addr, &get(path)).await;
        assert_eq!(status, 426, "{path}: {response}");
        assert!(
            response.to_ascii_lowercase().contains("upgrade: websocket"),
            "{response}"
        );
    }
    for path in ["/nope", "/ws/x", "/healthz", "/metrics"] {
        let (status, response) = http_raw(gw.client_addr, &get(path)).await;
        assert_eq!(status, 404, "{path}: {response}");
    }
    // An upgrade to another path is a 404 too.
    let upgrade = format!(
        "GET /other HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.client_addr
    );
    assert_eq!(http_raw(gw.client_addr, &upgrade).await.0, 404);
    // An upgrade without its key is a bad request.
    let broken = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        gw.client_addr
    );
    assert_eq!(http_raw(gw.client_addr, &broken).await.0, 400);
}

/// A raw upgrade request to `/ws` of `gw` in HTTP `version` (`HTTP/1.1`).
fn raw_upgrade(gw: &Gateway, version: &str) -> String {
    format!(
        "GET /ws {version}\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.client_addr
    )
}

/// Waits for a log line of `gw` that has every one of `parts`, and returns it.
async fn log_line(gw: &Gateway, parts: &[&str]) -> String {
    let has_all = |line: &&str| parts.iter().all(|part| line.contains(part));
    let logs = wait_for_logs(gw, |logs| logs.lines().any(|line| has_all(&line))).await;
    logs.lines().find(has_all).unwrap().to_owned()
}

#[tokio::test]
async fn an_http_1_0_upgrade_is_refused_with_400() {
    let gw = Gateway::start(&[]);
    let (status, response) = http_raw(gw.client_addr, &raw_upgrade(&gw, "HTTP/1.0")).await;
    assert_eq!(status, 400, "{response}");
    assert!(!response.contains("101"), "{response}");
    assert!(response.contains("HTTP/1.1 or later"), "{response}");
    // In HTTP/1.1, the same request upgrades.
    let head = upgrade_head(gw.client_addr, &raw_upgrade(&gw, "HTTP/1.1")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    gw.wait_metric(
        r#"bgw_handshake_rejections_total{reason="http_version"}"#,
        1.0,
    )
    .await;
}

#[tokio::test]
async fn every_refused_handshake_is_logged_at_info_with_its_reason() {
    let gw = Gateway::start(&["--max-connections", "1"]);
    let evil = "http://evil.example:8080";
    let refused = gw.try_connect(with_header(&gw, "origin", evil)).await;
    assert_eq!(refusal_status(refused), 403);
    let line = log_line(&gw, &["handshake refused", "reason=\"origin\""]).await;
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains(evil), "the origin it compared: {line}");
    assert!(
        line.contains(&format!("host=\"{}\"", gw.client_addr)),
        "{line}"
    );
    assert!(
        line.contains("not the host the request was sent to"),
        "{line}"
    );

    let (status, _) = http_raw(gw.client_addr, &raw_upgrade(&gw, "HTTP/1.0")).await;
    assert_eq!(status, 400);
    log_line(
        &gw,
        &[" INFO ", "handshake refused", "reason=\"http_version\""],
    )
    .await;

    let no_key = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        gw.client_addr
    );
    assert_eq!(http_raw(gw.client_addr, &no_key).await.0, 400);
    log_line(
        &gw,
        &[" INFO ", "handshake refused", "reason=\"bad_request\""],
    )
    .await;

    // A proxy that drops the Upgrade header leaves the key: the log says what happened.
    let no_upgrade = format!(
        "GET /ws?token=SECRET-IN-QUERY HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.client_addr
    );
    assert_eq!(http_raw(gw.client_addr, &no_upgrade).await.0, 426);
    log_line(&gw, &[" INFO ", "handshake refused", "Upgrade: websocket"]).await;

    let (_first, _) = gw.connect_hello().await;
    assert_eq!(refusal_status(gw.try_connect(gw.request("")).await), 503);
    log_line(&gw, &[" INFO ", "handshake refused", "reason=\"capacity\""]).await;
    // Never the query string: tokens travel there.
    assert!(!gw.logs().contains("SECRET-IN-QUERY"), "{}", gw.logs());
}

#[tokio::test]
async fn x_forwarded_host_is_believed_from_trusted_proxies_only() {
    // What a proxy that rewrites Host sends: the browser's host in X-Forwarded-Host.
    let proxied = |gw: &Gateway| {
        let mut request = gw.request("");
        let headers = request.headers_mut();
        headers.insert("host", HeaderValue::from_static("10.0.0.5:8080"));
        headers.insert(
            "x-forwarded-host",
            HeaderValue::from_static("chat.example.com"),
        );
        headers.insert(
            "origin",
            HeaderValue::from_static("https://chat.example.com"),
        );
        request
    };
    let trusting = Gateway::start(&["--trusted-proxies", "127.0.0.1"]);
    let mut client = trusting
        .try_connect(proxied(&trusting))
        .await
        .expect("the proxy's X-Forwarded-Host is the browser's host");
    client.hello().await;
    let other = Gateway::start(&["--trusted-proxies", "10.0.0.0/8"]);
    assert_eq!(
        refusal_status(other.try_connect(proxied(&other)).await),
        403
    );
}

#[tokio::test]
async fn a_missing_port_is_the_default_port_of_the_origins_scheme() {
    let gw = Gateway::start(&[]);
    let with = |host: &'static str, origin: &'static str| {
        let mut request = gw.request("");
        request
            .headers_mut()
            .insert("host", HeaderValue::from_static(host));
        request
            .headers_mut()
            .insert("origin", HeaderValue::from_static(origin));
        request
    };
    for (host, origin) in [
        ("gw.example", "http://gw.example"),
        ("gw.example:80", "http://gw.example"),
        ("gw.example", "https://gw.example"),
        ("GW.example:8080", "http://gw.EXAMPLE:8080"),
    ] {
        let mut client = gw
            .try_connect(with(host, origin))
            .await
            .unwrap_or_else(|e| panic!("{host} {origin}: {e}"));
        client.hello().await;
    }
    for (host, origin) in [
        ("gw.example", "http://gw.example:8080"),
        ("gw.example:8080", "http://gw.example"),
        ("gw.example:443", "http://gw.example"),
    ] {
        let refused = gw.try_connect(with(host, origin)).await;
        assert_eq!(refusal_status(refused), 403, "{host} {origin}");
    }
}
