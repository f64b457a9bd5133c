/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The hypercall window: how the backend VM's x86 stand-in for <asm/bao.h> performs Bao's Remote
 * I/O hypercall (spec/remote-io.md, "The hypercall") on a machine without Bao.
 *
 * The window is BAR0 (memory, 4 KiB) of a QEMU x-pci-proxy-dev whose config space and BAR the
 * host `remio platform` serves over MPQEMU. Every register is 64-bit little endian and is
 * accessed with 8-byte accesses (readq/writeq) only. A write to a bank's CALL register executes
 * the hypercall with the bank's inputs, synchronously (the proxy blocks the vCPU until the
 * platform replies); afterwards the bank holds the outputs, and a read of CALL returns the
 * status exactly as Bao returns it (a signed 64-bit number: 0 success, +1 for an ASK with
 * nothing pending or bad arguments, -3 invalid arguments, ...).
 *
 * One bank per backend vCPU: the stand-in uses bank smp_processor_id() with local interrupts
 * disabled across write-inputs / CALL / read-outputs, so no two contexts ever share a bank.
 *
 * This is the contract with the platform side (crates/remio, `remio run --dispatcher c-driver`);
 * guest/README.md explains it. The Rust side keeps the same numbers (crates/remio/src/guest/
 * backend.rs, `hc`, checked against this file by a unit test); change both together.
 */
#ifndef REMIO_HC_H
#define REMIO_HC_H

/* The proxy device as the platform reports it in config space. */
#define REMIO_HC_VENDOR_ID        0x1b36 /* Red Hat / QEMU */
#define REMIO_HC_DEVICE_ID        0x00fe /* unused by QEMU and by Linux 6.1 drivers */
#define REMIO_HC_BAR_SIZE         0x1000

/* Global registers (read-only). */
#define REMIO_HC_MAGIC            0x000 /* reads REMIO_HC_MAGIC_VALUE */
#define REMIO_HC_VERSION          0x008 /* reads REMIO_HC_VERSION_VALUE */
#define REMIO_HC_DM_COUNT         0x010 /* Remote I/O devices of this backend: dm_id 0..N-1 */
#define REMIO_HC_BANK_COUNT       0x018 /* per-CPU register banks */

#define REMIO_HC_MAGIC_VALUE      0x3143484f494d4552ULL /* "REMIOHC1", little endian */
#define REMIO_HC_VERSION_VALUE    1

/* Register banks: bank b (b < BANK_COUNT) starts at REMIO_HC_BANK(b). */
#define REMIO_HC_BANK_BASE        0x100
#define REMIO_HC_BANK_STRIDE      0x40
#define REMIO_HC_BANK(b)          (REMIO_HC_BANK_BASE + (b) * REMIO_HC_BANK_STRIDE)
#define REMIO_HC_MAX_BANKS        16

/* Offsets inside a bank. */
#define REMIO_HC_B_DM_ID          0x00 /* in */
#define REMIO_HC_B_ADDR           0x08 /* in/out */
#define REMIO_HC_B_OP             0x10 /* in/out */
#define REMIO_HC_B_VALUE          0x18 /* in/out */
#define REMIO_HC_B_REQUEST_ID     0x20 /* in/out */
#define REMIO_HC_B_ACCESS_WIDTH   0x28 /* out */
#define REMIO_HC_B_HAS_PENDING    0x30 /* out: 0/1 flag, evaluated after an ASK's pop */
#define REMIO_HC_B_CALL           0x38 /* write: execute; read: status of the last call */

/*
 * The status the stand-in returns when it cannot reach the window (no proxy bound, or a CPU
 * without a bank): Bao's HC_E_FAILURE (1), negated as Bao's handlers return it.
 */
#define REMIO_HC_STATUS_FAILURE   (-1LL)

/* The ivshmem devices (QEMU's ids): the doorbell has MSI-X, the shared memory has none. */
#define REMIO_IVSHMEM_VENDOR_ID   0x1af4
#define REMIO_IVSHMEM_DEVICE_ID   0x1110
/* BAR of the ivshmem-plain device that maps the frontend's RAM. */
#define REMIO_IVSHMEM_SHMEM_BAR   2

/* bao-io-dispatcher handles at most this many DMs (BAO_IO_MAX_DMS in the driver's UAPI). */
#define REMIO_HC_MAX_DMS          16

#endif
