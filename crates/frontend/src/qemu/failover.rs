//! What the guest sees of a device whose device model died: a failed device, not a hang.
//!
//! The hypervisor model can only complete the *register accesses* of a dead session (a read
//! returns 0); the guest's driver also has requests queued in guest memory, which died with
//! the device model, and waits for them forever. What a failed device looks like and how its
//! requests are returned is the device's business, not the bridge's: each window has a
//! [`DeviceFailover`] (for virtio-mmio, `remio_virtio::failover::MmioFailover`, which `remio run`
//! plugs in), and [`Failover`] only routes to it:
//!
//! - while the device model lives, every access is forwarded and then shown to the window's
//!   [`DeviceFailover`] (`observe_read`, `observe_write`), which keeps what it needs;
//! - once the window is declared dead ([`Failover::fail`]), the window's accesses go to its
//!   [`DeviceFailover`] alone, with guest RAM at hand, and its interrupt is raised when the
//!   device says so; [`Failover::sweep`] lets it return requests queued without a notify.
//!
//! A device model being restarted (`remio run --dm-restarts`) is not failed: its successor
//! resumes the device, and the window forwards as before.

use std::sync::{Arc, Mutex, MutexGuard};

/// Guest memory as [`DeviceFailover`] sees it (re-exported so that implementations need not
/// name vm-memory themselves).
pub use vm_memory::GuestMemoryMmap;

use super::pci::WINDOW_SIZE;
use super::remote::{MmioTarget, TargetError};

/// Raises window `i`'s interrupt.
pub type RaiseIrq = Box<dyn Fn() + Send + Sync>;

/// What the bridge needs from a device to answer for it once its device model is gone.
/// `offset` is the register's offset in the window (below [`WINDOW_SIZE`]), `width` 1, 2, 4
/// or 8; `mem` is guest RAM (absent when the bridge could not map it). The methods that return
/// a `bool` return whether the window's interrupt must be raised.
pub trait DeviceFailover: Send {
    /// The live device model answered `value` to a read.
    fn observe_read(&mut self, offset: u64, width: u8, value: u64);
    /// The live device model took a write of `value`.
    fn observe_write(&mut self, offset: u64, width: u8, value: u64);
    /// The device model is gone: the window is a failed device from now on; return what is in
    /// flight. Called again, it only sweeps.
    fn fail(&mut self, mem: Option<&GuestMemoryMmap>) -> bool;
    /// Return what was queued since the last call, if failed.
    fn sweep(&mut self, mem: Option<&GuestMemoryMmap>) -> bool;
    /// A read of the failed window.
    fn read(&mut self, offset: u64, width: u8) -> u64;
    /// A write to the failed window.
    fn write(&mut self, offset: u64, width: u8, value: u64, mem: Option<&GuestMemoryMmap>) -> bool;
}

/// A device the bridge knows nothing of: a failed window reads 0 (as the hypervisor model
/// answers a dead session), ignores writes and returns nothing. For windows that are not
/// virtio-mmio, and for tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpaqueDevice;

impl DeviceFailover for OpaqueDevice {
    fn observe_read(&mut self, _: u64, _: u8, _: u64) {}
    fn observe_write(&mut self, _: u64, _: u8, _: u64) {}
    fn fail(&mut self, _: Option<&GuestMemoryMmap>) -> bool {
        false
    }
    fn sweep(&mut self, _: Option<&GuestMemoryMmap>) -> bool {
        false
    }
    fn read(&mut self, _: u64, _: u8) -> u64 {
        0
    }
    fn write(&mut self, _: u64, _: u8, _: u64, _: Option<&GuestMemoryMmap>) -> bool {
        false
    }
}

/// One window: whether it failed, and its device's failover.
struct Window {
    failed: bool,
    device: Box<dyn DeviceFailover>,
}

/// The failover layer of one bridge (see the module docs).
pub struct Failover {
    inner: Arc<dyn MmioTarget>,
    bases: Vec<u64>,
    /// Lock order: one window at a time; never held across an inner access.
    windows: Vec<Mutex<Window>>,
    mem: Option<GuestMemoryMmap>,
    raise: Vec<RaiseIrq>,
}

impl std::fmt::Debug for Failover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("windows", &self.bases)
            .finish_non_exhaustive()
    }
}

impl Failover {
    /// Forwards accesses to the windows starting at `bases[i]` to `inner`, showing them to
    /// `devices[i]`; once window `i` failed, `devices[i]` answers it, with `mem` (guest RAM),
    /// and `raise[i]` raises its interrupt. A window without a device is an [`OpaqueDevice`].
    pub fn new(
        inner: Arc<dyn MmioTarget>,
        bases: Vec<u64>,
        mem: Option<GuestMemoryMmap>,
        raise: Vec<RaiseIrq>,
        devices: Vec<Box<dyn DeviceFailover>>,
    ) -> Self {
        let mut devices = devices.into_iter();
        let windows = bases
            .iter()
            .map(|_| {
                let device = devices
                    .next()
                    .unwrap_or_else(|| Box::new(OpaqueDevice) as Box<dyn DeviceFailover>);
                Mutex::new(Window {
                    failed: false,
                    device,
                })
            })
            .collect();
        Self {
            inner,
            bases,
            windows,
            mem,
            raise,
        }
    }

