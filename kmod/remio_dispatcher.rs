// SPDX-License-Identifier: GPL-2.0

//! remio's Bao I/O dispatcher as a Rust kernel module (issue 16, stage 2; docs/kmod.md).
//!
//! It serves the posted C driver's userspace API, byte-exact with `remio-abi`
//! (`crates/abi/src/uapi.rs`, spec/remote-io.md "The driver's userspace API"):
//!
//! | call | number | on |
//! | --- | --- | --- |
//! | DM_GET_INFO `_IOWR(0xA6,1,bao_dm_info)` | 0xC020A601 | `/dev/bao-io-dispatcher` |
//! | IO_CLIENT_ATTACH `_IOWR(0xA6,2,bao_virtio_request)` | 0xC030A602 | DM fd |
//! | IO_REQUEST_COMPLETE `_IOW(0xA6,3,bao_virtio_request)` | 0x4030A603 | DM fd |
//! | IOEVENTFD `_IOW(0xA6,4,bao_ioeventfd)` | 0x4020A604 | DM fd |
//! | IRQFD `_IOW(0xA6,5,bao_irqfd)` | 0x4008A605 | DM fd |
//! | mmap, offset 0, length <= shmem size | — | DM fd |
//!
//! DMs come from the platform device `bao-io-dispatcher` that remio's backend glue
//! (guest/backend/glue) registers: MEM resource *i* and IRQ resource *i* are DM *i*. Each DM's
//! interrupt runs a threaded handler that ASKs the hypervisor until its FIFO is empty and routes
//! each request: a write that matches an ioeventfd signals it and is completed at once;
//! everything else goes to the control client (ATTACH/COMPLETE). An irqfd's signal issues
//! NOTIFY. Hypercalls go through the x86 hypercall window the glue maps (`remio_hc_base`,
//! guest/backend/remio-hc.h), one register bank per CPU with local interrupts disabled.
//!
//! Unlike the posted driver (spec/remote-io.md, "Defects"): closing a DM fd never destroys the
//! DM (DMs live as long as the platform device); what a session (DM fd) owns goes with it when
//! it is closed or its process dies, while the DM's other sessions keep theirs: the requests it
//! had taken go back to the head of the DM's queue, its ioeventfds and its irqfd are dropped;
//! one interrupt handler per DM; IOEVENTFD with
//! DEASSIGN only deassigns; a signal during ATTACH restarts the call (never EFAULT); the DM fd is
//! installed only after DM_GET_INFO's answer was copied out; no allocation on the request path
//! (the queues are reserved at probe time).

use core::sync::atomic::{AtomicU32, Ordering};

use kernel::ffi::{c_int, c_long, c_uint, c_ulong, c_void};
use core::ptr::{self, NonNull};

use kernel::{
    bindings, c_str,
    cpu::CpuId,
    device::Core,
    fs::{file::FileDescriptorReservation, File},
    interrupt::local_interrupt_disable,
    ioctl::{_IOC_SIZE, _IOW, _IOWR},
    irq::{self, IrqReturn, ThreadedHandler, ThreadedRegistration},
    miscdevice::{MiscDevice, MiscDeviceOptions, MiscDeviceRegistration},
    new_condvar, new_mutex, platform,
    prelude::*,
    sync::{aref::ARef, Arc, CondVar, Mutex},
    transmute::{AsBytes, FromBytes},
    types::ForeignOwnable,
    uaccess::UserSlice,
};

/// `pr_warn!` for sites a guest or client can trigger: each site logs its first
/// [`WARN_RL_BURST`] messages, then only every 1000th (the 7.3 kernel crate has no
/// `pr_warn_ratelimited!`).
macro_rules! warn_rl {
    ($($arg:tt)*) => {{
        static COUNT: AtomicU32 = AtomicU32::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        if n < WARN_RL_BURST || n % 1000 == 0 {
            pr_warn!($($arg)*);
        }
    }};
}

/// Messages each [`warn_rl!`] site logs before it thins out.
const WARN_RL_BURST: u32 = 10;

// ---------------------------------------------------------------------------------------------
// UAPI (include/uapi/linux/bao.h of the posted patch; remio-abi's `uapi` module).

/// `BAO_IO_WRITE`.
const BAO_IO_WRITE: u64 = 0;
/// `BAO_IO_READ`.
const BAO_IO_READ: u64 = 1;
/// `BAO_IO_ASK`.
const BAO_IO_ASK: u64 = 2;
/// `BAO_IO_NOTIFY`.
const BAO_IO_NOTIFY: u64 = 3;
/// `BAO_IO_REQUEST_MAX`: requests a DM queues for its control client.
const BAO_IO_REQUEST_MAX: usize = 64;
/// `BAO_IO_MAX_DMS`.
const BAO_IO_MAX_DMS: u32 = 16;
/// `BAO_IOEVENTFD_FLAG_DATAMATCH`.
const BAO_IOEVENTFD_FLAG_DATAMATCH: u32 = 1 << 1;
/// `BAO_IOEVENTFD_FLAG_DEASSIGN`.
const BAO_IOEVENTFD_FLAG_DEASSIGN: u32 = 1 << 2;
/// `BAO_IRQFD_FLAG_DEASSIGN`.
const BAO_IRQFD_FLAG_DEASSIGN: u32 = 1;
/// ioeventfds one DM accepts (one per virtqueue is the use; bounded so a client cannot make the
/// dispatch path's scan long).
const MAX_IOEVENTFDS: usize = 32;

/// `struct bao_virtio_request`: 6 x u64, 48 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct VirtioRequest {
    dm_id: u64,
    addr: u64,
    op: u64,
    value: u64,
    access_width: u64,
    request_id: u64,
}

/// `struct bao_ioeventfd`: 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IoeventfdArg {
    fd: u32,
    flags: u32,
    addr: u64,
    len: u32,
    reserved: u32,
    data: u64,
}

