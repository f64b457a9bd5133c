//! The Remote I/O hypercall (Bao hypercall number 2): operations, status codes and the register
//! ABI of each architecture, as pure functions (`spec/remote-io.md`, "The hypercall").
//!
//! The pure encoders and decoders are what the tests pin; the inline assembly in `native`
//! only moves registers and exists only on the architectures that have the instruction.

/// Bao's hypercall id for Remote I/O (`REMIO_HC_ID`).
pub const REMIO_HC_ID: u64 = 2;

/// The operation field of a hypercall or a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum RemioOp {
    /// Complete a write request.
    Write = 0,
    /// Complete a read request; the value is what the frontend reads.
    Read = 1,
    /// Pop the oldest pending request of the device.
    Ask = 2,
    /// Inject the frontend interrupt of the device.
    Notify = 3,
}

impl RemioOp {
    /// Decodes an op field; `None` for values Bao does not define.
    pub fn from_raw(raw: u64) -> Option<Self> {
        match raw {
            0 => Some(Self::Write),
            1 => Some(Self::Read),
            2 => Some(Self::Ask),
            3 => Some(Self::Notify),
            _ => None,
        }
    }
}

/// Bao's Remote I/O status codes. Handlers return them negated, except an ASK that finds
/// nothing (or is malformed), which returns `+1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(i64)]
pub enum RemioStatus {
    /// 0: success.
    #[error("success")]
    Success = 0,
    /// 1: failure (for ASK: nothing pending, or bad arguments).
    #[error("failure")]
    Failure = 1,
    /// 2: the hypercall id is not one Bao knows.
    #[error("invalid hypercall id")]
    InvalidHypercall = 2,
    /// 3: invalid arguments.
    #[error("invalid arguments")]
    InvalidArgs = 3,
}

impl RemioStatus {
    /// The value a handler puts in the status register for this code on a non-ASK op.
    pub fn negated(self) -> i64 {
        -(self as i64)
    }
}

/// Hypercall inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RemioArgs {
    /// Index of the device in the calling backend's Remote I/O device list.
    pub dm_id: u64,
    /// ASK: must be 0. Completions: ignored by Bao (the slot has it).
    pub addr: u64,
    /// A [`RemioOp`] as a raw value (kept raw so that bad ops can be expressed and refused).
    pub op: u64,
    /// ASK: must be 0. READ completion: the value the frontend reads.
    pub value: u64,
    /// Completions: the slot index received from ASK.
    pub request_id: u64,
}

/// Hypercall outputs, exactly as the registers carry them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RemioRet {
    /// The raw status register: 0, a negated [`RemioStatus`], or ASK's `+1`.
    pub status: i64,
    /// ASK: the trapped address.
    pub addr: u64,
    /// ASK: [`RemioOp::Write`] or [`RemioOp::Read`].
    pub op: u64,
    /// ASK on a write: the full register value written.
    pub value: u64,
    /// ASK: access width in bytes (1, 2, 4, 8).
    pub access_width: u64,
    /// ASK: the slot index, to echo on completion.
    pub request_id: u64,
    /// ASK: 1 if the FIFO still has requests after the pop, else 0. A flag, not a count.
    pub has_pending: u64,
}

impl RemioRet {
    /// A result carrying only a raw status.
    pub fn with_status(status: i64) -> Self {
        Self {
            status,
            ..Self::default()
        }
    }

    /// Interprets the raw status: `Ok` on 0; the [`RemioStatus`] otherwise, whether Bao
    /// negated it or not (ASK's `+1` is [`RemioStatus::Failure`]). An unknown value is
    /// reported as [`RemioStatus::Failure`].
    pub fn check(&self) -> Result<(), RemioStatus> {
        match self.status.unsigned_abs() {
            0 => Ok(()),
            2 => Err(RemioStatus::InvalidHypercall),
            3 => Err(RemioStatus::InvalidArgs),
            _ => Err(RemioStatus::Failure),
        }
    }

