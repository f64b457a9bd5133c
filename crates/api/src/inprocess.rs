//! The device-model API straight onto the dispatcher, in the same process.
//!
//! A session is the DM's control client plus this session's bookkeeping, which enforces the
//! session rules (`design.md`, "Invariants"):
//!
//! - One control session per DM at a time: a second [`DmApi::open`] is `EBUSY` until the first
//!   session is dropped.
//! - A session reaches only its DM. A completion naming another DM (`dm_id`) is `EPERM`; one
//!   naming a request this session did not receive from `attach`, or already completed, is
//!   `ENOENT`; one that does not echo the request (address, op or width changed) is `EINVAL`.
//!   An ioeventfd outside the DM's MMIO window (when the window is known, see
//!   [`InProcessApi::set_mmio_window`]) is `EPERM`.
//! - Dropping the session (a device model that exits, or whose socket connection ends)
//!   destroys the control client, so later requests wait for the next session (they are held
//!   by the DM, bounded by the hypervisor's timeout); deassigns every ioeventfd and irqfd the
//!   session assigned, and drops its status word; and gives every request it received but
//!   did not complete back to the DM ([`Dm::requeue`]), for the next session to serve (the
//!   frontend waits, bounded by the hypervisor's timeout); only a request the DM cannot keep
//!   (being destroyed) is completed, a read with [`ABANDONED_READ_VALUE`] (0).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use remio_dispatcher::{
    ControlClient, Dispatcher, Dm, IoeventfdConfig, StatusPage, StatusWordConfig,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::{
    ApiError, DmApi, DmInfo, DmSession, IoeventfdSpec, Notifier, Result, StatusWord,
    StatusWordSpec, VirtioRequest, WaitHelper,
};

/// What a read returns when the session that received it ended without completing it. 0
/// reads as "nothing" for the virtio-mmio registers a driver polls (InterruptStatus,
/// QueueReady, Status), the same choice as the hypervisor model's timeout.
pub const ABANDONED_READ_VALUE: u64 = 0;

/// How a session installs its [`WaitHelper`] on its device: `hook(dm_id, helper)` installs
/// (`Some`) or removes (`None`) the helper of DM `dm_id`'s device. The platform that built the
/// dispatcher provides it (it knows what serves the DM's backend interrupt: with the
/// hypervisor model, `remio_hyp::BackendVm::set_wait_helper`); it returns whether it did.
pub type WaitHelperHook = Arc<dyn Fn(u32, Option<WaitHelper>) -> bool + Send + Sync>;

/// The device-model API of a [`Dispatcher`] in this process.
pub struct InProcessApi {
    dispatcher: Arc<Dispatcher>,
    /// DM id → frontend MMIO window `(base, size)`, where the platform knows it.
    windows: RwLock<HashMap<u32, (u64, u64)>>,
    /// See [`InProcessApi::set_wait_helper_hook`].
    wait_hook: RwLock<Option<WaitHelperHook>>,
    /// Each DM's state region, kept across sessions ([`DmSession::state_region`]).
    regions: StateRegions,
}

/// DM id → its state region.
type StateRegions = Arc<Mutex<HashMap<u32, Arc<std::fs::File>>>>;

impl std::fmt::Debug for InProcessApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessApi")
            .field("dispatcher", &self.dispatcher)
            .finish_non_exhaustive()
    }
}

impl InProcessApi {
    /// The API of `dispatcher`'s DMs.
    pub fn new(dispatcher: Arc<Dispatcher>) -> Self {
        Self {
            dispatcher,
            windows: RwLock::new(HashMap::new()),
            wait_hook: RwLock::new(None),
            regions: StateRegions::default(),
        }
    }

    /// Lets sessions install a wait helper on their device ([`DmSession::set_wait_helper`])
    /// through `hook`. Without one, `set_wait_helper` is `ENOTTY`. Sessions opened afterwards
    /// use it.
    pub fn set_wait_helper_hook(&self, hook: WaitHelperHook) {
        *self
            .wait_hook
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    /// Declares DM `dm_id`'s frontend MMIO window: ioeventfds outside it are refused (`EPERM`).
    /// Sessions opened afterwards use it.
    pub fn set_mmio_window(&self, dm_id: u32, base: u64, size: u64) {
        self.windows
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dm_id, (base, size));
    }

    /// The dispatcher served.
    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }
}

fn errno_error(errno: i32, e: &dyn std::fmt::Display) -> ApiError {
    ApiError::from_errno(errno, &e.to_string())
}

