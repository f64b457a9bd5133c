//! The fs group: sequential reads of one 256 MiB file on a virtio-fs share, in the same guest
//! (kernel, initramfs, machine type, TCG, 256 MiB of RAM), served by the same virtiofsd
//! (binary and options: [`crate::vhostd`]'s, those of `remio run --share`) on both sides:
//!
//! - remio: `remio run --share DIR`, remio's vhost-user frontend device behind its
//!   virtio-mmio transport, every register access trapped into remio;
//! - QEMU: QEMU's own `vhost-user-fs-device` on `microvm`, i.e. virtio-mmio as well (the PCI
//!   variant would change the transport: MSI-X vectors instead of the InterruptStatus read and
//!   ACK write per interrupt, a PCI notify instead of QueueNotify), with the guest memory in a
//!   shared memfd as vhost-user needs, and the same queue size as remio's device (1024).
//!
//! The guest runs `iobench file` (guest/tools/iobench.c): the whole file once in 1 MiB
//! `read()`s, `O_DIRECT` (virtiofsd's `--cache=never` also makes every open direct), so the
//! guest page cache is not measured on either side; the host page cache holds the file on both
//! sides alike (the host writes it just before the first boot). One round boots QEMU, then
//! remio; `--repeat` rounds give medians and spreads, each round's ratio against the QEMU run
//! of the same round. On the remio side the run's counters (`remio run --stats-json`) give the
//! trapped accesses of the virtio-fs device and how the dispatcher answered them, per `read()`
//! of the benchmark — probe, mount and unmount included (a few dozen accesses, small next to
//! the benchmark's but not zero).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::Report;

/// Size of the file the guest reads.
const FILE_MIB: u64 = 256;
/// Size of one `read()` of the guest.
const READ_KIB: u64 = 1024;
/// The file's name in the share.
const FILE_NAME: &str = "fsbench.dat";
/// Queue size of QEMU's device, as remio's (`remio_virtio::devices::vhost_user::DEFAULT_QUEUE_SIZE`).
const QUEUE_SIZE: u16 = remio_virtio::devices::vhost_user::DEFAULT_QUEUE_SIZE;
/// The file system device's ID (virtio 1.2 §5, Device Types).
const VIRTIO_ID_FS: u32 = 26;
/// Wall-clock limit of one guest run.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// The machine-wide lock the e2e tests hold while a guest of theirs runs (their
/// `e2e_common::boot_lock`): each boot of this group holds it too, so that no test guest shares
/// the two cores with a measured one.
const BOOT_LOCK_PATH: &str = "/tmp/remio-e2e-boot.lock";

/// What one guest run measured.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FsFigures {
    /// Sequential read throughput inside the guest.
    pub mib_per_s: f64,
    /// `read()` calls of the benchmark.
    pub reads: f64,
    /// Whether the guest read with `O_DIRECT` (else after dropping its page cache).
    pub direct: bool,
    /// The virtio-fs device's counters over the run (remio only).
    pub device: Option<DeviceCounts>,
}

/// The trapped accesses of the virtio-fs device's DM over a `remio run`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeviceCounts {
    /// Accesses trapped for the device.
    pub trapped: f64,
    /// Of which answered by the device model (control path).
    pub to_control: f64,
    /// Of which answered from the status word (InterruptStatus, InterruptACK).
    pub to_status_word: f64,
    /// Of which QueueNotify writes signalled on an ioeventfd (the daemon's kick).
    pub to_ioeventfd: f64,
    /// Interrupts injected for the device.
    pub interrupts: f64,
}

/// The guest's command.
fn guest_command() -> String {
    format!(
        "iobench file {}/{FILE_NAME} {READ_KIB}",
        crate::vhostd::SHARE_MOUNT
    )
}

/// A share directory in `dir` holding the benchmark file, non-zero bytes throughout.
pub fn make_share(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Write as _;
    let share = dir.join("fs-share");
    std::fs::create_dir_all(&share).with_context(|| format!("creating {}", share.display()))?;
    let path = share.join(FILE_NAME);
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?,
    );
    for _ in 0..FILE_MIB {
        f.write_all(&chunk)?;
    }
    f.into_inner()
        .map_err(std::io::IntoInnerError::into_error)?
        .sync_all()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(share)
}

