//! The floors every figure is divided by, measured in the same run on the same machine:
//! a bare UNIX-socket ping-pong between two processes, and an eventfd wake between two threads.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use vmm_sys_util::eventfd::EventFd;

use super::child::ChildProcess;
use super::cpu::CpuMeter;
use super::stats::Samples;

/// Bytes per ping-pong message: the size of one `bao_virtio_request`, what a control-path
/// round trip carries at the least.
const MESSAGE: usize = 48;

/// Round trips of `MESSAGE` bytes over a UNIX stream socket to a child process that echoes;
/// with the CPU time (both processes) per round trip, in ns.
pub fn socket_ping_pong(dir: &Path, iterations: usize) -> anyhow::Result<(Samples, f64)> {
    let path = dir.join("floor.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).context("binding the floor socket")?;
    let child = ChildProcess::spawn("socket-echo", &path)?;
    let (mut conn, _) = listener.accept().context("accepting the echo child")?;
    let mut buf = [0u8; MESSAGE];
    let mut samples = Samples::with_capacity(iterations);
    for _ in 0..iterations / 10 {
        conn.write_all(&buf)?;
        conn.read_exact(&mut buf)?;
    }
    let meter = CpuMeter::start(&[child.pid()])?;
    for _ in 0..iterations {
        let t0 = Instant::now();
        conn.write_all(&buf)?;
        conn.read_exact(&mut buf)?;
        samples.push(t0.elapsed());
    }
    let cpu = meter.stop()?.per_op_ns(iterations as u64);
    Ok((samples, cpu))
}

/// The child side of [`socket_ping_pong`]: echo until the parent hangs up.
pub fn socket_echo_child(path: &Path) -> anyhow::Result<()> {
    let mut conn = UnixStream::connect(path).context("connecting to the floor socket")?;
    let mut buf = [0u8; MESSAGE];
    while conn.read_exact(&mut buf).is_ok() {
        conn.write_all(&buf)?;
    }
    Ok(())
}

/// Nanoseconds since `base`, for handing a timestamp to another thread through an atomic.
pub fn stamp(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One-way wake latency: thread A stamps the time and writes an eventfd; thread B, blocked in
/// `read`, measures how long after the stamp it woke. B acknowledges on a second eventfd so
/// that A never signals before B is asleep again.
pub fn eventfd_wake(iterations: usize) -> anyhow::Result<Samples> {
    let wake = Arc::new(EventFd::new(0)?);
    let ack = Arc::new(EventFd::new(0)?);
    let base = Instant::now();
    let sent_at = Arc::new(AtomicU64::new(0));
    let warmup = iterations / 10;
    let total = iterations + warmup;

    let waiter = {
        let (wake, ack, sent_at) = (wake.clone(), ack.clone(), sent_at.clone());
        std::thread::spawn(move || -> std::io::Result<Samples> {
            let mut samples = Samples::with_capacity(iterations);
            for i in 0..total {
                wake.read()?;
                let now = stamp(base);
                if i >= warmup {
                    let sent = sent_at.load(Ordering::Acquire);
                    samples.push(Duration::from_nanos(now.saturating_sub(sent)));
                }
                ack.write(1)?;
            }
            Ok(samples)
        })
    };
    for _ in 0..total {
        // Give the waiter time to block in read(): a wake of a running thread is not a wake.
        spin_for(Duration::from_micros(20));
        sent_at.store(stamp(base), Ordering::Release);
        wake.write(1)?;
        ack.read()?;
    }
    waiter
        .join()
        .map_err(|_| anyhow::anyhow!("eventfd waiter panicked"))?
        .context("eventfd waiter")
}

/// Busy-waits: sleeping would add the very scheduler latency being measured.
pub fn spin_for(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}
