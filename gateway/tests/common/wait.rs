//! Deadlines for the waits of the tests: every wait ends, at the latest, with a panic that says
//! what it waited for.

use std::time::Duration;

use tokio::time::Instant;

/// How long any one wait of a test may take: generous, for a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(20);

/// Runs `check` every few milliseconds until it gives `Ok`, and returns that value. At the
/// deadline it panics with `what` and the `Err` of the last look.
pub async fn wait_until<T>(
    deadline: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let until = Instant::now() + deadline;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < until,
                "{what}: not within {deadline:?}; last seen: {seen}"
            ),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `ready` until it holds, or panics at the deadline; for set-ups outside the runtime
/// (the Redis servers), which block their thread.
pub fn wait_for(deadline: Duration, mut ready: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + deadline;
    while !ready() {
        assert!(
            std::time::Instant::now() < until,
            "condition not met within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