/// The guest served by remio: `remio run --share SHARE --exec CMD --stats-json FILE`.
pub fn remio(share: &Path, run_dir: &Path) -> anyhow::Result<FsFigures> {
    let stats = run_dir.join("fs-stats.json");
    let _ = std::fs::remove_file(&stats);
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "run",
        "--no-console",
        "--no-rng",
        "--no-net",
        "--timeout",
        &RUN_TIMEOUT.as_secs().to_string(),
        "--share",
    ])
    .arg(share)
    .arg("--stats-json")
    .arg(&stats)
    .args(["--exec", &guest_command()])
    .env("RUST_LOG", "info");
    let out = run_bounded(
        cmd,
        &run_dir.join("fs-remio.out"),
        RUN_TIMEOUT + RUN_TIMEOUT,
    )
    .context("running `remio run --share`")?;
    anyhow::ensure!(
        out.success,
        "`remio run --share` failed: {}",
        tail(&out.text)
    );
    let mut figures = parse_iobench_file(&out.text)?;
    let json = std::fs::read_to_string(&stats)
        .with_context(|| format!("`remio run` did not write {}", stats.display()))?;
    figures.device = Some(fs_device_counts(&json)?);
    Ok(figures)
}

/// The same guest with QEMU's own `vhost-user-fs-device` and the same virtiofsd.
pub fn qemu(share: &Path, guest_dir: &Path, run_dir: &Path) -> anyhow::Result<FsFigures> {
    let daemon_dir = run_dir.join("fs-qemu");
    std::fs::create_dir_all(&daemon_dir)
        .with_context(|| format!("creating {}", daemon_dir.display()))?;
    let plan = crate::vhostd::Plan::new(Some(share), None, &daemon_dir)?;
    let socket = plan.fs_socket();
    let _ = std::fs::remove_file(&socket);
    let _daemons = plan.start()?;
    let cmdline = format!(
        "{} remio.exec={}",
        plan.cmdline().unwrap_or_default(),
        crate::guest::base64(guest_command().as_bytes())
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(remio_frontend::qemu::launch::guest_args(
        "microvm,acpi=on,rtc=on,memory-backend=mem",
        256,
        &guest_dir.join("vmlinuz"),
        &guest_dir.join("initramfs.cpio"),
        &cmdline,
    ))
    .args(qemu_fs_args(&socket));
    let out = run_bounded(cmd, &run_dir.join("fs-qemu.out"), RUN_TIMEOUT)
        .context("running qemu-system-x86_64 (install the Debian package qemu-system-x86)")?;
    anyhow::ensure!(
        out.success && out.text.contains("REMIO-EXIT 0"),
        "QEMU's guest failed: {}",
        tail(&out.text)
    );
    parse_iobench_file(&out.text)
}

/// QEMU's arguments for the shared guest memory and its virtio-fs device on `socket`.
fn qemu_fs_args(socket: &Path) -> Vec<String> {
    vec![
        "-object".into(),
        "memory-backend-memfd,id=mem,size=256M,share=on".into(),
        "-chardev".into(),
        format!("socket,id=fs,path={}", socket.display()),
        "-device".into(),
        format!(
            "vhost-user-fs-device,chardev=fs,tag={},queue-size={QUEUE_SIZE}",
            crate::vhostd::SHARE_TAG
        ),
    ]
}

/// A finished child: whether it exited with 0, and its stdout and stderr.
struct Finished {
    success: bool,
    text: String,
}

/// Runs `cmd` with stdout and stderr into `log` and kills it if it is still running after
/// `limit`, which is then an error.
fn run_bounded(mut cmd: Command, log: &Path, limit: Duration) -> anyhow::Result<Finished> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(BOOT_LOCK_PATH)
        .with_context(|| format!("opening {BOOT_LOCK_PATH}"))?;
    let waited = Instant::now();
    lock.lock()
        .with_context(|| format!("locking {BOOT_LOCK_PATH}"))?;
    if waited.elapsed() > Duration::from_secs(1) {
        eprintln!(
            "fs: waited {:?} for another guest to finish",
            waited.elapsed()
        );
    }
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "no result within {limit:?}: killed (output in {})",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let text = String::from_utf8_lossy(&std::fs::read(log)?).into_owned();
    Ok(Finished {
        success: status.success(),
        text,
    })
}

