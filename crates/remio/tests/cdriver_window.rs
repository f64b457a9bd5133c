//! The backend VM's host side in a real QEMU, without the C driver: the plain remio guest boots
//! as a "backend VM" wired by `BackendHost` (hypercall window, doorbell, the frontend's RAM as
//! ivshmem-plain) and drives the hypercall window by hand with busybox `devmem`: it reads the
//! window's identity, ASKs (nothing pending: +1), then serves one trapped frontend read that the
//! test issues on the hypervisor model, and reads and writes the frontend's RAM through the
//! ivshmem-plain BAR. This pins the host side of `--dispatcher c-driver` (QEMU's view of the
//! config space, 8-byte accesses, synchronous CALL, the shared memory's offset 0) independently
//! of the backend initramfs.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use remio_frontend::qemu::{BackendHost, BackendOptions, GuestRam};
use remio_hyp::{HypConfig, Hypervisor, RemioDeviceConfig, Role, ShmemConfig, VmConfig};

mod e2e_common;
use e2e_common::*;

/// The guest's script: find the devices, identify the window, ASK once (empty), say WAITING,
/// poll ASK until the test's read arrives, complete it, then touch the shared memory.
const SCRIPT: &str = r#"
hc=; shm=
for d in /sys/bus/pci/devices/*; do
  id="$(cat $d/vendor):$(cat $d/device)"
  [ "$id" = "0x1b36:0x00fe" ] && hc=$d
  if [ "$id" = "0x1af4:0x1110" ] && [ "$(sed -n 2p $d/resource | cut -d' ' -f1)" = "0x0000000000000000" ]; then shm=$d; fi
done
[ -n "$hc" ] && [ -n "$shm" ] || { echo "DEVICES-MISSING hc=$hc shm=$shm"; exit 2; }
echo 1 > $hc/enable; echo 1 > $shm/enable
w=$(head -1 $hc/resource | cut -d' ' -f1)
s=$(sed -n 3p $shm/resource | cut -d' ' -f1)
echo "MAGIC $(devmem $w 64)"
echo "VERSION $(devmem $((w + 8)) 64)"
echo "DMS $(devmem $((w + 16)) 64)"
echo "BANKS $(devmem $((w + 24)) 64)"
b=$((w + 0x140))
ask() { devmem $b 64 0; devmem $((b + 8)) 64 0; devmem $((b + 16)) 64 2; devmem $((b + 24)) 64 0; devmem $((b + 32)) 64 0; devmem $((b + 56)) 64 1; devmem $((b + 56)) 64; }
echo "EMPTY $(ask)"
echo REMIO-WAITING
i=0
while [ "$(ask)" != "0x0000000000000000" ]; do
  i=$((i + 1)); [ $i -lt 2000 ] || { echo ASK-GAVE-UP; exit 3; }
  sleep 0.05
done
echo "REQ addr=$(devmem $((b + 8)) 64) op=$(devmem $((b + 16)) 64) width=$(devmem $((b + 40)) 64) pending=$(devmem $((b + 48)) 64)"
rid=$(devmem $((b + 32)) 64)
devmem $((b + 16)) 64 1; devmem $((b + 24)) 64 0x5a5a1234; devmem $((b + 32)) 64 $rid
devmem $((b + 56)) 64 1
echo "DONE $(devmem $((b + 56)) 64)"
echo "SHM $(devmem $((s + 0x100000)) 64)"
devmem $((s + 0x100008)) 64 0x1122334455667788
"#;

#[test]
fn a_qemu_backend_vm_drives_the_hypercall_window_and_sees_the_frontends_ram() {
    if !prerequisites("cdriver_window") {
        return;
    }
    let ram = GuestRam::new(16 << 20).unwrap();
    ram.file()
        .write_all_at(&0x0123_4567_89ab_cdefu64.to_le_bytes(), 0x10_0000)
        .unwrap();
    let dev = |role| RemioDeviceConfig {
        bind_key: 0,
        role,
        mmio_base: if role == Role::Frontend {
            0x1000_0000
        } else {
            0
        },
        mmio_size: if role == Role::Frontend { 0x200 } else { 0 },
        irq: if role == Role::Frontend { 32 } else { 64 },
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
                remio_devices: vec![dev(Role::Frontend)],
            },
            VmConfig {
                id: 2,
                remio_devices: vec![dev(Role::Backend)],
            },
        ],
        slots: 4,
        timeout: Some(GUEST_TIMEOUT),
    })
    .unwrap();
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-cdw").unwrap();
    let host = BackendHost::start(
        &hyp.backend(2).unwrap(),
        &ram,
        &dir.as_path().join("biv.sock"),
    )
    .unwrap();
    let gdir = guest_dir();
    let opts = BackendOptions {
        qemu: "qemu-system-x86_64".into(),
        kernel: gdir.join("vmlinuz"),
        initrd: gdir.join("initramfs.cpio"),
        cmdline_extra: format!("remio.exec={}", base64(SCRIPT.as_bytes())),
        disk: None,
        ram_mib: 256,
    };

    let _lock = boot_lock();
    let start = Instant::now();
    let mut child = host
        .command(&opts)
        .unwrap()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let line = line.trim_end_matches('\r').to_owned();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let fe = hyp.frontend(1).unwrap();
    let mut lines = Vec::new();
    let mut access = None;
    let mut status = None;
    while status.is_none() && start.elapsed() < GUEST_TIMEOUT {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            if matches!(child.try_wait(), Ok(Some(_))) {
                break;
            }
            continue;
        };
        if line == "REMIO-WAITING" && access.is_none() {
            let fe = fe.clone();
            access = Some(std::thread::spawn(move || fe.read(0x1000_0010, 4)));
        }
        if let Some(s) = line.strip_prefix("REMIO-EXIT ") {
            status = s.trim().parse::<i32>().ok();
        }
        lines.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let console = lines.join("\n");
    eprintln!(
        "--- backend console ({:.1} s) ---\n{console}",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(status, Some(0), "the guest script failed");
    let has = |s: &str| lines.iter().any(|l| l == s);
    assert!(has("MAGIC 0x3143484F494D4552"), "REMIOHC1");
    assert!(has("VERSION 0x0000000000000001"));
    assert!(has("DMS 0x0000000000000001"));
    assert!(has("BANKS 0x0000000000000010"));
    assert!(has("EMPTY 0x0000000000000001"), "ASK with nothing: +1");
    assert!(has(
        "REQ addr=0x0000000010000010 op=0x0000000000000001 width=0x0000000000000004 pending=0x0000000000000000"
    ));
    assert!(has("DONE 0x0000000000000000"));
    let value = access.expect("the guest never waited").join().unwrap();
    assert_eq!(
        value.unwrap(),
        0x5a5a_1234,
        "the frontend reads the completion"
    );
    assert!(
        has("SHM 0x0123456789ABCDEF"),
        "the backend reads frontend RAM at offset 0"
    );
    let mut b = [0u8; 8];
    ram.file().read_exact_at(&mut b, 0x10_0008).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
    let stats = host.window_stats();
    assert!(stats.calls.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    assert_eq!(
        stats
            .bad_accesses
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// The guest's `remio.exec=` encoding (standard base64 with padding).
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}
