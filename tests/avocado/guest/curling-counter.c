/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * curling-counter: the workload of the Curling test guest.
 *
 * Runs as the only process of a busybox initramfs and prints one line per
 * period on its standard output (the serial console):
 *
 *   curling: tick=<n> work=<loop iterations> pages=<pages rewritten> check=ok
 *
 * or "check=FAIL thread=<t> page=<i> ..." when the memory self-check of any
 * thread finds a page that does not match its version table.
 *
 * Threads: one worker per online CPU (curling.threads=N to choose), each
 * pinned to its CPU, each with its own buffer and version table, rewriting
 * and checking its own pages only.  Worker 0 is the main thread and prints
 * the tick line; "work" and "pages" are the sums over every worker, and the
 * line says check=FAIL when any worker's check failed since the last line.
 * Each buffer is first touched from its worker's CPU (on a NUMA guest it
 * lives in that CPU's node), and once at start
 *
 *   curling: worker=<id> cpu=<cpu> node=<NUMA node of its first page>
 *            high=<highest guest-physical address of its pages, MiB>
 *
 * tells where it is.
 *
 * Self-check: a buffer of pages is rewritten at a fixed rate.  Rewriting page
 * i bumps its version v and fills the whole page with a pattern derived from
 * (i, v); a separate version table, allocated apart from the buffer so that
 * it lives in other pages, records the version every page must hold.  A
 * state restored from one consistent point in time always passes; a state
 * that mixes pages from one moment with a table from another fails.
 *
 * Once per period every worker compares the tag words (first and last word)
 * of every page of its buffer with its table, and verifies the full contents
 * of a rotating slice of the pages, sized so that every page is fully
 * verified at least once a second.
 *
 * Device load (curling.devices=1): background threads keep the guest's
 * devices busy and count what they achieve:
 *   disk   O_DIRECT reads of every /dev/vd* and /dev/sd* disk (never
 *          writes); a disk whose first block starts with "CURLDISK" holds
 *          that magic and the little-endian block number at the start of
 *          every 4 KiB block, and every block read is checked;
 *   rng    reads of /dev/hwrng;
 *   net    every NIC is brought up (no address, IPv6 off) and sends an ARP
 *          request for 10.0.2.2 (user networking's gateway) every 50 ms from
 *          a raw socket; the counts are the NIC's tx/rx packets from sysfs;
 *   tty    writes to /dev/tty0 (the VGA or virtio-gpu console);
 *   input  events read from every /dev/input/event* (the host sends them).
 * Once a second it prints
 *
 *   curling: devices disk=<n> rng=<n> net=<n> netrx=<n> tty=<n> input=<n>
 *            err=<n> [<disk>=<reads> ...] [<nic>=<tx>/<rx> ...]
 *
 * (one line) and "curling: device error <name>: ..." the first time a
 * device fails.  Devices are looked for again every second.
 *
 * Disk self-check (curling.diskcheck=vda): the first DISKCHECK_BLOCKS 4 KiB
 * blocks of the disk are rewritten one after the other with O_DIRECT and
 * O_DSYNC, each filled with a pattern derived from (block, version) and
 * tagged with both, and a version table in memory records what each block
 * must hold, as the memory self-check does for pages.  Every period the
 * whole area is read back and compared with the table: memory and disk
 * restored from one consistent point in time always agree.  Once a second
 *
 *   curling: diskcheck dev=<d> writes=<n> checks=<n> check=ok
 *
 * or "check=FAIL block=<b> want=<v> have=<v>" (the first bad block).
 *
 * File system workload (curling.fs=vda): the ext4 file system on the disk
 * is mounted on /mnt, and files are created, appended to, renamed and
 * deleted at random, each operation made durable (fsync of the file and
 * of the directory) before a table in memory records it.  Every period the
 * page cache is dropped and every recorded file is read back from the
 * disk: its size and every byte (a function of the file's generation and
 * the offset) must match the table.  Once a second
 *
 *   curling: fs dev=<d> ops=<n> checks=<n> files=<n> check=ok
 *
 * or "check=FAIL <what>"; after curling.fstime seconds the workload stops,
 * unmounts the file system and prints "curling: fs unmounted ops=<n>".
 *
 * Framebuffer self-check (curling.fb=1): the std VGA (PCI 1234:1111) is
 * switched to a 640x480 32-bit graphics mode through its Bochs VBE
 * registers, and its linear framebuffer (PCI BAR 0, mapped through sysfs)
 * is checked like the disk: rows are rewritten one after the other, each
 * with a pattern derived from (row, version), a version table in memory
 * records what each row must hold, and every period the whole visible
 * framebuffer is read back and compared with it.  Once, then once a second
 *
 *   curling: fb mode=640x480x32
 *   curling: fbcheck writes=<n> checks=<n> check=ok
 *
 * or "check=FAIL row=<r> want=<v> pixel=<x>" (the first bad pixel).
 *
 * Guest clock (curling.clock=1): a thread writes the guest's CLOCK_MONOTONIC
 * (ns, a little-endian u64) into the first word of a locked page every
 * CLOCK_UPDATE_US, and says where that page is in guest-physical memory:
 *
 *   curling: clock phys=0x<address>
 *
 * (again whenever it moves), so that the host can read the guest's clock
 * from guest memory at any moment and compare it with its own, even while
 * the guest's console output is held.
 *
 * Disk load (curling.diskload=, for the benchmark): "seq" writes 64 KiB
 * blocks one after the other over the disk with O_DIRECT, paced to
 * curling.diskrate MiB/s; "fsync" writes 4 KiB blocks at random offsets,
 * each followed by fdatasync(), back to back.  Once a second, cumulative:
 *
 *   curling: diskload mode=<m> ops=<n> bytes=<n> lat_us=<sum> max_us=<n>
 *
 * (lat_us: the sum of each operation's latency, write plus fdatasync;
 * max_us: the longest since the previous line).
 *
 * Parameters come from the kernel command line (/proc/cmdline):
 *   curling.mode=counter|dirty|idle  (default dirty)
 *   curling.mb=N       buffer size of each worker in MiB (default 16)
 *   curling.rate=R     MiB per second of distinct pages each worker
 *                      rewrites (default 1)
 *   curling.period=MS  print period in milliseconds (default 100)
 *   curling.threads=N  workers (default: one per online CPU)
 *   curling.devices=1  run the device load
 *   curling.diskcheck=DEV  run the disk self-check on /dev/DEV
 *   curling.fs=DEV     run the file system workload on /dev/DEV (ext4)
 *   curling.fstime=S   stop it after S seconds and unmount (default: never)
 *   curling.fb=1       run the framebuffer self-check on the std VGA
 *   curling.clock=1    publish the guest's clock in guest memory
 *   curling.diskload=seq|fsync  run a disk benchmark load on /dev/vda
 *   curling.diskrate=R MiB per second the seq load offers (default 10)
 *
 * Mode counter runs the CPU-bound loop only ("work" counts its iterations);
 * mode dirty also rewrites pages at the given rate; mode idle sleeps and
 * prints "work=0 pages=0 check=skip".  At 16 MiB the self-check costs about
 * 1.2 ms per tick under TCG; build with -DCURLING_TIMING to print it.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/input.h>
#include <net/if.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/io.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE       4096u
#define PAGE_WORDS      (PAGE_SIZE / sizeof(uint64_t))
#define WORK_CHUNK      4096u
#define WORD_STEP       0x9e3779b97f4a7c15ull
#define MAX_WORKERS     64
#define WHY_LEN         160

enum mode { MODE_COUNTER, MODE_DIRTY, MODE_IDLE };

struct config {
    enum mode mode;
    unsigned long mb;
    double rate;
    unsigned long period_ms;
    unsigned long threads;
    int devices;
    char diskcheck[16];
    char fs[16];
    unsigned long fs_seconds;
    char diskload[16];
    double disk_rate;
    int fb;
    int clock;
};

/*
 * One worker: everything its self-check needs lives in guest memory, like
 * the counters, so a restored state carries it.
 */
struct worker {
    unsigned id;
    uint64_t *buf;              /* npages pages of pattern */
    uint32_t *table;            /* expected version of every page */
    uint64_t npages;
    uint64_t stride;            /* step between consecutive rewritten pages */
    uint64_t cursor;            /* next page to rewrite */
    uint64_t verify_next;       /* first page of the next full-verify slice */
    uint64_t slice;             /* pages fully verified per check */
    uint64_t work_acc;
    uint64_t work;              /* read by the printer: atomic */
    uint64_t pages;             /* read by the printer: atomic */
    uint64_t fails;             /* failed checks, atomic */
    uint64_t fails_seen;        /* printer's copy of @fails */
    char why[WHY_LEN];          /* first failure since the last report */
};

static struct config cfg = {
    .mode = MODE_DIRTY,
    .mb = 16,
    .rate = 1.0,
    .period_ms = 100,
    .threads = 0,
    .devices = 0,
};

static struct worker workers[MAX_WORKERS];
static unsigned nworkers;
static pthread_mutex_t why_lock = PTHREAD_MUTEX_INITIALIZER;

static void out(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    int len;
    ssize_t done = 0;

    va_start(ap, fmt);
    len = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (len < 0) {
        return;
    }
    if ((size_t)len >= sizeof(line)) {
        len = sizeof(line) - 1;
        line[len - 1] = '\n';
    }
    /* One write per line: lines of several threads never interleave. */
    while (done < len) {
        ssize_t n = write(STDOUT_FILENO, line + done, len - done);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return;
        }
        done += n;
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {
        .tv_sec = ms / 1000,
        .tv_nsec = (ms % 1000) * 1000000l,
    };

    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
        continue;
    }
}

