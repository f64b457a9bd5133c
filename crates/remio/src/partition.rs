//! Static CPU partitioning of one `remio run`, as Bao partitions a machine: the frontend (QEMU,
//! and the platform's thread that answers its trapped accesses) on some CPUs, the backend
//! (device models, vhost-user daemons, the backend VM of `--dispatcher c-driver`, and the
//! platform's threads that serve them) on the others.
//!
//! Why (docs/performance.md, "Placement"): on a machine whose idle CPUs halt, a thread woken
//! on the other CPU costs both sides a slow cross-CPU wake-up (~27 µs here against ~1.5 µs on
//! the waker's CPU), and a trapped access is two wake-ups between QEMU's vCPU thread and the
//! platform's. Left to the scheduler, those threads spend the first few hundred milliseconds
//! of I/O spread over both CPUs. Partitioned, the only cross-CPU wake-up left per request is
//! the device model's interrupt, as under Bao, where the backend VM has CPUs of its own.
//!
//! The platform's own threads are split by whom they serve: the one answering QEMU's trapped
//! accesses runs with QEMU; those serving the device models (the API connections, and the
//! irqfd threads that turn a device model's signal into a NOTIFY, a backend vCPU's hypercall
//! under Bao) run with them, so that the interrupt's hop from the device model to the platform
//! stays on one CPU.
//!
//! The sets apply to threads and processes started after [`Partition::enter_frontend`] (the
//! calling thread's mask is inherited), to those started inside [`Partition::on_backend`], and
//! to commands prepared with [`Partition::backend_command`]. A CPU this process may not use is
//! refused by [`PartitionSpec::resolve`], before anything starts.

use std::fmt;
use std::io;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

/// Errors of parsing a `--partition` value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartitionError {
    /// Not `auto`, `off` or `FRONTEND/BACKEND`.
    #[error("expected auto, off or FRONTEND/BACKEND CPU lists (e.g. 0/1 or 0-1/2-3), got {0:?}")]
    Syntax(String),
    /// A CPU list that is empty or not a list of numbers and ranges.
    #[error("bad CPU list {0:?} (e.g. 0, 0-3 or 0,2)")]
    BadList(String),
    /// A CPU number beyond what a cpu_set_t holds.
    #[error("CPU {0} out of range (at most {max})", max = MAX_CPU)]
    OutOfRange(usize),
    /// The same CPU in both sets: the partition would not separate anything.
    #[error("CPU {0} is in both the frontend and the backend set")]
    Overlap(usize),
}

/// The highest CPU number a `cpu_set_t` can name.
const MAX_CPU: usize = libc::CPU_SETSIZE as usize - 1;

/// A set of CPUs.
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    fn empty() -> Self {
        // SAFETY: cpu_set_t is plain old data; all zeroes is the empty set.
        Self(unsafe { std::mem::zeroed() })
    }

    fn insert(&mut self, cpu: usize) -> Result<(), PartitionError> {
        if cpu > MAX_CPU {
            return Err(PartitionError::OutOfRange(cpu));
        }
        // SAFETY: `cpu` is below CPU_SETSIZE (checked above).
        unsafe { libc::CPU_SET(cpu, &mut self.0) };
        Ok(())
    }

    fn contains(&self, cpu: usize) -> bool {
        // SAFETY: CPU_ISSET reads the set; `cpu` is below CPU_SETSIZE in every caller.
        cpu <= MAX_CPU && unsafe { libc::CPU_ISSET(cpu, &self.0) }
    }

    /// The CPUs in the set, in order.
    pub fn cpus(&self) -> Vec<usize> {
        (0..=MAX_CPU).filter(|&c| self.contains(c)).collect()
    }

    /// Parses a CPU list: numbers and ranges separated by commas (`0`, `0-3`, `0,2-3`).
    pub fn parse(list: &str) -> Result<Self, PartitionError> {
        let bad = || PartitionError::BadList(list.to_owned());
        let mut set = Self::empty();
        for part in list.split(',') {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (lo, hi),
                None => (part, part),
            };
            let lo: usize = lo.trim().parse().map_err(|_| bad())?;
            let hi: usize = hi.trim().parse().map_err(|_| bad())?;
            if lo > hi {
                return Err(bad());
            }
            for cpu in lo..=hi {
                set.insert(cpu)?;
            }
        }
        Ok(set)
    }

    /// The CPUs the calling thread may run on.
    fn allowed() -> io::Result<Self> {
        let mut set = Self::empty();
        // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into `set.0`.
        let r = unsafe {
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set.0)
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(set)
    }

    /// Restricts the calling thread to this set.
    fn apply(&self) -> io::Result<()> {
        // SAFETY: the set is a valid cpu_set_t of the size given; sched_setaffinity only reads
        // it. Async-signal-safe (a plain system call), so it may run between fork and exec.
        let r =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for CpuSet {
    /// As a CPU list with ranges (`0-2,5`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cpus = self.cpus();
        let mut first = true;
        let mut i = 0;
        while i < cpus.len() {
            let mut j = i;
            while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
                j += 1;
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if i == j {
                write!(f, "{}", cpus[i])?;
            } else {
                write!(f, "{}-{}", cpus[i], cpus[j])?;
            }
            i = j + 1;
        }
        Ok(())
    }
}

