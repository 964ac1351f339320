//! The node's Prometheus metrics: what an operator watches. `gateway/METRICS.md` documents every
//! one (a test below keeps the two in step).
//!
//! Every bound of the gateway has a counter here that counts when it bites. Every label a
//! labelled counter can take is created at 0 with the counter, so that a rate or an alert on it
//! has a series to work on before the first event, not only after something went wrong.
//! The process collector adds the standard `process_*` metrics (memory, CPU, file
//! descriptors, start time) under their usual names, without the `bgw_` prefix, since that is
//! what dashboards and alert rules everywhere expect.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use shared::CloseCode;

/// `reason` of `bgw_drops_total`: why a message was not delivered.
pub const DROP_REASONS: &[&str] = &[
    "repeat",
    "not_utf8",
    "slow_consumer",
    "unrecoverable_gap",
    "malformed_push",
    "broker_queue_full",
    "presence_queue_full",
];

/// `reason` of `bgw_handshake_rejections_total`: why a WebSocket handshake was not upgraded.
pub const REJECTION_REASONS: &[&str] = &[
    "bad_request",
    "http_version",
    "not_found",
    "origin",
    "draining",
    "capacity",
    "broker_unavailable",
    "timeout",
];

/// `what` of `bgw_session_saves_total`: what the session saver wrote.
pub const SESSION_SAVES: &[&str] = &["record", "positions"];

/// `limit` of `bgw_limit_hits_total`: the limit that refused a request.
pub const LIMITS: &[&str] = &["rate", "subscriptions", "publish_size", "user_connections"];