static void sleep_until(uint64_t t_ns)
{
    uint64_t now = now_ns();

    if (t_ns > now) {
        uint64_t d = t_ns - now;
        struct timespec ts = {
            .tv_sec = d / 1000000000ull,
            .tv_nsec = d % 1000000000ull,
        };
        nanosleep(&ts, NULL);
    }
}

static inline uint64_t load64(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void add64(uint64_t *p, uint64_t v)
{
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

static inline uint64_t page_tag(uint64_t i, uint32_t version)
{
    return (i << 32) | version;
}

static void fill_page(struct worker *w, uint64_t i, uint32_t version)
{
    uint64_t *p = w->buf + i * PAGE_WORDS;
    uint64_t x = mix64(page_tag(i, version));
    unsigned k;

    for (k = 1; k < PAGE_WORDS - 1; k++) {
        x += WORD_STEP;
        p[k] = x;
    }
    p[0] = page_tag(i, version);
    p[PAGE_WORDS - 1] = page_tag(i, version);
}

/* Returns the index of the first bad word, or -1 when the page is intact. */
static long full_check_page(const struct worker *w, uint64_t i,
                            uint32_t version)
{
    const uint64_t *p = w->buf + i * PAGE_WORDS;
    uint64_t x = mix64(page_tag(i, version));
    uint64_t diff = 0;
    unsigned k;

    if (p[0] != page_tag(i, version)) {
        return 0;
    }
    for (k = 1; k < PAGE_WORDS - 1; k++) {
        x += WORD_STEP;
        diff |= p[k] ^ x;
    }
    if (diff) {
        x = mix64(page_tag(i, version));
        for (k = 1; k < PAGE_WORDS - 1; k++) {
            x += WORD_STEP;
            if (p[k] != x) {
                return k;
            }
        }
    }
    if (p[PAGE_WORDS - 1] != page_tag(i, version)) {
        return PAGE_WORDS - 1;
    }
    return -1;
}

static void rewrite_next_page(struct worker *w)
{
    uint64_t i = w->cursor;
    uint32_t v = w->table[i] + 1;

    /* Page first, then the table: the worker never checks in between. */
    fill_page(w, i, v);
    w->table[i] = v;
    add64(&w->pages, 1);
    w->cursor = (w->cursor + w->stride) % w->npages;
}

/*
 * Check the tag words of every page of @w and the full contents of a slice
 * of them.  On failure, describe the first bad page in @why and return 0.
 */
static int self_check(struct worker *w, char *why, size_t whylen)
{
    uint64_t i, n;

    for (i = 0; i < w->npages; i++) {
        const uint64_t *p = w->buf + i * PAGE_WORDS;
        uint64_t want = page_tag(i, w->table[i]);

        if (p[0] != want || p[PAGE_WORDS - 1] != want) {
            snprintf(why, whylen,
                     "thread=%u page=%llu want=%u have=%llu:%llu", w->id,
                     (unsigned long long)i, w->table[i],
                     (unsigned long long)(p[0] & 0xffffffffu),
                     (unsigned long long)(p[PAGE_WORDS - 1] & 0xffffffffu));
            return 0;
        }
    }
    for (n = 0; n < w->slice; n++) {
        long bad;

        i = w->verify_next;
        w->verify_next = (w->verify_next + 1) % w->npages;
        bad = full_check_page(w, i, w->table[i]);
        if (bad >= 0) {
            snprintf(why, whylen, "thread=%u page=%llu want=%u word=%ld",
                     w->id, (unsigned long long)i, w->table[i], bad);
            return 0;
        }
    }
    return 1;
}

/* Run the self-check of @w and record a failure for the printer. */
static void check_and_record(struct worker *w)
{
    char why[WHY_LEN];

    if (!w->buf) {
        return;
    }
#ifdef CURLING_TIMING
    uint64_t t0 = now_ns();
#endif
    if (!self_check(w, why, sizeof(why))) {
        pthread_mutex_lock(&why_lock);
        if (load64(&w->fails) == w->fails_seen) {
            memcpy(w->why, why, sizeof(why));
        }
        add64(&w->fails, 1);
        pthread_mutex_unlock(&why_lock);
    }
#ifdef CURLING_TIMING
    if (w->id == 0) {
        out("curling: check took %llu us\n",
            (unsigned long long)((now_ns() - t0) / 1000));
    }
#endif
}

static const char *mode_name(enum mode m)
{
    switch (m) {
    case MODE_COUNTER:
        return "counter";
    case MODE_DIRTY:
        return "dirty";
    default:
        return "idle";
    }
}

static void parse_cmdline(void)
{
    char line[4096];
    char *tok, *save = NULL;
    ssize_t n;
    FILE *f = fopen("/proc/cmdline", "r");

    if (!f) {
        out("curling: cannot read /proc/cmdline, using defaults\n");
        return;
    }
    n = fread(line, 1, sizeof(line) - 1, f);
    fclose(f);
    line[n > 0 ? n : 0] = '\0';

    for (tok = strtok_r(line, " \t\n", &save); tok;
         tok = strtok_r(NULL, " \t\n", &save)) {
        if (!strncmp(tok, "curling.mode=", 13)) {
            const char *v = tok + 13;
            if (!strcmp(v, "counter")) {
                cfg.mode = MODE_COUNTER;
            } else if (!strcmp(v, "dirty")) {
                cfg.mode = MODE_DIRTY;
            } else if (!strcmp(v, "idle")) {
                cfg.mode = MODE_IDLE;
            } else {
                out("curling: unknown mode '%s', using dirty\n", v);
            }
        } else if (!strncmp(tok, "curling.mb=", 11)) {
            cfg.mb = strtoul(tok + 11, NULL, 10);
        } else if (!strncmp(tok, "curling.rate=", 13)) {
            cfg.rate = strtod(tok + 13, NULL);
        } else if (!strncmp(tok, "curling.period=", 15)) {
            cfg.period_ms = strtoul(tok + 15, NULL, 10);
        } else if (!strncmp(tok, "curling.threads=", 16)) {
            cfg.threads = strtoul(tok + 16, NULL, 10);
        } else if (!strncmp(tok, "curling.devices=", 16)) {
            cfg.devices = atoi(tok + 16) != 0;
        } else if (!strncmp(tok, "curling.diskcheck=", 18)) {
            snprintf(cfg.diskcheck, sizeof(cfg.diskcheck), "%s", tok + 18);
        } else if (!strncmp(tok, "curling.fs=", 11)) {
            snprintf(cfg.fs, sizeof(cfg.fs), "%s", tok + 11);
        } else if (!strncmp(tok, "curling.fstime=", 15)) {
            cfg.fs_seconds = strtoul(tok + 15, NULL, 10);
        } else if (!strncmp(tok, "curling.clock=", 14)) {
            cfg.clock = atoi(tok + 14) != 0;
        } else if (!strncmp(tok, "curling.fb=", 11)) {
            cfg.fb = atoi(tok + 11) != 0;
        } else if (!strncmp(tok, "curling.diskload=", 17)) {
            snprintf(cfg.diskload, sizeof(cfg.diskload), "%s", tok + 17);
        } else if (!strncmp(tok, "curling.diskrate=", 17)) {
            cfg.disk_rate = strtod(tok + 17, NULL);
        }
    }
    if (cfg.mb < 1) {
        cfg.mb = 1;
    }
    if (cfg.rate < 0) {
        cfg.rate = 0;
    }
    if (cfg.period_ms < 1) {
        cfg.period_ms = 1;
    }
    if (cfg.threads < 1) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        cfg.threads = cpus > 0 ? cpus : 1;
    }
    if (cfg.threads > MAX_WORKERS) {
        cfg.threads = MAX_WORKERS;
    }
}

static uint64_t gcd(uint64_t a, uint64_t b)
{
    while (b) {
        uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

static void *alloc_pages(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    if (p == MAP_FAILED) {
        out("curling: cannot allocate %zu bytes: %s\n", bytes,
            strerror(errno));
        exit(1);
    }
    return p;
}

static void worker_init(struct worker *w, unsigned id)
{
    uint64_t i, ticks_per_sec;

    w->id = id;
    if (cfg.mode == MODE_IDLE) {
        return;
    }
    w->npages = (uint64_t)cfg.mb * (1024 * 1024 / PAGE_SIZE);
    w->buf = alloc_pages(w->npages * PAGE_SIZE);
    w->table = alloc_pages(w->npages * sizeof(*w->table));
    for (i = 0; i < w->npages; i++) {
        w->table[i] = 1;
        fill_page(w, i, 1);
    }
    w->stride = 1021;
    while (gcd(w->stride, w->npages) != 1) {
        w->stride += 2;
    }
    w->stride %= w->npages;
    if (!w->stride) {
        w->stride = 1;
    }
    ticks_per_sec = (1000 + cfg.period_ms - 1) / cfg.period_ms;
    w->slice = (w->npages + ticks_per_sec - 1) / ticks_per_sec;
}

static void do_work_chunk(struct worker *w)
{
    uint64_t acc = w->work_acc;
    unsigned j;

    for (j = 0; j < WORK_CHUNK; j++) {
        acc = acc * 6364136223846793005ull + 1442695040888963407ull;
    }
    w->work_acc = acc;
    add64(&w->work, WORK_CHUNK);
}

/* The tick line: sums over the workers, FAIL if any check failed. */
static void print_tick(uint64_t tick)
{
    uint64_t work = 0, pages = 0;
    char why[WHY_LEN] = "";
    unsigned i;

    if (cfg.mode == MODE_IDLE) {
        out("curling: tick=%llu work=0 pages=0 check=skip\n",
            (unsigned long long)tick);
        return;
    }
    pthread_mutex_lock(&why_lock);
    for (i = 0; i < nworkers; i++) {
        struct worker *w = &workers[i];
        uint64_t fails = load64(&w->fails);

        work += load64(&w->work);
        pages += load64(&w->pages);
        if (fails != w->fails_seen) {
            if (!why[0]) {
                memcpy(why, w->why, sizeof(why));
            }
            w->fails_seen = fails;
        }
    }
    pthread_mutex_unlock(&why_lock);
    if (!why[0]) {
        out("curling: tick=%llu work=%llu pages=%llu check=ok\n",
            (unsigned long long)tick, (unsigned long long)work,
            (unsigned long long)pages);
    } else {
        out("curling: tick=%llu work=%llu pages=%llu check=FAIL %s\n",
            (unsigned long long)tick, (unsigned long long)work,
            (unsigned long long)pages, why);
    }
}

/*
 * The loop of every worker: check once per period, rewrite pages at the
 * configured rate, and spin the work loop in between.  Worker 0 also
 * prints the tick line right after its check.
 */
static void worker_loop(struct worker *w)
{
    uint64_t period_ns = cfg.period_ms * 1000000ull;
    double pages_per_ns = 0, due = 0;
    uint64_t next = now_ns() + period_ns;
    uint64_t last = now_ns();
    uint64_t tick = 0;

    if (cfg.mode == MODE_DIRTY) {
        pages_per_ns = cfg.rate * (1024.0 * 1024.0 / PAGE_SIZE) / 1e9;
    }
    for (;;) {
        uint64_t now = now_ns();

        if (now >= next) {
            check_and_record(w);
            if (w->id == 0) {
                print_tick(++tick);
            }
            next += period_ns;
            now = now_ns();
            if (now >= next) {
                /* Paused or too slow: skip missed ticks, do not burst. */
                next = now + period_ns;
            }
        }

        if (cfg.mode == MODE_IDLE) {
            sleep_until(next);
            continue;
        }

        if (cfg.mode == MODE_DIRTY) {
            now = now_ns();
            due += (double)(now - last) * pages_per_ns;
            last = now;
            /* At most one period's worth of debt, e.g. after a pause. */
            if (due > pages_per_ns * period_ns + 1) {
                due = pages_per_ns * period_ns + 1;
            }
            while (due >= 1.0) {
                rewrite_next_page(w);
                due -= 1.0;
            }
        }
        do_work_chunk(w);
    }
}

static void pin_to_cpu(unsigned cpu)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    cpu_set_t set;

    if (cpus < 1) {
        return;
    }
    CPU_ZERO(&set);
    CPU_SET(cpu % cpus, &set);
    sched_setaffinity(0, sizeof(set), &set);
}

static void *worker_thread(void *opaque)
{
    struct worker *w = opaque;

    pin_to_cpu(w->id);
    worker_loop(w);
    return NULL;
}

static void start_thread(void *(*fn)(void *), void *arg)
{
    pthread_t thread;
    pthread_attr_t attr;
    int err;

    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    err = pthread_create(&thread, &attr, fn, arg);
    pthread_attr_destroy(&attr);
    if (err) {
        out("curling: cannot start a thread: %s\n", strerror(err));
        exit(1);
    }
}

/*
 * The page frame number of the virtual page @vpn, read from @fd (this
 * process's /proc/self/pagemap): 1 and *@pfn when the page is present,
 * 0 when it is not, -1 when the entry cannot be read.
 */
static int page_frame(int fd, uint64_t vpn, uint64_t *pfn)
{
    uint64_t entry;

    if (pread(fd, &entry, sizeof(entry), vpn * sizeof(entry)) !=
        sizeof(entry)) {
        return -1;
    }
    if (!(entry >> 63)) {                   /* not present */
        return 0;
    }
    *pfn = entry & ((1ULL << 55) - 1);
    return 1;
}

/*
 * Highest guest-physical address, in MiB, of the pages of @buf (@npages
 * pages), from /proc/self/pagemap; -1 if unknown.
 */
static long highest_phys_mib(const void *buf, uint64_t npages)
{
    uint64_t i, pfn, top = 0;
    int fd = open("/proc/self/pagemap", O_RDONLY);

    if (fd < 0) {
        return -1;
    }
    for (i = 0; i < npages; i++) {
        int present = page_frame(fd, (uintptr_t)buf / PAGE_SIZE + i, &pfn);

        if (present < 0) {
            close(fd);
            return -1;
        }
        if (present) {
            top = pfn > top ? pfn : top;
        }
    }
    close(fd);
    return (long)(top * PAGE_SIZE >> 20);
}

/*
 * Print the NUMA node that holds the first page of a worker's buffer and
 * the highest guest-physical address of its pages, as
 * "curling: worker=<id> cpu=<cpu> node=<node> high=<MiB>" (-1: not
 * known, e.g. a kernel without NUMA), so that a test can tell its memory
 * layout was really used.
 */
static void report_node(const struct worker *w)
{
    void *page = w->buf;
    int status = -1;

    if (!w->buf ||
        syscall(SYS_move_pages, 0, 1UL, &page, NULL, &status, 0) < 0) {
        status = -1;
    }
    out("curling: worker=%u cpu=%d node=%d high=%ld\n", w->id,
        sched_getcpu(), status,
        w->buf ? highest_phys_mib(w->buf, w->npages) : -1L);
}

/* -- device load ------------------------------------------------------- */

enum dev_class { DEV_DISK, DEV_RNG, DEV_NET, DEV_TTY, DEV_INPUT, DEV_CLASSES };

static const char *const class_names[DEV_CLASSES] = {
    [DEV_DISK] = "disk",
    [DEV_RNG] = "rng",
    [DEV_NET] = "net",
    [DEV_TTY] = "tty",
    [DEV_INPUT] = "input",
};

#define MAX_DEVICES     32
#define DISK_CHUNK      (64 * 1024)
#define DISK_MAGIC      "CURLDISK"

struct device {
    enum dev_class cls;
    char name[32];
    uint64_t count;             /* operations done (net: tx packets) */
    uint64_t rx;                /* net: rx packets */
    uint64_t errors;
    int reported;               /* the first error was printed */
};

static struct device devices[MAX_DEVICES];
static unsigned ndevices;       /* only the reporter adds devices */
static uint64_t errors_total;

static void device_error(struct device *d, const char *fmt, ...)
{
    char why[200];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    add64(&d->errors, 1);
    add64(&errors_total, 1);
    if (!__atomic_exchange_n(&d->reported, 1, __ATOMIC_RELAXED)) {
        out("curling: device error %s: %s\n", d->name, why);
    }
}

static struct device *find_device(enum dev_class cls, const char *name)
{
    unsigned i;

    for (i = 0; i < ndevices; i++) {
        if (devices[i].cls == cls && !strcmp(devices[i].name, name)) {
            return &devices[i];
        }
    }
    return NULL;
}

static struct device *add_device(enum dev_class cls, const char *name,
                                 void *(*fn)(void *))
{
    struct device *d;

    if (find_device(cls, name) || ndevices >= MAX_DEVICES) {
        return NULL;
    }
    d = &devices[ndevices];
    d->cls = cls;
    snprintf(d->name, sizeof(d->name), "%s", name);
    __atomic_store_n(&ndevices, ndevices + 1, __ATOMIC_RELEASE);
    start_thread(fn, d);
    return d;
}

static int read_sysfs_u64(const char *path, uint64_t *value)
{
    char text[32];
    ssize_t n;
    int fd = open(path, O_RDONLY);

    if (fd < 0) {
        return -1;
    }
    n = read(fd, text, sizeof(text) - 1);
    close(fd);
    if (n <= 0) {
        return -1;
    }
    text[n] = '\0';
    *value = strtoull(text, NULL, 0);      /* decimal, or 0x... */
    return 0;
}

/* Read the whole disk over and over with O_DIRECT; check patterned ones. */
static void *disk_thread(void *opaque)
{
    struct device *d = opaque;
    char path[64];
    uint64_t size = 0, pos = 0;
    int fd = -1, patterned = -1;
    unsigned char *buf = NULL;

    snprintf(path, sizeof(path), "/dev/%s", d->name);
    if (posix_memalign((void **)&buf, PAGE_SIZE, DISK_CHUNK)) {
        device_error(d, "no memory");
        return NULL;
    }
    for (;;) {
        ssize_t n;
        unsigned b;

        if (fd < 0) {
            fd = open(path, O_RDONLY | O_DIRECT);
            if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) < 0 ||
                size < PAGE_SIZE) {
                device_error(d, "cannot open %s: %s", path,
                             strerror(errno));
                if (fd >= 0) {
                    close(fd);
                    fd = -1;
                }
                sleep_ms(1000);
                continue;
            }
            size -= size % PAGE_SIZE;
        }
        if (pos >= size) {
            pos = 0;
        }
        n = pread(fd, buf, size - pos < DISK_CHUNK ? size - pos : DISK_CHUNK,
                  pos);
        if (n < (ssize_t)PAGE_SIZE) {
            device_error(d, "read at %llu: %s", (unsigned long long)pos,
                         n < 0 ? strerror(errno) : "short read");
            close(fd);
            fd = -1;
            sleep_ms(1000);
            continue;
        }
        if (patterned < 0 && pos == 0) {
            patterned = !memcmp(buf, DISK_MAGIC, 8);
        }
        for (b = 0; patterned > 0 && b < n / PAGE_SIZE; b++) {
            uint64_t want = pos / PAGE_SIZE + b, have;

            memcpy(&have, buf + b * PAGE_SIZE + 8, sizeof(have));
            if (memcmp(buf + b * PAGE_SIZE, DISK_MAGIC, 8) || have != want) {
                device_error(d, "block %llu holds the wrong data",
                             (unsigned long long)want);
                break;
            }
        }
        pos += n - n % PAGE_SIZE;
        add64(&d->count, 1);
        sleep_ms(10);
    }
    return NULL;
}

