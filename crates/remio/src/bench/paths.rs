//! The remio paths being measured: control (a register read served by a device-model process
//! over the socket API), notify (a QueueNotify write through the ioeventfd path), and scale
//! (both mixed, over 1 and 16 DMs at once), plus the memory an idle DM costs.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use remio::platform::{DeviceConfig, Platform, PlatformConfig};
use remio_api::socket::SocketApi;
use remio_api::{DmApi, DmSession, VirtioRequest};
use remio_dispatcher::IoeventfdConfig;
use remio_hyp::FrontendVm;
use vmm_sys_util::eventfd::EventFd;

use super::child::ChildProcess;
use super::cpu::CpuMeter;
use super::floors::{spin_for, stamp};
use super::stats::Samples;

/// What the device-model child answers to every read: a value the frontend can recognise, so
/// that a read completed by a timeout (value 0) is never mistaken for a served one.
const SERVED: u64 = 0x7269_6f6d;
/// virtio-mmio QueueNotify (virtio 1.2 §4.2.2).
const QUEUE_NOTIFY: u64 = 0x50;
/// Register window of each device.
const WINDOW: u64 = 0x200;
const MMIO_BASE: u64 = 0xa000_0000;

/// One Remote I/O device pair per DM, windows side by side, 64 KiB of shared memory each.
fn platform(dms: u32, socket: Option<&Path>) -> anyhow::Result<Platform> {
    let device = (0..dms)
        .map(|i| DeviceConfig {
            bind_key: i + 1,
            mmio_base: MMIO_BASE + u64::from(i) * 0x1000,
            mmio_size: WINDOW,
            frontend_irq: 40 + i,
            backend_irq: 80 + i,
            shmem_base: 0x1_0000_0000 + u64::from(i) * 0x10_0000,
            shmem_size: 0x1_0000,
        })
        .collect();
    Platform::start(PlatformConfig {
        socket: socket.map(Path::to_path_buf),
        slots: 64,
        timeout_ms: 10_000,
        device,
        shmem_backing: None,
    })
}

