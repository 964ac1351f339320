//! `loadtest scale` at a small size against the real thing: it starts redis-server and three
//! gateway nodes itself, two worker processes, two steps, then drains one node and kills
//! another. Asserts what must hold at any size: every connection opens, every broadcast reaches
//! every connection, the lost nodes' connections resume elsewhere with nothing lost, the CSV
//! files and charts are written, and nothing it started is left running. Never a speed.

mod common;

use std::net::TcpListener;
use std::process::Command;

use common::{free_port, gateway_binary};
use serde_json::Value;

/// A base port below the ephemeral range with BASE..BASE+N and BASE+1000..BASE+1000+N free.
fn free_base(nodes: u16) -> u16 {
    let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    (0..200)
        .map(|_| 20_000 + rand_below(8_000))
        .find(|&base| (0..nodes).all(|i| free(base + i) && free(base + 1000 + i)))
        .expect("free ports below 32768")
}

fn rand_below(n: u16) -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    ((nanos ^ std::process::id().wrapping_mul(2_654_435_761)) % u32::from(n)) as u16
}

/// Processes whose command line holds `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(cmdline);
        }
    }
    found
}

#[test]
fn scale_ramps_broadcasts_and_survives_a_drain_and_a_kill() {
    let out = std::env::temp_dir().join(format!("bgw-scale-test-{}", std::process::id()));
    let base = free_base(3);
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["--json", "scale", "--steps", "300,800", "--nodes", "3"])
        .args(["--per-worker", "400", "--rate", "2000", "--broadcasts", "3"])
        .args(["--interval", "100ms", "--drain", "--kill"])
        .args(["--base-port", &base.to_string()])
        .args(["--redis-port", &free_port().to_string()])
        .args(["--first-source", "127.0.3.1", "--min-available-mib", "256"])
        .arg("--gateway")
        .arg(gateway_binary())
        .arg("--out")
        .arg(&out)
        .output()
        .expect("loadtest runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    let n = |key: &str| {
        report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} in {report}"))
    };

    assert_eq!(n("largest_connections"), 800.0, "{report}");
    assert_eq!(n("workers"), 2.0);
    assert_eq!(n("last_step_failed"), 0.0, "{stderr}");
    assert_eq!(n("last_step_delivered_all"), 1.0, "{report}");
    assert_eq!(n("last_step_lost"), 0.0, "{report}");
    assert_eq!(n("last_step_repeated"), 0.0, "{report}");
    assert!(n("last_step_node_bytes_per_conn") > 0.0, "{report}");
    assert!(n("last_step_last_receiver_max_ms") > 0.0, "{report}");
    for event in ["drain", "kill"] {
        let held = n(&format!("{event}_node_held"));
        assert!(held > 0.0, "{event}: {report}");
        assert!(n(&format!("{event}_moved")) >= held, "{event}: {report}");
        assert_eq!(n(&format!("{event}_lost")), 0.0, "{event}: {report}");
        assert_eq!(
            n(&format!("{event}_delivered_all")),
            1.0,
            "{event}: {report}"
        );
        assert_eq!(
            n(&format!("{event}_resume_failures")),
            0.0,
            "{event}: {report}"
        );
        assert!(
            n(&format!("{event}_resume_max_ms")) > 0.0,
            "{event}: {report}"
        );
    }
    // Sessions survive on Redis: a drained or killed node's clients resume, none starts over.
    assert_eq!(n("drain_fresh_sessions"), 0.0, "{report}");
    assert_eq!(n("kill_fresh_sessions"), 0.0, "{report}");

    let steps = std::fs::read_to_string(out.join("steps.csv")).unwrap();
    assert_eq!(steps.lines().count(), 3, "{steps}");
    assert!(steps.starts_with("connections,"), "{steps}");
    assert_eq!(
        std::fs::read_to_string(out.join("resume.csv"))
            .unwrap()
            .lines()
            .count(),
        3
    );
    for chart in [
        "memory-total.svg",
        "memory-per-node.svg",
        "broadcast.svg",
        "resume.svg",
    ] {
        let svg = std::fs::read_to_string(out.join(chart)).unwrap();
        assert!(svg.contains("<polyline"), "{chart}");
    }
    // Nothing left running: no node on its ports, no worker pointed at them.
    let leftovers = processes_with(&format!("127.0.0.1:{base}"));
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&out).unwrap();
}