static void *rng_thread(void *opaque)
{
    struct device *d = opaque;
    unsigned char buf[64];
    int fd = -1;

    for (;;) {
        ssize_t n;

        if (fd < 0) {
            fd = open("/dev/hwrng", O_RDONLY);
            if (fd < 0) {
                device_error(d, "cannot open /dev/hwrng: %s", strerror(errno));
                sleep_ms(1000);
                continue;
            }
        }
        n = read(fd, buf, sizeof(buf));
        if (n <= 0) {
            if (n < 0 && errno == EINTR) {
                continue;
            }
            device_error(d, "read: %s", n < 0 ? strerror(errno) : "end");
            close(fd);
            fd = -1;
            sleep_ms(1000);
            continue;
        }
        add64(&d->count, 1);
        sleep_ms(10);
    }
    return NULL;
}

/* An ARP request "who has 10.0.2.2, tell 10.0.2.15" from the NIC's MAC. */
static void *net_thread(void *opaque)
{
    struct device *d = opaque;
    char path[128];
    struct ifreq ifr;
    struct sockaddr_ll sll;
    unsigned char frame[42];
    int ctl, fd;

    ctl = socket(AF_INET, SOCK_DGRAM, 0);
    fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ARP));
    if (ctl < 0 || fd < 0) {
        device_error(d, "socket: %s", strerror(errno));
        return NULL;
    }
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%.15s", d->name);
    if (ioctl(ctl, SIOCGIFFLAGS, &ifr) < 0) {
        device_error(d, "SIOCGIFFLAGS: %s", strerror(errno));
        return NULL;
    }
    ifr.ifr_flags |= IFF_UP;
    if (ioctl(ctl, SIOCSIFFLAGS, &ifr) < 0) {
        device_error(d, "cannot bring it up: %s", strerror(errno));
        return NULL;
    }
    if (ioctl(ctl, SIOCGIFHWADDR, &ifr) < 0) {
        device_error(d, "SIOCGIFHWADDR: %s", strerror(errno));
        return NULL;
    }
    memset(&sll, 0, sizeof(sll));
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ARP);
    sll.sll_ifindex = if_nametoindex(d->name);
    sll.sll_halen = ETH_ALEN;
    memset(sll.sll_addr, 0xff, ETH_ALEN);

    memset(frame, 0xff, 6);                             /* broadcast */
    memcpy(frame + 6, ifr.ifr_hwaddr.sa_data, 6);
    frame[12] = 0x08;                                   /* ARP */
    frame[13] = 0x06;
    memcpy(frame + 14, "\x00\x01\x08\x00\x06\x04\x00\x01", 8);
    memcpy(frame + 22, ifr.ifr_hwaddr.sa_data, 6);
    memcpy(frame + 28, "\x0a\x00\x02\x0f", 4);          /* 10.0.2.15 */
    memset(frame + 32, 0, 6);
    memcpy(frame + 38, "\x0a\x00\x02\x02", 4);          /* 10.0.2.2 */

    for (;;) {
        uint64_t tx, rx;

        if (sendto(fd, frame, sizeof(frame), 0, (struct sockaddr *)&sll,
                   sizeof(sll)) < 0 && errno != ENOBUFS &&
            errno != EAGAIN && errno != ENETDOWN) {
            device_error(d, "send: %s", strerror(errno));
        }
        snprintf(path, sizeof(path),
                 "/sys/class/net/%s/statistics/tx_packets", d->name);
        if (read_sysfs_u64(path, &tx) == 0) {
            __atomic_store_n(&d->count, tx, __ATOMIC_RELAXED);
        }
        snprintf(path, sizeof(path),
                 "/sys/class/net/%s/statistics/rx_packets", d->name);
        if (read_sysfs_u64(path, &rx) == 0) {
            __atomic_store_n(&d->rx, rx, __ATOMIC_RELAXED);
        }
        sleep_ms(50);
    }
    return NULL;
}

