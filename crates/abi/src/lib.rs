//! The binary interfaces of Bao's Remote I/O, byte for byte.
//!
//! - [`uapi`]: the I/O dispatcher driver's userspace API as posted to the kernel lists
//!   (ioctl type 0xA6, `include/uapi/linux/bao.h`), with its layouts made explicit.
//! - [`uapi_v2`]: the later revision (ioctl type 0xA7, a single `/dev/bao`, `CREATE_DM`).
//! - [`ioctl`]: the `_IO*` number encodings those numbers are computed from.
//! - [`hcwindow`]: the hypercall window, the register ABI through which a backend VM under
//!   QEMU issues the Remote I/O hypercall to the platform ("Bao in a box").
//! - [`hypercall`]: the Remote I/O hypercall (number 2): its operations, status codes, and the
//!   register ABI of arm64, arm and riscv64 as pure functions.
//! - [`platform`]: the two things the dispatcher needs from the hypervisor, as traits: the
//!   Remote I/O hypercall and a per-DM backend interrupt.
//!
//! Everything here is plain data and pure functions; the only `unsafe` is the hypercall
//! instruction itself, compiled only for the architectures that have it.
//!
//! ```
//! use remio_abi::uapi::{VirtioRequest, BAO_IOCTL_IO_CLIENT_ATTACH};
//! assert_eq!(core::mem::size_of::<VirtioRequest>(), 48);
//! assert_eq!(BAO_IOCTL_IO_CLIENT_ATTACH, 0xC030_A602);
//! ```

pub mod hcwindow;
pub mod hypercall;
pub mod ioctl;
pub mod platform;
pub mod uapi;
pub mod uapi_v2;

pub use hypercall::{RemioArgs, RemioOp, RemioRet, RemioStatus};
pub use platform::{Hypercall, InterruptController, IrqError, IrqHandler};
pub use uapi::{DmInfo, Ioeventfd, Irqfd, VirtioRequest};
