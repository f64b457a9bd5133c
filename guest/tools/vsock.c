// SPDX-License-Identifier: Apache-2.0
/*
 * vsock: a small static AF_VSOCK tool for the remio guest (busybox has no vsock and socat would
 * need its shared libraries in the initramfs).
 *
 *   vsock connect CID PORT    connect to CID:PORT (the host is CID 2), copy stdin to the
 *                             connection (then shut down its write side) and the connection to
 *                             stdout until the peer closes
 *   vsock listen PORT         accept one connection on PORT and do the same with it
 *   vsock echo PORT           accept one connection on PORT and send back everything it sends
 *                             until it shuts down its write side
 *
 * Prints errors on stderr and exits 1 (2: usage). With `listen` and `echo`, "VSOCK-LISTENING
 * <port>" goes to stderr once the socket listens.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static void die(const char *what)
{
	fprintf(stderr, "vsock: %s: %s\n", what, strerror(errno));
	exit(1);
}

static unsigned int number(const char *s, const char *what)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 0);
	if (errno || *s == '\0' || *end != '\0' || v > 0xffffffffUL) {
		fprintf(stderr, "vsock: bad %s `%s`\n", what, s);
		exit(2);
	}
	return (unsigned int)v;
}

/* Writes all of buf; returns 0, or -1 with errno. */
static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Copies from -> to until EOF; returns 0, or -1 with errno. */
static int copy(int from, int to)
{
	static char buf[64 * 1024];

	for (;;) {
		ssize_t n = read(from, buf, sizeof(buf));

		if (n == 0)
			return 0;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (write_all(to, buf, (size_t)n) < 0)
			return -1;
	}
}

/*
 * stdin -> sock in a child (then SHUT_WR), sock -> stdout here: both directions move at once,
 * so a peer that answers while it still reads (an echo) never deadlocks us.
 */
static int relay(int sock)
{
	int status = 0;
	pid_t pid = fork();

	if (pid < 0)
		die("fork");
	if (pid == 0) {
		if (copy(STDIN_FILENO, sock) < 0)
			die("stdin -> socket");
		if (shutdown(sock, SHUT_WR) < 0)
			die("shutdown");
		_exit(0);
	}
	if (copy(sock, STDOUT_FILENO) < 0)
		die("socket -> stdout");
	if (waitpid(pid, &status, 0) < 0)
		die("waitpid");
	return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

static int accept_one(unsigned int port)
{
	struct sockaddr_vm addr = {
		.svm_family = AF_VSOCK,
		.svm_port = port,
		.svm_cid = VMADDR_CID_ANY,
	};
	int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
	int conn;

	if (fd < 0)
		die("socket");
	if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
		die("bind");
	if (listen(fd, 1) < 0)
		die("listen");
	fprintf(stderr, "VSOCK-LISTENING %u\n", port);
	conn = accept(fd, NULL, NULL);
	if (conn < 0)
		die("accept");
	close(fd);
	return conn;
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	if (argc == 4 && strcmp(argv[1], "connect") == 0) {
		struct sockaddr_vm addr = {
			.svm_family = AF_VSOCK,
			.svm_cid = number(argv[2], "CID"),
			.svm_port = number(argv[3], "port"),
		};
		int fd = socket(AF_VSOCK, SOCK_STREAM, 0);

		if (fd < 0)
			die("socket");
		if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0)
			die("connect");
		return relay(fd);
	}
	if (argc == 3 && strcmp(argv[1], "listen") == 0)
		return relay(accept_one(number(argv[2], "port")));
	if (argc == 3 && strcmp(argv[1], "echo") == 0) {
		int conn = accept_one(number(argv[2], "port"));

		if (copy(conn, conn) < 0)
			die("echo");
		close(conn);
		return 0;
	}
	fprintf(stderr, "usage: vsock connect CID PORT | vsock listen PORT | vsock echo PORT\n");
	return 2;
}
