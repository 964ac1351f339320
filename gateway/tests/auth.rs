//! Authentication and authorisation: JWTs from hello, query or cookie, verified with an HS256
//! secret or an RS256/ES256 public key; the rights they give; expiry and refresh.

mod common;

use common::{claims, es256, hs256, key_path, now, rs256, unsigned, Client, Gateway, SECRET};
use serde_json::json;
use shared::ServerFrame;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

fn hs256_node() -> Gateway {
    Gateway::start(&["--jwt-secret", SECRET])
}

/// The token of `sub`, allowed to subscribe to `news` only.
fn news_reader(sub: &str) -> String {
    hs256(&claims(sub, &["news"], &[]), SECRET)
}

/// The next frame must be the close 4001: no welcome before it.
async fn expect_refused(client: &mut Client, what: &str) {
    match client.next_message().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(u16::from(frame.code), 4001, "{what}: {frame}");
            assert!(!frame.reason.is_empty());
        }
        other => panic!("{what}: expected close 4001, got {other:?}"),
    }
}

/// A `hello` with each token (or none) of `cases` is closed with 4001.
async fn refused_tokens(gw: &Gateway, cases: Vec<(&str, Option<String>)>) {
    for (what, token) in cases {
        let mut client = gw.connect().await;
        client
            .send_hello(token.as_deref(), None, Default::default())
            .await;
        expect_refused(&mut client, what).await;
    }
}

/// Whether the connection's identity may subscribe to `channel`: `subscribed`, or error 403.
async fn may_subscribe(client: &mut Client, channel: &str) -> bool {
    client
        .send_text(&format!(
            r#"{{"type":"subscribe","id":1,"channel":"{channel}"}}"#
        ))
        .await;
    match client.recv().await {
        ServerFrame::Subscribed { .. } => true,
        ServerFrame::Error { code: 403, .. } => false,
        other => panic!("{channel}: {other:?}"),
    }
}

#[tokio::test]
async fn an_hs256_token_in_hello() {
    let gw = hs256_node();
    let mut client = gw.connect().await;
    let welcome = client.hello_token(&news_reader("alice")).await;
    assert!(!welcome.resumed);
    assert!(may_subscribe(&mut client, "news").await);
    assert!(!may_subscribe(&mut client, "sports").await);
}

