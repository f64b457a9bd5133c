//! virtio-console (virtio 1.2 §5.3) with one port (no MULTIPORT): receiveq 0, transmitq 1.
//! The port is backed by this process's stdin/stdout, a pseudo-terminal, or a UNIX stream
//! socket (listening; one client at a time).

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestMemory, GuestMemoryMmap, Permissions};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{
    check_avail, drain_queue, fail_device, ActivateContext, ActivateError, EventLoop, Interrupt,
    QueueError, VirtioDevice, Worker, STOP_TOKEN,
};
#[cfg(doc)]
use crate::devices::socket_path::SocketPathError;
use crate::devices::socket_path::{clear_for_socket, clear_for_symlink, remove_our_socket};
use crate::sys::{open_pty, Pty};
use remio_ratelimit::warn_rl;

/// Queue size we offer.
pub const QUEUE_SIZE: u16 = 256;
const RX_BUF: usize = 4096;

/// Where the port's bytes come from and go to.
#[derive(Debug)]
pub enum ConsolePort {
    /// stdin / stdout of this process.
    Stdio,
    /// A pseudo-terminal (the slave is kept open).
    Pty(Pty),
    /// A listening UNIX socket and its current client.
    Socket {
        /// The listener.
        listener: UnixListener,
        /// The connected client, if any.
        client: Option<UnixStream>,
        /// The socket path (removed on drop).
        path: PathBuf,
    },
}

impl ConsolePort {
    /// A new PTY port; `alias`, if given, becomes a symlink to the slave. The master is
    /// non-blocking: with nobody reading the slave, guest output is dropped once the PTY's
    /// buffer is full instead of stalling the worker (Linux's virtio_console spins the vCPU
    /// until the host takes each transmit buffer, so a stalled worker hangs the guest).
    pub fn pty(alias: Option<&Path>) -> io::Result<Self> {
        let pty = open_pty()?;
        crate::sys::set_nonblocking(pty.master.as_raw_fd())?;
        if let Some(alias) = alias {
            // A stale alias (a symbolic link) is replaced; a file there is refused.
            clear_for_symlink(alias)?;
            std::os::unix::fs::symlink(&pty.path, alias)?;
        }
        Ok(Self::Pty(pty))
    }

    /// A port listening on a UNIX socket at `path`. A stale socket there is replaced; anything
    /// else is refused with an error naming the path ([`SocketPathError`], kind
    /// `AlreadyExists`).
    pub fn socket(path: &Path) -> io::Result<Self> {
        clear_for_socket(path)?;
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(Self::Socket {
            listener,
            client: None,
            path: path.to_owned(),
        })
    }

    /// The PTY slave path, for a PTY port.
    pub fn pty_path(&self) -> Option<&Path> {
        match self {
            Self::Pty(p) => Some(&p.path),
            _ => None,
        }
    }

    fn input_fd(&self) -> Option<RawFd> {
        match self {
            Self::Stdio => Some(io::stdin().as_raw_fd()),
            Self::Pty(p) => Some(p.master.as_raw_fd()),
            Self::Socket { client, .. } => client.as_ref().map(AsRawFd::as_raw_fd),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            // The descriptor itself, not std's buffered `Stdin`: epoll watches the descriptor,
            // so bytes left in a user-space buffer would wait for the next keystroke.
            Self::Stdio => crate::sys::read_fd(io::stdin().as_fd(), buf),
            Self::Pty(p) => p.master.read(buf),
            Self::Socket { client, .. } => match client {
                Some(c) => c.read(buf),
                None => Ok(0),
            },
        }
    }

    /// Writes guest bytes `[addr, addr+len)` to the port; output without a reader is dropped
    /// (`Ok(false)`).
    fn write_from(
        &mut self,
        mem: &GuestMemoryMmap,
        addr: vm_memory::GuestAddress,
        len: usize,
    ) -> io::Result<bool> {
        let r = match self {
            Self::Stdio => mem.write_all_volatile_to(addr, &mut io::stdout(), len),
            Self::Pty(p) => mem.write_all_volatile_to(addr, &mut p.master, len),
            Self::Socket { client, .. } => match client {
                Some(c) => mem.write_all_volatile_to(addr, c, len),
                None => return Ok(false),
            },
        };
        r.map(|()| true).map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(io) => io,
            other => io::Error::other(other),
        })
    }

    fn drop_client(&mut self) {
        if let Self::Socket { client, .. } = self {
            *client = None;
        }
    }
}

