/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * curling-counter: the workload of the Curling test guest.
 *
 * Runs as the only process of a busybox initramfs and prints one line per
 * period on its standard output (the serial console):
 *
 *   curling: tick=<n> work=<loop iterations> pages=<pages rewritten> check=ok
 *
 * or "check=FAIL page=<i> ..." when the memory self-check finds a page that
 * does not match the version table.
 *
 * Self-check: a buffer of pages is rewritten at a fixed rate.  Rewriting page
 * i bumps its version v and fills the whole page with a pattern derived from
 * (i, v); a separate version table, allocated apart from the buffer so that
 * it lives in other pages, records the version every page must hold.  A
 * state restored from one consistent point in time always passes; a state
 * that mixes pages from one moment with a table from another fails.
 *
 * Before every print the program compares the tag words (first and last
 * word) of every page with the table, and verifies the full contents of a
 * rotating slice of the pages, sized so that every page is fully verified at
 * least once a second.
 *
 * Parameters come from the kernel command line (/proc/cmdline):
 *   curling.mode=counter|dirty|idle  (default dirty)
 *   curling.mb=N       buffer size in MiB (default 16)
 *   curling.rate=R     MiB per second of distinct pages rewritten (default 1)
 *   curling.period=MS  print period in milliseconds (default 100)
 *
 * Mode counter runs the CPU-bound loop only ("work" counts its iterations);
 * mode dirty also rewrites pages at the given rate; mode idle sleeps and
 * prints "work=0 pages=0 check=skip".  At 16 MiB the self-check costs about
 * 1.2 ms per tick under TCG; build with -DCURLING_TIMING to print it.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE       4096u
#define PAGE_WORDS      (PAGE_SIZE / sizeof(uint64_t))
#define WORK_CHUNK      4096u
#define WORD_STEP       0x9e3779b97f4a7c15ull

enum mode { MODE_COUNTER, MODE_DIRTY, MODE_IDLE };

struct config {
    enum mode mode;
    unsigned long mb;
    double rate;
    unsigned long period_ms;
};

/* Everything the self-check needs lives in memory, like the counters. */
static uint64_t *buf;           /* npages pages of pattern */
static uint32_t *table;         /* expected version of every page */
static uint64_t npages;
static uint64_t stride;         /* step between consecutive rewritten pages */
static uint64_t cursor;         /* next page to rewrite */
static uint64_t verify_next;    /* first page of the next full-verify slice */

static volatile uint64_t tick;
static volatile uint64_t work;
static volatile uint64_t pages_rewritten;
static volatile uint64_t work_acc;

static void out(const char *fmt, ...)
{
    char line[256];
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
    }
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

static void fill_page(uint64_t i, uint32_t version)
{
    uint64_t *p = buf + i * PAGE_WORDS;
    uint64_t w = mix64(page_tag(i, version));
    unsigned k;

    for (k = 1; k < PAGE_WORDS - 1; k++) {
        w += WORD_STEP;
        p[k] = w;
    }
    p[0] = page_tag(i, version);
    p[PAGE_WORDS - 1] = page_tag(i, version);
}

/* Returns the index of the first bad word, or -1 when the page is intact. */
static long full_check_page(uint64_t i, uint32_t version)
{
    const uint64_t *p = buf + i * PAGE_WORDS;
    uint64_t w = mix64(page_tag(i, version));
    uint64_t diff = 0;
    unsigned k;

    if (p[0] != page_tag(i, version)) {
        return 0;
    }
    for (k = 1; k < PAGE_WORDS - 1; k++) {
        w += WORD_STEP;
        diff |= p[k] ^ w;
    }
    if (diff) {
        w = mix64(page_tag(i, version));
        for (k = 1; k < PAGE_WORDS - 1; k++) {
            w += WORD_STEP;
            if (p[k] != w) {
                return k;
            }
        }
    }
    if (p[PAGE_WORDS - 1] != page_tag(i, version)) {
        return PAGE_WORDS - 1;
    }
    return -1;
}

static void rewrite_next_page(void)
{
    uint64_t i = cursor;
    uint32_t v = table[i] + 1;

    /* Page first, then the table: the program never checks in between. */
    fill_page(i, v);
    table[i] = v;
    pages_rewritten++;
    cursor = (cursor + stride) % npages;
}

/*
 * Check the tag words of every page and the full contents of @slice pages.
 * On failure, describe the first bad page in @why and return false.
 */
