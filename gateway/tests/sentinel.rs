//! Redis Sentinel: nodes find the master through real `redis-sentinel` processes, and follow a
//! failover (`SENTINEL FAILOVER`) while messages are published without pause.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_for, Admin, Client, Gateway, Sentinels, DEADLINE};
use serde_json::Value;
use shared::ServerFrame;

/// One publish: its number, and the status it got.
#[derive(Debug, Clone)]
struct Attempt {
    n: u64,
    status: u16,
}

/// What a subscriber saw: messages (seq, n), and where the unsolicited `subscribed` frames
/// (continuity lost) fell.
#[derive(Debug, Default)]
struct Seen {
    ns: Vec<u64>,
    told_recovered_false: bool,
}

/// Reads `client`'s frames until it has the message numbered `last`, checking on the way that
/// seqs go up by one, except right after a `subscribed` with `recovered: false`, which says where
/// the channel stands.
async fn read_until(client: &mut Client, start: u64, last: u64) -> Seen {
    let mut seen = Seen::default();
    let mut at = start;
    loop {
        match client.recv().await {
            ServerFrame::Message { seq, data, .. } => {
                assert_eq!(seq, at + 1, "a gap or a repeat, after {seen:?}");
                at = seq;
                let data: Value = serde_json::from_str(data.get()).unwrap();
                let n = data["n"].as_u64().unwrap();
                seen.ns.push(n);
                if n == last {
                    return seen;
                }
            }
            ServerFrame::Subscribed {
                id, seq, recovered, ..
            } => {
                assert!(id.is_none() && !recovered);
                seen.told_recovered_false = true;
                at = seq;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Two nodes behind three Sentinels, four subscribers, a publish every 10 ms through either node,
/// and `SENTINEL FAILOVER` in the middle. Every subscriber gets every message published before
/// the failover, and every later one too unless it was told `recovered: false`; the seqs it sees
/// never skip or repeat unannounced. Publishes answer 200 or 503 (never another error); once
/// both nodes are ready again, every publish succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_loses_nothing_silently() {
    let set = Sentinels::start();
    let url = set.url();
    let a = Gateway::start(&["--redis-url", &url, "--node-id", "sentinel-a"]);
    let b = Gateway::start(&["--redis-url", &url, "--node-id", "sentinel-b"]);
    a.wait_ready(200).await;
    b.wait_ready(200).await;

    let mut clients = Vec::new();
    for node in [&a, &b, &a, &b] {
        let (mut client, _) = node.connect_hello().await;
        let start = client.subscribe("failover").await.seq;
        clients.push((client, start));
    }

    // The publisher: alternately through each node, until told to stop (5000 at most).
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AttemptLog::default());
    let publisher = {
        let (stop, attempts) = (stop.clone(), attempts.clone());
        let admins = [a.admin_addr, b.admin_addr];
        tokio::spawn(async move {
            let mut admins = [
                Admin::connect(admins[0]).await,
                Admin::connect(admins[1]).await,
            ];
            for n in 0..5000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (status, _) = admins[n as usize % 2]
                    .publish("failover", &format!(r#"{{"n":{n}}}"#))
                    .await;
                attempts.push(Attempt { n, status });
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let acked = |attempts: &AttemptLog| attempts.all().iter().filter(|a| a.status == 200).count();

    let until = tokio::time::Instant::now() + DEADLINE;
    while acked(&attempts) < 30 {
        assert!(tokio::time::Instant::now() < until, "no publishes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_failover = attempts.all().len() as u64;
    let old_master = set.master.port;
    assert_eq!(
        set.sentinel(set.ports[0], &["SENTINEL", "FAILOVER", "mymaster"])
            .map(|out| out.trim().to_owned()),
        Some("OK".to_owned())
    );
    wait_for(Duration::from_secs(30), || {
        set.master_port() == Some(set.replica.port)
    });
    assert_ne!(set.master_port(), Some(old_master));
    for node in [&a, &b] {
        // It follows the failover.
        node.wait_log("new master").await;
        node.wait_ready(200).await;
    }

    // Both are ready: from here on, every publish succeeds.
    let ready_again = attempts.all().len();
    let until = tokio::time::Instant::now() + DEADLINE;
    while attempts.all().len() < ready_again + 30 {
        assert!(tokio::time::Instant::now() < until, "publishing stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    publisher.await.unwrap();
    let attempts = attempts.all();
    for attempt in &attempts {
        assert!(
            matches!(attempt.status, 200 | 503),
            "publish {attempt:?} answered neither 200 nor 503"
        );
    }
    let settled = &attempts[ready_again + 1..];
    assert!(
        settled.iter().all(|a| a.status == 200),
        "a publish failed although both nodes were ready: {settled:?}"
    );
    let last = attempts.last().unwrap().n;
    let failed = attempts.iter().filter(|a| a.status != 200).count();

    for (i, (client, start)) in clients.iter_mut().enumerate() {
        let seen = read_until(client, *start, last).await;
        for attempt in attempts.iter().filter(|a| a.status == 200) {
            let got = seen.ns.contains(&attempt.n);
            assert!(
                got || (attempt.n >= before_failover && seen.told_recovered_false),
                "subscriber {i} lost publish {attempt:?} silently"
            );
        }
        eprintln!(
            "subscriber {i}: {} messages, told recovered:false: {}",
            seen.ns.len(),
            seen.told_recovered_false
        );
    }
    eprintln!(
        "{} publishes, {failed} answered 503 during the failover",
        attempts.len()
    );
}

/// The publishes so far: the publisher task appends while the test reads.
#[derive(Default)]
struct AttemptLog(Mutex<Vec<Attempt>>);

impl AttemptLog {
    fn push(&self, attempt: Attempt) {
        self.0.lock().unwrap().push(attempt);
    }

    fn all(&self) -> Vec<Attempt> {
        self.0.lock().unwrap().clone()
    }
}
