//! Shared helpers of the end-to-end tests: each test boots the real guest under QEMU TCG
//! through `remio run` (platform + bridge + device-model process) and checks what the guest
//! and the host see.
//!
//! A test skips, loudly, only when qemu-system-x86_64 or the guest artifacts are missing
//! (scripts/setup installs both; CI runs it first), and fails instead with
//! REMIO_REQUIRE_GUEST=1. Guests boot one at a time ([`boot_lock`]), and every run is bounded
//! ([`GUEST_TIMEOUT`]).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Guest shell defining `wait_disk`: waits (at most 10 s) for /dev/vda to exist, e.g. after a
/// driver rebind (which probes synchronously; a script should not assume it regardless).
pub const WAIT_DISK_FN: &str = "wait_disk() { j=0; until [ -b /dev/vda ] || [ $j -ge 100 ]; \
                                do sleep 0.1; j=$((j+1)); done; }\n";

/// `script` with [`WAIT_DISK_FN`] defined before it.
pub fn with_wait_disk(script: &str) -> String {
    format!("{WAIT_DISK_FN}{script}")
}

pub fn guest_dir() -> PathBuf {
    std::env::var_os("REMIO_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"))
}

/// Whether scripts/test asked for the guest tests to run rather than skip.
pub fn guest_required() -> bool {
    std::env::var_os("REMIO_REQUIRE_GUEST").is_some_and(|v| v == "1")
}

/// `true` when the test can run; prints a loud SKIPPED line otherwise, or fails when
/// REMIO_REQUIRE_GUEST=1 (scripts/test sets it: there a skip would hide a broken setup).
pub fn prerequisites(test: &str) -> bool {
    let missing = if !on_path("qemu-system-x86_64") {
        Some("qemu-system-x86_64 not found (run scripts/setup)".to_owned())
    } else {
        guest_missing()
    };
    runnable(test, missing)
}

/// Why the frontend guest's artifacts cannot be used, if they cannot.
fn guest_missing() -> Option<String> {
    let dir = guest_dir();
    (!dir.join("vmlinuz").is_file() || !dir.join("initramfs.cpio").is_file()).then(|| {
        format!(
            "guest artifacts missing in {} (run `remio guest build`)",
            dir.display()
        )
    })
}

/// `true` when nothing is `missing`; otherwise a loud SKIPPED line naming it, or a panic under
/// REMIO_REQUIRE_GUEST=1.
pub fn runnable(test: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(why) if guest_required() => panic!("{test}: REMIO_REQUIRE_GUEST=1 but {why}"),
        Some(why) => {
            eprintln!("\n*** SKIPPED {test}: {why} ***\n");
            false
        }
    }
}

/// What one `remio run --exec` produced.
#[derive(Debug)]
pub struct RunOutput {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// How long one guest run may take (`remio run --timeout`). A boot takes 3-4 s idle and
/// about 10 s with both cores busy; the longest script (ext4) adds a few seconds.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The test gives up on (and kills) `remio run` this long after its own timeout.
const GRACE: Duration = Duration::from_secs(30);

/// One guest at a time, machine-wide: every e2e test, in every test binary and every cargo
/// invocation, boots only while it holds an exclusive lock on this file (two TCG guests on two
/// cores slow each other down past their timeouts). `flock` locks belong to an open file
/// description, so this also serialises the threads of one test binary.
const BOOT_LOCK_PATH: &str = "/tmp/remio-e2e-boot.lock";

/// Holds the machine-wide boot lock until dropped.
pub struct BootLock(std::fs::File);

pub fn boot_lock() -> BootLock {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(BOOT_LOCK_PATH)
        .expect("opening the e2e boot lock");
    let waited = Instant::now();
    file.lock().expect("locking the e2e boot lock");
    if waited.elapsed() > Duration::from_secs(1) {
        eprintln!(
            "(waited {:?} for another guest to finish)",
            waited.elapsed()
        );
    }
    BootLock(file)
}

/// Kills `remio run` if the test panics while it runs (its children die with it).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Stops `remio run` if the test fails while it runs: SIGTERM first, so that it removes what
/// it made (a TAP left behind keeps a route to 10.77.0.0/24 and breaks later pings), then
/// SIGKILL if it has not exited within 10 s.
struct StopOnDrop(std::process::Child);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill has no memory preconditions; `pid` is our child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            for _ in 0..1000 {
                if !matches!(self.0.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `remio run --exec script` without rng and with the guest's timeout, its console (the
/// guest's /dev/hvc0, where a script waits for the host's go-ahead) served on `console_sock`;
/// the caller adds its own flags and starts it with [`LiveRun::spawn`].
pub fn remio_run_console_command(console_sock: &Path, script: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_remio"));
    cmd.arg("run")
        .arg("--console-socket")
        .arg(console_sock)
        .args(["--no-rng", "--timeout"])
        .arg(GUEST_TIMEOUT.as_secs().to_string())
        .arg("--exec")
        .arg(script);
    cmd
}

/// A `remio run` a test talks to while it runs: its stdout lines (echoed as `  | line` on the
/// test's stderr) come through [`LiveRun::wait_for`], its stderr is collected for
/// [`LiveRun::finish`], and it is killed if the test fails first.
pub struct LiveRun {
    child: StopOnDrop,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    deadline: Instant,
}

impl LiveRun {
    /// Starts `cmd` (a `remio run`) with stdin null and stdout and stderr piped; the guest has
    /// [`GUEST_TIMEOUT`] from now for everything the test waits for.
    pub fn spawn(cmd: &mut std::process::Command) -> Self {
        use std::io::{BufRead as _, Read as _};
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting remio run");
        let mut err = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let out = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                eprintln!("  | {line}");
                let _ = tx.send(line);
            }
        });
        Self {
            child: StopOnDrop(child),
            lines,
            stderr: Some(stderr),
            deadline: Instant::now() + GUEST_TIMEOUT,
        }
    }

