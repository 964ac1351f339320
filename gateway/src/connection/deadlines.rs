//! A connection's deadlines, kept as plain data so that one timer serves them all.

use tokio::time::{Duration, Instant};

use crate::config::Config;

/// When each of a connection's timers is due.
pub(super) struct Deadlines {
    /// The next WebSocket ping.
    pub ping: Instant,
    /// Heartbeat interval + pong timeout after the last frame from the client.
    pub silence: Instant,
    pub silence_limit: Duration,
    /// The hello timeout, from the upgrade.
    pub hello_at: Instant,
    /// Until `hello`.
    pub hello: Option<Instant>,
    /// The token's expiry.
    pub expiry: Option<Instant>,
    /// After our close frame: how long to wait for the client's close.
    pub linger: Option<Instant>,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Due {
    Linger,
    Expired,
    Hello,
    Silent,
    Ping,
}

impl Deadlines {
    pub fn new(now: Instant, config: &Config) -> Self {
        let silence_limit = config.heartbeat_interval + config.pong_timeout;
        Self {
            ping: now + config.heartbeat_interval,
            silence: now + silence_limit,
            silence_limit,
            hello_at: now + config.hello_timeout,
            hello: Some(now + config.hello_timeout),
            expiry: None,
            linger: None,
        }
    }

    pub fn next(&self) -> Instant {
        // Closing: the other deadlines, passed or not, have nothing left to do.
        if let Some(linger) = self.linger {
            return linger;
        }
        [self.hello, self.expiry]
            .into_iter()
            .flatten()
            .fold(self.ping.min(self.silence), Instant::min)
    }

    /// The deadline that has passed, the one that ends the connection first.
    pub fn due(&self, now: Instant) -> Option<Due> {
        let passed = |at: Option<Instant>| at.is_some_and(|at| at <= now);
        if passed(self.linger) {
            Some(Due::Linger)
        } else if self.linger.is_some() {
            // Closing: nothing else is due.
            None
        } else if passed(self.expiry) {
            Some(Due::Expired)
        } else if passed(self.hello) {
            Some(Due::Hello)
        } else if self.silence <= now {
            Some(Due::Silent)
        } else if self.ping <= now {
            Some(Due::Ping)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn config() -> Config {
        crate::config::Cli::parse_from(["gateway", "--heartbeat-interval", "25s"]).serve
    }

    #[tokio::test(start_paused = true)]
    async fn one_timer_walks_the_deadlines_in_order() {
        let config = config();
        let start = Instant::now();
        let mut deadlines = Deadlines::new(start, &config);
        assert_eq!(deadlines.next(), start + config.hello_timeout);
        tokio::time::sleep_until(deadlines.next()).await;
        assert_eq!(deadlines.due(Instant::now()), Some(Due::Hello));

        deadlines.hello = None;
        assert_eq!(deadlines.next(), start + config.heartbeat_interval);
        tokio::time::sleep_until(deadlines.next()).await;
        assert_eq!(deadlines.due(Instant::now()), Some(Due::Ping));
        deadlines.ping += config.heartbeat_interval;

        // A frame from the client moves the silence deadline; without one, it passes.
        assert_eq!(deadlines.next(), start + deadlines.silence_limit);
        tokio::time::advance(deadlines.silence_limit).await;
        assert_eq!(deadlines.due(Instant::now()), Some(Due::Silent));
    }

    #[tokio::test(start_paused = true)]
    async fn closing_waits_only_for_the_linger() {
        let config = config();
        let now = Instant::now();
        let mut deadlines = Deadlines::new(now, &config);
        deadlines.expiry = Some(now);
        assert_eq!(deadlines.due(now), Some(Due::Expired));
        deadlines.linger = Some(now + Duration::from_secs(3));
        assert_eq!(
            deadlines.due(now),
            None,
            "the expiry's close is sent already"
        );
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(deadlines.due(Instant::now()), Some(Due::Linger));
    }
}