    /// ASK's `has_pending` as a boolean: any non-zero value means "more to fetch".
    pub fn has_pending(&self) -> bool {
        self.has_pending != 0
    }
}

/// SMCCC function id bits (Arm DEN0028): fast call, 64-bit convention, owner = vendor hypervisor.
const SMCCC_FAST_CALL: u64 = 1 << 31;
const SMCCC_SMC64: u64 = 1 << 30;
const SMCCC_OWNER_VENDOR_HYP: u64 = 6 << 24;

/// arm64: `hvc #0`; x0 = function id; x1..x5 = inputs; x0 = status; x1..x6 = outputs.
pub mod arm64 {
    use super::*;

    /// x0 for the Remote I/O hypercall, SMC64 form: 0xC6000002.
    pub const FUNCTION_ID: u64 =
        SMCCC_FAST_CALL | SMCCC_SMC64 | SMCCC_OWNER_VENDOR_HYP | REMIO_HC_ID;
    /// The SMC32 form, which Bao also accepts: 0x86000002.
    pub const FUNCTION_ID_SMC32: u64 = SMCCC_FAST_CALL | SMCCC_OWNER_VENDOR_HYP | REMIO_HC_ID;

    /// Registers x0..x5 for a call.
    pub fn encode(args: &RemioArgs) -> [u64; 6] {
        [
            FUNCTION_ID,
            args.dm_id,
            args.addr,
            args.op,
            args.value,
            args.request_id,
        ]
    }

    /// The result from registers x0..x6 after the call.
    pub fn decode(regs: [u64; 7]) -> RemioRet {
        RemioRet {
            status: i64::from_ne_bytes(regs[0].to_ne_bytes()),
            addr: regs[1],
            op: regs[2],
            value: regs[3],
            access_width: regs[4],
            request_id: regs[5],
            has_pending: regs[6],
        }
    }
}

/// 32-bit arm: `hvc #0`; r0 = SMC32 function id; r1..r5 = inputs; r0 = status; r1..r6 outputs.
pub mod arm {
    use super::*;

    /// r0 for the Remote I/O hypercall: the SMC32 function id 0x86000002.
    pub const FUNCTION_ID: u32 = 0x8600_0002;
    const _: () = assert!(FUNCTION_ID as u64 == arm64::FUNCTION_ID_SMC32);

    /// An input that does not fit a 32-bit register.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
    #[error("hypercall argument {name} = {value:#x} does not fit a 32-bit register")]
    pub struct ArgTooWide {
        /// Which input.
        pub name: &'static str,
        /// Its value.
        pub value: u64,
    }

    fn narrow(name: &'static str, value: u64) -> Result<u32, ArgTooWide> {
        u32::try_from(value).map_err(|_| ArgTooWide { name, value })
    }

    /// Registers r0..r5 for a call; an input wider than 32 bits is refused, not truncated.
    pub fn encode(args: &RemioArgs) -> Result<[u32; 6], ArgTooWide> {
        Ok([
            FUNCTION_ID,
            narrow("dm_id", args.dm_id)?,
            narrow("addr", args.addr)?,
            narrow("op", args.op)?,
            narrow("value", args.value)?,
            narrow("request_id", args.request_id)?,
        ])
    }

    /// The result from registers r0..r6; the status is sign-extended from r0.
    pub fn decode(regs: [u32; 7]) -> RemioRet {
        RemioRet {
            status: i64::from(i32::from_ne_bytes(regs[0].to_ne_bytes())),
            addr: u64::from(regs[1]),
            op: u64::from(regs[2]),
            value: u64::from(regs[3]),
            access_width: u64::from(regs[4]),
            request_id: u64::from(regs[5]),
            has_pending: u64::from(regs[6]),
        }
    }
}

/// riscv64: `ecall` through SBI; a7 = extension id, a6 = function id, a0..a4 = inputs;
/// a0 = SBI error (always 0 for Bao), a1 = the Remote I/O status, a2..a7 = outputs.
pub mod riscv64 {
    use super::*;

