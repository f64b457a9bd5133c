//! The hypercall window device: serves a backend VM's `x-pci-proxy-dev` whose BAR0 is the
//! register ABI of [`remio_abi::hcwindow`], and executes each CALL as one Remote I/O hypercall
//! on a [`Hypercall`] implementation — in `remio run --dispatcher c-driver`, the hypervisor
//! model's [`BackendVm`], which serves the C driver exactly as it serves remio's own dispatcher.
//!
//! The config space is the frontend proxy's ([`ConfigSpace::with_ids`]: same vendor, class,
//! write masks and pitfalls) with device id [`hcwindow::PCI_DEVICE_ID`] and a 4 KiB BAR0. A
//! BAR access that is not an 8-byte access to a defined register reads 0 and writes nothing,
//! logged with a rate limit and counted in [`HcWindowStats::bad_accesses`]. A DEVICE_RESET
//! returns the config space and every bank to their power-on state (all zero).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use remio_abi::hcwindow::{self, BankField, Register};
use remio_abi::{Hypercall, RemioArgs};
use remio_hyp::BackendVm;

use super::pci::{ConfigSpace, PciError};
use super::wire::{Channel, Request, WireError};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum HcWindowError {
    /// The config space could not be built (a bug: the ABI's BAR size is fixed).
    #[error("config space: {0}")]
    Pci(#[from] PciError),
    /// The socket failed or the stream cannot be trusted any more.
    #[error("hypercall window socket: {0}")]
    Wire(#[from] WireError),
    /// Creating the socket pair or the thread failed.
    #[error("hypercall window: {0}")]
    Io(#[from] std::io::Error),
}

/// Counters of a window, readable while it serves.
#[derive(Debug, Default)]
pub struct HcWindowStats {
    /// Hypercalls executed (CALL writes).
    pub calls: AtomicU64,
    /// Of which returned a non-zero status.
    pub calls_failed: AtomicU64,
    /// Nanoseconds spent inside the hypercalls.
    pub call_nanos: AtomicU64,
    /// Register reads and writes other than CALL.
    pub register_accesses: AtomicU64,
    /// Accesses refused: bad width, offset or a read-only register written.
    pub bad_accesses: AtomicU64,
    /// Malformed MPQEMU messages.
    pub malformed: AtomicU64,
}

/// [`hcwindow::BANK_COUNT`] as an array length.
#[expect(clippy::cast_possible_truncation, reason = "16 fits every usize")]
const BANKS: usize = hcwindow::BANK_COUNT as usize;

/// One per-CPU register bank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bank {
    dm_id: u64,
    addr: u64,
    op: u64,
    value: u64,
    request_id: u64,
    access_width: u64,
    has_pending: u64,
    status: i64,
}

/// The window: config space, the banks and the hypercall it executes.
pub struct HcWindow {
    cfg: ConfigSpace,
    hc: Arc<dyn Hypercall>,
    dm_count: u64,
    banks: [Bank; BANKS],
    stats: Arc<HcWindowStats>,
    /// The backend's RAM fds of the last SYNC_SYSMEM, kept until the next one (unused: the
    /// window never touches backend memory).
    sysmem_fds: Vec<OwnedFd>,
}

impl std::fmt::Debug for HcWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HcWindow")
            .field("dm_count", &self.dm_count)
            .field("bar0_base", &self.cfg.bar0_base())
            .finish_non_exhaustive()
    }
}

/// Bits as the register carries them (two's complement): the status is an `i64`.
fn status_bits(status: i64) -> u64 {
    u64::from_ne_bytes(status.to_ne_bytes())
}

impl HcWindow {
    /// A window executing calls on `hc`, announcing `dm_count` devices in DM_COUNT.
    pub fn new(hc: Arc<dyn Hypercall>, dm_count: u64) -> Result<Self, HcWindowError> {
        Ok(Self {
            cfg: ConfigSpace::with_ids(hcwindow::PCI_DEVICE_ID, 0, hcwindow::BAR0_SIZE)?,
            hc,
            dm_count,
            banks: [Bank::default(); BANKS],
            stats: Arc::new(HcWindowStats::default()),
            sysmem_fds: Vec::new(),
        })
    }