/// `struct bao_irqfd`: 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IrqfdArg {
    fd: i32,
    flags: u32,
}

/// `struct bao_dm_info`, its implicit padding after `id` named: 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DmInfo {
    id: u32,
    padding: u32,
    shmem_addr: u64,
    shmem_size: u64,
    irq: u32,
    fd: i32,
}

// SAFETY: repr(C), integer fields only, no implicit padding (checked below): any bit pattern is
// a valid value.
unsafe impl FromBytes for VirtioRequest {}
// SAFETY: as above; every byte is initialised.
unsafe impl AsBytes for VirtioRequest {}
// SAFETY: as above.
unsafe impl FromBytes for IoeventfdArg {}
// SAFETY: as above.
unsafe impl FromBytes for IrqfdArg {}
// SAFETY: as above (`padding` is a named field).
unsafe impl FromBytes for DmInfo {}
// SAFETY: as above.
unsafe impl AsBytes for DmInfo {}

const BAO_IOCTL_TYPE: u32 = 0xA6;
const BAO_IOCTL_DM_GET_INFO: u32 = _IOWR::<DmInfo>(BAO_IOCTL_TYPE, 0x01);
const BAO_IOCTL_IO_CLIENT_ATTACH: u32 = _IOWR::<VirtioRequest>(BAO_IOCTL_TYPE, 0x02);
const BAO_IOCTL_IO_REQUEST_COMPLETE: u32 = _IOW::<VirtioRequest>(BAO_IOCTL_TYPE, 0x03);
const BAO_IOCTL_IOEVENTFD: u32 = _IOW::<IoeventfdArg>(BAO_IOCTL_TYPE, 0x04);
const BAO_IOCTL_IRQFD: u32 = _IOW::<IrqfdArg>(BAO_IOCTL_TYPE, 0x05);

// The same layout and numbers as remio-abi (crates/abi/src/uapi.rs), which pins them to the
// spec's table; crates/remio checks that these lines name remio-abi's values.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<VirtioRequest>() == 48);
    assert!(offset_of!(VirtioRequest, request_id) == 40);
    assert!(size_of::<IoeventfdArg>() == 32);
    assert!(offset_of!(IoeventfdArg, len) == 16);
    assert!(offset_of!(IoeventfdArg, data) == 24);
    assert!(size_of::<IrqfdArg>() == 8);
    assert!(size_of::<DmInfo>() == 32);
    assert!(offset_of!(DmInfo, shmem_addr) == 8);
    assert!(offset_of!(DmInfo, irq) == 24);
    assert!(offset_of!(DmInfo, fd) == 28);
    assert!(BAO_IOCTL_DM_GET_INFO == 0xC020_A601);
    assert!(BAO_IOCTL_IO_CLIENT_ATTACH == 0xC030_A602);
    assert!(BAO_IOCTL_IO_REQUEST_COMPLETE == 0x4030_A603);
    assert!(BAO_IOCTL_IOEVENTFD == 0x4020_A604);
    assert!(BAO_IOCTL_IRQFD == 0x4008_A605);
};

// ---------------------------------------------------------------------------------------------
// C functions the 7.3 kernel crate has no abstraction for. Each is exported by the packaged
// kernel (Module.symvers; modpost checks every one) with the prototype given here.

/// `EPOLLIN` (include/uapi/linux/eventpoll.h).
const EPOLLIN: u32 = 0x0001;

mod ffi {
    use kernel::ffi::{c_char, c_int, c_uint, c_ulong, c_void};
    use kernel::bindings;

    #[expect(
        improper_ctypes,
        reason = "bindgen gives lock_class_key (inside file, vm_area_struct) no fields; only \
                  pointers to those structs cross, as in the kernel crate's own bindings"
    )]
    unsafe extern "C" {
        /// The glue's mapping of the hypercall window (guest/backend/glue/remio_backend.c);
        /// NULL while the proxy is unbound.
        pub(crate) static remio_hc_base: *mut u8;
        /// The window's number of register banks (0 while unbound).
        pub(crate) static remio_hc_banks: c_uint;

        /// fs/eventfd.c: a reference to the eventfd context of `fd`, or an ERR_PTR.
        pub(crate) fn eventfd_ctx_fdget(fd: c_int) -> *mut bindings::eventfd_ctx;
        /// fs/eventfd.c: a reference to the eventfd context of `file`, or an ERR_PTR.
        pub(crate) fn eventfd_ctx_fileget(file: *mut bindings::file) -> *mut bindings::eventfd_ctx;
        /// fs/eventfd.c: drops a reference taken by the two above.
        pub(crate) fn eventfd_ctx_put(ctx: *mut bindings::eventfd_ctx);
        /// fs/eventfd.c: adds 1 to the counter and wakes the readers (`eventfd_signal()` is
        /// this with mask 0, a static inline).
        pub(crate) fn eventfd_signal_mask(ctx: *mut bindings::eventfd_ctx, mask: c_uint);
        /// fs/eventfd.c: reads and resets the counter; the caller holds the context's wait
        /// queue lock (as a wait-queue callback does).
        pub(crate) fn eventfd_ctx_do_read(ctx: *mut bindings::eventfd_ctx, cnt: *mut u64);
        /// fs/file.c: a reference to the file of `fd` in the current task, or NULL.
        pub(crate) fn fget(fd: c_uint) -> *mut bindings::file;
        /// fs/file_table.c: drops a reference to a file.
        pub(crate) fn fput(file: *mut bindings::file);
        /// kernel/sched/wait.c.
        pub(crate) fn add_wait_queue(
            wq_head: *mut bindings::wait_queue_head,
            wq_entry: *mut bindings::wait_queue_entry,
        );
        /// kernel/sched/wait.c.
        pub(crate) fn remove_wait_queue(
            wq_head: *mut bindings::wait_queue_head,
            wq_entry: *mut bindings::wait_queue_entry,
        );
        /// fs/anon_inodes.c: a new anonymous-inode file with `fops` and `private_data = priv_`
        /// (one reference), or an ERR_PTR.
        pub(crate) fn anon_inode_getfile(
            name: *const c_char,
            fops: *const bindings::file_operations,
            priv_: *mut c_void,
            flags: c_int,
        ) -> *mut bindings::file;
        /// mm/memory.c: maps `size` bytes of page frames from `pfn` at `addr` of `vma`.
        pub(crate) fn remap_pfn_range(
            vma: *mut bindings::vm_area_struct,
            addr: c_ulong,
            pfn: c_ulong,
            size: c_ulong,
            prot: bindings::pgprot_t,
        ) -> c_int;
    }
}

