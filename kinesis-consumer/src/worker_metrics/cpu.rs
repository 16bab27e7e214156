//! CPU utilisation samples for the WorkerMetricStats row, off AWS as well as on it.
//!
//! The KCL 3.x measures CPU only where it recognises the platform (ECS task stats, EKS cgroups,
//! EC2 `/proc/stat` once IMDS answers) and otherwise reports nothing, so its leader balances such
//! workers by throughput alone. Here each source works wherever Linux's `/proc` and `/sys` do:
//!
//! - [`CpuSource::Process`] (default): this process's CPU time (`/proc/self/stat`, utime + stime)
//!   over the CPUs it may use (`std::thread::available_parallelism`, which honours cgroup quotas
//!   and affinity): what this worker costs, and so what moving leases away from it relieves.
//! - [`CpuSource::Cgroup`]: the container's CPU time (cgroup v2 `cpu.stat` `usage_usec`) over
//!   the same CPUs: everything in the container, as the KCL measures on EKS.
//! - [`CpuSource::Host`]: the whole machine (`/proc/stat`), as the KCL measures on EC2.
//!
//! A source that cannot be read (not Linux, no cgroup v2) yields no sample; the row then carries
//! no CPU figure and a KCL 3.x leader balances this worker by throughput, as it does a KCL worker
//! off AWS. It never reports `-1`, which would exclude the worker from assignment.

use std::time::Duration;

use tokio::time::Instant;

/// Where the CPU utilisation of a worker is measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CpuSource {
    /// This process, over the CPUs it may use.
    #[default]
    Process,
    /// The container (cgroup v2), over the CPUs this process may use.
    Cgroup,
    /// The whole host (`/proc/stat`).
    Host,
    /// None: the row carries no CPU figure (a leader balances by throughput).
    Off,
}

/// Linux's fixed unit of the times in `/proc/<pid>/stat` and `/proc/stat` (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;

/// Busy and total CPU time of a source, in seconds, at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Reading {
    busy: f64,
    /// For the host: total CPU time of all CPUs. Otherwise unused (wall time times CPUs).
    total: Option<f64>,
    at: Instant,
}

/// Turns successive readings of a source into utilisation samples (percent, 0 to 100).
#[derive(Debug)]
pub(crate) struct CpuSampler {
    source: CpuSource,
    cpus: f64,
    last: Option<Reading>,
}

impl CpuSampler {
    pub(crate) fn new(source: CpuSource) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        CpuSampler { source, cpus, last: None }
    }

    /// The utilisation since the previous call, in percent; `None` on the first call, or when the
    /// source cannot be read.
    pub(crate) fn sample(&mut self, now: Instant) -> Option<f64> {
        let reading = read(self.source, now)?;
        let previous = self.last.replace(reading)?;
        utilisation(previous, reading, self.cpus)
    }
}

/// Utilisation in percent between two readings.
fn utilisation(before: Reading, after: Reading, cpus: f64) -> Option<f64> {
    let busy = after.busy - before.busy;
    let capacity = match (before.total, after.total) {
        (Some(a), Some(b)) => b - a,
        _ => after.at.saturating_duration_since(before.at).as_secs_f64() * cpus,
    };
    (capacity > 0.0 && busy >= 0.0).then(|| (busy / capacity * 100.0).clamp(0.0, 100.0))
}

fn read(source: CpuSource, at: Instant) -> Option<Reading> {
    match source {
        CpuSource::Process => {
            let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
            Some(Reading { busy: process_seconds(&stat)?, total: None, at })
        }
        CpuSource::Cgroup => {
            let stat = std::fs::read_to_string("/sys/fs/cgroup/cpu.stat").ok()?;
            Some(Reading { busy: cgroup_seconds(&stat)?, total: None, at })
        }
        CpuSource::Host => {
            let stat = std::fs::read_to_string("/proc/stat").ok()?;
            let (busy, total) = host_seconds(&stat)?;
            Some(Reading { busy, total: Some(total), at })
        }
        CpuSource::Off => None,
    }
}

/// utime + stime of `/proc/<pid>/stat`, in seconds. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted after its last `)`.
fn process_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// `usage_usec` of a cgroup v2 `cpu.stat`, in seconds.
fn cgroup_seconds(stat: &str) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("usage_usec "))?;
    let micros: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(micros / 1e6)
}

/// Busy and total seconds of the `cpu` line of `/proc/stat` (idle and iowait are not busy).
fn host_seconds(stat: &str) -> Option<(f64, f64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<f64> = line.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    if ticks.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest times are inside user and nice).
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks[3] + ticks[4];
    Some(((total - idle) / TICKS_PER_SECOND, total / TICKS_PER_SECOND))
}

/// How often samples are taken (KCL `inMemoryWorkerMetricsCaptureFrequencyMillis`: 1 s).
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_as_linux_writes_them() {
        let stat = "4242 (my (odd) worker) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 130 0 0 20 0 9 0 100 0 0";
        assert_eq!(process_seconds(stat), Some(3.8), "250 + 130 ticks");
        assert_eq!(cgroup_seconds("usage_usec 2500000\nuser_usec 2000000\n"), Some(2.5));
        let host = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n";
        assert_eq!(host_seconds(host), Some((1.5, 10.0)));
        assert_eq!(process_seconds("garbage"), None);
    }

    #[test]
    fn utilisation_is_busy_time_over_capacity() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        let at = |busy, total, at| Reading { busy, total, at };
        // 1 CPU-second busy in 2 s on 2 CPUs: 25 %.
        assert_eq!(utilisation(at(10.0, None, t0), at(11.0, None, t1), 2.0), Some(25.0));
        // The host: 6 of 10 seconds busy.
        assert_eq!(utilisation(at(4.0, Some(20.0), t0), at(10.0, Some(30.0), t1), 2.0), Some(60.0));
        assert_eq!(utilisation(at(10.0, None, t0), at(10.0, None, t0), 2.0), None, "no time passed");
        assert_eq!(utilisation(at(0.0, None, t0), at(50.0, None, t1), 1.0), Some(100.0), "clamped");
    }

    #[tokio::test]
    async fn this_process_can_be_sampled_on_linux() {
        let mut sampler = CpuSampler::new(CpuSource::Process);
        assert_eq!(sampler.sample(Instant::now()), None, "the first reading has nothing to compare with");
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(300) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let sample = sampler.sample(Instant::now());
        if cfg!(target_os = "linux") {
            let percent = sample.expect("a sample on Linux");
            assert!(percent > 0.0 && percent <= 100.0, "{percent}");
        }
        assert_eq!(CpuSampler::new(CpuSource::Off).sample(Instant::now()), None);
    }
}