    /// The process id of `remio run`.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// When the test stops waiting for the guest.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The next stdout line that contains `marker`; panics if none comes by the deadline.
    pub fn wait_for(&self, marker: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(self.deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("the guest never said {marker}"));
            if line.contains(marker) {
                return line;
            }
        }
    }

    /// Waits for `remio run` to exit: its status and all it wrote on stderr (also printed).
    pub fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = self.child.0.wait().expect("waiting for remio run");
        let err = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        eprintln!("--- remio stderr ---\n{err}");
        (status, err)
    }
}

/// Runs `remio run --exec script` with `extra` arguments and a wall-clock limit.
pub fn remio_exec(script: &str, extra: &[&str]) -> RunOutput {
    remio_exec_with(script, extra, |_| {})
}

/// Like [`remio_exec`]; `during` runs once with the remio process id, while it runs.
pub fn remio_exec_with(script: &str, extra: &[&str], during: impl FnOnce(u32)) -> RunOutput {
    remio_exec_bounded(script, extra, GUEST_TIMEOUT, GUEST_TIMEOUT + GRACE, during)
}

/// Like [`remio_exec_with`], with `remio run --timeout` `timeout`, and killed by the test once
/// `limit` has passed since its start (a run that needs longer than [`GUEST_TIMEOUT`]: the
/// backend VM of `--dispatcher c-driver` boots first).
pub fn remio_exec_bounded(
    script: &str,
    extra: &[&str],
    timeout: Duration,
    limit: Duration,
    during: impl FnOnce(u32),
) -> RunOutput {
    remio_exec_bounded_env(script, extra, &[], timeout, limit, during)
}

/// Like [`remio_exec`], with `envs` added to `remio run`'s environment (its device models
/// inherit it: e.g. `REMIO_CRASH_POINT`).
pub fn remio_exec_env(script: &str, extra: &[&str], envs: &[(&str, &str)]) -> RunOutput {
    remio_exec_bounded_env(
        script,
        extra,
        envs,
        GUEST_TIMEOUT,
        GUEST_TIMEOUT + GRACE,
        |_| {},
    )
}

/// [`remio_exec_bounded`] with `envs` added to `remio run`'s environment.
pub fn remio_exec_bounded_env(
    script: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
    timeout: Duration,
    limit: Duration,
    during: impl FnOnce(u32),
) -> RunOutput {
    let _lock = boot_lock();
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_remio"))
        .arg("run")
        .arg("--exec")
        .arg(script)
        .arg("--timeout")
        .arg(timeout.as_secs().to_string())
        .args(extra)
        .env("RUST_LOG", "info")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning remio");
    let mut child = KillOnDrop(child);
    let t_out = read_in_background(child.0.stdout.take().unwrap());
    let t_err = read_in_background(child.0.stderr.take().unwrap());
    during(child.0.id());
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st.code();
        }
        if start.elapsed() > limit {
            eprintln!("remio run did not stop within {limit:?}: killing it");
            let _ = child.0.kill();
            let _ = child.0.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = RunOutput {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        elapsed: start.elapsed(),
    };
    eprintln!(
        "--- remio stdout ({:.1} s) ---\n{}\n--- remio stderr ---\n{}",
        out.elapsed.as_secs_f64(),
        out.stdout,
        out.stderr
    );
    out
}