static void *tty_thread(void *opaque)
{
    struct device *d = opaque;
    uint64_t n = 0;
    int fd = -1;

    for (;;) {
        char line[64];
        int len;

        if (fd < 0) {
            fd = open("/dev/tty0", O_WRONLY | O_NOCTTY);
            if (fd < 0) {
                device_error(d, "cannot open /dev/tty0: %s", strerror(errno));
                sleep_ms(1000);
                continue;
            }
        }
        len = snprintf(line, sizeof(line), "curling: tty %llu\n",
                       (unsigned long long)++n);
        if (write(fd, line, len) != len) {
            device_error(d, "write: %s", strerror(errno));
            close(fd);
            fd = -1;
            sleep_ms(1000);
            continue;
        }
        add64(&d->count, 1);
        sleep_ms(100);
    }
    return NULL;
}

static void *input_thread(void *opaque)
{
    struct device *d = opaque;
    char path[64];
    struct input_event ev[16];
    int fd;

    snprintf(path, sizeof(path), "/dev/input/%s", d->name);
    fd = open(path, O_RDONLY);
    if (fd < 0) {
        device_error(d, "cannot open %s: %s", path, strerror(errno));
        return NULL;
    }
    for (;;) {
        ssize_t n = read(fd, ev, sizeof(ev));
        ssize_t i;

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            device_error(d, "read: %s", strerror(errno));
            sleep_ms(1000);
            continue;
        }
        for (i = 0; i < n / (ssize_t)sizeof(ev[0]); i++) {
            if (ev[i].type != EV_SYN) {
                add64(&d->count, 1);
            }
        }
    }
    return NULL;
}