/// `IS_ERR()`: the last page of the address space holds the error pointers.
fn err_ptr<T>(p: *mut T) -> Option<Error> {
    let v = p as isize;
    (-4095..0)
        .contains(&v)
        .then(|| Error::from_errno(v as i32))
}

// ---------------------------------------------------------------------------------------------
// The hypercall (spec/remote-io.md, "The hypercall"; guest/backend/remio-hc.h).

const HC_MAGIC: usize = 0x000;
const HC_BANK_BASE: usize = 0x100;
const HC_BANK_STRIDE: usize = 0x40;
const HC_B_DM_ID: usize = 0x00;
const HC_B_ADDR: usize = 0x08;
const HC_B_OP: usize = 0x10;
const HC_B_VALUE: usize = 0x18;
const HC_B_REQUEST_ID: usize = 0x20;
const HC_B_ACCESS_WIDTH: usize = 0x28;
const HC_B_HAS_PENDING: usize = 0x30;
const HC_B_CALL: usize = 0x38;
/// "REMIOHC1" little endian.
const HC_MAGIC_VALUE: u64 = 0x3143_484f_494d_4552;

/// What a hypercall returned.
struct HcOut {
    /// Bao's status: 0 success, +1 an ASK with nothing pending, negative errors.
    status: i64,
    /// The outputs (addr, op, value, access_width, request_id).
    req: VirtioRequest,
    /// HAS_PENDING after an ASK's pop: more requests wait (a flag, not a count).
    has_pending: bool,
}

/// Issues the Remote I/O hypercall with `input`'s dm_id, addr, op, value and request_id through
/// this CPU's bank of the window, with local interrupts disabled so that no other context of this
/// CPU uses the bank meanwhile. Callable from any context (the window's accesses do not sleep).
fn hypercall(input: &VirtioRequest) -> HcOut {
    let failed = HcOut {
        status: -1,
        req: *input,
        has_pending: false,
    };
    let _irqs_off = local_interrupt_disable();
    // SAFETY: plain loads of two exported variables that the glue writes with WRITE_ONCE while
    // the window is (un)bound; a stale value is checked below like a current one.
    let (base, banks) = unsafe {
        (
            ptr::read_volatile(&raw const ffi::remio_hc_base),
            ptr::read_volatile(&raw const ffi::remio_hc_banks),
        )
    };
    let cpu = CpuId::current().as_u32();
    if base.is_null() || cpu >= banks {
        warn_rl!("no hypercall window bank for CPU {cpu} ({banks} banks)\n");
        return failed;
    }
    let bank = HC_BANK_BASE + cpu as usize * HC_BANK_STRIDE;
    // SAFETY: `base` maps the window's 4 KiB BAR (the glue checked its size, and banks <= 16 so
    // every bank offset + 0x40 <= 0x500 < 0x1000); each access is an aligned 8-byte MMIO access,
    // the only kind the window accepts. Interrupts are off, so this CPU's bank is ours.
    unsafe {
        let reg = |off: usize| base.add(bank + off).cast::<u64>();
        ptr::write_volatile(reg(HC_B_DM_ID), input.dm_id);
        ptr::write_volatile(reg(HC_B_ADDR), input.addr);
        ptr::write_volatile(reg(HC_B_OP), input.op);
        ptr::write_volatile(reg(HC_B_VALUE), input.value);
        ptr::write_volatile(reg(HC_B_REQUEST_ID), input.request_id);
        ptr::write_volatile(reg(HC_B_CALL), 1);
        let status = ptr::read_volatile(reg(HC_B_CALL)) as i64;
        let req = VirtioRequest {
            dm_id: input.dm_id,
            addr: ptr::read_volatile(reg(HC_B_ADDR)),
            op: ptr::read_volatile(reg(HC_B_OP)),
            value: ptr::read_volatile(reg(HC_B_VALUE)),
            access_width: ptr::read_volatile(reg(HC_B_ACCESS_WIDTH)),
            request_id: ptr::read_volatile(reg(HC_B_REQUEST_ID)),
        };
        let has_pending = ptr::read_volatile(reg(HC_B_HAS_PENDING)) != 0;
        HcOut {
            status,
            req,
            has_pending,
        }
    }
}

/// Whether the window is there and speaks our version (checked at probe).
fn window_ok() -> bool {
    // SAFETY: as in `hypercall`.
    let base = unsafe { ptr::read_volatile(&raw const ffi::remio_hc_base) };
    if base.is_null() {
        return false;
    }
    // SAFETY: `base` maps the 4 KiB window; MAGIC is an aligned 8-byte register.
    let magic = unsafe { ptr::read_volatile(base.add(HC_MAGIC).cast::<u64>()) };
    magic == HC_MAGIC_VALUE
}

// ---------------------------------------------------------------------------------------------
// eventfds.

/// A counted reference to an eventfd context.
struct EventFdCtx(NonNull<bindings::eventfd_ctx>);

// SAFETY: an eventfd context is reference counted and internally locked; signalling and putting
// it are allowed from any thread.
unsafe impl Send for EventFdCtx {}
// SAFETY: as above.
unsafe impl Sync for EventFdCtx {}

