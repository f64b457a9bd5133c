//! The bridge's failed windows are virtio-mmio devices: `remio_virtio::failover::MmioFailover`
//! (what a virtio device whose device model died answers) plugged into the QEMU bridge's
//! `remio_frontend::qemu::DeviceFailover`, which knows windows and guest memory only. The two
//! crates do not depend on each other; this is where they meet.

use remio_frontend::qemu::failover::GuestMemoryMmap;
use remio_frontend::qemu::DeviceFailover;
use remio_virtio::failover::MmioFailover;

/// One window's failover: a virtio-mmio device.
#[derive(Debug, Default)]
pub struct VirtioWindow(MmioFailover);

/// The failover of window `_i` (every remio window is a virtio-mmio device).
pub fn virtio_window(_i: usize) -> Box<dyn DeviceFailover> {
    Box::new(VirtioWindow::default())
}

impl DeviceFailover for VirtioWindow {
    fn observe_read(&mut self, offset: u64, width: u8, value: u64) {
        self.0.observe_read(offset, width, value);
    }
    fn observe_write(&mut self, offset: u64, width: u8, value: u64) {
        self.0.observe_write(offset, width, value);
    }
    fn fail(&mut self, mem: Option<&GuestMemoryMmap>) -> bool {
        self.0.fail(mem)
    }
    fn sweep(&mut self, mem: Option<&GuestMemoryMmap>) -> bool {
        self.0.sweep(mem)
    }
    fn read(&mut self, offset: u64, width: u8) -> u64 {
        self.0.read(offset, width)
    }
    fn write(&mut self, offset: u64, width: u8, value: u64, mem: Option<&GuestMemoryMmap>) -> bool {
        self.0.write(offset, width, value, mem)
    }
}