/// A socket path in `dir` not used before by this run (groups run several times).
fn fresh_socket(dir: &Path, name: &str) -> std::path::PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(
        "{name}-{}.sock",
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

fn base_of(dm: u32) -> u64 {
    MMIO_BASE + u64::from(dm) * 0x1000
}

/// Reads until the device-model child answers, so that measuring starts with it attached.
fn wait_served(fe: &FrontendVm, dms: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for dm in 0..dms {
        loop {
            if fe.read(base_of(dm), 4).context("warm-up read")? == SERVED {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the device-model child never answered DM {dm}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// Control path: round trips of a register read served by a device-model process; with the
/// CPU time (platform and device-model processes) per read, in ns.
pub fn control(dir: &Path, iterations: usize) -> anyhow::Result<(Samples, f64)> {
    let socket = fresh_socket(dir, "control");
    let platform = platform(1, Some(&socket))?;
    let fe = platform.frontend().context("no frontend VM")?;
    let child = ChildProcess::spawn("serve-dm", Path::new(&format!("{}:1", socket.display())))?;
    wait_served(&fe, 1)?;
    let mut samples = Samples::with_capacity(iterations);
    for _ in 0..iterations / 10 {
        fe.read(base_of(0), 4)?;
    }
    let meter = CpuMeter::start(&[child.pid()])?;
    for _ in 0..iterations {
        let t0 = Instant::now();
        let v = fe.read(base_of(0), 4)?;
        samples.push(t0.elapsed());
        anyhow::ensure!(v == SERVED, "a control read returned {v:#x}: timed out?");
    }
    let cpu = meter.stop()?.per_op_ns(iterations as u64);
    Ok((samples, cpu))
}

/// The device-model child of [`control`] and [`scale`]: `SOCKET:N` serves DMs 0..N, one
/// thread each, answering every read with [`SERVED`].
pub fn serve_dm_child(arg: &Path) -> anyhow::Result<()> {
    let arg = arg.to_str().context("child argument is not UTF-8")?;
    let (socket, n) = arg.rsplit_once(':').context("expected SOCKET:N")?;
    let n: u32 = n.parse().context("DM count")?;
    let api = SocketApi::connect(socket);
    let threads: Vec<_> = (0..n)
        .map(|dm| {
            let session = api.open(dm);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let session = session.with_context(|| format!("opening DM {dm}"))?;
                serve(session.as_ref())
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a serving thread panicked"))??;
    }
    Ok(())
}

fn serve(session: &dyn DmSession) -> anyhow::Result<()> {
    let mut req = session.attach()?;
    loop {
        let reply = VirtioRequest {
            value: SERVED,
            ..req
        };
        req = session.complete_and_attach(&reply)?;
    }
}

/// An ioeventfd on DM `dm`'s QueueNotify for queue 0, as a virtio device model registers it.
fn notify_eventfd(platform: &Platform, dm: u32) -> anyhow::Result<Arc<EventFd>> {
    let fd = Arc::new(EventFd::new(0)?);
    platform
        .dispatcher()
        .dm(dm)
        .map_err(|e| anyhow::anyhow!("DM {dm}: {e}"))?
        .ioeventfd(IoeventfdConfig {
            fd: fd.clone(),
            addr: base_of(dm) + QUEUE_NOTIFY,
            len: 4,
            datamatch: Some(0),
            deassign: false,
        })
        .map_err(|e| anyhow::anyhow!("assigning the ioeventfd: {e}"))?;
    Ok(fd)
}

/// What the notify path measured.
#[derive(Debug)]
pub struct NotifyFigures {
    /// One-way latency from the write to the worker waking.
    pub latency: Samples,
    /// Back-to-back writes per second.
    pub per_s: f64,
    /// CPU ns per write in the back-to-back run (the writer and the draining worker).
    pub cpu_ns_per_write: f64,
    /// The same rate with bare eventfd writes (the floor of `per_s`).
    pub floor_per_s: f64,
    /// Wall ns per QueueNotify write with no thread waiting on the eventfd: what the path
    /// costs its writer, without the wake-ups that dominate `per_s`.
    pub path_ns: f64,
    /// Wall ns per bare eventfd write with no thread waiting (the floor of `path_ns`).
    pub write_floor_ns: f64,
}

/// Reads and resets `fd`'s count, 0 when nothing was written: without blocking, so that a
/// path that lost its writes is an error, not a read that never returns.
fn count_now(fd: &EventFd) -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let mut poll = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid `pollfd` that lives across the call, a zero timeout.
    let ready = unsafe { libc::poll(&raw mut poll, 1, 0) };
    match ready {
        0 => Ok(0),
        n if n > 0 => Ok(fd.read()?),
        _ => Err(std::io::Error::last_os_error().into()),
    }
}

/// Wall ns per write of `write_one` and of a bare eventfd write, with nobody reading either
/// eventfd: nothing to wake, so only what each write costs its writer. Interleaved blocks, the
/// median block of each, so that a slow stretch of the machine hits both alike.
fn writer_cost(
    writes: usize,
    drain: &EventFd,
    mut write_one: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    const BLOCKS: usize = 5;
    let per_block = (writes / BLOCKS).max(1);
    let bare = EventFd::new(0)?;
    let (mut path, mut floor) = (Vec::with_capacity(BLOCKS), Vec::with_capacity(BLOCKS));
    #[expect(clippy::cast_precision_loss, reason = "a mean")]
    let mean = |t: Instant| t.elapsed().as_nanos() as f64 / per_block as f64;
    for _ in 0..BLOCKS {
        let t = Instant::now();
        for _ in 0..per_block {
            bare.write(1)?;
        }
        floor.push(mean(t));
        let t = Instant::now();
        for _ in 0..per_block {
            write_one()?;
        }
        path.push(mean(t));
        // Empty both counters (an eventfd counter saturates at u64::MAX - 1), checking that
        // every write through the path reached the ioeventfd.
        bare.read()?;
        let seen = count_now(drain)?;
        anyhow::ensure!(
            seen == per_block as u64,
            "the ioeventfd saw {seen} of {per_block} notifies"
        );
    }
    Ok((super::spread(&path).0, super::spread(&floor).0))
}

/// Reads `fd` until `stop` is set, then what is left: the count of every write made before
/// `stop` was set (and of any made since).
fn drain_until(fd: &EventFd, stop: &AtomicBool) -> u64 {
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        n += fd.read().unwrap_or(0);
    }
    // The writes between the last read and `stop`: the writer sets `stop` after its last
    // write, and a drainer that sees it between two reads would otherwise miss them.
    n + count_now(fd).unwrap_or(0)
}

/// Writes `writes` times with `write_one` while a worker drains `fd` (as a queue worker would);
/// the writes per second and the CPU ns per write (the whole process: writer and worker).
fn back_to_back(
    fd: &Arc<EventFd>,
    writes: usize,
    mut write_one: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let drained = {
        let (fd, stop) = (fd.clone(), stop.clone());
        std::thread::spawn(move || drain_until(&fd, &stop))
    };
    let meter = CpuMeter::start(&[])?;
    let t0 = Instant::now();
    for _ in 0..writes {
        write_one()?;
    }
    let elapsed = t0.elapsed();
    let cpu = meter.stop()?.per_op_ns(writes as u64);
    stop.store(true, Ordering::Release);
    fd.write(1)?; // wake the drainer so it sees `stop`
    let seen = drained
        .join()
        .map_err(|_| anyhow::anyhow!("drainer panicked"))?;
    anyhow::ensure!(
        seen >= writes as u64,
        "the worker saw {seen} of {writes} notifies"
    );
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let per_s = writes as f64 / elapsed.as_secs_f64();
    Ok((per_s, cpu))
}

/// Notify path: one-way latency from a QueueNotify write to the queue worker waking, and the
/// rate at which writes go through (with its CPU time per write).
pub fn notify(iterations: usize) -> anyhow::Result<NotifyFigures> {
    let platform = platform(1, None)?;
    let fe = platform.frontend().context("no frontend VM")?;
    let fd = notify_eventfd(&platform, 0)?;
    let ack = Arc::new(EventFd::new(0)?);
    let base = Instant::now();
    let sent_at = Arc::new(AtomicU64::new(0));
    let total = iterations + iterations / 10;
    let worker = {
        let (fd, ack, sent_at) = (fd.clone(), ack.clone(), sent_at.clone());
        std::thread::spawn(move || -> std::io::Result<Samples> {
            let mut samples = Samples::with_capacity(iterations);
            for i in 0..total {
                fd.read()?;
                let now = stamp(base);
                if i >= total - iterations {
                    samples.push(Duration::from_nanos(
                        now.saturating_sub(sent_at.load(Ordering::Acquire)),
                    ));
                }
                ack.write(1)?;
            }
            Ok(samples)
        })
    };
    for _ in 0..total {
        spin_for(Duration::from_micros(20));
        sent_at.store(stamp(base), Ordering::Release);
        fe.write(base_of(0) + QUEUE_NOTIFY, 4, 0)?;
        ack.read()?;
    }
    let samples = worker
        .join()
        .map_err(|_| anyhow::anyhow!("notify worker panicked"))??;

    // Throughput: the worker drains the counter while the frontend writes back to back. Its
    // floor first, printed on stderr: the same loop with bare eventfd writes, what one system
    // call per write and the worker's wake-ups allow.
    let writes = (iterations * 10).max(100_000);
    let (path_ns, write_floor_ns) = writer_cost(writes, &fd, || {
        Ok(fe.write(base_of(0) + QUEUE_NOTIFY, 4, 0)?)
    })?;
    let bare = Arc::new(EventFd::new(0)?);
    let (floor_per_s, floor_cpu) = back_to_back(&bare, writes, || Ok(bare.write(1)?))?;
    let (per_s, cpu) = back_to_back(&fd, writes, || {
        Ok(fe.write(base_of(0) + QUEUE_NOTIFY, 4, 0)?)
    })?;
    eprintln!(
        "notify: back to back {per_s:.0}/s, {cpu:.0} ns CPU per write; bare eventfd writes \
         (floor) {floor_per_s:.0}/s, {floor_cpu:.0} ns CPU per write; with no reader to \
         wake, {path_ns:.0} ns per write through remio, {write_floor_ns:.0} ns bare"
    );
    Ok(NotifyFigures {
        latency: samples,
        per_s,
        cpu_ns_per_write: cpu,
        floor_per_s,
        path_ns,
        write_floor_ns,
    })
}

/// What a scale run measured.
#[derive(Debug, Clone, Copy)]
pub struct ScaleFigures {
    /// Aggregate requests per second.
    pub per_s: f64,
    /// CPU ns per request (platform and device-model processes).
    pub cpu_ns_per_req: f64,
    /// CPU seconds used per wall second (at most the core count).
    pub cores_busy: f64,
}

/// Scale: `dms` frontend threads, one per DM, each issuing a mix of one control read (served
/// by the device-model child) and three QueueNotify writes (drained by a worker per DM), for
/// `duration`.
pub fn scale(dir: &Path, dms: u32, duration: Duration) -> anyhow::Result<ScaleFigures> {
    let socket = fresh_socket(dir, &format!("scale{dms}"));
    let platform = platform(dms, Some(&socket))?;
    let fe = platform.frontend().context("no frontend VM")?;
    let child = ChildProcess::spawn(
        "serve-dm",
        Path::new(&format!("{}:{dms}", socket.display())),
    )?;
    wait_served(&fe, dms)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut drainers = Vec::new();
    for dm in 0..dms {
        let fd = notify_eventfd(&platform, dm)?;
        let stop = stop.clone();
        drainers.push((
            fd.clone(),
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let _ = fd.read();
                }
            }),
        ));
    }
    let start = Arc::new(Barrier::new(usize::try_from(dms)? + 1));
    let threads: Vec<_> = (0..dms)
        .map(|dm| {
            let (fe, start) = (fe.clone(), start.clone());
            std::thread::spawn(move || -> anyhow::Result<u64> {
                start.wait();
                let t0 = Instant::now();
                let mut n = 0u64;
                while t0.elapsed() < duration {
                    anyhow::ensure!(fe.read(base_of(dm), 4)? == SERVED, "read timed out");
                    for _ in 0..3 {
                        fe.write(base_of(dm) + QUEUE_NOTIFY, 4, 0)?;
                    }
                    n += 4;
                }
                Ok(n)
            })
        })
        .collect();
    let meter = CpuMeter::start(&[child.pid()])?;
    start.wait();
    let t0 = Instant::now();
    let mut total = 0u64;
    for t in threads {
        total += t
            .join()
            .map_err(|_| anyhow::anyhow!("a scale thread panicked"))??;
    }
    let elapsed = t0.elapsed();
    let used = meter.stop()?;
    stop.store(true, Ordering::Release);
    for (fd, t) in drainers {
        fd.write(1)?;
        let _ = t.join();
    }
    #[expect(clippy::cast_precision_loss, reason = "rates")]
    Ok(ScaleFigures {
        per_s: total as f64 / elapsed.as_secs_f64(),
        cpu_ns_per_req: used.per_op_ns(total),
        cores_busy: used.cpu_ns as f64 / used.wall_ns as f64,
    })
}

/// Resident memory per idle DM: the platform with 16 DMs minus the platform with 1, over 15.
/// Each is built and measured in a fresh child process so that allocator reuse does not hide
/// the difference.
pub fn idle_dm_bytes() -> anyhow::Result<f64> {
    let one = rss_of_child(1)?;
    let sixteen = rss_of_child(16)?;
    #[expect(clippy::cast_precision_loss, reason = "a size")]
    Ok((sixteen.saturating_sub(one)) as f64 / 15.0)
}

fn rss_of_child(dms: u32) -> anyhow::Result<u64> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .args([
            "bench",
            "--child",
            "idle-rss",
            "--child-arg",
            &dms.to_string(),
        ])
        .output()
        .context("running the idle-rss child")?;
    anyhow::ensure!(out.status.success(), "idle-rss child failed");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("idle-rss child output")
}