/// Reads the `IOBENCH file` line of a guest's output.
pub fn parse_iobench_file(out: &str) -> anyhow::Result<FsFigures> {
    let line = out
        .lines()
        .find_map(|l| l.find("IOBENCH file ").map(|i| &l[i..]))
        .context("no `IOBENCH file` line in the guest output")?;
    let field = |key: &str| -> anyhow::Result<f64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .with_context(|| format!("`{line}` has no {key}="))?
            .trim()
            .parse()
            .with_context(|| format!("`{line}`: {key}= is not a number"))
    };
    let bytes = field("bytes")?;
    #[expect(clippy::cast_precision_loss, reason = "256 MiB in bytes")]
    let expected = (FILE_MIB << 20) as f64;
    anyhow::ensure!(
        (bytes - expected).abs() < 0.5,
        "the guest read {bytes} bytes of the {FILE_MIB} MiB file"
    );
    Ok(FsFigures {
        mib_per_s: field("mib_per_s")?,
        reads: field("reads")?,
        direct: field("direct")? != 0.0,
        device: None,
    })
}

/// The virtio-fs device's counters in a `remio run --stats-json` file: the DM whose device
/// model describes a vhost-user device of type 26 (virtio-fs), else — when the device model's
/// counters were not read — the last DM (`--share` appends its device after the others).
pub fn fs_device_counts(json: &str) -> anyhow::Result<DeviceCounts> {
    let snapshot: crate::stats::Snapshot =
        serde_json::from_str(json).context("reading the run's --stats-json")?;
    let fs_type = format!("vhost-user device type {VIRTIO_ID_FS} ");
    let dm = snapshot
        .dms
        .iter()
        .find(|d| {
            d.device
                .as_ref()
                .is_some_and(|dev| dev.description.starts_with(&fs_type))
        })
        .or_else(|| snapshot.dms.iter().max_by_key(|d| d.id))
        .context("the run's counters have no DM")?;
    #[expect(clippy::cast_precision_loss, reason = "access counts")]
    let f = |v: u64| v as f64;
    Ok(DeviceCounts {
        trapped: f(dm.trapped),
        to_control: f(dm.to_control),
        to_status_word: f(dm.to_status_word),
        to_ioeventfd: f(dm.to_ioeventfd),
        interrupts: f(dm.interrupts),
    })
}

