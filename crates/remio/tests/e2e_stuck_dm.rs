//! A device model that is stopped (SIGSTOP) does not hold up another device model's device: the
//! guest keeps writing and reading its disk, served by a second `remio dm` process, while every
//! register access to the stopped model's device completes anyway: the first within the access
//! timeout (the hypervisor's timeout value), the later ones at once (the bridge found the window
//! stuck, `Remote::with_access_timeout`). After SIGCONT that device answers again.
//!
//! `remio run` starts one device-model process for every device; this test needs two, so it
//! wires the platform the way `remio run` does, in this process: the hypervisor model whose
//! shared memory is the guest RAM, the dispatcher and its API socket
//! ([`remio::platform::Platform`]), the MPQEMU remote and the ivshmem server of the QEMU bridge,
//! and QEMU booting the remio guest with the script on its command line (`remio.exec=`). Device
//! 0 (the disk) is served by device model B, device 1 (rng) by device model A, each a
//! `remio dm` process with its own config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use remio::platform::{Platform, BACKEND_VM, FRONTEND_VM};
use remio_frontend::qemu::launch::{self, BridgeEnds};
use remio_frontend::qemu::{GuestRam, IvshmemServer, MmioTarget, QemuOptions, Remote};
use remio_hyp::{HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig};

mod e2e_common;
use e2e_common::*;

/// As `remio run`: device `i`'s window at `MMIO_BASE + i * WINDOW`, its frontend interrupt
/// `32 + i`, its backend interrupt `64 + i`.
const MMIO_BASE: u64 = 0x1000_0000;
const WINDOW: u64 = 0x200;
/// The access timeout (`remio run --access-timeout-ms`).
const ACCESS_TIMEOUT: Duration = Duration::from_millis(1000);
/// Disk rounds (write, then read back and compare) the guest makes while A is stopped, each
/// followed by one access to A's device.
const ROUNDS: u32 = 6;

/// The guest's side. `$r` is the rng device's sysfs directory; reading its `status` is one
/// trapped read of the virtio-mmio Status register, which only the device model answers
/// (0x0000000f while the driver runs; a timed-out or refused read gives 0). It waits
/// for the host to stop A, then does disk I/O, reading A's status after each round, then waits
/// for the host to continue A.
fn script() -> String {
    format!(
        r#"r=$(dirname $(grep -l 0x0004 /sys/bus/virtio/devices/*/device))
echo A-BEFORE $(cat $r/status)
echo STOP-ME
while [ "$(cat $r/status)" = 0x0000000f ]; do :; done
echo A-STOPPED
head -c 65536 /dev/urandom > /tmp/p
ok=0; stuck=0; i=0
while [ $i -lt {ROUNDS} ]; do
 dd if=/tmp/p of=/dev/vda bs=65536 seek=$i oflag=direct 2>/dev/null
 dd if=/dev/vda of=/tmp/q bs=65536 skip=$i count=1 iflag=direct 2>/dev/null
 cmp -s /tmp/p /tmp/q && ok=$((ok+1))
 [ "$(cat $r/status)" != 0x0000000f ] && stuck=$((stuck+1))
 i=$((i+1))
done
echo B-DONE ok=$ok stuck=$stuck
echo CONT-ME
while [ "$(cat $r/status)" != 0x0000000f ]; do :; done
echo A-AFTER $(cat $r/status)
"#
    )
}

fn hyp_config(n: u32, ram: &GuestRam) -> HypConfig {
    let dev = |i: u32, role| {
        let fe = role == Role::Frontend;
        RemioDeviceConfig {
            bind_key: i,
            role,
            mmio_base: if fe {
                MMIO_BASE + u64::from(i) * WINDOW
            } else {
                0
            },
            mmio_size: if fe { WINDOW } else { 0 },
            irq: if fe { 32 + i } else { 64 + i },
            shmem_id: 0,
            shmem_base: 0,
        }
    };
    HypConfig {
        shmem: vec![ShmemConfig {
            id: 0,
            size: ram.size(),
            backing: Some(ram.file().try_clone().unwrap()),
        }],
        vms: vec![
            VmConfig {
                id: FRONTEND_VM,
                remio_devices: (0..n).map(|i| dev(i, Role::Frontend)).collect(),
            },
            VmConfig {
                id: BACKEND_VM,
                remio_devices: (0..n).map(|i| dev(i, Role::Backend)).collect(),
            },
        ],
        slots: 4,
        timeout: Some(ACCESS_TIMEOUT),
    }
}

