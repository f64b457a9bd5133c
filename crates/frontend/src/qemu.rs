//! The QEMU bridge (work in progress).
