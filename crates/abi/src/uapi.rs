//! The posted driver's userspace API (`include/uapi/linux/bao.h`, ioctl type 0xA6).
//!
//! Layouts are `#[repr(C)]` with every padding byte named, so that the structs can be handed to
//! `ioctl(2)` as they are and (de)serialised field by field without reading padding. Sizes and
//! offsets are asserted at compile time against the table in `spec/remote-io.md`.

use crate::ioctl::{iow, iowr};

/// Request operation: complete a write (`BAO_IO_WRITE`).
pub const BAO_IO_WRITE: u64 = 0;
/// Request operation: complete a read (`BAO_IO_READ`).
pub const BAO_IO_READ: u64 = 1;
/// Hypercall operation: fetch the oldest pending request (`BAO_IO_ASK`).
pub const BAO_IO_ASK: u64 = 2;
/// Hypercall operation: inject the frontend interrupt (`BAO_IO_NOTIFY`).
pub const BAO_IO_NOTIFY: u64 = 3;

/// Longest I/O client name, NUL included (`BAO_NAME_MAX_LEN`).
pub const BAO_NAME_MAX_LEN: usize = 16;
/// Requests a client may hold at once (`BAO_IO_REQUEST_MAX`).
pub const BAO_IO_REQUEST_MAX: usize = 64;
/// Device models one dispatcher serves (`BAO_IO_MAX_DMS`).
pub const BAO_IO_MAX_DMS: usize = 16;

/// `BAO_IOEVENTFD_FLAG_DATAMATCH`: signal only when the written value equals `data`.
pub const BAO_IOEVENTFD_FLAG_DATAMATCH: u32 = 1 << 1;
/// `BAO_IOEVENTFD_FLAG_DEASSIGN`: remove the matching registration instead of adding one.
pub const BAO_IOEVENTFD_FLAG_DEASSIGN: u32 = 1 << 2;
/// `BAO_IRQFD_FLAG_DEASSIGN`: remove the irqfd instead of adding it.
pub const BAO_IRQFD_FLAG_DEASSIGN: u32 = 1;

/// The ioctl type byte of the posted driver.
pub const BAO_IOCTL_TYPE: u8 = 0xA6;

/// One trapped access, as the hypervisor reports it and as userspace completes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VirtioRequest {
    /// Device model id (index in the backend's Remote I/O device list).
    pub dm_id: u64,
    /// Guest-physical address of the access.
    pub addr: u64,
    /// [`BAO_IO_WRITE`] or [`BAO_IO_READ`] (ASK and NOTIFY only appear in hypercalls).
    pub op: u64,
    /// For a write: the full register value written. For a read completion: the value read.
    pub value: u64,
    /// Access width in bytes: 1, 2, 4 or 8.
    pub access_width: u64,
    /// The hypervisor's request slot index.
    pub request_id: u64,
}

/// `struct bao_ioeventfd`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ioeventfd {
    /// The eventfd to signal (unsigned in the posted header).
    pub fd: u32,
    /// `BAO_IOEVENTFD_FLAG_*`.
    pub flags: u32,
    /// Start of the watched range.
    pub addr: u64,
    /// Length of the watched range: 1, 2, 4 or 8, or 0 for "any write at `addr`".
    pub len: u32,
    /// Must be 0.
    pub reserved: u32,
    /// The value to match when `BAO_IOEVENTFD_FLAG_DATAMATCH` is set.
    pub data: u64,
}

/// `struct bao_irqfd`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Irqfd {
    /// The eventfd whose signal injects the frontend interrupt.
    pub fd: i32,
    /// `BAO_IRQFD_FLAG_*`.
    pub flags: u32,
}

/// `struct bao_dm_info`, with the 4 bytes of implicit padding after `id` made explicit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DmInfo {
    /// The DM id, chosen by the caller of GET_INFO.
    pub id: u32,
    /// Implicit in the C header (the next field is 8-byte aligned); always 0 here.
    pub padding: u32,
    /// Guest-physical base of the shared memory.
    pub shmem_addr: u64,
    /// Size of the shared memory in bytes.
    pub shmem_size: u64,
    /// The DM's backend interrupt number.
    pub irq: u32,
    /// The new per-DM file descriptor, returned by GET_INFO.
    pub fd: i32,
}