    /// The window of backend VM `vm`: its hypercall, DM_COUNT = its number of Remote I/O
    /// devices.
    pub fn for_backend(vm: &BackendVm) -> Result<Self, HcWindowError> {
        let n = vm.devices().len() as u64;
        Self::new(Arc::new(vm.clone()), n)
    }

    /// The counters.
    pub fn stats(&self) -> Arc<HcWindowStats> {
        Arc::clone(&self.stats)
    }

    /// The config space (for inspection).
    pub fn config(&self) -> &ConfigSpace {
        &self.cfg
    }

    /// The offset in BAR0 of an absolute BAR address (QEMU sends absolute addresses).
    fn offset(&self, addr: u64) -> u64 {
        match addr.checked_sub(self.cfg.bar0_base()) {
            Some(off) if off < hcwindow::BAR0_SIZE => off,
            // BAR0 is naturally aligned: the low bits are the offset even if our copy of the
            // base and QEMU's shadow ever disagree.
            _ => addr & (hcwindow::BAR0_SIZE - 1),
        }
    }

    fn bad(&self, what: std::fmt::Arguments<'_>) {
        self.stats.bad_accesses.fetch_add(1, Ordering::Relaxed);
        remio_ratelimit::warn_rl!("hypercall window: {what}");
    }

    /// A read of `width` bytes at `offset` in BAR0.
    pub fn read(&self, offset: u64, width: u32) -> u64 {
        let Some(reg) = hcwindow::decode(offset, width) else {
            self.bad(format_args!("read {offset:#x}/{width}: reads 0"));
            return 0;
        };
        self.stats.register_accesses.fetch_add(1, Ordering::Relaxed);
        match reg {
            Register::Magic => hcwindow::MAGIC,
            Register::Version => hcwindow::VERSION,
            Register::DmCount => self.dm_count,
            Register::BankCount => hcwindow::BANK_COUNT,
            Register::Bank { bank, field } => {
                let Some(b) = self.banks.get(bank) else {
                    return 0; // unreachable: decode bounds the bank
                };
                match field {
                    BankField::DmId => b.dm_id,
                    BankField::Addr => b.addr,
                    BankField::Op => b.op,
                    BankField::Value => b.value,
                    BankField::RequestId => b.request_id,
                    BankField::AccessWidth => b.access_width,
                    BankField::HasPending => b.has_pending,
                    BankField::Call => status_bits(b.status),
                }
            }
        }
    }

    /// A write of `width` bytes of `value` at `offset` in BAR0. A write to CALL executes the
    /// hypercall before this returns.
    pub fn write(&mut self, offset: u64, width: u32, value: u64) {
        let Some(Register::Bank { bank, field }) = hcwindow::decode(offset, width) else {
            self.bad(format_args!(
                "write {offset:#x}/{width} = {value:#x}: ignored"
            ));
            return;
        };
        if !field.is_writable() {
            self.bad(format_args!(
                "write to read-only bank field {field:?} of bank {bank}: ignored"
            ));
            return;
        }
        if field == BankField::Call {
            self.call(bank);
            return;
        }
        self.stats.register_accesses.fetch_add(1, Ordering::Relaxed);
        let Some(b) = self.banks.get_mut(bank) else {
            return; // unreachable: decode bounds the bank
        };
        match field {
            BankField::DmId => b.dm_id = value,
            BankField::Addr => b.addr = value,
            BankField::Op => b.op = value,
            BankField::Value => b.value = value,
            BankField::RequestId => b.request_id = value,
            BankField::AccessWidth | BankField::HasPending | BankField::Call => {}
        }
    }

