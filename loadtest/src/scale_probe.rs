//! What the machine says about memory: a process's resident set, the kernel's TCP sockets
//! (`/proc/net/sockstat`) and its own memory (`/proc/meminfo`: the slab holds the socket
//! structures, which sockstat's `mem`, the buffers' pages, does not count).

use anyhow::Context;
use serde::Serialize;

/// Resident memory of process `pid`, bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    kib_field(&status, "VmRSS:").context("VmRSS in /proc/PID/status")
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Machine {
    pub mem_total: u64,
    pub mem_available: u64,
    /// Kernel slab, bytes: socket, inode, dentry and file structures live here.
    pub slab: u64,
    /// TCP sockets in use, all of the machine's.
    pub tcp_inuse: u64,
    /// Pages of TCP buffers, as bytes.
    pub tcp_mem: u64,
}

pub fn machine() -> anyhow::Result<Machine> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let sockstat = std::fs::read_to_string("/proc/net/sockstat")?;
    let (tcp_inuse, tcp_pages) = tcp_line(&sockstat).context("the TCP line of sockstat")?;
    Ok(Machine {
        mem_total: kib_field(&meminfo, "MemTotal:").unwrap_or(0),
        mem_available: kib_field(&meminfo, "MemAvailable:").context("MemAvailable")?,
        slab: kib_field(&meminfo, "Slab:").unwrap_or(0),
        tcp_inuse,
        tcp_mem: tcp_pages * page_size(),
    })
}

/// The size of the kernel's connection tracking table, where it is loaded.
pub fn conntrack_max() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_max")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `inuse` and `mem` of `TCP: inuse 20002 orphan 0 tw 37449 alloc 20002 mem 67`.
fn tcp_line(sockstat: &str) -> Option<(u64, u64)> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let value = |name: &str| -> Option<u64> {
        let at = fields.iter().position(|f| *f == name)?;
        fields.get(at + 1)?.parse().ok()
    };
    Some((value("inuse")?, value("mem")?))
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |size| size as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_sockstat_and_meminfo() {
        let sockstat =
            "sockets: used 20024\nTCP: inuse 20002 orphan 0 tw 37449 alloc 20002 mem 67\n";
        assert_eq!(super::tcp_line(sockstat), Some((20002, 67)));
        let machine = super::machine().unwrap();
        assert!(machine.mem_available > 0 && machine.mem_total >= machine.mem_available);
        assert!(super::rss(std::process::id()).unwrap() > 0);
    }
}
