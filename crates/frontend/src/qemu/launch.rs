//! The QEMU command line that makes a guest a frontend of this bridge
//! (`spec/qemu-frontend.md`, "Machine").
//!
//! The machine is `microvm`, which has neither an HPET nor an ACPI PM timer. Linux calibrates
//! the TSC against the PIT, and under TCG that calibration fails when the host is busy (the
//! kernel prints `tsc: Unable to calibrate against PIT`, then `Marking TSC unstable` and
//! hangs). TCG's guest TSC is the host's TSC (QEMU's `cpu_get_ticks`), so the command line tells
//! the kernel its rate with `tsc_early_khz=` ([`host_tsc_khz`]) and no calibration runs.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What to boot and how.
#[derive(Clone, Debug)]
pub struct QemuOptions {
    /// The QEMU binary (`qemu-system-x86_64`).
    pub qemu: PathBuf,
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// Extra kernel command-line words after `console=ttyS0 panic=-1` (never `quiet`: a boot
    /// with it hung twice).
    pub cmdline_extra: String,
    /// Extra QEMU arguments appended at the end.
    pub extra_args: Vec<OsString>,
}

/// The descriptors and paths of a running bridge that QEMU needs.
#[derive(Clone, Debug)]
pub struct BridgeEnds {
    /// QEMU's end of the MPQEMU socket (inherited by the child at the same number).
    pub proxy_fd: RawFd,
    /// The guest RAM memfd (inherited at the same number).
    pub ram_fd: RawFd,
    /// Guest RAM size in bytes.
    pub ram_size: u64,
    /// The ivshmem server socket.
    pub ivshmem_path: PathBuf,
    /// Number of ivshmem vectors (= windows).
    pub vectors: usize,
}

/// The host's TSC rate in kHz (what TCG's guest TSC runs at), measured once per process:
/// the median of three 25 ms measurements of `rdtsc` against `CLOCK_MONOTONIC`; if that is
/// implausible, `/proc/cpuinfo`'s `cpu MHz`. `None` when neither works (not x86_64).
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: OnceLock<Option<u64>> = OnceLock::new();
    *KHZ.get_or_init(|| {
        let khz = measure_tsc_khz().or_else(|| {
            std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|t| cpuinfo_khz(&t))
        });
        match khz {
            Some(k) => log::debug!("host TSC: {k} kHz"),
            None => {
                log::warn!("host TSC rate unknown: the guest calibrates it (may hang under load)")
            }
        }
        khz
    })
}

/// Rates outside this range (kHz) are measurement errors.
const PLAUSIBLE_TSC_KHZ: std::ops::RangeInclusive<u64> = 100_000..=10_000_000;

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    /// One (monotonic ns, tsc) pair: the tsc read between two clock reads, from the tightest
    /// of a few tries (a preemption between the reads would skew the pair).
    fn pair(origin: Instant) -> (u128, u64) {
        let mut best: Option<(u128, u128, u64)> = None;
        for _ in 0..5 {
            let a = origin.elapsed().as_nanos();
            // SAFETY: rdtsc reads the time-stamp counter; no memory is involved and every
            // x86_64 CPU has it.
            let t = unsafe { core::arch::x86_64::_rdtsc() };
            let b = origin.elapsed().as_nanos();
            let width = b - a;
            if best.is_none_or(|(w, _, _)| width < w) {
                best = Some((width, a + width / 2, t));
            }
        }
        best.map_or((0, 0), |(_, ns, t)| (ns, t))
    }
    let origin = Instant::now();
    let mut rates: Vec<u64> = (0..3)
        .filter_map(|_| {
            let (n0, t0) = pair(origin);
            std::thread::sleep(Duration::from_millis(25));
            let (n1, t1) = pair(origin);
            let ns = n1.checked_sub(n0).filter(|&d| d > 0)?;
            let ticks = u128::from(t1.checked_sub(t0)?);
            u64::try_from(ticks * 1_000_000 / ns).ok()
        })
        .collect();
    rates.sort_unstable();
    let median = *rates.get(rates.len() / 2)?;
    PLAUSIBLE_TSC_KHZ.contains(&median).then_some(median)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

/// The first `cpu MHz` of a `/proc/cpuinfo` text, in kHz.
fn cpuinfo_khz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == "cpu MHz")?
        .1
        .trim()
        .parse()
        .ok()?;
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "checked against the plausible range right after"
    )]
    let khz = (mhz * 1000.0).round() as u64;
    PLAUSIBLE_TSC_KHZ.contains(&khz).then_some(khz)
}

/// The full argument list (without the binary).
pub fn args(opts: &QemuOptions, ends: &BridgeEnds) -> Vec<OsString> {
    args_with_tsc(opts, ends, host_tsc_khz())
}

/// The arguments every remio guest boots with, whoever serves its devices (`remio run`, the
/// QEMU baseline of `remio bench`, `remio guest boot`): `machine` under TCG with one vCPU and
/// `ram_mib` of RAM, no default devices, the serial console on stdio, no reboot, and the kernel
/// command line `console=ttyS0 panic=-1`, the TSC rate (see [`host_tsc_khz`]) and `cmdline_extra`.
pub fn guest_args(
    machine: &str,
    ram_mib: u64,
    kernel: &Path,
    initrd: &Path,
    cmdline_extra: &str,
) -> Vec<OsString> {
    guest_args_with_tsc(
        machine,
        ram_mib,
        kernel,
        initrd,
        cmdline_extra,
        host_tsc_khz(),
    )
}

