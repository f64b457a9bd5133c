//! The frontend side of the soak: vCPU threads issuing a mix of accesses as fast as they can,
//! each checking what it reads.
//!
//! The mix, per access (after serving a pending interrupt, if the chosen DM raised one):
//! 25% config reads (1, 2, 4 or 8 bytes), 12% scratch writes and 13% scratch reads (8 bytes,
//! the thread's own register), all served by the device-model process over the socket; 35%
//! QueueNotify writes (queue 0 or 1: ioeventfds, answered in the dispatcher); 15%
//! InterruptStatus reads (the status word), followed by an InterruptACK write when a bit is
//! set.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use remio_hyp::{Completion, FrontendVm, RemioOp};

use super::regs::{self, Expect, Verdict};

/// Accesses a thread claims from the shared budget at a time.
const CLAIM: u64 = 256;

/// How many wrong values (and refused accesses) are described on stderr (all are counted).
const WRONG_REPORTED: u64 = 10;

/// What the frontend threads share.
#[derive(Debug)]
pub struct Shared {
    /// The frontend VM.
    pub fe: FrontendVm,
    /// DMs.
    pub dms: u32,
    /// Per DM: incremented when churn that ends a session of the DM starts and again when it
    /// is over; an access that saw it change (or odd) overlapped the end of a session.
    pub epochs: Vec<AtomicU64>,
    /// Per DM: an interrupt arrived and was not served yet.
    pub irq_pending: Vec<AtomicBool>,
    /// Frontend interrupts received (NOTIFY injections).
    pub interrupts: AtomicU64,
    /// Requests claimed so far (against the budget).
    pub claimed: AtomicU64,
    /// Accesses completed so far (for the stall watchdog and progress).
    pub done: AtomicU64,
    /// Stop now (deadline reached, or an error elsewhere).
    pub stop: AtomicBool,
}

impl Shared {
    /// Shared state for `dms` DMs.
    pub fn new(fe: FrontendVm, dms: u32) -> Self {
        Self {
            fe,
            dms,
            epochs: (0..dms).map(|_| AtomicU64::new(0)).collect(),
            irq_pending: (0..dms).map(|_| AtomicBool::new(false)).collect(),
            interrupts: AtomicU64::new(0),
            claimed: AtomicU64::new(0),
            done: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }
    }
}

/// What one thread counted; summed over threads.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    /// Accesses issued.
    pub accesses: u64,
    /// Config register reads.
    pub config_reads: u64,
    /// Scratch register writes.
    pub scratch_writes: u64,
    /// Scratch register reads.
    pub scratch_reads: u64,
    /// QueueNotify writes.
    pub notifies: u64,
    /// InterruptStatus reads.
    pub status_reads: u64,
    /// InterruptACK writes.
    pub acks: u64,
    /// Interrupts served (InterruptStatus read because an interrupt was pending).
    pub interrupts_served: u64,
    /// Reads whose value was checked and right.
    pub reads_right: u64,
    /// Reads that returned 0 because the session holding them ended (see [`Verdict`]).
    pub reads_abandoned: u64,
    /// Reads not checked (the register was given up on: see the next two).
    pub reads_unverified: u64,
    /// Scratch registers no longer checked because a write of theirs timed out.
    pub given_up_timeout: u64,
    /// Scratch registers no longer checked because 8 writes in a row overlapped churn.
    pub given_up_overlap: u64,
    /// Reads with a wrong value.
    pub wrong_values: u64,
    /// Accesses that timed out.
    pub timeouts: u64,
    /// Accesses the hypervisor refused (unmapped, bad width): a bug of the soak.
    pub access_errors: u64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Self) {
        self.accesses += o.accesses;
        self.config_reads += o.config_reads;
        self.scratch_writes += o.scratch_writes;
        self.scratch_reads += o.scratch_reads;
        self.notifies += o.notifies;
        self.status_reads += o.status_reads;
        self.acks += o.acks;
        self.interrupts_served += o.interrupts_served;
        self.reads_right += o.reads_right;
        self.reads_abandoned += o.reads_abandoned;
        self.reads_unverified += o.reads_unverified;
        self.given_up_timeout += o.given_up_timeout;
        self.given_up_overlap += o.given_up_overlap;
        self.wrong_values += o.wrong_values;
        self.timeouts += o.timeouts;
        self.access_errors += o.access_errors;
    }
}

/// xorshift64*: fast, no allocation, reproducible per thread.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// When a thread stops: after `budget` requests in all (shared), or at `deadline`.
#[derive(Clone, Copy, Debug)]
pub struct Until {
    /// Total requests of all threads.
    pub budget: Option<u64>,
    /// Wall-clock end.
    pub deadline: Option<Instant>,
}

/// One frontend vCPU.
struct Vcpu<'a> {
    id: usize,
    shared: &'a Shared,
    rng: Rng,
    /// Per DM: this thread's scratch register there.
    scratch: Vec<Expect>,
    seq: u64,
    c: Counts,
}

