//! What `/proc` says about a process: CPU time (utime + stime, all threads, exited ones
//! included) and memory (VmRSS, VmHWM).

use serde::{Deserialize, Serialize};

/// Clock ticks per second of `/proc/PID/stat` times (USER_HZ, 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system) the process has used so far.
pub fn cpu_seconds(pid: u32) -> std::io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| bad("no ')' in stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| -> std::io::Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|t| t as f64)
            .ok_or_else(|| bad("short stat"))
    };
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// CPU time of the calling thread, nanoseconds (`/proc/thread-self/schedstat`), if the kernel
/// reports it. Unlike wall time it does not count time spent preempted by other processes.
pub fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU seconds the whole machine has been busy (all CPUs: user, nice, system, irq, softirq,
/// steal), from `/proc/stat`.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .filter_map(|f| f.parse::<f64>().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest times are inside user and nice).
    if v.len() < 8 {
        return None;
    }
    Some((v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / USER_HZ)
}

/// The 1-minute load average: how busy the machine was around a measurement.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Resident memory of a process, KiB.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Memory {
    /// Current resident set (VmRSS).
    pub rss_kib: u64,
    /// Peak resident set since start (VmHWM).
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> std::io::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Option<u64> {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| {
            l[name.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        })
    };
    Ok(Memory {
        rss_kib: field("VmRSS:").ok_or_else(|| bad("no VmRSS"))?,
        hwm_kib: field("VmHWM:").ok_or_else(|| bad("no VmHWM"))?,
    })
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

/// Context switches (voluntary, involuntary) of all the process's live threads so far, from
/// `/proc/PID/task/*/status`: a count of wake-ups that does not depend on the machine's
/// speed. Threads that have exited are not counted (edge-est's threads live as long as it).
pub fn context_switches(pid: u32) -> Option<(u64, u64)> {
    let mut voluntary = 0;
    let mut involuntary = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(status) = std::fs::read_to_string(task.ok()?.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            let value = |l: &str| l.split_whitespace().nth(1)?.parse::<u64>().ok();
            if line.starts_with("voluntary_ctxt_switches:") {
                voluntary += value(line).unwrap_or(0);
            } else if line.starts_with("nonvoluntary_ctxt_switches:") {
                involuntary += value(line).unwrap_or(0);
            }
        }
    }
    Some((voluntary, involuntary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        let m = memory(pid).unwrap();
        assert!(m.rss_kib > 0 && m.hwm_kib >= m.rss_kib);
        let a = thread_cpu_ns().unwrap();
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        assert!(thread_cpu_ns().unwrap() > a, "{x}");
    }
}
