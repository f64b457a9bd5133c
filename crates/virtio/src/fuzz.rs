//! Entry points for fuzz targets (the `fuzz/` workspace drives them); they also run under
//! `cargo test`. Each takes arbitrary bytes and must never panic.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::device::{ActivateContext, ActivateError, VirtioDevice};
use crate::devices::block::{parse_block_request, BlockRequest, DiskGeometry};
use crate::transport::{MmioTransport, NoopRegistrar};

/// Guest-physical base of the fuzzing memory.
pub const FUZZ_MEM_BASE: u64 = 0x1000_0000;
/// Size of the fuzzing memory.
pub const FUZZ_MEM_SIZE: usize = 0x1_0000;

/// A device with two queues, 8 bytes of config space and no worker.
#[derive(Debug, Default)]
struct NullDevice {
    config: [u8; 8],
}

impl VirtioDevice for NullDevice {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_RNG
    }
    fn avail_features(&self) -> u64 {
        (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
            | (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 256]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::device::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Ok(o) = usize::try_from(offset) {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = o.checked_add(i).and_then(|j| self.config.get_mut(j)) {
                    *slot = *b;
                }
            }
        }
    }
    fn activate(&mut self, _ctx: ActivateContext) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {}
}

fn fuzz_mem() -> Option<GuestMemoryMmap> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(FUZZ_MEM_BASE), FUZZ_MEM_SIZE)]).ok()
}

/// Drives the virtio-mmio register file with accesses decoded from `data`: each 11 bytes
/// are (op: 1, offset: 2, width: 1, value: 7 → u64).
pub fn mmio_transport(data: &[u8]) {
    let Some(mem) = fuzz_mem() else { return };
    let mut t = MmioTransport::new(
        Box::new(NullDevice::default()),
        mem,
        Box::new(NoopRegistrar),
    );
    for rec in data.chunks_exact(11) {
        let offset = u64::from(u16::from_le_bytes([rec[1], rec[2]]));
        let width = u32::from(rec[3] & 0xf);
        let mut v = [0u8; 8];
        v[..7].copy_from_slice(&rec[4..11]);
        let value = u64::from_le_bytes(v);
        if rec[0] & 1 == 0 {
            t.read(offset, width);
        } else {
            t.write(offset, width, value);
        }
    }
}

/// Parses a virtio-blk request whose descriptors are decoded from `data` (16 bytes each:
/// addr u64, len u32, flags u16, next u16), over a memory whose contents are `data` too.
pub fn block_request(data: &[u8]) {
    let Some(mem) = fuzz_mem() else { return };
    let n = data.len().min(FUZZ_MEM_SIZE);
    if mem
        .write_slice(&data[..n], GuestAddress(FUZZ_MEM_BASE))
        .is_err()
    {
        return;
    }
    let descs = data.chunks_exact(16).take(300).map(|c| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&c[0..8]);
        let mut l = [0u8; 4];
        l.copy_from_slice(&c[8..12]);
        Descriptor::new(
            u64::from_le_bytes(a),
            u32::from_le_bytes(l),
            u16::from_le_bytes([c[12], c[13]]),
            u16::from_le_bytes([c[14], c[15]]),
        )
    });
    let mut req = BlockRequest::default();
    let _ = parse_block_request(
        &mem,
        descs,
        DiskGeometry {
            capacity: u64::from(data.first().copied().unwrap_or(0)) * 8,
            read_only: data.get(1).is_some_and(|b| b & 1 == 1),
        },
        &mut req,
    );
}

#[cfg(test)]
#[expect(clippy::cast_possible_truncation, reason = "test constants are small")]
mod tests {
    use super::*;

    fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn fuzz_entry_points_survive_random_inputs() {
        for seed in 0..64 {
            let data = pseudo_random(seed, 2048);
            mmio_transport(&data);
            block_request(&data);
        }
        mmio_transport(&[]);
        block_request(&[]);
    }
}
