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
//! | 24 | `u64` config fingerprint ([`fingerprint`]): a record of another device is not resumed |
//! | 32 | `u64` FNV-1a 64 checksum of bytes 0..32 and of the payload |
//! | 40 | the payload, `n` bytes: a [`TransportState`] |
//!
//! Version 2 appends the `u32` device type (the virtio device ID of the device that wrote the
//! record) to the payload, so that a device model finding a record of another configuration
//! can still fail the guest's requests in that device's terms; a version-1 record is read as
//! before, its device type unknown (0).
//!
//! # What [`StateRegion::open`] finds
//!
//! Only the newest whole record counts (a torn newer slot is ignored, as a kill in the middle
//! of a write leaves it; an older record is never resumed over a newer one of another
//! device). It is [`Found::Blank`] when no record was ever written (both slots all zero), a
//! [`Found::Record`] to resume when it is this device's (its fingerprint, or one of an earlier
//! version the device declares it resumes), and [`Found::Unusable`] otherwise: a
//! record of another fingerprint or queue count (its state kept, for a failover), or no whole
//! record though a slot holds something (corrupt).
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
/// The format version this code writes (it reads this one and [`VERSION_1`]).
pub const VERSION: u32 = 2;
/// The first format: no device type in the payload.
pub const VERSION_1: u32 = 1;
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
    /// The virtio device ID of the device that wrote the record (0: unknown, a version-1
    /// record).
    pub device_type: u32,
}

/// Why a record in the region cannot be resumed by this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    /// A whole record of another fingerprint: another device, features, queue sizes or window.
    #[error("state record of another configuration")]
    OtherConfig,
    /// A whole record of this fingerprint but another number of queues.
    #[error("state record of {recorded} queues, this device has {expected}")]
    OtherQueueCount {
        /// Queues in the record.
        recorded: usize,
        /// Queues of this device.
        expected: usize,
    },
    /// No whole record, though the region is not blank: both slots fail their checks.
    #[error("corrupt state record")]
    Corrupt,
}

/// What [`StateRegion::open`] found (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing was ever written: a first start.
    Blank,
    /// The newest whole record, of this device: resume from it.
    Record(TransportState),
    /// Something this device cannot resume from, with the record when there is a whole one
    /// (what a failover needs: status, queues, the old device type).
    Unusable {
        /// Why.
        reason: Unusable,
        /// The record, if whole.
        state: Option<TransportState>,
    },
}

