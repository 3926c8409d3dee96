/* loadgen: a single-threaded epoll load generator for bench/hub.py.
 *
 * Compiled by the benchmark (gcc -O2); it must never be the bottleneck.
 *
 *   loadgen echo  HOST PORT CONNS INFLIGHT SIZE WARMUP SECONDS
 *       Open CONNS connections; keep INFLIGHT newline-terminated messages of SIZE bytes
 *       outstanding on each (pipelined); count echoed messages for SECONDS after WARMUP.
 *   loadgen hold  HOST PORT CONNS
 *       Open CONNS connections, print "ready N", hold them until stdin closes.
 *   loadgen churn HOST PORT CONCURRENCY SECONDS
 *       CONCURRENCY slots each loop: connect, send one line, wait for its echo, close.
 *   loadgen sink  HOST PORT CONNS EXPECTED TIMEOUT
 *       Open CONNS connections, print "ready N", count received lines until EXPECTED
 *       lines arrived (or TIMEOUT seconds passed); time from first to last byte.
 *
 * Every mode prints one JSON object on its last line of stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXEV 1024
#define RBUF (256 * 1024)
#define WMSGS 1024

static struct sockaddr_in addr;
static char rbuf[RBUF];
static char *wbuf;  /* WMSGS messages of `size` bytes, back to back */
static long size = 64;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static int connect_one(int blocking) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (!blocking) fcntl(fd, F_SETFL, O_NONBLOCK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        /* retry a few times: a full accept queue drops SYNs */
        for (int i = 0; i < 50; i++) {
            close(fd);
            usleep(20000);
            fd = socket(AF_INET, SOCK_STREAM, 0);
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (!blocking) fcntl(fd, F_SETFL, O_NONBLOCK);
            if (connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0 || errno == EINPROGRESS)
                return fd;
        }
        die("connect");
    }
    return fd;
}

static int *open_many(int n) {
    int *fds = malloc(sizeof(int) * n);
    for (int i = 0; i < n; i++) {
        fds[i] = connect_one(1);
        fcntl(fds[i], F_SETFL, O_NONBLOCK);
    }
    return fds;
}

/* ---------------------------------------------------------------- echo */

typedef struct {
    long owed;   /* bytes still to write */
    long phase;  /* bytes written so far modulo size */
    int wantout;
} conn_t;

static int write_owed(int ep, int fd, conn_t *c) {
    while (c->owed > 0) {
        long span = size * WMSGS - c->phase;
        long n = c->owed < span ? c->owed : span;
        ssize_t w = write(fd, wbuf + c->phase, n);
        if (w < 0) {
            if (errno == EAGAIN) break;
            return -1;
        }
        c->owed -= w;
        c->phase = (c->phase + w) % size;
    }
    int want = c->owed > 0;
    if (want != c->wantout) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
        c->wantout = want;
    }
    return 0;
}

static long count_lines(const char *p, long n) {
    long k = 0;
    const char *end = p + n;
    while ((p = memchr(p, '\n', end - p)) != NULL) {
        k++;
        p++;
    }
    return k;
}

static int mode_echo(int conns, int inflight, double warmup, double seconds) {
    int *fds = open_many(conns);
    int maxfd = 0;
    for (int i = 0; i < conns; i++) maxfd = fds[i] > maxfd ? fds[i] : maxfd;
    conn_t *cs = calloc(maxfd + 1, sizeof(conn_t));
    int ep = epoll_create1(0);
    for (int i = 0; i < conns; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
        cs[fds[i]].owed = (long)inflight * size;
        write_owed(ep, fds[i], &cs[fds[i]]);
    }
    struct epoll_event evs[MAXEV];
    double t0 = now(), tstart = t0 + warmup, tend = tstart + seconds;
    long counted = 0, errors = 0;
    int measuring = 0;
    for (;;) {
        double t = now();
        if (!measuring && t >= tstart) {
            measuring = 1;
            counted = 0;
        }
        if (t >= tend) break;
        int n = epoll_wait(ep, evs, MAXEV, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            conn_t *c = &cs[fd];
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                ssize_t r = read(fd, rbuf, RBUF);
                if (r <= 0) {
                    if (r < 0 && errno == EAGAIN) continue;
                    errors++;
                    epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                    close(fd);
                    continue;
                }
                long k = count_lines(rbuf, r);
                if (measuring) counted += k;
                c->owed += k * size;
            }
            if (write_owed(ep, fd, c) < 0) {
                errors++;
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
            }
        }
    }
    double el = now() - tstart;
    printf("{\"mode\": \"echo\", \"connections\": %d, \"inflight\": %d, \"size\": %ld, "
           "\"messages\": %ld, \"seconds\": %.3f, \"rate\": %.1f, \"errors\": %ld}\n",
           conns, inflight, size, counted, el, counted / el, errors);
    for (int i = 0; i < conns; i++) close(fds[i]);
    return errors ? 1 : 0;
}