impl Drop for ConsolePort {
    fn drop(&mut self) {
        if let Self::Socket { path, .. } = self {
            remove_our_socket(path);
        }
    }
}

/// The console device.
#[derive(Debug)]
pub struct ConsoleDevice {
    port: Option<ConsolePort>,
    /// Active: the worker owns the port and hands it back when stopped.
    worker: Option<Worker<ConsolePort>>,
    /// struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr (all 0: no features).
    config: [u8; 12],
}

impl ConsoleDevice {
    /// A console on `port`.
    pub fn new(port: ConsolePort) -> Self {
        Self {
            port: Some(port),
            worker: None,
            config: [0; 12],
        }
    }
}

impl VirtioDevice for ConsoleDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }
    fn avail_features(&self) -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // emerg_wr needs VIRTIO_CONSOLE_F_EMERG_WRITE, which we do not offer.
        warn_rl!("virtio-console: config write at {offset:#x} ignored");
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let (mem, [rxq, txq], [rx_evt, tx_evt], interrupt) = ctx.into_queues()?;
        let port = self.port.take().ok_or(ActivateError::BackendLost)?;
        self.worker = Some(
            Worker::spawn("virtio-console", move |stop| {
                let mut w = ConsoleWorker {
                    port,
                    mem,
                    rxq,
                    txq,
                    interrupt,
                    pending: vec![0; RX_BUF],
                    pending_start: 0,
                    pending_end: 0,
                };
                w.run(&rx_evt, &tx_evt, &stop);
                w.port
            })
            .map_err(ActivateError::Backend)?,
        );
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(port) = self.worker.take().and_then(|mut w| w.stop()) {
            self.port = Some(port);
        }
    }
}

struct ConsoleWorker {
    port: ConsolePort,
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    interrupt: std::sync::Arc<Interrupt>,
    pending: Vec<u8>,
    pending_start: usize,
    pending_end: usize,
}

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const INPUT_TOKEN: u64 = 2;
const LISTEN_TOKEN: u64 = 3;

impl ConsoleWorker {
    fn run(&mut self, rx_evt: &EventFd, tx_evt: &EventFd, stop: &EventFd) {
        let mut ev = match EventLoop::new() {
            Ok(ev) => ev,
            Err(e) => return fail_device(&self.interrupt, "virtio-console epoll", &e),
        };
        let mut setup = ev
            .add(rx_evt, RX_TOKEN)
            .and(ev.add(tx_evt, TX_TOKEN))
            .and(ev.add(stop, STOP_TOKEN));
        if let ConsolePort::Socket { listener, .. } = &self.port {
            setup = setup.and(ev.add(listener, LISTEN_TOKEN));
        }
        if let Err(e) = setup {
            return fail_device(&self.interrupt, "virtio-console epoll", &e);
        }
        let mut input_fd = self.port.input_fd();
        if let Some(fd) = input_fd {
            if let Err(e) = ev.add_raw(fd, INPUT_TOKEN) {
                // stdin redirected from a regular file cannot be polled.
                warn_rl!("virtio-console: input not pollable ({e}); input disabled");
                input_fd = None;
            }
        }
        let mut input_on = input_fd.is_some();
        let mut tokens = Vec::with_capacity(8);
        loop {
            if let Err(e) = ev.wait(-1, &mut tokens) {
                return fail_device(&self.interrupt, "virtio-console epoll", &e);
            }
            for &t in &tokens {
                let result = match t {
                    STOP_TOKEN => return,
                    TX_TOKEN => {
                        let _ = tx_evt.read();
                        self.transmit()
                    }
                    RX_TOKEN => {
                        let _ = rx_evt.read();
                        self.receive()
                    }
                    INPUT_TOKEN => {
                        if self.pending_start == self.pending_end {
                            self.read_input(&ev, &mut input_fd);
                        }
                        self.receive()
                    }
                    LISTEN_TOKEN => {
                        self.accept(&ev, &mut input_fd);
                        input_on = input_fd.is_some();
                        Ok(())
                    }
                    _ => Ok(()),
                };
                if let Err(e) = result {
                    return fail_device(&self.interrupt, "virtio-console queue", &e);
                }
            }
            // Stop polling input while bytes wait for receive buffers.
            let want = self.pending_start == self.pending_end;
            if let Some(fd) = input_fd {
                if want != input_on {
                    if let Err(e) = ev.set_enabled(fd, INPUT_TOKEN, want) {
                        warn_rl!("virtio-console: epoll modify: {e}");
                    }
                    input_on = want;
                }
            }
        }
    }

