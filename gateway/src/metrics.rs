//! The node's Prometheus metrics. Every bound of the gateway has a counter here that counts
//! when it bites.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    /// 1 while the node drains.
    pub draining: IntGauge,
    pub subscriptions: IntGauge,
    pub frames_in: IntCounter,
    pub frames_out: IntCounter,
    pub deliveries: IntCounter,
    /// Messages not delivered, by reason (`slow_consumer`, `repeat`, `unrecoverable_gap`, ...).
    pub drops: IntCounterVec,
    /// Connections closed by the server, by close code.
    pub closes: IntCounterVec,
    /// Handshakes refused before the upgrade, by reason (`origin`, `capacity`, `draining`, ...).
    pub rejections: IntCounterVec,
    /// Requests refused for a limit, by limit (`rate`, `subscriptions`, `publish_size`, ...).
    pub limits: IntCounterVec,
    pub published: IntCounter,
    pub publish_seconds: Histogram,
    pub repairs: IntCounter,
    pub sessions_resumed: IntCounter,
    pub sessions_taken_over: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("bgw".into()), None).expect("valid prefix");
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
        let labelled = |name: &str, help: &str, label: &str| {
            add(
                &registry,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
            )
        };
        Self {
            connections: gauge("connections", "Open client connections."),
            draining: gauge("draining", "1 while the node drains after SIGTERM."),
            subscriptions: gauge(
                "subscriptions",
                "Live channel subscriptions of local clients.",
            ),
            frames_in: counter("frames_in_total", "Text frames received from clients."),
            frames_out: counter("frames_out_total", "Frames sent to clients."),
            deliveries: counter("deliveries_total", "Messages queued for local subscribers."),
            drops: labelled(
                "drops_total",
                "Messages not delivered, by reason.",
                "reason",
            ),
            closes: labelled(
                "closes_total",
                "Connections closed by the server, by close code.",
                "code",
            ),
            rejections: labelled(
                "handshake_rejections_total",
                "Handshakes refused, by reason.",
                "reason",
            ),
            limits: labelled(
                "limit_hits_total",
                "Requests refused by a limit, by limit.",
                "limit",
            ),
            published: counter("published_total", "Messages published through this node."),
            publish_seconds: add(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "publish_duration_seconds",
                        "Time to publish one message through the broker.",
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 1.0,
                    ]),
                )
                .expect("valid metric"),
            ),
            repairs: counter(
                "repairs_total",
                "Gaps in a channel's sequence repaired from history.",
            ),
            sessions_resumed: counter("sessions_resumed_total", "Sessions resumed on this node."),
            sessions_taken_over: counter(
                "sessions_taken_over_total",
                "Connections closed because another took their session.",
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
