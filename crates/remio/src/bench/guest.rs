//! The guest group: the same guest kernel and disk image, once served by remio (`remio run`)
//! and once by QEMU's own virtio-blk-device on the same machine type under the same TCG, with
//! `iobench` (guest/tools/iobench.c, in the initramfs) measuring from inside the guest:
//! sequential 1 MiB reads (MiB/s) twice, the first pass right after boot ("cold") and the
//! second after it ("warm": remio reaches its steady rate only after a few hundred MiB, QEMU's
//! own device after the first tens; docs/performance.md, "A faster machine, a cold start and a
//! steady state"), then 4 KiB random reads at queue depth 16 (IOPS).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context as _;

/// MiB read sequentially per run (wrapping around the disk: a few tenths of a second).
const SEQ_MIB: u64 = 512;
/// Seconds of random reads per run.
const RAND_SECS: u32 = 5;
/// Random-read queue depth (threads, each with one read in flight).
const QUEUE_DEPTH: u32 = 16;
/// The disk both guests read.
const DISK_MIB: u64 = 256;
/// Wall-clock limit of one guest run (a run takes well under a minute).
const RUN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// What one guest run measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestFigures {
    /// Sequential 1 MiB reads, the first pass after boot.
    pub seq_mib_per_s: f64,
    /// Sequential 1 MiB reads, the second pass (after the first); `None` from a guest output
    /// with one pass.
    pub seq_warm_mib_per_s: Option<f64>,
    /// 4 KiB random reads at QD16.
    pub rand_iops: f64,
    /// Requests the guest issued in all (sequential + random).
    pub ios: f64,
    /// Trapped register accesses during the run (remio only).
    pub trapped: Option<f64>,
    /// Of those, answered inline in the dispatcher: (by the status word, by ioeventfds), from
    /// the DMs' destruction log lines (remio only; `None` if the run did not log them).
    pub in_dispatcher: Option<(f64, f64)>,
    /// Milliseconds the disk's queue thread spent polling its available ring (host CPU the
    /// polling cost), from its `virtio-blk: stopped` line (remio only).
    pub poll_ms: Option<f64>,
}

impl GuestFigures {
    /// The per-figure median of `runs` (the upper one of an even count); `trapped` and
    /// `in_dispatcher` are taken per I/O, so that runs of different lengths mix fairly.
    pub fn median(runs: &[Self]) -> Self {
        fn med(mut v: Vec<f64>) -> f64 {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        }
        let ios = med(runs.iter().map(|r| r.ios).collect());
        let per_io = |f: &dyn Fn(&Self) -> Option<f64>| -> Option<f64> {
            let v: Option<Vec<f64>> = runs.iter().map(|r| f(r).map(|x| x / r.ios)).collect();
            v.filter(|v| !v.is_empty()).map(|v| med(v) * ios)
        };
        Self {
            seq_mib_per_s: med(runs.iter().map(|r| r.seq_mib_per_s).collect()),
            seq_warm_mib_per_s: runs
                .iter()
                .map(|r| r.seq_warm_mib_per_s)
                .collect::<Option<Vec<f64>>>()
                .filter(|v| !v.is_empty())
                .map(med),
            rand_iops: med(runs.iter().map(|r| r.rand_iops).collect()),
            ios,
            trapped: per_io(&|r| r.trapped),
            in_dispatcher: per_io(&|r| r.in_dispatcher.map(|d| d.0))
                .zip(per_io(&|r| r.in_dispatcher.map(|d| d.1))),
            poll_ms: per_io(&|r| r.poll_ms),
        }
    }
}

impl std::fmt::Display for GuestFigures {
    /// One boot's figures, as the guest group prints each boot (so that the spread the
    /// medians hide can be read from the log).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "seq {:.1} MiB/s", self.seq_mib_per_s)?;
        if let Some(warm) = self.seq_warm_mib_per_s {
            write!(f, " (then {warm:.1} warm)")?;
        }
        write!(f, ", rand {:.0} IOPS", self.rand_iops)
    }
}

/// The guest command: both measurements, each printing one `IOBENCH` line.
fn guest_command() -> String {
    format!(
        "iobench seq /dev/vda {SEQ_MIB} && iobench seq /dev/vda {SEQ_MIB} && \
         iobench rand /dev/vda {RAND_SECS} {QUEUE_DEPTH}"
    )
}