/// `BAO_IOCTL_DM_GET_INFO`, on `/dev/bao-io-dispatcher`: 0xC020A601.
pub const BAO_IOCTL_DM_GET_INFO: u32 = iowr::<DmInfo>(BAO_IOCTL_TYPE, 0x01);
/// `BAO_IOCTL_IO_CLIENT_ATTACH`, on a DM fd: 0xC030A602.
pub const BAO_IOCTL_IO_CLIENT_ATTACH: u32 = iowr::<VirtioRequest>(BAO_IOCTL_TYPE, 0x02);
/// `BAO_IOCTL_IO_REQUEST_COMPLETE`, on a DM fd: 0x4030A603.
pub const BAO_IOCTL_IO_REQUEST_COMPLETE: u32 = iow::<VirtioRequest>(BAO_IOCTL_TYPE, 0x03);
/// `BAO_IOCTL_IOEVENTFD`, on a DM fd: 0x4020A604.
pub const BAO_IOCTL_IOEVENTFD: u32 = iow::<Ioeventfd>(BAO_IOCTL_TYPE, 0x04);
/// `BAO_IOCTL_IRQFD`, on a DM fd: 0x4008A605.
pub const BAO_IOCTL_IRQFD: u32 = iow::<Irqfd>(BAO_IOCTL_TYPE, 0x05);

// Layout checks against the spec's table.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<VirtioRequest>() == 48);
    assert!(offset_of!(VirtioRequest, dm_id) == 0);
    assert!(offset_of!(VirtioRequest, addr) == 8);
    assert!(offset_of!(VirtioRequest, op) == 16);
    assert!(offset_of!(VirtioRequest, value) == 24);
    assert!(offset_of!(VirtioRequest, access_width) == 32);
    assert!(offset_of!(VirtioRequest, request_id) == 40);

    assert!(size_of::<Ioeventfd>() == 32);
    assert!(offset_of!(Ioeventfd, fd) == 0);
    assert!(offset_of!(Ioeventfd, flags) == 4);
    assert!(offset_of!(Ioeventfd, addr) == 8);
    assert!(offset_of!(Ioeventfd, len) == 16);
    assert!(offset_of!(Ioeventfd, reserved) == 20);
    assert!(offset_of!(Ioeventfd, data) == 24);

    assert!(size_of::<Irqfd>() == 8);
    assert!(offset_of!(Irqfd, fd) == 0);
    assert!(offset_of!(Irqfd, flags) == 4);

    assert!(size_of::<DmInfo>() == 32);
    assert!(offset_of!(DmInfo, id) == 0);
    assert!(offset_of!(DmInfo, padding) == 4);
    assert!(offset_of!(DmInfo, shmem_addr) == 8);
    assert!(offset_of!(DmInfo, shmem_size) == 16);
    assert!(offset_of!(DmInfo, irq) == 24);
    assert!(offset_of!(DmInfo, fd) == 28);

    assert!(BAO_IOCTL_DM_GET_INFO == 0xC020_A601);
    assert!(BAO_IOCTL_IO_CLIENT_ATTACH == 0xC030_A602);
    assert!(BAO_IOCTL_IO_REQUEST_COMPLETE == 0x4030_A603);
    assert!(BAO_IOCTL_IOEVENTFD == 0x4020_A604);
    assert!(BAO_IOCTL_IRQFD == 0x4008_A605);
};