/// What `--partition` asked for.
#[derive(Debug, Clone)]
pub enum PartitionSpec {
    /// Split the CPUs this process may use: the first half (rounded up) for the frontend,
    /// the rest for the backend; no partition with fewer than two.
    Auto,
    /// Leave placement to the scheduler.
    Off,
    /// These sets (boxed: two `cpu_set_t`s are 256 bytes).
    Sets(Box<Partition>),
}

impl std::str::FromStr for PartitionSpec {
    type Err = PartitionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            _ => s.parse().map(|p| Self::Sets(Box::new(p))),
        }
    }
}

impl std::str::FromStr for Partition {
    type Err = PartitionError;

    /// `FRONTEND/BACKEND`, two disjoint CPU lists.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (front, back) = s
            .split_once('/')
            .ok_or_else(|| PartitionError::Syntax(s.to_owned()))?;
        let frontend = CpuSet::parse(front)?;
        let backend = CpuSet::parse(back)?;
        if let Some(&cpu) = frontend.cpus().iter().find(|&&c| backend.contains(c)) {
            return Err(PartitionError::Overlap(cpu));
        }
        Ok(Self { frontend, backend })
    }
}

impl PartitionSpec {
    /// The partition this asks for on this machine (`None`: none). Sets naming a CPU this
    /// process may not use are an error (InvalidInput) naming it and the CPUs it may use.
    pub fn resolve(&self) -> io::Result<Option<Partition>> {
        match self {
            Self::Off => Ok(None),
            Self::Sets(p) => {
                let allowed = CpuSet::allowed()?;
                let cpus = p.frontend.cpus().into_iter().chain(p.backend.cpus());
                for cpu in cpus {
                    if !allowed.contains(cpu) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("CPU {cpu} is not one this process may use ({allowed})"),
                        ));
                    }
                }
                Ok(Some(**p))
            }
            Self::Auto => Ok(Partition::split(&CpuSet::allowed()?)),
        }
    }
}

/// A frontend set and a backend set of CPUs, disjoint.
#[derive(Debug, Clone, Copy)]
pub struct Partition {
    /// QEMU and the platform.
    pub frontend: CpuSet,
    /// Device models, vhost-user daemons, the C driver's backend VM.
    pub backend: CpuSet,
}

impl Partition {
    /// `allowed` split in two: the first half (rounded up) for the frontend, whose vCPU
    /// thread runs the guest's every instruction under TCG; `None` with fewer than two CPUs.
    fn split(allowed: &CpuSet) -> Option<Self> {
        let cpus = allowed.cpus();
        if cpus.len() < 2 {
            return None;
        }
        let (front, back) = cpus.split_at(cpus.len().div_ceil(2));
        let (mut frontend, mut backend) = (CpuSet::empty(), CpuSet::empty());
        for &c in front {
            frontend.insert(c).ok()?;
        }
        for &c in back {
            backend.insert(c).ok()?;
        }
        Some(Self { frontend, backend })
    }

    /// Moves the calling thread, and so every thread and process it starts from now on, to
    /// the frontend set.
    pub fn enter_frontend(&self) -> io::Result<()> {
        self.frontend.apply()
    }

    /// Runs `start` with the calling thread on the backend set, so that the threads it starts
    /// are the backend's (and theirs too), then moves the thread back to the frontend set.
    pub fn on_backend<T>(&self, start: impl FnOnce() -> T) -> io::Result<T> {
        self.backend.apply()?;
        let started = start();
        self.frontend.apply()?;
        Ok(started)
    }