    fn accept(&mut self, ev: &EventLoop, input_fd: &mut Option<RawFd>) {
        let ConsolePort::Socket {
            listener, client, ..
        } = &mut self.port
        else {
            return;
        };
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        if client.is_some() {
            // One client at a time: refuse the newcomer.
            drop(stream);
            return;
        }
        // A client that stops reading must not stall the worker (see `ConsolePort::pty`).
        if let Err(e) = stream.set_nonblocking(true) {
            warn_rl!("virtio-console: client socket: {e}");
            return;
        }
        match ev.add(&stream, INPUT_TOKEN) {
            Ok(()) => {
                *input_fd = Some(stream.as_raw_fd());
                *client = Some(stream);
            }
            Err(e) => warn_rl!("virtio-console: cannot poll client: {e}"),
        }
    }

    fn read_input(&mut self, ev: &EventLoop, input_fd: &mut Option<RawFd>) {
        match self.port.read(&mut self.pending) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Ok(0) | Err(_) => {
                // EOF or error: stop polling this input (a socket client is dropped).
                if let Some(fd) = input_fd.take() {
                    let _ = ev.remove(fd);
                }
                self.port.drop_client();
            }
            Ok(n) => {
                self.pending_start = 0;
                self.pending_end = n;
            }
        }
    }

    /// Moves pending input into receive buffers.
    fn receive(&mut self) -> Result<(), QueueError> {
        let mem = &self.mem;
        let q = &mut self.rxq;
        let mut used_any = false;
        while self.pending_start < self.pending_end {
            check_avail(q, mem)?;
            let next = q.iter(mem)?.next();
            let Some(chain) = next else {
                if q.enable_notification(mem)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let mut written = 0usize;
            for d in chain {
                if self.pending_start >= self.pending_end {
                    break;
                }
                if !d.is_write_only() {
                    continue;
                }
                let len = (d.len() as usize).min(self.pending_end - self.pending_start);
                if !mem.check_range(d.addr(), len, Permissions::Write) {
                    warn_rl!("virtio-console: rx buffer outside guest memory");
                    break;
                }
                let src = &self.pending[self.pending_start..self.pending_start + len];
                if mem.write_slice(src, d.addr()).is_err() {
                    break;
                }
                self.pending_start += len;
                written += len;
            }
            q.add_used(mem, head, u32::try_from(written).unwrap_or(0))?;
            self.interrupt
                .stats()
                .record(crate::stats::RequestKind::Read, written as u64, true);
            used_any = true;
        }
        if used_any && q.needs_notification(mem)? {
            self.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// Sends every transmit buffer to the port. Each chain counts as one `write` request of
    /// the bytes taken from the guest; a buffer the port did not take is a `tx_backend` drop,
    /// one the device could not read a `tx_malformed` one.
    fn transmit(&mut self) -> Result<(), QueueError> {
        use crate::stats::{DropCause, RequestKind};
        let port = &mut self.port;
        let mem = &self.mem;
        let stats = self.interrupt.stats();
        let mut broken = false;
        drain_queue(&mut self.txq, mem, &self.interrupt, |chain| {
            let mut taken = 0u64;
            for d in chain {
                if d.is_write_only() {
                    continue;
                }
                let len = d.len() as usize;
                if d.addr().checked_add(d.len().into()).is_none()
                    || !mem.check_range(d.addr(), len, Permissions::Read)
                {
                    warn_rl!("virtio-console: tx buffer outside guest memory");
                    stats.record_drop(DropCause::TxMalformed);
                    break;
                }
                taken += u64::from(d.len());
                if broken {
                    stats.record_drop(DropCause::TxBackend);
                    continue;
                }
                match port.write_from(mem, d.addr(), len) {
                    Ok(true) => {}
                    Ok(false) => stats.record_drop(DropCause::TxBackend),
                    // Nobody reads fast enough: drop the rest, like a serial line.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        warn_rl!("virtio-console: output dropped: nobody reads the port");
                        stats.record_drop(DropCause::TxBackend);
                    }
                    Err(e) => {
                        warn_rl!("virtio-console: output: {e}");
                        stats.record_drop(DropCause::TxBackend);
                        broken = true;
                    }
                }
            }
            stats.record(RequestKind::Write, taken, true);
            0
        })?;
        if broken {
            self.port.drop_client();
        }
        Ok(())
    }
}

/// One receive pass (with `input` pending, at most one buffer's worth) and one transmit pass
/// over guest-controlled queues, on `port`, which is handed back (the `fuzz` entry point).
pub(crate) fn fuzz_passes(
    port: ConsolePort,
    mem: GuestMemoryMmap,
    [rxq, txq]: [Queue; 2],
    interrupt: std::sync::Arc<Interrupt>,
    input: &[u8],
) -> (ConsolePort, Result<(), QueueError>) {
    let mut pending = vec![0; RX_BUF];
    let n = input.len().min(RX_BUF);
    pending[..n].copy_from_slice(&input[..n]);
    let mut w = ConsoleWorker {
        port,
        mem,
        rxq,
        txq,
        interrupt,
        pending,
        pending_start: 0,
        pending_end: n,
    };
    let r = w.receive().and_then(|()| w.transmit());
    (w.port, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{DropCause, RequestKind};
    use std::io::Write;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[test]
    fn socket_port_carries_bytes_both_ways() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("console.sock");
        let mut dev = ConsoleDevice::new(ConsolePort::socket(&path).unwrap());
        let rxvq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let txvq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let w = u16::try_from(VRING_DESC_F_WRITE).unwrap();
        rxvq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(0x8_0000, 64, w, 0))],
            0,
        )
        .unwrap();
        mem.write_slice(b"hello guest", GuestAddress(0x9_0000))
            .unwrap();
        txvq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(0x9_0000, 11, 0, 0))],
            0,
        )
        .unwrap();
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let irq = EventFd::new(0).unwrap();
        let shared = crate::device::SharedStatus::default();
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![rxvq.create_queue().unwrap(), txvq.create_queue().unwrap()],
            queue_evts: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: Arc::new(Interrupt::new(shared.clone(), irq.try_clone().unwrap())),
            acked_features: 0,
        })
        .unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();

        // Host -> guest.
        client.write_all(b"hi host").unwrap();
        irq.read().unwrap();
        let mut got = [0u8; 7];
        mem.read_slice(&mut got, GuestAddress(0x8_0000)).unwrap();
        assert_eq!(&got, b"hi host");
        assert_eq!(rxvq.used().idx().load(), 1);

        // Guest -> host.
        evts[1].write(1).unwrap();
        let mut out = [0u8; 11];
        client.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"hello guest");
        assert_eq!(shared.interrupt_status.load(Ordering::SeqCst) & 1, 1);

        // Joining the worker makes its counters visible here.
        dev.reset();
        let st = shared.stats.snapshot();
        assert_eq!(
            (
                st.requests_of(RequestKind::Read),
                st.bytes_of(RequestKind::Read)
            ),
            (1, 7),
            "input given to the guest"
        );
        assert_eq!(
            (
                st.requests_of(RequestKind::Write),
                st.bytes_of(RequestKind::Write)
            ),
            (1, 11),
            "the guest's output"
        );
        assert_eq!(st.drops_of(DropCause::TxBackend), 0);
    }

    #[test]
    fn output_with_no_client_on_the_socket_is_counted_as_taken_and_dropped() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("console.sock");
        let txvq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let rxvq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        txvq.add_desc_chains(
            &[
                RawDescriptor::from(Descriptor::new(0x9_0000, 5, 0, 0)),
                RawDescriptor::from(Descriptor::new(0x9_1000, 6, 0, 0)),
            ],
            0,
        )
        .unwrap();
        let shared = crate::device::SharedStatus::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut w = ConsoleWorker {
            port: ConsolePort::socket(&path).unwrap(),
            mem: mem.clone(),
            rxq: rxvq.create_queue().unwrap(),
            txq: txvq.create_queue().unwrap(),
            interrupt: Arc::new(Interrupt::new(shared.clone(), irq)),
            pending: vec![0; 16],
            pending_start: 0,
            pending_end: 0,
        };

        w.transmit().unwrap();

        let st = shared.stats.snapshot();
        assert_eq!(
            (
                st.requests_of(RequestKind::Write),
                st.bytes_of(RequestKind::Write)
            ),
            (2, 11)
        );
        assert_eq!(st.drops_of(DropCause::TxBackend), 2);
    }

    #[test]
    fn a_socket_port_over_a_regular_file_is_refused_and_the_file_survives() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("console.sock");
        std::fs::write(&path, b"not a socket").unwrap();

        let err = ConsolePort::socket(&path).unwrap_err();

        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("is a regular file, not a socket"), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }

    #[test]
    fn a_pty_alias_over_a_regular_file_is_refused_and_a_stale_alias_is_replaced() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let alias = dir.as_path().join("console");
        std::fs::write(&alias, b"keep me").unwrap();

        let err = ConsolePort::pty(Some(&alias)).unwrap_err();

        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert!(err.to_string().contains("not a symbolic link"), "{err}");
        assert_eq!(std::fs::read(&alias).unwrap(), b"keep me");

        std::fs::remove_file(&alias).unwrap();
        std::os::unix::fs::symlink("/nonexistent/old-pty", &alias).unwrap();
        let port = ConsolePort::pty(Some(&alias)).unwrap();
        assert_eq!(
            std::fs::read_link(&alias).unwrap(),
            port.pty_path().unwrap()
        );
    }

    #[test]
    fn output_to_a_pty_nobody_reads_is_dropped_instead_of_stalling_the_guest() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let mut dev = ConsoleDevice::new(ConsolePort::pty(None).unwrap());
        let rxvq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
        let txvq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        // 1 MiB of output: far more than a PTY buffers.
        txvq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(
                0x10_0000, 0x10_0000, 0, 0,
            ))],
            0,
        )
        .unwrap();
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let shared = crate::device::SharedStatus::default();
        dev.activate(ActivateContext {
            mem: mem.clone(),
            queues: vec![rxvq.create_queue().unwrap(), txvq.create_queue().unwrap()],
            queue_evts: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: Arc::new(Interrupt::new(shared.clone(), irq.try_clone().unwrap())),
            acked_features: 0,
        })
        .unwrap();

        evts[1].write(1).unwrap();

        let start = std::time::Instant::now();
        let returned = loop {
            if txvq.used().idx().load() == 1 {
                break true;
            }
            if start.elapsed() > std::time::Duration::from_secs(10) {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        if !returned {
            // A stuck worker cannot be joined: leak it so the failure is reported.
            std::mem::forget(dev);
            panic!("the transmit buffer was never returned: the worker is stuck writing");
        }
        dev.reset();
        let st = shared.stats.snapshot();
        assert_eq!(
            st.bytes_of(RequestKind::Write),
            0x10_0000,
            "taken from the guest"
        );
        assert_eq!(st.drops_of(DropCause::TxBackend), 1, "and dropped");
    }
}
