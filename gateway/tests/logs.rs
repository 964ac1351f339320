//! What an operator reads in the node's JSON logs (`--log-format json`): the configuration as
//! fields, each connection opened and closed (who closed it, the code, how long it lived, the
//! client's address and subject), each refused handshake with its reason; never a token or a
//! secret.

mod common;

use common::{channel, claims, hs256, log_events, Gateway};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "log-test-secret-4be0c1d9";

#[tokio::test]
async fn the_json_log_tells_connections_refusals_and_configuration_apart_and_keeps_secrets() {
    let gw = Gateway::start(&["--log-format", "json", "--jwt-secret", SECRET]);
    let token = hs256(&claims("alice", &["*"], &[]), SECRET);

    // A client with a token in the query string, which subscribes, then closes.
    let mut request = format!("{}?token={token}", gw.ws_url())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "bgw.v1".parse().unwrap());
    let mut client = gw.try_connect(request).await.expect("upgrade");
    client.hello().await;
    client.subscribe(&channel("news")).await;
    client.close().await;

    // A browser of another origin is refused.
    let mut refused = gw.request("");
    refused
        .headers_mut()
        .insert("Origin", "https://elsewhere.example".parse().unwrap());
    assert!(gw.try_connect(refused).await.is_err());

    let logs = common::wait_for_logs(&gw, |logs| {
        !log_events(logs, "connection closed").is_empty()
            && !log_events(logs, "handshake refused").is_empty()
    })
    .await;

    let config = &log_events(&logs, "configuration")[0]["fields"];
    assert_eq!(config["jwt_secret_set"], true);
    assert!(config["listen"].is_string() && config["max_connections"].is_number());

    assert!(!log_events(&logs, "connection opened").is_empty());
    let closed = &log_events(&logs, "connection closed")[0]["fields"];
    assert_eq!(closed["closed_by"], "client", "{closed}");
    // The harness closes without a code: 1005, "no status received".
    assert_eq!(closed["code"], 1005, "{closed}");
    assert_eq!(closed["subject"], "alice", "{closed}");
    assert_eq!(closed["client"], "127.0.0.1", "{closed}");
    assert!(closed["lived_ms"].is_number(), "{closed}");

    let refusal = &log_events(&logs, "handshake refused")[0]["fields"];
    assert_eq!(refusal["reason"], "origin", "{refusal}");
    assert_eq!(refusal["status"], 403, "{refusal}");

    assert!(!logs.contains(SECRET), "the JWT secret is in the logs");
    assert!(!logs.contains(&token), "a token is in the logs");
}
