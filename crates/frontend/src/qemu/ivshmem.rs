//! An ivshmem-doorbell server: the guest's interrupts (`spec/qemu-frontend.md`, "ivshmem server
//! protocol").
//!
//! On each connection we send 8-byte little-endian messages: protocol version 0, the peer id
//! 0, `-1` with a 1 MiB shared-memory memfd, then one `0` per vector carrying that vector's
//! eventfd. QEMU polls those eventfds; writing 1 to vector `i`'s eventfd raises MSI-X vector
//! `i` in the guest, which the guest glue made window `i`'s virtio-mmio interrupt.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The ivshmem protocol version QEMU 7.2 speaks.
pub const PROTOCOL_VERSION: i64 = 0;
/// The shared-memory size we announce (the doorbell needs none, but QEMU maps one).
pub const SHM_SIZE: u64 = 1 << 20;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum IvshmemError {
    /// Creating the socket, the memfd or an eventfd failed.
    #[error("ivshmem server: {0}")]
    Io(#[from] io::Error),
}

/// One interrupt line: vector `i`'s eventfd.
#[derive(Clone, Debug)]
pub struct Interrupt(Arc<EventFd>);

impl Interrupt {
    /// Raises the interrupt (writes 1 to the eventfd; QEMU delivers the MSI-X message).
    pub fn raise(&self) -> io::Result<()> {
        self.0.write(1)
    }

    /// The eventfd itself.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

/// A listening ivshmem server. Dropping it stops accepting and removes the socket file;
/// connections already made stay open until QEMU exits.
#[derive(Debug)]
pub struct IvshmemServer {
    path: PathBuf,
    /// A duplicate of the listening socket, shut down to wake the accept loop on drop.
    listener: UnixListener,
    vectors: Vec<Interrupt>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn shm_memfd() -> io::Result<File> {
    let name = CString::new("remio-ivshmem").map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(SHM_SIZE)?;
    Ok(file)
}

fn send_msg(sock: &UnixStream, msg: i64, fd: Option<i32>) -> io::Result<()> {
    let bytes = msg.to_le_bytes();
    let fds: &[i32] = match &fd {
        Some(f) => std::slice::from_ref(f),
        None => &[],
    };
    let n = sock
        .send_with_fds(&[&bytes[..]], fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if n != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short ivshmem message",
        ));
    }
    Ok(())
}

/// Sends the whole setup sequence for peer 0 on a fresh connection.
pub fn greet(sock: &UnixStream, shm: &File, vectors: &[Interrupt]) -> io::Result<()> {
    send_msg(sock, PROTOCOL_VERSION, None)?;
    send_msg(sock, 0, None)?;
    send_msg(sock, -1, Some(shm.as_raw_fd()))?;
    for v in vectors {
        send_msg(sock, 0, Some(v.0.as_raw_fd()))?;
    }
    Ok(())
}

impl IvshmemServer {
    /// Listens on `path` (replacing a stale socket file) with `vectors` interrupt vectors and
    /// starts accepting in a thread. Call before starting QEMU.
    pub fn start(path: &Path, vectors: usize) -> Result<Self, IvshmemError> {
        let vectors = (0..vectors)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<_>>()?;
        Self::with_eventfds(path, vectors)
    }

    /// Like [`IvshmemServer::start`], with vector `i`'s eventfd given: whoever signals
    /// `eventfds[i]` raises MSI-X vector `i` in the guest (a backend VM's interrupts are the
    /// hypervisor model's backend interrupt eventfds).
    pub fn with_eventfds(path: &Path, eventfds: Vec<EventFd>) -> Result<Self, IvshmemError> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let waker = listener.try_clone()?;
        let shm = shm_memfd()?;
        let vectors: Vec<Interrupt> = eventfds
            .into_iter()
            .map(|e| Interrupt(Arc::new(e)))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let vectors = vectors.clone();
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("remio-ivshmem".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        if let Err(e) = &conn {
                            // EINVAL: shut down by drop. Anything else: avoid a busy loop.
                            if e.raw_os_error() == Some(libc::EINVAL) {
                                break;
                            }
                        }
                        match conn.and_then(|c| greet(&c, &shm, &vectors).map(|()| c)) {
                            Ok(c) => {
                                log::debug!(
                                    "ivshmem: peer connected, {} vectors sent",
                                    vectors.len()
                                );
                                // Keep the connection: closing it would tell QEMU the server left.
                                if let Ok(mut v) = conns.lock() {
                                    v.push(c);
                                }
                            }
                            Err(e) => log::warn!("ivshmem: connection failed: {e}"),
                        }
                    }
                })?
        };
        Ok(Self {
            path: path.to_owned(),
            listener: waker,
            vectors,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path (for `-chardev socket,path=…`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Vector `i`'s interrupt.
    pub fn interrupt(&self, i: usize) -> Option<Interrupt> {
        self.vectors.get(i).cloned()
    }

    /// Number of vectors.
    pub fn vectors(&self) -> usize {
        self.vectors.len()
    }
}

impl Drop for IvshmemServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag: shutting a listening socket down makes a
        // blocked accept fail (connecting would not work if the socket file is already gone).
        // SAFETY: shutdown(2) on a descriptor we own; no memory is involved.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use super::*;

    fn recv(sock: &UnixStream) -> (i64, Option<File>) {
        let mut b = [0u8; 8];
        let (n, f) = sock.recv_with_fd(&mut b).unwrap();
        assert_eq!(n, 8);
        (i64::from_le_bytes(b), f)
    }

    #[test]
    fn a_connecting_peer_gets_version_id_shm_and_one_eventfd_per_vector_that_raise_works_on() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-ivsh").unwrap();
        let path = dir.as_path().join("iv.sock");
        let server = IvshmemServer::start(&path, 2).unwrap();
        let peer = UnixStream::connect(&path).unwrap();
        assert_eq!(recv(&peer).0, 0);
        assert_eq!(recv(&peer).0, 0);
        let (m, shm) = recv(&peer);
        assert_eq!((m, shm.unwrap().metadata().unwrap().len()), (-1, SHM_SIZE));
        let (m0, v0) = recv(&peer);
        let (m1, v1) = recv(&peer);
        assert_eq!((m0, m1), (0, 0));
        server.interrupt(1).unwrap().raise().unwrap();
        // SAFETY: the received descriptors are ours; EventFd takes ownership.
        let (e0, e1) = unsafe {
            use std::os::fd::IntoRawFd;
            (
                EventFd::from_raw_fd(v0.unwrap().into_raw_fd()),
                EventFd::from_raw_fd(v1.unwrap().into_raw_fd()),
            )
        };
        assert_eq!(e1.read().unwrap(), 1);
        assert!(e0.read().is_err(), "vector 0 must not have been raised");
        assert!(server.interrupt(2).is_none());
        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn given_eventfds_are_the_vectors_the_peer_receives() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-ivsh").unwrap();
        let path = dir.as_path().join("iv.sock");
        let ours = EventFd::new(EFD_NONBLOCK).unwrap();
        let server = IvshmemServer::with_eventfds(&path, vec![ours.try_clone().unwrap()]).unwrap();
        let peer = UnixStream::connect(&path).unwrap();
        for _ in 0..3 {
            recv(&peer);
        }
        let (m, v0) = recv(&peer);
        assert_eq!(m, 0);
        ours.write(5).unwrap();
        // SAFETY: the received descriptor is ours; EventFd takes ownership.
        let theirs = unsafe {
            use std::os::fd::IntoRawFd;
            EventFd::from_raw_fd(v0.unwrap().into_raw_fd())
        };
        assert_eq!(theirs.read().unwrap(), 5);
        assert_eq!(server.vectors(), 1);
    }

    #[test]
    fn drop_returns_even_when_the_socket_file_is_already_gone() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-ivsh").unwrap();
        let path = dir.as_path().join("iv.sock");
        let server = IvshmemServer::start(&path, 1).unwrap();
        std::fs::remove_file(&path).unwrap();
        drop(server); // must not hang in join
    }
}
