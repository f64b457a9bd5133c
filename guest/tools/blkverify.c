// SPDX-License-Identifier: Apache-2.0
/*
 * blkverify: a small static data-integrity checker for the remio guest's disk. It writes random
 * 4 KiB blocks, each stamped with a header and a payload derived from it, reads blocks back and
 * checks them against what it last wrote there, and ends with a read-back of every block it
 * wrote. O_DIRECT, so every access reaches the device and the guest page cache hides nothing.
 *
 *   blkverify DEV SECONDS QD [BLOCKS]
 *
 * QD threads (1..64) each keep one request in flight, so the device sees queue depth QD. Thread
 * i owns the blocks b with b % QD == i (no two requests ever race on one block), picks one of
 * them at random, and either writes it (a never-written block always; otherwise half the time)
 * with the next generation, or reads it and compares it byte for byte with what that
 * generation's write put there. One in 64 writes is followed by fdatasync (a virtio-blk FLUSH).
 * BLOCKS limits the blocks used (default: the whole device). The last generation of every block
 * is kept in memory (4 bytes a block).
 *
 * A block holds: magic, block number, generation, run seed, a checksum (FNV-1a over the rest of
 * the block), then a payload from an xorshift generator seeded by (seed, block, generation). A
 * mismatch prints what it found: another block's number (a misdirected write), an older
 * generation (a lost write), or a bad checksum (torn or corrupted data).
 *
 * Output:  BLKVERIFY start dev=<DEV> blocks=<n> qd=<n> seed=<hex>
 *          BLKVERIFY progress secs=<n> writes=<n> verifies=<n> flushes=<n> errors=<n>  (every 10 s)
 *          BLKVERIFY MISMATCH block=<n> ...                                          (each error)
 *          BLKVERIFY done secs=<f> blocks=<n> written_blocks=<n> writes=<n> verifies=<n>
 *                         flushes=<n> final_verified=<n> errors=<n> io_errors=<n>
 * Exit status: 0 clean, 1 any mismatch or I/O error, 2 bad usage or setup.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define BS 4096
#define MAGIC 0x594649524556424bull /* "KBVERIFY" little-endian */
#define MAX_QD 64
#define MAX_REPORTS 20

struct header {
	uint64_t magic;
	uint64_t block;
	uint64_t gen;
	uint64_t seed;
	uint64_t checksum;
};

