//! Transport state that outlives the device-model process, so that a restarted device model
//! resumes a device without the guest noticing (docs/architecture.md, "Device-model restart").
//!
//! The record lives in a *state region*: a memfd the platform allocates per DM and keeps across
//! the device model's death ([`remio_api::DmSession::state_region`]). A record is written
//! before its effect becomes visible to the guest (the transport writes it before the trapped
//! access that changed the state completes), and the region holds two slots written in turn,
//! each checked by a checksum and ordered by a sequence number, so that a device model killed
//! at any instruction leaves at least one whole record: the one with the highest sequence whose
//! checksum holds.
//!
//! # Layout (little endian)
//!
//! The region is [`REGION_LEN`] bytes: slot 0 at offset 0, slot 1 at [`SLOT_LEN`].
//!
//! | offset | field |
//! | --- | --- |
//! | 0 | `u64` magic, ASCII `RMIOST01` |
//! | 8 | `u32` format version ([`VERSION`]) |
//! | 12 | `u32` payload length `n` |
//! | 16 | `u64` sequence: the valid slot with the highest wins |
//! | 24 | `u64` config fingerprint ([`fingerprint`]): a record of another device is ignored |
//! | 32 | `u64` FNV-1a 64 checksum of bytes 0..32 and of the payload |
//! | 40 | the payload, `n` bytes: a [`TransportState`] |
//!
//! Queue progress is not recorded: every device of this crate completes the buffers of a queue
//! in the order it took them (one worker per queue, no reordering), so the requests in flight
//! when the process died are exactly the available entries from the used ring's index (read
//! from guest memory, which is the truth about what the guest has been given back) to where
//! the device had got. A restarted device resumes its queues at the used index and takes those
//! requests again (block reads and writes are idempotent by position; a net frame may be sent
//! twice; console output may repeat; rng gives fresh bytes). A device that completes out of
//! order would need the in-flight heads recorded (as vhost-user's inflight region does).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// `RMIOST01` as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"RMIOST01");
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Bytes per slot.
pub const SLOT_LEN: u64 = 4096;
/// Bytes of a state region: two slots.
pub const REGION_LEN: u64 = 2 * SLOT_LEN;
const HEADER_LEN: usize = 40;
/// Queues a record can describe (a slot holds the header and 4 + 36 + 29 per queue bytes).
pub const MAX_QUEUES: usize = 64;

/// Errors reading or writing a state region.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The region is smaller than [`REGION_LEN`].
    #[error("state region of {0} bytes, need {REGION_LEN}")]
    TooSmall(u64),
    /// The state does not fit a slot (too many queues).
    #[error("transport state of {0} queues does not fit a slot (at most {MAX_QUEUES})")]
    TooLarge(usize),
    /// Reading or writing the region failed.
    #[error("state region I/O: {0}")]
    Io(#[from] io::Error),
}

/// One queue's registers as the driver set them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// QueueDesc.
    pub desc: u64,
    /// QueueDriver (avail ring).
    pub driver: u64,
    /// QueueDevice (used ring).
    pub device: u64,
}

/// Everything the virtio-mmio transport needs to resume a device where the driver left it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportState {
    /// Status (DEVICE_NEEDS_RESET excluded: a restart clears it).
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The driver's features, both halves.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// SHMSel.
    pub shm_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus as last recorded (bits may have been set since; a restart raises a
    /// used-buffer interrupt anyway).
    pub interrupt_status: u32,
    /// Each queue's registers.
    pub queues: Vec<QueueState>,
}