    /// Makes `cmd`'s process start on the backend set.
    pub fn backend_command(&self, cmd: &mut Command) {
        let backend = self.backend;
        // SAFETY: the closure only makes the sched_setaffinity system call on a set copied
        // before the fork (async-signal-safe, no allocation, no lock).
        unsafe {
            cmd.pre_exec(move || backend.apply());
        }
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "frontend on CPUs {}, backend on CPUs {}",
            self.frontend, self.backend
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_print_as_ranges() {
        let set = CpuSet::parse("0,2-4,7").unwrap();
        assert_eq!(set.cpus(), vec![0, 2, 3, 4, 7]);
        assert_eq!(set.to_string(), "0,2-4,7");
        assert_eq!(CpuSet::parse("3").unwrap().to_string(), "3");
    }

    #[test]
    fn bad_cpu_lists_are_errors() {
        for bad in ["", "a", "1-", "3-1", "1,,2", "-1"] {
            assert_eq!(
                CpuSet::parse(bad).unwrap_err(),
                PartitionError::BadList(bad.to_owned()),
                "{bad:?}"
            );
        }
        assert_eq!(
            CpuSet::parse("0-5000").unwrap_err(),
            PartitionError::OutOfRange(MAX_CPU + 1)
        );
    }

    #[test]
    fn specs_parse_and_overlapping_sets_are_refused() {
        assert!(matches!("auto".parse(), Ok(PartitionSpec::Auto)));
        assert!(matches!("off".parse(), Ok(PartitionSpec::Off)));
        let Ok(PartitionSpec::Sets(p)) = "0-1/2,3".parse::<PartitionSpec>() else {
            panic!("sets expected");
        };
        assert_eq!(
            (p.frontend.cpus(), p.backend.cpus()),
            (vec![0, 1], vec![2, 3])
        );
        assert_eq!(
            "0-2/2".parse::<PartitionSpec>().unwrap_err(),
            PartitionError::Overlap(2)
        );
        assert!(matches!(
            "0".parse::<PartitionSpec>(),
            Err(PartitionError::Syntax(_))
        ));
    }

    #[test]
    fn auto_splits_the_allowed_cpus_with_the_odd_one_to_the_frontend() {
        let p = Partition::split(&CpuSet::parse("0-2").unwrap()).unwrap();
        assert_eq!((p.frontend.cpus(), p.backend.cpus()), (vec![0, 1], vec![2]));
        let p = Partition::split(&CpuSet::parse("4,6").unwrap()).unwrap();
        assert_eq!((p.frontend.cpus(), p.backend.cpus()), (vec![4], vec![6]));
        assert!(Partition::split(&CpuSet::parse("1").unwrap()).is_none());
    }

    #[test]
    fn threads_started_on_the_backend_run_there_and_the_caller_returns_to_the_frontend() {
        // On a thread of its own: the harness's threads keep their CPUs.
        std::thread::spawn(|| {
            let Some(p) = Partition::split(&CpuSet::allowed().unwrap()) else {
                eprintln!("SKIP: one CPU allowed, nothing to partition");
                return;
            };
            p.enter_frontend().unwrap();
            assert_eq!(CpuSet::allowed().unwrap().cpus(), p.frontend.cpus());
            let started = p
                .on_backend(|| {
                    std::thread::spawn(|| CpuSet::allowed().unwrap().cpus())
                        .join()
                        .unwrap()
                })
                .unwrap();
            assert_eq!(started, p.backend.cpus());
            assert_eq!(CpuSet::allowed().unwrap().cpus(), p.frontend.cpus());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn sets_outside_the_allowed_cpus_are_refused_by_name() {
        let allowed = CpuSet::allowed().unwrap().cpus();
        let outside = allowed.last().unwrap() + 1;
        let spec: PartitionSpec = format!("{}/{outside}", allowed[0]).parse().unwrap();
        let err = spec.resolve().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(
            err.to_string()
                .starts_with(&format!("CPU {outside} is not one this process may use")),
            "{err}"
        );
    }

    #[test]
    fn a_backend_command_starts_on_the_backend_set() {
        let allowed = CpuSet::allowed().unwrap();
        let Some(p) = Partition::split(&allowed) else {
            eprintln!("SKIP: one CPU allowed, nothing to partition");
            return;
        };
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "grep Cpus_allowed_list /proc/self/status"]);
        p.backend_command(&mut cmd);
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.split_whitespace().nth(1),
            Some(p.backend.to_string().as_str()),
            "{text}"
        );
    }
}
