//! The socket protocol's messages, as pure encode/decode functions (fuzzed by `fuzz/api_wire`).
//!
//! # Transport
//!
//! A `SOCK_SEQPACKET` UNIX socket: every message is one packet, so a message's length is the
//! packet's length and file descriptors travel with exactly the packet they belong to
//! (`SCM_RIGHTS`). One connection is one DM session.
//!
//! # Header (16 bytes, little endian)
//!
//! | offset | size | field | value |
//! | --- | --- | --- | --- |
//! | 0 | u16 | magic | [`MAGIC`] (`0x5249`, bytes `49 52`, "IR") |
//! | 2 | u8 | version | [`VERSION`] (1) |
//! | 3 | u8 | nfds | number of fds attached by `SCM_RIGHTS`; must equal the count received |
//! | 4 | u16 | opcode | below; a reply carries the request's opcode with [`REPLY`] (0x80) set |
//! | 6 | u16 | flags | 0 (reserved) |
//! | 8 | u32 | tag | chosen by the client, echoed by the reply; tags in flight must differ |
//! | 12 | i32 | status | 0 in requests; in replies 0 or a positive Linux errno |
//!
//! The payload follows the header; its length is the packet length minus 16. The largest
//! message is [`MAX_MESSAGE`] (64) bytes; at most [`MAX_FDS`] (1) fd is attached.
//!
//! # Opcodes
//!
//! | op | name | request payload | fds | success reply payload | fds |
//! | --- | --- | --- | --- | --- | --- |
//! | 1 | OPEN | `dm_id: u32, reserved: u32 (0)` | 0 | `bao_dm_info` (32 bytes, `fd` = -1) | 0 |
//! | 2 | ATTACH | — | 0 | `bao_virtio_request` (48) | 0 |
//! | 3 | COMPLETE | `bao_virtio_request` (48) | 0 | — | 0 |
//! | 4 | COMPLETE_ATTACH | `bao_virtio_request` (48) | 0 | `bao_virtio_request` (48) | 0 |
//! | 5 | IOEVENTFD | `bao_ioeventfd` (32; its `fd` field is ignored, send 0) | 1 eventfd | — | 0 |
//! | 6 | IRQFD | `bao_irqfd` (8; its `fd` field is ignored, send 0; `flags` may add [`IRQFD_FLAG_USED_BUFFER`]) | 1 eventfd | — | 0 |
//! | 7 | MAP_SHMEM | `len: u64` | 0 | `offset: u64, len: u64` | 1 (the shmem file) |
//! | 8 | STATUS_WORD | `status_addr: u64, ack_addr: u64` | 0 | — | 1 (the status-word file) |
//! | 9 | STATE_REGION | `len: u64` | 0 | — | 1 (the DM's state-region file) |
//!
//! The structs are the driver's UAPI layouts (`spec/remote-io.md`), encoded field by field
//! ([`remio_abi::uapi::WireStruct`]). OPEN must be the first message and is accepted once.
//! The reply to MAP_SHMEM carries a file to `mmap` at `offset` for `len` bytes, placed at the
//! DM's `shmem_addr`. COMPLETE_ATTACH whose completion fails is answered with the completion's
//! errno and no attach is made. The reply to STATUS_WORD carries the file whose first 4 bytes
//! are the session's status word ([`crate::statusword`]); the client maps it shared. Its
//! errnos are those of [`crate::DmSession::register_status_word`]. The reply to STATE_REGION
//! carries the DM's state region ([`crate::DmSession::state_region`]), the same file for every
//! session of the DM.
//!
//! # Errors
//!
//! A failed request is answered with `status` = errno, no payload and no fds. Each errno is the
//! one [`crate::ApiError::errno`] documents; in addition the protocol itself answers:
//!
//! | condition | errno |
//! | --- | --- |
//! | unknown opcode (or a reply opcode sent as a request) | `ENOTTY` |
//! | wrong payload length for the opcode, nonzero `flags`/`status`/reserved field, packet longer than [`MAX_MESSAGE`] | `EINVAL` |
//! | fd count not the opcode's, `nfds` not the count received, or an fd that is not an eventfd | `EBADF` |
//! | OPEN twice, or any other request before OPEN | `EPROTO` |
//! | more than [`MAX_IN_FLIGHT`] ATTACH waiting on one connection | `EBUSY` |
//!
//! A packet shorter than the header, or with a wrong magic or version, is a corrupt stream:
//! the server logs one line and closes the connection (its session ends as on disconnect).
//!
//! # Limits
//!
//! [`MAX_MESSAGE`] bytes a packet, [`MAX_FDS`] fd a packet, [`MAX_IN_FLIGHT`] requests in
//! flight per connection (the client never has more; the server refuses more waiting ATTACHes).