/* Look for devices that have no load thread yet. */
static void scan_devices(void)
{
    struct dirent *e;
    DIR *dir;
    char rng[64] = "";
    int fd;

    dir = opendir("/sys/block");
    while (dir && (e = readdir(dir))) {
        if (!strncmp(e->d_name, "vd", 2) || !strncmp(e->d_name, "sd", 2)) {
            add_device(DEV_DISK, e->d_name, disk_thread);
        }
    }
    if (dir) {
        closedir(dir);
    }
    dir = opendir("/sys/class/net");
    while (dir && (e = readdir(dir))) {
        if (e->d_name[0] != '.' && strcmp(e->d_name, "lo")) {
            add_device(DEV_NET, e->d_name, net_thread);
        }
    }
    if (dir) {
        closedir(dir);
    }
    dir = opendir("/dev/input");
    while (dir && (e = readdir(dir))) {
        if (!strncmp(e->d_name, "event", 5)) {
            add_device(DEV_INPUT, e->d_name, input_thread);
        }
    }
    if (dir) {
        closedir(dir);
    }
    fd = open("/sys/class/misc/hw_random/rng_current", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, rng, sizeof(rng) - 1);
        rng[n > 0 ? n : 0] = '\0';
        close(fd);
    }
    if (rng[0] && strncmp(rng, "none", 4)) {
        add_device(DEV_RNG, "hwrng", rng_thread);
    }
    if (access("/dev/tty0", W_OK) == 0) {
        add_device(DEV_TTY, "tty0", tty_thread);
    }
}

static void report_devices(void)
{
    uint64_t sum[DEV_CLASSES] = { 0 }, netrx = 0;
    char line[1024], *p = line, *end = line + sizeof(line) - 2;
    unsigned i, n = __atomic_load_n(&ndevices, __ATOMIC_ACQUIRE);
    int c;

    for (i = 0; i < n; i++) {
        sum[devices[i].cls] += load64(&devices[i].count);
        if (devices[i].cls == DEV_NET) {
            netrx += load64(&devices[i].rx);
        }
    }
    p += snprintf(p, end - p, "curling: devices");
    for (c = 0; c < DEV_CLASSES; c++) {
        p += snprintf(p, end - p, " %s=%llu", class_names[c],
                      (unsigned long long)sum[c]);
        if (c == DEV_NET) {
            p += snprintf(p, end - p, " netrx=%llu",
                          (unsigned long long)netrx);
        }
    }
    p += snprintf(p, end - p, " err=%llu",
                  (unsigned long long)load64(&errors_total));
    for (i = 0; i < n && p < end; i++) {
        const struct device *d = &devices[i];

        if (d->cls == DEV_DISK) {
            p += snprintf(p, end - p, " %s=%llu", d->name,
                          (unsigned long long)load64(&d->count));
        } else if (d->cls == DEV_NET) {
            p += snprintf(p, end - p, " %s=%llu/%llu", d->name,
                          (unsigned long long)load64(&d->count),
                          (unsigned long long)load64(&d->rx));
        }
    }
    if (p > end) {
        p = end;
    }
    *p++ = '\n';
    *p = '\0';
    out("%s", line);
}

static void *reporter_thread(void *opaque)
{
    int fd;

    /* No IPv6 chatter (router solicitations, MLD) from the NICs. */
    fd = open("/proc/sys/net/ipv6/conf/default/disable_ipv6", O_WRONLY);
    if (fd >= 0) {
        if (write(fd, "1", 1) != 1) {
            out("curling: cannot disable IPv6\n");
        }
        close(fd);
    }
    fd = open("/proc/sys/net/ipv6/conf/all/disable_ipv6", O_WRONLY);
    if (fd >= 0) {
        if (write(fd, "1", 1) != 1) {
            out("curling: cannot disable IPv6\n");
        }
        close(fd);
    }
    for (;;) {
        scan_devices();
        sleep_ms(1000);
        report_devices();
    }
    return NULL;
}


/* -- disk self-check --------------------------------------------------- */

#define DISKCHECK_BLOCKS    256
#define DISKCHECK_BLOCK     4096
#define DISKCHECK_MAGIC     0x4355524c424c4b30ULL   /* "CURLBLK0" */

