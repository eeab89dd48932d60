//! The machine's CPU (Linux `/proc/stat`), this process's (`/proc/self/stat`), and a process's
//! peak RSS (`/proc/<pid>/status`).

/// The machine's cores (0 when unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

/// CPU ticks of the whole machine so far (Linux `/proc/stat`).
#[derive(Clone, Copy)]
struct MachineTicks {
    /// The machine's own work: user, nice, system, irq and softirq.
    busy: u64,
    /// Time the host ran something else while this machine had work (virtual machines).
    steal: u64,
    /// All of the above plus idle and iowait.
    total: u64,
}

fn cpu_ticks() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    if ticks.len() < 8 {
        return None;
    }
    Some(MachineTicks {
        busy: ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6],
        steal: ticks[7],
        total: ticks[..8].iter().sum(),
    })
}

/// CPU ticks this process (the load generator) has used so far, user and system (Linux `/proc`).
fn own_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the command name in parentheses: state is field 3, utime and stime fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The machine's and this process's CPU counters at one moment.
pub struct CpuMark {
    machine: Option<MachineTicks>,
    own: Option<u64>,
}

/// Shares of the machine's time between two moments.
pub struct CpuShares {
    /// The machine's own work, all processes.
    pub busy: f64,
    /// Taken by the host: the machine had that much less CPU than its cores.
    pub steal: f64,
    /// This process (the load generator); `None` where `/proc/self/stat` cannot be read.
    pub own: Option<f64>,
}

impl CpuMark {
    pub fn now() -> Self {
        Self {
            machine: cpu_ticks(),
            own: own_cpu_ticks(),
        }
    }

    /// Since the mark; `None` where the machine's counters cannot be read.
    pub fn shares(&self) -> Option<CpuShares> {
        let later = Self::now();
        let (after, before) = later.machine.zip(self.machine)?;
        let total = (after.total - before.total).max(1) as f64;
        Some(CpuShares {
            busy: (after.busy - before.busy) as f64 / total,
            steal: (after.steal - before.steal) as f64 / total,
            own: later
                .own
                .zip(self.own)
                .map(|(own1, own0)| (own1 - own0) as f64 / total),
        })
    }
}

/// The peak resident set of process `pid`, in MB.
pub fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}
