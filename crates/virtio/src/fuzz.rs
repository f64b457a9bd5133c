//! Entry points for fuzz targets (the `fuzz/` workspace drives them); they also run under
//! `cargo test`. Each takes arbitrary bytes and must never panic.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{
    drain_queue, ActivateContext, ActivateError, Interrupt, SharedStatus, VirtioDevice,
};
use crate::devices::block::{parse_block_request, BlockBackend, BlockRequest, DiskGeometry};
use crate::devices::console::{self, ConsolePort};
use crate::devices::net::{self, NetBackend};
use crate::devices::rng::{self, TokenBucket};
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

/// Bytes of guest memory each fuzzed virtqueue's rings occupy (room for 64 entries).
const QUEUE_STRIDE: u64 = 0x800;
/// Largest fuzzed queue size, so that a queue's rings fit in [`QUEUE_STRIDE`].
const MAX_FUZZ_QUEUE_LOG2: u8 = 6;
/// Chains served per pass at most is bounded by the queue size; passes per input:
const MAX_PASSES: usize = 4;

/// Guest memory holding `data` from [`FUZZ_MEM_BASE`] on, and `N` split virtqueues laid there:
/// queue `i` has its descriptor table at `FUZZ_MEM_BASE + i * QUEUE_STRIDE`, then its avail
/// ring, then its used ring, so that the descriptors, the avail ring and the buffers all come
/// from the fuzz input. `header[0]` picks the queue size (1..=64), `header[1]` bit 0 EVENT_IDX.
fn fuzz_queues<const N: usize>(
    header: [u8; 2],
    data: &[u8],
) -> Option<(GuestMemoryMmap, [Queue; N])> {
    let mem = fuzz_mem()?;
    let n = data.len().min(FUZZ_MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(FUZZ_MEM_BASE))
        .ok()?;
    let size = 1u16 << (header[0] % (MAX_FUZZ_QUEUE_LOG2 + 1));
    let mut queues = Vec::with_capacity(N);
    for i in 0..N {
        let desc = FUZZ_MEM_BASE + u64::try_from(i).ok()? * QUEUE_STRIDE;
        let avail = desc + 16 * u64::from(size);
        // flags, idx, ring[size], used_event; the used ring is 4-byte aligned.
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let mut q = Queue::new(size).ok()?;
        q.set_desc_table_address(Some(low32(desc)), Some(high32(desc)));
        q.set_avail_ring_address(Some(low32(avail)), Some(high32(avail)));
        q.set_used_ring_address(Some(low32(used)), Some(high32(used)));
        q.set_event_idx(header[1] & 1 == 1);
        q.set_ready(true);
        if !q.is_valid(&mem) {
            return None;
        }
        queues.push(q);
    }
    Some((mem, queues.try_into().ok()?))
}

fn low32(a: u64) -> u32 {
    u32::try_from(a & 0xffff_ffff).unwrap_or(0)
}

fn high32(a: u64) -> u32 {
    u32::try_from(a >> 32).unwrap_or(0)
}

fn fuzz_interrupt() -> Option<Arc<Interrupt>> {
    let irqfd = EventFd::new(libc::EFD_NONBLOCK).ok()?;
    Some(Arc::new(Interrupt::new(SharedStatus::default(), irqfd)))
}

/// A path for a fuzzing backend socket, unique to this process.
fn fuzz_socket_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("remio-fuzz-{what}-{}.sock", std::process::id()))
}

/// Splits the 2-byte queue header off `data`.
fn split_header(data: &[u8]) -> Option<([u8; 2], &[u8])> {
    match data {
        [a, b, rest @ ..] => Some(([*a, *b], rest)),
        _ => None,
    }
}

/// virtio-rng over guest-laid descriptor chains: `data` is the queue header (2 bytes, see
/// `fuzz_queues`), then guest memory. Serves the queue as the device's worker does (with a
/// token bucket when the header's bit 1 is set).
pub fn rng_chains(data: &[u8]) {
    let Some((header, rest)) = split_header(data) else {
        return;
    };
    let Some((mem, [mut queue])) = fuzz_queues::<1>(header, rest) else {
        return;
    };
    let Some(interrupt) = fuzz_interrupt() else {
        return;
    };
    let mut bucket = (header[1] & 2 != 0).then(|| TokenBucket::new(4096));
    let mut scratch = [0u8; 256];
    for _ in 0..MAX_PASSES {
        if rng::serve(&mut queue, &mem, &interrupt, &mut bucket, &mut scratch).is_err() {
            break;
        }
    }
}