static uint32_t disk_table[DISKCHECK_BLOCKS];
static uint64_t disk_writes, disk_checks;

static void disk_fill(uint64_t *blk, unsigned b, uint32_t version)
{
    uint64_t x = mix64(((uint64_t)b << 32) | version);
    unsigned k;

    blk[0] = DISKCHECK_MAGIC;
    blk[1] = ((uint64_t)b << 32) | version;
    for (k = 2; k < DISKCHECK_BLOCK / 8; k++) {
        x += WORD_STEP;
        blk[k] = x;
    }
}

/* Describe the first block of @area that differs from the table. */
static int disk_verify(const uint64_t *area, char *why, size_t whylen)
{
    uint64_t *want = malloc(DISKCHECK_BLOCK);
    unsigned b;
    int ok = 1;

    for (b = 0; ok && b < DISKCHECK_BLOCKS; b++) {
        const uint64_t *have = area + b * (DISKCHECK_BLOCK / 8);

        disk_fill(want, b, disk_table[b]);
        if (memcmp(have, want, DISKCHECK_BLOCK)) {
            snprintf(why, whylen, "block=%u want=%u have=%llu", b,
                     disk_table[b],
                     have[0] == DISKCHECK_MAGIC ?
                     (unsigned long long)(have[1] & 0xffffffffu) : 0ULL);
            ok = 0;
        }
    }
    free(want);
    return ok;
}

static void *diskcheck_thread(void *opaque)
{
    char path[48];
    uint64_t *blk, *area;
    uint64_t last_report = now_ns(), last_check = last_report;
    unsigned b, next = 0;
    char why[96] = "";
    int fd;

    snprintf(path, sizeof(path), "/dev/%s", cfg.diskcheck);
    if (posix_memalign((void **)&blk, PAGE_SIZE, DISKCHECK_BLOCK) ||
        posix_memalign((void **)&area, PAGE_SIZE,
                       DISKCHECK_BLOCKS * DISKCHECK_BLOCK)) {
        out("curling: diskcheck: no memory\n");
        return NULL;
    }
    for (;;) {
        fd = open(path, O_RDWR | O_DIRECT | O_DSYNC);
        if (fd >= 0) {
            break;
        }
        out("curling: diskcheck: cannot open %s: %s\n", path,
            strerror(errno));
        sleep_ms(1000);
    }
    /* Version 1 everywhere first, then one block after the other. */
    for (b = 0; b < DISKCHECK_BLOCKS; b++) {
        disk_fill(blk, b, 1);
        if (pwrite(fd, blk, DISKCHECK_BLOCK, (off_t)b * DISKCHECK_BLOCK) !=
            DISKCHECK_BLOCK) {
            out("curling: diskcheck: write failed: %s\n", strerror(errno));
            return NULL;
        }
        disk_table[b] = 1;
    }
    for (;;) {
        uint64_t t;

        b = next;
        next = (next + 1) % DISKCHECK_BLOCKS;
        disk_fill(blk, b, disk_table[b] + 1);
        /* Disk first, then the table: the thread never checks between. */
        if (pwrite(fd, blk, DISKCHECK_BLOCK, (off_t)b * DISKCHECK_BLOCK) !=
            DISKCHECK_BLOCK) {
            out("curling: diskcheck: write failed: %s\n", strerror(errno));
            sleep_ms(1000);
            continue;
        }
        disk_table[b]++;
        disk_writes++;

        t = now_ns();
        if (t - last_check < cfg.period_ms * 1000000ULL) {
            sleep_ms(2);
            continue;
        }
        last_check = t;
        if (pread(fd, area, DISKCHECK_BLOCKS * DISKCHECK_BLOCK, 0) !=
            DISKCHECK_BLOCKS * DISKCHECK_BLOCK) {
            out("curling: diskcheck: read failed: %s\n", strerror(errno));
        } else {
            disk_checks++;
            if (!why[0] && !disk_verify(area, why, sizeof(why))) {
                out("curling: diskcheck dev=%s writes=%llu checks=%llu "
                    "check=FAIL %s\n", cfg.diskcheck,
                    (unsigned long long)disk_writes,
                    (unsigned long long)disk_checks, why);
            }
        }
        if (t - last_report >= 1000000000ULL) {
            out("curling: diskcheck dev=%s writes=%llu checks=%llu "
                "check=%s\n", cfg.diskcheck, (unsigned long long)disk_writes,
                (unsigned long long)disk_checks, why[0] ? "FAIL" : "ok");
            last_report = t;
        }
    }
    return NULL;
}

/* -- framebuffer self-check -------------------------------------------- */

#define FB_WIDTH        640
#define FB_HEIGHT       480
#define FB_BPP          32
#define FB_BYTES        (FB_WIDTH * FB_HEIGHT * 4)
#define FB_ROWS_PER_STEP 4
#define VBE_INDEX_PORT  0x1ce
#define VBE_DATA_PORT   0x1cf
#define VBE_XRES        1
#define VBE_YRES        2
#define VBE_BPP         3
#define VBE_ENABLE      4
#define VBE_ENABLED     0x01
#define VBE_LFB_ENABLED 0x40

static uint32_t fb_table[FB_HEIGHT];
static uint64_t fb_writes, fb_checks;

static void vbe_write(uint16_t index, uint16_t value)
{
    outw(index, VBE_INDEX_PORT);
    outw(value, VBE_DATA_PORT);
}

static uint16_t vbe_read(uint16_t index)
{
    outw(index, VBE_INDEX_PORT);
    return inw(VBE_DATA_PORT);
}

/* Pixel @x of row @r at @version: every pixel of every version differs. */
static inline uint32_t fb_pixel(unsigned r, uint32_t version, unsigned x)
{
    return (uint32_t)mix64(((uint64_t)r << 32 | version) +
                           x * WORD_STEP);
}

static void fb_fill_row(volatile uint32_t *fb, unsigned r, uint32_t version)
{
    volatile uint32_t *row = fb + (size_t)r * FB_WIDTH;
    unsigned x;

    for (x = 0; x < FB_WIDTH; x++) {
        row[x] = fb_pixel(r, version, x);
    }
}

/* Describe the first pixel of @fb that differs from the table. */
static int fb_verify(const volatile uint32_t *fb, char *why, size_t whylen)
{
    unsigned r, x;

    for (r = 0; r < FB_HEIGHT; r++) {
        const volatile uint32_t *row = fb + (size_t)r * FB_WIDTH;

        for (x = 0; x < FB_WIDTH; x++) {
            if (row[x] != fb_pixel(r, fb_table[r], x)) {
                snprintf(why, whylen, "row=%u want=%u pixel=%u", r,
                         fb_table[r], x);
                return 0;
            }
        }
    }
    return 1;
}

/* The sysfs path of BAR 0 of the first std VGA, in @path. */
static int fb_find(char *path, size_t len)
{
    DIR *dir = opendir("/sys/bus/pci/devices");
    struct dirent *de;
    int found = 0;

    if (!dir) {
        return 0;
    }
    while (!found && (de = readdir(dir))) {
        char attr[300];
        uint64_t vendor, device;

        if (de->d_name[0] == '.') {
            continue;
        }
        snprintf(attr, sizeof(attr), "/sys/bus/pci/devices/%s/vendor",
                 de->d_name);
        if (read_sysfs_u64(attr, &vendor) || vendor != 0x1234) {
            continue;
        }
        snprintf(attr, sizeof(attr), "/sys/bus/pci/devices/%s/device",
                 de->d_name);
        if (read_sysfs_u64(attr, &device) || device != 0x1111) {
            continue;
        }
        snprintf(path, len, "/sys/bus/pci/devices/%s/resource0", de->d_name);
        found = 1;
    }
    closedir(dir);
    return found;
}

