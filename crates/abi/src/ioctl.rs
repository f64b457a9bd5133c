//! Linux's generic ioctl number encoding (`include/uapi/asm-generic/ioctl.h`), as `const fn`s so
//! that every number in this crate is computed, not copied.
//!
//! The generic layout is used by x86, arm, arm64 and riscv: 8 bits of number, 8 of type, 14 of
//! argument size and 2 of direction.

const NRBITS: u32 = 8;
const TYPEBITS: u32 = 8;
const SIZEBITS: u32 = 14;

const NRSHIFT: u32 = 0;
const TYPESHIFT: u32 = NRSHIFT + NRBITS;
const SIZESHIFT: u32 = TYPESHIFT + TYPEBITS;
const DIRSHIFT: u32 = SIZESHIFT + SIZEBITS;

/// `_IOC_NONE`: no argument.
pub const IOC_NONE: u32 = 0;
/// `_IOC_WRITE`: userspace writes the argument (the kernel reads it).
pub const IOC_WRITE: u32 = 1;
/// `_IOC_READ`: userspace reads the argument back.
pub const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)`. Panics at compile time if `size` does not fit in 14 bits.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < (1 << SIZEBITS), "ioctl argument too large");
    #[expect(
        clippy::cast_possible_truncation,
        reason = "size checked against 14 bits above"
    )]
    let size = size as u32;
    (dir << DIRSHIFT) | ((ty as u32) << TYPESHIFT) | ((nr as u32) << NRSHIFT) | (size << SIZESHIFT)
}

/// `_IOW(type, nr, T)`.
pub const fn iow<T>(ty: u8, nr: u8) -> u32 {
    ioc(IOC_WRITE, ty, nr, core::mem::size_of::<T>())
}

/// `_IOR(type, nr, T)`.
pub const fn ior<T>(ty: u8, nr: u8) -> u32 {
    ioc(IOC_READ, ty, nr, core::mem::size_of::<T>())
}

/// `_IOWR(type, nr, T)`.
pub const fn iowr<T>(ty: u8, nr: u8) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, core::mem::size_of::<T>())
}

/// `_IO(type, nr)`.
pub const fn io(ty: u8, nr: u8) -> u32 {
    ioc(IOC_NONE, ty, nr, 0)
}

/// The argument size encoded in an ioctl number.
pub const fn ioc_size(cmd: u32) -> usize {
    ((cmd >> SIZESHIFT) & ((1 << SIZEBITS) - 1)) as usize
}

/// The type byte encoded in an ioctl number.
pub const fn ioc_type(cmd: u32) -> u8 {
    ((cmd >> TYPESHIFT) & 0xff) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_linux_numbers_are_reproduced() {
        // KVM_CREATE_VM = _IO(0xAE, 0x01), KVM_IOEVENTFD = _IOW(0xAE, 0x79, struct kvm_ioeventfd
        // of 64 bytes), KVM_GET_API_VERSION = _IO(0xAE, 0x00).
        assert_eq!(io(0xAE, 0x01), 0xAE01);
        assert_eq!(ioc(IOC_WRITE, 0xAE, 0x79, 64), 0x4040_AE79);
        assert_eq!(io(0xAE, 0x00), 0xAE00);
    }

    #[test]
    fn fields_decode_back() {
        let cmd = iowr::<[u64; 6]>(0xA6, 2);
        assert_eq!(ioc_size(cmd), 48);
        assert_eq!(ioc_type(cmd), 0xA6);
    }
}