    /// a7: Bao's SBI extension id.
    pub const EXTENSION_ID: u64 = 0x0800_0BA0;
    /// a6: the function id.
    pub const FUNCTION_ID: u64 = REMIO_HC_ID;

    /// The SBI layer itself failed (a0 non-zero): the call never reached Remote I/O.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
    #[error("SBI error {0}")]
    pub struct SbiError(pub i64);

    /// Registers a0..a7 for a call (a5 unused, 0).
    pub fn encode(args: &RemioArgs) -> [u64; 8] {
        [
            args.dm_id,
            args.addr,
            args.op,
            args.value,
            args.request_id,
            0,
            FUNCTION_ID,
            EXTENSION_ID,
        ]
    }

    /// The result from registers a0..a7. The Remote I/O status is read from **a1**; a0 is the
    /// SBI error. (The posted driver reads a0 and so takes an empty ASK for a success.)
    pub fn decode(regs: [u64; 8]) -> Result<RemioRet, SbiError> {
        let sbi_error = i64::from_ne_bytes(regs[0].to_ne_bytes());
        if sbi_error != 0 {
            return Err(SbiError(sbi_error));
        }
        Ok(RemioRet {
            status: i64::from_ne_bytes(regs[1].to_ne_bytes()),
            addr: regs[2],
            op: regs[3],
            value: regs[4],
            access_width: regs[5],
            request_id: regs[6],
            has_pending: regs[7],
        })
    }
}

/// The hypercall instruction itself, for a backend VM running on Bao. Built only where the
/// instruction exists; it calls the pure functions above for everything but moving registers.
#[cfg(any(target_arch = "aarch64", target_arch = "riscv64"))]
pub mod native {
    use super::*;
    use crate::platform::Hypercall;

    /// Issues real Remote I/O hypercalls. Only meaningful inside a Bao backend VM.
    #[derive(Debug, Default)]
    pub struct NativeHypercall;

    impl Hypercall for NativeHypercall {
        #[cfg(target_arch = "aarch64")]
        fn remote_io(&self, args: &RemioArgs) -> RemioRet {
            let r = arm64::encode(args);
            let mut out = [0u64; 7];
            // SAFETY: `hvc #0` with an SMCCC function id traps to the hypervisor, which reads
            // x0..x5 and writes x0..x6; no memory is accessed through these registers, and
            // every register the call writes is declared as an output.
            unsafe {
                core::arch::asm!(
                    "hvc #0",
                    inlateout("x0") r[0] => out[0],
                    inlateout("x1") r[1] => out[1],
                    inlateout("x2") r[2] => out[2],
                    inlateout("x3") r[3] => out[3],
                    inlateout("x4") r[4] => out[4],
                    inlateout("x5") r[5] => out[5],
                    lateout("x6") out[6],
                    options(nostack),
                );
            }
            arm64::decode(out)
        }