impl DmApi for InProcessApi {
    fn open(&self, dm_id: u32) -> Result<Box<dyn DmSession>> {
        let dm = self
            .dispatcher
            .dm(dm_id)
            .map_err(|_| ApiError::NoSuchDm(dm_id))?;
        let control = dm.create_control_client().map_err(|e| match e.errno() {
            libc::EBUSY => ApiError::Busy(format!("DM {dm_id} already has a session")),
            errno => errno_error(errno, &e),
        })?;
        let window = self
            .windows
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&dm_id)
            .copied();
        let i = dm.info();
        Ok(Box::new(InProcessSession {
            info: DmInfo {
                id: i.id,
                shmem_addr: i.shmem_addr,
                shmem_size: i.shmem_size,
                irq: i.irq,
            },
            dm,
            control,
            window,
            wait_hook: self
                .wait_hook
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            helper_installed: Mutex::new(false),
            control_ended: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            regions: self.regions.clone(),
        }))
    }
}

/// What a session holds, to enforce its rules and undo it when it ends.
#[derive(Default)]
struct State {
    /// Requests received from `attach` and not completed, by request id.
    outstanding: HashMap<u64, VirtioRequest>,
    ioeventfds: Vec<(IoeventfdSpec, Arc<EventFd>)>,
    irqfds: Vec<Arc<EventFd>>,
    status_word: Option<Arc<StatusPage>>,
}

/// One session on one DM.
pub struct InProcessSession {
    info: DmInfo,
    dm: Arc<Dm>,
    control: Arc<ControlClient>,
    window: Option<(u64, u64)>,
    wait_hook: Option<WaitHelperHook>,
    /// A wait helper of this session is installed. Held while installing or removing one, so
    /// that the session's end (which removes it before the next session can open) and an
    /// install cannot interleave.
    helper_installed: Mutex<bool>,
    /// The control client was destroyed (by `shutdown` or drop): never destroy it twice, as
    /// the DM's next session may own the control client by then.
    control_ended: AtomicBool,
    state: Mutex<State>,
    regions: StateRegions,
}

impl std::fmt::Debug for InProcessSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessSession")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl InProcessSession {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn received(&self, req: VirtioRequest) -> VirtioRequest {
        self.state().outstanding.insert(req.request_id, req);
        req
    }

    /// Destroys this session's control client, once, after releasing what the next session
    /// registers again (status word, ioeventfds, irqfds): its `attach` waiters return
    /// `ShuttingDown` and the requests still queued to it go back to the DM.
    fn end_control(&self) {
        if self.control_ended.swap(true, Ordering::AcqRel) {
            return;
        }
        {
            let mut installed = self
                .helper_installed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if *installed {
                if let Some(hook) = &self.wait_hook {
                    hook(self.info.id, None);
                }
                *installed = false;
            }
        }
        // Before the control client goes: the DM's next session may open as soon as it has,
        // and must find the status word, the ioeventfds and the irqfds free (a device model
        // that comes back registers the same ones; found by `remio soak`, where a re-created
        // session's IOEVENTFD failed with EEXIST while the old session was still being torn
        // down).
        let (page, ioeventfds, irqfds) = {
            let mut st = self.state();
            (
                st.status_word.take(),
                std::mem::take(&mut st.ioeventfds),
                std::mem::take(&mut st.irqfds),
            )
        };
        if let Some(page) = page {
            if let Err(e) = self.dm.unregister_status_word(&page) {
                log::debug!("DM {}: session end: status word: {e}", self.info.id);
            }
        }
        for (spec, fd) in ioeventfds {
            if let Err(e) = self.dm.ioeventfd(Self::config(fd, spec, true)) {
                log::debug!("DM {}: session end: ioeventfd deassign: {e}", self.info.id);
            }
        }
        for fd in irqfds {
            if let Err(e) = self.dm.irqfd_deassign(&fd) {
                log::debug!("DM {}: session end: irqfd deassign: {e}", self.info.id);
            }
        }
        self.control.set_notifier(None);
        if let Err(e) = self.dm.destroy_control_client() {
            log::debug!("DM {}: session end: {e}", self.info.id);
        }
    }

    fn config(fd: Arc<EventFd>, spec: IoeventfdSpec, deassign: bool) -> IoeventfdConfig {
        IoeventfdConfig {
            fd,
            addr: spec.addr,
            len: spec.len,
            datamatch: spec.datamatch,
            deassign,
        }
    }
}

impl DmSession for InProcessSession {
    fn info(&self) -> DmInfo {
        self.info
    }

    fn attach(&self) -> Result<VirtioRequest> {
        let req = self.control.attach().map_err(|_| ApiError::ShuttingDown)?;
        Ok(self.received(req))
    }

