// SPDX-License-Identifier: Apache-2.0
/*
 * iopause: measures the guest-visible I/O pause of a device-model restart. One thread issues
 * small O_DIRECT I/Os back to back (a 4 KiB write, then a 4 KiB read of the same block, moving
 * through BLOCKS blocks), times each with CLOCK_MONOTONIC (nanoseconds) and keeps every I/O that
 * took longer than THRESHOLD_MS: while the device model is dead the I/O in flight waits, so a
 * restart shows as one long I/O. O_DIRECT, so every I/O reaches the device (the page cache hides
 * nothing); one at a time, so the latency of an I/O is the gap in the guest's service.
 *
 *   iopause DEV SECONDS [BLOCKS [THRESHOLD_MS]]      (defaults: 256 blocks, 20 ms)
 *
 * Output (at the end, so that printing does not perturb the loop; the serial console does not
 * go through the device model anyway):
 *   IOPAUSE start dev=<DEV> blocks=<n> threshold_ms=<f>
 *   IOPAUSE slow at_ms=<f> ms=<f> op=<write|read>                   (each slow I/O, in order)
 *   IOPAUSE done ios=<n> secs=<f> p50_us=<f> p99_us=<f> max_ms=<f> slow=<n> io_errors=<n>
 * Exit status: 0 clean, 1 any I/O error or data mismatch, 2 bad usage or setup.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BS 4096
#define MAX_SLOW 4096
#define MAX_SAMPLES (1 << 22)

struct slow {
	double at_ms;
	double ms;
	int write;
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	static struct slow slows[MAX_SLOW];
	uint32_t *samples; /* each I/O's latency in microseconds (saturating) */
	uint64_t nblocks = 256, nios = 0, nslow = 0, io_errors = 0, t0, end, max_ns = 0;
	double secs, threshold_ms = 20;
	unsigned char *buf, *back;
	int fd;

	if (argc < 3 || argc > 5) {
		fprintf(stderr, "usage: iopause DEV SECONDS [BLOCKS [THRESHOLD_MS]]\n");
		return 2;
	}
	secs = atof(argv[2]);
	if (argc >= 4)
		nblocks = strtoull(argv[3], NULL, 0);
	if (argc == 5)
		threshold_ms = atof(argv[4]);
	if (secs <= 0 || nblocks < 1 || threshold_ms <= 0) {
		fprintf(stderr, "iopause: SECONDS, BLOCKS and THRESHOLD_MS must be > 0\n");
		return 2;
	}
	fd = open(argv[1], O_RDWR | O_DIRECT);
	if (fd < 0) {
		fprintf(stderr, "iopause: open %s: %s\n", argv[1], strerror(errno));
		return 2;
	}
	samples = malloc(MAX_SAMPLES * sizeof(*samples));
	if (!samples || posix_memalign((void **)&buf, BS, BS) || posix_memalign((void **)&back, BS, BS))
		return 2;
	printf("IOPAUSE start dev=%s blocks=%llu threshold_ms=%.1f\n", argv[1],
	       (unsigned long long)nblocks, threshold_ms);
	fflush(stdout);

	t0 = now_ns();
	end = t0 + (uint64_t)(secs * 1e9);
	for (uint64_t i = 0;; i++) {
		uint64_t blk = (i / 2) % nblocks, a, b, d;
		int write = !(i % 2);
		ssize_t n;

		a = now_ns();
		if (a >= end)
			break;
		if (write) {
			memset(buf, (int)(i & 0xff), BS);
			memcpy(buf, &i, sizeof(i));
			n = pwrite(fd, buf, BS, (off_t)(blk * BS));
		} else {
			n = pread(fd, back, BS, (off_t)(blk * BS));
		}
		b = now_ns();
		if (n != BS) {
			io_errors++;
			fprintf(stderr, "iopause: %s block %llu: %s\n", write ? "write" : "read",
				(unsigned long long)blk, n < 0 ? strerror(errno) : "short");
		} else if (!write && memcmp(buf, back, BS)) {
			io_errors++;
			fprintf(stderr, "iopause: block %llu reads back other data\n",
				(unsigned long long)blk);
		}
		d = b - a;
		if (nios < MAX_SAMPLES)
			samples[nios] = d / 1000 > UINT32_MAX ? UINT32_MAX : (uint32_t)(d / 1000);
		nios++;
		if (d > max_ns)
			max_ns = d;
		if (d / 1e6 > threshold_ms) {
			if (nslow < MAX_SLOW)
				slows[nslow] = (struct slow){ (a - t0) / 1e6, d / 1e6, write };
			nslow++;
		}
	}
	close(fd);

	for (uint64_t k = 0; k < nslow && k < MAX_SLOW; k++)
		printf("IOPAUSE slow at_ms=%.1f ms=%.2f op=%s\n", slows[k].at_ms, slows[k].ms,
		       slows[k].write ? "write" : "read");
	{
		uint64_t kept = nios < MAX_SAMPLES ? nios : MAX_SAMPLES;

		qsort(samples, kept, sizeof(*samples), cmp_u32);
		printf("IOPAUSE done ios=%llu secs=%.1f p50_us=%u p99_us=%u max_ms=%.2f slow=%llu "
		       "io_errors=%llu\n",
		       (unsigned long long)nios, (now_ns() - t0) / 1e9, kept ? samples[kept / 2] : 0,
		       kept ? samples[kept * 99 / 100] : 0, max_ns / 1e6, (unsigned long long)nslow,
		       (unsigned long long)io_errors);
	}
	return io_errors ? 1 : 0;
}
