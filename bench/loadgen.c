/*
 * loadgen: a small single-threaded, epoll-based ISO 8583 load generator (len2 framing).
 *
 * Built at benchmark time by bench/run_spread.py (`cc -O2 -std=gnu11`, libc only) into
 * bench/build/. It only sends what a requests file holds, prepared by Python, and only ever to
 * 127.0.0.1. Every run is bounded by the number of requests in the file AND by time.
 *
 *   loadgen --port P --requests FILE --mode closed --depth D --time-limit S
 *       Closed loop: each link keeps D requests in flight until every request of the file is
 *       answered, or S seconds pass. Latency is measured from the moment a request is written.
 *   loadgen --port P --requests FILE --mode open --rate R --duration S [--grace G] [--tick-us T]
 *       Open loop: R requests/s in total, spread evenly across the links: the k-th request of
 *       link l (of L) is due at start + (k * L + l) / R. Requests due at or after start + S are
 *       not sent. Latency is measured from the scheduled time (not from when the request was
 *       written), so a stalled server shows as latency instead of lowering the offered load
 *       (no coordinated omission). After the last send, waits at most G seconds (default 5)
 *       for outstanding answers. A request is sent by the first wakeup at or after its due
 *       time (a timerfd armed for it, or responses arriving), never before. With --tick-us T,
 *       sending wakes at most once per T microseconds: fewer wakeups (a sleep and a wakeup
 *       cost ~20 us of CPU on a small VM, more than everything else a message costs here),
 *       requests up to T late, which their latency shows.
 *   loadgen --field-table
 *       Prints the field layout used to skip fields 2..39 of a response, one line per field
 *       ("number fixed|LLVAR|LLLVAR max"), so run_spread.py can check it against the spec.
 *
 * Requests file (integers little-endian):
 *   header    8 bytes  magic "LGREQ001"
 *             u32      L, the number of links (1..LINKS_MAX)
 *             u32      N, the number of records
 *   N records, links interleaved in any way:
 *             u16      link (0..L-1)
 *             u16      F, frame length in bytes (2 + message length)
 *             u32      STAN of the message (field 11, 0..999999)
 *             F bytes  the frame exactly as sent: 2-byte big-endian length, ISO 8583 message
 *   Each link sends its own records in file order, so the file decides which link carries a
 *   message and in what order (a reversal goes on the link of its original, at least D
 *   messages after it, which in closed loop guarantees the original was answered). The STANs of
 *   one link must be unique within any window of STAN_WINDOW consecutive records of that link.
 *
 * Responses may come back in any order: they are matched per link by STAN (field 11). A
 * response is parsed only as far as field 39 (hex-ASCII bitmap, the layout of
 * specs/iso8583_1987_ascii.toml); one that cannot be parsed is counted as "unparsed".
 *
 * Output: one JSON object on stdout (counts, response codes by response MTI, latency
 * percentiles in microseconds from all latencies sorted, wall time, throughput, and the
 * generator's own CPU time per message from getrusage). Exit status 0 when every request sent
 * was answered, 1 when not, 2 on a usage or setup error.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define LINKS_MAX 64
#define DEPTH_MAX 1024                  /* the daemon's in_flight_per_link_max */
#define STAN_VALUES 1000000             /* field 11: 6 digits */
#define STAN_WINDOW 100000              /* the file's uniqueness guarantee per link */
#define FRAME_BYTES_MAX 8192            /* the daemon's default max_frame_bytes */
#define IN_BUFFER_BYTES (256 * 1024)
#define OUT_BUFFER_BYTES_MAX (64u << 20) /* open loop: unsent backlog per link, then give up */
#define READS_PER_WAKEUP_MAX 16
#define EVENTS_MAX 128
#define CODES_MAX 128
#define SECONDS_MAX 3600.0
#define GRACE_SECONDS_MAX 60.0
#define RATE_MAX 1000000.0
#define TICK_US_MAX 10000.0
#define START_DELAY_NS 20000000LL       /* open loop: first send 20 ms after setup */
#define TIMER_TOKEN ((uint64_t)LINKS_MAX)