use remio_abi::uapi::WireStruct;
use remio_abi::{DmInfo, Ioeventfd, Irqfd, VirtioRequest};

/// Header magic.
pub const MAGIC: u16 = 0x5249;
/// Protocol version.
pub const VERSION: u8 = 1;
/// Header size.
pub const HEADER_SIZE: usize = 16;
/// The largest message: a header and a `bao_virtio_request`.
pub const MAX_MESSAGE: usize = HEADER_SIZE + VirtioRequest::SIZE;
/// The most fds one message carries.
pub const MAX_FDS: usize = 1;
/// Requests in flight per connection: the driver's `BAO_IO_REQUEST_MAX`.
pub const MAX_IN_FLIGHT: usize = remio_abi::uapi::BAO_IO_REQUEST_MAX;
/// Set in the opcode of a reply.
pub const REPLY: u16 = 0x80;

/// Opcodes.
pub mod op {
    /// Open the session on a DM.
    pub const OPEN: u16 = 1;
    /// Wait for a request.
    pub const ATTACH: u16 = 2;
    /// Complete a request.
    pub const COMPLETE: u16 = 3;
    /// Complete a request, then wait for the next one.
    pub const COMPLETE_ATTACH: u16 = 4;
    /// (De)assign an ioeventfd.
    pub const IOEVENTFD: u16 = 5;
    /// (De)assign an irqfd.
    pub const IRQFD: u16 = 6;
    /// Get the shared-memory file.
    pub const MAP_SHMEM: u16 = 7;
    /// Register the session's status word and get its file.
    pub const STATUS_WORD: u16 = 8;
    /// Get the DM's state region.
    pub const STATE_REGION: u16 = 9;
}

/// remio's extension of the IRQFD flags (not the driver's; a bit Bao's UAPI leaves unused):
/// the irqfd sets InterruptStatus bit 0 in the session's status word before each injection
/// ([`crate::DmSession::assign_used_buffer_irqfd`]). Not with DEASSIGN.
pub const IRQFD_FLAG_USED_BUFFER: u32 = 1 << 16;

/// A message header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Fds attached.
    pub nfds: u8,
    /// Opcode (with [`REPLY`] in replies).
    pub opcode: u16,
    /// Reserved, 0.
    pub flags: u16,
    /// Request tag.
    pub tag: u32,
    /// 0 or an errno (replies only).
    pub status: i32,
}

impl Header {
    /// Writes the header into the first [`HEADER_SIZE`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8; HEADER_SIZE]) {
        out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        out[2] = VERSION;
        out[3] = self.nfds;
        out[4..6].copy_from_slice(&self.opcode.to_le_bytes());
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..12].copy_from_slice(&self.tag.to_le_bytes());
        out[12..16].copy_from_slice(&self.status.to_le_bytes());
    }

    /// Reads a header; `None` if `b` is shorter than a header or magic/version are wrong.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let h = b.get(..HEADER_SIZE)?;
        let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        if u16_at(0) != MAGIC || h[2] != VERSION {
            return None;
        }
        Some(Self {
            nfds: h[3],
            opcode: u16_at(4),
            flags: u16_at(6),
            tag: u32_at(8),
            status: i32::from_le_bytes(u32_at(12).to_le_bytes()),
        })
    }
}

