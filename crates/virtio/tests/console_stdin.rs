//! The stdio console port reads stdin's descriptor itself. A burst larger than one receive
//! pass (4 KiB) must all reach the guest without further input: the worker polls the
//! descriptor (level-triggered), so nothing may be left in a user-space buffer it cannot see.
//!
//! Its own test binary: it replaces this process's stdin (fd 0) with a pipe.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "a test: constants are small"
)]

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use remio_virtio::devices::console::{ConsoleDevice, ConsolePort};
use remio_virtio::{ActivateContext, Interrupt, SharedStatus, VirtioDevice};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Bytes written to stdin at once: more than the worker's 4 KiB receive pass and less than
/// std's 8 KiB `Stdin` buffer, which is where the rest used to stay.
const BURST: usize = 6000;
const BUFS: u16 = 4;
const BUF_LEN: u32 = 4096;
const BUF_BASE: u64 = 0x10_0000;

/// Waits until `fd` is readable, at most `ms` milliseconds; whether it became readable.
fn readable_within(fd: &EventFd, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

#[test]
fn a_stdin_burst_over_one_receive_pass_reaches_the_guest_without_more_input() {
    // Arrange: stdin is a pipe that holds the whole burst and stays open (no EOF, which
    // would wake the worker by itself).
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both were just created and are owned by nobody else.
    let (rd, wr): (OwnedFd, OwnedFd) = unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    // SAFETY: dup2 onto fd 0; nothing else in this test binary uses stdin.
    assert_eq!(unsafe { libc::dup2(rd.as_raw_fd(), 0) }, 0);
    drop(rd);
    let burst: Vec<u8> = (0..BURST).map(|i| (i % 251) as u8).collect();
    std::fs::File::from(wr.try_clone().unwrap())
        .write_all(&burst)
        .unwrap();

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
    let rxvq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 16);
    let txvq = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
    let descs: Vec<RawDescriptor> = (0..BUFS)
        .map(|i| {
            let addr = BUF_BASE + u64::from(i) * u64::from(BUF_LEN);
            RawDescriptor::from(Descriptor::new(addr, BUF_LEN, VRING_DESC_F_WRITE as u16, 0))
        })
        .collect();
    // No NEXT flags: four one-buffer chains, heads 0..4.
    rxvq.add_desc_chains(&descs, 0).unwrap();
    let evts: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut dev = ConsoleDevice::new(ConsolePort::Stdio);

    // Act: the worker starts with the burst already waiting.
    dev.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![rxvq.create_queue().unwrap(), txvq.create_queue().unwrap()],
        queue_evts: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
        interrupt: Arc::new(Interrupt::new(
            SharedStatus::default(),
            irq.try_clone().unwrap(),
        )),
        acked_features: 0,
    })
    .unwrap();

    // Assert: every byte arrives, in order, with no more input. Each used buffer comes with
    // an interrupt; the bound only turns a hang into a failure.
    let mut received = 0usize;
    let mut used = 0u16;
    while received < BURST {
        assert!(
            readable_within(&irq, 10_000),
            "only {received} of {BURST} bytes reached the guest: the rest is stuck"
        );
        let _ = irq.read();
        let idx = rxvq.used().idx().load();
        for i in used..idx {
            let elem = rxvq.used().ring().ref_at(usize::from(i)).unwrap().load();
            received += elem.len() as usize;
        }
        used = idx;
    }
    assert_eq!(received, BURST);
    let mut got = vec![0u8; BURST];
    let mut off = 0usize;
    for i in 0..usize::from(used) {
        let elem = rxvq.used().ring().ref_at(i).unwrap().load();
        let len = elem.len() as usize;
        let addr = BUF_BASE + u64::from(elem.id()) * u64::from(BUF_LEN);
        mem.read_slice(&mut got[off..off + len], GuestAddress(addr))
            .unwrap();
        off += len;
    }
    assert!(
        got == burst,
        "the guest got the burst's bytes out of order or altered"
    );

    dev.reset();
    drop(wr);
}