/// Reads all of `from` (a child's stdout or stderr) on a thread of its own, so that the child
/// never blocks on a full pipe; the thread returns it as text.
pub fn read_in_background(mut from: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = from.read_to_string(&mut s);
        s
    })
}

/// A fresh sparse raw image of `size` bytes in a new temporary directory.
pub fn temp_image(size: u64) -> (vmm_sys_util::tempdir::TempDir, PathBuf) {
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-e2e").unwrap();
    let path = dir.as_path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    (dir, path)
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The pid of `parent`'s child whose command line contains ` dm `.
pub fn dm_child(parent: u32) -> Option<i32> {
    let children =
        std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|w| w == b"dm"))
        })
}

/// The host's tool `name` (e2fsprogs, installed by scripts/setup), or `None` after saying, for
/// `test`, why it skips; with REMIO_REQUIRE_GUEST=1 a missing tool fails instead.
pub fn host_tool(test: &str, name: &str) -> Option<PathBuf> {
    let found = ["/sbin", "/usr/sbin", "/bin", "/usr/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        let why = format!("{name} not found (Debian package e2fsprogs; scripts/setup installs it)");
        runnable(test, Some(why));
    }
    found
}

/// A helper daemon a test drives (virtiofsd, vhost-device-vsock): the binary the environment
/// variable `env` names, else `target/tools/bin/<name>` (scripts/setup installs it there).
/// `None` after saying, for `test`, why it skips; with REMIO_REQUIRE_GUEST=1 a missing daemon
/// fails instead.
pub fn daemon_or_skip(test: &str, env: &str, name: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/tools/bin")
            .join(name)
    });
    if path.is_file() {
        return Some(path);
    }
    let why = format!("{name} not in target/tools/bin (run scripts/setup) nor {env}");
    runnable(test, Some(why));
    None
}

/// Waits (bounded by `limit`) for `name` in the run directory of `remio run` process `pid`
/// (`$TMPDIR/remio-run-<pid>-*`) to be a listening socket; its path, or `None` at the limit.
pub fn run_dir_socket(pid: u32, name: &str, limit: Duration) -> Option<PathBuf> {
    use std::os::unix::fs::FileTypeExt as _;
    let deadline = Instant::now() + limit;
    let prefix = format!("remio-run-{pid}-");
    loop {
        let found = std::fs::read_dir(std::env::temp_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path().join(name))
            .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket()));
        if found.is_some() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The console echo of e2e_console (also run through the C driver by cdriver_e2e): the guest
/// says READY on /dev/hvc0, reads one line from it, writes it back as `echo:<line>` and prints
/// `GOT <line>` on its own output.
pub const CONSOLE_ECHO_SCRIPT: &str =
    "stty -F /dev/hvc0 -echo; exec 3<>/dev/hvc0; echo READY >&3; \
     read -r line <&3; echo \"echo:$line\" >&3; echo GOT \"$line\"";

/// The line the host sends in [`console_echo_host_side`].
pub const CONSOLE_ECHO_LINE: &str = "hello-remio-4711";

/// A `--config` file (`dir/devices.toml`): the disk `img` at DM 0 (window 0x10000000) and, at
/// DM 1 (window 0x10000200), the device `dm1` describes (the rest of its `[[device]]` table:
/// its type and backend keys, one a line).
pub fn disk_and_dm1_config(dir: &Path, img: &Path, dm1: &str) -> PathBuf {
    let config = dir.join("devices.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\ndm_id = 0\ntype = \"block\"\nmmio_base = 0x10000000\npath = \"{}\"\n\n\
             [[device]]\ndm_id = 1\nmmio_base = 0x10000200\n{dm1}",
            path_str(img),
        ),
    )
    .unwrap();
    config
}

/// [`disk_and_dm1_config`] with a virtio console on the UNIX socket `sock` at DM 1, for
/// [`CONSOLE_ECHO_SCRIPT`].
pub fn console_echo_config(dir: &Path, img: &Path, sock: &Path) -> PathBuf {
    disk_and_dm1_config(
        dir,
        img,
        &format!(
            "type = \"console\"\nbackend = \"socket\"\nsocket = \"{}\"\n",
            path_str(sock)
        ),
    )
}