    /// Window index and register offset of `addr`.
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.bases.iter().enumerate().find_map(|(i, &base)| {
            let off = addr.checked_sub(base).filter(|&o| o < WINDOW_SIZE)?;
            Some((i, off))
        })
    }

    fn window(&self, i: usize) -> Option<MutexGuard<'_, Window>> {
        // A poisoned lock only means a panic elsewhere; the window's state is still usable.
        self.windows
            .get(i)
            .map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn raise_if(&self, i: usize, raise: bool) {
        if raise {
            if let Some(r) = self.raise.get(i) {
                r();
            }
        }
    }

    /// Declares window `i`'s device model dead: from now on the window is a failed device.
    /// Idempotent; returns whether `i` is a window.
    pub fn fail(&self, i: usize) -> bool {
        let Some(mut w) = self.window(i) else {
            return false;
        };
        if !w.failed {
            log::warn!("qemu bridge: window {i} has lost its device model: failing it");
        }
        w.failed = true;
        let raise = w.device.fail(self.mem.as_ref());
        drop(w);
        self.raise_if(i, raise);
        true
    }

    /// Whether window `i` was failed.
    pub fn is_failed(&self, i: usize) -> bool {
        self.window(i).is_some_and(|w| w.failed)
    }

    /// Lets every failed window return what its driver queued since the last pass (a request
    /// whose notification was suppressed is not left behind).
    pub fn sweep(&self) {
        for i in 0..self.windows.len() {
            let raise = self
                .window(i)
                .is_some_and(|mut w| w.failed && w.device.sweep(self.mem.as_ref()));
            self.raise_if(i, raise);
        }
    }
}

impl MmioTarget for Failover {
    fn read(&self, addr: u64, width: u8) -> Result<u64, TargetError> {
        let Some((i, off)) = self.locate(addr) else {
            return self.inner.read(addr, width);
        };
        if let Some(mut w) = self.window(i) {
            if w.failed {
                return Ok(w.device.read(off, width));
            }
        }
        let v = self.inner.read(addr, width)?;
        if let Some(mut w) = self.window(i) {
            w.device.observe_read(off, width, v);
        }
        Ok(v)
    }

