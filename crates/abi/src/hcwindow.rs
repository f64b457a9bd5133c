//! The hypercall window: how a backend VM under QEMU (x86, no `hvc`) issues the Remote I/O
//! hypercall to the platform process that models Bao ("Bao in a box", `docs/c-driver.md`).
//!
//! The window is BAR0 (memory, [`BAR0_SIZE`]) of the backend's `x-pci-proxy-dev`, whose config
//! space the platform serves with vendor [`PCI_VENDOR_ID`] and device [`PCI_DEVICE_ID`]. A proxy
//! BAR blocks the vCPU on every access until the platform replies, so "write the inputs, write
//! CALL, read the outputs" executes the hypercall synchronously, like `hvc #0` on arm64.
//!
//! Every register is 64-bit little endian; only 8-byte accesses at 8-byte-aligned offsets are
//! valid. Any other access reads 0 and writes nothing (the platform logs it, rate limited).
//!
//! | offset | register | access |
//! | --- | --- | --- |
//! | 0x000 | [`REG_MAGIC`]: [`MAGIC`] (`"REMIOHC1"` little endian) | RO |
//! | 0x008 | [`REG_VERSION`]: [`VERSION`] | RO |
//! | 0x010 | [`REG_DM_COUNT`]: Remote I/O devices of this backend VM (`dm_id` 0..n-1) | RO |
//! | 0x018 | [`REG_BANK_COUNT`]: [`BANK_COUNT`] per-CPU register banks | RO |
//! | 0x100 + b × 0x40 | bank `b` ([`bank_offset`]) | see [`BankField`] |
//!
//! Bank fields ([`BankField`], offset within the bank): `+0x00` DM_ID (in), `+0x08` ADDR
//! (in/out), `+0x10` OP (in/out), `+0x18` VALUE (in/out), `+0x20` REQUEST_ID (in/out), `+0x28`
//! ACCESS_WIDTH (out), `+0x30` HAS_PENDING (out), `+0x38` CALL.
//!
//! A write of any value to CALL executes the Remote I/O hypercall (`spec/remote-io.md`, "The
//! hypercall") with the bank's DM_ID, ADDR, OP, VALUE and REQUEST_ID, synchronously (the BAR
//! write is answered only after it ran); the outputs (ADDR, OP, VALUE, ACCESS_WIDTH,
//! REQUEST_ID, HAS_PENDING) then replace the bank's fields. A read of CALL returns the status
//! of the bank's last call as an `i64` exactly as Bao returns it: 0 success, `+1` for an ASK
//! with nothing pending or bad arguments, `-3` invalid arguments (see
//! [`crate::hypercall::RemioStatus`]). Before any call it reads 0.
//!
//! Interrupts: MSI-X vector `i` of the backend's `ivshmem-doorbell` is DM `i`'s backend
//! interrupt. Shared memory: BAR2 of the backend's `ivshmem-plain` is the frontend's whole RAM
//! (frontend guest-physical 0 at BAR offset 0).
//!
//! ```
//! use remio_abi::hcwindow::{self, BankField, Register};
//! assert_eq!(hcwindow::bank_offset(1, BankField::Call), Some(0x178));
//! assert_eq!(hcwindow::decode(0x178, 8), Some(Register::Bank { bank: 1, field: BankField::Call }));
//! assert_eq!(hcwindow::decode(0x17c, 4), None);
//! assert_eq!(&hcwindow::MAGIC.to_le_bytes(), b"REMIOHC1");
//! ```

/// PCI vendor id of the hypercall proxy (Red Hat's QEMU range, as the frontend proxy).
pub const PCI_VENDOR_ID: u16 = 0x1b36;
/// PCI device id of the hypercall proxy (the frontend proxy is 0x00ff).
pub const PCI_DEVICE_ID: u16 = 0x00fe;
/// Size of BAR0, the register window.
pub const BAR0_SIZE: u64 = 0x1000;
/// The only valid access width in bytes.
pub const REG_WIDTH: u32 = 8;

/// MAGIC register offset.
pub const REG_MAGIC: u64 = 0x000;
/// VERSION register offset.
pub const REG_VERSION: u64 = 0x008;
/// DM_COUNT register offset.
pub const REG_DM_COUNT: u64 = 0x010;
/// BANK_COUNT register offset.
pub const REG_BANK_COUNT: u64 = 0x018;

/// The value of MAGIC: the ASCII bytes `REMIOHC1` read as a little-endian `u64`.
pub const MAGIC: u64 = 0x3143_484F_494D_4552;
/// The value of VERSION.
pub const VERSION: u64 = 1;
/// Number of register banks (one per backend CPU; the value of BANK_COUNT).
pub const BANK_COUNT: u64 = 16;
/// Offset of bank 0.
pub const BANK_BASE: u64 = 0x100;
/// Distance between banks.
pub const BANK_STRIDE: u64 = 0x40;

/// A field of a register bank; the discriminant is its offset within the bank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum BankField {
    /// In: the `dm_id` of the call.
    DmId = 0x00,
    /// In/out: `addr`.
    Addr = 0x08,
    /// In/out: `op` ([`crate::hypercall::RemioOp`] as a raw value).
    Op = 0x10,
    /// In/out: `value`.
    Value = 0x18,
    /// In/out: `request_id`.
    RequestId = 0x20,
    /// Out: `access_width`.
    AccessWidth = 0x28,
    /// Out: `has_pending` (a 0/1 flag).
    HasPending = 0x30,
    /// Write: execute the call. Read: the last call's status (an `i64`).
    Call = 0x38,
}