static int self_check(uint64_t slice, char *why, size_t whylen)
{
    uint64_t i, n;

    for (i = 0; i < npages; i++) {
        const uint64_t *p = buf + i * PAGE_WORDS;
        uint64_t want = page_tag(i, table[i]);

        if (p[0] != want || p[PAGE_WORDS - 1] != want) {
            snprintf(why, whylen,
                     "page=%llu want=%u have=%llu:%llu",
                     (unsigned long long)i, table[i],
                     (unsigned long long)(p[0] & 0xffffffffu),
                     (unsigned long long)(p[PAGE_WORDS - 1] & 0xffffffffu));
            return 0;
        }
    }
    for (n = 0; n < slice; n++) {
        long bad;

        i = verify_next;
        verify_next = (verify_next + 1) % npages;
        bad = full_check_page(i, table[i]);
        if (bad >= 0) {
            snprintf(why, whylen, "page=%llu want=%u word=%ld",
                     (unsigned long long)i, table[i], bad);
            return 0;
        }
    }
    return 1;
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

static void parse_cmdline(struct config *cfg)
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
                cfg->mode = MODE_COUNTER;
            } else if (!strcmp(v, "dirty")) {
                cfg->mode = MODE_DIRTY;
            } else if (!strcmp(v, "idle")) {
                cfg->mode = MODE_IDLE;
            } else {
                out("curling: unknown mode '%s', using dirty\n", v);
            }
        } else if (!strncmp(tok, "curling.mb=", 11)) {
            cfg->mb = strtoul(tok + 11, NULL, 10);
        } else if (!strncmp(tok, "curling.rate=", 13)) {
            cfg->rate = strtod(tok + 13, NULL);
        } else if (!strncmp(tok, "curling.period=", 15)) {
            cfg->period_ms = strtoul(tok + 15, NULL, 10);
        }
    }
    if (cfg->mb < 1) {
        cfg->mb = 1;
    }
    if (cfg->rate < 0) {
        cfg->rate = 0;
    }
    if (cfg->period_ms < 1) {
        cfg->period_ms = 1;
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

static void do_work_chunk(void)
{
    uint64_t acc = work_acc;
    unsigned j;

    for (j = 0; j < WORK_CHUNK; j++) {
        acc = acc * 6364136223846793005ull + 1442695040888963407ull;
    }
    work_acc = acc;
    work += WORK_CHUNK;
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

int main(void)
{
    struct config cfg = {
        .mode = MODE_DIRTY,
        .mb = 16,
        .rate = 1.0,
        .period_ms = 100,
    };
    uint64_t period_ns, next_print, slice = 0, i;
    uint64_t ticks_per_sec;
    double pages_per_ns = 0, due = 0;
    uint64_t last = 0;
    char why[160];

    parse_cmdline(&cfg);
    out("curling: start mode=%s mb=%lu rate=%g period=%lu\n",
        mode_name(cfg.mode), cfg.mb, cfg.rate, cfg.period_ms);

    period_ns = cfg.period_ms * 1000000ull;
    if (cfg.mode != MODE_IDLE) {
        npages = (uint64_t)cfg.mb * (1024 * 1024 / PAGE_SIZE);
        buf = alloc_pages(npages * PAGE_SIZE);
        table = alloc_pages(npages * sizeof(*table));
        for (i = 0; i < npages; i++) {
            table[i] = 1;
            fill_page(i, 1);
        }
        stride = 1021;
        while (gcd(stride, npages) != 1) {
            stride += 2;
        }
        stride %= npages;
        if (!stride) {
            stride = 1;
        }
        ticks_per_sec = (1000 + cfg.period_ms - 1) / cfg.period_ms;
        slice = (npages + ticks_per_sec - 1) / ticks_per_sec;
        if (cfg.mode == MODE_DIRTY) {
            pages_per_ns = cfg.rate * (1024.0 * 1024.0 / PAGE_SIZE) / 1e9;
        }
    }

    next_print = now_ns() + period_ns;
    last = now_ns();
    for (;;) {
        uint64_t now = now_ns();

        if (now >= next_print) {
            int ok = 1;

            if (buf) {
#ifdef CURLING_TIMING
                uint64_t t0 = now_ns();
#endif
                ok = self_check(slice, why, sizeof(why));
#ifdef CURLING_TIMING
                out("curling: check took %llu us\n",
                    (unsigned long long)((now_ns() - t0) / 1000));
#endif
            }
            tick++;
            if (cfg.mode == MODE_IDLE) {
                out("curling: tick=%llu work=0 pages=0 check=skip\n",
                    (unsigned long long)tick);
            } else if (ok) {
                out("curling: tick=%llu work=%llu pages=%llu check=ok\n",
                    (unsigned long long)tick, (unsigned long long)work,
                    (unsigned long long)pages_rewritten);
            } else {
                out("curling: tick=%llu work=%llu pages=%llu check=FAIL %s\n",
                    (unsigned long long)tick, (unsigned long long)work,
                    (unsigned long long)pages_rewritten, why);
            }
            next_print += period_ns;
            now = now_ns();
            if (now >= next_print) {
                /* Paused or too slow: skip missed ticks, do not burst. */
                next_print = now + period_ns;
            }
        }

        if (cfg.mode == MODE_IDLE) {
            sleep_until(next_print);
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
                rewrite_next_page();
                due -= 1.0;
            }
        }
        do_work_chunk();
    }
    return 0;
}
