// SPDX-License-Identifier: GPL-2.0
/*
 * /init for the qmp-sdei Linux event test (static aarch64 binary, the only program in the
 * initramfs): load /sdei_test.ko with the parameters from /sdei_test.params, then log a
 * heartbeat line through /dev/kmsg forever, so the host can see the kernel and userspace keep
 * running after the events. PID 1 must never exit (that panics), so errors are logged and
 * the heartbeat goes on.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define HEARTBEAT_NS 200000000L

static int kmsg = -1;

static void say(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof(line))
		n = sizeof(line) - 1;
	if (kmsg < 0 || write(kmsg, line, (size_t)n) < 0)
		(void)!write(1, line, (size_t)n);
}

static void load_module(void)
{
	char params[512] = "";
	int fd = open("/sdei_test.params", O_RDONLY);

	if (fd >= 0) {
		ssize_t n = read(fd, params, sizeof(params) - 1);

		params[n > 0 ? n : 0] = '\0';
		params[strcspn(params, "\n")] = '\0';
		close(fd);
	}
	fd = open("/sdei_test.ko", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		say("<3>sdei_test_init: error: open /sdei_test.ko: %s\n", strerror(errno));
		return;
	}
	if (syscall(SYS_finit_module, fd, params, 0) != 0)
		say("<3>sdei_test_init: error: finit_module(%s): %s\n", params, strerror(errno));
	else
		say("<6>sdei_test_init: loaded sdei_test.ko %s\n", params);
	close(fd);
}

int main(void)
{
	struct timespec period = { 0, HEARTBEAT_NS };
	unsigned long beat = 0;

	kmsg = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	load_module();
	for (;;) {
		say("<6>sdei_test_init: alive %lu\n", beat++);
		nanosleep(&period, NULL);
	}
}