/// A `remio dm` process and its stdout lines.
struct Dm {
    child: Child,
    lines: Receiver<String>,
}

impl Dm {
    fn spawn(config: &Path, socket: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_remio"))
            .arg("dm")
            .arg("--config")
            .arg(config)
            .arg("--socket")
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning remio dm");
        let lines = lines_of(child.stdout.take().unwrap());
        Self { child, lines }
    }

    fn wait_ready(&self) {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .expect("remio dm never said REMIO-DM-READY");
            if line == "REMIO-DM-READY 1" {
                return;
            }
            assert!(!line.starts_with("REMIO-DM-FAILED"), "{line}");
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid; no memory involved.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }
}

impl Drop for Dm {
    fn drop(&mut self) {
        // A stopped process dies of SIGKILL all the same.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines_of(r: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn base64(data: &[u8]) -> String {
    use std::io::Write as _;
    let mut c = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("coreutils base64");
    c.stdin.take().unwrap().write_all(data).unwrap();
    String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap()
}

/// The value after `key=` in `line`'s words.
fn field(line: &str, key: &str) -> Option<u32> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

#[test]
fn a_stopped_device_model_delays_no_other_device_and_its_accesses_time_out() {
    if !prerequisites("e2e_stuck_dm") {
        return;
    }
    let _lock = boot_lock();
    let (dir, img) = temp_image(16 << 20);
    let dir = dir.as_path();
    let socket = dir.join("api.sock");
    std::fs::write(
        dir.join("b.toml"),
        format!(
            "[[device]]\ndm_id = 0\ntype = \"block\"\nmmio_base = {MMIO_BASE:#x}\npath = \"{}\"\n",
            img.display()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("a.toml"),
        format!(
            "[[device]]\ndm_id = 1\ntype = \"rng\"\nmmio_base = {:#x}\n",
            MMIO_BASE + WINDOW
        ),
    )
    .unwrap();

    // The platform: hypervisor model on the guest RAM, dispatcher, API socket.
    let ram = GuestRam::new(256 << 20).unwrap();
    let hyp = Hypervisor::new(hyp_config(2, &ram)).unwrap();
    let _platform = Platform::with_hypervisor(Arc::clone(&hyp), BACKEND_VM, Some(&socket)).unwrap();
    let dm_b = Dm::spawn(&dir.join("b.toml"), &socket);
    let dm_a = Dm::spawn(&dir.join("a.toml"), &socket);
    dm_b.wait_ready();
    dm_a.wait_ready();

    // The bridge: one MPQEMU remote for both windows, interrupts through ivshmem.
    let frontend = hyp.frontend(FRONTEND_VM).unwrap();
    let windows: Vec<u64> = frontend.devices().iter().map(|d| d.mmio_base).collect();
    let ivshmem = IvshmemServer::start(&dir.join("ivshmem.sock"), windows.len()).unwrap();
    for i in 0..windows.len() {
        let line = ivshmem.interrupt(i).unwrap();
        frontend
            .set_interrupt_sink(i, Arc::new(move || drop(line.raise())))
            .unwrap();
    }
    let target: Arc<dyn MmioTarget> = Arc::new(frontend.clone());
    let remote = Remote::new(windows, target, Some(ram.identity().unwrap()))
        .unwrap()
        .with_access_timeout(Some(ACCESS_TIMEOUT));
    let bridge = remote.stats();
    let (ours, qemu_end) = UnixStream::pair().unwrap();
    std::thread::spawn(move || remote.serve(ours));

    let qemu_bin = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .unwrap();
    let opts = QemuOptions {
        qemu: qemu_bin,
        kernel: guest_dir().join("vmlinuz"),
        initrd: guest_dir().join("initramfs.cpio"),
        cmdline_extra: format!("remio.exec={}", base64(script().as_bytes())),
        extra_args: vec![],
    };
    let ends = BridgeEnds {
        proxy_fd: qemu_end.as_raw_fd(),
        ram_fd: ram.file().as_raw_fd(),
        ram_size: ram.size(),
        ivshmem_path: ivshmem.path().to_owned(),
        vectors: ivshmem.vectors(),
    };
    let mut qemu = launch::command(&opts, &ends)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting QEMU");
    let serial = lines_of(qemu.stdout.take().unwrap());
    let qemu = Qemu(qemu);

    let start = Instant::now();
    let mut console = Vec::new();
    let mut stopped_at = None;
    let mut continued_at = None;
    let mut rounds = (None, None);
    let status = loop {
        let left = GUEST_TIMEOUT.saturating_sub(start.elapsed());
        let Ok(line) = serial.recv_timeout(left) else {
            break None;
        };
        eprintln!("guest: {line}");
        if line.starts_with("STOP-ME") {
            dm_a.signal(libc::SIGSTOP);
            stopped_at = Some(Instant::now());
        } else if line.starts_with("A-STOPPED") {
            rounds.0 = Some(Instant::now());
        } else if line.starts_with("B-DONE") {
            rounds.1 = Some(Instant::now());
        } else if line.starts_with("CONT-ME") {
            dm_a.signal(libc::SIGCONT);
            continued_at = Some(Instant::now());
        }
        let exit = line
            .strip_prefix("REMIO-EXIT ")
            .and_then(|s| s.trim().parse::<i32>().ok());
        console.push(line);
        if exit.is_some() {
            break exit;
        }
    };
    drop(qemu);
    let console = console.join("\n");
    let stats = hyp.stats();
    let (stalls, refused) = (
        bridge.stalls.load(Ordering::Relaxed),
        bridge.stuck_refused.load(Ordering::Relaxed),
    );
    let secs = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.1} s", b.duration_since(a).as_secs_f64()),
        _ => "-".to_owned(),
    };
    eprintln!(
        "device model A stopped for {}; {ROUNDS} disk rounds in {} meanwhile (access timeout \
         {ACCESS_TIMEOUT:?}); bridge: {stalls} stall(s), {refused} access(es) to A answered at \
         once; hypervisor: {} timeouts ({} pending, {} abandoned, {} waiting for a slot) of {} \
         requests",
        secs(stopped_at, continued_at),
        secs(rounds.0, rounds.1),
        stats.timeouts,
        stats.timeouts_pending,
        stats.timeouts_abandoned,
        stats.timeouts_no_slot,
        stats.requests
    );

