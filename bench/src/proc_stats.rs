//! Resident memory and CPU time of a process, from `/proc`.

use anyhow::Context;

fn status_kib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} for process {pid}"))
}

/// Resident memory now, in MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    Ok(status_kib(pid, "VmRSS:")? / 1024.0)
}

/// The most resident memory the process has had, in MiB.
pub fn peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    Ok(status_kib(pid, "VmHWM:")? / 1024.0)
}

/// Resets the process's high-water mark of resident memory to its RSS now, so that
/// [`peak_rss_mib`] then gives the peak from this moment (Linux 4.0 and later; the process
/// must be this user's).
pub fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of process {pid}"))
}

/// User plus system CPU time the process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks: f64 = fields
        .get(11..13)
        .context("short stat")?
        .iter()
        .map(|f| f.parse::<f64>().unwrap_or(0.0))
        .sum();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok(ticks / hz)
}

/// The process `pid` and its children (nginx's master and its workers), each child's
/// children not included.
pub fn with_children(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        pids.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    pids
}

/// Confines every thread of each process in `pids` to the CPUs in `cpus`, or lets them run
/// on those this (unconfined) process may use again when `cpus` is `None`. Threads started
/// afterwards inherit their creator's set.
pub fn pin_threads(pids: &[u32], cpus: Option<&[usize]>) -> anyhow::Result<()> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    let set = match cpus {
        None => sched_getaffinity(nix::unistd::Pid::from_raw(0)).context("this process's CPUs")?,
        Some(cpus) => {
            let mut set = CpuSet::new();
            for &cpu in cpus {
                set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
            }
            set
        }
    };
    for (pid, tid) in threads_of(pids)? {
        sched_setaffinity(nix::unistd::Pid::from_raw(tid as i32), &set)
            .with_context(|| format!("setting the CPUs of thread {tid} of process {pid}"))?;
    }
    Ok(())
}

/// Every thread of each process in `pids` now, as (process, thread) ids.
fn threads_of(pids: &[u32]) -> anyhow::Result<Vec<(u32, u32)>> {
    let mut threads = Vec::new();
    for &pid in pids {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            if let Some(tid) = task?.file_name().to_str().and_then(|t| t.parse().ok()) {
                threads.push((pid, tid));
            }
        }
    }
    Ok(threads)
}

/// Context switches of every thread of each process in `pids` so far: the voluntary ones
/// (a thread waiting for work) and the involuntary ones (a thread with work put off its
/// core), summed.
pub fn context_switches_of(pids: &[u32]) -> anyhow::Result<(u64, u64)> {
    let mut sums = (0, 0);
    for (pid, tid) in threads_of(pids)? {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
            continue; // The thread ended meanwhile.
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        sums.0 += field("voluntary_ctxt_switches:");
        sums.1 += field("nonvoluntary_ctxt_switches:");
    }
    Ok(sums)
}

/// User plus system CPU time of this process's children that have ended and been waited
/// for, in seconds: around one child's run (nothing else ending meanwhile), that child's.
pub fn ended_children_cpu_seconds() -> anyhow::Result<f64> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN).context("getrusage")?;
    let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok(seconds(usage.user_time()) + seconds(usage.system_time()))
}

/// [`cpu_seconds`] summed over `pids`.
pub fn cpu_seconds_of(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|&pid| cpu_seconds(pid)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_cpu() {
        let me = std::process::id();
        assert!(rss_mib(me).expect("rss") > 0.0);
        assert!(peak_rss_mib(me).expect("hwm") >= rss_mib(me).expect("rss") * 0.5);
        // A peak well above RSS now, reset to it.
        let block = std::hint::black_box(vec![1u8; 64 << 20]);
        drop(block);
        reset_peak_rss(me).expect("reset");
        assert!(peak_rss_mib(me).expect("hwm") < rss_mib(me).expect("rss") + 32.0);
        // Burn a little CPU so the figure cannot be zero.
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(30) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(cpu_seconds(me).expect("cpu") > 0.0, "{x}");
    }
}