/// The host's side of [`CONSOLE_ECHO_SCRIPT`] on the console socket `sock` (connected to as
/// soon as it exists, until `deadline`): reads until READY, then sends [`CONSOLE_ECHO_LINE`] and
/// reads until its echo. Returns all it read (without READY, it sent nothing).
pub fn console_echo_host_side(sock: &Path, deadline: Instant) -> String {
    let mut s = connect_until(sock, deadline);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut host_side = read_until(&mut s, "READY", deadline);
    if host_side.contains("READY") {
        std::io::Write::write_all(&mut s, format!("{CONSOLE_ECHO_LINE}\n").as_bytes()).unwrap();
        host_side.push_str(&read_until(
            &mut s,
            &format!("echo:{CONSOLE_ECHO_LINE}"),
            deadline,
        ));
    }
    host_side
}

/// One run of [`CONSOLE_ECHO_SCRIPT`] on a fresh disk with [`console_echo_config`]: `run`
/// starts `remio run` with the script, the `--config` arguments and the host's side
/// ([`console_echo_host_side`], given `host_limit` from when `remio run` started) to run while
/// the guest runs. Returns the run's output and what the host read.
pub fn console_echo_run(
    host_limit: Duration,
    run: impl FnOnce(&str, &[&str], Box<dyn FnOnce(u32) + '_>) -> RunOutput,
) -> (RunOutput, String) {
    let (dir, img) = temp_image(16 << 20);
    let sock = dir.as_path().join("console.sock");
    let config = console_echo_config(dir.as_path(), &img, &sock);
    let mut host_side = String::new();
    let out = run(
        CONSOLE_ECHO_SCRIPT,
        &["--config", path_str(&config)],
        Box::new(|_| host_side = console_echo_host_side(&sock, Instant::now() + host_limit)),
    );
    (out, host_side)
}

/// Connects to the UNIX socket at `path`, retrying until `deadline` (it may not exist yet).
pub fn connect_until(path: &Path, deadline: Instant) -> std::os::unix::net::UnixStream {
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "{} never came up: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads from `s` (which has a read timeout) until `needle` has been seen, the peer closes, or
/// `deadline` passes; returns all that was read.
pub fn read_until(
    s: &mut std::os::unix::net::UnixStream,
    needle: &str,
    deadline: Instant,
) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains(needle) && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("socket: {e}"),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Whether `tool` is on PATH or in /usr/sbin or /sbin (debootstrap lives there).
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .any(|d| d.join(tool).is_file())
}

/// Whether REMIO_RUST_KMOD=1 asks for the rust-kmod tests (docs/kmod.md: its cold build takes
/// about 45 minutes, so CI does not set it).
pub fn rust_kmod_asked() -> bool {
    std::env::var_os("REMIO_RUST_KMOD").is_some_and(|v| v == "1")
}

/// `true` when a rust-kmod test (kmod_stage1, kmod_dispatcher, cdriver_e2e's rust-kmod runs)
/// should run: REMIO_RUST_KMOD=1, root, debootstrap, QEMU, and with `frontend` the frontend
/// guest. A loud SKIPPED line otherwise, or a panic under REMIO_REQUIRE_GUEST=1 when asked but
/// a prerequisite is missing.
pub fn rust_kmod_prerequisites(test: &str, frontend: bool) -> bool {
    if !rust_kmod_asked() {
        eprintln!(
            "\n*** SKIPPED {test}: the cold rust-kmod build takes about 45 minutes; set \
             REMIO_RUST_KMOD=1 to run it (docs/kmod.md) ***\n"
        );
        return false;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let missing = if !root {
        Some("not root (debootstrap and chroot need root)".to_owned())
    } else if !on_path("debootstrap") {
        Some("debootstrap not installed (scripts/setup installs it)".to_owned())
    } else if !on_path("qemu-system-x86_64") {
        Some("qemu-system-x86_64 not installed (scripts/setup installs it)".to_owned())
    } else if frontend {
        guest_missing()
    } else {
        None
    };
    runnable(test, missing)
}

/// `remio guest build --rust-kmod` (a no-op when current, about 70 s after a kmod/ change),
/// run at most once per test binary; its output when it failed.
pub fn build_rust_kmod() -> Result<(), String> {
    static BUILT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = Command::new(env!("CARGO_BIN_EXE_remio"))
                .args(["guest", "build", "--rust-kmod"])
                .output()
                .map_err(|e| format!("spawning remio guest build --rust-kmod: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "remio guest build --rust-kmod failed:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .clone()
}

/// The backend VM's console lines (`remio run -v` prefixes them with `backend| `).
pub fn backend_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter_map(|l| l.split_once("backend| ").map(|(_, rest)| rest))
        .collect()
}

/// Kernel reports that mean a module (or anything) misbehaved in the backend VM.
pub const KERNEL_TROUBLE: &[&str] = &[
    "WARNING:",
    "BUG:",
    "refcount_t",
    "use-after-free",
    "Oops",
    "Call Trace",
    "general protection",
    "kernel panic",
];

/// The backend console lines (of a `remio run -v`) that hold a [`KERNEL_TROUBLE`] report.
pub fn kernel_trouble(stderr: &str) -> Vec<&str> {
    backend_lines(stderr)
        .into_iter()
        .filter(|l| KERNEL_TROUBLE.iter().any(|t| l.contains(t)))
        .collect()
}

/// The md5 of a host file, as md5sum prints it.
pub fn md5_of(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().next().unwrap().to_owned()
}

/// Copies `file` out of the ext4 image `img` to the host file `to` with `debugfs`.
pub fn debugfs_dump(debugfs: &Path, img: &Path, file: &str, to: &Path) {
    let dump = Command::new(debugfs)
        .arg("-R")
        .arg(format!("dump {file} {}", to.display()))
        .arg(img)
        .output()
        .unwrap();
    assert!(dump.status.success(), "debugfs could not dump {file}");
}

/// The guest's side of [`ext4_round_trip`]: writes a 3,000,000-byte random /f on the ext4 at
/// /dev/vda and prints `SUM <md5>` of it.
pub const EXT4_WRITE: &str = "set -e; mount -t ext4 /dev/vda /mnt; \
                              head -c 3000000 /dev/urandom > /mnt/f; \
                              echo SUM $(md5sum < /mnt/f); umount /mnt; sync";

/// The md5 a guest printed as `SUM <md5>` (md5sum of stdin: a trailing ` -`), if it did.
pub fn guest_sum(stdout: &str) -> Option<&str> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("SUM "))
        .map(|s| s.trim_end_matches(['-', ' ']))
}

/// What [`ext4_round_trip`] leaves: the image (in `dir`), the guest's run and the file's md5.
pub struct Ext4RoundTrip {
    pub dir: vmm_sys_util::tempdir::TempDir,
    pub img: PathBuf,
    pub out: RunOutput,
    pub sum: String,
}

/// The host makes a 64 MiB ext4 image (the guest's busybox has no mkfs), `run` boots a guest
/// on it that runs [`EXT4_WRITE`] (its arguments: the script and the image), and the host
/// checks that e2fsck finds the file system clean and that debugfs reads back /f, 3,000,000
/// bytes with the guest's md5. `what` names the run in failure messages. `None` after a loud
/// skip when e2fsprogs is missing.
pub fn ext4_round_trip(
    test: &str,
    what: &str,
    run: impl FnOnce(&str, &Path) -> RunOutput,
) -> Option<Ext4RoundTrip> {
    let (Some(mkfs), Some(fsck), Some(debugfs)) = (
        host_tool(test, "mkfs.ext4"),
        host_tool(test, "e2fsck"),
        host_tool(test, "debugfs"),
    ) else {
        return None;
    };
    let (dir, img) = temp_image(64 << 20);
    let made = Command::new(mkfs).args(["-q", "-F"]).arg(&img).status();
    assert!(made.unwrap().success(), "mkfs.ext4 on the host failed");

    let out = run(EXT4_WRITE, &img);
    assert_eq!(out.status, Some(0), "{what}");
    let sum = guest_sum(&out.stdout)
        .expect("the guest printed no SUM line")
        .to_owned();

    let check = Command::new(fsck).arg("-fn").arg(&img).output().unwrap();
    assert!(
        check.status.success(),
        "{what}: e2fsck finds the guest's file system damaged:\n{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let dumped = dir.as_path().join("f");
    debugfs_dump(&debugfs, &img, "/f", &dumped);
    assert_eq!(std::fs::metadata(&dumped).unwrap().len(), 3_000_000);
    assert_eq!(md5_of(&dumped), sum, "{what}: the host reads another file");
    Some(Ext4RoundTrip { dir, img, out, sum })
}