impl BankField {
    /// Every field, in offset order.
    pub const ALL: [Self; 8] = [
        Self::DmId,
        Self::Addr,
        Self::Op,
        Self::Value,
        Self::RequestId,
        Self::AccessWidth,
        Self::HasPending,
        Self::Call,
    ];

    /// The field at `offset` within a bank, if one is there.
    pub fn from_offset(offset: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|f| *f as u64 == offset)
    }

    /// Whether the guest may write it (CALL included: writing it executes the call).
    pub fn is_writable(self) -> bool {
        !matches!(self, Self::AccessWidth | Self::HasPending)
    }
}

/// A decoded register of the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Register {
    /// [`REG_MAGIC`].
    Magic,
    /// [`REG_VERSION`].
    Version,
    /// [`REG_DM_COUNT`].
    DmCount,
    /// [`REG_BANK_COUNT`].
    BankCount,
    /// A field of bank `bank` (`bank < BANK_COUNT`).
    Bank {
        /// The bank index.
        bank: usize,
        /// The field.
        field: BankField,
    },
}

/// The offset of `field` in bank `bank`; `None` when `bank >= BANK_COUNT`.
pub fn bank_offset(bank: u64, field: BankField) -> Option<u64> {
    (bank < BANK_COUNT).then(|| BANK_BASE + bank * BANK_STRIDE + field as u64)
}

/// Decodes an access at `offset` in BAR0 of `width` bytes: `None` for any access other than
/// an 8-byte access at an 8-byte-aligned offset of a defined register.
pub fn decode(offset: u64, width: u32) -> Option<Register> {
    if width != REG_WIDTH || !offset.is_multiple_of(8) || offset >= BAR0_SIZE {
        return None;
    }
    match offset {
        REG_MAGIC => Some(Register::Magic),
        REG_VERSION => Some(Register::Version),
        REG_DM_COUNT => Some(Register::DmCount),
        REG_BANK_COUNT => Some(Register::BankCount),
        _ => {
            let rel = offset.checked_sub(BANK_BASE)?;
            let bank = rel / BANK_STRIDE;
            if bank >= BANK_COUNT {
                return None;
            }
            let field = BankField::from_offset(rel % BANK_STRIDE)?;
            Some(Register::Bank {
                bank: usize::try_from(bank).ok()?,
                field,
            })
        }
    }
}

const _: () = {
    // "REMIOHC1" little endian.
    let m = MAGIC.to_le_bytes();
    assert!(m[0] == b'R' && m[1] == b'E' && m[2] == b'M' && m[3] == b'I');
    assert!(m[4] == b'O' && m[5] == b'H' && m[6] == b'C' && m[7] == b'1');
    // The banks sit after the global registers and inside the BAR.
    assert!(REG_BANK_COUNT + 8 <= BANK_BASE);
    assert!(BANK_BASE + BANK_COUNT * BANK_STRIDE <= BAR0_SIZE);
    // Eight 8-byte fields fill a bank exactly; CALL is the last.
    assert!(BankField::Call as u64 + 8 == BANK_STRIDE);
    assert!(BANK_STRIDE.is_multiple_of(8) && BANK_BASE.is_multiple_of(8));
    // A BAR size must be a power of two, at least a page.
    assert!(BAR0_SIZE.is_power_of_two() && BAR0_SIZE >= 0x1000);
    // Not the frontend proxy's id.
    assert!(PCI_DEVICE_ID != 0x00ff);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_registers_decode_at_their_offsets() {
        assert_eq!(decode(0x000, 8), Some(Register::Magic));
        assert_eq!(decode(0x008, 8), Some(Register::Version));
        assert_eq!(decode(0x010, 8), Some(Register::DmCount));
        assert_eq!(decode(0x018, 8), Some(Register::BankCount));
    }

    #[test]
    fn every_field_of_every_bank_round_trips_through_its_offset() {
        for bank in 0..BANK_COUNT {
            for field in BankField::ALL {
                let off = bank_offset(bank, field).unwrap();
                assert_eq!(
                    decode(off, 8),
                    Some(Register::Bank {
                        bank: usize::try_from(bank).unwrap(),
                        field
                    })
                );
            }
        }
        assert_eq!(bank_offset(BANK_COUNT, BankField::DmId), None);
        assert_eq!(bank_offset(15, BankField::Call), Some(0x4f8));
    }

    #[test]
    fn narrow_unaligned_reserved_and_out_of_bar_accesses_decode_to_nothing() {
        for width in [1, 2, 4, 3, 16, 0] {
            assert_eq!(decode(0x000, width), None, "width {width}");
        }
        assert_eq!(decode(0x004, 8), None);
        assert_eq!(decode(0x101, 8), None);
        assert_eq!(decode(0x020, 8), None, "reserved gap before the banks");
        assert_eq!(decode(0x0f8, 8), None);
        assert_eq!(decode(0x500, 8), None, "past the last bank");
        assert_eq!(decode(0xff8, 8), None);
        assert_eq!(decode(0x1000, 8), None);
        assert_eq!(decode(u64::MAX - 7, 8), None);
    }

    #[test]
    fn only_the_output_only_fields_are_read_only() {
        let ro: Vec<_> = BankField::ALL
            .into_iter()
            .filter(|f| !f.is_writable())
            .collect();
        assert_eq!(ro, [BankField::AccessWidth, BankField::HasPending]);
    }
}