/// A decoded request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// OPEN.
    Open {
        /// The DM.
        dm_id: u32,
    },
    /// ATTACH.
    Attach,
    /// COMPLETE.
    Complete(VirtioRequest),
    /// COMPLETE_ATTACH.
    CompleteAttach(VirtioRequest),
    /// IOEVENTFD (the eventfd is the one fd received).
    Ioeventfd(Ioeventfd),
    /// IRQFD (the eventfd is the one fd received).
    Irqfd(Irqfd),
    /// MAP_SHMEM.
    MapShmem {
        /// Bytes to map.
        len: u64,
    },
    /// STATUS_WORD.
    StatusWord {
        /// The InterruptStatus register.
        status_addr: u64,
        /// The InterruptACK register.
        ack_addr: u64,
    },
    /// STATE_REGION.
    StateRegion {
        /// Bytes wanted.
        len: u64,
    },
}

impl Request {
    /// The opcode.
    pub fn opcode(&self) -> u16 {
        match self {
            Self::Open { .. } => op::OPEN,
            Self::Attach => op::ATTACH,
            Self::Complete(_) => op::COMPLETE,
            Self::CompleteAttach(_) => op::COMPLETE_ATTACH,
            Self::Ioeventfd(_) => op::IOEVENTFD,
            Self::Irqfd(_) => op::IRQFD,
            Self::MapShmem { .. } => op::MAP_SHMEM,
            Self::StatusWord { .. } => op::STATUS_WORD,
            Self::StateRegion { .. } => op::STATE_REGION,
        }
    }

    /// The number of fds this request carries.
    pub fn nfds(&self) -> u8 {
        u8::from(matches!(self, Self::Ioeventfd(_) | Self::Irqfd(_)))
    }

    /// Encodes the request with `tag` into `out` (cleared first).
    pub fn encode(&self, tag: u32, out: &mut Vec<u8>) {
        out.clear();
        let mut h = [0u8; HEADER_SIZE];
        Header {
            nfds: self.nfds(),
            opcode: self.opcode(),
            flags: 0,
            tag,
            status: 0,
        }
        .encode(&mut h);
        out.extend_from_slice(&h);
        match self {
            Self::Open { dm_id } => {
                out.extend_from_slice(&dm_id.to_le_bytes());
                out.extend_from_slice(&0u32.to_le_bytes());
            }
            Self::Attach => {}
            Self::Complete(r) | Self::CompleteAttach(r) => r.encode(out),
            Self::Ioeventfd(i) => i.encode(out),
            Self::Irqfd(i) => i.encode(out),
            Self::MapShmem { len } | Self::StateRegion { len } => {
                out.extend_from_slice(&len.to_le_bytes());
            }
            Self::StatusWord {
                status_addr,
                ack_addr,
            } => {
                out.extend_from_slice(&status_addr.to_le_bytes());
                out.extend_from_slice(&ack_addr.to_le_bytes());
            }
        }
    }
}

/// The payload of a successful reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyBody {
    /// No payload (COMPLETE, IOEVENTFD, IRQFD).
    Empty,
    /// OPEN's DM info.
    Info(DmInfo),
    /// A request (ATTACH, COMPLETE_ATTACH).
    Request(VirtioRequest),
    /// MAP_SHMEM: the attached file's offset and length to map.
    Shmem {
        /// File offset of the shared memory.
        offset: u64,
        /// Bytes to map.
        len: u64,
    },
    /// STATUS_WORD: no payload; the attached file holds the word at offset 0.
    StatusWord,
    /// STATE_REGION: no payload; the attached file is the region.
    StateRegion,
}

impl ReplyBody {
    fn nfds(&self) -> u8 {
        u8::from(matches!(
            self,
            Self::Shmem { .. } | Self::StatusWord | Self::StateRegion
        ))
    }
}