static const char *dev;
static uint64_t nblocks;
static uint64_t run_seed;
static int qd;
static double until;
static uint32_t *gens; /* last generation written per block; 0 = never written */
static atomic_ullong writes, verifies, flushes, errors, io_errors;

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t xorshift(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static uint64_t mix(uint64_t a, uint64_t b, uint64_t c)
{
	uint64_t s = a * 0x9e3779b97f4a7c15ull ^ (b + 0x632be59bd9b4e019ull) * 0xbf58476d1ce4e5b9ull ^
		     (c + 1) * 0x94d049bb133111ebull;

	return s ? s : 1;
}

static uint64_t fnv1a(const unsigned char *p, size_t n, uint64_t h)
{
	for (size_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

/* The checksum covers the header before it and everything after it. */
static uint64_t block_checksum(const unsigned char *buf)
{
	uint64_t h = fnv1a(buf, offsetof(struct header, checksum), 0xcbf29ce484222325ull);

	return fnv1a(buf + sizeof(struct header), BS - sizeof(struct header), h);
}

/* Fills buf with exactly what generation gen of block blk holds. */
static void fill(unsigned char *buf, uint64_t blk, uint64_t gen)
{
	struct header h = { MAGIC, blk, gen, run_seed, 0 };
	uint64_t s = mix(run_seed, blk, gen);

	for (size_t off = sizeof(h); off < BS; off += 8) {
		uint64_t v = xorshift(&s);

		memcpy(buf + off, &v, 8);
	}
	memcpy(buf, &h, sizeof(h));
	h.checksum = block_checksum(buf);
	memcpy(buf, &h, sizeof(h));
}

static void report(uint64_t blk, uint64_t want_gen, const unsigned char *got, const char *when)
{
	struct header h;
	unsigned long long n = atomic_fetch_add(&errors, 1) + 1;

	if (n > MAX_REPORTS)
		return;
	memcpy(&h, got, sizeof(h));
	printf("BLKVERIFY MISMATCH block=%llu want_gen=%llu when=%s found: magic_ok=%d block=%llu "
	       "gen=%llu seed_ok=%d checksum_ok=%d%s\n",
	       (unsigned long long)blk, (unsigned long long)want_gen, when, h.magic == MAGIC,
	       (unsigned long long)h.block, (unsigned long long)h.gen, h.seed == run_seed,
	       h.checksum == block_checksum(got),
	       h.magic == MAGIC && h.block == blk && h.gen == want_gen && h.seed == run_seed &&
			       h.checksum == block_checksum(got) ?
		       " (header right, payload differs)" :
		       "");
	fflush(stdout);
}

static int open_dev(int flags)
{
	int fd = open(dev, flags | O_DIRECT);

	if (fd < 0) {
		fprintf(stderr, "blkverify: open %s: %s\n", dev, strerror(errno));
		exit(2);
	}
	return fd;
}

/* Reads block blk and compares it with generation gen; returns 0 when it matches. */
static int verify(int fd, unsigned char *buf, unsigned char *want, uint64_t blk, uint64_t gen,
		  const char *when)
{
	if (pread(fd, buf, BS, (off_t)(blk * BS)) != BS) {
		atomic_fetch_add(&io_errors, 1);
		fprintf(stderr, "blkverify: read block %llu: %s\n", (unsigned long long)blk,
			strerror(errno));
		return -1;
	}
	fill(want, blk, gen);
	if (memcmp(buf, want, BS)) {
		report(blk, gen, buf, when);
		return -1;
	}
	return 0;
}

struct worker {
	int id;
	pthread_t th;
};

static void *work(void *p)
{
	struct worker *w = p;
	int fd = open_dev(O_RDWR);
	unsigned char *buf, *want;
	uint64_t s = mix(run_seed, (uint64_t)w->id, 0xffffffffull);
	uint64_t mine = (nblocks - (uint64_t)w->id + (uint64_t)qd - 1) / (uint64_t)qd;
	unsigned int nwrites = 0;

	if (!mine)
		return NULL;
	if (posix_memalign((void **)&buf, BS, BS) || posix_memalign((void **)&want, BS, BS))
		exit(2);
	while (now() < until) {
		uint64_t r = xorshift(&s);
		uint64_t blk = (r % mine) * (uint64_t)qd + (uint64_t)w->id;
		uint32_t gen = gens[blk];

		if (gen && (r >> 62) & 1) {
			verify(fd, buf, want, blk, gen, "run");
			atomic_fetch_add(&verifies, 1);
			continue;
		}
		gen++;
		if (!gen)
			gen = 1; /* never reached in practice: 4 billion writes to one block */
		fill(buf, blk, gen);
		if (pwrite(fd, buf, BS, (off_t)(blk * BS)) != BS) {
			atomic_fetch_add(&io_errors, 1);
			fprintf(stderr, "blkverify: write block %llu: %s\n", (unsigned long long)blk,
				strerror(errno));
			/* What the block holds now is unknown: stop checking it. */
			gens[blk] = 0;
			continue;
		}
		gens[blk] = gen;
		atomic_fetch_add(&writes, 1);
		if (++nwrites % 64 == 0) {
			if (fdatasync(fd)) {
				atomic_fetch_add(&io_errors, 1);
				fprintf(stderr, "blkverify: fdatasync: %s\n", strerror(errno));
			}
			atomic_fetch_add(&flushes, 1);
		}
	}
	close(fd);
	free(buf);
	free(want);
	return NULL;
}

int main(int argc, char **argv)
{
	struct worker ws[MAX_QD];
	uint64_t size = 0, written = 0, final_ok = 0;
	unsigned char *buf, *want;
	double t0, secs, next;
	int fd;

	if (argc < 4 || argc > 5) {
		fprintf(stderr, "usage: blkverify DEV SECONDS QD [BLOCKS]\n");
		return 2;
	}
	dev = argv[1];
	secs = atof(argv[2]);
	qd = atoi(argv[3]);
	if (secs <= 0 || qd < 1 || qd > MAX_QD) {
		fprintf(stderr, "blkverify: SECONDS must be > 0 and QD within 1..%d\n", MAX_QD);
		return 2;
	}
	fd = open_dev(O_RDWR);
	if (ioctl(fd, BLKGETSIZE64, &size))
		size = (uint64_t)lseek(fd, 0, SEEK_END); /* a regular file, for testing on the host */
	nblocks = size == (uint64_t)-1 ? 0 : size / BS;
	if (argc == 5 && strtoull(argv[4], NULL, 0) < nblocks)
		nblocks = strtoull(argv[4], NULL, 0);
	if (nblocks < (uint64_t)qd) {
		fprintf(stderr, "blkverify: %s: %llu blocks, fewer than QD\n", dev,
			(unsigned long long)nblocks);
		return 2;
	}
	gens = calloc(nblocks, sizeof(*gens));
	if (!gens || posix_memalign((void **)&buf, BS, BS) || posix_memalign((void **)&want, BS, BS))
		return 2;
	run_seed = mix((uint64_t)time(NULL), (uint64_t)getpid(), (uint64_t)(now() * 1e9));
	printf("BLKVERIFY start dev=%s blocks=%llu qd=%d seed=%016llx\n", dev,
	       (unsigned long long)nblocks, qd, (unsigned long long)run_seed);
	fflush(stdout);

	t0 = now();
	until = t0 + secs;
	for (int i = 0; i < qd; i++) {
		ws[i].id = i;
		if (pthread_create(&ws[i].th, NULL, work, &ws[i])) {
			fprintf(stderr, "blkverify: pthread_create failed\n");
			return 2;
		}
	}
	for (next = t0 + 10; now() < until;) {
		double left = until - now(), wait = next - now();

		if (wait > left)
			wait = left;
		if (wait > 0)
			usleep((useconds_t)(wait * 1e6));
		if (now() >= next) {
			printf("BLKVERIFY progress secs=%.0f writes=%llu verifies=%llu flushes=%llu "
			       "errors=%llu\n",
			       now() - t0, (unsigned long long)writes, (unsigned long long)verifies,
			       (unsigned long long)flushes, (unsigned long long)errors);
			fflush(stdout);
			next += 10;
		}
	}
	for (int i = 0; i < qd; i++)
		pthread_join(ws[i].th, NULL);

	/* Every block written, once more, after all writes completed. */
	for (uint64_t b = 0; b < nblocks; b++) {
		if (!gens[b])
			continue;
		written++;
		if (!verify(fd, buf, want, b, gens[b], "final"))
			final_ok++;
	}
	secs = now() - t0;
	printf("BLKVERIFY done secs=%.1f blocks=%llu written_blocks=%llu writes=%llu verifies=%llu "
	       "flushes=%llu final_verified=%llu errors=%llu io_errors=%llu\n",
	       secs, (unsigned long long)nblocks, (unsigned long long)written,
	       (unsigned long long)writes, (unsigned long long)verifies,
	       (unsigned long long)flushes, (unsigned long long)final_ok,
	       (unsigned long long)errors, (unsigned long long)io_errors);
	return errors || io_errors ? 1 : 0;
}
