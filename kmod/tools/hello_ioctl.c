// SPDX-License-Identifier: GPL-2.0
/*
 * Opens /dev/remio-kmod-hello, calls REMIO_KMOD_HELLO_ECHO once with the value given (default
 * 41) and prints one line the test parses:
 *   REMIO-KMOD-HELLO version=<v> value=<in> answer=<out>
 * Exit status 0 when the module answered value + 1, else 1. Built static for the initramfs.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

struct remio_kmod_hello {
	uint32_t version;
	uint32_t reserved;
	uint64_t value;
};

#define REMIO_KMOD_HELLO_ECHO _IOWR('r', 0x01, struct remio_kmod_hello)

int main(int argc, char **argv)
{
	const char *path = "/dev/remio-kmod-hello";
	uint64_t value = argc > 1 ? strtoull(argv[1], NULL, 0) : 41;
	struct remio_kmod_hello arg = { .version = 0, .reserved = 0, .value = value };
	int fd = open(path, O_RDWR);

	if (fd < 0) {
		printf("REMIO-KMOD-HELLO-FAILED open %s: %s\n", path, strerror(errno));
		return 1;
	}
	if (ioctl(fd, REMIO_KMOD_HELLO_ECHO, &arg) != 0) {
		printf("REMIO-KMOD-HELLO-FAILED ioctl: %s\n", strerror(errno));
		return 1;
	}
	printf("REMIO-KMOD-HELLO version=%u value=%llu answer=%llu\n", arg.version,
	       (unsigned long long)value, (unsigned long long)arg.value);
	/* An unknown command must be refused with ENOTTY. */
	if (ioctl(fd, _IO('r', 0x7f), 0) != -1 || errno != ENOTTY) {
		printf("REMIO-KMOD-HELLO-FAILED unknown ioctl not refused with ENOTTY\n");
		return 1;
	}
	close(fd);
	return arg.value == value + 1 ? 0 : 1;
}
