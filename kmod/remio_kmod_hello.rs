// SPDX-License-Identifier: GPL-2.0

//! remio's stage-1 Rust kernel module (docs/kmod.md): proves that an out-of-tree Rust module
//! builds against Debian's packaged 7.3 kernel and loads on it.
//!
//! It registers the misc device `/dev/remio-kmod-hello` with one ioctl, `REMIO_KMOD_HELLO_ECHO`
//! (`_IOWR('r', 0x01, struct remio_kmod_hello)`): the caller passes `value`, the module answers
//! with its `version` and `value + 1`, so a caller can tell that the kernel side ran.
//!
//! ```c
//! struct remio_kmod_hello {   /* 16 bytes, no padding */
//!     __u32 version;          /* out: REMIO_KMOD_HELLO_VERSION */
//!     __u32 reserved;         /* in: must be 0 (else -EINVAL); out: 0 */
//!     __u64 value;            /* in: any value; out: value + 1 (wrapping) */
//! };
//! ```

use kernel::{
    ioctl::{_IOC_SIZE, _IOWR},
    miscdevice::{MiscDevice, MiscDeviceOptions, MiscDeviceRegistration},
    prelude::*,
    transmute::{AsBytes, FromBytes},
    uaccess::UserSlice,
};

/// The ABI version `REMIO_KMOD_HELLO_ECHO` reports.
const REMIO_KMOD_HELLO_VERSION: u32 = 1;

/// The argument of `REMIO_KMOD_HELLO_ECHO` (layout in the crate documentation).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct EchoArg {
    version: u32,
    reserved: u32,
    value: u64,
}

// SAFETY: `EchoArg` is `repr(C)` with only integer fields and no padding (4 + 4 + 8 bytes), so
// every bit pattern is a valid value.
unsafe impl FromBytes for EchoArg {}
// SAFETY: `EchoArg` is `repr(C)` with only integer fields and no padding (4 + 4 + 8 bytes), so
// all of its bytes are initialised.
unsafe impl AsBytes for EchoArg {}

/// `_IOWR('r', 0x01, struct remio_kmod_hello)`.
const REMIO_KMOD_HELLO_ECHO: u32 = _IOWR::<EchoArg>('r' as u32, 0x01);

module! {
    type: RemioKmodHello,
    name: "remio_kmod_hello",
    authors: ["remio"],
    description: "remio stage-1 Rust module: a misc device with one echo ioctl",
    license: "GPL",
}

#[pin_data]
struct RemioKmodHello {
    #[pin]
    _miscdev: MiscDeviceRegistration<HelloDevice>,
}

impl kernel::InPlaceModule for RemioKmodHello {
    fn init(_module: &'static ThisModule) -> impl PinInit<Self, Error> {
        pr_info!("loading (ABI version {REMIO_KMOD_HELLO_VERSION})\n");
        let options = MiscDeviceOptions {
            name: c"remio-kmod-hello",
        };
        try_pin_init!(Self {
            _miscdev <- MiscDeviceRegistration::register(options),
        })
    }
}

/// One open file of `/dev/remio-kmod-hello`: no state.
struct HelloDevice;

#[vtable]
impl MiscDevice for HelloDevice {
    type Ptr = KBox<Self>;

    fn open(_file: &kernel::fs::File, _misc: &MiscDeviceRegistration<Self>) -> Result<KBox<Self>> {
        Ok(KBox::new(HelloDevice, GFP_KERNEL)?)
    }

    fn ioctl(_me: &HelloDevice, _file: &kernel::fs::File, cmd: u32, arg: usize) -> Result<isize> {
        if cmd != REMIO_KMOD_HELLO_ECHO {
            return Err(ENOTTY);
        }
        let (mut reader, mut writer) =
            UserSlice::new(UserPtr::from_addr(arg), _IOC_SIZE(cmd)).reader_writer();
        let mut echo: EchoArg = reader.read()?;
        if echo.reserved != 0 {
            return Err(EINVAL);
        }
        echo.version = REMIO_KMOD_HELLO_VERSION;
        echo.value = echo.value.wrapping_add(1);
        writer.write(&echo)?;
        Ok(0)
    }
}
