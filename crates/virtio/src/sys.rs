//! The few system calls the backends need that std and vmm-sys-util do not wrap: opening a
//! pseudo-terminal, configuring a TAP device, O_NONBLOCK on and unbuffered reads from a raw
//! descriptor, datagrams with their real length, locking an image and vectored image I/O into
//! guest memory. All unsafe code of the crate is here.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

/// Sets O_NONBLOCK on `fd`.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller keeps open; F_GETFL/F_SETFL touch no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `read(2)` on `fd` into `buf`, unbuffered: what the caller polls is exactly what is left
/// to read (std's `Stdin` keeps an 8 KiB buffer of its own, which epoll cannot see).
pub fn read_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes and `fd` stays open for the call
    // (borrowed); read writes at most that many bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// One datagram from `sock` into `buf`, received with `MSG_TRUNC` so that the datagram's real
/// length is returned even when it did not fit (then only `buf.len()` bytes were stored):
/// `(real length, the sender's path)`. The sender has no path when it is unbound or bound in
/// the abstract namespace; such a sender cannot be answered at a path.
pub fn recv_datagram(sock: &UnixDatagram, buf: &mut [u8]) -> io::Result<(usize, Option<PathBuf>)> {
    // SAFETY: a zeroed sockaddr_un is a valid value (family 0, empty path).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut addr_len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .map_err(io::Error::other)?;
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, `addr`/`addr_len` describe a
    // writable sockaddr_un of that size, and `sock` stays open for the call. With MSG_TRUNC
    // the kernel still writes at most `buf.len()` bytes; only the return value is larger.
    let n = unsafe {
        libc::recvfrom(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
            std::ptr::addr_of_mut!(addr).cast(),
            &mut addr_len,
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let path_off = std::mem::offset_of!(libc::sockaddr_un, sun_path);
    let path_len = usize::try_from(addr_len)
        .unwrap_or(0)
        .saturating_sub(path_off)
        .min(addr.sun_path.len());
    let raw: Vec<u8> = addr.sun_path[..path_len]
        .iter()
        .map(|c| c.to_ne_bytes()[0])
        .take_while(|&c| c != 0)
        .collect();
    // An abstract address starts with a NUL byte, so `raw` is empty for it as for no address.
    let from = (!raw.is_empty()).then(|| PathBuf::from(std::ffi::OsString::from_vec(raw)));
    Ok((n, from))
}

/// Takes a BSD `flock(2)` on `file` without waiting: exclusive (`LOCK_EX`) or shared
/// (`LOCK_SH`). A lock someone else holds is an error of kind [`io::ErrorKind::WouldBlock`].
///
/// The lock belongs to the open file description: it conflicts with a lock taken through any
/// other `open()` of the same inode, in this process or another, is kept by `dup`s of the
/// descriptor (none are inherited by children: std opens with O_CLOEXEC), and goes when the
/// last descriptor of the description is closed. Taking it again through the same descriptor
/// only converts it, so it never deadlocks against itself.
///
/// std's `File::try_lock` is flock today too, but its documentation leaves the mechanism open;
/// the mechanism is the point here (who else sees the lock), so it is spelled out.
pub fn try_flock(file: &File, exclusive: bool) -> io::Result<()> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    loop {
        // SAFETY: flock on a descriptor `file` keeps open for the call; it touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Most iovecs one `preadv`/`pwritev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// iovec storage reused by every request of a block device, so that its image I/O is one
/// `preadv`/`pwritev` per request (QEMU does the same) without an allocation per request.
#[derive(Debug, Default)]
pub struct IoVecs(Vec<libc::iovec>);

// SAFETY: the vector is only filled inside `transfer` and cleared before it returns, so its
// raw pointers never outlive the call and never reach another thread.
unsafe impl Send for IoVecs {}

impl IoVecs {
    /// Room for `n` segments before the first reallocation.
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    /// Moves the guest buffers `data` to (`read`) or from the image `file` at `offset`,
    /// continuing after a short transfer. Reaching the end of the file is an error: the block
    /// parser checked the request against the capacity, so the image shrank underneath us.
    pub fn transfer(
        &mut self,
        file: &File,
        mem: &vm_memory::GuestMemoryMmap,
        data: &[(vm_memory::GuestAddress, u32)],
        offset: u64,
        read: bool,
    ) -> io::Result<()> {
        let r = self
            .fill(mem, data, read)
            .and_then(|()| self.run(file, offset, read));
        self.0.clear();
        r
    }

    fn fill(
        &mut self,
        mem: &vm_memory::GuestMemoryMmap,
        data: &[(vm_memory::GuestAddress, u32)],
        read: bool,
    ) -> io::Result<()> {
        use vm_memory::{GuestMemory, Permissions};
        // Reads from the image write guest memory and the other way round.
        let access = if read {
            Permissions::Write
        } else {
            Permissions::Read
        };
        for &(addr, len) in data {
            let slices = mem
                .get_slices(addr, len as usize, access)
                .map_err(io::Error::other)?;
            for slice in slices {
                let slice = slice.map_err(io::Error::other)?;
                if !slice.is_empty() {
                    // The guard only matters for Xen foreign mappings (vm-memory's `xen`
                    // feature, not built here): the pointer stays valid as long as `mem`.
                    self.0.push(libc::iovec {
                        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                        iov_len: slice.len(),
                    });
                }
            }
        }
        Ok(())
    }

    fn run(&mut self, file: &File, offset: u64, read: bool) -> io::Result<()> {
        let iov = &mut self.0;
        let mut pos = offset;
        let mut first = 0;
        while first < iov.len() {
            let rest = &iov[first..];
            let count = libc::c_int::try_from(rest.len().min(IOV_MAX)).unwrap_or(1);
            let at = libc::off_t::try_from(pos)
                .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
            // SAFETY: every iovec points into guest memory that `fill` checked and that stays
            // mapped for this call (the caller holds `mem`); the kernel touches only those
            // ranges, reading them for pwritev and writing them for preadv.
            let n = unsafe {
                if read {
                    libc::preadv(file.as_raw_fd(), rest.as_ptr(), count, at)
                } else {
                    libc::pwritev(file.as_raw_fd(), rest.as_ptr(), count, at)
                }
            };
            let Ok(mut n) = usize::try_from(n) else {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the image ended before the request",
                ));
            }
            pos += n as u64;
            // Skip what was transferred; a partly done iovec is trimmed.
            while n > 0 {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `n < iov_len`: the new base stays inside the same buffer.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
    }
}

/// A pseudo-terminal: the master we serve, the slave kept open so that the master never
/// reports hang-up while no client has the slave open, and the slave's path.
#[derive(Debug)]
pub struct Pty {
    /// Master side.
    pub master: File,
    /// Slave side, kept open.
    pub slave: File,
    /// Path of the slave (`/dev/pts/N`).
    pub path: PathBuf,
}

/// Opens a pseudo-terminal in raw mode.
pub fn open_pty() -> io::Result<Pty> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    // SAFETY: openpty writes two fds into the two valid `c_int`s we pass; the name, termios
    // and winsize pointers may be null (then it does not use them).
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so both are fresh fds owned by nobody else.
    let (master, slave) = unsafe {
        (
            File::from(OwnedFd::from_raw_fd(master)),
            File::from(OwnedFd::from_raw_fd(slave)),
        )
    };
    // SAFETY: a zeroed termios is a valid value to be overwritten by tcgetattr.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `slave` is an open tty fd and `tio` a valid termios to fill.
    if unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut tio) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `tio` is a valid termios.
    unsafe { libc::cfmakeraw(&mut tio) };
    // SAFETY: `slave` is an open tty fd and `tio` a valid termios.
    if unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let path = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))?;
    Ok(Pty {
        master,
        slave,
        path,
    })
}

