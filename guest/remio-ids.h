/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The contract between the remio MPQEMU remote (crates/frontend/src/qemu.rs) and the guest glue
 * module (guest/glue/remio_glue.c). guest/README.md explains each value. The Rust side keeps
 * the same numbers; change both together.
 */
#ifndef REMIO_IDS_H
#define REMIO_IDS_H

/* The x-pci-proxy-dev device as the remote reports it in config space. */
#define REMIO_PROXY_VENDOR_ID      0x1b36 /* Red Hat / QEMU */
#define REMIO_PROXY_DEVICE_ID      0x00ff /* unused by QEMU and by Linux 6.1 drivers */
/* Subsystem vendor id the remote reports; the subsystem (device) id is the window count. */
#define REMIO_PROXY_SUBSYS_VENDOR  0x1b36

/* Register windows inside BAR0 (memory BAR): window i is [i * 0x200, i * 0x200 + 0x200). */
#define REMIO_WINDOW_SIZE          0x200
#define REMIO_MAX_WINDOWS          32

/* The ivshmem-doorbell device (QEMU's ids). MSI-X vector i is window i's interrupt. */
#define REMIO_IVSHMEM_VENDOR_ID    0x1af4
#define REMIO_IVSHMEM_DEVICE_ID    0x1110

#endif
