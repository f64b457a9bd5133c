//! The PCI configuration space of the proxy device, owned by the remote.
//!
//! QEMU's `x-pci-proxy-dev` forwards every config access to us and keeps a shadow copy
//! updated through `pci_default_write_config`, so the writable bits here are exactly the ones
//! QEMU's shadow lets through (`hw/pci/pci.c`, `pci_init_wmask`): command register mask
//! 0x0547, cache line size, interrupt line, and BAR0's address bits. The ids follow the guest
//! glue's contract (`guest/remio-ids.h`): the subsystem id is the number of register windows.

/// Conventional PCI config space size.
pub const CONFIG_SIZE: usize = 256;
/// `guest/remio-ids.h`: `REMIO_PROXY_VENDOR_ID`.
pub const PROXY_VENDOR_ID: u16 = 0x1b36;
/// `guest/remio-ids.h`: `REMIO_PROXY_DEVICE_ID`.
pub const PROXY_DEVICE_ID: u16 = 0x00ff;
/// `guest/remio-ids.h`: `REMIO_PROXY_SUBSYS_VENDOR`.
pub const PROXY_SUBSYS_VENDOR: u16 = 0x1b36;
/// `guest/remio-ids.h`: `REMIO_WINDOW_SIZE`, one Remote I/O device's register window.
pub const WINDOW_SIZE: u64 = 0x200;
/// `guest/remio-ids.h`: `REMIO_MAX_WINDOWS`.
pub const MAX_WINDOWS: usize = 32;
/// Class code reported (base class 0x08 system peripheral, subclass 0x80 other).
pub const PROXY_CLASS: u16 = 0x0880;

const COMMAND: usize = 0x04;
/// `PCI_COMMAND_IO | MEMORY | MASTER | PARITY | SERR | INTX_DISABLE`: QEMU's shadow mask.
const COMMAND_WMASK: u16 = 0x0547;
const BAR0: usize = 0x10;
const INTERRUPT_LINE: usize = 0x3c;
const CACHE_LINE_SIZE: usize = 0x0c;

/// Errors of this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// Zero windows or more than the contract allows.
    #[error("{0} register windows: must be 1..={MAX_WINDOWS}")]
    BadWindowCount(usize),
    /// A BAR size that is not a power of two between 4 KiB and 2 GiB.
    #[error("BAR size {0:#x}: must be a power of two from 4 KiB to 2 GiB")]
    BadBarSize(u64),
}

/// The config space: current bytes and the per-byte write mask.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    wmask: [u8; CONFIG_SIZE],
    initial: [u8; CONFIG_SIZE],
    bar_size: u64,
}

/// BAR0's size for `windows` windows: a power of two, at least one 4 KiB page.
///
/// # Errors
/// [`PciError::BadWindowCount`] outside `1..=MAX_WINDOWS`.
pub fn bar_size_for(windows: usize) -> Result<u64, PciError> {
    if windows == 0 || windows > MAX_WINDOWS {
        return Err(PciError::BadWindowCount(windows));
    }
    // Bounded by MAX_WINDOWS: no overflow.
    Ok((windows as u64 * WINDOW_SIZE)
        .next_power_of_two()
        .max(0x1000))
}

impl ConfigSpace {
    /// The proxy's config space with `windows` register windows in BAR0 (a 32-bit,
    /// non-prefetchable memory BAR), interrupt pin A (QEMU's shadow says so too), no
    /// capabilities, no ROM.
    pub fn new(windows: usize) -> Result<Self, PciError> {
        let bar_size = bar_size_for(windows)?;
        // Bounded by MAX_WINDOWS.
        let subsys = u16::try_from(windows).unwrap_or(0);
        Self::with_ids(PROXY_DEVICE_ID, subsys, bar_size)
    }