        #[cfg(target_arch = "riscv64")]
        fn remote_io(&self, args: &RemioArgs) -> RemioRet {
            let r = riscv64::encode(args);
            let mut out = [0u64; 8];
            // SAFETY: `ecall` from S/U mode enters the SBI implementation (Bao), which reads
            // a0..a4, a6, a7 and writes a0..a7; all are declared, no memory is touched.
            unsafe {
                core::arch::asm!(
                    "ecall",
                    inlateout("a0") r[0] => out[0],
                    inlateout("a1") r[1] => out[1],
                    inlateout("a2") r[2] => out[2],
                    inlateout("a3") r[3] => out[3],
                    inlateout("a4") r[4] => out[4],
                    inlateout("a5") r[5] => out[5],
                    inlateout("a6") r[6] => out[6],
                    inlateout("a7") r[7] => out[7],
                    options(nostack),
                );
            }
            riscv64::decode(out).unwrap_or_else(|e| RemioRet::with_status(-e.0.saturating_abs()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ASK: RemioArgs = RemioArgs {
        dm_id: 3,
        addr: 0,
        op: RemioOp::Ask as u64,
        value: 0,
        request_id: 0,
    };

    #[test]
    fn function_ids_match_the_spec_table() {
        assert_eq!(arm64::FUNCTION_ID, 0xC600_0002);
        assert_eq!(arm64::FUNCTION_ID_SMC32, 0x8600_0002);
        assert_eq!(arm::FUNCTION_ID, 0x8600_0002);
        assert_eq!(riscv64::EXTENSION_ID, 0x0800_0BA0);
        assert_eq!(riscv64::FUNCTION_ID, 2);
    }

    #[test]
    fn arm64_inputs_go_to_x1_to_x5() {
        assert_eq!(arm64::encode(&ASK), [0xC600_0002, 3, 0, 2, 0, 0]);
    }

    #[test]
    fn arm64_outputs_come_from_x0_to_x6() {
        let ret = arm64::decode([0, 0xa000_0050, 0, 7, 4, 5, 1]);
        assert_eq!(
            ret,
            RemioRet {
                status: 0,
                addr: 0xa000_0050,
                op: 0,
                value: 7,
                access_width: 4,
                request_id: 5,
                has_pending: 1
            }
        );
        assert!(ret.has_pending());
        assert_eq!(ret.check(), Ok(()));
    }

    #[test]
    fn arm64_negative_status_is_decoded() {
        let ret = arm64::decode([(-3i64).cast_unsigned(), 0, 0, 0, 0, 0, 0]);
        assert_eq!(ret.status, -3);
        assert_eq!(ret.check(), Err(RemioStatus::InvalidArgs));
    }

    #[test]
    fn arm32_refuses_wide_arguments_and_sign_extends_status() {
        let wide = RemioArgs {
            addr: 1 << 32,
            ..ASK
        };
        assert_eq!(
            arm::encode(&wide),
            Err(arm::ArgTooWide {
                name: "addr",
                value: 1 << 32
            })
        );
        assert_eq!(arm::encode(&ASK), Ok([0x8600_0002, 3, 0, 2, 0, 0]));
        let ret = arm::decode([0xffff_fffd, 0, 0, 0, 0, 0, 0]);
        assert_eq!(ret.status, -3);
    }

    #[test]
    fn riscv_inputs_go_to_a0_to_a4_with_ids_in_a6_a7() {
        let regs = riscv64::encode(&RemioArgs {
            dm_id: 1,
            addr: 2,
            op: 1,
            value: 4,
            request_id: 5,
        });
        assert_eq!(regs, [1, 2, 1, 4, 5, 0, 2, 0x0800_0BA0]);
    }

    #[test]
    fn riscv_status_is_read_from_a1_not_a0() {
        // An empty ASK: SBI error 0 in a0, Remote I/O status +1 in a1.
        let ret = riscv64::decode([0, 1, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(ret.status, 1);
        assert_eq!(ret.check(), Err(RemioStatus::Failure));
        let ret = riscv64::decode([0, 0, 0x50, 0, 9, 4, 2, 0]).unwrap();
        assert_eq!(
            (ret.addr, ret.value, ret.access_width, ret.request_id),
            (0x50, 9, 4, 2)
        );
        assert!(!ret.has_pending());
    }

    #[test]
    fn riscv_sbi_error_is_surfaced() {
        assert_eq!(
            riscv64::decode([(-2i64).cast_unsigned(), 0, 0, 0, 0, 0, 0, 0]),
            Err(riscv64::SbiError(-2))
        );
    }

    #[test]
    fn ask_positive_one_is_failure_not_success() {
        assert_eq!(RemioRet::with_status(1).check(), Err(RemioStatus::Failure));
        assert_eq!(RemioRet::with_status(-1).check(), Err(RemioStatus::Failure));
        assert_eq!(RemioStatus::InvalidArgs.negated(), -3);
    }

    #[test]
    fn ops_decode() {
        for op in [RemioOp::Write, RemioOp::Read, RemioOp::Ask, RemioOp::Notify] {
            assert_eq!(RemioOp::from_raw(op as u64), Some(op));
        }
        assert_eq!(RemioOp::from_raw(4), None);
    }
}
