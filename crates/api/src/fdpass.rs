//! The system calls of the socket transport: `SOCK_SEQPACKET` messages with `SCM_RIGHTS`,
//! peer credentials, and telling an eventfd from any other fd.
//!
//! Every fd that arrives is wrapped in an [`OwnedFd`] before anything else happens, so none
//! leaks whatever the message turns out to be.
//!
//! # Why not vmm-sys-util's `ScmSocket`
//!
//! The rest of the workspace passes fds with vmm-sys-util's `ScmSocket` (the QEMU bridge's
//! MPQEMU and ivshmem sockets) and waits with its `Epoll` (the socket server included). This
//! transport keeps [`send_msg`] and [`recv_msg`] on `sendmsg`/`recvmsg` because `ScmSocket`
//! (0.15) cannot do four things the server needs:
//!
//! - flags: it always sends with `MSG_NOSIGNAL` alone and receives with no flag, while the
//!   server's replies must never block (`MSG_DONTWAIT`, [`send_msg_dontwait`]: a device model
//!   that stopped reading must not hold a frontend thread) and its connection thread reads
//!   without blocking ([`recv_msg_dontwait`]);
//! - close-on-exec: received fds must be `MSG_CMSG_CLOEXEC` (the platform process starts QEMU
//!   and device models; a passed eventfd or memfd must not leak into them);
//! - `MSG_TRUNC`: an oversized packet must be answered `EINVAL` with its tag, which needs the
//!   flag ([`Received::truncated`]); `ScmSocket` does not report it;
//! - `MSG_CTRUNC`: it closes the fds and returns `ENOBUFS` without the byte count, so the
//!   packet's header (its tag) is lost and the client gets no `EBADF` reply
//!   ([`Received::fds_truncated`]).
//!
//! rustix's `sendmsg`/`recvmsg` would cover all four, but is not a dependency of the
//! workspace; this file is the one place with raw `cmsg` code.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

/// Room for ancillary data: more fds than any message may carry, so that an excess is seen
/// (and closed) rather than silently truncated.
const CMSG_FDS: usize = 4;

/// What [`recv_msg`] received.
#[derive(Debug)]
pub struct Received {
    /// Bytes of the packet copied into the buffer.
    pub len: usize,
    /// The packet was longer than the buffer (`MSG_TRUNC`): the rest is lost.
    pub truncated: bool,
    /// More fds were sent than there was room for (`MSG_CTRUNC`); the kernel closed those.
    pub fds_truncated: bool,
    /// The fds received, owned.
    pub fds: Vec<OwnedFd>,
}

fn cmsg_space(fds: usize) -> usize {
    let bytes = u32::try_from(fds * size_of::<RawFd>()).unwrap_or(u32::MAX);
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    usize::try_from(unsafe { libc::CMSG_SPACE(bytes) }).unwrap_or(usize::MAX)
}

/// Sends one packet with `fds` attached. `MSG_NOSIGNAL`: a gone peer is `EPIPE`, not a signal.
/// Blocks while the peer's queue is full (bounded by `SO_SNDTIMEO`, [`set_send_timeout`]).
pub fn send_msg(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    send_msg_flags(sock, data, fds, 0)
}

/// [`send_msg`] without blocking (`MSG_DONTWAIT`): `WouldBlock` when the peer's queue is full
/// (a peer that stopped reading), and nothing was sent.
pub fn send_msg_dontwait(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    send_msg_flags(sock, data, fds, libc::MSG_DONTWAIT)
}

