//! A short run of every scenario against real nodes: small numbers, seconds, and nothing lost.
//! These check the tool and the gateway's guarantees; they never assert a speed.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, gateway_binary, wait_for, RedisServer};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(20);

/// A gateway process on free loopback ports, killed by its pid when dropped.
struct Node {
    child: Child,
    client: u16,
    admin: u16,
}

impl Node {
    fn start(flags: &[&str]) -> Self {
        let (client, admin) = (free_port(), free_port());
        let child = Command::new(gateway_binary())
            .args([
                "--listen",
                &format!("127.0.0.1:{client}"),
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
            ])
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the gateway runs");
        wait_for(DEADLINE, || {
            std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok()
        });
        Self {
            child,
            client,
            admin,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.client)
    }

    fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `loadtest SCENARIO ARGS --json` and returns its figures.
fn loadtest(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(args)
        .arg("--json")
        .stderr(Stdio::inherit())
        .output()
        .expect("loadtest runs");
    assert!(output.status.success(), "loadtest {args:?} failed");
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

/// The report counts no message lost and none repeated.
fn assert_nothing_lost(report: &Value) {
    assert_eq!(
        (report["lost"].as_u64(), report["repeated"].as_u64()),
        (Some(0), Some(0)),
        "{report}"
    );
}

#[test]
fn connections_open_and_are_counted() {
    let node = Node::start(&[]);
    let (url, admin) = (node.url(), node.admin_url());
    let report = loadtest(&[
        "connections",
        "--url",
        &url,
        "--admin",
        &admin,
        "-n",
        "200",
        "--hold",
        "200ms",
    ]);
    assert_eq!(report["connections"], 200, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["held_by_nodes"], 200, "{report}");
}

#[test]
fn fanout_loses_nothing() {
    let node = Node::start(&[]);
    let (url, admin) = (node.url(), node.admin_url());
    let report = loadtest(&[
        "fanout", "--url", &url, "--admin", &admin, "-s", "20", "-c", "2", "-r", "50", "-t", "1s",
    ]);
    assert_eq!(report["published"], 50, "{report}");
    assert_eq!(report["deliveries"], 500, "{report}");
    assert_nothing_lost(&report);
    assert_eq!(report["out_of_order"], 0, "{report}");
}

#[test]
fn fanout_reports_the_servers_cpu_per_delivery() {
    let node = Node::start(&[]);
    let (url, admin) = (node.url(), node.admin_url());
    let pid = node.child.id().to_string();
    let report = loadtest(&[
        "fanout",
        "--url",
        &url,
        "--admin",
        &admin,
        "-s",
        "50",
        "-r",
        "100",
        "-t",
        "1s",
        "--server-pid",
        &pid,
    ]);
    assert_eq!(report["server_deliveries"], 5000, "{report}");
    // 5,000 deliveries and 100 publishes take the node well over one 10 ms clock tick.
    assert!(
        report["server_us_per_delivery"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert_eq!(
        report["server_cpu_seconds_by_pid"][&pid], report["server_cpu_seconds"],
        "{report}"
    );
    // Every delivery came in a TCP segment, alone or with others.
    let segments = report["segments_per_delivery"].as_f64().unwrap();
    assert!(segments > 0.0 && segments <= 1.0, "{report}");
}

/// Message k of the floor is the frame the gateway writes for seq k: 60 bytes of text around
/// the data and the seq, a 4-byte header at these sizes.
#[test]
fn floor_writes_every_frame_and_reports_cpu_per_write() {
    let report = loadtest(&["floor", "-n", "5", "-r", "20", "-t", "500ms", "-p", "100"]);
    let per_socket = 9 * (4 + 60 + 1 + 100) + (4 + 60 + 2 + 100);
    assert_eq!(report["writes"], 50, "{report}");
    assert_eq!(report["bytes_written"], 5 * per_socket, "{report}");
    assert_eq!(report["bytes_read"], report["bytes_written"], "{report}");
    assert_eq!(report["short_sockets"], 0, "{report}");
    assert!(
        report["cpu_us_per_write"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        report["segments_per_write"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

#[test]
fn fanout_across_two_nodes_on_redis_loses_nothing() {
    let redis = RedisServer::start(false);
    let (a, b) = (
        Node::start(&["--redis-url", &redis.url()]),
        Node::start(&["--redis-url", &redis.url()]),
    );
    let urls = format!("{},{}", a.url(), b.url());
    let admins = format!("{},{}", a.admin_url(), b.admin_url());
    let report = loadtest(&[
        "fanout", "--url", &urls, "--admin", &admins, "-s", "20", "-r", "50", "-t", "1s",
    ]);
    assert_eq!(report["deliveries"], 1000, "{report}");
    assert_nothing_lost(&report);
}

/// Many resumes into a busy channel: the case that once delivered a message twice (numbered
/// before the resume read history, reaching the hub after it).
#[test]
fn churn_resumes_without_loss() {
    let node = Node::start(&[]);
    let (url, admin) = (node.url(), node.admin_url());
    let report = loadtest(&[
        "churn", "--url", &url, "--admin", &admin, "-n", "20", "-r", "100", "-t", "2s", "--drops",
        "30",
    ]);
    assert!(report["resumes"].as_u64().unwrap() > 0, "{report}");
    assert_nothing_lost(&report);
    assert_eq!(report["resumes_not_recovered"], 0, "{report}");
}

#[test]
fn drain_moves_clients_without_loss() {
    let redis = RedisServer::start(false);
    let drain = [
        "--redis-url",
        &redis.url(),
        "--drain-delay",
        "100ms",
        "--drain-window",
        "300ms",
    ];
    let mut a = Node::start(&drain);
    let b = Node::start(&["--redis-url", &redis.url()]);
    let urls = format!("{},{}", a.url(), b.url());
    let pid = a.child.id().to_string();
    let admin = b.admin_url();
    let report = loadtest(&[
        "drain", "--url", &urls, "--admin", &admin, "-n", "10", "-r", "50", "-t", "2s", "--pid",
        &pid, "--after", "500ms", "--grace", "3s",
    ]);
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(
        report["clients_moved"], 5,
        "the clients of the drained node moved: {report}"
    );
    assert!(a.child.wait().expect("the node exits").success());
}