impl EventFdCtx {
    /// The eventfd of `fd` in the calling task.
    fn from_fd(fd: u32) -> Result<Self> {
        let fd = c_int::try_from(fd).map_err(|_| EBADF)?;
        // SAFETY: eventfd_ctx_fdget accepts any fd number and returns a reference or an ERR_PTR.
        let p = unsafe { ffi::eventfd_ctx_fdget(fd) };
        if let Some(e) = err_ptr(p) {
            return Err(e);
        }
        NonNull::new(p).map(Self).ok_or(EBADF)
    }

    fn signal(&self) {
        // SAFETY: we hold a reference to the context.
        unsafe { ffi::eventfd_signal_mask(self.0.as_ptr(), 0) };
    }
}

impl Drop for EventFdCtx {
    fn drop(&mut self) {
        // SAFETY: we own one reference, given back here once.
        unsafe { ffi::eventfd_ctx_put(self.0.as_ptr()) };
    }
}

/// One ioeventfd: writes of `len` bytes (0: any width) at `addr`, optionally with `value ==
/// data`, signal `ctx` and are completed without reaching the control client.
struct Ioeventfd {
    addr: u64,
    len: u32,
    datamatch: Option<u64>,
    ctx: EventFdCtx,
    /// The session (DM fd) that assigned it: its [`Session`].
    owner: Session,
}

/// A session: the address of the DM fd's `struct file`, unique while the file is open (and
/// everything a session owns is released in its `release`, before the address can be reused).
/// 0 owns nothing.
type Session = usize;

/// A request ATTACH handed out, and the session it went to.
struct Taken {
    req: VirtioRequest,
    owner: Session,
}

impl Ioeventfd {
    fn matches(&self, req: &VirtioRequest) -> bool {
        req.op == BAO_IO_WRITE
            && req.addr == self.addr
            && (self.len == 0 || u64::from(self.len) == req.access_width)
            && self.datamatch.is_none_or(|d| d == req.value)
    }

    fn same_registration(&self, addr: u64, len: u32, datamatch: Option<u64>) -> bool {
        self.addr == addr && self.len == len && self.datamatch == datamatch
    }
}

/// An irqfd: a wait-queue entry on the eventfd's wait queue whose callback issues NOTIFY.
/// `wait` is the first field, so the callback finds the struct from the entry's address.
#[repr(C)]
struct IrqFd {
    wait: bindings::wait_queue_entry,
    pt: bindings::poll_table_struct,
    /// The eventfd's wait queue, set by `irqfd_queue_proc` during registration.
    wqh: *mut bindings::wait_queue_head,
    file: *mut bindings::file,
    ctx: *mut bindings::eventfd_ctx,
    dm_id: u64,
}

// SAFETY: the raw pointers are counted references (file, ctx) or the eventfd's wait queue,
// which lives as long as the file reference; all are usable from any thread.
unsafe impl Send for IrqFd {}
// SAFETY: shared access only reads the fields.
unsafe impl Sync for IrqFd {}

/// `poll_queue_proc`, called by the eventfd's poll during [`IrqFd::register`]: adds our entry.
unsafe extern "C" fn irqfd_queue_proc(
    _file: *mut bindings::file,
    wqh: *mut bindings::wait_queue_head,
    pt: *mut bindings::poll_table_struct,
) {
    // SAFETY: `pt` is the `pt` field of a live, pinned IrqFd (register passes only that one).
    unsafe {
        let irqfd = pt
            .byte_sub(core::mem::offset_of!(IrqFd, pt))
            .cast::<IrqFd>();
        (*irqfd).wqh = wqh;
        ffi::add_wait_queue(wqh, &raw mut (*irqfd).wait);
    }
}

/// `wait_queue_func_t`: the eventfd was signalled (EPOLLIN in `key`): clear its counter and
/// inject the frontend interrupt. Runs with the wait queue's lock held, interrupts off.
unsafe extern "C" fn irqfd_wakeup(
    wait: *mut bindings::wait_queue_entry,
    _mode: c_uint,
    _sync: c_int,
    key: *mut c_void,
) -> c_int {
    let events = key as usize as u32;
    if events & EPOLLIN != 0 {
        // SAFETY: `wait` is the first field of a live IrqFd (repr(C)): it is on the queue only
        // between register and drop, and drop removes it under the queue's lock.
        let irqfd = unsafe { &*wait.cast::<IrqFd>() };
        let mut cnt = 0u64;
        // SAFETY: the queue's lock is held (we are its wake callback); ctx is referenced.
        unsafe { ffi::eventfd_ctx_do_read(irqfd.ctx, &mut cnt) };
        let out = hypercall(&VirtioRequest {
            dm_id: irqfd.dm_id,
            op: BAO_IO_NOTIFY,
            ..Default::default()
        });
        if out.status != 0 {
            warn_rl!("DM {}: NOTIFY failed: {}\n", irqfd.dm_id, out.status);
        }
    }
    0
}