/* ---------------------------------------------------------------- hold */

static void wait_stdin_eof(void) {
    char b[256];
    while (read(0, b, sizeof b) > 0) {
    }
}

static int mode_hold(int conns) {
    double t0 = now();
    int *fds = open_many(conns);
    double el = now() - t0;
    printf("ready %d\n", conns);
    fflush(stdout);
    wait_stdin_eof();
    /* count the connections the server closed while we held them */
    long closed = 0;
    for (int i = 0; i < conns; i++) {
        char b[64];
        ssize_t r = recv(fds[i], b, sizeof b, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN)) closed++;
        close(fds[i]);
    }
    printf("{\"mode\": \"hold\", \"connections\": %d, \"connect_seconds\": %.3f, "
           "\"closed_by_server\": %ld}\n", conns, el, closed);
    return 0;
}

/* ---------------------------------------------------------------- churn */

static int mode_churn(int conc, double seconds) {
    int ep = epoll_create1(0);
    char line[2] = {'x', '\n'};
    long done = 0, errors = 0;
    struct epoll_event evs[MAXEV];
    for (int i = 0; i < conc; i++) {
        int fd = connect_one(0);
        struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    double t0 = now(), tend = t0 + seconds;
    while (now() < tend) {
        int n = epoll_wait(ep, evs, MAXEV, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (evs[i].events & EPOLLOUT) {
                /* connected: send the line, wait for the echo */
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err || write(fd, line, 2) != 2) {
                    errors++;
                    goto replace;
                }
                struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
                continue;
            }
            {
                ssize_t r = read(fd, rbuf, RBUF);
                if (r < 0 && errno == EAGAIN) continue;
                if (r > 0) done++;
                else errors++;
            }
        replace:
            epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
            close(fd);
            fd = connect_one(0);
            struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fd};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        }
    }
    double el = now() - t0;
    printf("{\"mode\": \"churn\", \"concurrency\": %d, \"connections\": %ld, \"seconds\": %.3f, "
           "\"rate\": %.1f, \"errors\": %ld}\n", conc, done, el, done / el, errors);
    return 0;
}

/* ---------------------------------------------------------------- sink */

static int mode_sink(int conns, long expected, double timeout) {
    int *fds = open_many(conns);
    int ep = epoll_create1(0);
    for (int i = 0; i < conns; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    printf("ready %d\n", conns);
    fflush(stdout);
    struct epoll_event evs[MAXEV];
    long got = 0, errors = 0;
    double first = 0, last = 0, tend = now() + timeout;
    while (got < expected && now() < tend) {
        int n = epoll_wait(ep, evs, MAXEV, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            ssize_t r = read(fd, rbuf, RBUF);
            if (r < 0 && errno == EAGAIN) continue;
            if (r <= 0) {
                errors++;
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                continue;
            }
            if (first == 0) first = now();
            got += count_lines(rbuf, r);
            last = now();
        }
    }
    double el = last > first ? last - first : 0;
    printf("{\"mode\": \"sink\", \"connections\": %d, \"messages\": %ld, \"expected\": %ld, "
           "\"seconds\": %.4f, \"rate\": %.1f, \"errors\": %ld}\n",
           conns, got, expected, el, el > 0 ? got / el : 0.0, errors);
    for (int i = 0; i < conns; i++) close(fds[i]);
    return got == expected ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: loadgen echo|hold|churn|sink HOST PORT ...\n");
        return 2;
    }
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &addr.sin_addr) != 1) {
        fprintf(stderr, "loadgen: bad IPv4 address %s\n", argv[2]);
        return 2;
    }
    const char *mode = argv[1];
    if (!strcmp(mode, "echo") && argc == 9) {
        size = atol(argv[6]);
        if (size < 1) size = 1;
        wbuf = malloc(size * WMSGS);
        for (long i = 0; i < size * WMSGS; i++) wbuf[i] = (i % size == size - 1) ? '\n' : 'x';
        return mode_echo(atoi(argv[4]), atoi(argv[5]), atof(argv[7]), atof(argv[8]));
    }
    if (!strcmp(mode, "hold") && argc == 5) return mode_hold(atoi(argv[4]));
    if (!strcmp(mode, "churn") && argc == 6) return mode_churn(atoi(argv[4]), atof(argv[5]));
    if (!strcmp(mode, "sink") && argc == 7)
        return mode_sink(atoi(argv[4]), atol(argv[5]), atof(argv[6]));
    fprintf(stderr, "loadgen: bad arguments for mode %s\n", mode);
    return 2;
}
