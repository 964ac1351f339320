//! Redis over TLS (`rediss://`, `rediss+cluster://`), against real `redis-server`s that serve
//! TLS only, check client certificates, and use certificates made for the test.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{free_port, Certs, Gateway, RedisCluster, RedisServer, Sentinels};

fn node(url: &str, certs: &Certs, id: &str) -> Gateway {
    let mut flags = vec!["--redis-url".to_owned(), url.to_owned()];
    flags.extend(certs.gateway_flags());
    flags.extend(["--node-id".to_owned(), id.to_owned()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Gateway::start(&flags)
}

/// Two nodes on the same TLS Redis: a message published through one reaches a subscriber of
/// the other, and a client resumes its session across them.
async fn two_nodes_over_tls(url: &str, certs: &Arc<Certs>) {
    let a = node(url, certs, "tls-a");
    let b = node(url, certs, "tls-b");
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    let (mut client, welcome) = a.connect_hello().await;
    client.subscribe("secure").await;
    for n in 1..=20 {
        let published = b.publish_ok("secure", &n.to_string()).await;
        assert_eq!(published.seq, n);
    }
    for n in 1..=20u64 {
        let message = client.recv_message().await;
        assert_eq!((message.seq, message.data), (n, n.to_string()));
    }
    client.close().await;
    let mut client = b.connect().await;
    client
        .send_hello(None, Some(&welcome.session), BTreeMap::new())
        .await;
    assert!(client.recv_welcome().await.resumed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_ca_file_and_a_client_certificate() {
    let certs = Certs::generate();
    let redis = RedisServer::start_with(free_port(), Some(certs.clone()), &[]);
    assert!(redis.url().starts_with("rediss://"));
    two_nodes_over_tls(&redis.url(), &certs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_cluster_with_a_ca_file_and_a_client_certificate() {
    let certs = Certs::generate();
    let cluster = RedisCluster::start_with(Some(certs.clone()));
    assert!(cluster.url().starts_with("rediss+cluster://"));
    two_nodes_over_tls(&cluster.url(), &certs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_sentinel_with_a_ca_file_and_a_client_certificate() {
    let certs = Certs::generate();
    let set = Sentinels::start_with(Some(certs.clone()));
    assert!(set.url().starts_with("rediss+sentinel://"));
    two_nodes_over_tls(&set.url(), &certs).await;
}

/// TLS is checked: without the test's CA (the system's roots do not know it), and without the
/// client certificate the server asks for, the node stays unready and logs why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_or_a_missing_client_certificate_is_refused() {
    let certs = Certs::generate();
    let redis = RedisServer::start_with(free_port(), Some(certs.clone()), &[]);

    let untrusted = Gateway::start(&["--redis-url", &redis.url()]);
    let ca = certs.path("ca.crt").display().to_string();
    let anonymous = Gateway::start(&["--redis-url", &redis.url(), "--redis-ca-file", &ca]);
    for node in [&untrusted, &anonymous] {
        node.wait_log("cannot connect").await;
        assert!(node.logs().contains(&redis.url()), "{}", node.logs());
        assert_eq!(node.get("/readyz").await.0, 503);
    }
    assert!(
        untrusted.logs().contains("UnknownIssuer"),
        "{}",
        untrusted.logs()
    );
}