impl IrqFd {
    /// Registers an irqfd for eventfd `fd` of the calling task on DM `dm_id`.
    fn register(fd: i32, dm_id: u64) -> Result<Pin<KBox<Self>>> {
        let fd = c_uint::try_from(fd).map_err(|_| EBADF)?;
        // SAFETY: fget accepts any number; NULL means no such file.
        let file = unsafe { ffi::fget(fd) };
        if file.is_null() {
            return Err(EBADF);
        }
        // SAFETY: `file` is a referenced file.
        let ctx = unsafe { ffi::eventfd_ctx_fileget(file) };
        if let Some(e) = err_ptr(ctx) {
            // SAFETY: the reference fget gave us.
            unsafe { ffi::fput(file) };
            return Err(e);
        }
        let irqfd = KBox::new(
            IrqFd {
                // SAFETY: all-zero is a valid wait_queue_entry and poll_table (null pointers,
                // no callbacks); both are filled in below before use.
                wait: unsafe { core::mem::zeroed() },
                // SAFETY: as above.
                pt: unsafe { core::mem::zeroed() },
                wqh: ptr::null_mut(),
                file,
                ctx,
                dm_id,
            },
            GFP_KERNEL,
        );
        let mut irqfd = match irqfd {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: the references taken above, given back once.
                unsafe {
                    ffi::eventfd_ctx_put(ctx);
                    ffi::fput(file);
                }
                return Err(e.into());
            }
        };
        irqfd.wait.func = Some(irqfd_wakeup);
        irqfd.pt._qproc = Some(irqfd_queue_proc);
        irqfd.pt._key = !0;
        // SAFETY: vfs_poll(): `file` is an eventfd (eventfd_ctx_fileget succeeded), whose f_op
        // has poll; it calls irqfd_queue_proc with our `pt`, which adds `wait` to its queue.
        // The box is not moved afterwards (it is pinned below and only dropped by Drop).
        let events = unsafe {
            let poll = (*(*file).f_op).poll;
            match poll {
                Some(p) => p(file, &raw mut irqfd.pt),
                None => 0,
            }
        };
        if irqfd.wqh.is_null() {
            // Not queued: Drop must not remove it.
            drop(irqfd);
            return Err(EINVAL);
        }
        if events & EPOLLIN != 0 {
            // Signalled before we listened: notify now, as KVM's irqfd does.
            let _ = hypercall(&VirtioRequest {
                dm_id,
                op: BAO_IO_NOTIFY,
                ..Default::default()
            });
        }
        Ok(KBox::into_pin(irqfd))
    }
}