fn send_msg_flags(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: libc::c_int,
) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let space = cmsg_space(fds.len());
        if fds.len() > CMSG_FDS || space > size_of::<[u64; 8]>() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` bytes of aligned, zeroed storage that outlive
        // these writes; CMSG_FIRSTHDR is non-null because msg_controllen >= one header, and
        // CMSG_DATA has room for fds.len() ints since space = CMSG_SPACE(that many).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len =
                libc::CMSG_LEN(u32::try_from(fds.len() * size_of::<RawFd>()).unwrap_or(0)) as _;
            let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    loop {
        // SAFETY: msg and everything it points to are valid for the call.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | flags) };
        if r >= 0 {
            return if usize::try_from(r).ok() == Some(data.len()) {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(libc::EMSGSIZE))
            };
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one packet into `buf`. `Ok(None)` at end of stream (the peer closed). Blocks
/// (bounded by `SO_RCVTIMEO`, see [`set_recv_timeout`]: then `WouldBlock`).
pub fn recv_msg(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<Received>> {
    recv_msg_flags(sock, buf, 0)
}

/// [`recv_msg`] without blocking (`MSG_DONTWAIT`): `WouldBlock` when no packet is queued.
pub fn recv_msg_dontwait(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<Received>> {
    recv_msg_flags(sock, buf, libc::MSG_DONTWAIT)
}

fn recv_msg_flags(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: libc::c_int,
) -> io::Result<Option<Received>> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [MaybeUninit::<u64>::uninit(); 8];
    let space = cmsg_space(CMSG_FDS).min(size_of::<[u64; 8]>());
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    let n = loop {
        // SAFETY: msg points at buf and control, both valid for writes of their lengths.
        let r =
            unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
        if r >= 0 {
            break usize::try_from(r).unwrap_or(0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_controllen bytes of control with well-formed cmsghdrs;
    // CMSG_FIRSTHDR/NXTHDR stay within them. Each SCM_RIGHTS fd is a new descriptor owned by
    // this process, wrapped exactly once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header) / size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some(Received {
        len: n.min(buf.len()),
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        fds,
    }))
}

/// The uid and pid of the peer of a connected UNIX socket (`SO_PEERCRED`).
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(size_of::<libc::ucred>()).unwrap_or(0);
    // SAFETY: cred is a valid ucred of `len` bytes for the kernel to fill.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// Creates a close-on-exec `SOCK_SEQPACKET` UNIX socket.
pub fn seqpacket_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    let len = size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, libc::socklen_t::try_from(len).unwrap_or(0)))
}

/// Connects a `SOCK_SEQPACKET` socket to `path`.
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let sock = seqpacket_socket()?;
    let (addr, len) = sockaddr(path)?;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    let r = unsafe { libc::connect(sock.as_raw_fd(), (&raw const addr).cast(), len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Binds a `SOCK_SEQPACKET` socket at `path`, makes it mode 0600, then listens.
///
/// The mode is set between bind and listen: until `listen`, nobody can connect.
pub fn listen(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::PermissionsExt;
    let sock = seqpacket_socket()?;
    let (addr, len) = sockaddr(path)?;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    let r = unsafe { libc::bind(sock.as_raw_fd(), (&raw const addr).cast(), len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    // SAFETY: plain listen(2) on a socket we own.
    if unsafe { libc::listen(sock.as_raw_fd(), 64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

/// Accepts a connection (close-on-exec).
pub fn accept(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: accept4 with null address arguments.
        let fd = unsafe {
            libc::accept4(
                sock.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: fd is a new descriptor nobody else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sets `SO_SNDTIMEO`: a send blocked longer than `timeout` fails with `EAGAIN`.
pub fn set_send_timeout(sock: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    set_timeout(sock, libc::SO_SNDTIMEO, timeout)
}

/// Sets `SO_RCVTIMEO`: a blocking receive that waited `timeout` (rounded up to the kernel's
/// tick) fails with `EAGAIN`. Receives with `MSG_DONTWAIT` are not affected.
pub fn set_recv_timeout(sock: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<()> {
    set_timeout(sock, libc::SO_RCVTIMEO, timeout)
}

fn set_timeout(
    sock: BorrowedFd<'_>,
    opt: libc::c_int,
    timeout: std::time::Duration,
) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: tv is a valid timeval for the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&raw const tv).cast(),
            libc::socklen_t::try_from(size_of::<libc::timeval>()).unwrap_or(0),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// If `fd` is an eventfd, its identity: the kernel's `eventfd-id` (Linux 6.2+) or, on older
/// kernels, 0. `None` if it is another kind of file.
///
/// Checked with `readlink("/proc/self/fd/N") == "anon_inode:[eventfd]"`, the identity read from
/// `/proc/self/fdinfo/N`.
pub fn eventfd_identity(fd: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    let n = fd.as_raw_fd();
    let target = std::fs::read_link(format!("/proc/self/fd/{n}"))?;
    if target.as_os_str() != "anon_inode:[eventfd]" {
        return Ok(None);
    }
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{n}"))?;
    let id = info
        .lines()
        .find_map(|l| l.strip_prefix("eventfd-id:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use vmm_sys_util::eventfd::EventFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0);
        // SAFETY: two new descriptors, each owned once.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn an_fd_travels_with_its_packet() {
        let (a, b) = pair();
        let efd = EventFd::new(0).unwrap();
        // SAFETY: efd outlives the borrow.
        let borrowed = unsafe { BorrowedFd::borrow_raw(efd.as_raw_fd()) };
        send_msg(a.as_fd(), b"hello", &[borrowed]).unwrap();
        send_msg(a.as_fd(), b"bye", &[]).unwrap();
        let mut buf = [0u8; 16];
        let r = recv_msg(b.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        assert_eq!(r.fds.len(), 1);
        let r2 = recv_msg(b.as_fd(), &mut buf).unwrap().unwrap();
        assert_eq!(&buf[..r2.len], b"bye");
        assert!(r2.fds.is_empty());
        // The received fd is the same eventfd.
        efd.write(3).unwrap();
        let got = eventfd_identity(r.fds[0].as_fd()).unwrap();
        assert_eq!(got, eventfd_identity(efd_fd(&efd)).unwrap());
    }

    fn efd_fd(e: &EventFd) -> BorrowedFd<'_> {
        // SAFETY: e outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
    }

    #[test]
    fn oversized_packets_are_reported_truncated() {
        let (a, b) = pair();
        send_msg(a.as_fd(), &[7u8; 100], &[]).unwrap();
        let mut buf = [0u8; 16];
        let r = recv_msg(b.as_fd(), &mut buf).unwrap().unwrap();
        assert!(r.truncated);
    }

    #[test]
    fn end_of_stream_is_none() {
        let (a, b) = pair();
        drop(a);
        let mut buf = [0u8; 16];
        assert!(recv_msg(b.as_fd(), &mut buf).unwrap().is_none());
    }

    #[test]
    fn only_eventfds_are_eventfds() {
        let efd = EventFd::new(0).unwrap();
        assert!(eventfd_identity(efd_fd(&efd)).unwrap().is_some());
        let (a, _b) = pair();
        assert_eq!(eventfd_identity(a.as_fd()).unwrap(), None);
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(eventfd_identity(f.as_fd()).unwrap(), None);
    }

    #[test]
    fn distinct_eventfds_have_distinct_identities_on_this_kernel() {
        let a = EventFd::new(0).unwrap();
        let b = EventFd::new(0).unwrap();
        let ia = eventfd_identity(efd_fd(&a)).unwrap().unwrap();
        let ib = eventfd_identity(efd_fd(&b)).unwrap().unwrap();
        if ia == 0 && ib == 0 {
            eprintln!("SKIP: kernel without eventfd-id in fdinfo");
            return;
        }
        assert_ne!(ia, ib);
        let c = a.try_clone().unwrap();
        assert_eq!(eventfd_identity(efd_fd(&c)).unwrap(), Some(ia));
    }
}
