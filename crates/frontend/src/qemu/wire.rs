//! The MPQEMU wire format spoken by QEMU's `x-pci-proxy-dev` (`spec/qemu-frontend.md`,
//! "MPQEMU wire format"; QEMU `include/hw/remote/mpqemu-link.h`).
//!
//! Every message is a 16-byte header (`i32 cmd`, 4 bytes padding, `u64 size`, native endian)
//! followed by `size` bytes of payload; file descriptors travel as `SCM_RIGHTS` with the header.
//! Decoding is pure ([`Header::decode`], [`Request::decode`]) so that it can be tested and
//! fuzzed without a socket; [`Channel`] does the socket I/O.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Size of the message header.
pub const HEADER_LEN: usize = 16;
/// The most file descriptors one message carries (`REMOTE_MAX_FDS`).
pub const MAX_FDS: usize = 8;
/// The largest payload we accept; SYNC_SYSMEM (192 bytes) is the largest QEMU sends.
pub const MAX_PAYLOAD: u64 = 4096;
/// Number of regions in a SYNC_SYSMEM message.
pub const SYSMEM_REGIONS: usize = 8;

/// `MPQEMU_CMD_SYNC_SYSMEM`: the guest RAM layout, one fd per region. No reply.
pub const CMD_SYNC_SYSMEM: i32 = 0;
/// `MPQEMU_CMD_RET`: a reply carrying a `u64`.
pub const CMD_RET: i32 = 1;
/// `MPQEMU_CMD_PCI_CFGWRITE`.
pub const CMD_PCI_CFGWRITE: i32 = 2;
/// `MPQEMU_CMD_PCI_CFGREAD`.
pub const CMD_PCI_CFGREAD: i32 = 3;
/// `MPQEMU_CMD_BAR_WRITE`.
pub const CMD_BAR_WRITE: i32 = 4;
/// `MPQEMU_CMD_BAR_READ`.
pub const CMD_BAR_READ: i32 = 5;
/// `MPQEMU_CMD_SET_IRQFD`: the proxy's INTx eventfds. No reply.
pub const CMD_SET_IRQFD: i32 = 6;
/// `MPQEMU_CMD_DEVICE_RESET`.
pub const CMD_DEVICE_RESET: i32 = 7;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the connection between messages.
    #[error("peer closed the connection")]
    Closed,
    /// The header announces a payload we refuse to read.
    #[error("payload of {0} bytes is larger than {MAX_PAYLOAD}")]
    Oversized(u64),
    /// A socket call failed.
    #[error("socket I/O: {0}")]
    Io(#[from] io::Error),
}

/// A decoded message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The command.
    pub cmd: i32,
    /// Payload length in bytes.
    pub size: u64,
}

impl Header {
    /// Decodes a header.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Self {
        let mut cmd = [0u8; 4];
        cmd.copy_from_slice(&bytes[0..4]);
        let mut size = [0u8; 8];
        size.copy_from_slice(&bytes[8..16]);
        Self {
            cmd: i32::from_ne_bytes(cmd),
            size: u64::from_ne_bytes(size),
        }
    }

    /// Encodes a header (padding zeroed).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&self.cmd.to_ne_bytes());
        out[8..16].copy_from_slice(&self.size.to_ne_bytes());
        out
    }
}

/// One guest RAM region of a SYNC_SYSMEM message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysmemRegion {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the region in its fd.
    pub offset: i64,
}

/// A decoded request from QEMU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// SYNC_SYSMEM: the regions, in order; region `i` goes with fd `i`.
    SyncSysmem(Vec<SysmemRegion>),
    /// PCI_CFGWRITE.
    CfgWrite {
        /// Config-space offset.
        addr: u32,
        /// Value (the low `len` bytes).
        val: u32,
        /// Access length: 1, 2 or 4 (unchecked here).
        len: i32,
    },
    /// PCI_CFGREAD.
    CfgRead {
        /// Config-space offset.
        addr: u32,
        /// Access length.
        len: i32,
    },
    /// BAR_WRITE.
    BarWrite {
        /// Absolute guest-physical (PCI bus) address.
        addr: u64,
        /// Value.
        val: u64,
        /// Access size in bytes.
        size: u32,
        /// Memory (true) or I/O BAR.
        memory: bool,
    },
    /// BAR_READ.
    BarRead {
        /// Absolute address.
        addr: u64,
        /// Access size in bytes.
        size: u32,
        /// Memory (true) or I/O BAR.
        memory: bool,
    },
    /// SET_IRQFD: INTx eventfds we do not use (the proxy's INTx needs KVM).
    SetIrqfd,
    /// DEVICE_RESET.
    DeviceReset,
    /// A command we do not know, or a payload too short for its command.
    Malformed {
        /// The command field.
        cmd: i32,
        /// Why it did not decode.
        reason: &'static str,
    },
}