impl Drop for IrqFd {
    fn drop(&mut self) {
        // SAFETY: `wait` is on `wqh` when wqh is set (queue_proc set both); removing it takes the
        // queue's lock, so no wake callback runs on it afterwards. Then the two references taken
        // in register are given back once.
        unsafe {
            if !self.wqh.is_null() {
                ffi::remove_wait_queue(self.wqh, &raw mut self.wait);
            }
            ffi::eventfd_ctx_put(self.ctx);
            ffi::fput(self.file);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DMs.

/// What a DM's lock protects.
struct DmState {
    /// False once the platform device is unbound: sessions then get ENODEV.
    alive: bool,
    /// Requests for the control client, oldest first (capacity reserved at probe).
    pending: KVec<VirtioRequest>,
    /// Requests ATTACH handed out and COMPLETE has not seen yet, with the session each went to
    /// (capacity reserved at probe).
    taken: KVec<Taken>,
    ioeventfds: KVec<Ioeventfd>,
    /// The irqfd and the session that assigned it.
    irqfd: Option<(Pin<KBox<IrqFd>>, Session)>,
    /// Open DM fds.
    sessions: u32,
}

/// One device model: a Remote I/O device of this backend.
#[pin_data]
struct Dm {
    id: u32,
    shmem_addr: u64,
    shmem_size: u64,
    irq: u32,
    #[pin]
    state: Mutex<DmState>,
    /// Signalled when `pending` grows or the DM dies.
    #[pin]
    wait: CondVar,
}

impl Dm {
    /// The ASK loop: fetches every pending request of this DM and routes it. Runs in the DM's
    /// interrupt thread. It stops when an ASK says nothing more is pending (HAS_PENDING 0),
    /// which saves the ASK that would find the FIFO empty: a request queued after that ASK
    /// raises the DM's interrupt again, and the interrupt thread runs again.
    fn dispatch(&self) {
        let mut more = true;
        while more {
            let out = hypercall(&VirtioRequest {
                dm_id: u64::from(self.id),
                op: BAO_IO_ASK,
                ..Default::default()
            });
            if out.status != 0 {
                // +1: the FIFO is empty (or a failure, logged by `hypercall`).
                return;
            }
            let req = out.req;
            more = out.has_pending;
            let mut st = self.state.lock();
            if let Some(e) = st.ioeventfds.iter().find(|e| e.matches(&req)) {
                e.ctx.signal();
                drop(st);
                self.complete_now(&req);
                continue;
            }
            if st.pending.len() + st.taken.len() >= BAO_IO_REQUEST_MAX
                || st.pending.push_within_capacity(req).is_err()
            {
                drop(st);
                warn_rl!("DM {}: request queue full, answering 0\n", self.id);
                self.complete_now(&VirtioRequest { value: 0, ..req });
                continue;
            }
            drop(st);
            self.wait.notify_all();
        }
    }

    /// Completes `req` with its own value, from the dispatcher (ioeventfd, full queue).
    fn complete_now(&self, req: &VirtioRequest) {
        let out = hypercall(req);
        if out.status != 0 {
            warn_rl!(
                "DM {}: completing request {} failed: {}\n",
                self.id,
                req.request_id,
                out.status
            );
        }
    }

    /// IO_CLIENT_ATTACH: the oldest pending request, waiting for one.
    fn attach(&self, owner: Session) -> Result<VirtioRequest> {
        let mut st = self.state.lock();
        loop {
            if !st.alive {
                return Err(ENODEV);
            }
            if !st.pending.is_empty() {
                let req = st.pending.remove(0)?;
                // Cannot fail: pending + taken <= BAO_IO_REQUEST_MAX = taken's capacity.
                if st.taken.push_within_capacity(Taken { req, owner }).is_err() {
                    return Err(ENOSPC);
                }
                return Ok(req);
            }
            if self.wait.wait_interruptible(&mut st) {
                // The syscall is restarted after the handler (or fails with EINTR).
                return Err(ERESTARTSYS);
            }
        }
    }

    /// ATTACH's copy-out failed: the request goes back to the head of the queue.
    fn untake(&self, req: &VirtioRequest) {
        let mut st = self.state.lock();
        if let Some(i) = st
            .taken
            .iter()
            .position(|t| t.req.request_id == req.request_id)
        {
            let r = st.taken.remove(i).map_or(*req, |t| t.req);
            if st.pending.insert_within_capacity(0, r).is_err() {
                warn_rl!("DM {}: cannot requeue request {}\n", self.id, r.request_id);
            }
        }
        drop(st);
        self.wait.notify_all();
    }

    /// IO_REQUEST_COMPLETE: `req` must be a request ATTACH handed out, with its op.
    fn complete(&self, req: &VirtioRequest) -> Result {
        if req.dm_id != u64::from(self.id) || (req.op != BAO_IO_READ && req.op != BAO_IO_WRITE) {
            return Err(EINVAL);
        }
        {
            let mut st = self.state.lock();
            let i = st
                .taken
                .iter()
                .position(|t| t.req.request_id == req.request_id && t.req.op == req.op)
                .ok_or(EINVAL)?;
            st.taken.remove(i)?;
        }
        let out = hypercall(req);
        if out.status != 0 {
            // The hypervisor refused it (e.g. the access timed out there): the request is gone.
            return Err(EINVAL);
        }
        Ok(())
    }

    fn ioeventfd(&self, arg: &IoeventfdArg, owner: Session) -> Result {
        let known = BAO_IOEVENTFD_FLAG_DATAMATCH | BAO_IOEVENTFD_FLAG_DEASSIGN;
        if arg.flags & !known != 0 || arg.reserved != 0 || ![0, 1, 2, 4, 8].contains(&arg.len) {
            return Err(EINVAL);
        }
        arg.addr
            .checked_add(u64::from(arg.len))
            .ok_or(EINVAL)?;
        let datamatch = (arg.flags & BAO_IOEVENTFD_FLAG_DATAMATCH != 0).then_some(arg.data);
        let ctx = EventFdCtx::from_fd(arg.fd)?;
        let mut st = self.state.lock();
        let at = st
            .ioeventfds
            .iter()
            .position(|e| e.same_registration(arg.addr, arg.len, datamatch));
        if arg.flags & BAO_IOEVENTFD_FLAG_DEASSIGN != 0 {
            // Deassign only (the posted driver then assigns again).
            let i = at
                .filter(|&i| st.ioeventfds[i].ctx.0 == ctx.0)
                .ok_or(ENOENT)?;
            let old = st.ioeventfds.remove(i)?;
            drop(st);
            drop(old);
            return Ok(());
        }
        if at.is_some() {
            return Err(EEXIST);
        }
        if st.ioeventfds.len() >= MAX_IOEVENTFDS {
            return Err(ENOSPC);
        }
        st.ioeventfds.push(
            Ioeventfd {
                addr: arg.addr,
                len: arg.len,
                datamatch,
                ctx,
                owner,
            },
            GFP_KERNEL,
        )?;
        Ok(())
    }

    fn irqfd(&self, arg: &IrqfdArg, owner: Session) -> Result {
        if arg.flags & !BAO_IRQFD_FLAG_DEASSIGN != 0 {
            return Err(EINVAL);
        }
        if arg.flags & BAO_IRQFD_FLAG_DEASSIGN != 0 {
            let ctx = EventFdCtx::from_fd(u32::try_from(arg.fd).map_err(|_| EBADF)?)?;
            let mut st = self.state.lock();
            match &st.irqfd {
                Some((i, _)) if i.ctx == ctx.0.as_ptr() => {
                    let old = st.irqfd.take();
                    drop(st);
                    drop(old);
                    Ok(())
                }
                _ => Err(ENOENT),
            }
        } else {
            if self.state.lock().irqfd.is_some() {
                return Err(EBUSY);
            }
            let irqfd = IrqFd::register(arg.fd, u64::from(self.id))?;
            let mut st = self.state.lock();
            if st.irqfd.is_some() {
                drop(st);
                drop(irqfd);
                return Err(EBUSY);
            }
            st.irqfd = Some((irqfd, owner));
            Ok(())
        }
    }

    /// DM fd `owner` was closed (0: a session that never got a file). What it owned goes with
    /// it: the requests it had taken go back to the head of the queue, in their order (another
    /// session, or the next, gets them), and the ioeventfds and the irqfd it assigned are
    /// dropped, while other sessions of the DM keep theirs. The DM itself stays.
    fn session_closed(&self, owner: Session) {
        let mut ioeventfds = KVec::new();
        let irqfd;
        {
            let mut st = self.state.lock();
            st.sessions = st.sessions.saturating_sub(1);
            let last = st.sessions == 0;
            let mut i = st.taken.len();
            while i > 0 {
                i -= 1;
                if !last && st.taken[i].owner != owner {
                    continue;
                }
                if let Ok(t) = st.taken.remove(i) {
                    if st.pending.insert_within_capacity(0, t.req).is_err() {
                        warn_rl!("DM {}: cannot requeue request {}\n", self.id, t.req.request_id);
                    }
                }
            }
            if last {
                ioeventfds = core::mem::replace(&mut st.ioeventfds, KVec::new());
            } else {
                let mut i = st.ioeventfds.len();
                while i > 0 {
                    i -= 1;
                    if st.ioeventfds[i].owner == owner {
                        if let Ok(e) = st.ioeventfds.remove(i) {
                            // Dropped below, outside the lock; should the list get no memory,
                            // push drops it here (eventfd_ctx_put does not sleep).
                            let _ = ioeventfds.push(e, GFP_KERNEL);
                        }
                    }
                }
            }
            irqfd = if last || st.irqfd.as_ref().is_some_and(|(_, o)| *o == owner) {
                st.irqfd.take()
            } else {
                None
            };
        }
        self.wait.notify_all();
        drop(ioeventfds);
        drop(irqfd);
    }
}

// Every DM of the bound platform device, by id. Written at probe and unbind.
kernel::sync::global_lock! {
    // SAFETY: initialised in the module initialiser before the driver or the device exists.
    unsafe(uninit) static DMS: Mutex<KVec<Arc<Dm>>> = KVec::new();
}

fn find_dm(id: u32) -> Option<Arc<Dm>> {
    DMS.lock().iter().find(|d| d.id == id).cloned()
}

// ---------------------------------------------------------------------------------------------
// The DM fd (anonymous inode; private_data = a counted Arc<Dm>).

struct DmFops;

impl DmFops {
    const VTABLE: bindings::file_operations = bindings::file_operations {
        owner: kernel::module::this_module::<RemioDispatcher>().as_ptr(),
        unlocked_ioctl: Some(dm_ioctl),
        compat_ioctl: Some(dm_ioctl),
        mmap: Some(dm_mmap),
        release: Some(dm_release),
        ..pin_init::zeroed()
    };
}

/// The DM of a DM fd.
///
/// # Safety
///
/// `file` is a live DM fd file (its private_data holds an Arc<Dm> reference until release).
unsafe fn dm_of<'a>(file: *mut bindings::file) -> kernel::sync::ArcBorrow<'a, Dm> {
    // SAFETY: per the contract, private_data came from Arc::into_foreign and release has not run.
    unsafe { <Arc<Dm> as ForeignOwnable>::borrow((*file).private_data) }
}

unsafe extern "C" fn dm_ioctl(file: *mut bindings::file, cmd: c_uint, arg: c_ulong) -> c_long {
    // SAFETY: the VFS calls ioctl only on an open file of ours.
    let dm = unsafe { dm_of(file) };
    match dm_ioctl_inner(&dm, file as Session, cmd, arg as usize) {
        Ok(()) => 0,
        Err(e) => e.to_errno() as c_long,
    }
}

fn dm_ioctl_inner(dm: &Dm, owner: Session, cmd: u32, arg: usize) -> Result {
    let user = UserSlice::new(UserPtr::from_addr(arg), _IOC_SIZE(cmd));
    match cmd {
        BAO_IOCTL_IO_CLIENT_ATTACH => {
            let (_reader, mut writer) = user.reader_writer();
            let req = dm.attach(owner)?;
            if let Err(e) = writer.write(&req) {
                dm.untake(&req);
                return Err(e);
            }
            Ok(())
        }
        BAO_IOCTL_IO_REQUEST_COMPLETE => dm.complete(&user.reader().read::<VirtioRequest>()?),
        BAO_IOCTL_IOEVENTFD => dm.ioeventfd(&user.reader().read::<IoeventfdArg>()?, owner),
        BAO_IOCTL_IRQFD => dm.irqfd(&user.reader().read::<IrqfdArg>()?, owner),
        _ => Err(ENOTTY),
    }
}

unsafe extern "C" fn dm_mmap(file: *mut bindings::file, vma: *mut bindings::vm_area_struct) -> c_int {
    // SAFETY: the VFS calls mmap only on an open file of ours.
    let dm = unsafe { dm_of(file) };
    // SAFETY: mmap's vma is being set up and is ours for the call.
    let v = unsafe { kernel::mm::virt::VmaNew::from_raw(vma) };
    let len = v.end().saturating_sub(v.start()) as u64;
    // SAFETY: `vma` is valid for the call (above).
    let (pgoff, prot) = unsafe { ((*vma).vm_pgoff, (*vma).vm_page_prot) };
    if pgoff != 0 || len == 0 || len > dm.shmem_size {
        return EINVAL.to_errno();
    }
    // SAFETY: `vma` is valid and being set up; the range [start, start+len) is the vma's own;
    // the frames are the DM's shared memory (the ivshmem BAR the glue described), no RAM of
    // this kernel.
    unsafe {
        ffi::remap_pfn_range(
            vma,
            v.start() as c_ulong,
            (dm.shmem_addr >> bindings::PAGE_SHIFT) as c_ulong,
            len as c_ulong,
            prot,
        )
    }
}

unsafe extern "C" fn dm_release(_inode: *mut bindings::inode, file: *mut bindings::file) -> c_int {
    // SAFETY: release runs once per file, after every other call: the reference is ours.
    let dm = unsafe { <Arc<Dm> as ForeignOwnable>::from_foreign((*file).private_data) };
    dm.session_closed(file as Session);
    0
}

// ---------------------------------------------------------------------------------------------
// /dev/bao-io-dispatcher.

struct Control;

#[vtable]
impl MiscDevice for Control {
    type Ptr = KBox<Self>;

    fn open(_file: &File, _misc: &MiscDeviceRegistration<Self>) -> Result<KBox<Self>> {
        Ok(KBox::new(Control, GFP_KERNEL)?)
    }

    fn ioctl(_me: &Control, _file: &File, cmd: u32, arg: usize) -> Result<isize> {
        if cmd != BAO_IOCTL_DM_GET_INFO {
            return Err(ENOTTY);
        }
        let (mut reader, mut writer) =
            UserSlice::new(UserPtr::from_addr(arg), _IOC_SIZE(cmd)).reader_writer();
        let mut info: DmInfo = reader.read()?;
        if info.id >= BAO_IO_MAX_DMS {
            return Err(EINVAL);
        }
        let dm = find_dm(info.id).ok_or(ENOENT)?;
        let fd = FileDescriptorReservation::get_unused_fd_flags(bindings::O_CLOEXEC)?;
        {
            let mut st = dm.state.lock();
            if !st.alive {
                return Err(ENODEV);
            }
            st.sessions += 1;
        }
        let private = dm.clone().into_foreign();
        // SAFETY: the name is a C string, the fops are static, `private` is a counted Arc that
        // the file's release gives back.
        let filp = unsafe {
            ffi::anon_inode_getfile(
                c_str!("bao-dm").as_char_ptr(),
                &DmFops::VTABLE,
                private,
                bindings::O_RDWR as c_int,
            )
        };
        if let Some(e) = err_ptr(filp) {
            // SAFETY: no file took `private`: it is still ours.
            let dm2 = unsafe { <Arc<Dm> as ForeignOwnable>::from_foreign(private) };
            dm2.session_closed(0);
            return Err(e);
        }
        // SAFETY: anon_inode_getfile returned one reference to a valid file, which ARef now
        // owns (dropping it runs release, which gives `private` back).
        let file: ARef<File> = unsafe { ARef::from_raw(NonNull::new_unchecked(filp.cast())) };
        info.padding = 0;
        info.shmem_addr = dm.shmem_addr;
        info.shmem_size = dm.shmem_size;
        info.irq = dm.irq;
        info.fd = fd.reserved_fd() as i32;
        // The fd becomes visible only once the answer is out: a failed copy leaves nothing.
        writer.write(&info)?;
        fd.fd_install(file);
        Ok(0)
    }
}

// ---------------------------------------------------------------------------------------------
// The platform driver.

/// A DM's interrupt: the threaded handler runs the ASK loop.
struct DmIrq {
    dm: Arc<Dm>,
}

impl ThreadedHandler for DmIrq {
    fn handle_threaded(&self) -> IrqReturn {
        self.dm.dispatch();
        IrqReturn::Handled
    }
}

struct DispatcherDriver;

/// What a bound device holds: each DM's interrupt registration.
struct Bound<'bound> {
    _irqs: KVec<Pin<KBox<ThreadedRegistration<'bound, DmIrq>>>>,
}

impl platform::Driver for DispatcherDriver {
    type IdInfo = ();
    type Data<'bound> = Bound<'bound>;

    fn probe<'bound>(
        pdev: &'bound platform::Device<Core<'_>>,
        _id_info: Option<&'bound ()>,
    ) -> impl PinInit<Self::Data<'bound>, Error> + 'bound {
        probe_dms(pdev)
    }

    fn unbind<'bound>(_dev: &'bound platform::Device<Core<'_>>, _this: Pin<&Self::Data<'bound>>) {
        let dms = core::mem::replace(&mut *DMS.lock(), KVec::new());
        for dm in dms.iter() {
            dm.state.lock().alive = false;
            dm.wait.notify_all();
        }
        pr_info!("unbound: {} DMs gone\n", dms.len());
    }
}