#[tokio::test]
async fn a_token_in_the_query_or_the_cookie() {
    let gw = Gateway::start(&["--jwt-secret", SECRET, "--token-cookie", "my_token"]);
    let token = news_reader("alice");

    let mut client = gw
        .try_connect(gw.request(&format!("a=1&token={token}")))
        .await
        .expect("upgrade");
    client.hello().await;
    assert!(may_subscribe(&mut client, "news").await);
    assert!(!may_subscribe(&mut client, "other").await);

    let mut request = gw.request("");
    request.headers_mut().insert(
        "cookie",
        HeaderValue::from_str(&format!("a=b; my_token={token}; c=d")).unwrap(),
    );
    let mut client = gw.try_connect(request).await.expect("upgrade");
    client.hello().await;
    assert!(may_subscribe(&mut client, "news").await);

    // The default cookie name is not read when another is configured.
    let mut request = gw.request("");
    request.headers_mut().insert(
        "cookie",
        HeaderValue::from_str(&format!("bgw_token={token}")).unwrap(),
    );
    let mut client = gw.try_connect(request).await.expect("upgrade");
    client.send_text(r#"{"type":"hello"}"#).await;
    expect_refused(&mut client, "cookie of another name").await;
}

#[tokio::test]
async fn the_default_cookie_is_bgw_token() {
    let gw = hs256_node();
    let mut request = gw.request("");
    request.headers_mut().insert(
        "cookie",
        HeaderValue::from_str(&format!("bgw_token={}", news_reader("alice"))).unwrap(),
    );
    let mut client = gw.try_connect(request).await.expect("upgrade");
    client.hello().await;
    assert!(may_subscribe(&mut client, "news").await);
}

#[tokio::test]
async fn the_hello_token_wins_over_the_upgrade_token() {
    let gw = hs256_node();
    let good = news_reader("alice");
    // A bad token in the query, a good one in hello: welcome.
    let mut client = gw
        .try_connect(gw.request("token=garbage"))
        .await
        .expect("upgrade");
    client.hello_token(&good).await;

    // A good token in the query, a bad one in hello: refused.
    let mut client = gw
        .try_connect(gw.request(&format!("token={good}")))
        .await
        .expect("upgrade");
    client
        .send_text(r#"{"type":"hello","token":"garbage"}"#)
        .await;
    expect_refused(&mut client, "bad hello token").await;
}

#[tokio::test]
async fn bad_tokens_close_4001() {
    let gw = hs256_node();
    let valid = claims("alice", &["*"], &[]);
    let mut expired = valid.clone();
    expired["exp"] = json!(now() - 60);
    let no_sub = json!({"exp": now() + 3600, "channels": ["*"]});
    let cases = vec![
        ("no token", None),
        ("garbage", Some("garbage".to_owned())),
        ("bad signature", Some(hs256(&valid, "another-secret"))),
        ("expired", Some(hs256(&expired, SECRET))),
        ("alg none", Some(unsigned(&valid))),
        ("no sub", Some(hs256(&no_sub, SECRET))),
        ("RS256 where HS256 is configured", Some(rs256(&valid))),
        ("ES256 where HS256 is configured", Some(es256(&valid))),
    ];
    refused_tokens(&gw, cases).await;
    gw.wait_metric(r#"bgw_closes_total{code="4001"}"#, 8.0)
        .await;
}

#[tokio::test]
async fn an_rs256_public_key() {
    let rsa = key_path("rsa_public.pem");
    let gw = Gateway::start(&["--jwt-public-key", &rsa]);
    let valid = claims("alice", &["news"], &[]);
    let mut client = gw.connect().await;
    client.hello_token(&rs256(&valid)).await;
    assert!(may_subscribe(&mut client, "news").await);

    // Algorithm confusion: the public key used as an HS256 secret.
    let pem = std::fs::read_to_string(&rsa).unwrap();
    let mut expired = valid.clone();
    expired["exp"] = json!(now() - 60);
    let cases = vec![
        (
            "HS256 signed with the public key",
            Some(hs256(&valid, &pem)),
        ),
        ("ES256", Some(es256(&valid))),
        ("alg none", Some(unsigned(&valid))),
        ("expired", Some(rs256(&expired))),
    ];
    refused_tokens(&gw, cases).await;
}

#[tokio::test]
async fn an_es256_public_key() {
    let ec = key_path("ec_public.pem");
    let gw = Gateway::start(&["--jwt-public-key", &ec]);
    let valid = claims("alice", &["news"], &[]);
    let mut client = gw.connect().await;
    client.hello_token(&es256(&valid)).await;
    assert!(may_subscribe(&mut client, "news").await);

    let pem = std::fs::read_to_string(&ec).unwrap();
    let cases = vec![
        (
            "HS256 signed with the public key",
            Some(hs256(&valid, &pem)),
        ),
        ("RS256", Some(rs256(&valid))),
        ("alg none", Some(unsigned(&valid))),
    ];
    refused_tokens(&gw, cases).await;
}

#[tokio::test]
async fn channel_patterns_limit_subscriptions() {
    let gw = hs256_node();
    let token = hs256(&claims("u42", &["news", "user.42.*"], &[]), SECRET);
    let mut client = gw.connect().await;
    client.hello_token(&token).await;
    for (channel, allowed) in [
        ("news", true),
        ("user.42.inbox", true),
        ("user.42.a/b:c", true),
        ("news2", false),
        ("user.42", false),
        ("user.43.inbox", false),
        ("user.4", false),
    ] {
        assert_eq!(
            may_subscribe(&mut client, channel).await,
            allowed,
            "{channel}"
        );
    }

    // `*` alone: every channel.
    let mut client = gw.connect().await;
    client
        .hello_token(&hs256(&claims("root", &["*"], &[]), SECRET))
        .await;
    assert!(may_subscribe(&mut client, "anything.at:all").await);

    // No `channels` claim: nothing.
    let mut client = gw.connect().await;
    client
        .hello_token(&hs256(&json!({"sub": "nobody"}), SECRET))
        .await;
    assert!(!may_subscribe(&mut client, "news").await);
}

/// Whether the connection may publish to `channel`: `published`, or error 403.
async fn may_publish(client: &mut Client, channel: &str) -> bool {
    client
        .send_text(&format!(
            r#"{{"type":"publish","id":1,"channel":"{channel}","data":1}}"#
        ))
        .await;
    match client.recv().await {
        ServerFrame::Published { .. } => true,
        ServerFrame::Error { code: 403, .. } => false,
        other => panic!("{channel}: {other:?}"),
    }
}

/// PROTOCOL.md: with a key configured, a token's `publish` claim alone decides where its holder
/// may publish; `--client-publish` (for anonymous clients) changes nothing either way.
#[tokio::test]
async fn the_publish_claim_alone_decides_where_a_token_may_publish() {
    let token = hs256(&claims("u42", &["*"], &["user.42.*", "chat"]), SECRET);
    let no_claim = hs256(&claims("u43", &["*"], &[]), SECRET);
    for flags in [
        &["--jwt-secret", SECRET][..],
        &["--jwt-secret", SECRET, "--client-publish"][..],
    ] {
        let gw = Gateway::start(flags);
        let mut client = gw.connect().await;
        client.hello_token(&token).await;
        for (channel, allowed) in [
            ("user.42.out", true),
            ("chat", true),
            ("chat2", false),
            ("news", false),
            ("user.43.out", false),
        ] {
            assert_eq!(
                may_publish(&mut client, channel).await,
                allowed,
                "{channel} with {flags:?}"
            );
        }
        let mut client = gw.connect().await;
        client.hello_token(&no_claim).await;
        assert!(
            !may_publish(&mut client, "chat").await,
            "a token without the claim may not publish, with {flags:?}"
        );
    }
}

#[tokio::test]
async fn a_token_that_expires_during_the_connection_closes_it_4001() {
    let gw = hs256_node();
    let mut token = claims("alice", &["*"], &[]);
    token["exp"] = json!(now() + 3);
    let mut client = gw.connect().await;
    client.hello_token(&hs256(&token, SECRET)).await;
    client.ping().await;
    let (code, reason) = client.expect_close().await;
    assert_eq!(code, 4001);
    assert!(reason.contains("expired"), "{reason}");
}

#[tokio::test]
async fn a_refresh_before_expiry_keeps_the_connection() {
    let gw = hs256_node();
    let mut short = claims("alice", &["*"], &[]);
    let first_exp = now() + 3;
    short["exp"] = json!(first_exp);
    let mut client = gw.connect().await;
    client.hello_token(&hs256(&short, SECRET)).await;

    let longer = claims("alice", &["*"], &[]);
    let expires = longer["exp"].as_u64().unwrap();
    client
        .send_text(&format!(
            r#"{{"type":"refresh","id":"r","token":"{}"}}"#,
            hs256(&longer, SECRET)
        ))
        .await;
    match client.recv().await {
        ServerFrame::Refreshed { id, expires: got } => {
            assert_eq!(id.unwrap().get(), r#""r""#);
            assert_eq!(got, Some(expires));
        }
        other => panic!("expected refreshed, got {other:?}"),
    }
    // Past the first token's expiry, the connection is still served.
    while now() <= first_exp + 1 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    client.ping().await;
    assert_eq!(gw.metric(r#"bgw_closes_total{code="4001"}"#).await, 0.0);
}

#[tokio::test]
async fn refused_refreshes_are_errors_not_closes() {
    let gw = hs256_node();
    let mut client = gw.connect().await;
    client.hello_token(&news_reader("alice")).await;
    let mut expired = claims("alice", &["*"], &[]);
    expired["exp"] = json!(now() - 60);
    for (what, token, code) in [
        ("garbage", "garbage".to_owned(), 401),
        ("bad signature", hs256(&claims("alice", &[], &[]), "x"), 401),
        ("expired", hs256(&expired, SECRET), 401),
        ("alg none", unsigned(&claims("alice", &[], &[])), 401),
        ("another subject", news_reader("mallory"), 403),
    ] {
        client
            .send_text(&format!(r#"{{"type":"refresh","id":7,"token":"{token}"}}"#))
            .await;
        let error = client.recv_error().await;
        assert_eq!(
            (error.code, error.id.as_deref()),
            (code, Some("7")),
            "{what}"
        );
    }
    // The first token still holds.
    client.ping().await;
    assert!(may_subscribe(&mut client, "news").await);
}

#[tokio::test]
async fn a_refresh_replaces_the_rights() {
    let gw = hs256_node();
    let mut client = gw.connect().await;
    client.hello_token(&news_reader("alice")).await;
    assert!(!may_subscribe(&mut client, "sports").await);
    let wider = json!({"sub": "alice", "channels": ["news", "sports"]});
    client
        .send_text(&format!(
            r#"{{"type":"refresh","token":"{}"}}"#,
            hs256(&wider, SECRET)
        ))
        .await;
    // A token without exp never expires.
    assert!(matches!(
        client.recv().await,
        ServerFrame::Refreshed {
            id: None,
            expires: None
        }
    ));
    assert!(may_subscribe(&mut client, "sports").await);
}

#[tokio::test]
async fn without_a_key_clients_are_anonymous() {
    let gw = Gateway::start(&[]);
    // A token is ignored, whatever it is.
    let mut client = gw.connect().await;
    client.hello_token("garbage").await;
    assert!(may_subscribe(&mut client, "any.channel").await);
    client
        .send_text(r#"{"type":"refresh","id":1,"token":"whatever"}"#)
        .await;
    match client.recv().await {
        ServerFrame::Refreshed { id, expires } => {
            assert_eq!(id.unwrap().get(), "1");
            assert_eq!(expires, None);
        }
        other => panic!("expected refreshed, got {other:?}"),
    }
}