impl TransportState {
    fn encode(&self, out: &mut Vec<u8>) {
        for v in [
            self.status,
            self.device_features_sel,
            self.driver_features_sel,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.driver_features.to_le_bytes());
        for v in [
            self.queue_sel,
            self.shm_sel,
            self.config_generation,
            self.interrupt_status,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let n = u32::try_from(self.queues.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_le_bytes());
        for q in &self.queues {
            out.extend_from_slice(&q.size.to_le_bytes());
            out.push(u8::from(q.ready));
            for a in [q.desc, q.driver, q.device] {
                out.extend_from_slice(&a.to_le_bytes());
            }
        }
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader(b);
        let status = r.u32()?;
        let device_features_sel = r.u32()?;
        let driver_features_sel = r.u32()?;
        let driver_features = r.u64()?;
        let queue_sel = r.u32()?;
        let shm_sel = r.u32()?;
        let config_generation = r.u32()?;
        let interrupt_status = r.u32()?;
        let n = usize::try_from(r.u32()?).ok()?;
        if n > MAX_QUEUES {
            return None;
        }
        let mut queues = Vec::with_capacity(n);
        for _ in 0..n {
            queues.push(QueueState {
                size: r.u16()?,
                ready: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return None,
                },
                desc: r.u64()?,
                driver: r.u64()?,
                device: r.u64()?,
            });
        }
        r.0.is_empty().then_some(Self {
            status,
            device_features_sel,
            driver_features_sel,
            driver_features,
            queue_sel,
            shm_sel,
            config_generation,
            interrupt_status,
            queues,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
}

/// FNV-1a, 64 bits: enough to tell a torn slot from a whole one (not a defence against
/// tampering: the region is only ever written by the device model and the platform).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// A fingerprint of what a record must match to be restored: the device type, the features
/// it offers, its queues' maximum sizes and its MMIO window. A record made for another device
/// (a changed config) is ignored.
pub fn fingerprint(device_type: u32, device_features: u64, queue_max: &[u16], mmio: u64) -> u64 {
    let mut bytes = Vec::with_capacity(20 + 2 * queue_max.len());
    bytes.extend_from_slice(&device_type.to_le_bytes());
    bytes.extend_from_slice(&device_features.to_le_bytes());
    bytes.extend_from_slice(&mmio.to_le_bytes());
    for m in queue_max {
        bytes.extend_from_slice(&m.to_le_bytes());
    }
    fnv1a(&[&bytes])
}

/// A state region: where [`TransportState`] records are written and read back.
#[derive(Debug)]
pub struct StateRegion {
    file: File,
    fingerprint: u64,
    /// The sequence of the last record written or read (the next goes to the other slot).
    seq: u64,
    buf: Vec<u8>,
}

impl StateRegion {
    /// A region over `file` (at least [`REGION_LEN`] bytes) for the device of `fingerprint`.
    /// Returns it with the newest whole record of that device, if any.
    pub fn open(
        file: File,
        fingerprint: u64,
    ) -> Result<(Self, Option<TransportState>), PersistError> {
        let len = file.metadata()?.len();
        if len < REGION_LEN {
            return Err(PersistError::TooSmall(len));
        }
        let mut best: Option<(u64, TransportState)> = None;
        let mut newest_seq = 0;
        for slot in 0..2 {
            let mut raw = vec![0u8; usize::try_from(SLOT_LEN).unwrap_or(4096)];
            file.read_exact_at(&mut raw, slot * SLOT_LEN)?;
            if let Some((seq, fp, state)) = parse_slot(&raw) {
                newest_seq = newest_seq.max(seq);
                if fp == fingerprint && best.as_ref().is_none_or(|(s, _)| seq > *s) {
                    best = Some((seq, state));
                }
            }
        }
        let region = Self {
            file,
            fingerprint,
            seq: newest_seq,
            buf: Vec::with_capacity(usize::try_from(SLOT_LEN).unwrap_or(4096)),
        };
        Ok((region, best.map(|(_, s)| s)))
    }

    /// Writes `state` as the newest record, into the slot the previous record is not in.
    pub fn write(&mut self, state: &TransportState) -> Result<(), PersistError> {
        if state.queues.len() > MAX_QUEUES {
            return Err(PersistError::TooLarge(state.queues.len()));
        }
        let seq = self.seq.wrapping_add(1);
        self.buf.clear();
        self.buf.resize(HEADER_LEN, 0);
        state.encode(&mut self.buf);
        let payload_len = u32::try_from(self.buf.len() - HEADER_LEN)
            .map_err(|_| PersistError::TooLarge(state.queues.len()))?;
        let (header, payload) = self.buf.split_at_mut(HEADER_LEN);
        header[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&payload_len.to_le_bytes());
        header[16..24].copy_from_slice(&seq.to_le_bytes());
        header[24..32].copy_from_slice(&self.fingerprint.to_le_bytes());
        let sum = fnv1a(&[&header[0..32], payload]);
        header[32..40].copy_from_slice(&sum.to_le_bytes());
        self.file.write_all_at(&self.buf, (seq % 2) * SLOT_LEN)?;
        self.seq = seq;
        Ok(())
    }
}

/// A slot's sequence, fingerprint and state, if it holds a whole record of this format.
fn parse_slot(raw: &[u8]) -> Option<(u64, u64, TransportState)> {
    let (header, rest) = raw.split_at_checked(HEADER_LEN)?;
    let mut r = Reader(header);
    let (magic, version, len) = (r.u64()?, r.u32()?, r.u32()?);
    let (seq, fp, sum) = (r.u64()?, r.u64()?, r.u64()?);
    if magic != MAGIC || version != VERSION {
        return None;
    }
    let payload = rest.get(..usize::try_from(len).ok()?)?;
    if fnv1a(&[&header[0..32], payload]) != sum {
        return None;
    }
    Some((seq, fp, TransportState::decode(payload)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region_file() -> File {
        let f = tempfile();
        f.set_len(REGION_LEN).unwrap();
        f
    }

    fn tempfile() -> File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "remio-persist-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    fn state(status: u32) -> TransportState {
        TransportState {
            status,
            driver_features: 1 << 32,
            config_generation: 2,
            queues: vec![
                QueueState {
                    size: 128,
                    ready: true,
                    desc: 0x1000,
                    driver: 0x2000,
                    device: 0x3000,
                },
                QueueState::default(),
            ],
            ..TransportState::default()
        }
    }

    #[test]
    fn a_record_written_is_read_back_by_the_next_process() {
        let file = region_file();
        let (mut r, none) = StateRegion::open(file.try_clone().unwrap(), 7).unwrap();
        assert_eq!(none, None);

        r.write(&state(0xf)).unwrap();
        drop(r);

        let (_, got) = StateRegion::open(file, 7).unwrap();
        assert_eq!(got, Some(state(0xf)));
    }

    #[test]
    fn the_newest_whole_record_wins_and_a_torn_one_is_ignored() {
        let file = region_file();
        let (mut r, _) = StateRegion::open(file.try_clone().unwrap(), 7).unwrap();
        r.write(&state(1)).unwrap(); // seq 1, slot 1
        r.write(&state(3)).unwrap(); // seq 2, slot 0
        assert_eq!(
            StateRegion::open(file.try_clone().unwrap(), 7).unwrap().1,
            Some(state(3))
        );

        // A kill in the middle of writing seq 3 (slot 1): half of it is new.
        r.write(&state(7)).unwrap();
        file.write_all_at(&[0xff; 8], SLOT_LEN + 48).unwrap();

        assert_eq!(StateRegion::open(file, 7).unwrap().1, Some(state(3)));
    }

    #[test]
    fn a_record_of_another_device_is_not_restored() {
        let file = region_file();
        let (mut r, _) = StateRegion::open(file.try_clone().unwrap(), 7).unwrap();
        r.write(&state(0xf)).unwrap();

        let (mut other, got) = StateRegion::open(file.try_clone().unwrap(), 8).unwrap();
        assert_eq!(got, None);
        // Its records go after the other device's, never over the newest whole one first.
        other.write(&state(1)).unwrap();
        assert_eq!(StateRegion::open(file, 8).unwrap().1, Some(state(1)));
    }

    #[test]
    fn garbage_is_no_record_and_a_small_region_is_refused() {
        let file = region_file();
        file.write_all_at(&[0x5a; 8192], 0).unwrap();
        assert_eq!(StateRegion::open(file, 7).unwrap().1, None);

        let small = tempfile();
        small.set_len(4096).unwrap();
        assert!(matches!(
            StateRegion::open(small, 7),
            Err(PersistError::TooSmall(4096))
        ));
    }

    #[test]
    fn fingerprints_differ_with_the_device() {
        let a = fingerprint(2, 1 << 32, &[128], 0xa000_0000);
        assert_ne!(a, fingerprint(4, 1 << 32, &[128], 0xa000_0000));
        assert_ne!(a, fingerprint(2, 1 << 33, &[128], 0xa000_0000));
        assert_ne!(a, fingerprint(2, 1 << 32, &[256], 0xa000_0000));
        assert_ne!(a, fingerprint(2, 1 << 32, &[128], 0xa000_0200));
    }
}
