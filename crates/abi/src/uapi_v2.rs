//! The later revision of the driver's API (public code, not posted to the lists;
//! `spec/remote-io.md`, "Later revisions of the driver"): ioctl type 0xA7 on a single misc
//! device `/dev/bao`, DMs created by the VMM with `CREATE_DM` instead of described by the device
//! tree, a padding-free 24-byte `bao_dm_info` with no fd field (the DM fd is `CREATE_DM`'s
//! return value, and the DM lives exactly as long as that fd), and a cap of 1024 queued
//! requests per I/O client.
//!
//! ATTACH, COMPLETE, IOEVENTFD and IRQFD keep the posted structs ([`VirtioRequest`],
//! [`Ioeventfd`], [`Irqfd`]); only `bao_ioeventfd.fd` became `__s32`, which does not change a
//! byte of the encoding (an fd is never negative when passed). Every number here is computed
//! from the `_IO*` encoding and asserted at compile time.

use crate::ioctl::{iow, iowr};
use crate::uapi::{Ioeventfd, Irqfd, VirtioRequest, WireStruct};

/// The ioctl type byte of the later revision.
pub const BAO_IOCTL_TYPE_V2: u8 = 0xA7;
/// The later revision's single device node.
pub const BAO_DEVICE_PATH_V2: &str = "/dev/bao";
/// Requests one I/O client may have queued before the dispatcher refuses more.
pub const BAO_IO_CLIENT_QUEUE_MAX: usize = 1024;

/// `struct bao_dm_info` of the later revision: `{ __u64 shmem_addr; __u64 shmem_size;
/// __u32 id; __u32 irq; }`, 24 bytes, no padding, no fd.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DmInfoV2 {
    /// Physical base of the DM's shared memory (the driver `remap_pfn_range`s it on mmap).
    pub shmem_addr: u64,
    /// Size of the shared memory in bytes.
    pub shmem_size: u64,
    /// The DM id: the index of the device in the calling backend's Remote I/O device list.
    pub id: u32,
    /// The DM's backend interrupt: a line of the root interrupt controller (GIC SPI, PLIC
    /// source) that the driver maps.
    pub irq: u32,
}

/// `BAO_IOCTL_CREATE_DM = _IOW(0xA7, 0x00, struct bao_dm_info)` on `/dev/bao`: creates the DM
/// and returns its new fd as the ioctl's return value.
pub const BAO_IOCTL_CREATE_DM: u32 = iow::<DmInfoV2>(BAO_IOCTL_TYPE_V2, 0x00);
/// `BAO_IOCTL_DM_GET_INFO = _IOWR(0xA7, 0x01, struct bao_dm_info)` on a DM fd.
pub const BAO_IOCTL_DM_GET_INFO_V2: u32 = iowr::<DmInfoV2>(BAO_IOCTL_TYPE_V2, 0x01);
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
    assert!(size_of::<DmInfoV2>() == 24);
    assert!(offset_of!(DmInfoV2, shmem_addr) == 0);
    assert!(offset_of!(DmInfoV2, shmem_size) == 8);
    assert!(offset_of!(DmInfoV2, id) == 16);
    assert!(offset_of!(DmInfoV2, irq) == 20);
    // Every field accounted for: no implicit padding anywhere.
    assert!(8 + 8 + 4 + 4 == size_of::<DmInfoV2>());
    assert!(BAO_IOCTL_CREATE_DM == 0x4018_A700);
    assert!(BAO_IOCTL_DM_GET_INFO_V2 == 0xC018_A701);
    assert!(BAO_IOCTL_IO_CLIENT_ATTACH_V2 == 0xC030_A702);
    assert!(BAO_IOCTL_IO_REQUEST_COMPLETE_V2 == 0x4030_A703);
    assert!(BAO_IOCTL_IOEVENTFD_V2 == 0x4020_A704);
    assert!(BAO_IOCTL_IRQFD_V2 == 0x4008_A705);
};

// SAFETY: `#[repr(C)]`, integers only, no padding (checked above).
unsafe impl vm_memory::ByteValued for DmInfoV2 {}

impl WireStruct for DmInfoV2 {
    const SIZE: usize = 24;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.shmem_addr.to_le_bytes());
        out.extend_from_slice(&self.shmem_size.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.irq.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != Self::SIZE {
            return None;
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        Some(Self {
            shmem_addr: u64_at(0),
            shmem_size: u64_at(8),
            id: u32_at(16),
            irq: u32_at(20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dm_info_v2_encodes_as_the_c_struct_lays_it_out() {
        let info = DmInfoV2 {
            shmem_addr: 0x0102_0304_0506_0708,
            shmem_size: 0x10_0000,
            id: 3,
            irq: 52,
        };
        let mut buf = Vec::new();
        info.encode(&mut buf);

        assert_eq!(buf.len(), 24);
        assert_eq!(&buf[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&buf[8..16], &0x10_0000u64.to_le_bytes());
        assert_eq!(&buf[16..20], &3u32.to_le_bytes());
        assert_eq!(&buf[20..24], &52u32.to_le_bytes());
        assert_eq!(DmInfoV2::decode(&buf), Some(info));
        assert_eq!(DmInfoV2::decode(&buf[1..]), None);
    }
}
