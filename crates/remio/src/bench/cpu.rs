//! CPU time (user + system, every thread) of the processes a measurement involves.
//!
//! Wall-clock latency on this kind of machine depends on whether an idle vCPU must be woken
//! (see docs/performance.md); the CPU a request costs does not, so it is reported next to it.
//! Read from each process's CPU-time clock (`clock_getcpuclockid`, nanosecond resolution, dead
//! threads included), not from `/proc/<pid>/stat` (10 ms ticks).

use std::io;
use std::time::Instant;

/// A process's CPU-time clock: this process or a child.
#[derive(Debug, Clone, Copy)]
pub struct ProcessClock(libc::clockid_t);

impl ProcessClock {
    /// This process (all its threads).
    pub fn this() -> Self {
        Self(libc::CLOCK_PROCESS_CPUTIME_ID)
    }

    /// Process `pid` (all its threads), while it lives.
    pub fn of(pid: u32) -> io::Result<Self> {
        let pid =
            libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut clk: libc::clockid_t = 0;
        // SAFETY: `clk` is a valid place for the result; the call has no other effects.
        let rc = unsafe { libc::clock_getcpuclockid(pid, &mut clk) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(Self(clk))
    }

    /// CPU nanoseconds used so far.
    pub fn now_ns(self) -> io::Result<u64> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec to write; an invalid clock id is reported as -1.
        if unsafe { libc::clock_gettime(self.0, &mut ts) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
        let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
        Ok(secs * 1_000_000_000 + nanos)
    }
}

/// CPU time and wall time of a set of processes over a measured stretch.
#[derive(Debug)]
pub struct CpuMeter {
    clocks: Vec<ProcessClock>,
    start_cpu: u64,
    start_wall: Instant,
}

/// What a [`CpuMeter`] measured.
#[derive(Debug, Clone, Copy)]
pub struct CpuUse {
    /// CPU nanoseconds of all the processes together.
    pub cpu_ns: u64,
    /// Wall nanoseconds.
    pub wall_ns: u64,
}

impl CpuUse {
    /// CPU nanoseconds per operation, for `ops` operations.
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    pub fn per_op_ns(self, ops: u64) -> f64 {
        if ops == 0 {
            return f64::NAN;
        }
        self.cpu_ns as f64 / ops as f64
    }
}

impl CpuMeter {
    /// Starts measuring this process and the children `pids`.
    pub fn start(pids: &[u32]) -> io::Result<Self> {
        let mut clocks = vec![ProcessClock::this()];
        for &p in pids {
            clocks.push(ProcessClock::of(p)?);
        }
        let start_cpu = sum(&clocks)?;
        Ok(Self {
            clocks,
            start_cpu,
            start_wall: Instant::now(),
        })
    }

    /// CPU and wall time since [`CpuMeter::start`].
    pub fn stop(&self) -> io::Result<CpuUse> {
        let wall_ns = u64::try_from(self.start_wall.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let cpu_ns = sum(&self.clocks)?.saturating_sub(self.start_cpu);
        Ok(CpuUse { cpu_ns, wall_ns })
    }
}

fn sum(clocks: &[ProcessClock]) -> io::Result<u64> {
    clocks.iter().try_fold(0u64, |acc, c| Ok(acc + c.now_ns()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_child_process_shows_in_the_meter() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let meter = CpuMeter::start(&[child.id()]).unwrap();
        // Measure while it still lives (its clock goes with it).
        std::thread::sleep(std::time::Duration::from_millis(150));
        let used = meter.stop().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();

        // On a loaded machine the child gets a share of a core, not all of it.
        assert!(used.cpu_ns > 1_000_000, "{used:?}");
        assert!(used.wall_ns >= 150_000_000, "{used:?}");
    }

    #[test]
    fn this_process_counts_its_own_spinning() {
        let meter = CpuMeter::start(&[]).unwrap();
        super::super::floors::spin_for(std::time::Duration::from_millis(20));
        let used = meter.stop().unwrap();
        assert!(used.cpu_ns >= 1_000_000, "{used:?}");
    }
}