/* ---- field layout of ISO 8583:1987 ASCII, fields 2..39 (specs/iso8583_1987_ascii.toml) ---- */

enum { FIXED = 0, LLVAR = 2, LLLVAR = 3 };
typedef struct {
    uint8_t length_digits; /* FIXED, LLVAR or LLLVAR */
    uint16_t size;         /* fixed length, or maximum length of a variable one */
} FieldLayout;

static const FieldLayout FIELDS[40] = {
    [2] = {LLVAR, 19},  [3] = {FIXED, 6},    [4] = {FIXED, 12},  [5] = {FIXED, 12},
    [6] = {FIXED, 12},  [7] = {FIXED, 10},   [8] = {FIXED, 8},   [9] = {FIXED, 8},
    [10] = {FIXED, 8},  [11] = {FIXED, 6},   [12] = {FIXED, 6},  [13] = {FIXED, 4},
    [14] = {FIXED, 4},  [15] = {FIXED, 4},   [16] = {FIXED, 4},  [17] = {FIXED, 4},
    [18] = {FIXED, 4},  [19] = {FIXED, 3},   [20] = {FIXED, 3},  [21] = {FIXED, 3},
    [22] = {FIXED, 3},  [23] = {FIXED, 3},   [24] = {FIXED, 3},  [25] = {FIXED, 2},
    [26] = {FIXED, 2},  [27] = {FIXED, 1},   [28] = {FIXED, 9},  [29] = {FIXED, 9},
    [30] = {FIXED, 9},  [31] = {FIXED, 9},   [32] = {LLVAR, 11}, [33] = {LLVAR, 11},
    [34] = {LLVAR, 28}, [35] = {LLVAR, 37},  [36] = {LLLVAR, 104}, [37] = {FIXED, 12},
    [38] = {FIXED, 6},  [39] = {FIXED, 2},
};

static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* Digits [at, at+count) as a number, or -1 when any is not an ASCII digit. */
static long digits_value(const char *at, int count) {
    long value = 0;
    for (int i = 0; i < count; i++) {
        if (at[i] < '0' || at[i] > '9') return -1;
        value = value * 10 + (at[i] - '0');
    }
    return value;
}

/* Field 11 (STAN) and field 39 ("--" when absent) of a response; 0 on success, -1 when the
 * message cannot be read that far (truncated, bad bitmap or lengths, no field 11). */
static int parse_response(const char *message, size_t size, long *stan, char code[2]) {
    if (size < 4 + 16) return -1;
    uint64_t primary = 0;
    for (int i = 0; i < 16; i++) {
        int v = hex_value(message[4 + i]);
        if (v < 0) return -1;
        primary = (primary << 4) | (uint64_t)v;
    }
    size_t at = 4 + 16;
    if (primary >> 63) { /* bit 1: a secondary bitmap (fields 65..128, all after 39) follows */
        if (size < at + 16) return -1;
        for (int i = 0; i < 16; i++)
            if (hex_value(message[at + i]) < 0) return -1;
        at += 16;
    }
    *stan = -1;
    code[0] = '-';
    code[1] = '-';
    for (int field = 2; field <= 39; field++) {
        if (!((primary >> (64 - field)) & 1)) continue;
        const FieldLayout layout = FIELDS[field];
        size_t length = layout.size;
        if (layout.length_digits != FIXED) {
            if (size < at + layout.length_digits) return -1;
            long declared = digits_value(message + at, layout.length_digits);
            if (declared < 0 || declared > layout.size) return -1;
            at += layout.length_digits;
            length = (size_t)declared;
        }
        if (size < at + length) return -1;
        if (field == 11) {
            *stan = digits_value(message + at, 6);
            if (*stan < 0) return -1;
        } else if (field == 39) {
            code[0] = message[at];
            code[1] = message[at + 1];
        }
        at += length;
    }
    return *stan < 0 ? -1 : 0;
}

/* ---- requests, links, counters ----------------------------------------------------------- */

typedef struct {
    uint64_t offset; /* of the frame in the file */
    uint16_t frame_bytes;
    uint16_t link;
    uint32_t stan;
} Request;