/// The child of [`idle_dm_bytes`]: builds a platform with N DMs, each with a control client
/// and an ioeventfd, and prints its resident set size in bytes.
pub fn idle_rss_child(arg: &Path) -> anyhow::Result<()> {
    let dms: u32 = arg.to_str().context("DM count")?.parse()?;
    let platform = platform(dms, None)?;
    // Kept alive until measured, as an idle device model's would be.
    let mut eventfds = Vec::new();
    let mut sessions = Vec::new();
    for dm in 0..dms {
        eventfds.push(notify_eventfd(&platform, dm)?);
        sessions.push(platform.api().open(dm)?);
    }
    println!("{}", rss_bytes()?);
    drop((sessions, eventfds));
    Ok(())
}

fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm.split_whitespace().nth(1).context("statm")?.parse()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * u64::try_from(page).unwrap_or(4096))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_cost_of_a_path_that_signals_is_measured() {
        let fd = EventFd::new(0).unwrap();
        let (path, floor) = writer_cost(1000, &fd, || Ok(fd.write(1)?)).unwrap();
        assert!(path > 0.0 && floor > 0.0, "{path} {floor}");
        assert_eq!(count_now(&fd).unwrap(), 0, "every block was drained");
    }

    #[test]
    fn the_drainer_counts_the_writes_made_after_its_last_read() {
        let fd = EventFd::new(0).unwrap();
        // The writer's last writes, then `stop`, all before the drainer looks again.
        fd.write(5).unwrap();
        let stop = AtomicBool::new(true);

        assert_eq!(drain_until(&fd, &stop), 5);
    }

    #[test]
    fn a_path_that_loses_its_writes_is_an_error_not_a_hang() {
        let fd = EventFd::new(0).unwrap();
        let err = writer_cost(1000, &fd, || Ok(())).unwrap_err();
        assert_eq!(err.to_string(), "the ioeventfd saw 0 of 200 notifies");
    }
}