/// Encodes a reply to the request `opcode` with `tag`: `Ok(body)` or `Err(errno)`.
pub fn encode_reply(opcode: u16, tag: u32, reply: Result<&ReplyBody, i32>, out: &mut Vec<u8>) {
    out.clear();
    let mut h = [0u8; HEADER_SIZE];
    let (nfds, status) = match reply {
        Ok(b) => (b.nfds(), 0),
        Err(e) => (0, e),
    };
    Header {
        nfds,
        opcode: opcode | REPLY,
        flags: 0,
        tag,
        status,
    }
    .encode(&mut h);
    out.extend_from_slice(&h);
    match reply {
        Ok(ReplyBody::Empty | ReplyBody::StatusWord | ReplyBody::StateRegion) | Err(_) => {}
        Ok(ReplyBody::Info(i)) => i.encode(out),
        Ok(ReplyBody::Request(r)) => r.encode(out),
        Ok(ReplyBody::Shmem { offset, len }) => {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
    }
}

/// Why a message does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than a header, or wrong magic or version: the stream is corrupt.
    #[error("corrupt message header")]
    Corrupt,
    /// Unknown opcode.
    #[error("unknown opcode {opcode:#x}")]
    UnknownOpcode {
        /// The tag to answer.
        tag: u32,
        /// The opcode.
        opcode: u16,
    },
    /// Wrong payload length, reserved field set, or too long.
    #[error("malformed payload for opcode {opcode:#x}")]
    Malformed {
        /// The tag to answer.
        tag: u32,
        /// The opcode.
        opcode: u16,
    },
    /// Wrong number of fds.
    #[error("wrong fd count for opcode {opcode:#x}")]
    FdCount {
        /// The tag to answer.
        tag: u32,
        /// The opcode.
        opcode: u16,
    },
}

impl WireError {
    /// The `(opcode, tag, errno)` of the error reply, or `None` when the connection must close.
    pub fn reply(&self) -> Option<(u16, u32, i32)> {
        match *self {
            Self::Corrupt => None,
            Self::UnknownOpcode { tag, opcode } => Some((opcode, tag, libc::ENOTTY)),
            Self::Malformed { tag, opcode } => Some((opcode, tag, libc::EINVAL)),
            Self::FdCount { tag, opcode } => Some((opcode, tag, libc::EBADF)),
        }
    }
}

/// Decodes a request packet `msg` that arrived with `fds_received` file descriptors.
///
/// Pure: it never fails other than by [`WireError`], whatever the bytes.
pub fn decode_request(msg: &[u8], fds_received: usize) -> Result<(u32, Request), WireError> {
    let h = Header::decode(msg).ok_or(WireError::Corrupt)?;
    let (tag, opcode) = (h.tag, h.opcode);
    let payload = &msg[HEADER_SIZE..];
    let malformed = WireError::Malformed { tag, opcode };
    let req = match opcode {
        op::OPEN => {
            let b: [u8; 8] = payload.try_into().map_err(|_| malformed)?;
            let dm_id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if b[4..] != [0; 4] {
                return Err(malformed);
            }
            Request::Open { dm_id }
        }
        op::ATTACH if payload.is_empty() => Request::Attach,
        op::COMPLETE => Request::Complete(VirtioRequest::decode(payload).ok_or(malformed)?),
        op::COMPLETE_ATTACH => {
            Request::CompleteAttach(VirtioRequest::decode(payload).ok_or(malformed)?)
        }
        op::IOEVENTFD => Request::Ioeventfd(Ioeventfd::decode(payload).ok_or(malformed)?),
        op::IRQFD => Request::Irqfd(Irqfd::decode(payload).ok_or(malformed)?),
        op::MAP_SHMEM => {
            let b: [u8; 8] = payload.try_into().map_err(|_| malformed)?;
            Request::MapShmem {
                len: u64::from_le_bytes(b),
            }
        }
        op::STATE_REGION => {
            let b: [u8; 8] = payload.try_into().map_err(|_| malformed)?;
            Request::StateRegion {
                len: u64::from_le_bytes(b),
            }
        }
        op::STATUS_WORD => {
            let b: [u8; 16] = payload.try_into().map_err(|_| malformed)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[..8]);
            let status_addr = u64::from_le_bytes(a);
            a.copy_from_slice(&b[8..]);
            Request::StatusWord {
                status_addr,
                ack_addr: u64::from_le_bytes(a),
            }
        }
        op::ATTACH => return Err(malformed),
        _ => return Err(WireError::UnknownOpcode { tag, opcode }),
    };
    if h.flags != 0 || h.status != 0 || msg.len() > MAX_MESSAGE {
        return Err(malformed);
    }
    if usize::from(h.nfds) != fds_received || h.nfds != req.nfds() {
        return Err(WireError::FdCount { tag, opcode });
    }
    Ok((tag, req))
}