impl Vcpu<'_> {
    /// One access; `None` if the hypervisor refused it.
    fn access(
        &mut self,
        dm: u32,
        op: RemioOp,
        off: u64,
        width: u8,
        value: u64,
    ) -> Option<(Completion, bool)> {
        let epoch = &self.shared.epochs[dm as usize];
        let before = epoch.load(Ordering::Acquire);
        self.c.accesses += 1;
        let r = self
            .shared
            .fe
            .access(op, regs::base_of(dm) + off, width, value);
        let after = epoch.load(Ordering::Acquire);
        self.shared.done.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(c) => {
                if c.timed_out {
                    self.c.timeouts += 1;
                }
                Some((c, before != after || before % 2 == 1))
            }
            Err(e) => {
                self.c.access_errors += 1;
                if self.c.access_errors <= WRONG_REPORTED {
                    eprintln!("soak: vCPU {}: access refused: {e}", self.id);
                }
                None
            }
        }
    }

    fn judge(&mut self, verdict: Verdict, what: &str, dm: u32, off: u64, got: u64) {
        match verdict {
            Verdict::Right => self.c.reads_right += 1,
            Verdict::Abandoned => self.c.reads_abandoned += 1,
            Verdict::Unverified => self.c.reads_unverified += 1,
            Verdict::Wrong => {
                self.c.wrong_values += 1;
                if self.c.wrong_values <= WRONG_REPORTED {
                    eprintln!(
                        "soak: vCPU {}: wrong value: {what} of DM {dm} at +{off:#x} read {got:#x}",
                        self.id
                    );
                }
            }
        }
    }

    fn status_and_ack(&mut self, dm: u32) {
        self.c.status_reads += 1;
        let Some((c, churned)) = self.access(dm, RemioOp::Read, regs::INTERRUPT_STATUS, 4, 0)
        else {
            return;
        };
        if c.timed_out {
            return;
        }
        let verdict = if regs::status_plausible(c.value) {
            Verdict::Right
        } else if churned && c.value == remio_api::ABANDONED_READ_VALUE {
            Verdict::Abandoned
        } else {
            Verdict::Wrong
        };
        self.judge(
            verdict,
            "InterruptStatus",
            dm,
            regs::INTERRUPT_STATUS,
            c.value,
        );
        if c.value != 0 && verdict == Verdict::Right {
            self.c.acks += 1;
            self.access(dm, RemioOp::Write, regs::INTERRUPT_ACK, 4, c.value);
        }
    }

    fn step(&mut self) {
        let dm = u32::try_from(self.rng.below(u64::from(self.shared.dms))).unwrap_or(0);
        if self.shared.irq_pending[dm as usize].swap(false, Ordering::AcqRel) {
            self.c.interrupts_served += 1;
            self.status_and_ack(dm);
            return;
        }
        match self.rng.below(100) {
            0..25 => {
                self.c.config_reads += 1;
                let width = 1u8 << self.rng.below(4);
                let reg =
                    regs::CONFIG.0 + self.rng.below((regs::CONFIG.1 - regs::CONFIG.0) / 8) * 8;
                let off = reg + self.rng.below(8 / u64::from(width)) * u64::from(width);
                let Some((c, churned)) = self.access(dm, RemioOp::Read, off, width, 0) else {
                    return;
                };
                if c.timed_out {
                    return;
                }
                let want = regs::config_value(dm, off, width);
                let verdict = if c.value == want {
                    Verdict::Right
                } else if churned && c.value == remio_api::ABANDONED_READ_VALUE {
                    Verdict::Abandoned
                } else {
                    Verdict::Wrong
                };
                self.judge(verdict, "config read", dm, off, c.value);
            }
            25..37 => {
                self.c.scratch_writes += 1;
                self.seq += 1;
                let value =
                    (self.id as u64) << 56 | u64::from(dm) << 48 | (self.seq & 0xffff_ffff_ffff);
                let off = regs::scratch_of(self.id);
                let Some((c, churned)) = self.access(dm, RemioOp::Write, off, 8, value) else {
                    return;
                };
                match self.scratch[dm as usize].write(value, churned, c.timed_out) {
                    Some(regs::GaveUp::Timeout) => self.c.given_up_timeout += 1,
                    Some(regs::GaveUp::Overlap) => self.c.given_up_overlap += 1,
                    None => {}
                }
            }
            37..50 => {
                self.c.scratch_reads += 1;
                let off = regs::scratch_of(self.id);
                let Some((c, churned)) = self.access(dm, RemioOp::Read, off, 8, 0) else {
                    return;
                };
                if c.timed_out {
                    return;
                }
                let verdict = self.scratch[dm as usize].read(c.value, churned);
                self.judge(verdict, "scratch read", dm, off, c.value);
            }
            50..85 => {
                self.c.notifies += 1;
                let q = self.rng.below(regs::QUEUES);
                self.access(dm, RemioOp::Write, regs::QUEUE_NOTIFY, 4, q);
            }
            _ => self.status_and_ack(dm),
        }
    }
}

/// Runs frontend vCPU `id` until `until` or `shared.stop`, starting from what it knows of its
/// scratch registers (`scratch`, one per DM; registers keep their values across phases);
/// returns its counts and what it knows at the end.
pub fn vcpu(
    id: usize,
    shared: &Arc<Shared>,
    until: Until,
    seed: u64,
    scratch: Vec<Expect>,
) -> (Counts, Vec<Expect>) {
    let mut v = Vcpu {
        id,
        shared,
        rng: Rng::new(seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        scratch,
        // Values stay unique across phases (the seed is the phase).
        seq: (seed & 0xff) << 40,
        c: Counts::default(),
    };
    // Budget: accesses claimed from `shared.claimed` in chunks. A step is one or two accesses,
    // so the balance may go one below zero; the next claim pays that back, and the total
    // overshoots by at most one access per thread.
    let mut left = 0i64;
    let mut steps = 0u64;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        if let Some(d) = until.deadline {
            if steps.is_multiple_of(64) && Instant::now() >= d {
                break;
            }
        }
        if let Some(budget) = until.budget {
            while left <= 0 {
                let got = shared.claimed.fetch_add(CLAIM, Ordering::Relaxed);
                if got >= budget {
                    return (v.c, v.scratch);
                }
                left += i64::try_from(CLAIM.min(budget - got)).unwrap_or(0);
            }
        }
        let before = v.c.accesses;
        v.step();
        steps += 1;
        left -= i64::try_from(v.c.accesses - before).unwrap_or(0);
    }
    (v.c, v.scratch)
}
