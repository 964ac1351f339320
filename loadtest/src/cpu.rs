//! CPU time (user + system): this process's from getrusage (microseconds), other processes'
//! from `/proc/PID/stat` (clock ticks of 1/USER_HZ s: 10 ms on Linux).

use std::time::Duration;

use anyhow::Context;
use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeValLike;
use nix::unistd::{sysconf, SysconfVar};

/// The CPU time this process (all its threads) has used so far.
pub fn own() -> anyhow::Result<Duration> {
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    let micros = usage.user_time().num_microseconds() + usage.system_time().num_microseconds();
    Ok(Duration::from_micros(micros.max(0) as u64))
}

/// The length of one clock tick of `/proc/PID/stat`.
pub fn tick() -> Duration {
    let per_second = sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&hz| hz > 0)
        .unwrap_or(100);
    Duration::from_secs(1) / per_second as u32
}

/// The CPU time process `pid` (all its threads, not its children) has used so far.
pub fn of_process(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = stat_ticks(&stat).with_context(|| format!("utime and stime in {path}"))?;
    Ok(tick() * ticks as u32)
}

/// utime + stime, fields 14 and 15 of `/proc/PID/stat`. Field 2, the command name in
/// parentheses, may itself hold spaces and parentheses: fields are counted after the last ')'.
fn stat_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_utime_and_stime_past_an_odd_name() {
        let stat = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 2913 0 0 0 1234 567 0 0 20 0 9 0";
        assert_eq!(super::stat_ticks(stat), Some(1234 + 567));
        assert_eq!(super::stat_ticks("4242 (gateway) S 1"), None);
    }

    #[test]
    fn reads_this_process() {
        assert!(super::own().unwrap() > std::time::Duration::ZERO);
        super::of_process(std::process::id()).unwrap();
    }
}