    fn try_attach(&self) -> Result<Option<VirtioRequest>> {
        if self.control.is_destroyed() {
            return Err(ApiError::ShuttingDown);
        }
        Ok(self.control.try_attach().map(|r| self.received(r)))
    }

    fn set_notifier(&self, notifier: Option<Notifier>) -> Result<()> {
        self.control.set_notifier(notifier);
        Ok(())
    }

    fn shutdown(&self) -> Result<()> {
        self.end_control();
        Ok(())
    }

    fn set_wait_helper(&self, helper: Option<WaitHelper>) -> Result<()> {
        let Some(hook) = &self.wait_hook else {
            return Err(ApiError::NotSupported(
                "this platform offers no wait helper".into(),
            ));
        };
        let mut installed = self
            .helper_installed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let install = helper.is_some();
        if install && self.control_ended.load(Ordering::Acquire) {
            return Err(ApiError::ShuttingDown);
        }
        if !hook(self.info.id, helper) {
            return Err(ApiError::NotSupported(format!(
                "no wait helper for DM {}",
                self.info.id
            )));
        }
        *installed = install;
        Ok(())
    }

    fn complete(&self, req: &VirtioRequest) -> Result<()> {
        if req.dm_id != u64::from(self.info.id) {
            return Err(ApiError::PermissionDenied(format!(
                "request of DM {} completed on a session of DM {}",
                req.dm_id, self.info.id
            )));
        }
        let orig = {
            let mut st = self.state();
            let orig = *st.outstanding.get(&req.request_id).ok_or_else(|| {
                ApiError::NotFound(format!("request {} is not outstanding", req.request_id))
            })?;
            if orig.op != req.op || orig.addr != req.addr || orig.access_width != req.access_width {
                return Err(ApiError::InvalidArgument(format!(
                    "completion of request {} does not echo it",
                    req.request_id
                )));
            }
            // Claimed: a concurrent completion of the same id now finds nothing.
            st.outstanding.remove(&req.request_id);
            orig
        };
        match self.dm.complete(req) {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::ENOENT => Err(errno_error(libc::ENOENT, &e)),
            Err(e) => {
                // Not completed: keep it so that the session's end completes it.
                self.state().outstanding.insert(orig.request_id, orig);
                Err(errno_error(e.errno(), &e))
            }
        }
    }

    fn assign_ioeventfd(&self, fd: &EventFd, spec: IoeventfdSpec) -> Result<()> {
        if let Some((base, size)) = self.window {
            let end = spec.addr.checked_add(u64::from(spec.len.max(1)));
            let inside = spec.addr >= base && end.is_some_and(|e| e <= base.saturating_add(size));
            if !inside {
                return Err(ApiError::PermissionDenied(format!(
                    "ioeventfd at {:#x} is outside the DM's window",
                    spec.addr
                )));
            }
        }
        let fd = Arc::new(fd.try_clone()?);
        self.dm
            .ioeventfd(Self::config(fd.clone(), spec, false))
            .map_err(|e| errno_error(e.errno(), &e))?;
        self.state().ioeventfds.push((spec, fd));
        Ok(())
    }

    fn deassign_ioeventfd(&self, fd: &EventFd, spec: IoeventfdSpec) -> Result<()> {
        let fd = Arc::new(fd.try_clone()?);
        self.dm
            .ioeventfd(Self::config(fd.clone(), spec, true))
            .map_err(|e| errno_error(e.errno(), &e))?;
        let mut st = self.state();
        if let Some(i) = st
            .ioeventfds
            .iter()
            .position(|(s, f)| *s == spec && remio_dispatcher::same_file(f, &fd))
        {
            st.ioeventfds.swap_remove(i);
        }
        Ok(())
    }

    fn assign_irqfd(&self, fd: &EventFd) -> Result<()> {
        let fd = Arc::new(fd.try_clone()?);
        self.dm
            .irqfd_assign(fd.clone())
            .map_err(|e| errno_error(e.errno(), &e))?;
        self.state().irqfds.push(fd);
        Ok(())
    }

    fn assign_used_buffer_irqfd(&self, fd: &EventFd) -> Result<()> {
        let fd = Arc::new(fd.try_clone()?);
        self.dm
            .irqfd_assign_status_bits(fd.clone(), crate::USED_BUFFER_BIT)
            .map_err(|e| errno_error(e.errno(), &e))?;
        self.state().irqfds.push(fd);
        Ok(())
    }

    fn deassign_irqfd(&self, fd: &EventFd) -> Result<()> {
        self.dm
            .irqfd_deassign(fd)
            .map_err(|e| errno_error(e.errno(), &e))?;
        let mut st = self.state();
        if let Some(i) = st
            .irqfds
            .iter()
            .position(|f| remio_dispatcher::same_file(f, fd))
        {
            st.irqfds.swap_remove(i);
        }
        Ok(())
    }

