/*
 * qemu_guest.c - /init of the QEMU guest that runs KSM programs on a real kernel
 * (tests/qemu_guest.py builds it statically and boots it in a two-node guest).
 *
 * It reads /prog.txt, one operation a line, and after each operation prints to the
 * second serial port (/dev/ttyS1) the kernel's KSM counters, each worker's ksm_stat
 * and the placement of every page of its mappings:
 *
 *   P                 a new program: workers gone, run=2 (unmerge all, full_scans 0)
 *   K name value      write /sys/kernel/mm/ksm/name
 *   S node            spawn a worker running on node (CPU affinity)
 *   M w npages node   worker w maps npages (mbind MPOL_BIND to node unless -1)
 *   F w v first vals  worker w writes whole pages (see fill_page) from page first
 *   B w v page off n byte   worker w writes n bytes at off in a page
 *   A w v first n adv madvise (MADV_MERGEABLE 12, MADV_UNMERGEABLE 13, MADV_DONTNEED 4)
 *   X w               fork worker w (the child is the next worker)
 *   E w               worker w exits (waited for until its mm is gone)
 *   V w v first n node flags   move_pages(2) by worker w of its own pages
 *   C                 one full scan of ksmd (parked with a long sleep_millisecs)
 *
 * Output lines: "O <n>" (operation n begins), "R ..." (its result), "K name value",
 * "W w pid rmap_items merging_pages ksm_stat_lines", "L w v status... ; pfn..." then
 * "D" (done).
 * Every failure of the harness itself prints "FATAL ..." and powers off.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXW 48
#define MAXV 16
#define PAGE 4096
#define MPOL_BIND 2

static FILE *out;
static int cmd_pipe[MAXW][2], rsp_pipe[MAXW][2];

struct vma { char *addr; long npages; };
/* next: where the next mapping goes. As in the model (docs/MODEL.md) mappings grow
 * upwards from 0x10000000 with a guard page between them: ksmd scans an mm in
 * address order, so the layout decides the order pages are met in. */
struct worker { pid_t pid; int live; int nv; char *next; struct vma v[MAXV]; };
static struct worker W[MAXW];
static int nworkers;
static int scan_sleep = 3600000; /* ksmd parked: one hour between batches */

static void fatal(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(out, "FATAL ");
    vfprintf(out, fmt, ap);
    fprintf(out, " (errno %d)\n", errno);
    va_end(ap);
    fflush(out);
    sync();
    reboot(RB_POWER_OFF);
    _exit(1);
}

static int sysfs_write(const char *name, const char *value)
{
    char path[128];
    snprintf(path, sizeof(path), "/sys/kernel/mm/ksm/%s", name);
    int fd = open(path, O_WRONLY);
    if (fd < 0)
        return -errno;
    int rc = (int)write(fd, value, strlen(value)) < 0 ? -errno : 0;
    close(fd);
    return rc;
}

static long read_long(const char *path)
{
    char buf[64];
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    return strtol(buf, NULL, 10);
}

static long ksm_counter(const char *name)
{
    char path[128];
    snprintf(path, sizeof(path), "/sys/kernel/mm/ksm/%s", name);
    return read_long(path);
}

/* contents of a page: every byte v & 0xff; v >= 256 also writes v at offset 8 so
 * that pages of different v differ */
static void fill_page(char *p, long v)
{
    memset(p, (int)(v & 0xff), PAGE);
    if (v >= 256)
        memcpy(p + 8, &v, sizeof(v));
}

/* ---- the worker side: one line in, one line out */

