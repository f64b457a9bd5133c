//! The soak's device-model processes: `remio soak --serve-dm SOCKET --first F --count C`
//! serves DMs F..F+C over the socket API, and [`DmProcess`] is the platform's handle on one.
//!
//! Each DM is served as a virtio device model does it: a session (`open`), the DM's shared
//! memory mapped, InterruptStatus kept in the session's status word, one ioeventfd per queue on
//! QueueNotify (data match = queue index) drained by a queue worker that sets the used-buffer
//! bit and signals the irqfd, and a control loop (ATTACH → handle → COMPLETE) for everything
//! else (see [`super::regs`]). The scratch registers live in a state file per DM beside the
//! socket ([`state_file`]), so they survive the process, as a disk image would.
//!
//! Protocol with the platform, one line each way: the child prints `READY` once every DM is
//! set up and `RECREATED <dm>` after re-creating a session; it reads `recreate <dm>` (end the
//! session of `<dm>` and open a new one) on stdin, and exits at end of input.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use remio_abi::uapi::{BAO_IO_READ, BAO_IO_WRITE};
use remio_api::socket::SocketApi;
use remio_api::{
    ApiError, DmApi, DmSession, IoeventfdSpec, StatusWord, StatusWordSpec, VirtioRequest,
};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use vmm_sys_util::eventfd::EventFd;

use super::regs;

/// How long a new session may wait for the platform to finish ending the previous one.
const OPEN_PATIENCE: Duration = Duration::from_secs(10);

/// One DM served by this process.
struct Device {
    dm: u32,
    base: u64,
    api: SocketApi,
    /// The scratch registers, 8 bytes each from offset 0.
    state: File,
    kicks: Vec<EventFd>,
    irqfd: EventFd,
    /// The current session's status word (`None` between sessions).
    status: Mutex<Option<StatusWord>>,
    /// The current session, for `recreate` to end it.
    session: Mutex<Option<Arc<dyn DmSession>>>,
    /// A re-creation was asked for: the control loop's end is not the platform going away.
    recreate: AtomicBool,
    out: Arc<Mutex<std::io::Stdout>>,
    /// Bytes leaked per session opened (`--dm-leak-kib`: a self-test of the soak's leak check).
    leak: usize,
}

/// A session and what was set up on it.
struct Live {
    session: Arc<dyn DmSession>,
    /// The DM's shared memory, mapped as a virtio device model maps it for its queues (the
    /// soak's device has none; the mapping is made and dropped with each session).
    _mem: Box<dyn std::any::Any + Send + Sync>,
    word: StatusWord,
}

