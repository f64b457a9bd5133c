// SPDX-License-Identifier: Apache-2.0
/*
 * baodefect: shows defects of the posted Bao I/O dispatcher driver from inside the backend VM
 * (docs/c-driver.md, "Defects shown from the backend VM"). Static, in the backend initramfs as
 * /usr/bin/baodefect. The UAPI numbers and layouts are those of ../shared/spec/remote-io.md.
 *
 *   baodefect deassign DM ADDR   get a DM fd for DM (DM_GET_INFO), assign an ioeventfd on
 *                                [ADDR, ADDR+4), deassign it, assign it again. A driver whose
 *                                DEASSIGN deassigns only lets the second assign succeed; the
 *                                posted one re-assigns in DEASSIGN, so the second gets EEXIST.
 *   baodefect close DM           get a DM fd for DM and close it while this process lives
 *                                (a line before the close, one after it returns).
 *
 * Each prints one line "REMIO-DEFECT <what> <result>", then waits for a signal: the DM fd
 * (whose release destroys the DM on the posted driver) stays open until the VM powers off,
 * unless closing it is the point.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

struct bao_dm_info {
	uint32_t id;
	uint32_t pad; /* implicit in the posted UAPI */
	uint64_t shmem_addr;
	uint64_t shmem_size;
	uint32_t irq;
	int32_t fd;
};

struct bao_ioeventfd {
	uint32_t fd;
	uint32_t flags;
	uint64_t addr;
	uint32_t len;
	uint32_t reserved;
	uint64_t data;
};

_Static_assert(sizeof(struct bao_dm_info) == 32, "bao_dm_info is 32 bytes");
_Static_assert(sizeof(struct bao_ioeventfd) == 32, "bao_ioeventfd is 32 bytes");

#define BAO_IOCTL_DM_GET_INFO 0xC020A601UL
#define BAO_IOCTL_IOEVENTFD 0x4020A604UL
#define BAO_IOEVENTFD_FLAG_DEASSIGN (1U << 2)

static int dm_fd(unsigned id)
{
	struct bao_dm_info info = { .id = id, .fd = -1 };
	int ctl = open("/dev/bao-io-dispatcher", O_RDWR);

	if (ctl < 0) {
		printf("REMIO-DEFECT open-failed %s\n", strerror(errno));
		exit(2);
	}
	if (ioctl(ctl, BAO_IOCTL_DM_GET_INFO, &info) < 0 || info.fd < 0) {
		printf("REMIO-DEFECT get-info-failed %s\n", strerror(errno));
		exit(2);
	}
	close(ctl);
	return info.fd;
}

static int ioeventfd(int dm, int efd, uint64_t addr, uint32_t flags)
{
	struct bao_ioeventfd c = { .fd = (uint32_t)efd, .flags = flags, .addr = addr, .len = 4 };

	return ioctl(dm, BAO_IOCTL_IOEVENTFD, &c) < 0 ? -errno : 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "deassign")) {
		int dm = dm_fd((unsigned)strtoul(argv[2], NULL, 0));
		uint64_t addr = strtoull(argv[3], NULL, 0);
		int efd = eventfd(0, EFD_CLOEXEC);
		int a = ioeventfd(dm, efd, addr, 0);
		int d = ioeventfd(dm, efd, addr, BAO_IOEVENTFD_FLAG_DEASSIGN);
		int again = ioeventfd(dm, efd, addr, 0);

		printf("REMIO-DEFECT deassign assign=%d deassign=%d assign-again=%d (%s)\n", a, d,
		       again, again == -EEXIST ? "still assigned: DEASSIGN re-assigned" : "ok");
	} else if (argc == 3 && !strcmp(argv[1], "close")) {
		int dm = dm_fd((unsigned)strtoul(argv[2], NULL, 0));
		int r;

		/* The posted driver's release may not return: say so before. */
		printf("REMIO-DEFECT close dm=%s fd=%d closing\n", argv[2], dm);
		fflush(stdout);
		r = close(dm);
		printf("REMIO-DEFECT close dm=%s fd=%d closed=%d\n", argv[2], dm, r);
	} else {
		fprintf(stderr, "usage: baodefect deassign DM ADDR | baodefect close DM\n");
		return 2;
	}
	fflush(stdout);
	for (;;)
		pause();
}