static void worker_loop(int id)
{
    char line[4096];
    for (;;) {
        ssize_t n = 0;
        while (n < (ssize_t)sizeof(line) - 1) { /* one line */
            ssize_t r = read(cmd_pipe[id][0], line + n, 1);
            if (r <= 0)
                _exit(0);
            if (line[n++] == '\n')
                break;
        }
        line[n] = 0;
        char reply[4096];
        int rl = 0;
        struct worker *me = &W[id];
        char op = line[0];
        char *args = line + 1;
        if (op == 'M') {
            long np; int node;
            sscanf(args, "%ld %d", &np, &node);
            char *a = mmap(me->next, np * PAGE, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
            if (a != MAP_FAILED)
                me->next += (np + 1) * PAGE;
            if (a == MAP_FAILED) {
                rl = snprintf(reply, sizeof(reply), "%d", -errno);
            } else {
                if (node >= 0) {
                    unsigned long mask = 1UL << node;
                    if (syscall(SYS_mbind, a, np * PAGE, MPOL_BIND, &mask, 64, 0))
                        fatal("mbind");
                }
                me->v[me->nv].addr = a;
                me->v[me->nv].npages = np;
                rl = snprintf(reply, sizeof(reply), "%d %p", me->nv, (void *)a);
                me->nv++;
            }
        } else if (op == 'F') {
            int v, first, off = 0, k;
            sscanf(args, "%d %d%n", &v, &first, &off);
            char *s = args + off;
            long val;
            for (k = first; sscanf(s, "%ld%n", &val, &off) == 1; k++, s += off)
                fill_page(me->v[v].addr + (long)k * PAGE, val);
            rl = snprintf(reply, sizeof(reply), "0");
        } else if (op == 'B') {
            int v, page, offs, cnt, byte;
            sscanf(args, "%d %d %d %d %d", &v, &page, &offs, &cnt, &byte);
            memset(me->v[v].addr + (long)page * PAGE + offs, byte, cnt);
            rl = snprintf(reply, sizeof(reply), "0");
        } else if (op == 'A') {
            int v, first, cnt, adv;
            sscanf(args, "%d %d %d %d", &v, &first, &cnt, &adv);
            int rc = madvise(me->v[v].addr + (long)first * PAGE, (size_t)cnt * PAGE, adv);
            rl = snprintf(reply, sizeof(reply), "%d", rc ? -errno : 0);
        } else if (op == 'V') {
            int v, first, cnt, node, flags;
            sscanf(args, "%d %d %d %d %d", &v, &first, &cnt, &node, &flags);
            void *pages[64];
            int nodes[64], status[64];
            for (int i = 0; i < cnt; i++) {
                pages[i] = me->v[v].addr + (long)(first + i) * PAGE;
                nodes[i] = node;
                status[i] = 12345;
            }
            long rc = syscall(SYS_move_pages, 0, cnt, pages, nodes, status, flags);
            rl = snprintf(reply, sizeof(reply), "%ld", rc < 0 ? -errno : rc);
            for (int i = 0; i < cnt; i++)
                rl += snprintf(reply + rl, sizeof(reply) - rl, " %d", status[i]);
        } else if (op == 'X') {
            int child;
            sscanf(args, "%d", &child);
            pid_t pid = fork();
            if (pid == 0) {
                W[child] = *me;
                W[child].pid = getpid();
                id = child;
                continue; /* the child now serves its own pipes */
            }
            rl = snprintf(reply, sizeof(reply), "%d", (int)pid);
        } else if (op == 'E') {
            _exit(0);
        } else {
            rl = snprintf(reply, sizeof(reply), "?");
        }
        reply[rl++] = '\n';
        if (write(rsp_pipe[id][1], reply, rl) != rl)
            _exit(2);
    }
}

/* ---- the controller side */

static void send_cmd(int w, const char *fmt, ...)
{
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
    va_end(ap);
    buf[n++] = '\n';
    if (write(cmd_pipe[w][1], buf, n) != n)
        fatal("send to worker %d", w);
}

static void get_reply(int w, char *buf, size_t size)
{
    size_t n = 0;
    while (n < size - 1) {
        ssize_t r = read(rsp_pipe[w][0], buf + n, 1);
        if (r <= 0)
            fatal("reply of worker %d", w);
        if (buf[n] == '\n')
            break;
        n++;
    }
    buf[n] = 0;
}

static void reap(void)
{
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
}

/* until pid is a zombie or gone: exit_mm() (and ksm_exit) are done by then */
static void wait_dead(pid_t pid)
{
    char path[64], buf[256];
    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    for (int tries = 0; tries < 200000; tries++) {
        reap();
        int fd = open(path, O_RDONLY);
        if (fd < 0)
            return;
        ssize_t n = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (n <= 0)
            return;
        buf[n] = 0;
        char *p = strrchr(buf, ')');
        if (p && (p[2] == 'Z' || p[2] == 'X'))
            return;
        usleep(100);
    }
    fatal("worker %d does not die", (int)pid);
}

static uint64_t zero_pfn;

static uint64_t pfn_of(int pagemap, char *addr)
{
    uint64_t e = 0;
    if (pread(pagemap, &e, 8, (off_t)((uintptr_t)addr / PAGE) * 8) != 8)
        return 0;
    if (!(e >> 63 & 1))
        return 0; /* not present */
    return e & ((1ULL << 55) - 1);
}

static const char *COUNTERS[] = {
    "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
    "stable_node_chains", "stable_node_dups", NULL,
};

static void observe(void)
{
    for (int i = 0; COUNTERS[i]; i++)
        fprintf(out, "K %s %ld\n", COUNTERS[i], ksm_counter(COUNTERS[i]));
    for (int w = 0; w < nworkers; w++) {
        if (!W[w].live)
            continue;
        char path[64], buf[512];
        long rmap = -1, merging, lines = 0;
        snprintf(path, sizeof(path), "/proc/%d/ksm_stat", (int)W[w].pid);
        int fd = open(path, O_RDONLY);
        if (fd >= 0) {
            ssize_t n = read(fd, buf, sizeof(buf) - 1);
            close(fd);
            buf[n > 0 ? n : 0] = 0;
            char *p = strstr(buf, "ksm_rmap_items ");
            if (p)
                rmap = strtol(p + 15, NULL, 10);
            for (p = buf; *p; p++)
                lines += *p == '\n';
        }
        snprintf(path, sizeof(path), "/proc/%d/ksm_merging_pages", (int)W[w].pid);
        merging = read_long(path);
        fprintf(out, "W %d %d %ld %ld %ld\n", w, (int)W[w].pid, rmap, merging, lines);
        snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)W[w].pid);
        int pm = open(path, O_RDONLY);
        for (int v = 0; v < W[w].nv; v++) {
            struct vma *m = &W[w].v[v];
            void *pages[64];
            int status[64];
            for (long i = 0; i < m->npages; i++)
                pages[i] = m->addr + i * PAGE;
            if (syscall(SYS_move_pages, W[w].pid, m->npages, pages, NULL, status, 0))
                fatal("move_pages stat of worker %d", w);
            fprintf(out, "L %d %d", w, v);
            for (long i = 0; i < m->npages; i++)
                fprintf(out, " %d", status[i]);
            fprintf(out, " ;");
            for (long i = 0; i < m->npages; i++) {
                uint64_t pfn = pm >= 0 ? pfn_of(pm, m->addr + i * PAGE) : 0;
                if (!pfn)
                    fprintf(out, " -");
                else if (pfn == zero_pfn)
                    fprintf(out, " z");
                else
                    fprintf(out, " %llu", (unsigned long long)pfn);
            }
            fprintf(out, "\n");
        }
        if (pm >= 0)
            close(pm);
    }
    fprintf(out, "D\n");
    fflush(out);
}