typedef struct {
    int fd;
    int closed;
    int watching_output;
    uint32_t *order; /* indexes of this link's requests, in file order */
    uint32_t count;  /* requests of this link */
    uint32_t limit;  /* open loop: those due before the end of the duration */
    uint32_t next;   /* next to send */
    uint32_t in_flight;
    uint32_t *by_stan; /* STAN -> request index + 1 while in flight; 0 = none */
    char *out;
    size_t out_start, out_end, out_capacity;
    char *in;
    size_t in_used;
} Link;

typedef struct {
    char mti[4];
    char code[2];
    uint64_t count;
} CodeCount;

static const unsigned char *file_data;
static size_t file_size;
static Request *requests;
static uint32_t request_count;
static Link links[LINKS_MAX];
static uint32_t link_count;
static int64_t *started_ns; /* per request: written (closed loop) or scheduled (open loop) */
static uint64_t *latencies_ns;
static int epoll_fd = -1;

static uint64_t sent, answered, unmatched, unparsed, mti_mismatch, stan_collisions;
static uint64_t framing_errors, links_closed, backlog_overflows, late_sends;
static int64_t tick_ns; /* open loop: least time between two sending wakeups (0 = exact) */
static uint64_t wakeups; /* epoll_wait calls: each may sleep, the generator's main fixed cost */
static int64_t last_answer_ns, send_lag_max_ns;
static CodeCount codes[CODES_MAX];
static uint32_t code_kinds;
static uint64_t codes_other;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void fail(const char *what) {
    fprintf(stderr, "loadgen: %s\n", what);
    exit(2);
}

static void fail_errno(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint32_t read_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t read_u16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }

static void load_requests(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) fail_errno(path);
    struct stat st;
    if (fstat(fd, &st) != 0) fail_errno(path);
    file_size = (size_t)st.st_size;
    if (file_size < 16) fail("requests file: shorter than its header");
    file_data = mmap(NULL, file_size, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    if (file_data == MAP_FAILED) fail_errno("mmap");
    close(fd);
    if (memcmp(file_data, "LGREQ001", 8) != 0) fail("requests file: bad magic");
    link_count = read_u32(file_data + 8);
    request_count = read_u32(file_data + 12);
    if (link_count < 1 || link_count > LINKS_MAX) fail("requests file: links outside 1..64");
    if (request_count < 1 || request_count > INT32_MAX - 1) fail("requests file: bad count");
    requests = calloc(request_count, sizeof *requests);
    started_ns = calloc(request_count, sizeof *started_ns);
    latencies_ns = calloc(request_count, sizeof *latencies_ns);
    if (!requests || !started_ns || !latencies_ns) fail("out of memory");
    uint32_t per_link[LINKS_MAX] = {0};
    size_t at = 16;
    for (uint32_t i = 0; i < request_count; i++) {
        if (file_size < at + 8) fail("requests file: truncated record header");
        Request *r = &requests[i];
        r->link = read_u16(file_data + at);
        r->frame_bytes = read_u16(file_data + at + 2);
        r->stan = read_u32(file_data + at + 4);
        r->offset = at + 8;
        at += 8;
        if (r->link >= link_count) fail("requests file: link out of range");
        if (r->stan >= STAN_VALUES) fail("requests file: STAN beyond 6 digits");
        if (r->frame_bytes < 2 + 20 || r->frame_bytes > 2 + FRAME_BYTES_MAX)
            fail("requests file: frame length out of range");
        if (file_size < at + r->frame_bytes) fail("requests file: truncated frame");
        const unsigned char *frame = file_data + r->offset;
        if ((size_t)(frame[0] << 8 | frame[1]) + 2 != r->frame_bytes)
            fail("requests file: frame prefix disagrees with the record length");
        at += r->frame_bytes;
        per_link[r->link]++;
    }
    if (at != file_size) fail("requests file: trailing bytes");
    for (uint32_t l = 0; l < link_count; l++) {
        links[l].order = malloc(sizeof(uint32_t) * (per_link[l] ? per_link[l] : 1));
        links[l].by_stan = calloc(STAN_VALUES, sizeof(uint32_t));
        links[l].in = malloc(IN_BUFFER_BYTES);
        links[l].out_capacity = 64 * 1024;
        links[l].out = malloc(links[l].out_capacity);
        if (!links[l].order || !links[l].by_stan || !links[l].in || !links[l].out)
            fail("out of memory");
    }
    for (uint32_t i = 0; i < request_count; i++) {
        Link *k = &links[requests[i].link];
        k->order[k->count++] = i;
    }
    for (uint32_t l = 0; l < link_count; l++) links[l].limit = links[l].count;
}