/// One round's figures into `report`: QEMU's throughput, remio's with the ratio against it,
/// and remio's trapped accesses per `read()`.
pub fn add_round(report: &mut Report, qemu: &FsFigures, remio: &FsFigures) {
    report.add("fs.qemu_seq_read_mib_s", qemu.mib_per_s, "MiB/s");
    report.add_ratio(
        "fs.seq_read_mib_s",
        remio.mib_per_s,
        "MiB/s",
        ("fs.qemu_seq_read_mib_s", qemu.mib_per_s),
        ">= 0.9x",
    );
    report.add(
        "fs.direct",
        f64::from(u8::from(remio.direct && qemu.direct)),
        "",
    );
    if let (Some(d), true) = (remio.device, remio.reads > 0.0) {
        report.add("fs.trapped_per_io", d.trapped / remio.reads, "");
        report.add("fs.control_per_io", d.to_control / remio.reads, "");
        report.add("fs.status_word_per_io", d.to_status_word / remio.reads, "");
        report.add("fs.ioeventfd_per_io", d.to_ioeventfd / remio.reads, "");
        report.add("fs.interrupts_per_io", d.interrupts / remio.reads, "");
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_iobench_file_line_is_parsed_among_boot_noise() {
        let out = "[ 1.0] virtiofs virtio1: discovered new tag: remio\r\n\
                   REMIO-SHARE /mnt/host remio\r\n\
                   IOBENCH file mib_per_s=87.50 bytes=268435456 reads=256 secs=2.926 direct=1\r\n\
                   REMIO-EXIT 0\n";

        let f = parse_iobench_file(out).unwrap();

        assert_eq!(
            f,
            FsFigures {
                mib_per_s: 87.5,
                reads: 256.0,
                direct: true,
                device: None
            }
        );
    }

    #[test]
    fn a_short_read_a_missing_line_or_a_missing_field_is_an_error() {
        let short = "IOBENCH file mib_per_s=87.50 bytes=4096 reads=1 secs=0.1 direct=1\n";
        let no_reads = "IOBENCH file mib_per_s=87.50 bytes=268435456 secs=2.9 direct=0\n";

        let e = parse_iobench_file(short).unwrap_err().to_string();

        assert!(e.contains("read 4096 bytes"), "{e}");
        assert!(parse_iobench_file(no_reads).is_err());
        assert!(parse_iobench_file("IOBENCH seq mib_per_s=1 bytes=1 secs=1\n").is_err());
        assert!(parse_iobench_file("").is_err());
    }

    #[test]
    fn the_fs_device_is_found_by_its_description_not_its_position() {
        let json = r#"{"pid": 1, "dms": [
            {"id": 0, "trapped": 500, "device": {"dm_id": 0, "description": "block raw /tmp/x"}},
            {"id": 1, "trapped": 1200, "to_control": 200, "to_status_word": 600,
             "to_ioeventfd": 400, "interrupts": 300,
             "device": {"dm_id": 1,
                        "description": "vhost-user device type 26 (2 queues) on /tmp/v.sock"}},
            {"id": 2, "trapped": 7, "device": {"dm_id": 2, "description": "vhost-user device type 19 (3 queues) on /tmp/s"}}
        ]}"#;

        let d = fs_device_counts(json).unwrap();

        assert_eq!(
            d,
            DeviceCounts {
                trapped: 1200.0,
                to_control: 200.0,
                to_status_word: 600.0,
                to_ioeventfd: 400.0,
                interrupts: 300.0
            }
        );
    }

    #[test]
    fn without_device_descriptions_the_last_dm_is_the_share() {
        let json = r#"{"dms": [{"id": 1, "trapped": 9}, {"id": 0, "trapped": 5}]}"#;

        assert_eq!(fs_device_counts(json).unwrap().trapped, 9.0);
        assert!(fs_device_counts(r#"{"dms": []}"#).is_err());
        assert!(fs_device_counts("not json").is_err());
    }

    #[test]
    fn a_round_reports_the_ratio_against_qemu_of_the_same_round_and_traps_per_read() {
        let qemu = FsFigures {
            mib_per_s: 100.0,
            reads: 256.0,
            direct: true,
            device: None,
        };
        let remio = FsFigures {
            mib_per_s: 80.0,
            reads: 256.0,
            direct: true,
            device: Some(DeviceCounts {
                trapped: 1024.0,
                to_control: 256.0,
                to_status_word: 512.0,
                to_ioeventfd: 256.0,
                interrupts: 128.0,
            }),
        };
        let mut report = Report::default();

        add_round(&mut report, &qemu, &remio);

        let get = |k: &str| report.metrics.iter().find(|m| m.key == k).unwrap();
        let ratio = get("fs.seq_read_mib_s").ratio.unwrap();
        assert_eq!(ratio, ("fs.qemu_seq_read_mib_s", 0.8));
        assert_eq!(get("fs.trapped_per_io").value, 4.0);
        assert_eq!(get("fs.status_word_per_io").value, 2.0);
        assert_eq!(get("fs.interrupts_per_io").value, 0.5);
        assert_eq!(get("fs.direct").value, 1.0);
    }

    #[test]
    fn qemu_gets_a_shared_memfd_and_virtio_mmio_fs_device_with_remios_tag_and_queue_size() {
        let args = qemu_fs_args(Path::new("/run/x/virtiofsd.sock")).join(" ");

        assert!(
            args.contains("memory-backend-memfd,id=mem,size=256M,share=on"),
            "{args}"
        );
        assert!(
            args.contains("socket,id=fs,path=/run/x/virtiofsd.sock"),
            "{args}"
        );
        assert!(
            args.contains("vhost-user-fs-device,chardev=fs,tag=remio,queue-size=1024"),
            "{args}"
        );
    }
}