    /// A config space like [`ConfigSpace::new`]'s (same vendor, class, masks, pin) for another
    /// proxy device: device id `device_id`, subsystem id `subsys_id`, BAR0 of `bar_size` bytes
    /// (a power of two, at least 4 KiB).
    pub fn with_ids(device_id: u16, subsys_id: u16, bar_size: u64) -> Result<Self, PciError> {
        if !bar_size.is_power_of_two() || !(0x1000..=1 << 31).contains(&bar_size) {
            return Err(PciError::BadBarSize(bar_size));
        }
        let mut bytes = [0u8; CONFIG_SIZE];
        let mut wmask = [0u8; CONFIG_SIZE];
        put16(&mut bytes, 0x00, PROXY_VENDOR_ID);
        put16(&mut bytes, 0x02, device_id);
        put16(&mut bytes, 0x0a, PROXY_CLASS);
        put16(&mut bytes, 0x2c, PROXY_SUBSYS_VENDOR);
        put16(&mut bytes, 0x2e, subsys_id);
        bytes[0x3d] = 1; // interrupt pin INTA (unused: interrupts come from ivshmem MSI-X)
        put16(&mut wmask, COMMAND, COMMAND_WMASK);
        wmask[CACHE_LINE_SIZE] = 0xff;
        wmask[INTERRUPT_LINE] = 0xff;
        // Address bits of a 32-bit memory BAR: everything above the size; type bits read 0.
        let bar_mask = u32::try_from(!(bar_size - 1) & 0xffff_fff0).unwrap_or(0);
        wmask[BAR0..BAR0 + 4].copy_from_slice(&bar_mask.to_le_bytes());
        Ok(Self {
            bytes,
            wmask,
            initial: bytes,
            bar_size,
        })
    }

    /// BAR0's size.
    pub fn bar_size(&self) -> u64 {
        self.bar_size
    }

    /// The BAR0 base the guest programmed.
    pub fn bar0_base(&self) -> u64 {
        u64::from(
            u32::from_le_bytes([
                self.bytes[BAR0],
                self.bytes[BAR0 + 1],
                self.bytes[BAR0 + 2],
                self.bytes[BAR0 + 3],
            ]) & 0xffff_fff0,
        )
    }

    /// Whether memory decoding is on.
    pub fn memory_enabled(&self) -> bool {
        self.bytes[COMMAND] & 0x2 != 0
    }

    /// Reads `len` (1, 2 or 4) bytes at `addr`; `None` for a bad length or a range outside
    /// the config space.
    pub fn read(&self, addr: u32, len: i32) -> Option<u32> {
        let (start, len) = range(addr, len)?;
        let mut v = [0u8; 4];
        v[..len].copy_from_slice(&self.bytes[start..start + len]);
        Some(u32::from_le_bytes(v))
    }

    /// Writes `len` bytes of `val` at `addr` through the write mask; `false` for a bad length
    /// or range (nothing written).
    pub fn write(&mut self, addr: u32, val: u32, len: i32) -> bool {
        let Some((start, len)) = range(addr, len) else {
            return false;
        };
        for (i, b) in val.to_le_bytes()[..len].iter().enumerate() {
            let m = self.wmask[start + i];
            self.bytes[start + i] = (self.bytes[start + i] & !m) | (b & m);
        }
        true
    }

    /// A PCI reset: back to the power-on contents (command off, BAR unassigned), as QEMU's
    /// `pci_do_device_reset` does to its shadow.
    pub fn reset(&mut self) {
        self.bytes = self.initial;
    }
}