static int ksmd_pid;

static void find_ksmd(void)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        char path[300], comm[32] = "";
        snprintf(path, sizeof(path), "/proc/%s/comm", e->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, comm, sizeof(comm) - 1);
        close(fd);
        if (n > 0 && !strncmp(comm, "ksmd\n", 5))
            ksmd_pid = atoi(e->d_name);
    }
    if (d)
        closedir(d);
}

/* the state letter of ksmd in /proc/PID/stat ('S' while it sleeps) */
static char ksmd_state(void)
{
    char path[64], buf[256];
    snprintf(path, sizeof(path), "/proc/%d/stat", ksmd_pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return '?';
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    buf[n > 0 ? n : 0] = 0;
    char *p = strrchr(buf, ')');
    return p ? p[2] : '?';
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void wake_ksmd(void)
{
    char v[32];
    scan_sleep = scan_sleep == 3600000 ? 3600001 : 3600000;
    snprintf(v, sizeof(v), "%d", scan_sleep);
    sysfs_write("sleep_millisecs", v); /* wakes ksmd from its sleep */
    sysfs_write("run", "1");           /* wakes ksmd waiting for work */
}

/* one full scan: the batch (pages_to_scan larger than any program) ends where the
 * scan ends; ksmd then sleeps for an hour until sleep_millisecs changes. A ksmd
 * that read the new sleep_millisecs before it went to sleep (it was still finishing
 * the previous scan when we woke it) sleeps on: wake it again after 2 s with no
 * progress - it is asleep then, so this starts no second scan. */
static int one_full_scan(void)
{
    long before = ksm_counter("full_scans");
    double start = now(), woken = start;
    wake_ksmd();
    while (now() - start < 120) {
        if (ksm_counter("full_scans") > before) {
            sysfs_write("run", "0");
            /* until ksmd sleeps again, so that the next wake finds it asleep */
            for (double t = now(); ksmd_pid && ksmd_state() != 'S' && now() - t < 2;)
                usleep(200);
            return 0;
        }
        if (now() - woken > 2) {
            wake_ksmd();
            woken = now();
        }
        usleep(200);
    }
    sysfs_write("run", "0");
    return -1;
}

static void end_program(void)
{
    for (int w = 0; w < nworkers; w++) {
        if (W[w].live) {
            send_cmd(w, "E");
            wait_dead(W[w].pid);
            W[w].live = 0;
        }
    }
    reap();
    nworkers = 0;
    if (sysfs_write("run", "2") || sysfs_write("run", "0"))
        fatal("run=2");
    /* the defaults again (no KSM page is left: merge_across_nodes may change) */
    if (sysfs_write("merge_across_nodes", "1") || sysfs_write("use_zero_pages", "0"))
        fatal("knob defaults");
}

static void spawn(int node)
{
    int id = nworkers++;
    pid_t pid = fork();
    if (pid < 0)
        fatal("fork");
    if (pid == 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(node, &set); /* one CPU per node: CPU n is on node n */
        if (sched_setaffinity(0, sizeof(set), &set))
            fatal("affinity");
        W[id].nv = 0;
        W[id].next = (char *)0x10000000UL;
        worker_loop(id);
        _exit(0);
    }
    W[id].pid = pid;
    W[id].live = 1;
    W[id].nv = 0;
}

int main(void)
{
    mount("proc", "/proc", "proc", 0, NULL);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    out = fopen("/dev/ttyS1", "w");
    if (!out)
        out = stdout;
    for (int i = 0; i < MAXW; i++)
        if (pipe(cmd_pipe[i]) || pipe(rsp_pipe[i]))
            fatal("pipe");
    int fd = open("/sys/kernel/mm/transparent_hugepage/enabled", O_WRONLY);
    if (fd >= 0) {
        if (write(fd, "never", 5) < 0)
            fatal("thp");
        close(fd);
    }
    /* the zero page's pfn: a read fault of untouched anonymous memory maps it */
    char *z = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    volatile char c = z[0];
    (void)c;
    int pm = open("/proc/self/pagemap", O_RDONLY);
    zero_pfn = pfn_of(pm, z);
    close(pm);
    {
        char rel[256] = "";
        int rf = open("/proc/sys/kernel/osrelease", O_RDONLY);
        if (rf >= 0) {
            ssize_t n = read(rf, rel, sizeof(rel) - 1);
            close(rf);
            rel[n > 0 ? n - 1 : 0] = 0;
        }
        char nodes[64] = "";
        int nf = open("/sys/devices/system/node/online", O_RDONLY);
        if (nf >= 0) {
            ssize_t n = read(nf, nodes, sizeof(nodes) - 1);
            close(nf);
            nodes[n > 0 ? n - 1 : 0] = 0;
        }
        fprintf(out, "H %s nodes %s zero_pfn %llu\n", rel, nodes,
                (unsigned long long)zero_pfn);
    }
    find_ksmd();
    /* ksmd parked: batches larger than any program, an hour of sleep in between */
    sysfs_write("run", "2");
    sysfs_write("run", "0");
    sysfs_write("pages_to_scan", "1000000");
    sysfs_write("sleep_millisecs", "3600000");

    FILE *prog = fopen("/prog.txt", "r");
    if (!prog)
        fatal("no /prog.txt");
    char line[4096], reply[4096];
    long opno = 0;
    while (fgets(line, sizeof(line), prog)) {
        line[strcspn(line, "\n")] = 0;
        if (!line[0])
            continue;
        fprintf(out, "O %ld %s\n", opno++, line);
        char op = line[0];
        char *args = line + 1;
        int w = -1;
        if (strchr("MFBAXEV", op))
            sscanf(args, "%d", &w);
        if (w >= 0 && (w >= nworkers || !W[w].live))
            fatal("no worker %d", w);
        if (op == 'P') {
            end_program();
            fprintf(out, "R 0\n");
        } else if (op == 'K') {
            char name[64], value[64];
            sscanf(args, "%63s %63s", name, value);
            fprintf(out, "R %d\n", sysfs_write(name, value));
        } else if (op == 'S') {
            int node;
            sscanf(args, "%d", &node);
            spawn(node);
            fprintf(out, "R %d\n", nworkers - 1);
        } else if (op == 'C') {
            fprintf(out, "R %d\n", one_full_scan());
        } else if (op == 'X') {
            int child = nworkers++;
            send_cmd(w, "X %d", child);
            get_reply(w, reply, sizeof(reply));
            W[child] = W[w];
            W[child].pid = (pid_t)atoi(reply);
            fprintf(out, "R %s\n", reply);
        } else if (op == 'E') {
            send_cmd(w, "E");
            wait_dead(W[w].pid);
            W[w].live = 0;
            fprintf(out, "R 0\n");
        } else if (strchr("MFBAV", op)) {
            char *rest = args;
            while (*rest == ' ')
                rest++;
            while (*rest && *rest != ' ')
                rest++; /* past the worker number */
            send_cmd(w, "%c%s", op, rest);
            get_reply(w, reply, sizeof(reply));
            if (op == 'M') {
                int v;
                void *a;
                sscanf(reply, "%d %p", &v, &a);
                W[w].v[v].addr = a;
                sscanf(rest, "%ld", &W[w].v[v].npages);
                W[w].nv = v + 1;
            }
            fprintf(out, "R %s\n", reply);
        } else {
            fatal("bad operation %s", line);
        }
        observe();
    }
    end_program();
    fprintf(out, "END\n");
    fflush(out);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