    fn call(&mut self, bank: usize) {
        let Some(b) = self.banks.get_mut(bank) else {
            return;
        };
        let args = RemioArgs {
            dm_id: b.dm_id,
            addr: b.addr,
            op: b.op,
            value: b.value,
            request_id: b.request_id,
        };
        let start = Instant::now();
        let ret = self.hc.remote_io(&args);
        let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        b.addr = ret.addr;
        b.op = ret.op;
        b.value = ret.value;
        b.access_width = ret.access_width;
        b.request_id = ret.request_id;
        b.has_pending = ret.has_pending;
        b.status = ret.status;
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        self.stats.call_nanos.fetch_add(ns, Ordering::Relaxed);
        if ret.status != 0 {
            self.stats.calls_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Handles one MPQEMU request; returns the reply value when QEMU waits for one.
    pub fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> Option<u64> {
        let needs_reply = req.needs_reply();
        let value = match req {
            Request::BarRead { addr, size, .. } => self.read(self.offset(addr), size),
            Request::BarWrite {
                addr, val, size, ..
            } => {
                self.write(self.offset(addr), size, val);
                0
            }
            Request::CfgRead { addr, len } => match self.cfg.read(addr, len) {
                Some(v) => u64::from(v),
                None => {
                    self.bad(format_args!("config read {addr:#x}/{len}"));
                    u64::from(u32::MAX)
                }
            },
            Request::CfgWrite { addr, val, len } => {
                if !self.cfg.write(addr, val, len) {
                    self.bad(format_args!("config write {addr:#x}/{len} = {val:#x}"));
                }
                0
            }
            Request::SyncSysmem(_) => {
                // Replacing the old descriptors closes them.
                self.sysmem_fds = fds;
                0
            }
            Request::SetIrqfd => 0, // INTx: unused; dropping `fds` closes them
            Request::DeviceReset => {
                log::debug!("hypercall window: device reset");
                self.cfg.reset();
                self.banks = [Bank::default(); BANKS];
                0
            }
            Request::Malformed { cmd, reason } => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                remio_ratelimit::warn_rl!(
                    "hypercall window: malformed message cmd {cmd}: {reason}"
                );
                u64::MAX
            }
        };
        needs_reply.then_some(value)
    }

    /// Serves `sock` until QEMU closes it. Returns `Ok` on a clean close.
    pub fn serve(mut self, sock: UnixStream) -> Result<(), HcWindowError> {
        let mut ch = Channel::new(sock);
        loop {
            let (header, payload, fds) = match ch.recv() {
                Ok(m) => m,
                Err(WireError::Closed) => {
                    log::info!("hypercall window: the backend's QEMU closed the proxy socket");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            let req = Request::decode(header.cmd, payload);
            if let Some(v) = self.handle(req, fds) {
                ch.reply(v)?;
            }
        }
    }
}

/// A window served on its own thread; QEMU gets the other end of a socket pair
/// (`-device x-pci-proxy-dev,fd=N`). Start it before the backend's QEMU.
#[derive(Debug)]
pub struct HcWindowServer {
    qemu_end: OwnedFd,
    stats: Arc<HcWindowStats>,
    thread: Option<JoinHandle<Result<(), HcWindowError>>>,
}

impl HcWindowServer {
    /// Starts serving `window`.
    pub fn start(window: HcWindow) -> Result<Self, HcWindowError> {
        let (ours, theirs) = UnixStream::pair()?;
        let stats = window.stats();
        let thread = std::thread::Builder::new()
            .name("remio-hcwindow".into())
            .spawn(move || {
                let r = window.serve(ours);
                if let Err(e) = &r {
                    log::error!("hypercall window stopped: {e}");
                }
                r
            })?;
        Ok(Self {
            qemu_end: theirs.into(),
            stats,
            thread: Some(thread),
        })
    }

    /// QEMU's end of the socket (to be inherited by the backend's QEMU).
    pub fn qemu_fd(&self) -> RawFd {
        self.qemu_end.as_raw_fd()
    }

    /// The window's counters.
    pub fn stats(&self) -> Arc<HcWindowStats> {
        Arc::clone(&self.stats)
    }

    /// Whether the serving thread has stopped (QEMU closed the socket, or an error).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use std::time::Duration;

    use remio_abi::{RemioOp, RemioRet};
    use remio_hyp::{Hypervisor, ShmemConfig};

    use super::super::wire::{self, Header};
    use super::*;

    const BAR: u64 = 0xfe00_0000;

    /// The backend QEMU's side of the socket: sends MPQEMU messages, reads the replies.
    struct Qemu(UnixStream);

    impl Qemu {
        fn send(&mut self, cmd: i32, payload: &[u8]) {
            let size = payload.len() as u64;
            self.0.write_all(&Header { cmd, size }.encode()).unwrap();
            self.0.write_all(payload).unwrap();
        }

        fn ret(&mut self) -> u64 {
            let mut b = [0u8; 24];
            self.0.read_exact(&mut b).unwrap();
            assert_eq!(
                Header::decode(b[..16].try_into().unwrap()),
                Header { cmd: 1, size: 8 }
            );
            u64::from_ne_bytes(b[16..].try_into().unwrap())
        }

        fn cfg_read(&mut self, addr: u32, len: i32) -> u64 {
            let mut p = addr.to_ne_bytes().to_vec();
            p.extend_from_slice(&0u32.to_ne_bytes());
            p.extend_from_slice(&len.to_ne_bytes());
            self.send(wire::CMD_PCI_CFGREAD, &p);
            self.ret()
        }

        fn cfg_write(&mut self, addr: u32, val: u32, len: i32) {
            let mut p = addr.to_ne_bytes().to_vec();
            p.extend_from_slice(&val.to_ne_bytes());
            p.extend_from_slice(&len.to_ne_bytes());
            self.send(wire::CMD_PCI_CFGWRITE, &p);
            assert_eq!(self.ret(), 0);
        }

        fn bar(offset: u64, val: u64, size: u32) -> Vec<u8> {
            let mut p = (BAR + offset).to_ne_bytes().to_vec();
            p.extend_from_slice(&val.to_ne_bytes());
            p.extend_from_slice(&size.to_ne_bytes());
            p.extend_from_slice(&[1, 0, 0, 0]);
            p
        }

        fn read_w(&mut self, offset: u64, size: u32) -> u64 {
            self.send(wire::CMD_BAR_READ, &Self::bar(offset, 0, size));
            self.ret()
        }

        fn write_w(&mut self, offset: u64, val: u64, size: u32) {
            self.send(wire::CMD_BAR_WRITE, &Self::bar(offset, val, size));
            assert_eq!(self.ret(), 0);
        }

        fn read(&mut self, offset: u64) -> u64 {
            self.read_w(offset, 8)
        }

        fn write(&mut self, offset: u64, val: u64) {
            self.write_w(offset, val, 8);
        }

        fn field(&mut self, bank: u64, f: BankField) -> u64 {
            self.read(hcwindow::bank_offset(bank, f).unwrap())
        }

        fn set(&mut self, bank: u64, f: BankField, v: u64) {
            self.write(hcwindow::bank_offset(bank, f).unwrap(), v);
        }

        /// Fills bank `bank`'s inputs, writes CALL, returns the status as an i64.
        fn call(&mut self, bank: u64, args: RemioArgs) -> i64 {
            self.set(bank, BankField::DmId, args.dm_id);
            self.set(bank, BankField::Addr, args.addr);
            self.set(bank, BankField::Op, args.op);
            self.set(bank, BankField::Value, args.value);
            self.set(bank, BankField::RequestId, args.request_id);
            self.set(bank, BankField::Call, 0);
            i64::from_ne_bytes(self.field(bank, BankField::Call).to_ne_bytes())
        }

        /// Programs BAR0 at `BAR` and enables memory decoding, as the guest's PCI code does.
        fn enable(&mut self) {
            self.cfg_write(0x10, u32::try_from(BAR).unwrap(), 4);
            self.cfg_write(4, 2, 2);
        }
    }

    fn serve(window: HcWindow) -> (Qemu, std::thread::JoinHandle<Result<(), HcWindowError>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let t = std::thread::spawn(move || window.serve(ours));
        (Qemu(theirs), t)
    }

    /// A hypervisor with `n` device pairs: frontend windows at 0x1000_0000 + i * 0x200,
    /// backend interrupts 64 + i.
    fn hyp(n: u32) -> Arc<Hypervisor> {
        let shmem = ShmemConfig {
            id: 0,
            size: 0x10000,
            backing: None,
        };
        crate::qemu::test_hyp::hypervisor(n, shmem, Duration::from_secs(20))
    }

    /// Waits (bounded) until backend interrupt eventfd `e` was signalled.
    fn wait_irq(e: &vmm_sys_util::eventfd::EventFd) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while e.read().is_err() {
            assert!(Instant::now() < deadline, "no backend interrupt");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn ask(dm_id: u64) -> RemioArgs {
        RemioArgs {
            dm_id,
            op: RemioOp::Ask as u64,
            ..RemioArgs::default()
        }
    }

    #[test]
    fn config_space_is_the_proxy_contract_with_device_0x00fe_and_a_4k_bar() {
        let hyp = hyp(1);
        let (mut q, t) = serve(HcWindow::for_backend(&hyp.backend(2).unwrap()).unwrap());
        assert_eq!(q.cfg_read(0, 2), 0x1b36);
        assert_eq!(q.cfg_read(2, 2), 0x00fe);
        q.cfg_write(0x10, 0xffff_ffff, 4);
        assert_eq!(q.cfg_read(0x10, 4), 0xffff_f000);
        q.cfg_write(4, 0xffff, 2);
        assert_eq!(q.cfg_read(4, 2), 0x0547);
        assert_eq!(q.cfg_read(0x14, 4), 0, "no BAR1");
        drop(q);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn global_registers_identify_the_window_and_count_the_backends_devices() {
        let hyp = hyp(3);
        let (mut q, t) = serve(HcWindow::for_backend(&hyp.backend(2).unwrap()).unwrap());
        q.enable();
        assert_eq!(q.read(hcwindow::REG_MAGIC).to_le_bytes(), *b"REMIOHC1");
        assert_eq!(q.read(hcwindow::REG_VERSION), 1);
        assert_eq!(q.read(hcwindow::REG_DM_COUNT), 3);
        assert_eq!(q.read(hcwindow::REG_BANK_COUNT), 16);
        drop(q);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn two_banks_interleaved_serve_a_read_and_a_write_on_two_devices() {
        let hyp = hyp(2);
        let backend = hyp.backend(2).unwrap();
        let irq0 = backend.irq_eventfd(64).unwrap();
        let irq1 = backend.irq_eventfd(65).unwrap();
        let window = HcWindow::for_backend(&backend).unwrap();
        let stats = window.stats();
        let (mut q, t) = serve(window);
        q.enable();
        let fe = hyp.frontend(1).unwrap();

        // Nothing queued yet: ASK returns +1 (not negated).
        assert_eq!(q.call(0, ask(0)), 1);

        let reader = {
            let fe = fe.clone();
            std::thread::spawn(move || fe.read(0x1000_0070, 4))
        };
        wait_irq(&irq0);
        let writer = {
            let fe = fe.clone();
            std::thread::spawn(move || fe.write(0x1000_0250, 2, 0xbeef))
        };
        wait_irq(&irq1);

        // Bank 0 takes device 0's read, bank 1 device 1's write, interleaved.
        assert_eq!(q.call(0, ask(0)), 0);
        assert_eq!(q.call(1, ask(1)), 0);
        assert_eq!(q.field(0, BankField::Addr), 0x1000_0070);
        assert_eq!(q.field(0, BankField::Op), RemioOp::Read as u64);
        assert_eq!(q.field(0, BankField::AccessWidth), 4);
        assert_eq!(q.field(0, BankField::HasPending), 0);
        assert_eq!(q.field(1, BankField::Addr), 0x1000_0250);
        assert_eq!(q.field(1, BankField::Op), RemioOp::Write as u64);
        assert_eq!(q.field(1, BankField::Value), 0xbeef);
        assert_eq!(q.field(1, BankField::AccessWidth), 2);
        let (id0, id1) = (
            q.field(0, BankField::RequestId),
            q.field(1, BankField::RequestId),
        );
        assert_ne!(id0, id1);
        assert_eq!(q.field(0, BankField::DmId), 0, "DM_ID is an input only");
        assert_eq!(q.field(1, BankField::DmId), 1);

        // Complete device 1's write from bank 1, then device 0's read from bank 0.
        let done1 = RemioArgs {
            dm_id: 1,
            op: RemioOp::Write as u64,
            request_id: id1,
            ..RemioArgs::default()
        };
        assert_eq!(q.call(1, done1), 0);
        writer.join().unwrap().unwrap();
        let done0 = RemioArgs {
            dm_id: 0,
            op: RemioOp::Read as u64,
            value: 0x7472_6976,
            request_id: id0,
            ..RemioArgs::default()
        };
        assert_eq!(q.call(0, done0), 0);
        assert_eq!(reader.join().unwrap().unwrap(), 0x7472_6976);
        // The outputs of a completion replace the bank's fields.
        assert_eq!(q.field(0, BankField::Value), 0);
        assert_eq!(stats.calls.load(Ordering::Relaxed), 5);
        assert_eq!(stats.calls_failed.load(Ordering::Relaxed), 1);
        drop(q);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn has_pending_is_set_while_the_fifo_holds_more() {
        let hyp = hyp(1);
        let backend = hyp.backend(2).unwrap();
        let irq = backend.irq_eventfd(64).unwrap();
        let (mut q, t) = serve(HcWindow::for_backend(&backend).unwrap());
        q.enable();
        let fe = hyp.frontend(1).unwrap();
        let a = {
            let fe = fe.clone();
            std::thread::spawn(move || fe.write(0x1000_0010, 4, 1))
        };
        wait_irq(&irq);
        let b = {
            let fe = fe.clone();
            std::thread::spawn(move || fe.write(0x1000_0014, 4, 2))
        };
        wait_irq(&irq);
        assert_eq!(q.call(3, ask(0)), 0);
        assert_eq!(q.field(3, BankField::HasPending), 1);
        let first = q.field(3, BankField::RequestId);
        assert_eq!(q.call(4, ask(0)), 0);
        assert_eq!(q.field(4, BankField::HasPending), 0);
        let second = q.field(4, BankField::RequestId);
        for id in [first, second] {
            let done = RemioArgs {
                dm_id: 0,
                op: RemioOp::Write as u64,
                request_id: id,
                ..RemioArgs::default()
            };
            assert_eq!(q.call(3, done), 0);
        }
        a.join().unwrap().unwrap();
        b.join().unwrap().unwrap();
        drop(q);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn the_hypervisor_models_status_codes_come_back_exactly_through_call() {
        let hyp = hyp(1);
        let backend = hyp.backend(2).unwrap();
        let notified = Arc::new(AtomicUsize::new(0));
        let n = Arc::clone(&notified);
        hyp.frontend(1)
            .unwrap()
            .set_interrupt_sink(
                0,
                Arc::new(move || {
                    n.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .unwrap();
        let (mut q, t) = serve(HcWindow::for_backend(&backend).unwrap());
        q.enable();
        // ASK with a non-zero addr: +1.
        let bad_ask = RemioArgs { addr: 4, ..ask(0) };
        assert_eq!(q.call(0, bad_ask), 1);
        // ASK on a dm_id out of range: +1.
        assert_eq!(q.call(0, ask(7)), 1);
        // A completion of a request nobody asked for: -3.
        let stray = RemioArgs {
            dm_id: 0,
            op: RemioOp::Read as u64,
            request_id: 2,
            ..RemioArgs::default()
        };
        assert_eq!(q.call(0, stray), -3);
        // An op Bao does not define: -3.
        let unknown = RemioArgs {
            op: 9,
            ..RemioArgs::default()
        };
        assert_eq!(q.call(0, unknown), -3);
        // NOTIFY on a bad dm_id: -3; on a good one: 0, and the frontend interrupt fires.
        let notify = |dm_id| RemioArgs {
            dm_id,
            op: RemioOp::Notify as u64,
            ..RemioArgs::default()
        };
        assert_eq!(q.call(0, notify(1)), -3);
        assert_eq!(q.call(0, notify(0)), 0);
        assert_eq!(notified.load(Ordering::SeqCst), 1);
        assert_eq!(hyp.stats().notifies, 1);
        drop(q);
        t.join().unwrap().unwrap();
    }

    /// A hypercall double: records the inputs, returns a set result.
    struct Fixed {
        seen: Mutex<Vec<RemioArgs>>,
        ret: Mutex<RemioRet>,
    }

    impl Hypercall for Fixed {
        fn remote_io(&self, args: &RemioArgs) -> RemioRet {
            self.seen.lock().unwrap().push(*args);
            *self.ret.lock().unwrap()
        }
    }

    #[test]
    fn every_status_and_output_is_passed_through_bit_exact() {
        let hc = Arc::new(Fixed {
            seen: Mutex::new(Vec::new()),
            ret: Mutex::new(RemioRet::default()),
        });
        let (mut q, t) = serve(HcWindow::new(hc.clone(), 1).unwrap());
        q.enable();
        for status in [0, 1, -1, -2, -3] {
            *hc.ret.lock().unwrap() = RemioRet {
                status,
                addr: u64::MAX,
                op: 1,
                value: 0x8000_0000_0000_0001,
                access_width: 8,
                request_id: 3,
                has_pending: 1,
            };
            let args = RemioArgs {
                dm_id: 15,
                addr: 0xdead_beef_0000,
                op: 2,
                value: u64::MAX - 1,
                request_id: 63,
            };
            assert_eq!(q.call(15, args), status);
            assert_eq!(*hc.seen.lock().unwrap().last().unwrap(), args);
            assert_eq!(q.field(15, BankField::Addr), u64::MAX);
            assert_eq!(q.field(15, BankField::Value), 0x8000_0000_0000_0001);
            assert_eq!(q.field(15, BankField::AccessWidth), 8);
            assert_eq!(q.field(15, BankField::RequestId), 3);
            assert_eq!(q.field(15, BankField::HasPending), 1);
        }
        // Another bank is untouched.
        assert_eq!(q.field(14, BankField::Call), 0);
        drop(q);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn bad_widths_offsets_and_read_only_writes_read_0_and_change_nothing() {
        let hc = Arc::new(Fixed {
            seen: Mutex::new(Vec::new()),
            ret: Mutex::new(RemioRet::with_status(-3)),
        });
        let window = HcWindow::new(hc.clone(), 2).unwrap();
        let stats = window.stats();
        let (mut q, t) = serve(window);
        q.enable();
        let dm = hcwindow::bank_offset(0, BankField::DmId).unwrap();
        let call = hcwindow::bank_offset(0, BankField::Call).unwrap();
        // Narrow accesses to real registers.
        assert_eq!(q.read_w(hcwindow::REG_MAGIC, 4), 0);
        q.write_w(dm, 5, 4);
        assert_eq!(q.read(dm), 0);
        q.write_w(call, 1, 4);
        assert!(
            hc.seen.lock().unwrap().is_empty(),
            "a 4-byte CALL runs nothing"
        );
        // Unaligned, reserved and past-the-banks offsets.
        assert_eq!(q.read(dm + 4), 0);
        assert_eq!(q.read(0x20), 0);
        assert_eq!(q.read(0x800), 0);
        q.write(0x800, 1);
        // Read-only registers.
        q.write(hcwindow::REG_DM_COUNT, 9);
        assert_eq!(q.read(hcwindow::REG_DM_COUNT), 2);
        q.write(hcwindow::bank_offset(0, BankField::HasPending).unwrap(), 1);
        assert_eq!(q.field(0, BankField::HasPending), 0);
        assert_eq!(stats.bad_accesses.load(Ordering::Relaxed), 9);
        assert_eq!(stats.calls.load(Ordering::Relaxed), 0);
        drop(q);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn device_reset_clears_the_banks_and_the_bar_and_unknown_messages_get_a_reply() {
        let hc = Arc::new(Fixed {
            seen: Mutex::new(Vec::new()),
            ret: Mutex::new(RemioRet::with_status(1)),
        });
        let (mut q, t) = serve(HcWindow::new(hc, 1).unwrap());
        q.enable();
        q.send(wire::CMD_SYNC_SYSMEM, &[0u8; 192]);
        q.set(2, BankField::Value, 77);
        assert_eq!(q.call(2, ask(0)), 1);
        q.send(wire::CMD_DEVICE_RESET, &[]);
        assert_eq!(q.ret(), 0);
        assert_eq!(q.cfg_read(0x10, 4), 0);
        q.enable();
        assert_eq!(q.field(2, BankField::Value), 0);
        assert_eq!(q.field(2, BankField::Call), 0);
        q.send(42, &[]);
        assert_eq!(q.ret(), u64::MAX);
        drop(q);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn a_started_server_hands_qemu_a_socket_and_stops_when_it_closes() {
        use std::os::fd::FromRawFd;
        let hc = Arc::new(Fixed {
            seen: Mutex::new(Vec::new()),
            ret: Mutex::new(RemioRet::default()),
        });
        let server = HcWindowServer::start(HcWindow::new(hc, 4).unwrap()).unwrap();
        // SAFETY: a duplicate of the server's QEMU end, owned by this stream from here on.
        let theirs = unsafe { UnixStream::from_raw_fd(libc::dup(server.qemu_fd())) };
        let mut q = Qemu(theirs);
        assert_eq!(q.read(hcwindow::REG_DM_COUNT), 4);
        assert!(!server.finished());
        drop(q);
        drop(server); // the server's own end closes with it
    }
}
