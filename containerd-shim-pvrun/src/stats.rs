//! `ctr task metrics` / the kubelet's stats for a guest: its process's CPU time and
//! resident memory (the guest's memory is part of it), as containerd's cgroup v1
//! `Metrics` message.

use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics,
};

/// Clock ticks per second of /proc's times.
fn ticks() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// Usage of process `pid`, from /proc.
pub fn metrics(pid: u32) -> std::io::Result<Metrics> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces, in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    let ns_per_tick = 1_000_000_000 / ticks();
    let user = field(11) * ns_per_tick;
    let kernel = field(12) * ns_per_tick;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let rss = kib("VmRSS:") * 1024;
    let mut m = Metrics::new();
    let mut cpu = CPUStat::new();
    let mut usage = CPUUsage::new();
    usage.total = user + kernel;
    usage.user = user;
    usage.kernel = kernel;
    cpu.usage = Some(usage).into();
    m.cpu = Some(cpu).into();
    let mut mem = MemoryStat::new();
    mem.rss = rss;
    let mut entry = MemoryEntry::new();
    entry.usage = rss;
    entry.max = kib("VmHWM:") * 1024;
    mem.usage = Some(entry).into();
    m.memory = Some(mem).into();
    Ok(m)
}
