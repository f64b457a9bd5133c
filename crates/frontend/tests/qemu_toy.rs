//! Boots the real guest under QEMU TCG with the bridge in front of the hypervisor model and a
//! toy backend (an inline ASK loop answering a minimal virtio-mmio register file), and checks
//! that the guest's stock `virtio_mmio` driver finds one virtio device per window.
//!
//! Skips (loudly) when qemu-system-x86_64 or the guest artifacts (`remio guest build`) are
//! missing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use remio_abi::{Hypercall, InterruptController, RemioArgs, RemioOp};
use remio_frontend::qemu::{Bridge, GuestRam, QemuOptions};
use remio_hyp::{HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig};

const WINDOWS: usize = 2;
const TOY_DEVICE_ID: u64 = 0x7e57;

fn guest_dir() -> PathBuf {
    std::env::var_os("REMIO_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.is_file())
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The toy device's registers: magic, version 2, a device id no guest driver claims, and a
/// status register the driver's reset polls.
#[derive(Default)]
struct Toy {
    status: [AtomicU32; WINDOWS],
}

impl Toy {
    fn read(&self, window: usize, off: u64) -> u64 {
        match off {
            0x000 => 0x7472_6976,
            0x004 => 2,
            0x008 => TOY_DEVICE_ID,
            0x00c => 0x554d_4551,
            0x070 => u64::from(self.status[window].load(Ordering::Relaxed)),
            _ => 0,
        }
    }
    fn write(&self, window: usize, off: u64, value: u64) {
        if off == 0x070 {
            self.status[window].store(value as u32, Ordering::Relaxed);
        }
    }
}

#[test]
fn guest_virtio_mmio_probes_one_device_per_window_through_the_bridge() {
    let Some(qemu) = which("qemu-system-x86_64") else {
        eprintln!("SKIPPED: qemu-system-x86_64 not found (run scripts/setup)");
        return;
    };
    let dir = guest_dir();
    let (kernel, initrd) = (dir.join("vmlinuz"), dir.join("initramfs.cpio"));
    if !kernel.is_file() || !initrd.is_file() {
        eprintln!(
            "SKIPPED: guest artifacts missing in {} (run `remio guest build`)",
            dir.display()
        );
        return;
    }

    let ram = GuestRam::new(256 << 20).unwrap();
    let base = 0x1000_0000u64;
    let dev = |i: u64, role| RemioDeviceConfig {
        bind_key: i as u32,
        role,
        mmio_base: if role == Role::Frontend {
            base + i * 0x200
        } else {
            0
        },
        mmio_size: if role == Role::Frontend { 0x200 } else { 0 },
        irq: if role == Role::Frontend {
            40 + i as u32
        } else {
            52 + i as u32
        },
        shmem_id: 0,
        shmem_base: 0,
    };
    let hyp = Hypervisor::new(HypConfig {
        shmem: vec![ShmemConfig {
            id: 0,
            size: ram.size(),
            backing: Some(ram.file().try_clone().unwrap()),
        }],
        vms: vec![
            VmConfig {
                id: 1,
                remio_devices: (0..WINDOWS as u64)
                    .map(|i| dev(i, Role::Frontend))
                    .collect(),
            },
            VmConfig {
                id: 2,
                remio_devices: (0..WINDOWS as u64).map(|i| dev(i, Role::Backend)).collect(),
            },
        ],
        slots: 4,
        timeout: Some(Duration::from_secs(5)),
    })
    .unwrap();
    let backend = hyp.backend(2).unwrap();
    let toy = Arc::new(Toy::default());
    for i in 0..WINDOWS {
        let (b, toy) = (backend.clone(), Arc::clone(&toy));
        let handler = Arc::new(move || loop {
            let ask = b.remote_io(&RemioArgs {
                dm_id: i as u64,
                op: RemioOp::Ask as u64,
                ..Default::default()
            });
            if ask.status != 0 {
                break;
            }
            let off = ask.addr - (base + i as u64 * 0x200);
            let value = if ask.op == RemioOp::Read as u64 {
                toy.read(i, off)
            } else {
                toy.write(i, off, ask.value);
                0
            };
            b.remote_io(&RemioArgs {
                dm_id: i as u64,
                op: ask.op,
                value,
                request_id: ask.request_id,
                ..Default::default()
            });
        });
        backend.request_irq(52 + i as u32, handler).unwrap();
    }
    let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-toy").unwrap();
    let bridge = Bridge::for_frontend(
        &hyp.frontend(1).unwrap(),
        &ram,
        &tmp.as_path().join("iv.sock"),
        &|_| Box::new(remio_frontend::qemu::OpaqueDevice),
    )
    .unwrap();

    let default_script = "ls /sys/bus/virtio/devices; for d in /sys/bus/virtio/devices/*; do echo DEV $(cat $d/device) $(cat $d/vendor); done; dmesg | grep -i remio";
    // REMIO_TOY_SCRIPT replaces the guest script (for poking at the guest by hand).
    let script = std::env::var("REMIO_TOY_SCRIPT").unwrap_or_else(|_| default_script.to_owned());
    let opts = QemuOptions {
        qemu,
        kernel,
        initrd,
        cmdline_extra: format!(
            "{} remio.exec={}",
            std::env::var("REMIO_TOY_CMDLINE").unwrap_or_default(),
            base64(script.as_bytes())
        ),
        extra_args: vec![],
    };
    let start = Instant::now();
    let mut child = bridge
        .qemu_command(&opts)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = Arc::new(Mutex::new(String::new()));
    let reader = {
        let out = Arc::clone(&out);
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(90) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap();
    let out = out.lock().unwrap().clone();
    let (n, mean_ns) = bridge.stats().bar_summary();
    eprintln!(
        "{out}\n--- boot took {:?}; {n} BAR accesses, mean remote service {mean_ns} ns",
        start.elapsed()
    );

    assert!(
        out.contains("REMIO-EXIT 0"),
        "guest did not finish its script"
    );
    let devs = out
        .lines()
        .filter(|l| l.starts_with("DEV 0x7e57 0x554d4551"))
        .count();
    assert_eq!(devs, WINDOWS, "one toy virtio device per window");
}
