//! A device model replaced under a live device, without the frontend noticing: `remio dm
//! --takeover PID` (an upgrade) and a fresh `remio dm` after a SIGKILL (a crash) both resume the
//! virtio device where the previous one left it, from the platform's state region.
//!
//! The platform runs in this process; the device models are real `remio dm` processes over the
//! socket API; the frontend is the hypervisor model's, driving a virtio-rng device the way
//! Linux's virtio-mmio driver does, with its virtqueue in the DM's shared memory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use remio::platform::{DeviceConfig, Platform, PlatformConfig};
use remio_hyp::FrontendVm;
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestMemoryMmap};

const MMIO: u64 = 0xa000_0000;
const SHMEM: u64 = 0x4000_0000;
const SHMEM_SIZE: u64 = 0x10_0000;
/// Long enough that an access made while no device model runs waits for the next one.
const TIMEOUT_MS: u64 = 20_000;

struct Dm {
    child: Child,
    lines: Receiver<String>,
}

impl Dm {
    fn spawn(dir: &Path, takeover: Option<u32>) -> Self {
        Self::spawn_with(dir, takeover, None)
    }

    /// With `crash`: armed with `REMIO_CRASH_POINT=<crash>` (`crates/virtio/src/crash_point.rs`).
    fn spawn_with(dir: &Path, takeover: Option<u32>, crash: Option<&str>) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_remio"));
        match crash {
            Some(spec) => cmd.env("REMIO_CRASH_POINT", spec),
            None => cmd.env_remove("REMIO_CRASH_POINT"),
        };
        cmd.args(["dm", "--config"])
            .arg(dir.join("dm.toml"))
            .arg("--socket")
            .arg(dir.join("api.sock"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(pid) = takeover {
            cmd.arg("--takeover").arg(pid.to_string());
        }
        let mut child = cmd.spawn().expect("spawning remio dm");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits (bounded) for `REMIO-DM-READY 1`.
    fn wait_ready(&self) {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(30))
                .expect("remio dm never said REMIO-DM-READY");
            if line == "REMIO-DM-READY 1" {
                return;
            }
            assert!(!line.starts_with("REMIO-DM-FAILED"), "{line}");
        }
    }
}

impl Drop for Dm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn setup(name: &str) -> (PathBuf, Platform) {
    setup_with(
        name,
        &format!("[[device]]\ndm_id = 0\ntype = \"rng\"\nmmio_base = {MMIO:#x}\n"),
    )
}

/// A platform with one DM and `dm.toml` holding `config`, in a fresh directory.
fn setup_with(name: &str, config: &str) -> (PathBuf, Platform) {
    let dir = std::env::temp_dir().join(format!("remio-takeover-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dm.toml"), config).unwrap();
    let platform = Platform::start(PlatformConfig {
        socket: Some(dir.join("api.sock")),
        slots: 4,
        timeout_ms: TIMEOUT_MS,
        device: vec![DeviceConfig {
            bind_key: 1,
            mmio_base: MMIO,
            mmio_size: 0x200,
            frontend_irq: 40,
            backend_irq: 80,
            shmem_base: SHMEM,
            shmem_size: SHMEM_SIZE,
        }],
        shmem_backing: None,
    })
    .unwrap();
    (dir, platform)
}

fn guest_memory(platform: &Platform) -> GuestMemoryMmap {
    let file = platform.dispatcher().dm(0).unwrap().shmem().unwrap();
    remio_api::map_file(file.try_clone().unwrap(), 0, SHMEM_SIZE, SHMEM).unwrap()
}

fn w(fe: &FrontendVm, reg: u32, value: u64) {
    fe.write(MMIO + u64::from(reg), 4, value).unwrap();
}

fn r(fe: &FrontendVm, reg: u32) -> u64 {
    fe.read(MMIO + u64::from(reg), 4).unwrap()
}