/// The TAP flags we ask for (linux/if_tun.h, as libc exports them).
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Opens (creating if needed) TAP interface `name` with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
/// non-blocking, a `hdr_len`-byte virtio-net header and no offloads.
pub fn open_tap(name: &str, hdr_len: i32) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "TAP name must be 1 to 15 bytes",
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: `ifreq` is plain data (a name array and a union of plain fields): all zeroes is
    // a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    req.ifr_ifru.ifru_flags = libc::c_short::try_from(TAP_FLAGS)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is libc's definition of it
    // and lives across the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer we pass, which is valid.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// What the kernel says about an open TAP descriptor: its interface name, its flags
/// (TUNGETIFF) and its virtio-net header size (TUNGETVNETHDRSZ), for tests.
#[cfg(test)]
pub(crate) fn tap_info(file: &File) -> io::Result<(String, libc::c_int, libc::c_int)> {
    // SAFETY: all zeroes is a valid `ifreq` (see `open_tap`).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF fills the `struct ifreq` we pass, which lives across the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut hdr: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int to the pointer we pass, which is valid.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETVNETHDRSZ, &mut hdr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let name: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    // SAFETY: TUNGETIFF set the flags member of the union.
    let flags = libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags });
    Ok((String::from_utf8_lossy(&name).into_owned(), flags, hdr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pty_slave_path_is_a_pts_device() {
        let pty = open_pty().unwrap();
        assert!(pty.path.starts_with("/dev/pts"), "{}", pty.path.display());
    }

    #[test]
    fn tap_name_too_long_is_refused_before_any_syscall() {
        let err = open_tap("a-name-longer-than-15", 12).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