fn probe_dms<'bound>(pdev: &'bound platform::Device<Core<'_>>) -> Result<Bound<'bound>> {
    if !window_ok() {
        pr_err!("no remio hypercall window (remio_backend not bound?)\n");
        return Err(ENODEV);
    }
    let mut dms = KVec::new();
    let mut irqs = KVec::new();
    let mut i = 0u32;
    while let Some(res) = pdev.resource_by_index(i) {
        if i >= BAO_IO_MAX_DMS {
            pr_warn!("more than {BAO_IO_MAX_DMS} DMs: the rest are ignored\n");
            break;
        }
        let irq_request = pdev.irq_by_index(i)?;
        let irq_no = irq_request.irq();
        let mut pending = KVec::with_capacity(BAO_IO_REQUEST_MAX, GFP_KERNEL)?;
        pending.clear();
        let taken = KVec::with_capacity(BAO_IO_REQUEST_MAX, GFP_KERNEL)?;
        let dm = Arc::pin_init(
            pin_init!(Dm {
                id: i,
                shmem_addr: res.start() as u64,
                shmem_size: res.size() as u64,
                irq: irq_no,
                state <- new_mutex!(DmState {
                    alive: true,
                    pending,
                    taken,
                    ioeventfds: KVec::new(),
                    irqfd: None,
                    sessions: 0,
                }),
                wait <- new_condvar!(),
            }),
            GFP_KERNEL,
        )?;
        let handler = DmIrq { dm: dm.clone() };
        // SAFETY: the registration is kept in `Bound` until the device is unbound; it is never
        // forgotten.
        let reg = KBox::pin_init(
            unsafe {
                pdev.request_threaded_irq_by_index(
                    irq::Flags::TRIGGER_NONE,
                    i,
                    c_str!("bao-io-dispatcher"),
                    Ok::<_, Error>(handler),
                )
            },
            GFP_KERNEL,
        )?;
        pr_info!(
            "DM {i}: shmem {:#x} size {:#x} irq {irq_no}\n",
            dm.shmem_addr,
            dm.shmem_size
        );
        dms.push(dm, GFP_KERNEL)?;
        irqs.push(reg, GFP_KERNEL)?;
        i += 1;
    }
    if dms.is_empty() {
        pr_err!("the bao-io-dispatcher device has no DM\n");
        return Err(ENODEV);
    }
    let n = dms.len();
    *DMS.lock() = dms;
    // Requests may have queued before the handlers existed: run each DM's loop once.
    for r in irqs.iter() {
        r.handler().dm.dispatch();
    }
    pr_info!("{n} DMs\n");
    Ok(Bound { _irqs: irqs })
}

// ---------------------------------------------------------------------------------------------
// The module.

module! {
    type: RemioDispatcher,
    name: "remio_dispatcher",
    authors: ["remio"],
    description: "remio: the Bao I/O dispatcher in Rust (the posted driver's UAPI)",
    license: "GPL",
}

#[pin_data]
struct RemioDispatcher {
    #[pin]
    _misc: MiscDeviceRegistration<Control>,
    #[pin]
    _driver: kernel::driver::Registration<platform::Adapter<DispatcherDriver>>,
}

impl kernel::InPlaceModule for RemioDispatcher {
    fn init(module: &'static ThisModule) -> impl PinInit<Self, Error> {
        // SAFETY: called once, before anything uses DMS.
        unsafe { DMS.init() };
        try_pin_init!(Self {
            _misc <- MiscDeviceRegistration::register(MiscDeviceOptions {
                name: c_str!("bao-io-dispatcher"),
            }),
            _driver <- kernel::driver::Registration::new(c_str!("bao-io-dispatcher"), module),
        })
    }
}