impl Request {
    /// Whether QEMU waits for exactly one RET reply to this request.
    ///
    /// An unknown command is answered too: QEMU only sends commands it awaits a reply to or
    /// the two known fire-and-forget ones, and a missing reply would hang a vCPU forever.
    pub fn needs_reply(&self) -> bool {
        !matches!(self, Self::SyncSysmem(_) | Self::SetIrqfd)
            && !matches!(self, Self::Malformed { cmd, .. } if *cmd == CMD_SYNC_SYSMEM || *cmd == CMD_SET_IRQFD)
    }

    /// Decodes a request from its command and payload.
    pub fn decode(cmd: i32, payload: &[u8]) -> Self {
        let malformed = |reason| Self::Malformed { cmd, reason };
        match cmd {
            CMD_SYNC_SYSMEM => {
                if payload.len() < SYSMEM_REGIONS * 24 {
                    return malformed("SYNC_SYSMEM payload shorter than 192 bytes");
                }
                let regions = (0..SYSMEM_REGIONS)
                    .map(|i| SysmemRegion {
                        gpa: u64_at(payload, i * 8),
                        size: u64_at(payload, (SYSMEM_REGIONS + i) * 8),
                        offset: i64::from_ne_bytes(bytes8(payload, (2 * SYSMEM_REGIONS + i) * 8)),
                    })
                    .collect();
                Self::SyncSysmem(regions)
            }
            CMD_PCI_CFGWRITE | CMD_PCI_CFGREAD => {
                if payload.len() < 12 {
                    return malformed("PCI config payload shorter than 12 bytes");
                }
                let addr = u32_at(payload, 0);
                let val = u32_at(payload, 4);
                let len = i32::from_ne_bytes([payload[8], payload[9], payload[10], payload[11]]);
                if cmd == CMD_PCI_CFGWRITE {
                    Self::CfgWrite { addr, val, len }
                } else {
                    Self::CfgRead { addr, len }
                }
            }
            CMD_BAR_WRITE | CMD_BAR_READ => {
                if payload.len() < 21 {
                    return malformed("BAR payload shorter than 24 bytes");
                }
                let addr = u64_at(payload, 0);
                let val = u64_at(payload, 8);
                let size = u32_at(payload, 16);
                let memory = payload[20] != 0;
                if cmd == CMD_BAR_WRITE {
                    Self::BarWrite {
                        addr,
                        val,
                        size,
                        memory,
                    }
                } else {
                    Self::BarRead { addr, size, memory }
                }
            }
            CMD_SET_IRQFD => Self::SetIrqfd,
            CMD_DEVICE_RESET => Self::DeviceReset,
            _ => malformed("unknown command"),
        }
    }
}

fn bytes8(p: &[u8], at: usize) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[at..at + 8]);
    b
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(bytes8(p, at))
}

fn u32_at(p: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
}

/// Encodes a RET reply carrying `value`.
pub fn encode_ret(value: u64) -> [u8; HEADER_LEN + 8] {
    let mut out = [0u8; HEADER_LEN + 8];
    out[..HEADER_LEN].copy_from_slice(
        &Header {
            cmd: CMD_RET,
            size: 8,
        }
        .encode(),
    );
    out[HEADER_LEN..].copy_from_slice(&value.to_ne_bytes());
    out
}

/// The remote's end of the MPQEMU socket.
#[derive(Debug)]
pub struct Channel {
    sock: UnixStream,
    payload: Vec<u8>,
}

impl Channel {
    /// Wraps a connected stream socket.
    pub fn new(sock: UnixStream) -> Self {
        Self {
            sock,
            payload: Vec::with_capacity(256),
        }
    }

