//! Frontends: the parties whose register accesses trap into the hypervisor model (`remio-hyp`).
//!
//! - [`inprocess`]: a frontend handle for tests and benchmarks, driving the whole path from
//!   the calling thread.
//! - [`qemu`]: a bridge that makes an unmodified Linux guest under QEMU a frontend
//!   (`spec/qemu-frontend.md`): the MPQEMU remote for `x-pci-proxy-dev` and an ivshmem-doorbell
//!   server for interrupts.

pub mod inprocess;
pub mod qemu;