/// A disk image with non-zero content, so that neither side reads holes.
pub fn make_disk(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("guest-bench.img");
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8 | 1).collect();
    let mut file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // The same MiB over and over, then written back before the first boot: the kernel would
    // otherwise write the 256 MiB back some 30 s later, during whichever boot is running then.
    (0..DISK_MIB)
        .try_for_each(|_| std::io::Write::write_all(&mut file, &chunk))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The guest served by remio: `remio run --disk IMG --exec CMD`.
pub fn remio(disk: &Path) -> anyhow::Result<GuestFigures> {
    let exe = std::env::current_exe()?;
    let out = Command::new(exe)
        .args([
            "run",
            "--no-console",
            "--no-rng",
            "--timeout",
            &RUN_TIMEOUT.as_secs().to_string(),
            "--disk",
        ])
        .arg(disk)
        .args(["--exec", &guest_command()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .context("running `remio run`")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success(),
        "`remio run` failed ({}): {}{}",
        out.status,
        tail(&stdout),
        tail(&stderr)
    );
    let mut figures = parse_iobench(&stdout)?;
    figures.trapped = stderr
        .lines()
        .find_map(|l| {
            let i = l.find(" register accesses through the bridge")?;
            l[..i].rsplit(' ').next()?.parse::<f64>().ok()
        })
        .map(Some)
        .context("`remio run` did not report its trapped accesses")?;
    figures.in_dispatcher = parse_dispatcher_answers(&stderr);
    figures.poll_ms = parse_poll_ms(&stderr);
    eprintln!("guest: remio boot: {figures}");
    Ok(figures)
}

/// Runs `cmd` (stdin null, stdout captured) and kills it if it is still running after
/// `limit`, which is then an error.
fn output_within(
    mut cmd: Command,
    limit: std::time::Duration,
) -> anyhow::Result<std::process::Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let start = std::time::Instant::now();
    let pipes = (child.stdout.take(), child.stderr.take());
    let reader = std::thread::spawn(move || {
        use std::io::Read as _;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let stderr = pipes.1.map(|mut e| {
            std::thread::spawn(move || {
                let _ = e.read_to_end(&mut err);
                err
            })
        });
        if let Some(mut o) = pipes.0 {
            let _ = o.read_to_end(&mut out);
        }
        let err = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
        (out, err)
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("no result within {limit:?}: killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let (stdout, stderr) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("output reader panicked"))?;
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

/// The same guest with QEMU's own virtio-blk-device (virtio-mmio on microvm).
pub fn qemu(disk: &Path, guest_dir: &Path) -> anyhow::Result<GuestFigures> {
    // Booted as `remio run` boots it (same arguments but for the machine's devices).
    let exec = format!(
        "remio.exec={}",
        crate::guest::base64(guest_command().as_bytes())
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(remio_frontend::qemu::launch::guest_args(
        "microvm,acpi=on,rtc=on",
        256,
        &guest_dir.join("vmlinuz"),
        &guest_dir.join("initramfs.cpio"),
        &exec,
    ))
    .arg("-drive")
    .arg(format!(
        // QEMU's defaults (writeback cache, thread pool): the host page cache serves both
        // sides alike, as remio's block device reads through it too.
        "file={},format=raw,if=none,id=d0",
        disk.display()
    ))
    // The queue size remio's device offers, so that both cut a request alike.
    .args([
        "-device",
        &format!(
            "virtio-blk-device,drive=d0,queue-size={}",
            remio_virtio::devices::block::QUEUE_SIZE
        ),
    ]);
    let out = output_within(cmd, RUN_TIMEOUT)
        .context("running qemu-system-x86_64 (install the Debian package qemu-system-x86)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "QEMU failed ({}): {}",
        out.status,
        tail(&stdout)
    );
    let figures = parse_iobench(&stdout)?;
    eprintln!("guest: qemu boot: {figures}");
    Ok(figures)
}

/// Reads the `IOBENCH` lines of a guest's output: one or two `seq` (cold, then warm), one
/// `rand`.
pub fn parse_iobench(out: &str) -> anyhow::Result<GuestFigures> {
    let field = |line: &str, key: &str| -> Option<f64> {
        let rest = &line[line.find(&format!("{key}="))? + key.len() + 1..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let lines = |kind: &str| -> Vec<&str> {
        let tag = format!("IOBENCH {kind} ");
        out.lines().filter(|l| l.contains(&tag)).collect()
    };
    let seq_lines = lines("seq");
    let seq = seq_lines
        .first()
        .and_then(|l| field(l, "mib_per_s"))
        .context("no `IOBENCH seq` line in the guest output")?;
    let warm = seq_lines
        .get(1)
        .map(|l| field(l, "mib_per_s").context("a second `IOBENCH seq` line without mib_per_s"))
        .transpose()?;
    let rand = lines("rand")
        .first()
        .copied()
        .context("no `IOBENCH rand` line in the guest output")?;
    let iops = field(rand, "iops").context("an `IOBENCH rand` line without iops")?;
    let rand_ios = field(rand, "ios").unwrap_or(0.0);
    // One read() per MiB (the guest may split each into several virtio requests).
    let seq_ios = seq_lines
        .iter()
        .filter_map(|l| field(l, "bytes"))
        .sum::<f64>()
        / f64::from(1u32 << 20);
    Ok(GuestFigures {
        seq_mib_per_s: seq,
        seq_warm_mib_per_s: warm,
        rand_iops: iops,
        ios: seq_ios + rand_ios,
        trapped: None,
        in_dispatcher: None,
        poll_ms: None,
    })
}

/// Sums the dispatcher's `DM n: destroyed after .. requests: .., S answered by the status
/// word, I by ioeventfds` lines over all DMs: `(S, I)`, or `None` without such a line.
pub fn parse_dispatcher_answers(log: &str) -> Option<(f64, f64)> {
    let mut found = None;
    for l in log.lines() {
        let Some(i) = l.find(" answered by the status word, ") else {
            continue;
        };
        let sw: f64 = l[..i].rsplit(' ').next()?.parse().ok()?;
        let rest = &l[i + " answered by the status word, ".len()..];
        let io: f64 = rest.split(' ').next()?.parse().ok()?;
        let (a, b) = found.unwrap_or((0.0, 0.0));
        found = Some((a + sw, b + io));
    }
    found
}

/// The polling time of the last `virtio-blk: stopped; … (X ms polling)` line (its counters
/// are the device's totals since it was created), or `None` without such a line.
pub fn parse_poll_ms(log: &str) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains("virtio-blk: stopped"))
        .filter_map(|l| {
            let i = l.find(" ms polling)")?;
            l[..i].rsplit('(').next()?.parse::<f64>().ok()
        })
        .next_back()
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iobench_lines_are_parsed_among_boot_noise() {
        let out = "[ 1.0] virtio_blk virtio0: [vda]\r\nIOBENCH seq mib_per_s=123.45 bytes=67108864 secs=0.5\r\n\
                   IOBENCH rand iops=2500.0 ios=12500 secs=5.0\nREMIO-EXIT 0\n";
        let f = parse_iobench(out).unwrap();
        assert!((f.seq_mib_per_s - 123.45).abs() < 1e-9);
        assert!((f.rand_iops - 2500.0).abs() < 1e-9);
        assert!((f.ios - (64.0 + 12500.0)).abs() < 1e-9);
        assert_eq!(f.seq_warm_mib_per_s, None);
    }

    #[test]
    fn the_disk_is_the_pattern_mib_over_its_whole_size() {
        use std::io::{Read, Seek, SeekFrom};
        let dir = std::env::temp_dir().join(format!("remio-bench-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = make_disk(&dir).unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), DISK_MIB << 20);
        let mut first = vec![0u8; 1 << 20];
        let mut last = vec![0u8; 1 << 20];
        file.read_exact(&mut first).unwrap();
        file.seek(SeekFrom::End(-(1 << 20))).unwrap();
        file.read_exact(&mut last).unwrap();
        assert_eq!(first, last);
        assert!(first.iter().all(|&b| b != 0));
        assert_eq!(&first[250..253], &[250 | 1, 1, 1]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_second_seq_line_is_the_warm_pass_and_its_reads_count() {
        let out = "IOBENCH seq mib_per_s=100.5 bytes=67108864 secs=0.6\n\
                   IOBENCH seq mib_per_s=150.25 bytes=67108864 secs=0.4\n\
                   IOBENCH rand iops=2500.0 ios=12500 secs=5.0\n";
        let f = parse_iobench(out).unwrap();
        assert!((f.seq_mib_per_s - 100.5).abs() < 1e-9);
        assert_eq!(f.seq_warm_mib_per_s, Some(150.25));
        assert!((f.ios - (128.0 + 12500.0)).abs() < 1e-9);
        // A second pass without its rate is an error, not a missing warm figure.
        let no_rate = "IOBENCH seq mib_per_s=1 bytes=1\nIOBENCH seq bytes=1\nIOBENCH rand iops=1\n";
        assert!(parse_iobench(no_rate).is_err());
    }

    #[test]
    fn dispatcher_answers_are_summed_over_dms() {
        let log =
            "[INFO remio_dispatcher::dm] DM 0: destroyed after 10 requests: 4 to the control \
                   client, 5 answered by the status word, 1 by ioeventfds\n\
                   noise\n\
                   [INFO remio_dispatcher::dm] DM 1: destroyed after 3 requests: 1 to the control \
                   client, 2 answered by the status word, 0 by ioeventfds\n";
        assert_eq!(parse_dispatcher_answers(log), Some((7.0, 1.0)));
        assert_eq!(parse_dispatcher_answers("nothing here"), None);
    }

    #[test]
    fn the_last_stop_line_gives_the_polling_time() {
        let log = "[INFO remio_virtio::devices::block] virtio-blk: stopped; since the device was \
                   created: 9 requests in 9 batches; 0 interrupts (0.00 per request, 0 held for \
                   requests still executing or while polling); 3 requests found by polling \
                   (1.5 ms polling); 0 reads shared (0 pieces by I/O workers)\n\
                   noise (2.0 ms polling)\n\
                   [INFO remio_virtio::devices::block] virtio-blk: stopped; since the device was \
                   created: 90 requests; 30 requests found by polling (12.25 ms polling); 0 reads \
                   shared (0 pieces by I/O workers)\n";
        assert_eq!(parse_poll_ms(log), Some(12.25));
        assert_eq!(parse_poll_ms("virtio-blk: stopped; nothing"), None);
    }

    #[test]
    fn median_takes_each_figure_on_its_own_and_traps_per_io() {
        let run = |seq, iops, ios, trapped| GuestFigures {
            seq_mib_per_s: seq,
            seq_warm_mib_per_s: Some(seq * 10.0),
            rand_iops: iops,
            ios,
            trapped: Some(trapped),
            in_dispatcher: None,
            poll_ms: None,
        };
        let m = GuestFigures::median(&[
            run(1.0, 300.0, 100.0, 200.0),
            run(3.0, 100.0, 100.0, 400.0),
            run(2.0, 200.0, 200.0, 600.0),
        ]);
        assert_eq!(m.seq_mib_per_s, 2.0);
        assert_eq!(m.seq_warm_mib_per_s, Some(20.0));
        assert_eq!(m.rand_iops, 200.0);
        assert_eq!(m.ios, 100.0);
        // Per I/O: 2, 4 and 3 -> median 3, times the median I/O count.
        assert_eq!(m.trapped, Some(300.0));
        assert_eq!(m.in_dispatcher, None);
    }

    #[test]
    fn a_boot_is_printed_with_both_figures() {
        let f = parse_iobench(
            "IOBENCH seq mib_per_s=12.34 bytes=1 secs=1\nIOBENCH rand iops=567.8 ios=1\n",
        )
        .unwrap();
        assert_eq!(f.to_string(), "seq 12.3 MiB/s, rand 568 IOPS");
        let f = parse_iobench(
            "IOBENCH seq mib_per_s=12.34 bytes=1 secs=1\nIOBENCH seq mib_per_s=20.06 bytes=1 \
             secs=1\nIOBENCH rand iops=567.8 ios=1\n",
        )
        .unwrap();
        assert_eq!(
            f.to_string(),
            "seq 12.3 MiB/s (then 20.1 warm), rand 568 IOPS"
        );
    }

    #[test]
    fn missing_lines_are_an_error() {
        assert!(parse_iobench("IOBENCH seq mib_per_s=1 bytes=1 secs=1\n").is_err());
        assert!(parse_iobench("").is_err());
    }
}