impl TransportState {
    /// Version 2's payload (version 1's followed by the device type).
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
        out.extend_from_slice(&self.device_type.to_le_bytes());
    }

    fn decode(b: &[u8], version: u32) -> Option<Self> {
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
        let device_type = if version == VERSION_1 { 0 } else { r.u32()? };
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
            device_type,
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
/// (a changed config) is not resumed ([`Unusable::OtherConfig`]).
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
    /// A region over `file` (at least [`REGION_LEN`] bytes) for the device of `fingerprint`
    /// with `queues` queues, and what the region holds (see the module docs): the newest whole
    /// record decides; a torn slot beside it is ignored. A record of one of the `earlier`
    /// fingerprints (an earlier version of the device this one can resume) is this device's
    /// too; records written from now on carry `fingerprint`.
    pub fn open(
        file: File,
        fingerprint: u64,
        earlier: &[u64],
        queues: usize,
    ) -> Result<(Self, Found), PersistError> {
        let len = file.metadata()?.len();
        if len < REGION_LEN {
            return Err(PersistError::TooSmall(len));
        }
        let mut newest: Option<(u64, u64, TransportState)> = None;
        let mut blank = true;
        for slot in 0..2 {
            let mut raw = vec![0u8; usize::try_from(SLOT_LEN).unwrap_or(4096)];
            file.read_exact_at(&mut raw, slot * SLOT_LEN)?;
            blank &= raw.iter().all(|&b| b == 0);
            if let Some((seq, fp, state)) = parse_slot(&raw) {
                if newest.as_ref().is_none_or(|(s, _, _)| seq > *s) {
                    newest = Some((seq, fp, state));
                }
            }
        }
        let seq = newest.as_ref().map_or(0, |(s, _, _)| *s);
        let found = match newest {
            None if blank => Found::Blank,
            None => Found::Unusable {
                reason: Unusable::Corrupt,
                state: None,
            },
            Some((_, fp, state)) if fp != fingerprint && !earlier.contains(&fp) => {
                Found::Unusable {
                    reason: Unusable::OtherConfig,
                    state: Some(state),
                }
            }
            Some((_, _, state)) if state.queues.len() != queues => Found::Unusable {
                reason: Unusable::OtherQueueCount {
                    recorded: state.queues.len(),
                    expected: queues,
                },
                state: Some(state),
            },
            Some((_, _, state)) => Found::Record(state),
        };
        let region = Self {
            file,
            fingerprint,
            seq,
            buf: Vec::with_capacity(usize::try_from(SLOT_LEN).unwrap_or(4096)),
        };
        Ok((region, found))
    }

    /// The region's file, for the `crash-points` test hook ([`make_foreign`]).
    #[cfg(feature = "crash-points")]
    pub(crate) fn file(&self) -> &File {
        &self.file
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
    if magic != MAGIC || !(version == VERSION || version == VERSION_1) {
        return None;
    }
    let payload = rest.get(..usize::try_from(len).ok()?)?;
    if fnv1a(&[&header[0..32], payload]) != sum {
        return None;
    }
    Some((seq, fp, TransportState::decode(payload, version)?))
}

/// Test hook (the `crash-points` feature): rewrites every whole record in `file` as one of
/// another configuration (its fingerprint changed, its checksum recomputed), as an upgrade to
/// another config would leave the region for the next device model.
#[cfg(feature = "crash-points")]
pub(crate) fn make_foreign(file: &File) -> io::Result<()> {
    for slot in 0..2 {
        let mut raw = vec![0u8; usize::try_from(SLOT_LEN).unwrap_or(4096)];
        file.read_exact_at(&mut raw, slot * SLOT_LEN)?;
        let Some((_, fp, _)) = parse_slot(&raw) else {
            continue;
        };
        let len = raw
            .get(12..16)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_le_bytes);
        let end = HEADER_LEN + usize::try_from(len).unwrap_or(0);
        raw[24..32].copy_from_slice(&(!fp).to_le_bytes());
        let (header, rest) = raw.split_at_mut(HEADER_LEN);
        let payload = rest.get(..end - HEADER_LEN).unwrap_or(&[]);
        let sum = fnv1a(&[&header[0..32], payload]);
        header[32..40].copy_from_slice(&sum.to_le_bytes());
        file.write_all_at(&raw[..end], slot * SLOT_LEN)?;
    }
    Ok(())
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
            device_type: 2,
            ..TransportState::default()
        }
    }

    fn open(file: &File, fp: u64) -> (StateRegion, Found) {
        StateRegion::open(file.try_clone().unwrap(), fp, &[], 2).unwrap()
    }

    #[test]
    fn a_record_written_is_read_back_by_the_next_process() {
        let file = region_file();
        let (mut r, blank) = open(&file, 7);
        assert_eq!(blank, Found::Blank);

        r.write(&state(0xf)).unwrap();
        drop(r);

        assert_eq!(open(&file, 7).1, Found::Record(state(0xf)));
    }

    #[test]
    fn the_newest_whole_record_wins_and_a_torn_one_is_ignored() {
        let file = region_file();
        let (mut r, _) = open(&file, 7);
        r.write(&state(1)).unwrap(); // seq 1, slot 1
        r.write(&state(3)).unwrap(); // seq 2, slot 0
        assert_eq!(open(&file, 7).1, Found::Record(state(3)));

        // A kill in the middle of writing seq 3 (slot 1): half of it is new.
        r.write(&state(7)).unwrap();
        file.write_all_at(&[0xff; 8], SLOT_LEN + 48).unwrap();

        assert_eq!(open(&file, 7).1, Found::Record(state(3)));
    }

    #[test]
    fn a_record_of_an_earlier_version_is_resumed_and_rewritten_as_this_ones() {
        let file = region_file();
        let (mut r, _) = open(&file, 7);
        r.write(&state(0xf)).unwrap();

        let (mut upgraded, got) =
            StateRegion::open(file.try_clone().unwrap(), 8, &[6, 7], 2).unwrap();

        assert_eq!(got, Found::Record(state(0xf)));
        upgraded.write(&state(1)).unwrap();
        assert_eq!(
            open(&file, 8).1,
            Found::Record(state(1)),
            "now a record of 8"
        );
    }

    #[test]
    fn a_record_of_another_device_is_unusable_and_kept_for_a_failover() {
        let file = region_file();
        let (mut r, _) = open(&file, 7);
        r.write(&state(0xf)).unwrap();

        let (mut other, got) = open(&file, 8);

        assert_eq!(
            got,
            Found::Unusable {
                reason: Unusable::OtherConfig,
                state: Some(state(0xf)),
            }
        );
        // Its records go after the other device's, never over the newest whole one first.
        other.write(&state(1)).unwrap();
        assert_eq!(open(&file, 8).1, Found::Record(state(1)));
    }

    #[test]
    fn an_older_record_of_this_device_is_not_resumed_over_a_newer_one_of_another() {
        let file = region_file();
        let (mut mine, _) = open(&file, 7);
        mine.write(&state(0xf)).unwrap(); // seq 1, slot 1
        let (mut theirs, _) = open(&file, 8);
        theirs.write(&state(0xf)).unwrap(); // seq 2, slot 0

        let (_, got) = open(&file, 7);

        assert!(
            matches!(
                got,
                Found::Unusable {
                    reason: Unusable::OtherConfig,
                    ..
                }
            ),
            "{got:?}"
        );
    }

    #[test]
    fn a_record_of_another_queue_count_is_unusable() {
        let file = region_file();
        let (mut r, _) = open(&file, 7);
        r.write(&state(0xf)).unwrap();

        let (_, got) = StateRegion::open(file, 7, &[], 3).unwrap();

        assert_eq!(
            got,
            Found::Unusable {
                reason: Unusable::OtherQueueCount {
                    recorded: 2,
                    expected: 3
                },
                state: Some(state(0xf)),
            }
        );
    }

    #[test]
    fn garbage_is_a_corrupt_record_not_a_blank_region_and_a_small_region_is_refused() {
        let file = region_file();
        file.write_all_at(&[0x5a; 8192], 0).unwrap();
        assert_eq!(
            open(&file, 7).1,
            Found::Unusable {
                reason: Unusable::Corrupt,
                state: None
            }
        );
        // One byte anywhere is enough to be no longer blank.
        let one = region_file();
        one.write_all_at(&[1], SLOT_LEN + 100).unwrap();
        assert_eq!(
            open(&one, 7).1,
            Found::Unusable {
                reason: Unusable::Corrupt,
                state: None
            }
        );

        let small = tempfile();
        small.set_len(4096).unwrap();
        assert!(matches!(
            StateRegion::open(small, 7, &[], 2),
            Err(PersistError::TooSmall(4096))
        ));
    }

    #[test]
    fn a_version_1_record_is_read_with_its_device_type_unknown() {
        let file = region_file();
        let mut v1 = state(0xf);
        v1.device_type = 0;
        let mut payload = Vec::new();
        v1.encode(&mut payload);
        payload.truncate(payload.len() - 4); // version 1 had no device type
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC.to_le_bytes());
        header.extend_from_slice(&VERSION_1.to_le_bytes());
        header.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        header.extend_from_slice(&1u64.to_le_bytes());
        header.extend_from_slice(&7u64.to_le_bytes());
        let sum = fnv1a(&[&header, &payload]);
        header.extend_from_slice(&sum.to_le_bytes());
        header.extend_from_slice(&payload);
        file.write_all_at(&header, SLOT_LEN).unwrap();

        assert_eq!(open(&file, 7).1, Found::Record(v1));
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