/// Buckets of the latency histograms, in seconds: from a fast local publish (100 µs) to a
/// broker that hangs until its command timeout (2 s).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    /// `--max-connections`, beside `connections`, so that a panel or an alert can divide.
    pub max_connections: IntGauge,
    /// 1 while the node drains.
    pub draining: IntGauge,
    /// 1 while the broker answers (Redis: commands and the pub/sub link), 0 when it does not.
    pub broker_up: IntGauge,
    /// Channels with at least one local subscriber.
    pub channels: IntGauge,
    pub subscriptions: IntGauge,
    /// WebSocket upgrades accepted (101).
    pub handshakes: IntCounter,
    /// Handshakes refused before the upgrade, by reason ([`REJECTION_REASONS`]).
    pub rejections: IntCounterVec,
    pub frames_in: IntCounter,
    pub frames_out: IntCounter,
    pub deliveries: IntCounter,
    /// Messages not delivered, by reason ([`DROP_REASONS`]).
    pub drops: IntCounterVec,
    /// Connections closed by the server, by close code.
    pub closes: IntCounterVec,
    /// Requests refused for a limit, by limit ([`LIMITS`]).
    pub limits: IntCounterVec,
    pub published: IntCounter,
    /// Publishes the broker failed (the publisher got 503).
    pub publish_errors: IntCounter,
    pub publish_seconds: Histogram,
    /// Time from a message's publish to its fan-out on this node; observed where the broker
    /// carries the publish time with the message.
    pub delivery_delay: Histogram,
    /// Broker events received and not yet handed to the hub.
    pub broker_events_queued: IntGauge,
    /// Bytes waiting in connections' backlogs for sockets that would block.
    pub backlog_bytes: IntGauge,
    /// Connections whose backlog is not empty.
    pub backlogged_connections: IntGauge,
    pub repairs: IntCounter,
    /// History repairs running now.
    pub repairs_in_progress: IntGauge,
    /// Resyncs running now (after the broker link came back).
    pub resyncs_in_progress: IntGauge,
    pub sessions_resumed: IntCounter,
    pub sessions_taken_over: IntCounter,
    /// Writes of the session saver, by what was written: `record` (one session's) or
    /// `positions` (the node's).
    pub session_saves: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        fn add<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
            registry
                .register(Box::new(c.clone()))
                .expect("metric names are unique");
            c
        }
        let counter = |name: &str, help: &str| {
            add(
                &registry,
                IntCounter::new(name, help).expect("valid metric"),
            )
        };
        let gauge = |name: &str, help: &str| {
            add(&registry, IntGauge::new(name, help).expect("valid metric"))
        };
        let labelled = |name: &str, help: &str, label: &str, values: &[String]| {
            let counter = add(
                &registry,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
            );
            for value in values {
                counter.with_label_values(&[value]);
            }
            counter
        };
        let histogram = |name: &str, help: &str| {
            add(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                )
                .expect("valid metric"),
            )
        };
        let strings = |values: &[&str]| values.iter().map(|v| v.to_string()).collect::<Vec<_>>();

        let build_info = add(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "bgw_build_info",
                    "Always 1: the version and commit of the running binary.",
                ),
                &["version", "commit"],
            )
            .expect("valid metric"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("BGW_COMMIT")])
            .set(1);
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("metric names are unique");

        Self {
            connections: gauge("bgw_connections", "Open client connections."),
            max_connections: gauge(
                "bgw_max_connections",
                "The most client connections this node accepts (--max-connections).",
            ),
            draining: gauge("bgw_draining", "1 while the node drains after SIGTERM."),
            broker_up: gauge(
                "bgw_broker_up",
                "1 while the broker answers, 0 while it does not.",
            ),
            channels: gauge("bgw_channels", "Channels with local subscribers."),
            subscriptions: gauge(
                "bgw_subscriptions",
                "Live channel subscriptions of local clients.",
            ),
            handshakes: counter("bgw_handshakes_total", "WebSocket upgrades accepted (101)."),
            rejections: labelled(
                "bgw_handshake_rejections_total",
                "WebSocket handshakes refused, by reason.",
                "reason",
                &strings(REJECTION_REASONS),
            ),
            frames_in: counter("bgw_frames_in_total", "Text frames received from clients."),
            frames_out: counter("bgw_frames_out_total", "Frames sent to clients."),
            deliveries: counter(
                "bgw_deliveries_total",
                "Messages queued for local subscribers.",
            ),
            drops: labelled(
                "bgw_drops_total",
                "Messages not delivered, by reason.",
                "reason",
                &strings(DROP_REASONS),
            ),
            closes: labelled(
                "bgw_closes_total",
                "Connections closed by the server, by close code.",
                "code",
                &close_codes(),
            ),
            limits: labelled(
                "bgw_limit_hits_total",
                "Requests refused by a limit, by limit.",
                "limit",
                &strings(LIMITS),
            ),
            published: counter(
                "bgw_published_total",
                "Messages published through this node.",
            ),
            publish_errors: counter(
                "bgw_publish_errors_total",
                "Publishes through this node that the broker failed.",
            ),
            publish_seconds: histogram(
                "bgw_publish_duration_seconds",
                "Time to publish one message through the broker.",
            ),
            delivery_delay: histogram(
                "bgw_delivery_delay_seconds",
                "Time from the hub taking a message from the broker to its write to the last local subscriber's socket, per message and fan-out shard.",
            ),
            broker_events_queued: gauge(
                "bgw_broker_events_queued",
                "Broker events (messages) received and not yet fanned out.",
            ),
            backlog_bytes: gauge(
                "bgw_backlog_bytes",
                "Bytes waiting in connection backlogs for sockets that would block.",
            ),
            backlogged_connections: gauge(
                "bgw_backlogged_connections",
                "Connections with bytes waiting in their backlog.",
            ),
            repairs: counter(
                "bgw_repairs_total",
                "Gaps in a channel's sequence repaired from history.",
            ),
            repairs_in_progress: gauge(
                "bgw_repairs_in_progress",
                "History repairs of a channel running now.",
            ),
            resyncs_in_progress: gauge(
                "bgw_resyncs_in_progress",
                "Resyncs of every channel after the broker link came back, running now.",
            ),
            sessions_resumed: counter(
                "bgw_sessions_resumed_total",
                "Sessions resumed on this node.",
            ),
            sessions_taken_over: counter(
                "bgw_sessions_taken_over_total",
                "Connections closed because another took their session.",
            ),
            session_saves: labelled(
                "bgw_session_saves_total",
                "Session writes to the broker, by what was written (record, positions).",
                "what",
                &strings(SESSION_SAVES),
            ),
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding does not fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Holds a gauge one higher while a piece of work runs, however the work ends.
pub struct InProgress(IntGauge);

impl InProgress {
    pub fn start(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every close code of the contract, as `bgw_closes_total` labels them.
fn close_codes() -> Vec<String> {
    (1000..=1015)
        .chain(4000..=4099)
        .filter_map(CloseCode::from_code)
        .map(|code| code.code().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS_MD: &str = include_str!("../METRICS.md");

    /// The metric families of a text exposition, with every label value they carry.
    fn families(text: &str) -> Vec<(String, Vec<String>)> {
        let mut families: Vec<(String, Vec<String>)> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or_default();
                families.push((name.to_owned(), Vec::new()));
            } else if !line.starts_with('#') {
                let labels = line.split_once('{').and_then(|(_, l)| l.split_once('}'));
                if let (Some((labels, _)), Some((_, values))) = (labels, families.last_mut()) {
                    for pair in labels.split(',') {
                        if let Some((key, value)) = pair.split_once('=') {
                            if key != "le" {
                                values.push(value.trim_matches('"').to_owned());
                            }
                        }
                    }
                }
            }
        }
        families
    }

    #[test]
    fn every_labelled_counter_starts_with_its_labels_at_zero() {
        let metrics = Metrics::new();
        let text = metrics.render();
        for (name, label, values) in [
            ("bgw_drops_total", "reason", strings(DROP_REASONS)),
            (
                "bgw_handshake_rejections_total",
                "reason",
                strings(REJECTION_REASONS),
            ),
            ("bgw_limit_hits_total", "limit", strings(LIMITS)),
            ("bgw_session_saves_total", "what", strings(SESSION_SAVES)),
            ("bgw_closes_total", "code", close_codes()),
        ] {
            for value in values {
                let line = format!("{name}{{{label}=\"{value}\"}} 0");
                assert!(text.lines().any(|l| l == line), "missing: {line}");
            }
        }
        assert!(close_codes().contains(&"4030".to_owned()));
        assert_eq!(close_codes().len(), 16, "every code of shared::CloseCode");
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn build_info_names_the_version_and_a_commit() {
        let text = Metrics::new().render();
        let line = text
            .lines()
            .find(|l| l.starts_with("bgw_build_info{"))
            .expect("bgw_build_info is exposed");
        assert!(line.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))));
        assert!(line.contains("commit=\""), "{line}");
        assert!(!line.contains("commit=\"\""), "{line}");
        assert!(line.ends_with(" 1"), "{line}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_metrics_carry_their_standard_names() {
        let text = Metrics::new().render();
        for name in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{name} is not exposed"));
            let value: f64 = value.parse().expect("a number");
            if name != "process_cpu_seconds_total" {
                assert!(value > 0.0, "{name} {value}");
            }
        }
    }

    #[test]
    fn in_progress_holds_its_gauge_up_until_dropped() {
        let metrics = Metrics::new();
        let first = InProgress::start(&metrics.repairs_in_progress);
        let second = InProgress::start(&metrics.repairs_in_progress);
        assert_eq!(metrics.repairs_in_progress.get(), 2);
        drop(first);
        assert_eq!(metrics.repairs_in_progress.get(), 1);
        drop(second);
        assert_eq!(metrics.repairs_in_progress.get(), 0);
    }

    /// METRICS.md has a row for every metric family the node exposes, and names every label
    /// value a labelled counter starts with; and it documents no metric that does not exist.
    #[test]
    fn metrics_md_documents_every_metric_and_label() {
        let text = Metrics::new().render();
        let families = families(&text);
        assert!(families.len() > 30, "{}", families.len());
        for (name, values) in &families {
            assert!(
                METRICS_MD.contains(&format!("| `{name}` |")),
                "METRICS.md has no row for {name}"
            );
            if name == "bgw_build_info" {
                continue;
            }
            for value in values {
                assert!(
                    METRICS_MD.contains(&format!("`{value}`")),
                    "METRICS.md does not name {name}'s label value {value}"
                );
            }
        }
        for row in METRICS_MD.lines().filter(|l| l.starts_with("| `")) {
            let name = row.split('`').nth(1).unwrap_or_default();
            assert!(
                families.iter().any(|(family, _)| family == name),
                "METRICS.md documents {name}, which the node does not expose"
            );
        }
    }

    /// A label value written where a counter is incremented, and not in the lists above, would
    /// appear only after its first event: the lists and the code must agree.
    #[test]
    fn every_label_the_code_uses_starts_at_zero() {
        let sources = [
            include_str!("admin/mod.rs"),
            include_str!("connection/mod.rs"),
            include_str!("connection/requests/mod.rs"),
            include_str!("connection/requests/hello.rs"),
            include_str!("connection/requests/subscribe.rs"),
            include_str!("connection/requests/publish.rs"),
            include_str!("fanout.rs"),
            include_str!("hub/mod.rs"),
            include_str!("hub/continuity.rs"),
            include_str!("listener.rs"),
            include_str!("broker/redis/link.rs"),
            include_str!("broker/redis/mod.rs"),
            include_str!("broker/redis/channels.rs"),
            include_str!("broker/embedded/mod.rs"),
            include_str!("broker/embedded/channels.rs"),
            include_str!("session/saver.rs"),
        ];
        let known: Vec<&str> = [DROP_REASONS, REJECTION_REASONS, LIMITS, SESSION_SAVES].concat();
        let mut seen = 0;
        for source in sources {
            let mut rest = source;
            while let Some(at) = rest.find("with_label_values(&[\"") {
                rest = &rest[at + "with_label_values(&[\"".len()..];
                let value = rest.split('"').next().unwrap_or_default();
                assert!(known.contains(&value), "label {value:?} is not in a list");
                seen += 1;
            }
        }
        assert!(seen >= 5, "found only {seen} labelled increments");
    }
}