impl Device {
    /// Opens a session, retrying while the platform still ends the previous one (`EBUSY`), and
    /// sets it up: shared memory, status word, ioeventfds, irqfd.
    fn open(&self) -> anyhow::Result<Live> {
        let deadline = Instant::now() + OPEN_PATIENCE;
        let session: Arc<dyn DmSession> = loop {
            match self.api.open(self.dm) {
                Ok(s) => break Arc::from(s),
                Err(ApiError::Busy(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(e).with_context(|| format!("opening DM {}", self.dm)),
            }
        };
        let mem = Box::new(
            session
                .map_shmem(regs::SHMEM_SIZE)
                .context("mapping the shared memory")?,
        );
        let word = session
            .register_status_word(StatusWordSpec {
                status_addr: self.base + regs::INTERRUPT_STATUS,
                ack_addr: self.base + regs::INTERRUPT_ACK,
            })
            .context("registering the status word")?;
        for (q, fd) in (0u64..).zip(&self.kicks) {
            session
                .assign_ioeventfd(
                    fd,
                    IoeventfdSpec {
                        addr: self.base + regs::QUEUE_NOTIFY,
                        len: 4,
                        datamatch: Some(q),
                    },
                )
                .context("assigning an ioeventfd")?;
        }
        session
            .assign_irqfd(&self.irqfd)
            .context("assigning the irqfd")?;
        if self.leak > 0 {
            // Written, so that it is resident; leaked, so that it is never freed; black_box, so
            // that the optimiser cannot elide the allocation.
            std::hint::black_box(Box::leak(vec![0xa5u8; self.leak].into_boxed_slice()));
        }
        *lock(&self.status) = Some(word.clone());
        *lock(&self.session) = Some(session.clone());
        Ok(Live {
            session,
            _mem: mem,
            word,
        })
    }

    /// What a queue worker does for a kick: the used-buffer bit first, then the interrupt.
    fn kick(&self) {
        if let Some(w) = lock(&self.status).as_ref() {
            w.word()
                .fetch_or(regs::USED_BUFFER, std::sync::atomic::Ordering::Release);
        }
        if let Err(e) = self.irqfd.write(1) {
            log::warn!("DM {}: irqfd: {e}", self.dm);
        }
    }

    /// The value a request completes with; applies a write's effect first.
    fn handle(&self, live: &Live, req: &VirtioRequest) -> u64 {
        let Some(off) = req.addr.checked_sub(self.base) else {
            return 0;
        };
        let scratch = (regs::SCRATCH..regs::WINDOW).contains(&off) && req.access_width == 8;
        let at = off.saturating_sub(regs::SCRATCH);
        match req.op {
            BAO_IO_READ => {
                let width = u8::try_from(req.access_width).unwrap_or(0);
                if (regs::CONFIG.0..regs::CONFIG.1).contains(&off) {
                    regs::config_value(self.dm, off, width)
                } else if scratch {
                    let mut b = [0u8; 8];
                    match self.state.read_exact_at(&mut b, at) {
                        Ok(()) => u64::from_le_bytes(b),
                        Err(e) => {
                            log::warn!("DM {}: scratch read: {e}", self.dm);
                            0
                        }
                    }
                } else if off == regs::INTERRUPT_STATUS {
                    u64::from(live.word.word().load(Ordering::Acquire))
                } else {
                    0
                }
            }
            BAO_IO_WRITE => {
                if scratch {
                    if let Err(e) = self.state.write_all_at(&req.value.to_le_bytes(), at) {
                        log::warn!("DM {}: scratch write: {e}", self.dm);
                    }
                } else if off == regs::QUEUE_NOTIFY {
                    // Held while no ioeventfd was assigned (between sessions).
                    self.kick();
                } else if off == regs::INTERRUPT_ACK {
                    #[expect(clippy::cast_possible_truncation, reason = "a 32-bit register")]
                    live.word
                        .word()
                        .fetch_and(!(req.value as u32), Ordering::AcqRel);
                }
                req.value
            }
            _ => 0,
        }
    }

    /// ATTACH → handle → COMPLETE until the session ends; returns why it ended.
    fn serve(&self, live: &Live) -> ApiError {
        let mut req = match live.session.attach() {
            Ok(r) => r,
            Err(e) => return e,
        };
        loop {
            let reply = VirtioRequest {
                value: self.handle(live, &req),
                ..req
            };
            req = match live.session.complete_and_attach(&reply) {
                Ok(r) => r,
                Err(e) => return e,
            };
        }
    }

    /// The control loop of this DM, across sessions.
    fn run(&self, mut live: Live) -> anyhow::Result<()> {
        loop {
            let why = self.serve(&live);
            *lock(&self.status) = None;
            *lock(&self.session) = None;
            drop(live);
            if !self.recreate.swap(false, Ordering::AcqRel) {
                // The platform went away (or refused us): nothing more to serve.
                log::debug!("DM {}: session ended: {why}", self.dm);
                return Ok(());
            }
            live = self.open()?;
            let mut out = lock(&self.out);
            writeln!(out, "RECREATED {}", self.dm)?;
            out.flush()?;
        }
    }

    /// Ends the current session (the control loop then opens the next one).
    fn recreate(&self) {
        if let Some(s) = lock(&self.session).as_ref() {
            self.recreate.store(true, Ordering::Release);
            if let Err(e) = s.shutdown() {
                log::warn!("DM {}: shutdown: {e}", self.dm);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The file holding DM `dm`'s scratch registers, beside the socket (the platform creates it).
pub fn state_file(socket: &Path, dm: u32) -> PathBuf {
    socket.with_file_name(format!("dm{dm}.state"))
}

/// Creates every DM's state file, zeroed (every scratch register reads 0).
pub fn create_state_files(socket: &Path, dms: u32) -> anyhow::Result<()> {
    for dm in 0..dms {
        let path = state_file(socket, dm);
        let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        f.set_len(8 * regs::MAX_VCPUS as u64)?;
    }
    Ok(())
}

/// `remio soak --serve-dm SOCKET --first F --count C`: the device-model process; it leaks
/// `leak` bytes per session it opens (0 but in the self-test of the leak check).
pub fn serve_dm_child(socket: &Path, first: u32, count: u32, leak: usize) -> anyhow::Result<()> {
    // A thread that panics must not leave the process up with a request it will never
    // complete: the platform would wait for it forever (as Bao would).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let api = SocketApi::connect(socket);
    let mut devices = Vec::new();
    let mut lives = Vec::new();
    for dm in first..first + count {
        let d = Arc::new(Device {
            dm,
            base: regs::base_of(dm),
            api: api.clone(),
            state: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(state_file(socket, dm))
                .with_context(|| format!("opening the state of DM {dm}"))?,
            kicks: (0..regs::QUEUES)
                .map(|_| EventFd::new(0))
                .collect::<std::io::Result<_>>()?,
            irqfd: EventFd::new(0)?,
            status: Mutex::new(None),
            session: Mutex::new(None),
            recreate: AtomicBool::new(false),
            out: out.clone(),
            leak,
        });
        lives.push(d.open()?);
        devices.push(d);
    }
    for d in &devices {
        for q in 0..d.kicks.len() {
            let d = d.clone();
            std::thread::Builder::new()
                .name(format!("soak-dm{}-q{q}", d.dm))
                .spawn(move || loop {
                    match d.kicks[q].read() {
                        Ok(_) => d.kick(),
                        Err(e) => {
                            log::warn!("DM {}: queue {q}: {e}", d.dm);
                            return;
                        }
                    }
                })?;
        }
    }
    for (d, live) in devices.iter().zip(lives) {
        let d = d.clone();
        std::thread::Builder::new()
            .name(format!("soak-dm{}", d.dm))
            .spawn(move || {
                if let Err(e) = d.run(live) {
                    eprintln!("remio soak: device model of DM {}: {e:#}", d.dm);
                    std::process::exit(2);
                }
            })?;
    }
    {
        let mut o = lock(&out);
        writeln!(o, "READY")?;
        o.flush()?;
    }
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let dm: u32 = line
            .strip_prefix("recreate ")
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("unknown command {line:?}"))?;
        let d = devices
            .iter()
            .find(|d| d.dm == dm)
            .with_context(|| format!("DM {dm} is not served here"))?;
        d.recreate();
    }
    // The platform closed our input: it is done with us.
    std::process::exit(0);
}

/// The platform's handle on one device-model process; killed and reaped when dropped.
#[derive(Debug)]
pub struct DmProcess {
    socket: PathBuf,
    /// The DMs it serves: `first..first + count`.
    pub first: u32,
    /// How many.
    pub count: u32,
    /// Bytes it leaks per session (`--dm-leak-kib`), passed on to its successors.
    leak: usize,
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    reader: Option<JoinHandle<()>>,
}

impl DmProcess {
    /// Starts one and waits for `READY`; it leaks `leak` bytes per session it opens (0 but in
    /// the self-test of the leak check).
    pub fn spawn(socket: &Path, first: u32, count: u32, leak: usize) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding the remio executable")?;
        let mut child = Command::new(exe)
            .arg("soak")
            .arg("--serve-dm")
            .arg(socket)
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--dm-leak-kib", &(leak >> 10).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a device-model process")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("soak-dm-lines".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            })?;
        let mut p = Self {
            socket: socket.to_owned(),
            first,
            count,
            leak,
            child,
            stdin,
            lines,
            reader: Some(reader),
        };
        p.expect("READY")?;
        Ok(p)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it serves DM `dm`.
    pub fn serves(&self, dm: u32) -> bool {
        (self.first..self.first + self.count).contains(&dm)
    }

    fn expect(&mut self, want: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == want => return Ok(()),
                Ok(line) => log::debug!("soak: device model said {line:?}"),
                Err(RecvTimeoutError::Timeout) => {
                    anyhow::bail!("the device-model process did not say {want:?} in 30 s")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait()?;
                    anyhow::bail!(
                        "the device-model process exited ({status}) before saying {want:?}"
                    )
                }
            }
        }
    }

    /// SIGKILLs it, reaps it, and starts a new one on the same DMs (waiting for `READY`).
    pub fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        *self = Self::spawn(&self.socket.clone(), self.first, self.count, self.leak)?;
        Ok(())
    }

    /// Asks it to end DM `dm`'s session and open a new one; returns once it has.
    pub fn recreate(&mut self, dm: u32) -> anyhow::Result<()> {
        writeln!(self.stdin, "recreate {dm}")?;
        self.stdin.flush()?;
        self.expect(&format!("RECREATED {dm}"))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for DmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