    fn register_status_word(&self, spec: StatusWordSpec) -> Result<StatusWord> {
        if let Some((base, size)) = self.window {
            let end = base.saturating_add(size);
            for addr in [spec.status_addr, spec.ack_addr] {
                let inside = addr >= base && addr.checked_add(4).is_some_and(|e| e <= end);
                if !inside {
                    return Err(ApiError::PermissionDenied(format!(
                        "status word register at {addr:#x} is outside the DM's window"
                    )));
                }
            }
        }
        let mut st = self.state();
        // Under the state lock: the session's end sets this before it takes the word out of
        // the state, so a word registered here is always unregistered by it.
        if self.control_ended.load(Ordering::Acquire) {
            return Err(ApiError::ShuttingDown);
        }
        if st.status_word.is_some() {
            return Err(ApiError::Exists("this session has a status word".into()));
        }
        let page = self
            .dm
            .register_status_word(StatusWordConfig {
                status_addr: spec.status_addr,
                ack_addr: spec.ack_addr,
            })
            .map_err(|e| errno_error(e.errno(), &e))?;
        st.status_word = Some(page.clone());
        Ok(StatusWord::new(page))
    }

    fn state_region(&self, len: u64) -> Result<std::fs::File> {
        if len == 0 || len > crate::STATE_REGION_MAX {
            return Err(ApiError::InvalidArgument(format!(
                "state region of {len:#x} bytes (1..={:#x})",
                crate::STATE_REGION_MAX
            )));
        }
        let mut regions = self.regions.lock().unwrap_or_else(PoisonError::into_inner);
        let file = match regions.get(&self.info.id) {
            Some(f) => {
                let have = f.metadata()?.len();
                if have < len {
                    return Err(ApiError::Exists(format!(
                        "DM {}'s state region has {have:#x} bytes",
                        self.info.id
                    )));
                }
                f.clone()
            }
            None => {
                let f = Arc::new(sealed_memfd(c"remio-state", len)?);
                regions.insert(self.info.id, f.clone());
                f
            }
        };
        Ok(file.try_clone()?)
    }

    fn map_shmem_at(&self, len: u64, guest_base: u64) -> Result<GuestMemoryMmap> {
        crate::check_shmem_len(len, self.info.shmem_size)?;
        let file = self
            .dm
            .shmem()
            .ok_or_else(|| ApiError::NotSupported("the DM has no shared-memory file".into()))?;
        crate::map_file(file.try_clone()?, 0, len, guest_base)
    }
}

/// A zeroed memfd of `len` bytes that cannot shrink or grow.
fn sealed_memfd(name: &std::ffi::CStr, len: u64) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: `name` is NUL-terminated; memfd_create reads nothing else.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an fd we own; the third argument is an int.
    if unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_ADD_SEALS,
            seals,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

impl Drop for InProcessSession {
    fn drop(&mut self) {
        // New requests now wait (held by the DM) for the next session.
        self.end_control();
        let st = std::mem::take(&mut *self.state());
        for (spec, fd) in st.ioeventfds {
            if let Err(e) = self.dm.ioeventfd(Self::config(fd, spec, true)) {
                log::debug!("DM {}: session end: ioeventfd deassign: {e}", self.info.id);
            }
        }
        for fd in st.irqfds {
            if let Err(e) = self.dm.irqfd_deassign(&fd) {
                log::debug!("DM {}: session end: irqfd deassign: {e}", self.info.id);
            }
        }
        if let Some(page) = st.status_word {
            if let Err(e) = self.dm.unregister_status_word(&page) {
                log::debug!("DM {}: session end: status word: {e}", self.info.id);
            }
        }
        // Requests received and not completed go back to the DM for its next session (a
        // restarted device model executes them again: see `Dm::requeue` for why that is safe
        // for the registers that reach a control session); the frontend keeps waiting, bounded
        // by the access timeout. Only those the DM cannot keep are completed, reads with
        // ABANDONED_READ_VALUE.
        let outstanding = st.outstanding.len();
        if outstanding > 0 {
            let mut reqs: Vec<VirtioRequest> = st.outstanding.into_values().collect();
            reqs.sort_unstable_by_key(|r| r.request_id);
            let kept = self.dm.requeue(reqs);
            log::info!(
                "DM {}: session ended with {outstanding} request(s) outstanding; {kept} kept \
                 for the next session, {} completed",
                self.info.id,
                outstanding - kept
            );
        }
    }
}
