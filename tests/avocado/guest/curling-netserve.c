// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Network services of the Curling test guest, started by /init beside the
 * workload when the kernel command line has curling.serve=1 (and
 * curling.ip=ADDR/LEN to configure eth0).  What a client outside sees of
 * them tells whether output from an uncommitted checkpoint escaped:
 *
 *   TCP 7001  stream: lines "TICK <ns> counter=<c> pad=<x...>\n", c going
 *             up by one per line of the connection, the pad's length
 *             following the guest's clock, one line every 2 ms.  A guest
 *             resumed from an older state writes other bytes at the same
 *             stream offsets: a client that saw the lost ones reads a line
 *             that does not parse or a counter that does not follow.
 *   TCP 7002  request/response: "REQ <n>\n" -> "REP <n> conn=<k>
 *             global=<g>\n"; k counts the requests of the connection and
 *             g those of the whole guest, both from 1.  A reply never seen
 *             again with another number is a reply from a lost state.
 *   UDP 7003  after a datagram from the client, datagrams "UDP <s> <ns>\n"
 *             to it every millisecond, s going up by one.
 *   TCP 7004  bulk: an endless byte stream, byte i being (i * 7) & 0xff.
 *
 * Each service takes any number of connections, a thread each.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t global_requests;

static void out(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (n > 0) {
        (void)!write(STDOUT_FILENO, line, (size_t)n < sizeof(line) ?
                     (size_t)n : sizeof(line) - 1);
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t n = write(fd, buf, len);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static void *stream_conn(void *opaque)
{
    int fd = (int)(intptr_t)opaque;
    uint64_t counter = 0;
    char line[192];

    for (;;) {
        uint64_t t = now_ns();
        int pad = (int)((t / 1000) % 64);
        int n = snprintf(line, sizeof(line), "TICK %llu counter=%llu pad=",
                         (unsigned long long)t,
                         (unsigned long long)++counter);

        memset(line + n, 'x', (size_t)pad);
        line[n + pad] = '\n';
        if (write_all(fd, line, (size_t)(n + pad + 1)) < 0) {
            break;
        }
        usleep(2000);
    }
    close(fd);
    return NULL;
}

static void *rr_conn(void *opaque)
{
    int fd = (int)(intptr_t)opaque;
    uint64_t conn_requests = 0;
    char buf[512], reply[128];
    size_t have = 0;

    for (;;) {
        char *nl;
        ssize_t n = read(fd, buf + have, sizeof(buf) - 1 - have);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            break;
        }
        have += (size_t)n;
        buf[have] = 0;
        while ((nl = strchr(buf, '\n'))) {
            unsigned long long req;
            int len;

            *nl = 0;
            if (sscanf(buf, "REQ %llu", &req) != 1) {
                len = snprintf(reply, sizeof(reply), "ERR\n");
            } else {
                uint64_t g = __atomic_add_fetch(&global_requests, 1,
                                                __ATOMIC_SEQ_CST);

                len = snprintf(reply, sizeof(reply),
                               "REP %llu conn=%llu global=%llu\n", req,
                               (unsigned long long)++conn_requests,
                               (unsigned long long)g);
            }
            if (write_all(fd, reply, (size_t)len) < 0) {
                goto done;
            }
            have -= (size_t)(nl + 1 - buf);
            memmove(buf, nl + 1, have + 1);
        }
        if (have == sizeof(buf) - 1) {
            break;
        }
    }
done:
    close(fd);
    return NULL;
}

static void *bulk_conn(void *opaque)
{
    int fd = (int)(intptr_t)opaque;
    static char pattern[7 * 256];
    size_t i;

    for (i = 0; i < sizeof(pattern); i++) {
        pattern[i] = (char)((i * 7) & 0xff);
    }
    /* 1792 bytes: a multiple of 256, so the pattern repeats seamlessly. */
    while (write_all(fd, pattern, sizeof(pattern)) == 0) {
        ;
    }
    close(fd);
    return NULL;
}

static int spawn(void *(*fn)(void *), intptr_t arg)
{
    pthread_attr_t attr;
    pthread_t tid;
    int ret;

    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    ret = pthread_create(&tid, &attr, fn, (void *)arg);
    pthread_attr_destroy(&attr);
    if (ret) {
        out("curling: netserve: pthread_create: %s\n", strerror(ret));
        return -1;
    }
    return 0;
}

static int listen_on(int type, uint16_t port)
{
    struct sockaddr_in sin = {
        .sin_family = AF_INET,
        .sin_port = htons(port),
        .sin_addr.s_addr = htonl(INADDR_ANY),
    };
    int one = 1;
    int fd = socket(AF_INET, type, 0);

    if (fd < 0) {
        return -1;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&sin, sizeof(sin)) < 0 ||
        (type == SOCK_STREAM && listen(fd, 128) < 0)) {
        out("curling: netserve: port %u: %s\n", port, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

struct service {
    uint16_t port;
    void *(*conn)(void *);
};

static void *accept_loop(void *opaque)
{
    const struct service *svc = opaque;
    int lfd = listen_on(SOCK_STREAM, svc->port);
    int one = 1;

    if (lfd < 0) {
        return NULL;
    }
    for (;;) {
        int fd = accept(lfd, NULL, NULL);

        if (fd < 0) {
            if (errno != EINTR && errno != ECONNABORTED) {
                usleep(10000);
            }
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (spawn(svc->conn, fd) < 0) {
            close(fd);
        }
    }
    return NULL;
}

static void *udp_loop(void *opaque)
{
    int fd = listen_on(SOCK_DGRAM, 7003);
    struct sockaddr_in peer;
    socklen_t plen = sizeof(peer);
    char buf[64];
    uint64_t seq = 0;

    (void)opaque;
    if (fd < 0) {
        return NULL;
    }
    while (recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer,
                    &plen) < 0) {
        plen = sizeof(peer);
    }
    for (;;) {
        int n = snprintf(buf, sizeof(buf), "UDP %llu %llu\n",
                         (unsigned long long)++seq,
                         (unsigned long long)now_ns());

        sendto(fd, buf, (size_t)n, 0, (struct sockaddr *)&peer, plen);
        usleep(1000);
    }
    return NULL;
}

int main(void)
{
    static const struct service services[] = {
        { 7001, stream_conn },
        { 7002, rr_conn },
        { 7004, bulk_conn },
    };
    size_t i;

    /* A client that goes away must not take the services with it. */
    signal(SIGPIPE, SIG_IGN);
    for (i = 0; i < sizeof(services) / sizeof(services[0]); i++) {
        spawn(accept_loop, (intptr_t)&services[i]);
    }
    spawn(udp_loop, 0);
    out("curling: netserve listening\n");
    for (;;) {
        pause();
    }
    return 0;
}