    /// Receives one message. The payload buffer is reused between calls (no allocation per
    /// access once warm). An oversized payload is an error: the stream cannot be trusted after.
    pub fn recv(&mut self) -> Result<(Header, &[u8], Vec<OwnedFd>), WireError> {
        let mut hdr = [0u8; HEADER_LEN];
        let mut raw_fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: hdr.as_mut_ptr().cast(),
            iov_len: HEADER_LEN,
        }];
        // SAFETY: the iovec points at `hdr`, which lives across the call and may hold any
        // bytes.
        let (n, nfds) = unsafe { self.sock.recv_with_fds(&mut iov, &mut raw_fds) }
            .map_err(|e| WireError::Io(io::Error::from_raw_os_error(e.errno())))?;
        let fds: Vec<OwnedFd> = raw_fds[..nfds.min(MAX_FDS)]
            .iter()
            .filter(|&&fd| fd >= 0)
            // SAFETY: the kernel installed these descriptors for us in this recvmsg; nothing
            // else owns them.
            .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        if n == 0 {
            return Err(WireError::Closed);
        }
        if n < HEADER_LEN {
            self.sock.read_exact(&mut hdr[n..])?;
        }
        let header = Header::decode(&hdr);
        if header.size > MAX_PAYLOAD {
            return Err(WireError::Oversized(header.size));
        }
        // Bounded by MAX_PAYLOAD above.
        let len = usize::try_from(header.size).unwrap_or(0);
        self.payload.resize(len, 0);
        self.sock.read_exact(&mut self.payload)?;
        Ok((header, &self.payload, fds))
    }

    /// Sends a RET reply.
    pub fn reply(&mut self, value: u64) -> Result<(), WireError> {
        self.sock.write_all(&encode_ret(value))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_payload(addr: u32, val: u32, len: i32) -> Vec<u8> {
        let mut p = addr.to_ne_bytes().to_vec();
        p.extend_from_slice(&val.to_ne_bytes());
        p.extend_from_slice(&len.to_ne_bytes());
        p
    }

    #[test]
    fn header_round_trips_with_zero_padding() {
        let h = Header { cmd: 5, size: 24 };
        let bytes = h.encode();
        assert_eq!(&bytes[4..8], &[0, 0, 0, 0]);
        assert_eq!(Header::decode(&bytes), h);
    }

    #[test]
    fn ret_reply_is_header_plus_value() {
        let r = encode_ret(0x1234);
        assert_eq!(
            Header::decode(r[..16].try_into().unwrap()),
            Header { cmd: 1, size: 8 }
        );
        assert_eq!(u64::from_ne_bytes(r[16..].try_into().unwrap()), 0x1234);
    }

    #[test]
    fn cfg_read_decodes_addr_and_len() {
        let req = Request::decode(CMD_PCI_CFGREAD, &cfg_payload(0x10, 0, 4));
        assert_eq!(req, Request::CfgRead { addr: 0x10, len: 4 });
        assert!(req.needs_reply());
    }

    #[test]
    fn bar_write_decodes_all_fields() {
        let mut p = 0xfe00_0050u64.to_ne_bytes().to_vec();
        p.extend_from_slice(&7u64.to_ne_bytes());
        p.extend_from_slice(&4u32.to_ne_bytes());
        p.extend_from_slice(&[1, 0, 0, 0]);
        assert_eq!(
            Request::decode(CMD_BAR_WRITE, &p),
            Request::BarWrite {
                addr: 0xfe00_0050,
                val: 7,
                size: 4,
                memory: true
            }
        );
    }

    #[test]
    fn sync_sysmem_decodes_eight_regions() {
        let mut p = Vec::new();
        for i in 0..8u64 {
            p.extend_from_slice(&(i * 0x1000).to_ne_bytes());
        }
        for i in 0..8u64 {
            p.extend_from_slice(&(i + 1).to_ne_bytes());
        }
        for i in 0..8i64 {
            p.extend_from_slice(&(-i).to_ne_bytes());
        }
        let Request::SyncSysmem(regions) = Request::decode(CMD_SYNC_SYSMEM, &p) else {
            panic!("not decoded as SYNC_SYSMEM");
        };
        assert_eq!(
            regions[3],
            SysmemRegion {
                gpa: 0x3000,
                size: 4,
                offset: -3
            }
        );
        assert!(!Request::decode(CMD_SYNC_SYSMEM, &p).needs_reply());
    }

    #[test]
    fn short_payloads_are_malformed_not_panics() {
        for cmd in [0, 2, 3, 4, 5] {
            assert!(matches!(
                Request::decode(cmd, &[1, 2, 3]),
                Request::Malformed { .. }
            ));
        }
    }

    #[test]
    fn unknown_commands_get_a_reply_but_malformed_sysmem_does_not() {
        assert!(Request::decode(99, &[]).needs_reply());
        assert!(Request::decode(-1, &[]).needs_reply());
        assert!(!Request::decode(CMD_SYNC_SYSMEM, &[]).needs_reply());
    }

    #[test]
    fn channel_receives_fds_with_the_header_and_rejects_oversized_payloads() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut ch = Channel::new(a);
        let ev = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let hdr = Header {
            cmd: CMD_SET_IRQFD,
            size: 0,
        }
        .encode();
        use std::os::fd::AsRawFd;
        b.send_with_fds(&[&hdr[..]], &[ev.as_raw_fd(), ev.as_raw_fd()])
            .unwrap();
        let (h, payload, fds) = ch.recv().unwrap();
        assert_eq!((h.cmd, payload.len(), fds.len()), (CMD_SET_IRQFD, 0, 2));

        (&b).write_all(
            &Header {
                cmd: 4,
                size: 1 << 40,
            }
            .encode(),
        )
        .unwrap();
        assert!(matches!(ch.recv(), Err(WireError::Oversized(_))));
        drop(b);
    }

    #[test]
    fn channel_reports_closed_peer() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(matches!(Channel::new(a).recv(), Err(WireError::Closed)));
    }
}
