//! `remio stats` finds a `remio platform` as it finds a `remio run`: its stats socket is in the
//! same per-user run directory (here a private $XDG_RUNTIME_DIR), and the counters it serves
//! are exactly what a frontend did through it.
//!
//! The first test runs real `remio platform` and `remio dm` processes (a standalone platform has
//! no frontend, so nothing traps: every access counter is exactly zero, the session is there).
//! The second drives accesses: the platform runs in this process, served for `remio stats` by
//! the very function `remio platform` uses (`remio::stats::serve_platform`), with a real
//! `remio dm` and the hypervisor model's frontend driving a virtio-rng device as Linux's
//! virtio-mmio driver does; every route's count is then known exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
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
/// Bytes of entropy each request asks for.
const ENTROPY: u64 = 32;

/// A child process killed (if still running) when the test ends, with its stdout or stderr
/// lines on a channel.
struct Proc {
    child: Child,
    lines: Receiver<String>,
}

impl Proc {
    /// Spawns `remio ARGS` with `XDG_RUNTIME_DIR=xdg`, reading the lines of its stdout, or of
    /// its stderr (the log) with `log_lines`.
    fn spawn(xdg: &Path, args: &[&str], log_lines: bool) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_remio"));
        cmd.args(args)
            .env("XDG_RUNTIME_DIR", xdg)
            .env("RUST_LOG", "info")
            .env_remove("REMIO_CRASH_POINT")
            .stdin(Stdio::null());
        if log_lines {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::piped());
        } else {
            cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        }
        let mut child = cmd.spawn().expect("spawning remio");
        let (tx, lines) = channel();
        let out: Box<dyn std::io::Read + Send> = if log_lines {
            Box::new(child.stderr.take().unwrap())
        } else {
            Box::new(child.stdout.take().unwrap())
        };
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("  | {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Waits (bounded) for a line containing `marker`; returns it.
    fn wait_line(&self, marker: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("never printed {marker:?}"));
            if line.contains(marker) {
                return line;
            }
            assert!(!line.starts_with("REMIO-DM-FAILED"), "{line}");
        }
    }

    /// SIGTERM, then waits (bounded) for a clean exit.
    fn stop(&mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill has no memory preconditions; `pid` is our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        for _ in 0..3000 {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "exited with {st}");
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("did not exit within 30 s of SIGTERM");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `remio stats ARGS` with `XDG_RUNTIME_DIR=xdg`.
fn stats(xdg: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_remio"))
        .arg("stats")
        .args(args)
        .env("XDG_RUNTIME_DIR", xdg)
        .output()
        .unwrap()
}

/// `remio stats --json ARGS`, checked to succeed, decoded.
fn stats_json(xdg: &Path) -> (serde_json::Value, String) {
    let out = stats(xdg, &["--json"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    (serde_json::from_slice(&out.stdout).unwrap(), err)
}

fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {v:#}"))
}

fn platform_toml(api: &Path) -> String {
    format!(
        "socket = {:?}\nslots = 4\ntimeout_ms = 20000\n\n[[device]]\nbind_key = 1\n\
         mmio_base = {MMIO:#x}\nmmio_size = 0x200\nfrontend_irq = 40\nbackend_irq = 80\n\
         shmem_base = {SHMEM:#x}\nshmem_size = {SHMEM_SIZE:#x}\n",
        api.display().to_string()
    )
}

fn dm_toml() -> String {
    format!("[[device]]\ndm_id = 0\ntype = \"rng\"\nmmio_base = {MMIO:#x}\n")
}

fn tmp(name: &str) -> vmm_sys_util::tempdir::TempDir {
    vmm_sys_util::tempdir::TempDir::new_with_prefix(format!("/tmp/remio-pstats-{name}")).unwrap()
}

#[test]
fn remio_stats_finds_a_running_remio_platform_and_says_which_when_several_run() {
    let xdg = tmp("procs");
    let xdg = xdg.as_path();
    let run_dir = xdg.join("remio");
    let none = stats(xdg, &["--once"]);
    assert!(!none.status.success());
    let msg = String::from_utf8_lossy(&none.stderr);
    assert!(
        msg.contains(&run_dir.display().to_string()) && msg.contains("remio platform"),
        "the error names where it looked and what it looked for: {msg}"
    );

    let api = xdg.join("api.sock");
    std::fs::write(xdg.join("platform.toml"), platform_toml(&api)).unwrap();
    std::fs::write(xdg.join("dm.toml"), dm_toml()).unwrap();
    let cfg = xdg.join("platform.toml");
    let mut platform = Proc::spawn(xdg, &["platform", "--config", cfg.to_str().unwrap()], true);
    platform.wait_line("counters for `remio stats` on");
    let dm_cfg = xdg.join("dm.toml");
    let dm = Proc::spawn(
        xdg,
        &[
            "dm",
            "--config",
            dm_cfg.to_str().unwrap(),
            "--socket",
            api.to_str().unwrap(),
        ],
        false,
    );
    dm.wait_line("REMIO-DM-READY 1");

    let (v, err) = stats_json(xdg);

    assert!(err.is_empty(), "one platform runs: nothing to say: {err}");
    assert_eq!(v["kind"].as_str(), Some("platform"));
    assert_eq!(u(&v, "pid"), u64::from(platform.child.id()));
    let api_key = std::fs::canonicalize(&api).unwrap();
    assert_eq!(v["api_socket"].as_str(), api_key.to_str());
    assert_eq!(v["dms"].as_array().unwrap().len(), 1);
    let dm0 = &v["dms"][0];
    assert_eq!(dm0["session_state"].as_str(), Some("serving"));
    assert_eq!((u(dm0, "sessions"), u(dm0, "restarts")), (1, 0));
    // No frontend: nothing trapped, nothing dispatched, nothing injected.
    for key in [
        "trapped",
        "requests",
        "to_control",
        "interrupts",
        "timeouts",
    ] {
        assert_eq!(u(dm0, key), 0, "{key}");
    }
    let dev = &dm0["device"];
    assert!(
        dev["description"].as_str().unwrap().contains("rng"),
        "the device model's counters are attached: {v:#}"
    );
    let table = stats(xdg, &["--once"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.starts_with(&format!("remio platform pid {}", platform.child.id())),
        "{table}"
    );

    // A second platform (another API socket): the newest is shown, the note names both.
    let api2 = xdg.join("api2.sock");
    std::fs::write(xdg.join("platform2.toml"), platform_toml(&api2)).unwrap();
    let cfg2 = xdg.join("platform2.toml");
    let mut second = Proc::spawn(xdg, &["platform", "--config", cfg2.to_str().unwrap()], true);
    second.wait_line("counters for `remio stats` on");

    let (v, err) = stats_json(xdg);

    assert_eq!(u(&v, "pid"), u64::from(second.child.id()), "the newest");
    assert!(err.contains("2 remio processes"), "{err}");
    assert!(
        err.contains(&format!("showing the newest, pid {}", second.child.id())),
        "{err}"
    );
    assert!(
        err.contains(&format!("pid {} (remio platform", platform.child.id())),
        "{err}"
    );
    let list = stats(xdg, &["--list"]);
    let list = String::from_utf8_lossy(&list.stdout);
    assert_eq!(list.lines().count(), 2, "{list}");
    assert!(
        list.contains(&format!("pid {} (remio platform", platform.child.id())),
        "{list}"
    );

    second.stop();
    drop(dm);
    platform.stop();
    let gone = stats(xdg, &["--json"]);
    assert!(!gone.status.success(), "nothing runs any more");
    assert!(
        !run_dir.read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("stats-")),
        "the platforms removed their sockets"
    );
}

fn w(fe: &FrontendVm, reg: u32, value: u64) {
    fe.write(MMIO + u64::from(reg), 4, value).unwrap();
}

fn r(fe: &FrontendVm, reg: u32) -> u64 {
    fe.read(MMIO + u64::from(reg), 4).unwrap()
}

/// Linux's probe of the one-queue rng device, up to DRIVER_OK: 15 register accesses, all of
/// which go to the device model's control client.
const PROBE_ACCESSES: u64 = 15;

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

/// Counts the frontend interrupts of device 0; a test waits on the count.
#[derive(Default)]
struct Irqs {
    count: Mutex<u64>,
    cv: Condvar,
}

impl Irqs {
    fn wait_for(&self, n: u64) -> u64 {
        let g = self.count.lock().unwrap();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(30), |c| *c < n)
            .unwrap();
        *g
    }
}

/// Waits (bounded) until the used ring's index reaches `want`; returns it.
fn wait_used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, want: u16) -> u16 {
    for _ in 0..30_000 {
        let idx = vq.used().idx().load();
        if idx >= want {
            return idx;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    vq.used().idx().load()
}

#[test]
fn a_platforms_counters_are_exactly_what_its_frontend_did() {
    // One per descriptor of the 16-entry queue (the mock queue does not wrap its ring).
    const REQUESTS: u16 = 16;
    let xdg = tmp("exact");
    let xdg = xdg.as_path();
    let run_dir = xdg.join("remio");
    let api = xdg.join("api.sock");
    std::fs::write(xdg.join("dm.toml"), dm_toml()).unwrap();
    let platform = Platform::start(PlatformConfig {
        socket: Some(api.clone()),
        slots: 4,
        timeout_ms: 20_000,
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
    let server = remio::stats::serve_platform(&platform, &run_dir).unwrap();
    let dm_cfg: PathBuf = xdg.join("dm.toml");
    let dm = Proc::spawn(
        xdg,
        &[
            "dm",
            "--config",
            dm_cfg.to_str().unwrap(),
            "--socket",
            api.to_str().unwrap(),
        ],
        false,
    );
    dm.wait_line("REMIO-DM-READY 1");
    let fe = platform.frontend().unwrap();
    let irqs = Arc::new(Irqs::default());
    let sink = Arc::clone(&irqs);
    fe.set_interrupt_sink(
        0,
        Arc::new(move || {
            *sink.count.lock().unwrap() += 1;
            sink.cv.notify_all();
        }),
    )
    .unwrap();
    let file = platform.dispatcher().dm(0).unwrap().shmem().unwrap();
    let mem = remio_api::map_file(file.try_clone().unwrap(), 0, SHMEM_SIZE, SHMEM).unwrap();
    let vq = MockSplitQueue::create(&mem, GuestAddress(SHMEM), 16);

    probe(&fe, &vq);
    for k in 0..REQUESTS {
        // Offer a buffer, notify (the queue's ioeventfd), wait for the used element and the
        // interrupt, then read InterruptStatus and ACK it (both from the status word).
        let head = k;
        let flags = u16::try_from(VRING_DESC_F_WRITE).unwrap();
        let buf = SHMEM + 0x8000 + u64::from(head) * 0x100;
        let d = Descriptor::new(buf, u32::try_from(ENTROPY).unwrap(), flags, 0);
        vq.add_desc_chains(&[RawDescriptor::from(d)], head).unwrap();
        w(&fe, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(wait_used(&vq, k + 1), k + 1, "request {k} not completed");
        assert_eq!(irqs.wait_for(u64::from(k) + 1), u64::from(k) + 1);
        assert_eq!(r(&fe, VIRTIO_MMIO_INTERRUPT_STATUS) & 1, 1);
        w(&fe, VIRTIO_MMIO_INTERRUPT_ACK, 1);
    }

    let (v, err) = stats_json(xdg);
    eprintln!("{v:#}");

    assert!(err.is_empty(), "{err}");
    assert_eq!(v["kind"].as_str(), Some("platform"));
    assert_eq!(u(&v, "pid"), u64::from(std::process::id()));
    let n = u64::from(REQUESTS);
    let accesses = PROBE_ACCESSES + 3 * n;
    assert_eq!(
        (u(&v, "requests"), u(&v, "completions"), u(&v, "timeouts")),
        (accesses, accesses, 0)
    );
    assert_eq!(u(&v, "interrupts"), n);
    let dm0 = &v["dms"][0];
    assert_eq!(u(dm0, "trapped"), accesses);
    assert_eq!(u(dm0, "completions"), accesses);
    assert_eq!(u(dm0, "latency_count"), accesses);
    assert_eq!((u(dm0, "waiting"), u(dm0, "pending")), (0, 0));
    assert_eq!(
        u(dm0, "requests"),
        accesses,
        "every access went to the dispatcher"
    );
    assert_eq!(u(dm0, "to_control"), PROBE_ACCESSES);
    assert_eq!(u(dm0, "to_ioeventfd"), n);
    assert_eq!(u(dm0, "to_status_word"), 2 * n);
    assert_eq!(u(dm0, "to_io_client"), 0);
    assert_eq!(u(dm0, "interrupts"), n);
    let (p50, p99, max) = (
        u(dm0, "latency_p50_ns"),
        u(dm0, "latency_p99_ns"),
        u(dm0, "latency_max_ns"),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{p50} {p99} {max}");
    let dev = &dm0["device"];
    assert_eq!(u(&dev["requests"], "read"), n);
    assert_eq!(u(&dev["bytes"], "read"), n * ENTROPY);
    assert_eq!((u(dev, "errors"), u(dev, "needs_reset")), (0, 0));

    drop(dm);
    drop(server);
    drop(platform);
}