/// Linux's probe of the one-queue rng device, up to DRIVER_OK.
fn probe(fe: &FrontendVm, vq: &MockSplitQueue<'_, GuestMemoryMmap>) {
    assert_eq!(r(fe, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    for s in [0, 1, 3] {
        w(fe, VIRTIO_MMIO_STATUS, s);
    }
    w(fe, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    w(fe, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    w(fe, VIRTIO_MMIO_STATUS, 0xb);
    w(fe, VIRTIO_MMIO_QUEUE_SEL, 0);
    w(fe, VIRTIO_MMIO_QUEUE_NUM, 16);
    w(fe, VIRTIO_MMIO_QUEUE_DESC_LOW, vq.desc_table_addr().0);
    w(fe, VIRTIO_MMIO_QUEUE_AVAIL_LOW, vq.avail_addr().0);
    w(fe, VIRTIO_MMIO_QUEUE_USED_LOW, vq.used_addr().0);
    w(fe, VIRTIO_MMIO_QUEUE_READY, 1);
    w(fe, VIRTIO_MMIO_STATUS, 0xf);
    assert_eq!(r(fe, VIRTIO_MMIO_STATUS), 0xf);
}

/// Makes a 32-byte buffer available as descriptor `head`.
fn offer(vq: &MockSplitQueue<'_, GuestMemoryMmap>, head: u16) {
    let flags = u16::try_from(VRING_DESC_F_WRITE).unwrap();
    let d = Descriptor::new(SHMEM + 0x8000 + u64::from(head) * 0x100, 32, flags, 0);
    vq.add_desc_chains(&[RawDescriptor::from(d)], head).unwrap();
}

/// Offers a buffer as descriptor `head` and notifies queue 0.
fn request_entropy(fe: &FrontendVm, vq: &MockSplitQueue<'_, GuestMemoryMmap>, head: u16) {
    offer(vq, head);
    w(fe, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
}

/// Waits (bounded) until the used ring's index reaches `want`; returns it.
fn wait_used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, want: u16) -> u16 {
    for _ in 0..10_000 {
        let idx = vq.used().idx().load();
        if idx >= want {
            return idx;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    vq.used().idx().load()
}

#[test]
fn takeover_and_restart_after_sigkill_resume_the_device() {
    let (dir, platform) = setup("resume");
    let fe = platform.frontend().unwrap();
    let mem = guest_memory(&platform);
    let vq = MockSplitQueue::create(&mem, GuestAddress(SHMEM), 16);

    let first = Dm::spawn(&dir, None);
    first.wait_ready();
    probe(&fe, &vq);
    request_entropy(&fe, &vq, 0);
    assert_eq!(wait_used(&vq, 1), 1);

    // An upgrade: the new device model takes over, the old one exits cleanly.
    let mut old = first;
    let second = Dm::spawn(&dir, Some(old.child.id()));
    second.wait_ready();
    let status = old.child.wait().unwrap();
    assert!(
        status.success(),
        "the old device model exited with {status}"
    );

    assert_eq!(r(&fe, VIRTIO_MMIO_STATUS), 0xf, "still live, not reset");
    request_entropy(&fe, &vq, 1);
    assert_eq!(wait_used(&vq, 2), 2);

    // A crash: SIGKILL, the guest goes on (its notify waits at the DM), a new one resumes.
    let mut crashed = second;
    crashed.child.kill().unwrap();
    crashed.child.wait().unwrap();
    offer(&vq, 2);
    let fe2 = fe.clone();
    let during = std::thread::spawn(move || w(&fe2, VIRTIO_MMIO_QUEUE_NOTIFY, 0));
    let third = Dm::spawn(&dir, None);
    third.wait_ready();
    during.join().unwrap();

    assert_eq!(
        wait_used(&vq, 3),
        3,
        "the request made while no device model ran"
    );
    assert_eq!(r(&fe, VIRTIO_MMIO_STATUS), 0xf);
    assert_eq!(platform.hypervisor().stats().timeouts, 0);
    drop(third);
    drop(platform);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where block request `k` keeps its header, data and status byte.
fn blk_buffers(k: u16) -> (u64, u64, u64) {
    let base = SHMEM + 0x1_0000 + u64::from(k) * 0x1000;
    (base, base + 0x200, base + 0x400)
}

/// Makes a one-sector write of `fill` at sector `8 * k` available as descriptors `3k..3k+3`
/// (header, data, status) and notifies queue 0.
fn write_sector(
    fe: &FrontendVm,
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    k: u16,
    fill: u8,
) {
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use vm_memory::Bytes as _;
    let (hdr, data, status) = blk_buffers(k);
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    header[8..].copy_from_slice(&(u64::from(k) * 8).to_le_bytes());
    mem.write_slice(&header, GuestAddress(hdr)).unwrap();
    mem.write_slice(&[fill; 512], GuestAddress(data)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
    let next = u16::try_from(VRING_DESC_F_NEXT).unwrap();
    let write = u16::try_from(VRING_DESC_F_WRITE).unwrap();
    let first = 3 * k;
    let chain = [
        Descriptor::new(hdr, 16, next, first + 1),
        Descriptor::new(data, 512, next, first + 2),
        Descriptor::new(status, 1, write, 0),
    ]
    .map(RawDescriptor::from);
    vq.add_desc_chains(&chain, first).unwrap();
    w(fe, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
}

/// Waits (bounded) for `child` to end; its status.
fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..3000 {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the device model did not exit within 30 s");
}

/// Issue 14's crash points: a device model killed at each step of a virtio-blk write's life
/// (taken from the ring, written to the image, status written, used ring updated, before the
/// interrupt) is replaced by a new one that finishes the request: the write is on the image,
/// the driver finds it completed with VIRTIO_BLK_S_OK in the used ring and is interrupted for
/// it, and it was never answered twice.
#[test]
fn a_block_write_survives_a_crash_at_every_step_of_its_life() {
    use std::os::unix::process::ExitStatusExt as _;
    use vm_memory::Bytes as _;
    const POINTS: [&str; 5] = [
        "popped",
        "blk-written",
        "executed",
        "used",
        "before-interrupt",
    ];
    let img = std::env::temp_dir().join(format!("remio-crash-points-{}.img", std::process::id()));
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let (dir, platform) = setup_with(
        "crash-points",
        &format!(
            "[[device]]\ndm_id = 0\ntype = \"block\"\nmmio_base = {MMIO:#x}\npath = {:?}\n",
            img.display().to_string()
        ),
    );
    let fe = platform.frontend().unwrap();
    let mem = guest_memory(&platform);
    let vq = MockSplitQueue::create(&mem, GuestAddress(SHMEM), 16);
    let mut dm = Dm::spawn(&dir, None);
    dm.wait_ready();
    probe(&fe, &vq);

    for (k, point) in (0u16..).zip(POINTS) {
        // An upgrade to a device model armed to die at `point` of its first request.
        let mut armed = Dm::spawn_with(&dir, Some(dm.child.id()), Some(&format!("{point}:1")));
        armed.wait_ready();
        assert!(wait_exit(&mut dm.child).success());
        let fill = 0xa0 + u8::try_from(k).unwrap();

        write_sector(&fe, &mem, &vq, k, fill);
        let st = wait_exit(&mut armed.child);
        assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "{point}: not killed there"
        );
        dm = Dm::spawn(&dir, None);
        dm.wait_ready();

        assert_eq!(wait_used(&vq, k + 1), k + 1, "{point}: not completed once");
        let used = vq.used().ring().ref_at(usize::from(k)).unwrap().load();
        assert_eq!(
            used.id(),
            u32::from(3 * k),
            "{point}: another head completed"
        );
        let status: u8 = mem.read_obj(GuestAddress(blk_buffers(k).2)).unwrap();
        assert_eq!(status, 0, "{point}: status not VIRTIO_BLK_S_OK");
        let image = std::fs::read(&img).unwrap();
        let sector = usize::from(k) * 8 * 512;
        assert!(
            image[sector..sector + 512].iter().all(|&b| b == fill),
            "{point}: the data is not on the image"
        );
        assert_eq!(
            r(&fe, VIRTIO_MMIO_INTERRUPT_STATUS) & 1,
            1,
            "{point}: the driver was not interrupted for it"
        );
        w(&fe, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r(&fe, VIRTIO_MMIO_STATUS), 0xf, "{point}: not live");
    }

    assert_eq!(platform.hypervisor().stats().timeouts, 0);
    drop(dm);
    drop(platform);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&img);
}