static void connect_links(int port) {
    struct sockaddr_in address;
    memset(&address, 0, sizeof address);
    address.sin_family = AF_INET;
    address.sin_port = htons((uint16_t)port);
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK); /* only ever 127.0.0.1 */
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (epoll_fd < 0) fail_errno("epoll_create1");
    for (uint32_t l = 0; l < link_count; l++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) fail_errno("socket");
        if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0)
            fail_errno("connect 127.0.0.1");
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        links[l].fd = fd;
        struct epoll_event event = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = l};
        if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) != 0) fail_errno("epoll_ctl");
    }
}

static void close_link(Link *k) {
    if (k->closed) return;
    k->closed = 1;
    links_closed++;
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, k->fd, NULL);
    close(k->fd);
}

static void watch_output(Link *k, int on) {
    if (k->closed || k->watching_output == on) return;
    k->watching_output = on;
    struct epoll_event event = {
        .events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0u),
        .data.u64 = (uint64_t)(k - links),
    };
    epoll_ctl(epoll_fd, EPOLL_CTL_MOD, k->fd, &event);
}

static void flush(Link *k) {
    while (!k->closed && k->out_start < k->out_end) {
        ssize_t n = send(k->fd, k->out + k->out_start, k->out_end - k->out_start, MSG_NOSIGNAL);
        if (n > 0) {
            k->out_start += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            watch_output(k, 1);
            return;
        } else {
            close_link(k);
            return;
        }
    }
    k->out_start = k->out_end = 0;
    watch_output(k, 0);
}

/* Put the link's next request in its output buffer; `started` is when its latency starts.
 * Returns 0 when the backlog is full (open loop against a server that stopped reading). */
static int queue_next(Link *k, int64_t started) {
    uint32_t index = k->order[k->next];
    const Request *r = &requests[index];
    if (k->out_end + r->frame_bytes > k->out_capacity) {
        if (k->out_start > 0) {
            memmove(k->out, k->out + k->out_start, k->out_end - k->out_start);
            k->out_end -= k->out_start;
            k->out_start = 0;
        }
        while (k->out_end + r->frame_bytes > k->out_capacity) {
            if (k->out_capacity * 2 > OUT_BUFFER_BYTES_MAX) {
                backlog_overflows++;
                return 0;
            }
            k->out_capacity *= 2;
            k->out = realloc(k->out, k->out_capacity);
            if (!k->out) fail("out of memory");
        }
    }
    memcpy(k->out + k->out_end, file_data + r->offset, r->frame_bytes);
    k->out_end += r->frame_bytes;
    if (k->by_stan[r->stan]) stan_collisions++; /* the file broke its uniqueness promise */
    k->by_stan[r->stan] = index + 1;
    started_ns[index] = started;
    k->next++;
    k->in_flight++;
    sent++;
    return 1;
}

static void count_code(const char *mti, const char code[2]) {
    for (uint32_t i = 0; i < code_kinds; i++) {
        if (codes[i].code[0] == code[0] && codes[i].code[1] == code[1] &&
            memcmp(codes[i].mti, mti, 4) == 0) {
            codes[i].count++;
            return;
        }
    }
    if (code_kinds == CODES_MAX) {
        codes_other++;
        return;
    }
    memcpy(codes[code_kinds].mti, mti, 4);
    codes[code_kinds].code[0] = code[0];
    codes[code_kinds].code[1] = code[1];
    codes[code_kinds].count = 1;
    code_kinds++;
}