    assert_eq!(
        status,
        Some(0),
        "the guest did not finish its script:\n{console}"
    );
    let line = |prefix: &str| {
        console
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line:\n{console}"))
            .to_owned()
    };
    assert_eq!(line("A-BEFORE"), "A-BEFORE 0x0000000f", "rng was live");
    let done = line("B-DONE");
    // The disk served every round while A was stopped, and every access to A during that
    // time completed without its device model.
    assert_eq!(field(&done, "ok"), Some(ROUNDS), "{done}");
    assert_eq!(field(&done, "stuck"), Some(ROUNDS), "{done}");
    assert_eq!(line("A-AFTER"), "A-AFTER 0x0000000f", "rng answers again");
    // The stall was found by an access that timed out (bounded by the access timeout); the
    // round's accesses to A were answered at once, by the bridge while it held the window
    // stuck or by the hypervisor while A held its abandoned request (a probe refused at once
    // looks like an answer to the bridge, which then stops holding the window); none timed
    // out waiting for a free request slot (A's stuck requests did not starve B's).
    assert!(stats.timeouts >= 1, "{stats:?}");
    assert!(stalls >= 1);
    assert!(
        refused + stats.refused_stuck >= u64::from(ROUNDS),
        "{refused} {stats:?}"
    );
    assert_eq!(stats.timeouts_no_slot - stats.refused_stuck, 0, "{stats:?}");
}