/// virtio-blk over guest-laid descriptor chains, against a 64 KiB image (read-only when the
/// header's bit 1 is set): parses, executes and answers every available request.
pub fn block_chains(data: &[u8]) {
    static IMAGES: OnceLock<Option<[Mutex<BlockBackend>; 2]>> = OnceLock::new();
    let Some((header, rest)) = split_header(data) else {
        return;
    };
    let Some(images) = IMAGES.get_or_init(|| {
        let open = |ro: bool| {
            let path = fuzz_socket_path(if ro { "blk-ro" } else { "blk-rw" });
            std::fs::File::create(&path).ok()?.set_len(0x1_0000).ok()?;
            let b = BlockBackend::open(&path, ro, Some("fuzz")).ok();
            let _ = std::fs::remove_file(&path);
            b.map(Mutex::new)
        };
        Some([open(false)?, open(true)?])
    }) else {
        return;
    };
    let mut backend = images[usize::from(header[1] >> 1 & 1)]
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let Some((mem, [mut queue])) = fuzz_queues::<1>(header, rest) else {
        return;
    };
    let Some(interrupt) = fuzz_interrupt() else {
        return;
    };
    for _ in 0..MAX_PASSES {
        if drain_queue(&mut queue, &mem, &interrupt, |chain| {
            backend.handle(&mem, chain)
        })
        .is_err()
        {
            break;
        }
    }
}

/// virtio-console over guest-laid receive (queue 0) and transmit (queue 1) chains: `data` is
/// the queue header, one byte `k`, then guest memory; the first `k * 16` bytes of guest memory
/// are also the pending input. The port is a socket with no client (output is dropped after
/// validation).
pub fn console_chains(data: &[u8]) {
    static PORT: Mutex<Option<ConsolePort>> = Mutex::new(None);
    let Some((header, rest)) = split_header(data) else {
        return;
    };
    let Some((&k, rest)) = rest.split_first() else {
        return;
    };
    let Some((mem, queues)) = fuzz_queues::<2>(header, rest) else {
        return;
    };
    let Some(interrupt) = fuzz_interrupt() else {
        return;
    };
    let mut slot = PORT.lock().unwrap_or_else(PoisonError::into_inner);
    let port = match slot.take() {
        Some(p) => p,
        None => match ConsolePort::socket(&fuzz_socket_path("console")) {
            Ok(p) => p,
            Err(_) => return,
        },
    };
    let input = &rest[..rest.len().min(usize::from(k) * 16)];
    let (port, _) = console::fuzz_passes(port, mem, queues, interrupt, input);
    *slot = Some(port);
}

/// virtio-net over guest-laid receive (queue 0) and transmit (queue 1) chains, laid out as for
/// [`console_chains`]; the first `k * 16` bytes are also a received frame (with its header).
/// The backend is a datagram socket with no peer (frames are dropped after validation).
pub fn net_chains(data: &[u8]) {
    static BACKEND: Mutex<Option<NetBackend>> = Mutex::new(None);
    let Some((header, rest)) = split_header(data) else {
        return;
    };
    let Some((&k, rest)) = rest.split_first() else {
        return;
    };
    let Some((mem, queues)) = fuzz_queues::<2>(header, rest) else {
        return;
    };
    let Some(interrupt) = fuzz_interrupt() else {
        return;
    };
    let mut slot = BACKEND.lock().unwrap_or_else(PoisonError::into_inner);
    let backend = match slot.take() {
        Some(b) => b,
        None => match NetBackend::socket(&fuzz_socket_path("net"), None) {
            Ok(b) => b,
            Err(_) => return,
        },
    };
    let frame = &rest[..rest.len().min(usize::from(k) * 16)];
    let (backend, _) = net::fuzz_passes(backend, mem, queues, interrupt, frame);
    *slot = Some(backend);
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
            rng_chains(&data);
            block_chains(&data);
            console_chains(&data);
            net_chains(&data);
        }
        mmio_transport(&[]);
        block_request(&[]);
        rng_chains(&[]);
        block_chains(&[]);
        console_chains(&[]);
        net_chains(&[]);
    }
}