// SAFETY: each struct is `#[repr(C)]`, made only of integers (any bit pattern is valid), and
// has no implicit padding (DmInfo's is the named `padding` field): the layout checks above
// pin every offset and the size. So they can be handed to ioctl(2) as their bytes.
unsafe impl vm_memory::ByteValued for VirtioRequest {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for Ioeventfd {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for Irqfd {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for DmInfo {}

/// Little-endian field-by-field encoding, for the wire and for recording doubles. Padding is
/// written as zero and ignored on decode, so no uninitialised byte is ever read.
pub trait WireStruct: Sized {
    /// Encoded size, equal to the C struct size.
    const SIZE: usize;
    /// Appends the encoding of `self` to `out`.
    fn encode(&self, out: &mut Vec<u8>);
    /// Decodes from exactly [`Self::SIZE`] bytes; `None` if `bytes` has another length.
    fn decode(bytes: &[u8]) -> Option<Self>;
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

impl WireStruct for VirtioRequest {
    const SIZE: usize = 48;
    fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.dm_id,
            self.addr,
            self.op,
            self.value,
            self.access_width,
            self.request_id,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn decode(b: &[u8]) -> Option<Self> {
        (b.len() == Self::SIZE).then(|| Self {
            dm_id: u64_at(b, 0),
            addr: u64_at(b, 8),
            op: u64_at(b, 16),
            value: u64_at(b, 24),
            access_width: u64_at(b, 32),
            request_id: u64_at(b, 40),
        })
    }
}

impl WireStruct for Ioeventfd {
    const SIZE: usize = 32;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.fd.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.addr.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.reserved.to_le_bytes());
        out.extend_from_slice(&self.data.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Option<Self> {
        (b.len() == Self::SIZE).then(|| Self {
            fd: u32_at(b, 0),
            flags: u32_at(b, 4),
            addr: u64_at(b, 8),
            len: u32_at(b, 16),
            reserved: u32_at(b, 20),
            data: u64_at(b, 24),
        })
    }
}

impl WireStruct for Irqfd {
    const SIZE: usize = 8;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.fd.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Option<Self> {
        (b.len() == Self::SIZE).then(|| Self {
            fd: i32::from_le_bytes(u32_at(b, 0).to_le_bytes()),
            flags: u32_at(b, 4),
        })
    }
}

impl WireStruct for DmInfo {
    const SIZE: usize = 32;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.shmem_addr.to_le_bytes());
        out.extend_from_slice(&self.shmem_size.to_le_bytes());
        out.extend_from_slice(&self.irq.to_le_bytes());
        out.extend_from_slice(&self.fd.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Option<Self> {
        (b.len() == Self::SIZE).then(|| Self {
            id: u32_at(b, 0),
            padding: 0,
            shmem_addr: u64_at(b, 8),
            shmem_size: u64_at(b, 16),
            irq: u32_at(b, 24),
            fd: i32::from_le_bytes(u32_at(b, 28).to_le_bytes()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `v` encoded: the encoding's length, what decodes from it, and what decodes from it
    /// without its first byte.
    fn roundtrip<T: WireStruct>(v: &T) -> (usize, Option<T>, Option<T>) {
        let mut buf = Vec::new();
        v.encode(&mut buf);
        (buf.len(), T::decode(&buf), T::decode(&buf[1..]))
    }

    #[test]
    fn virtio_request_roundtrips_and_a_short_buffer_decodes_to_nothing() {
        let v = VirtioRequest {
            dm_id: 1,
            addr: 0xa000_0050,
            op: BAO_IO_WRITE,
            value: 0xdead_beef,
            access_width: 4,
            request_id: 7,
        };

        let (len, back, short) = roundtrip(&v);

        assert_eq!(len, VirtioRequest::SIZE);
        assert_eq!(back, Some(v));
        assert_eq!(short, None);
    }

    #[test]
    fn ioeventfd_roundtrips_and_a_short_buffer_decodes_to_nothing() {
        let v = Ioeventfd {
            fd: 9,
            flags: BAO_IOEVENTFD_FLAG_DATAMATCH,
            addr: 0x50,
            len: 4,
            reserved: 0,
            data: 3,
        };

        let (len, back, short) = roundtrip(&v);

        assert_eq!(len, Ioeventfd::SIZE);
        assert_eq!(back, Some(v));
        assert_eq!(short, None);
    }

    #[test]
    fn irqfd_roundtrips_and_a_short_buffer_decodes_to_nothing() {
        let v = Irqfd { fd: -1, flags: 1 };

        let (len, back, short) = roundtrip(&v);

        assert_eq!(len, Irqfd::SIZE);
        assert_eq!(back, Some(v));
        assert_eq!(short, None);
    }

    #[test]
    fn dm_info_roundtrips_and_a_short_buffer_decodes_to_nothing() {
        let v = DmInfo {
            id: 3,
            padding: 0,
            shmem_addr: 1 << 32,
            shmem_size: 1 << 20,
            irq: 52,
            fd: -1,
        };

        let (len, back, short) = roundtrip(&v);

        assert_eq!(len, DmInfo::SIZE);
        assert_eq!(back, Some(v));
        assert_eq!(short, None);
    }

    #[test]
    fn encoding_matches_the_in_memory_layout() {
        // The encoding must equal the bytes the kernel would see through the repr(C) struct.
        let req = VirtioRequest {
            dm_id: 0x0102_0304_0506_0708,
            addr: 2,
            op: 3,
            value: 4,
            access_width: 5,
            request_id: 6,
        };
        let mut buf = Vec::new();
        req.encode(&mut buf);
        assert_eq!(&buf[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&buf[40..48], &6u64.to_le_bytes());
    }

    #[test]
    fn dm_info_padding_is_written_as_zero_and_ignored() {
        let mut buf = Vec::new();
        DmInfo {
            id: 1,
            padding: 0xffff_ffff,
            ..Default::default()
        }
        .encode(&mut buf);
        assert_eq!(&buf[4..8], &[0, 0, 0, 0]);
        buf[4] = 0xaa;
        assert_eq!(DmInfo::decode(&buf).map(|i| i.padding), Some(0));
    }
}