static void on_response(Link *k, const char *message, size_t size, int64_t now) {
    long stan;
    char code[2];
    if (parse_response(message, size, &stan, code) != 0) {
        unparsed++;
        return;
    }
    uint32_t slot = k->by_stan[stan];
    if (!slot) {
        unmatched++;
        return;
    }
    uint32_t index = slot - 1;
    k->by_stan[stan] = 0;
    k->in_flight--;
    const unsigned char *request_mti = file_data + requests[index].offset + 2;
    if (message[0] != request_mti[0] || message[1] != request_mti[1] ||
        message[2] != request_mti[2] + 1)
        mti_mismatch++;
    int64_t latency = now - started_ns[index];
    latencies_ns[answered++] = latency > 0 ? (uint64_t)latency : 0;
    last_answer_ns = now;
    const char *mti = message;
    for (int i = 0; i < 4; i++)
        if (message[i] < '0' || message[i] > '9') mti = "????";
    count_code(mti, code);
}

static void on_readable(Link *k) {
    for (int round = 0; round < READS_PER_WAKEUP_MAX && !k->closed; round++) {
        size_t room = IN_BUFFER_BYTES - k->in_used;
        ssize_t n = read(k->fd, k->in + k->in_used, room);
        if (n == 0) {
            close_link(k);
            return;
        }
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) close_link(k);
            return;
        }
        int64_t now = now_ns();
        k->in_used += (size_t)n;
        size_t at = 0;
        while (k->in_used - at >= 2) {
            size_t length = (size_t)((unsigned char)k->in[at] << 8 | (unsigned char)k->in[at + 1]);
            if (length > FRAME_BYTES_MAX) {
                framing_errors++;
                close_link(k);
                return;
            }
            if (k->in_used - at < 2 + length) break;
            if (length) on_response(k, k->in + at + 2, length, now); /* 0 = keep-alive */
            at += 2 + length;
        }
        if (at) {
            memmove(k->in, k->in + at, k->in_used - at);
            k->in_used -= at;
        }
        if ((size_t)n < room) return; /* drained: level-triggered epoll says when there is more */
    }
}

static void on_event(const struct epoll_event *event) {
    if (event->data.u64 == TIMER_TOKEN) return; /* re-armed (and so reset) by the main loop */
    Link *k = &links[event->data.u64];
    if (event->events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) on_readable(k);
    if (!k->closed && (event->events & EPOLLOUT)) flush(k);
    if (!k->closed && (event->events & (EPOLLHUP | EPOLLERR))) close_link(k);
}

static int all_links_closed(void) {
    for (uint32_t l = 0; l < link_count; l++)
        if (!links[l].closed) return 0;
    return 1;
}

/* ---- the two loops ------------------------------------------------------------------------ */

static void fill_closed(Link *k, uint32_t depth) {
    if (k->closed) return;
    int64_t now = -1;
    while (k->in_flight < depth && k->next < k->count) {
        if (now < 0) now = now_ns();
        queue_next(k, now);
    }
    if (now >= 0) flush(k);
}

static int64_t run_closed(uint32_t depth, double time_limit_seconds, int *timed_out) {
    int64_t start = now_ns();
    int64_t deadline = start + (int64_t)(time_limit_seconds * 1e9);
    struct epoll_event events[EVENTS_MAX];
    for (uint32_t l = 0; l < link_count; l++) fill_closed(&links[l], depth);
    while (answered < request_count && !all_links_closed()) {
        int64_t now = now_ns();
        if (now >= deadline) {
            *timed_out = 1;
            break;
        }
        int64_t wait_ms = (deadline - now) / 1000000 + 1;
        int n = epoll_wait(epoll_fd, events, EVENTS_MAX, wait_ms > 100 ? 100 : (int)wait_ms);
        wakeups++;
        if (n < 0 && errno != EINTR) fail_errno("epoll_wait");
        for (int i = 0; i < n; i++) {
            on_event(&events[i]);
            Link *k = &links[events[i].data.u64];
            fill_closed(k, depth);
        }
    }
    return start;
}

static int64_t scheduled_ns(int64_t start, uint32_t link, uint32_t k, double period_ns) {
    return start + (int64_t)(((double)k * link_count + link) * period_ns);
}