static void *fb_thread(void *opaque)
{
    char path[300];
    volatile uint32_t *fb;
    uint64_t last_report = now_ns(), last_check = last_report;
    unsigned r, k, next = 0;
    char why[96] = "";
    int fd;

    if (!fb_find(path, sizeof(path))) {
        out("curling: fb: no std VGA\n");
        return NULL;
    }
    fd = open(path, O_RDWR | O_SYNC);
    /* A 16-bit access to the data port spans 0x1cf and 0x1d0. */
    if (fd < 0 || ioperm(VBE_INDEX_PORT, 3, 1) < 0) {
        out("curling: fb: cannot open %s: %s\n", path, strerror(errno));
        return NULL;
    }
    fb = mmap(NULL, FB_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (fb == MAP_FAILED) {
        out("curling: fb: cannot map %s: %s\n", path, strerror(errno));
        return NULL;
    }
    vbe_write(VBE_ENABLE, 0);
    vbe_write(VBE_XRES, FB_WIDTH);
    vbe_write(VBE_YRES, FB_HEIGHT);
    vbe_write(VBE_BPP, FB_BPP);
    vbe_write(VBE_ENABLE, VBE_ENABLED | VBE_LFB_ENABLED);
    out("curling: fb mode=%ux%ux%u\n", vbe_read(VBE_XRES),
        vbe_read(VBE_YRES), vbe_read(VBE_BPP));

    /* Version 1 everywhere first, then one row after the other. */
    for (r = 0; r < FB_HEIGHT; r++) {
        fb_fill_row(fb, r, 1);
        fb_table[r] = 1;
    }
    for (;;) {
        uint64_t t;

        for (k = 0; k < FB_ROWS_PER_STEP; k++) {
            r = next;
            next = (next + 1) % FB_HEIGHT;
            /* Row first, then the table: the thread never checks between. */
            fb_fill_row(fb, r, fb_table[r] + 1);
            fb_table[r]++;
            fb_writes++;
        }

        t = now_ns();
        if (t - last_check < cfg.period_ms * 1000000ULL) {
            sleep_ms(5);
            continue;
        }
        last_check = t;
        fb_checks++;
        if (!why[0] && !fb_verify(fb, why, sizeof(why))) {
            out("curling: fbcheck writes=%llu checks=%llu check=FAIL %s\n",
                (unsigned long long)fb_writes,
                (unsigned long long)fb_checks, why);
        }
        if (t - last_report >= 1000000000ULL) {
            out("curling: fbcheck writes=%llu checks=%llu check=%s\n",
                (unsigned long long)fb_writes,
                (unsigned long long)fb_checks, why[0] ? "FAIL" : "ok");
            last_report = t;
        }
    }
    return NULL;
}

/* -- guest clock -------------------------------------------------------- */

#define CLOCK_UPDATE_US 2000

/* Guest-physical address of the page at @p, or 0 when it is not present. */
static uint64_t phys_addr(const void *p)
{
    int fd = open("/proc/self/pagemap", O_RDONLY);
    uint64_t pfn;
    int present;

    if (fd < 0) {
        return 0;
    }
    present = page_frame(fd, (uintptr_t)p / PAGE_SIZE, &pfn);
    close(fd);
    return present > 0 ? pfn * PAGE_SIZE : 0;
}

static void *clock_thread(void *opaque)
{
    volatile uint64_t *page = alloc_pages(PAGE_SIZE);
    uint64_t phys = 0, last_look = 0;

    page[0] = now_ns();
    if (mlock((void *)page, PAGE_SIZE) < 0) {
        out("curling: clock: cannot lock its page: %s\n", strerror(errno));
    }
    for (;;) {
        uint64_t t = now_ns();

        page[0] = t;
        if (!phys || t - last_look >= 1000000000ULL) {
            uint64_t where = phys_addr((const void *)page);

            if (where != phys) {
                phys = where;
                out("curling: clock phys=0x%llx\n", (unsigned long long)phys);
            }
            last_look = t;
        }
        usleep(CLOCK_UPDATE_US);
    }
    return NULL;
}

/* -- file system workload ---------------------------------------------- */

#define FS_FILES        32
#define FS_MAX_LEN      (256 * 1024)
#define FS_CHUNK        (64 * 1024)

struct fs_file {
    int used;
    uint32_t gen;               /* unique: names the content */
    uint32_t renames;
    uint32_t len;               /* bytes made durable */
};

static struct fs_file fs_files[FS_FILES];
static uint32_t fs_next_gen;
static uint64_t fs_ops, fs_checks, fs_rng = 0x2545f4914f6cdd1dULL;

static uint64_t fs_random(void)
{
    fs_rng ^= fs_rng << 13;
    fs_rng ^= fs_rng >> 7;
    fs_rng ^= fs_rng << 17;
    return fs_rng;
}

static void fs_name(const struct fs_file *f, char *name, size_t len)
{
    snprintf(name, len, "/mnt/f%u.%u", f->gen, f->renames);
}

static void fs_data(uint32_t gen, uint32_t off, unsigned char *buf,
                    uint32_t n)
{
    uint32_t i;

    for (i = 0; i < n; i++) {
        uint32_t o = off + i;

        buf[i] = mix64(((uint64_t)gen << 32) | (o / 8)) >> ((o % 8) * 8);
    }
}

static int fs_sync_dir(void)
{
    int fd = open("/mnt", O_RDONLY | O_DIRECTORY);
    int ret;

    if (fd < 0) {
        return -1;
    }
    ret = fsync(fd);
    close(fd);
    return ret;
}

/* Append @n bytes of @f's content at its end, durably. */
static int fs_append(struct fs_file *f, int flags, uint32_t n,
                     unsigned char *buf)
{
    char name[48];
    int fd;

    fs_name(f, name, sizeof(name));
    fd = open(name, O_WRONLY | flags, 0644);
    if (fd < 0) {
        return -1;
    }
    fs_data(f->gen, f->len, buf, n);
    if (pwrite(fd, buf, n, f->len) != (ssize_t)n || fsync(fd)) {
        close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

static int fs_operate(unsigned char *buf, char *why, size_t whylen)
{
    struct fs_file *f = &fs_files[fs_random() % FS_FILES];
    char from[48], to[48];
    uint32_t n = 1 + fs_random() % FS_CHUNK;

    if (!f->used) {
        f->gen = ++fs_next_gen;
        f->renames = 0;
        f->len = 0;
        if (fs_append(f, O_CREAT | O_EXCL, n, buf) || fs_sync_dir()) {
            snprintf(why, whylen, "create f%u: %s", f->gen, strerror(errno));
            return -1;
        }
        f->len = n;
        f->used = 1;
        return 0;
    }
    switch (fs_random() % 4) {
    case 0:
    case 1:
        if (f->len + n > FS_MAX_LEN) {
            break;
        }
        if (fs_append(f, 0, n, buf)) {
            snprintf(why, whylen, "append f%u: %s", f->gen, strerror(errno));
            return -1;
        }
        f->len += n;
        return 0;
    case 2:
        fs_name(f, from, sizeof(from));
        f->renames++;
        fs_name(f, to, sizeof(to));
        if (rename(from, to) || fs_sync_dir()) {
            snprintf(why, whylen, "rename f%u: %s", f->gen, strerror(errno));
            return -1;
        }
        return 0;
    }
    fs_name(f, from, sizeof(from));
    if (unlink(from) || fs_sync_dir()) {
        snprintf(why, whylen, "delete f%u: %s", f->gen, strerror(errno));
        return -1;
    }
    f->used = 0;
    return 0;
}

/* Read every recorded file back from the disk. */
static int fs_verify(unsigned char *buf, unsigned char *want, char *why,
                     size_t whylen)
{
    int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
    unsigned i;

    if (fd >= 0) {
        if (write(fd, "3", 1) != 1) {
            out("curling: fs: cannot drop caches\n");
        }
        close(fd);
    }
    for (i = 0; i < FS_FILES; i++) {
        struct fs_file *f = &fs_files[i];
        char name[48];
        struct stat st;
        uint32_t off;

        if (!f->used) {
            continue;
        }
        fs_name(f, name, sizeof(name));
        fd = open(name, O_RDONLY);
        if (fd < 0 || fstat(fd, &st)) {
            snprintf(why, whylen, "%s: %s", name, strerror(errno));
            if (fd >= 0) {
                close(fd);
            }
            return 0;
        }
        if (st.st_size != f->len) {
            snprintf(why, whylen, "%s: %lld bytes, want %u", name,
                     (long long)st.st_size, f->len);
            close(fd);
            return 0;
        }
        for (off = 0; off < f->len; off += FS_CHUNK) {
            uint32_t n = f->len - off < FS_CHUNK ? f->len - off : FS_CHUNK;

            fs_data(f->gen, off, want, n);
            if (pread(fd, buf, n, off) != (ssize_t)n || memcmp(buf, want, n)) {
                snprintf(why, whylen, "%s: wrong data in %u bytes at %u",
                         name, n, off);
                close(fd);
                return 0;
            }
        }
        close(fd);
    }
    return 1;
}

static void *fs_thread(void *opaque)
{
    char dev[48], why[160] = "";
    unsigned char *buf = malloc(FS_CHUNK), *want = malloc(FS_CHUNK);
    uint64_t start, last_report, last_check, t;
    unsigned i, nfiles;

    snprintf(dev, sizeof(dev), "/dev/%s", cfg.fs);
    mkdir("/mnt", 0755);
    while (mount(dev, "/mnt", "ext4", 0, NULL)) {
        out("curling: fs: cannot mount %s: %s\n", dev, strerror(errno));
        sleep_ms(1000);
    }
    start = last_report = last_check = now_ns();
    for (;;) {
        t = now_ns();
        if (cfg.fs_seconds && t - start >= cfg.fs_seconds * 1000000000ULL) {
            break;
        }
        if (!why[0] && fs_operate(buf, why, sizeof(why))) {
            out("curling: fs dev=%s ops=%llu checks=%llu check=FAIL %s\n",
                cfg.fs, (unsigned long long)fs_ops,
                (unsigned long long)fs_checks, why);
        }
        fs_ops++;
        if (t - last_check >= cfg.period_ms * 1000000ULL && !why[0]) {
            last_check = t;
            fs_checks++;
            if (!fs_verify(buf, want, why, sizeof(why))) {
                out("curling: fs dev=%s ops=%llu checks=%llu check=FAIL "
                    "%s\n", cfg.fs, (unsigned long long)fs_ops,
                    (unsigned long long)fs_checks, why);
            }
        }
        if (t - last_report >= 1000000000ULL) {
            for (i = nfiles = 0; i < FS_FILES; i++) {
                nfiles += fs_files[i].used;
            }
            out("curling: fs dev=%s ops=%llu checks=%llu files=%u check=%s\n",
                cfg.fs, (unsigned long long)fs_ops,
                (unsigned long long)fs_checks, nfiles,
                why[0] ? "FAIL" : "ok");
            last_report = t;
        }
        sleep_ms(5);
    }
    if (umount("/mnt")) {
        out("curling: fs: cannot unmount: %s\n", strerror(errno));
        return NULL;
    }
    out("curling: fs unmounted ops=%llu check=%s\n",
        (unsigned long long)fs_ops, why[0] ? "FAIL" : "ok");
    return NULL;
}

/* -- disk benchmark load ----------------------------------------------- */

#define DISKLOAD_SEQ_BLOCK      (64 * 1024)
#define DISKLOAD_SYNC_BLOCK     4096

static void *diskload_thread(void *opaque)
{
    int seq = !strcmp(cfg.diskload, "seq");
    size_t block = seq ? DISKLOAD_SEQ_BLOCK : DISKLOAD_SYNC_BLOCK;
    uint64_t size = 0, pos = 0, ops = 0, bytes = 0, lat_sum = 0, lat_max = 0;
    uint64_t start, last_report, rng = 0x9e3779b97f4a7c15ULL;
    double rate = (cfg.disk_rate > 0 ? cfg.disk_rate : 10) * 1024 * 1024;
    unsigned char *buf;
    int fd;

    if (posix_memalign((void **)&buf, PAGE_SIZE, block)) {
        out("curling: diskload: no memory\n");
        return NULL;
    }
    memset(buf, 0xa5, block);
    for (;;) {
        fd = open("/dev/vda", O_RDWR | O_DIRECT);
        if (fd >= 0 && !ioctl(fd, BLKGETSIZE64, &size) && size >= block) {
            break;
        }
        out("curling: diskload: cannot open /dev/vda: %s\n", strerror(errno));
        if (fd >= 0) {
            close(fd);
        }
        sleep_ms(1000);
    }
    size -= size % block;
    start = last_report = now_ns();
    for (;;) {
        uint64_t t0, t1, off;

        if (seq) {
            /* Paced: block n is due at start + n * block / rate. */
            uint64_t due = start + (uint64_t)(ops * block / rate * 1e9);

            t0 = now_ns();
            if (due > t0) {
                struct timespec ts = { (due - t0) / 1000000000ULL,
                                       (due - t0) % 1000000000ULL };
                nanosleep(&ts, NULL);
            }
            off = pos;
            pos = (pos + block) % size;
        } else {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            off = (rng % (size / block)) * block;
        }
        buf[0] = ops;
        t0 = now_ns();
        if (pwrite(fd, buf, block, off) != (ssize_t)block ||
            (!seq && fdatasync(fd))) {
            out("curling: diskload: write at %llu: %s\n",
                (unsigned long long)off, strerror(errno));
            sleep_ms(1000);
            continue;
        }
        t1 = now_ns();
        ops++;
        bytes += block;
        lat_sum += (t1 - t0) / 1000;
        if ((t1 - t0) / 1000 > lat_max) {
            lat_max = (t1 - t0) / 1000;
        }
        if (t1 - last_report >= 1000000000ULL) {
            out("curling: diskload mode=%s ops=%llu bytes=%llu lat_us=%llu "
                "max_us=%llu\n", cfg.diskload, (unsigned long long)ops,
                (unsigned long long)bytes, (unsigned long long)lat_sum,
                (unsigned long long)lat_max);
            last_report = t1;
            lat_max = 0;
        }
    }
    return NULL;
}

int main(void)
{
    unsigned i;

    parse_cmdline();
    nworkers = cfg.mode == MODE_IDLE ? 1 : cfg.threads;
    out("curling: start mode=%s mb=%lu rate=%g period=%lu threads=%u "
        "devices=%d\n", mode_name(cfg.mode), cfg.mb, cfg.rate, cfg.period_ms,
        nworkers, cfg.devices);

    for (i = 0; i < nworkers; i++) {
        /*
         * Fill each worker's buffer from the CPU it will run on, so that
         * on a NUMA guest its pages are first touched, and so placed, in
         * that CPU's node.
         */
        pin_to_cpu(i);
        worker_init(&workers[i], i);
        report_node(&workers[i]);
    }
    if (cfg.devices) {
        start_thread(reporter_thread, NULL);
    }
    if (cfg.diskcheck[0]) {
        start_thread(diskcheck_thread, NULL);
    }
    if (cfg.fs[0]) {
        start_thread(fs_thread, NULL);
    }
    if (cfg.diskload[0]) {
        start_thread(diskload_thread, NULL);
    }
    if (cfg.fb) {
        start_thread(fb_thread, NULL);
    }
    if (cfg.clock) {
        start_thread(clock_thread, NULL);
    }
    for (i = 1; i < nworkers; i++) {
        start_thread(worker_thread, &workers[i]);
    }
    pin_to_cpu(0);
    worker_loop(&workers[0]);
    return 0;
}
