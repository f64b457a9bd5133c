//! The QEMU command line that makes a guest a frontend of this bridge
//! (`spec/qemu-frontend.md`, "Machine").

use std::ffi::OsString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

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

/// The full argument list (without the binary).
pub fn args(opts: &QemuOptions, ends: &BridgeEnds) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    push("-M");
    push("microvm,acpi=on,rtc=on,pcie=on,memory-backend=mem");
    push("-accel");
    push("tcg");
    push("-cpu");
    push("max");
    push("-smp");
    push("1");
    push("-m");
    push(&format!("{}M", ends.ram_size >> 20));
    push("-object");
    push(&format!(
        "memory-backend-file,id=mem,size={},mem-path=/proc/self/fd/{},share=on",
        ends.ram_size, ends.ram_fd
    ));
    push("-nodefaults");
    push("-no-user-config");
    push("-nographic");
    push("-serial");
    push("stdio");
    push("-no-reboot");
    push("-device");
    push(&format!("x-pci-proxy-dev,id=remio0,fd={}", ends.proxy_fd));
    push("-chardev");
    a.push(OsString::from(format!(
        "socket,id=remio-iv,path={}",
        ends.ivshmem_path.display()
    )));
    a.push("-device".into());
    a.push(format!("ivshmem-doorbell,chardev=remio-iv,vectors={}", ends.vectors).into());
    a.push("-kernel".into());
    a.push(opts.kernel.clone().into());
    a.push("-initrd".into());
    a.push(opts.initrd.clone().into());
    a.push("-append".into());
    let mut cmdline = String::from("console=ttyS0 panic=-1");
    if !opts.cmdline_extra.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&opts.cmdline_extra);
    }
    a.push(cmdline.into());
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
        let a: Vec<String> = args(&opts, &ends)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert!(a.contains(&"x-pci-proxy-dev,id=remio0,fd=7".to_string()));
        assert!(a.contains(&format!(
            "memory-backend-file,id=mem,size={},mem-path=/proc/self/fd/9,share=on",
            256u64 << 20
        )));
        assert!(a.contains(&"ivshmem-doorbell,chardev=remio-iv,vectors=3".to_string()));
        assert!(a.contains(&"console=ttyS0 panic=-1 remio.exec=true".to_string()));
        assert!(!a.iter().any(|s| s.split(' ').any(|w| w == "quiet")));
    }
}
