//! Starting a node: without its Redis (it starts unready and becomes ready when Redis answers),
//! and the start-up errors, each naming what failed and the flag to change.

mod common;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, refusal_status, Gateway, RedisServer, DEADLINE};
use serde_json::Value;

/// The password of the Redis of these tests: it must never show in a log.
const PASSWORD: &str = "s3cret-redis-pass";

/// A node whose Redis is not there yet: it listens, is alive but not ready, refuses handshakes
/// and publishes with 503, logs the address it tries and why it fails, and once Redis answers
/// it is ready and carries messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_without_redis_and_becomes_ready_when_redis_answers() {
    let port = free_port();
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{port}");
    let node = Gateway::start(&["--redis-url", &url, "--node-id", "early"]);

    assert_eq!(node.get("/healthz").await.0, 200);
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "broker_unavailable");
    assert_eq!(
        refusal_status(node.try_connect(node.request("")).await),
        503
    );
    assert_eq!(node.publish("early", "1").await.0, 503);
    node.wait_log(&format!("redis://:***@127.0.0.1:{port}"))
        .await;
    node.wait_log("Connection refused").await;

    let redis = RedisServer::start_with(port, None, &["--requirepass", PASSWORD]);
    node.wait_ready(200).await;
    let (mut client, _) = node.connect_hello().await;
    client.subscribe("early").await;
    let published = node.publish_ok("early", r#"{"up":true}"#).await;
    let message = client.recv_message().await;
    assert_eq!(
        (message.seq, message.data.as_str()),
        (published.seq, r#"{"up":true}"#)
    );
    assert!(redis.cli(&["PING"]).is_some());
    assert!(
        !node.logs().contains(PASSWORD),
        "the password is in the logs:\n{}",
        node.logs()
    );
}

/// Runs the gateway with `args` and expects it to exit with an error: its stderr.
fn start_fails(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("BGW_LISTEN")
        .env_remove("BGW_REDIS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the gateway binary");
    let until = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "the gateway {args:?} exited 0: {stderr}");
    stderr
}

#[test]
fn an_address_in_use_names_the_address_and_the_flag() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let stderr = start_fails(&["--listen", &addr]);
    assert!(
        stderr.contains(&format!(
            "cannot listen on {addr} (--listen / BGW_LISTEN): Address already in use"
        )),
        "{stderr}"
    );

    let stderr = start_fails(&["--listen", "127.0.0.1:0", "--admin-listen", &addr]);
    assert!(
        stderr.contains(&format!(
            "cannot listen on {addr} (--admin-listen / BGW_ADMIN_LISTEN): Address already in use"
        )),
        "{stderr}"
    );
}

#[test]
fn a_bad_redis_configuration_names_the_flag_and_hides_the_password() {
    let stderr = start_fails(&[
        "--listen",
        "127.0.0.1:0",
        "--redis-url",
        "http://u:hunter2@h",
    ]);
    assert!(
        stderr.contains("--redis-url / BGW_REDIS_URL: http://u:***@h: unknown scheme"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let stderr = start_fails(&[
        "--listen",
        "127.0.0.1:0",
        "--redis-url",
        "rediss://127.0.0.1:1",
        "--redis-ca-file",
        "/nonexistent/ca.crt",
    ]);
    assert!(
        stderr.contains("cannot read --redis-ca-file /nonexistent/ca.crt: No such file"),
        "{stderr}"
    );

    let stderr = start_fails(&[
        "--listen",
        "127.0.0.1:0",
        "--redis-url",
        "redis+sentinel://127.0.0.1:1,127.0.0.1:2",
    ]);
    assert!(stderr.contains("name the master"), "{stderr}");
}