    fn write(&self, addr: u64, width: u8, value: u64) -> Result<(), TargetError> {
        let Some((i, off)) = self.locate(addr) else {
            return self.inner.write(addr, width, value);
        };
        if let Some(mut w) = self.window(i) {
            if w.failed {
                let raise = w.device.write(off, width, value, self.mem.as_ref());
                drop(w);
                self.raise_if(i, raise);
                return Ok(());
            }
        }
        self.inner.write(addr, width, value)?;
        if let Some(mut w) = self.window(i) {
            w.device.observe_write(off, width, value);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use vm_memory::GuestAddress;

    use super::*;

    const BASE: u64 = 0x1000_0000;
    const OTHER: u64 = 0x1000_0200;

    /// A device-model stand-in: reads answer `addr - BASE + 1`, counts the accesses it sees.
    #[derive(Default)]
    struct Dm {
        accesses: AtomicU32,
    }

    impl MmioTarget for Dm {
        fn read(&self, addr: u64, _width: u8) -> Result<u64, TargetError> {
            self.accesses.fetch_add(1, Ordering::SeqCst);
            Ok(addr - BASE + 1)
        }
        fn write(&self, _addr: u64, _width: u8, _value: u64) -> Result<(), TargetError> {
            self.accesses.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// What a window's device was shown and asked, in order.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Call {
        ObserveRead(u64, u8, u64),
        ObserveWrite(u64, u8, u64),
        Fail(bool),
        Sweep,
        Read(u64, u8),
        Write(u64, u8, u64, bool),
    }

    /// A device that records its calls; failed reads answer 0x77, and it asks for an interrupt
    /// on `fail` and on every write.
    struct Recorder(Arc<Mutex<Vec<Call>>>);

    impl DeviceFailover for Recorder {
        fn observe_read(&mut self, offset: u64, width: u8, value: u64) {
            self.0
                .lock()
                .unwrap()
                .push(Call::ObserveRead(offset, width, value));
        }
        fn observe_write(&mut self, offset: u64, width: u8, value: u64) {
            self.0
                .lock()
                .unwrap()
                .push(Call::ObserveWrite(offset, width, value));
        }
        fn fail(&mut self, mem: Option<&GuestMemoryMmap>) -> bool {
            self.0.lock().unwrap().push(Call::Fail(mem.is_some()));
            true
        }
        fn sweep(&mut self, _: Option<&GuestMemoryMmap>) -> bool {
            self.0.lock().unwrap().push(Call::Sweep);
            false
        }
        fn read(&mut self, offset: u64, width: u8) -> u64 {
            self.0.lock().unwrap().push(Call::Read(offset, width));
            0x77
        }
        fn write(
            &mut self,
            offset: u64,
            width: u8,
            value: u64,
            mem: Option<&GuestMemoryMmap>,
        ) -> bool {
            let call = Call::Write(offset, width, value, mem.is_some());
            self.0.lock().unwrap().push(call);
            true
        }
    }

    type Calls = Arc<Mutex<Vec<Call>>>;

    /// Two windows (BASE, OTHER) with recording devices; interrupts counted per window.
    fn setup() -> (Failover, Arc<Dm>, [Calls; 2], Arc<[AtomicU32; 2]>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let dm = Arc::new(Dm::default());
        let irqs = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
        let raise = (0..2)
            .map(|i| {
                let irqs = Arc::clone(&irqs);
                Box::new(move || {
                    irqs[i].fetch_add(1, Ordering::SeqCst);
                }) as RaiseIrq
            })
            .collect();
        let calls: [Calls; 2] = Default::default();
        let devices = calls
            .iter()
            .map(|c| Box::new(Recorder(Arc::clone(c))) as Box<dyn DeviceFailover>)
            .collect();
        let f = Failover::new(dm.clone(), vec![BASE, OTHER], Some(mem), raise, devices);
        (f, dm, calls, irqs)
    }

    fn taken(calls: &Calls) -> Vec<Call> {
        std::mem::take(&mut *calls.lock().unwrap())
    }

    #[test]
    fn a_live_window_forwards_and_shows_each_access_to_its_device_at_its_offset() {
        let (f, dm, calls, irqs) = setup();

        let v = f.read(OTHER + 0x100, 8).unwrap();
        f.write(OTHER + 0x70, 4, 0xf).unwrap();

        assert_eq!(v, 0x301);
        assert_eq!(dm.accesses.load(Ordering::SeqCst), 2);
        let seen = taken(&calls[1]);
        let want = [
            Call::ObserveRead(0x100, 8, 0x301),
            Call::ObserveWrite(0x70, 4, 0xf),
        ];
        assert_eq!(seen, want);
        assert!(taken(&calls[0]).is_empty());
        assert_eq!(irqs[1].load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_failed_window_is_answered_by_its_device_alone_with_guest_memory() {
        let (f, dm, calls, irqs) = setup();

        assert!(f.fail(0));
        let v = f.read(BASE + 0x70, 4).unwrap();
        f.write(BASE + 0x50, 4, 0).unwrap();

        assert_eq!(v, 0x77);
        assert_eq!(dm.accesses.load(Ordering::SeqCst), 0);
        let want = [
            Call::Fail(true),
            Call::Read(0x70, 4),
            Call::Write(0x50, 4, 0, true),
        ];
        assert_eq!(taken(&calls[0]), want);
        assert_eq!(
            irqs[0].load(Ordering::SeqCst),
            2,
            "fail and the write asked for one each"
        );
        assert!(f.is_failed(0) && !f.is_failed(1));
    }

    #[test]
    fn failing_one_window_leaves_the_other_forwarding() {
        let (f, dm, calls, irqs) = setup();
        f.fail(0);

        let v = f.read(OTHER + 4, 4).unwrap();

        assert_eq!(v, 0x205);
        assert_eq!(dm.accesses.load(Ordering::SeqCst), 1);
        assert_eq!(taken(&calls[1]), [Call::ObserveRead(4, 4, 0x205)]);
        assert_eq!(irqs[1].load(Ordering::SeqCst), 0);
    }

    #[test]
    fn sweep_reaches_only_failed_windows_and_fail_is_idempotent() {
        let (f, _dm, calls, _) = setup();
        f.fail(1);
        taken(&calls[1]);

        f.sweep();
        assert!(f.fail(1));

        assert!(taken(&calls[0]).is_empty());
        assert_eq!(taken(&calls[1]), [Call::Sweep, Call::Fail(true)]);
        assert!(!f.fail(2), "there is no window 2");
    }

    #[test]
    fn accesses_outside_every_window_are_forwarded_and_shown_to_no_device() {
        let (f, dm, calls, _) = setup();
        f.fail(0);
        f.fail(1);
        taken(&calls[0]);
        taken(&calls[1]);

        f.read(OTHER + WINDOW_SIZE, 4).unwrap();
        f.write(u64::MAX, 8, 1).unwrap();

        assert_eq!(dm.accesses.load(Ordering::SeqCst), 2);
        assert!(taken(&calls[0]).is_empty() && taken(&calls[1]).is_empty());
    }

    #[test]
    fn a_window_without_a_device_fails_opaquely() {
        let dm = Arc::new(Dm::default());
        let f = Failover::new(dm.clone(), vec![BASE], None, Vec::new(), Vec::new());
        f.read(BASE + 8, 4).unwrap();

        f.fail(0);
        f.sweep();

        assert_eq!(f.read(BASE + 8, 4).unwrap(), 0);
        f.write(BASE + 0x50, 4, 0).unwrap();
        assert_eq!(dm.accesses.load(Ordering::SeqCst), 1);
    }
}