fn put16(b: &mut [u8; CONFIG_SIZE], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

fn range(addr: u32, len: i32) -> Option<(usize, usize)> {
    let len = match len {
        1 | 2 | 4 => usize::try_from(len).ok()?,
        _ => return None,
    };
    let start = usize::try_from(addr).ok()?;
    (start.checked_add(len)? <= CONFIG_SIZE).then_some((start, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_glue_contract_ids_and_window_count() {
        let cs = ConfigSpace::new(3).unwrap();
        assert_eq!(cs.read(0, 2), Some(0x1b36));
        assert_eq!(cs.read(2, 2), Some(0x00ff));
        assert_eq!(cs.read(0x2c, 2), Some(0x1b36));
        assert_eq!(cs.read(0x2e, 2), Some(3));
        assert_eq!(cs.read(0x3d, 1), Some(1));
    }

    #[test]
    fn bar0_sizing_reads_back_the_size_mask_like_qemu_probes_it() {
        let mut cs = ConfigSpace::new(9).unwrap(); // 9 * 0x200 = 0x1200 -> 0x2000
        let orig = cs.read(0x10, 4).unwrap();
        assert!(cs.write(0x10, 0xffff_ffff, 4));
        let sized = cs.read(0x10, 4).unwrap();
        assert_eq!((!(sized & 0xffff_fff0)).wrapping_add(1), 0x2000);
        assert!(cs.write(0x10, orig, 4));
        assert_eq!(cs.read(0x10, 4), Some(0));
    }

    #[test]
    fn other_bars_and_rom_size_to_zero() {
        let mut cs = ConfigSpace::new(1).unwrap();
        for bar in [0x14, 0x18, 0x1c, 0x20, 0x24, 0x28, 0x30] {
            cs.write(bar, 0xffff_ffff, 4);
            assert_eq!(cs.read(bar, 4), Some(0), "bar at {bar:#x}");
        }
    }

    #[test]
    fn command_register_applies_qemu_write_mask() {
        let mut cs = ConfigSpace::new(1).unwrap();
        cs.write(4, 0xffff, 2);
        assert_eq!(cs.read(4, 2), Some(0x0547));
        assert!(cs.memory_enabled());
    }

    #[test]
    fn ids_are_read_only() {
        let mut cs = ConfigSpace::new(1).unwrap();
        cs.write(0, 0xdead_beef, 4);
        assert_eq!(cs.read(0, 4), Some(0x00ff_1b36));
    }

    #[test]
    fn programmed_bar_base_is_reported_and_reset_clears_it() {
        let mut cs = ConfigSpace::new(1).unwrap();
        cs.write(0x10, 0xfe00_1000, 4);
        assert_eq!(cs.bar0_base(), 0xfe00_1000);
        cs.reset();
        assert_eq!(cs.bar0_base(), 0);
    }

    #[test]
    fn bad_lengths_and_out_of_range_accesses_are_refused() {
        let mut cs = ConfigSpace::new(1).unwrap();
        assert_eq!(cs.read(0, 3), None);
        assert_eq!(cs.read(255, 2), None);
        assert_eq!(cs.read(u32::MAX, 4), None);
        assert!(!cs.write(254, 0, 4));
        assert_eq!(cs.read(254, 2), Some(0));
    }

    #[test]
    fn another_proxy_gets_its_own_ids_and_bar_size_with_the_same_masks() {
        let mut cs = ConfigSpace::with_ids(0x00fe, 0, 0x1000).unwrap();
        assert_eq!(cs.read(0, 4), Some(0x00fe_1b36));
        cs.write(0x10, 0xffff_ffff, 4);
        assert_eq!(cs.read(0x10, 4), Some(0xffff_f000));
        cs.write(4, 0xffff, 2);
        assert_eq!(cs.read(4, 2), Some(0x0547));
        assert_eq!(
            ConfigSpace::with_ids(0x00fe, 0, 0x1800).unwrap_err(),
            PciError::BadBarSize(0x1800)
        );
        assert!(ConfigSpace::with_ids(0x00fe, 0, 0x800).is_err());
    }

    #[test]
    fn window_count_is_bounded_by_the_contract() {
        assert_eq!(
            ConfigSpace::new(0).unwrap_err(),
            PciError::BadWindowCount(0)
        );
        assert!(ConfigSpace::new(33).is_err());
        assert_eq!(ConfigSpace::new(32).unwrap().bar_size(), 0x4000);
        assert_eq!(bar_size_for(1), Ok(0x1000));
        assert_eq!(bar_size_for(9), Ok(0x2000));
        assert_eq!(
            bar_size_for(usize::MAX),
            Err(PciError::BadWindowCount(usize::MAX))
        );
    }
}
