//! The dispatcher: the set of DMs of one backend VM (the driver's `bao_dm_list`).

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use remio_abi::uapi::BAO_IO_MAX_DMS;
use remio_abi::{Hypercall, InterruptController};

use crate::dm::{Dm, DmDescription, DmError};

/// The I/O dispatcher of one backend VM. Talks to the hypervisor only through the two
/// platform traits it is given.
pub struct Dispatcher {
    hc: Arc<dyn Hypercall>,
    intc: Arc<dyn InterruptController>,
    /// Taken only on the control path (create, lookup, destroy), never while dispatching,
    /// and never held while calling into a DM except [`Dm::start`] (which runs no pass).
    dms: RwLock<BTreeMap<u32, Arc<Dm>>>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<u32> = self.read().keys().copied().collect();
        f.debug_struct("Dispatcher").field("dms", &ids).finish()
    }
}

impl Dispatcher {
    /// A dispatcher with no DMs.
    pub fn new(hc: Arc<dyn Hypercall>, intc: Arc<dyn InterruptController>) -> Arc<Self> {
        Arc::new(Self {
            hc,
            intc,
            dms: RwLock::new(BTreeMap::new()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, Arc<Dm>>> {
        self.dms.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u32, Arc<Dm>>> {
        self.dms.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates a DM and installs its own interrupt handler; requests already pending in the
    /// hypervisor are fetched at once (held until a control client exists).
    ///
    /// # Errors
    /// [`DmError::InvalidId`] if `desc.id >= BAO_IO_MAX_DMS`; [`DmError::Exists`] if the id
    /// is in use; [`DmError::Irq`] if the interrupt cannot be requested.
    pub fn create_dm(&self, desc: DmDescription) -> Result<Arc<Dm>, DmError> {
        let id = desc.id;
        if usize::try_from(id).map_or(true, |i| i >= BAO_IO_MAX_DMS) {
            return Err(DmError::InvalidId(id));
        }
        let dm = {
            let mut dms = self.write();
            if dms.contains_key(&id) {
                return Err(DmError::Exists(id));
            }
            let dm = Dm::new(desc, self.hc.clone(), self.intc.clone());
            dm.start()?;
            dms.insert(id, dm.clone());
            dm
        };
        dm.kick();
        Ok(dm)
    }

    /// GET_INFO: the DM with this id, looked up under the lock (the driver walks its list
    /// unlocked).
    ///
    /// # Errors
    /// [`DmError::NoSuchDm`] if there is none (including once its destruction started).
    pub fn dm(&self, id: u32) -> Result<Arc<Dm>, DmError> {
        self.read().get(&id).cloned().ok_or(DmError::NoSuchDm(id))
    }

    /// Destroys the DM with this id, exactly once: it leaves the table first (so GET_INFO no
    /// longer finds it and a concurrent destroy gets `NoSuchDm`), then is torn down (see
    /// [`Dm`]'s destruction guarantees). Handles to it stay valid; their operations report
    /// that the DM is shutting down. Other DMs keep dispatching.
    ///
    /// # Errors
    /// [`DmError::NoSuchDm`] if there is none.
    pub fn destroy_dm(&self, id: u32) -> Result<(), DmError> {
        let dm = self.write().remove(&id).ok_or(DmError::NoSuchDm(id))?;
        dm.destroy();
        Ok(())
    }

    /// Every live DM, by id.
    pub fn dms(&self) -> Vec<Arc<Dm>> {
        self.read().values().cloned().collect()
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        let dms = std::mem::take(&mut *self.write());
        for dm in dms.into_values() {
            dm.destroy();
        }
    }
}
