//! The later revision of the driver's API (not posted to the lists; `spec/remote-io.md`):
//! ioctl type 0xA7 on a single `/dev/bao`, DMs described by software through `CREATE_DM`
//! instead of the device tree, a `dm_info` without padding, and a cap on queued requests.
//!
//! The field order of [`DmInfoV2`] and the command numbers below are this project's reading
//! of that revision: the same numbers as the posted API, with `CREATE_DM` taking number 1 on
//! `/dev/bao` in place of `DM_GET_INFO`. They live in their own module so that the posted ABI
//! in [`crate::uapi`] stays exactly as posted.

use crate::ioctl::{iow, iowr};
use crate::uapi::{Ioeventfd, Irqfd, VirtioRequest};

/// The ioctl type byte of the later revision.
pub const BAO_IOCTL_TYPE_V2: u8 = 0xA7;
/// Requests one I/O client may have queued before the dispatcher refuses more.
pub const BAO_IO_CLIENT_QUEUE_MAX: usize = 1024;

/// `struct bao_dm_info` of the later revision: the two `u32`s are paired so no padding exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DmInfoV2 {
    /// The DM id.
    pub id: u32,
    /// The DM's backend interrupt number.
    pub irq: u32,
    /// Guest-physical base of the shared memory.
    pub shmem_addr: u64,
    /// Size of the shared memory in bytes.
    pub shmem_size: u64,
    /// The per-DM file descriptor returned by `CREATE_DM`.
    pub fd: i32,
    /// Reserved, must be 0.
    pub flags: u32,
}

/// `BAO_IOCTL_CREATE_DM` on `/dev/bao`.
pub const BAO_IOCTL_CREATE_DM: u32 = iowr::<DmInfoV2>(BAO_IOCTL_TYPE_V2, 0x01);
/// `BAO_IOCTL_IO_CLIENT_ATTACH` on a DM fd.
pub const BAO_IOCTL_IO_CLIENT_ATTACH_V2: u32 = iowr::<VirtioRequest>(BAO_IOCTL_TYPE_V2, 0x02);
/// `BAO_IOCTL_IO_REQUEST_COMPLETE` on a DM fd.
pub const BAO_IOCTL_IO_REQUEST_COMPLETE_V2: u32 = iow::<VirtioRequest>(BAO_IOCTL_TYPE_V2, 0x03);
/// `BAO_IOCTL_IOEVENTFD` on a DM fd.
pub const BAO_IOCTL_IOEVENTFD_V2: u32 = iow::<Ioeventfd>(BAO_IOCTL_TYPE_V2, 0x04);
/// `BAO_IOCTL_IRQFD` on a DM fd.
pub const BAO_IOCTL_IRQFD_V2: u32 = iow::<Irqfd>(BAO_IOCTL_TYPE_V2, 0x05);

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<DmInfoV2>() == 32);
    assert!(offset_of!(DmInfoV2, id) == 0);
    assert!(offset_of!(DmInfoV2, irq) == 4);
    assert!(offset_of!(DmInfoV2, shmem_addr) == 8);
    assert!(offset_of!(DmInfoV2, shmem_size) == 16);
    assert!(offset_of!(DmInfoV2, fd) == 24);
    assert!(offset_of!(DmInfoV2, flags) == 28);
    // Every field accounted for: no implicit padding anywhere.
    assert!(4 + 4 + 8 + 8 + 4 + 4 == size_of::<DmInfoV2>());
    assert!(BAO_IOCTL_CREATE_DM == 0xC020_A701);
    assert!(BAO_IOCTL_IO_CLIENT_ATTACH_V2 == 0xC030_A702);
    assert!(BAO_IOCTL_IO_REQUEST_COMPLETE_V2 == 0x4030_A703);
    assert!(BAO_IOCTL_IOEVENTFD_V2 == 0x4020_A704);
    assert!(BAO_IOCTL_IRQFD_V2 == 0x4008_A705);
};