static int64_t run_open(double rate, double duration_seconds, double grace_seconds,
                        int *timed_out) {
    double period_ns = 1e9 / rate;
    int timer = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (timer < 0) fail_errno("timerfd_create");
    struct epoll_event timer_event = {.events = EPOLLIN, .data.u64 = TIMER_TOKEN};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, timer, &timer_event) != 0) fail_errno("epoll_ctl");
    int64_t start = now_ns() + START_DELAY_NS;
    int64_t end_of_sending = start + (int64_t)(duration_seconds * 1e9);
    for (uint32_t l = 0; l < link_count; l++) { /* only what is due before the end */
        Link *k = &links[l];
        while (k->limit > 0 && scheduled_ns(start, l, k->limit - 1, period_ns) >= end_of_sending)
            k->limit--;
    }
    int64_t armed = -1, last_sending = INT64_MIN / 2;
    int64_t hard_deadline = end_of_sending + (int64_t)(grace_seconds * 1e9);
    struct epoll_event events[EVENTS_MAX];
    for (;;) {
        int64_t now = now_ns();
        int64_t next_due = INT64_MAX;
        for (uint32_t l = 0; l < link_count; l++) {
            Link *k = &links[l];
            if (k->closed) continue;
            int queued = 0;
            while (k->next < k->limit) {
                int64_t due = scheduled_ns(start, l, k->next, period_ns);
                if (due > now) {
                    if (due < next_due) next_due = due;
                    break;
                }
                if (!queue_next(k, due)) {
                    k->limit = k->next; /* backlog full: the rest of this link is not sent */
                    break;
                }
                queued = 1;
                if (now - due > send_lag_max_ns) send_lag_max_ns = now - due;
                if (now - due > 1000000) late_sends++;
            }
            if (queued) {
                flush(k);
                last_sending = now;
            }
        }
        if (next_due == INT64_MAX) { /* everything sent: wait for the answers, bounded */
            if (answered >= sent || all_links_closed()) break;
            if (now >= hard_deadline) {
                *timed_out = 1;
                break;
            }
        } else if (now >= hard_deadline) {
            *timed_out = 1;
            break;
        }
        int timeout_ms = 100;
        /* With --tick-us, sending wakes at most once per tick: fewer wakeups, and requests
         * sent up to a tick late, which their latency (from the schedule) then shows. */
        int64_t wake_at = next_due;
        if (next_due != INT64_MAX && wake_at < last_sending + tick_ns)
            wake_at = last_sending + tick_ns;
        if (next_due != INT64_MAX && wake_at != armed) {
            struct itimerspec when = {
                .it_value = {.tv_sec = wake_at / 1000000000LL, .tv_nsec = wake_at % 1000000000LL},
            };
            if (timerfd_settime(timer, TFD_TIMER_ABSTIME, &when, NULL) != 0)
                fail_errno("timerfd_settime");
            armed = wake_at;
        } else if (next_due == INT64_MAX) {
            if (armed != -1) { /* disarm: a fired timer stays readable and would spin the loop */
                struct itimerspec never = {0};
                timerfd_settime(timer, 0, &never, NULL);
                armed = -1;
            }
            int64_t left_ms = (hard_deadline - now) / 1000000 + 1;
            timeout_ms = left_ms < 100 ? (int)left_ms : 100;
        }
        int n = epoll_wait(epoll_fd, events, EVENTS_MAX, timeout_ms);
        wakeups++;
        if (n < 0 && errno != EINTR) fail_errno("epoll_wait");
        for (int i = 0; i < n; i++) on_event(&events[i]);
    }
    close(timer);
    return start;
}

/* ---- report -------------------------------------------------------------------------------- */

static int compare_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static double percentile_us(double q) { /* nearest rank over all answered requests */
    if (!answered) return 0.0;
    double exact = q / 100.0 * (double)answered;
    uint64_t rank = (uint64_t)exact;
    if ((double)rank < exact) rank++;
    if (rank < 1) rank = 1;
    if (rank > answered) rank = answered;
    return (double)latencies_ns[rank - 1] / 1000.0;
}

static double cpu_seconds(const struct rusage *u) {
    return (double)u->ru_utime.tv_sec + u->ru_utime.tv_usec / 1e6 + (double)u->ru_stime.tv_sec +
           u->ru_stime.tv_usec / 1e6;
}