/// A decoded reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The request opcode it answers (without [`REPLY`]).
    pub opcode: u16,
    /// The request's tag.
    pub tag: u32,
    /// The payload, or the errno.
    pub result: Result<ReplyBody, i32>,
}

/// Decodes a reply packet `msg` that arrived with `fds_received` file descriptors.
///
/// Pure: it never fails other than by [`WireError`], whatever the bytes. Any malformed reply
/// is [`WireError::Corrupt`] for the client: the server is trusted to speak the protocol, and
/// a client that cannot parse a reply cannot know which waiter it was for.
pub fn decode_reply(msg: &[u8], fds_received: usize) -> Result<Reply, WireError> {
    let h = Header::decode(msg).ok_or(WireError::Corrupt)?;
    if h.opcode & REPLY == 0 || h.flags != 0 || usize::from(h.nfds) != fds_received {
        return Err(WireError::Corrupt);
    }
    let opcode = h.opcode & !REPLY;
    let payload = &msg[HEADER_SIZE..];
    if h.status != 0 {
        if !payload.is_empty() || h.nfds != 0 || h.status < 0 {
            return Err(WireError::Corrupt);
        }
        return Ok(Reply {
            opcode,
            tag: h.tag,
            result: Err(h.status),
        });
    }
    let body = match opcode {
        op::OPEN => ReplyBody::Info(DmInfo::decode(payload).ok_or(WireError::Corrupt)?),
        op::ATTACH | op::COMPLETE_ATTACH => {
            ReplyBody::Request(VirtioRequest::decode(payload).ok_or(WireError::Corrupt)?)
        }
        op::COMPLETE | op::IOEVENTFD | op::IRQFD if payload.is_empty() => ReplyBody::Empty,
        op::STATUS_WORD if payload.is_empty() => ReplyBody::StatusWord,
        op::STATE_REGION if payload.is_empty() => ReplyBody::StateRegion,
        op::MAP_SHMEM if payload.len() == 16 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&payload[..8]);
            let offset = u64::from_le_bytes(a);
            a.copy_from_slice(&payload[8..]);
            ReplyBody::Shmem {
                offset,
                len: u64::from_le_bytes(a),
            }
        }
        _ => return Err(WireError::Corrupt),
    };
    if h.nfds != body.nfds() {
        return Err(WireError::Corrupt);
    }
    Ok(Reply {
        opcode,
        tag: h.tag,
        result: Ok(body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_request() -> VirtioRequest {
        VirtioRequest {
            dm_id: 2,
            addr: 0xa000_0070,
            op: remio_abi::uapi::BAO_IO_READ,
            value: 0,
            access_width: 4,
            request_id: 5,
        }
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Open { dm_id: 3 },
            Request::Attach,
            Request::Complete(sample_request()),
            Request::CompleteAttach(sample_request()),
            Request::Ioeventfd(Ioeventfd {
                fd: 0,
                flags: remio_abi::uapi::BAO_IOEVENTFD_FLAG_DATAMATCH,
                addr: 0xa000_0050,
                len: 4,
                reserved: 0,
                data: 1,
            }),
            Request::Irqfd(Irqfd { fd: 0, flags: 1 }),
            Request::MapShmem { len: 4096 },
            Request::StatusWord {
                status_addr: 0xa000_0060,
                ack_addr: 0xa000_0064,
            },
        ]
    }

    #[test]
    fn every_request_roundtrips_and_fits_the_limit() {
        let mut buf = Vec::new();
        for (i, req) in all_requests().into_iter().enumerate() {
            let tag = u32::try_from(i).unwrap() + 100;
            req.encode(tag, &mut buf);
            assert!(buf.len() <= MAX_MESSAGE);
            assert_eq!(
                decode_request(&buf, usize::from(req.nfds())),
                Ok((tag, req))
            );
        }
    }

    #[test]
    fn every_reply_roundtrips() {
        let bodies = [
            (
                op::OPEN,
                ReplyBody::Info(DmInfo {
                    id: 1,
                    fd: -1,
                    ..Default::default()
                }),
            ),
            (op::ATTACH, ReplyBody::Request(sample_request())),
            (op::COMPLETE_ATTACH, ReplyBody::Request(sample_request())),
            (op::COMPLETE, ReplyBody::Empty),
            (op::IOEVENTFD, ReplyBody::Empty),
            (op::IRQFD, ReplyBody::Empty),
            (
                op::MAP_SHMEM,
                ReplyBody::Shmem {
                    offset: 0,
                    len: 1 << 20,
                },
            ),
            (op::STATUS_WORD, ReplyBody::StatusWord),
        ];
        let mut buf = Vec::new();
        for (opcode, body) in bodies {
            encode_reply(opcode, 9, Ok(&body), &mut buf);
            assert!(buf.len() <= MAX_MESSAGE);
            let r = decode_reply(&buf, usize::from(body.nfds())).unwrap();
            assert_eq!(
                r,
                Reply {
                    opcode,
                    tag: 9,
                    result: Ok(body)
                }
            );
            encode_reply(opcode, 10, Err(libc::EPERM), &mut buf);
            let r = decode_reply(&buf, 0).unwrap();
            assert_eq!(r.result, Err(libc::EPERM));
        }
    }

    #[test]
    fn short_or_foreign_packets_are_corrupt() {
        let mut buf = Vec::new();
        Request::Attach.encode(1, &mut buf);
        assert_eq!(decode_request(&buf[..15], 0), Err(WireError::Corrupt));
        assert_eq!(decode_request(&[], 0), Err(WireError::Corrupt));
        let mut bad_magic = buf.clone();
        bad_magic[0] ^= 1;
        assert_eq!(decode_request(&bad_magic, 0), Err(WireError::Corrupt));
        let mut bad_version = buf.clone();
        bad_version[2] = 2;
        assert_eq!(decode_request(&bad_version, 0), Err(WireError::Corrupt));
        assert_eq!(WireError::Corrupt.reply(), None);
    }

    #[test]
    fn unknown_opcodes_are_enotty_with_the_tag() {
        let mut buf = Vec::new();
        Request::Attach.encode(77, &mut buf);
        buf[4] = 0x42;
        let e = decode_request(&buf, 0).unwrap_err();
        assert_eq!(e.reply(), Some((0x42, 77, libc::ENOTTY)));
        // A reply opcode is not a request.
        buf[4] = 0x82;
        assert_eq!(
            decode_request(&buf, 0).unwrap_err().reply().map(|r| r.2),
            Some(libc::ENOTTY)
        );
    }

    #[test]
    fn wrong_lengths_and_reserved_bits_are_einval() {
        let mut buf = Vec::new();
        Request::Complete(sample_request()).encode(5, &mut buf);
        let e = decode_request(&buf[..buf.len() - 1], 0).unwrap_err();
        assert_eq!(e.reply(), Some((op::COMPLETE, 5, libc::EINVAL)));
        let mut long = buf.clone();
        long.push(0);
        assert_eq!(
            decode_request(&long, 0).unwrap_err().reply().map(|r| r.2),
            Some(libc::EINVAL)
        );
        let mut flags = buf.clone();
        flags[6] = 1;
        assert_eq!(
            decode_request(&flags, 0).unwrap_err().reply().map(|r| r.2),
            Some(libc::EINVAL)
        );
        Request::Attach.encode(5, &mut buf);
        buf.push(0);
        assert_eq!(
            decode_request(&buf, 0).unwrap_err().reply().map(|r| r.2),
            Some(libc::EINVAL)
        );
        Request::Open { dm_id: 1 }.encode(5, &mut buf);
        buf[HEADER_SIZE + 4] = 1;
        assert_eq!(
            decode_request(&buf, 0).unwrap_err().reply().map(|r| r.2),
            Some(libc::EINVAL)
        );
    }

    #[test]
    fn fd_count_mismatches_are_ebadf() {
        let mut buf = Vec::new();
        Request::Irqfd(Irqfd::default()).encode(3, &mut buf);
        // Header says 1, none received.
        assert_eq!(
            decode_request(&buf, 0).unwrap_err().reply(),
            Some((op::IRQFD, 3, libc::EBADF))
        );
        // Header says 0, opcode needs 1.
        buf[3] = 0;
        assert_eq!(
            decode_request(&buf, 0).unwrap_err().reply().map(|r| r.2),
            Some(libc::EBADF)
        );
        // An fd where none belongs.
        Request::Attach.encode(3, &mut buf);
        assert_eq!(
            decode_request(&buf, 1).unwrap_err().reply().map(|r| r.2),
            Some(libc::EBADF)
        );
    }

    #[test]
    fn status_word_needs_both_addresses_and_its_reply_the_file() {
        let mut buf = Vec::new();
        Request::StatusWord {
            status_addr: 0x60,
            ack_addr: 0x64,
        }
        .encode(7, &mut buf);
        assert_eq!(
            decode_request(&buf[..buf.len() - 8], 0)
                .unwrap_err()
                .reply(),
            Some((op::STATUS_WORD, 7, libc::EINVAL))
        );
        encode_reply(op::STATUS_WORD, 7, Ok(&ReplyBody::StatusWord), &mut buf);
        assert_eq!(buf[3], 1, "the reply announces the file");
        assert_eq!(decode_reply(&buf, 0), Err(WireError::Corrupt));
        buf[3] = 0;
        assert_eq!(decode_reply(&buf, 0), Err(WireError::Corrupt));
    }

    #[test]
    fn malformed_replies_are_corrupt() {
        let mut buf = Vec::new();
        encode_reply(
            op::ATTACH,
            1,
            Ok(&ReplyBody::Request(sample_request())),
            &mut buf,
        );
        assert_eq!(
            decode_reply(&buf[..buf.len() - 1], 0),
            Err(WireError::Corrupt)
        );
        assert_eq!(decode_reply(&buf, 1), Err(WireError::Corrupt));
        // A request is not a reply.
        Request::Attach.encode(1, &mut buf);
        assert_eq!(decode_reply(&buf, 0), Err(WireError::Corrupt));
        // A negative errno is not an errno.
        encode_reply(op::ATTACH, 1, Err(-1), &mut buf);
        assert_eq!(decode_reply(&buf, 0), Err(WireError::Corrupt));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        // A deterministic sweep of short packets with a valid header prefix; the fuzz target
        // covers the rest.
        let mut buf = Vec::new();
        for opcode in 0..=0x90u16 {
            for len in 0..=MAX_MESSAGE + 1 {
                for fds in 0..=2 {
                    Request::Attach.encode(1, &mut buf);
                    buf[4..6].copy_from_slice(&opcode.to_le_bytes());
                    buf.resize(len.max(HEADER_SIZE), 0xa5);
                    buf.truncate(len);
                    let _ = decode_request(&buf, fds);
                    let _ = decode_reply(&buf, fds);
                }
            }
        }
    }
}
