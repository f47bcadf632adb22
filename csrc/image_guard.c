/*
 * image_guard.c - memory images that shrink under the engine do not kill the process.
 *
 * The engine reads a memory image in place, through a read-only shared mapping of
 * the file.  If another process truncates the file, touching a page past the new
 * end raises SIGBUS, whose default action kills us.  While at least one image is
 * registered here, a SIGBUS handler is installed: a fault inside a registered image
 * maps an anonymous zero page over the faulting page (so the access completes, reading
 * zeros), counts the fault against that image, and returns; the Python layer sees
 * the count move at the end of the call, and refuses the machine from then on (its model no longer describes
 * the file).  Any other SIGBUS goes to the handler that was installed before ours, or
 * to the default action, exactly as if we were not here.
 *
 * Registration is not async-signal-safe with respect to itself and is done by the
 * Python layer under its lock; the handler only reads the table, whose entries are
 * written before the count that publishes them (release/acquire).
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ksmcore.h"

#define GUARD_MAX 65536

struct guard_range {
	_Atomic uintptr_t start; /* 0: a free entry */
	_Atomic uintptr_t end;
	_Atomic int64_t faults;  /* faults served in this range */
};

static struct guard_range ranges[GUARD_MAX];
static _Atomic int nr_ranges;           /* entries [0, nr_ranges) may be in use */
static struct sigaction old_action;     /* whoever handled SIGBUS before us */
static _Atomic int installed;

static struct guard_range *in_image(uintptr_t addr)
{
	int n = atomic_load_explicit(&nr_ranges, memory_order_acquire);

	for (int i = 0; i < n; i++) {
		uintptr_t s = atomic_load_explicit(&ranges[i].start, memory_order_acquire);
		uintptr_t e = atomic_load_explicit(&ranges[i].end, memory_order_relaxed);

		if (s && s <= addr && addr < e)
			return &ranges[i];
	}
	return NULL;
}

static void guard_handler(int sig, siginfo_t *info, void *uctx)
{
	uintptr_t addr = (uintptr_t)info->si_addr;
	struct guard_range *r = info->si_code != SI_USER ? in_image(addr) : NULL;

	if (r) {
		long pagesz = sysconf(_SC_PAGESIZE);
		void *page = (void *)(addr & ~((uintptr_t)pagesz - 1));

		/* a zero page in place of the vanished one: the faulting load completes */
		if (mmap(page, (size_t)pagesz, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
			 -1, 0) != MAP_FAILED) {
			atomic_fetch_add(&r->faults, 1);
			return;
		}
	}
	/* not ours: behave as the previous disposition would */
	if (old_action.sa_flags & SA_SIGINFO) {
		old_action.sa_sigaction(sig, info, uctx);
		return;
	}
	if (old_action.sa_handler != SIG_DFL && old_action.sa_handler != SIG_IGN) {
		old_action.sa_handler(sig);
		return;
	}
	/* default action: restore it; the faulting access repeats and kills as before */
	struct sigaction dfl;

	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	sigemptyset(&dfl.sa_mask);
	sigaction(SIGBUS, &dfl, NULL);
}

static int install(void)
{
	struct sigaction sa;

	if (atomic_load(&installed))
		return 0;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = guard_handler;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGBUS, &sa, &old_action) != 0)
		return -1;
	atomic_store(&installed, 1);
	return 0;
}

int ksm_image_guard_add(const void *start, size_t len)
{
	uintptr_t s = (uintptr_t)start;
	int n;

	if (!s || !len || install() != 0)
		return -1;
	n = atomic_load(&nr_ranges);
	for (int i = 0; i < n; i++) {
		if (!atomic_load(&ranges[i].start)) {
			atomic_store(&ranges[i].end, s + len);
			atomic_store(&ranges[i].faults, 0);
			atomic_store_explicit(&ranges[i].start, s, memory_order_release);
			return 0;
		}
	}
	if (n == GUARD_MAX)
		return -1;
	atomic_store(&ranges[n].end, s + len);
	atomic_store(&ranges[n].faults, 0);
	atomic_store_explicit(&ranges[n].start, s, memory_order_release);
	atomic_store_explicit(&nr_ranges, n + 1, memory_order_release);
	return 0;
}

void ksm_image_guard_remove(const void *start)
{
	int n = atomic_load(&nr_ranges);

	for (int i = 0; i < n; i++) {
		if (atomic_load(&ranges[i].start) == (uintptr_t)start) {
			atomic_store(&ranges[i].start, 0);
			return;
		}
	}
}

int64_t ksm_image_guard_faults(const void *start)
{
	int n = atomic_load(&nr_ranges);

	for (int i = 0; i < n; i++)
		if (atomic_load(&ranges[i].start) == (uintptr_t)start)
			return atomic_load(&ranges[i].faults);
	return -1;
}