/// [`guest_args`] with the guest's TSC rate given (`tsc_early_khz=`, omitted when `None`).
pub(crate) fn guest_args_with_tsc(
    machine: &str,
    ram_mib: u64,
    kernel: &Path,
    initrd: &Path,
    cmdline_extra: &str,
    tsc_khz: Option<u64>,
) -> Vec<OsString> {
    let mut cmdline = String::from("console=ttyS0 panic=-1");
    if let Some(khz) = tsc_khz {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    if !cmdline_extra.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(cmdline_extra);
    }
    let mut a: Vec<OsString> = [
        "-M",
        machine,
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        &format!("{ram_mib}M"),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
    ]
    .map(OsString::from)
    .into();
    a.push(kernel.into());
    a.push("-initrd".into());
    a.push(initrd.into());
    a.push("-append".into());
    a.push(cmdline.into());
    a
}

/// [`args`] with the guest's TSC rate given (`tsc_early_khz=`, omitted when `None`).
fn args_with_tsc(opts: &QemuOptions, ends: &BridgeEnds, tsc_khz: Option<u64>) -> Vec<OsString> {
    let mut a = guest_args_with_tsc(
        "microvm,acpi=on,rtc=on,pcie=on,memory-backend=mem",
        ends.ram_size >> 20,
        &opts.kernel,
        &opts.initrd,
        &opts.cmdline_extra,
        tsc_khz,
    );
    let more = [
        "-object".to_owned(),
        format!(
            "memory-backend-file,id=mem,size={},mem-path=/proc/self/fd/{},share=on",
            ends.ram_size, ends.ram_fd
        ),
        "-device".to_owned(),
        format!("x-pci-proxy-dev,id=remio0,fd={}", ends.proxy_fd),
        "-chardev".to_owned(),
        format!("socket,id=remio-iv,path={}", ends.ivshmem_path.display()),
        "-device".to_owned(),
        format!("ivshmem-doorbell,chardev=remio-iv,vectors={}", ends.vectors),
    ];
    a.extend(more.into_iter().map(OsString::from));
    a.extend(opts.extra_args.iter().cloned());
    a
}

/// A `Command` for QEMU that inherits the bridge's descriptors. The caller sets stdio.
pub fn command(opts: &QemuOptions, ends: &BridgeEnds) -> Command {
    let mut cmd = Command::new(&opts.qemu);
    cmd.args(args(opts, ends));
    let keep = [ends.proxy_fd, ends.ram_fd];
    // SAFETY: the closure only calls prctl and fcntl, which are async-signal-safe, on descriptors that
    // are open in the parent at fork time (the bridge owns them for its lifetime).
    unsafe {
        cmd.pre_exec(move || {
            // QEMU must not outlive the bridge's process, even if that is SIGKILLed.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            for fd in keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// `fd`'s raw number, for [`BridgeEnds`].
pub fn raw(fd: &impl AsRawFd) -> RawFd {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_names_the_inherited_fds_and_never_says_quiet() {
        let opts = QemuOptions {
            qemu: "qemu-system-x86_64".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline_extra: "remio.exec=true".into(),
            extra_args: vec![],
        };
        let ends = BridgeEnds {
            proxy_fd: 7,
            ram_fd: 9,
            ram_size: 256 << 20,
            ivshmem_path: "/tmp/iv".into(),
            vectors: 3,
        };
        let a: Vec<String> = args_with_tsc(&opts, &ends, Some(2_999_998))
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert!(a.contains(&"x-pci-proxy-dev,id=remio0,fd=7".to_string()));
        assert!(a.contains(&format!(
            "memory-backend-file,id=mem,size={},mem-path=/proc/self/fd/9,share=on",
            256u64 << 20
        )));
        assert!(a.contains(&"ivshmem-doorbell,chardev=remio-iv,vectors=3".to_string()));
        assert!(
            a.contains(&"console=ttyS0 panic=-1 tsc_early_khz=2999998 remio.exec=true".to_string())
        );
        assert!(!a.iter().any(|s| s.split(' ').any(|w| w == "quiet")));
    }

    #[test]
    fn cpuinfo_mhz_becomes_khz_and_nonsense_is_refused() {
        let text = "processor\t: 0\ncpu MHz\t\t: 2999.998\ncache size\t: 512 KB\n";
        assert_eq!(cpuinfo_khz(text), Some(2_999_998));
        assert_eq!(cpuinfo_khz("cpu MHz\t: 0.001\n"), None);
        assert_eq!(cpuinfo_khz("cpu MHz\t: fast\n"), None);
        assert_eq!(cpuinfo_khz("model name\t: x\n"), None);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn measured_tsc_rate_is_plausible_and_repeatable() {
        let khz = host_tsc_khz().expect("an x86_64 host has a TSC");
        assert!(PLAUSIBLE_TSC_KHZ.contains(&khz));
        let again = measure_tsc_khz().expect("a second measurement");
        assert!(
            khz.abs_diff(again) * 50 < khz,
            "{khz} kHz, then {again} kHz"
        );
    }
}
