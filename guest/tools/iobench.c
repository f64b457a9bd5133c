// SPDX-License-Identifier: Apache-2.0
/*
 * iobench: a small static block benchmark for the remio guest (fio would need its shared
 * libraries in the initramfs). Reads only; O_DIRECT so the guest page cache is not measured.
 *
 *   iobench seq  DEV MIB            MIB sequential 1 MiB reads, from the start of DEV and
 *                                   wrapping around at its end
 *   iobench rand DEV SECONDS QD     4 KiB random reads, QD threads each with one read in flight
 *   iobench file PATH KIB           the whole regular file PATH once, sequentially, in reads of
 *                                   KIB KiB (a file on virtio-fs, say); O_DIRECT where the file
 *                                   system takes it, else after dropping the page cache
 *
 * Prints one line each:  IOBENCH seq mib_per_s=<f> bytes=<n> secs=<f>
 *                        IOBENCH rand iops=<f> ios=<n> secs=<f>
 *                        IOBENCH file mib_per_s=<f> bytes=<n> reads=<n> secs=<f> direct=<0|1>
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int open_dev(const char *dev)
{
	int fd = open(dev, O_RDONLY | O_DIRECT);

	if (fd < 0) {
		fprintf(stderr, "iobench: open %s: %s\n", dev, strerror(errno));
		exit(2);
	}
	return fd;
}

static int seq(const char *dev, long mib)
{
	const size_t bs = 1 << 20;
	int fd = open_dev(dev);
	void *buf;
	uint64_t done = 0, size = 0, mibs;
	double t0, t;

	if (ioctl(fd, BLKGETSIZE64, &size) || size < bs) {
		fprintf(stderr, "iobench: %s: no size or smaller than 1 MiB\n", dev);
		return 2;
	}
	mibs = size / bs;
	if (posix_memalign(&buf, 4096, bs))
		return 2;
	t0 = now();
	for (long i = 0; i < mib; i++) {
		ssize_t n = pread(fd, buf, bs, (off_t)((uint64_t)i % mibs) * bs);

		if (n <= 0) {
			fprintf(stderr, "iobench: read at %ld MiB: %s\n", i, n ? strerror(errno) : "EOF");
			return 1;
		}
		done += n;
	}
	t = now() - t0;
	printf("IOBENCH seq mib_per_s=%.2f bytes=%llu secs=%.3f\n", done / 1048576.0 / t,
	       (unsigned long long)done, t);
	return 0;
}

struct rand_arg {
	const char *dev;
	uint64_t blocks;
	double until;
	unsigned int seed;
	uint64_t ios;
	int err;
};

static void *rand_worker(void *p)
{
	struct rand_arg *a = p;
	int fd = open_dev(a->dev);
	void *buf;

	if (posix_memalign(&buf, 4096, 4096)) {
		a->err = 1;
		return NULL;
	}
	while (now() < a->until) {
		uint64_t blk = ((uint64_t)rand_r(&a->seed) << 31 | rand_r(&a->seed)) % a->blocks;

		if (pread(fd, buf, 4096, (off_t)(blk * 4096)) != 4096) {
			a->err = errno ? errno : EIO;
			break;
		}
		a->ios++;
	}
	close(fd);
	free(buf);
	return NULL;
}

static int rnd(const char *dev, double secs, int qd)
{
	int fd = open_dev(dev);
	uint64_t size = 0, ios = 0;
	struct rand_arg args[64];
	pthread_t th[64];
	double t0;
	int err = 0;

	if (ioctl(fd, BLKGETSIZE64, &size))
		size = (uint64_t)lseek(fd, 0, SEEK_END); /* a regular file, for testing on the host */
	if (size < 4096 || size == (uint64_t)-1) {
		fprintf(stderr, "iobench: cannot size %s\n", dev);
		return 2;
	}
	close(fd);
	if (qd < 1 || qd > 64)
		qd = 16;
	t0 = now();
	for (int i = 0; i < qd; i++) {
		args[i] = (struct rand_arg){ dev, size / 4096, t0 + secs, 0x9e3779b9u * (i + 1), 0, 0 };
		pthread_create(&th[i], NULL, rand_worker, &args[i]);
	}
	for (int i = 0; i < qd; i++) {
		pthread_join(th[i], NULL);
		ios += args[i].ios;
		err |= args[i].err;
	}
	secs = now() - t0;
	if (err) {
		fprintf(stderr, "iobench: read error %d\n", err);
		return 1;
	}
	printf("IOBENCH rand iops=%.1f ios=%llu secs=%.3f\n", ios / secs, (unsigned long long)ios, secs);
	return 0;
}

/* Empties the page cache (clean pages), so that a buffered read of PATH reaches its device. */
static int drop_caches(void)
{
	int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
	int ok;

	sync();
	if (fd < 0)
		return -1;
	ok = write(fd, "3\n", 2) == 2;
	close(fd);
	return ok ? 0 : -1;
}

static int file(const char *path, long kib)
{
	size_t bs;
	int direct = 1;
	int fd = open(path, O_RDONLY | O_DIRECT);
	void *buf;
	uint64_t done = 0, reads = 0;
	double t0, t;

	if (kib < 4 || kib > 65536 || kib % 4) {
		fprintf(stderr, "iobench: file: KIB must be a multiple of 4 from 4 to 65536\n");
		return 2;
	}
	bs = (size_t)kib << 10;
	if (fd < 0 && errno == EINVAL) {
		/* No O_DIRECT on this file system: read through a page cache emptied first. */
		direct = 0;
		if (drop_caches()) {
			fprintf(stderr, "iobench: no O_DIRECT and cannot drop caches: %s\n",
				strerror(errno));
			return 2;
		}
		fd = open(path, O_RDONLY);
	}
	if (fd < 0) {
		fprintf(stderr, "iobench: open %s: %s\n", path, strerror(errno));
		return 2;
	}
	if (posix_memalign(&buf, 4096, bs))
		return 2;
	t0 = now();
	for (;;) {
		ssize_t n = read(fd, buf, bs);

		if (n < 0) {
			fprintf(stderr, "iobench: read at %llu bytes: %s\n", (unsigned long long)done,
				strerror(errno));
			return 1;
		}
		if (n == 0)
			break;
		done += n;
		reads++;
	}
	t = now() - t0;
	if (!done) {
		fprintf(stderr, "iobench: %s is empty\n", path);
		return 1;
	}
	printf("IOBENCH file mib_per_s=%.2f bytes=%llu reads=%llu secs=%.3f direct=%d\n",
	       done / 1048576.0 / t, (unsigned long long)done, (unsigned long long)reads, t, direct);
	close(fd);
	free(buf);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "seq"))
		return seq(argv[2], atol(argv[3]));
	if (argc == 5 && !strcmp(argv[1], "rand"))
		return rnd(argv[2], atof(argv[3]), atoi(argv[4]));
	if (argc == 4 && !strcmp(argv[1], "file"))
		return file(argv[2], atol(argv[3]));
	fprintf(stderr, "usage: iobench seq DEV MIB | iobench rand DEV SECONDS QD | "
			"iobench file PATH KIB\n");
	return 2;
}