static void usage(void) {
    fail("usage: loadgen --port P --requests FILE --mode closed --depth D --time-limit S\n"
         "       loadgen --port P --requests FILE --mode open --rate R --duration S [--grace G]"
         " [--tick-us T]\n"
         "       loadgen --field-table");
}

static double number_argument(const char *text, double low, double high, const char *name) {
    char *end;
    errno = 0;
    double value = strtod(text, &end);
    if (errno || *end || !(value >= low && value <= high)) {
        fprintf(stderr, "loadgen: %s %s: outside %g..%g\n", name, text, low, high);
        exit(2);
    }
    return value;
}

int main(int argc, char **argv) {
    const char *path = NULL, *mode = NULL;
    int port = 0;
    uint32_t depth = 0;
    double rate = 0, duration = 0, time_limit = 0, grace = 5.0;
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        if (strcmp(flag, "--field-table") == 0) {
            for (int field = 2; field <= 39; field++) {
                const char *kind = FIELDS[field].length_digits == FIXED   ? "fixed"
                                   : FIELDS[field].length_digits == LLVAR ? "LLVAR"
                                                                          : "LLLVAR";
                printf("%d %s %d\n", field, kind, FIELDS[field].size);
            }
            return 0;
        }
        if (i + 1 >= argc) usage();
        const char *value = argv[++i];
        if (strcmp(flag, "--port") == 0) port = (int)number_argument(value, 1, 65535, flag);
        else if (strcmp(flag, "--requests") == 0) path = value;
        else if (strcmp(flag, "--mode") == 0) mode = value;
        else if (strcmp(flag, "--depth") == 0)
            depth = (uint32_t)number_argument(value, 1, DEPTH_MAX, flag);
        else if (strcmp(flag, "--rate") == 0) rate = number_argument(value, 0.001, RATE_MAX, flag);
        else if (strcmp(flag, "--duration") == 0)
            duration = number_argument(value, 0.001, SECONDS_MAX, flag);
        else if (strcmp(flag, "--time-limit") == 0)
            time_limit = number_argument(value, 0.001, SECONDS_MAX, flag);
        else if (strcmp(flag, "--tick-us") == 0)
            tick_ns = (int64_t)(number_argument(value, 0, TICK_US_MAX, flag) * 1000);
        else if (strcmp(flag, "--grace") == 0)
            grace = number_argument(value, 0, GRACE_SECONDS_MAX, flag);
        else usage();
    }
    int closed_loop = mode && strcmp(mode, "closed") == 0;
    int open_loop = mode && strcmp(mode, "open") == 0;
    if (!port || !path || !(closed_loop || open_loop)) usage();
    if (closed_loop && (!depth || !time_limit)) usage();
    if (open_loop && (!rate || !duration)) usage();
    signal(SIGPIPE, SIG_IGN);

    load_requests(path);
    if (closed_loop && depth > STAN_WINDOW) fail("--depth exceeds the STAN window");
    connect_links(port);

    struct rusage before, after;
    getrusage(RUSAGE_SELF, &before);
    int timed_out = 0;
    int64_t start = closed_loop ? run_closed(depth, time_limit, &timed_out)
                                : run_open(rate, duration, grace, &timed_out);
    int64_t finished = now_ns();
    getrusage(RUSAGE_SELF, &after);

    double cpu = cpu_seconds(&after) - cpu_seconds(&before);
    double user = (after.ru_utime.tv_sec - before.ru_utime.tv_sec) +
                  (after.ru_utime.tv_usec - before.ru_utime.tv_usec) / 1e6;
    int64_t busy_until = answered ? last_answer_ns : finished;
    double wall = (double)(busy_until - start) / 1e9;
    if (wall <= 0) wall = 1e-9;
    uint64_t total_latency_ns = 0;
    for (uint64_t i = 0; i < answered; i++) total_latency_ns += latencies_ns[i];
    qsort(latencies_ns, answered, sizeof *latencies_ns, compare_u64);

    printf("{\"mode\": \"%s\", \"links\": %u, ", closed_loop ? "closed" : "open", link_count);
    if (closed_loop) printf("\"depth\": %u, \"time_limit_s\": %g, ", depth, time_limit);
    else printf("\"rate\": %g, \"duration_s\": %g, \"grace_s\": %g, ", rate, duration, grace);
    printf("\"requests_in_file\": %u, \"sent\": %llu, \"answered\": %llu, \"unanswered\": %llu, ",
           request_count, (unsigned long long)sent, (unsigned long long)answered,
           (unsigned long long)(sent - answered));
    printf("\"unmatched\": %llu, \"unparsed\": %llu, \"mti_mismatch\": %llu, "
           "\"stan_collisions\": %llu, \"framing_errors\": %llu, \"links_closed\": %llu, "
           "\"backlog_overflows\": %llu, \"timed_out\": %s, ",
           (unsigned long long)unmatched, (unsigned long long)unparsed,
           (unsigned long long)mti_mismatch, (unsigned long long)stan_collisions,
           (unsigned long long)framing_errors, (unsigned long long)links_closed,
           (unsigned long long)backlog_overflows, timed_out ? "true" : "false");
    printf("\"codes\": {");
    /* by code over all MTIs, then by response MTI */
    int first = 1;
    for (uint32_t i = 0; i < code_kinds; i++) {
        int seen = 0;
        for (uint32_t j = 0; j < i; j++)
            if (codes[j].code[0] == codes[i].code[0] && codes[j].code[1] == codes[i].code[1])
                seen = 1;
        if (seen) continue;
        uint64_t total = 0;
        for (uint32_t j = i; j < code_kinds; j++)
            if (codes[j].code[0] == codes[i].code[0] && codes[j].code[1] == codes[i].code[1])
                total += codes[j].count;
        char c0 = codes[i].code[0], c1 = codes[i].code[1];
        if (c0 == '"' || c0 == '\\' || c0 < ' ' || c0 > '~') c0 = '?';
        if (c1 == '"' || c1 == '\\' || c1 < ' ' || c1 > '~') c1 = '?';
        printf("%s\"%c%c\": %llu", first ? "" : ", ", c0, c1, (unsigned long long)total);
        first = 0;
    }
    printf("}, \"codes_by_mti\": {");
    for (uint32_t i = 0; i < code_kinds; i++) {
        char c0 = codes[i].code[0], c1 = codes[i].code[1];
        if (c0 == '"' || c0 == '\\' || c0 < ' ' || c0 > '~') c0 = '?';
        if (c1 == '"' || c1 == '\\' || c1 < ' ' || c1 > '~') c1 = '?';
        printf("%s\"%.4s:%c%c\": %llu", i ? ", " : "", codes[i].mti, c0, c1,
               (unsigned long long)codes[i].count);
    }
    printf("}, \"codes_other\": %llu, ", (unsigned long long)codes_other);
    printf("\"wall_s\": %.6f, \"throughput_per_s\": %.1f, ", wall, (double)answered / wall);
    printf("\"latency_us\": {\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, \"p99.9\": %.1f, "
           "\"max\": %.1f, \"min\": %.1f, \"mean\": %.1f}, ",
           percentile_us(50), percentile_us(90), percentile_us(99), percentile_us(99.9),
           answered ? latencies_ns[answered - 1] / 1000.0 : 0.0,
           answered ? latencies_ns[0] / 1000.0 : 0.0,
           answered ? (double)total_latency_ns / (double)answered / 1000.0 : 0.0);
    if (open_loop)
        printf("\"tick_us\": %g, \"send_lag_max_us\": %.1f, \"late_sends_over_1ms\": %llu, ",
               tick_ns / 1000.0, send_lag_max_ns / 1000.0, (unsigned long long)late_sends);
    printf("\"wakeups\": %llu, \"cpu_us_per_wakeup\": %.3f, ", (unsigned long long)wakeups,
           wakeups ? cpu * 1e6 / (double)wakeups : 0.0);
    printf("\"cpu_user_s\": %.6f, \"cpu_system_s\": %.6f, \"cpu_us_per_message\": %.3f}\n", user,
           cpu - user, sent ? cpu * 1e6 / (double)sent : 0.0);
    return answered == sent && sent > 0 ? 0 : 1;
}
