//! Reconnecting to the broker: the one place that decides how long to wait between attempts.
//!
//! The policy: exponential backoff with jitter. The n-th consecutive failure waits a delay drawn
//! uniformly from `[d/2, d]`, with `d = min(FIRST_DELAY * 2^(n-1), MAX_DELAY)`: 50-100 ms, then
//! 100-200 ms, ... up to 2.5-5 s, and 2.5-5 s from then on, for as long as it takes. A success
//! starts the sequence again.
//! - Exponential, so that a Redis that is down, or restarting, is not hammered by every node;
//!   the first retries are quick, because most outages are a restart or a failover of seconds.
//! - Capped at 5 s, so that a node is back within seconds of its Redis.
//! - Jittered, so that nodes that lost Redis together do not all come back in the same
//!   millisecond; half the delay stays fixed, so that no node retries at once by bad luck.
//!
//! Every failure is logged with the address (redacted: never a password) and the error.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The delay after the first failure (before jitter).
const FIRST_DELAY: Duration = Duration::from_millis(100);

/// The longest delay between two attempts (before jitter).
const MAX_DELAY: Duration = Duration::from_secs(5);

/// The delays between attempts; see the module's documentation.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    pub fn new() -> Self {
        Self::default()
    }

    /// The ceiling of the next delay, before jitter.
    fn ceiling(&self) -> Duration {
        let doublings = self.failures.saturating_sub(1).min(16);
        FIRST_DELAY.saturating_mul(1 << doublings).min(MAX_DELAY)
    }

    /// Counts a failure and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let ceiling = self.ceiling();
        let jitter: f64 = rand::rng().random_range(0.5..=1.0);
        ceiling.mul_f64(jitter)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Calls `attempt` until it succeeds, waiting as [`Backoff`] says between failures, and logging
/// each failure with `what` and `address`. `None` when `stop` is cancelled first. `first_failed`
/// is called once, after the first failure (the node may start unready then).
pub async fn retry<T, E, F, Fut>(
    what: &str,
    address: &str,
    stop: &CancellationToken,
    mut first_failed: impl FnMut(),
    mut attempt: F,
) -> Option<T>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::new();
    loop {
        let result = tokio::select! {
            () = stop.cancelled() => return None,
            result = attempt() => result,
        };
        match result {
            Ok(value) => {
                if backoff.failures() > 0 {
                    info!(
                        address,
                        attempts = backoff.failures() + 1,
                        "{what}: connected after failures"
                    );
                }
                return Some(value);
            }
            Err(e) => {
                let delay = backoff.next_delay();
                warn!(
                    address,
                    error = %e,
                    attempt = backoff.failures(),
                    retry_in_ms = delay.as_millis() as u64,
                    "{what}: cannot connect"
                );
                if backoff.failures() == 1 {
                    first_failed();
                }
                tokio::select! {
                    () = stop.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new();
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let delay = backoff.next_delay();
            let ceiling = backoff.ceiling();
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000, 5000, 5000]
        );
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let delays: std::collections::HashSet<Duration> = (0..20)
            .map(|_| {
                let mut backoff = Backoff::new();
                backoff.next_delay();
                backoff.next_delay()
            })
            .collect();
        assert!(delays.len() > 1, "20 nodes would retry together");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_waits_between_failures_and_returns_the_success() {
        let attempts = AtomicU32::new(0);
        let first_failures = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let stop = CancellationToken::new();
        let got = retry(
            "test",
            "redis://127.0.0.1:1",
            &stop,
            || {
                first_failures.fetch_add(1, Ordering::Relaxed);
            },
            || async {
                match attempts.fetch_add(1, Ordering::Relaxed) {
                    0..=3 => Err("refused"),
                    n => Ok(n),
                }
            },
        )
        .await;
        assert_eq!(got, Some(4));
        assert_eq!(first_failures.load(Ordering::Relaxed), 1);
        // Four failures: at least 50 + 100 + 200 + 400 ms of waiting, at most twice that.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(750) && waited <= Duration::from_millis(1500),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_gives_up_when_stopped() {
        let stop = CancellationToken::new();
        let stopper = async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            stop.cancel();
        };
        let retrying = retry(
            "test",
            "redis://127.0.0.1:1",
            &stop,
            || {},
            || async { Err::<(), _>("refused") },
        );
        let (got, ()) = tokio::join!(retrying, stopper);
        assert_eq!(got, None::<()>);
    }
}
