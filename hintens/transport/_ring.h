/* The shared-memory ring of hintens (docs/PROTOCOL.md section 9b): two single-producer,
 * single-consumer byte rings in one sealed memfd, one per direction, that carry a connection's
 * stream of frames instead of the socket once both sides have switched to it. The socket stays
 * open beside it: it carries the descriptors of shared-memory segments (one "carrier" message
 * per descriptor) and tells each side when the other is gone.
 *
 * Plain C, no Python: the Channel (_ring.pxi) calls it, with or without the GIL. Every index
 * the peer writes is validated before use; our own indices are kept here and only published.
 *
 * Layout (little-endian; direction 0 runs from the side that created the ring, the server, to
 * the other; direction 1 back). Control block of direction d at 64 + 256 * d:
 *     +0    tail      u64  bytes the producer has published, ever
 *     +8    carriers  u64  descriptor carriers the producer has sent on the socket, ever
 *     +16   closed    u32  1: the producer wrote its last byte
 *     +64   head      u64  bytes the consumer has taken, ever
 *     +128  consumer_sleeps  u32: how the consumer wants to be woken once it has data
 *     +132  producer_sleeps  u32: how the producer wants to be woken once it has room
 * Each sleeps word is a set of bits a waiter ORs in: 1 (HX_WAKE_FUTEX), wake it with
 * FUTEX_WAKE on the word; 2 (HX_WAKE_SOCKET), send it a wake record on the socket (a waiter
 * that cannot sleep on a futex: an event loop watching the socket). A waiter never clears
 * its word: only the other side does, with the exchange that decides its wake-up. So one
 * waiter's timeout cannot erase another's announcement (several may wait on one direction: a
 * reader, an event pump, an event loop); a stale bit costs one needless wake-up.
 * Offset 0 holds the magic "HRNG", the layout version (u32, 2) and the capacity (u64).
 * The data of direction d: `capacity` bytes at 4096 + d * capacity.
 *
 * At the end, the same adaptive spin for a plain socket (hx_spin_recvmsg; hx_spin_poll over
 * TLS): a client that waits for a reply without a ring. It shares the ring's limit on
 * spinning threads.
 */
#ifndef HX_RING_H
#define HX_RING_H

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define HX_RING_HEADER_BYTES 4096u
#define HX_RING_MIN_CAPACITY 4096u
#define HX_RING_MAX_CAPACITY (64u * 1024u * 1024u)
#define HX_RING_VERSION 2u
/* The bits of a sleeps word. */
#define HX_WAKE_FUTEX 1u
#define HX_WAKE_SOCKET 2u
/* A wake record on the socket: 8 bytes, all 0xFF, without a descriptor. */
#define HX_RING_RECORD_BYTES 8
/* How often a sleeper looks at the socket for its peer's end (a SIGKILL'ed peer never wakes
 * it): the bound on noticing that the peer is gone. */
#define HX_RING_LIVENESS_NS 50000000LL
/* A reader idle for this many liveness slices in a row waits on the socket instead of the
 * futex (it announces HX_WAKE_SOCKET, and the peer's next bytes send a wake record): an idle
 * connection then costs no wake-up every slice, and the peer's end wakes it at once. It
 * still looks at the ring this often (our own shut reaches it through the socket too). */
#define HX_RING_IDLE_SLICES 4
#define HX_RING_IDLE_POLL_NS 1000000000LL
/* The longest a waiter spins before it sleeps, when spinning has been paying. */
#define HX_RING_SPIN_MAX_NS 300000LL
/* A waiter whose budget ran out spins the full budget again on every HX_RING_PROBE_MIN-th
 * wait; each probe that does not pay doubles that interval, up to HX_RING_PROBE_MAX. Without
 * probes a budget could stay at nothing for good: a wait that ends in a futex wake-up
 * counts the wake-up's own latency (over 100 us on some VMs), so it never looks as if
 * spinning would have paid, even when the peer answers in microseconds. */
#define HX_RING_PROBE_MIN 8u
#define HX_RING_PROBE_MAX 1024u

#define HX__TAIL 0
#define HX__CARRIERS 8
#define HX__CLOSED 16
#define HX__HEAD 64
#define HX__CSLEEP 128
#define HX__PSLEEP 132

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define hx_cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define hx_cpu_relax() __asm__ __volatile__("yield")
#else
#define hx_cpu_relax() ((void)0)
#endif

typedef struct {
    unsigned char *base;          /* the mapping (owned by the caller) */
    uint64_t capacity;            /* bytes per direction, a power of two */
    int sock;                     /* the connection's socket: liveness and carriers */
    /* Our producing direction. */
    unsigned char *tx_block, *tx_data;
    uint64_t tx_tail;             /* ours: published as tx_block+TAIL */
    uint64_t tx_head_seen;        /* the consumer's head, last validated */
    /* Our consuming direction. */
    unsigned char *rx_block, *rx_data;
    uint64_t rx_head;             /* ours: published as rx_block+HEAD */
    uint64_t rx_tail_seen;        /* the producer's tail, last validated */
    int shut;                     /* closed here: waiters leave at once */
    int rx_stopped;               /* stop_reading: what is published is the last we read */
    long long rx_spin_ns, tx_spin_ns;   /* adaptive spin budgets */
    /* With no budget left, every rx_probe_every-th wait spins the full budget once, to see
     * whether spinning pays again (rx_unspun counts the waits since the last such probe). */
    unsigned rx_probe_every, rx_unspun;
    /* 0: a spin here could never see the peer move (both pinned to one CPU): never spin. */
    int spin_ok;
    long long peer_seen_ns;       /* when we last took its bytes or saw it take ours */
    /* Counters for stats and tests. */
    uint64_t futex_waits, futex_wakes, spins_won, socket_wakes, socket_waits;
} hx_ring;

/* Threads of this process spinning on any ring right now, and how many may. */
static int hx_ring_spinners = 0;
static int hx_ring_max_spinners = 1;

#define HX_U64(block, off) ((uint64_t *)((block) + (off)))
#define HX_U32(block, off) ((uint32_t *)((block) + (off)))

static inline long long hx_ring_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline int hx_futex_wait(uint32_t *word, uint32_t expected, long long ns) {
    struct timespec ts;
    ts.tv_sec = (time_t)(ns / 1000000000LL);
    ts.tv_nsec = (long)(ns % 1000000000LL);
    /* Not FUTEX_PRIVATE_FLAG: the word lives in a mapping shared with another process. */
    return (int)syscall(SYS_futex, word, FUTEX_WAIT, expected, &ts, NULL, 0);
}

static inline void hx_futex_wake(uint32_t *word) {
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* A wake record for a peer that waits on the socket. Never waits: a socket that takes none
 * of it holds unread bytes already, which wake that peer as well. (8 bytes are one piece on
 * a Unix stream socket: taken whole or not at all.) */
static inline void hx_ring_send_wake(int sock) {
    static const unsigned char record[HX_RING_RECORD_BYTES] = {
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
    ssize_t sent;
    do
        sent = send(sock, record, sizeof(record), MSG_DONTWAIT | MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
}

/* The other side's half of a wake-up: after our store and a sequentially consistent fence,
 * take the peer's announcement on `sleeps` (exchange it to 0) and wake it each way it asked.
 * Cheap when nobody waits: one load. */
static inline void hx_ring_wake_word(hx_ring *r, uint32_t *sleeps) {
    if (__atomic_load_n(sleeps, __ATOMIC_RELAXED) == 0)
        return;
    uint32_t asked = __atomic_exchange_n(sleeps, 0, __ATOMIC_SEQ_CST);
    if (asked & HX_WAKE_FUTEX) {
        hx_futex_wake(sleeps);
        r->futex_wakes++;
    }
    if (asked & HX_WAKE_SOCKET) {
        hx_ring_send_wake(r->sock);
        r->socket_wakes++;
    }
}

/* Announce a waiter on `sleeps` (its bit `how`), then fence: the re-check of the index that
 * follows sees what the other side published before it could see our announcement. Returns
 * the word's value after it (what a futex wait expects). */
static inline uint32_t hx_ring_announce(uint32_t *sleeps, uint32_t how) {
    uint32_t now = __atomic_or_fetch(sleeps, how, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return now;
}

/* Lay out (creator: zero the header first) or attach to a mapping of
 * HX_RING_HEADER_BYTES + 2 * capacity bytes. `creator` produces on direction 0. */
static inline void hx_ring_attach(hx_ring *r, unsigned char *base, uint64_t capacity,
                                  int creator, int sock) {
    memset(r, 0, sizeof(*r));
    r->base = base;
    r->capacity = capacity;
    r->sock = sock;
    r->tx_block = base + 64 + (creator ? 0 : 256);
    r->rx_block = base + 64 + (creator ? 256 : 0);
    r->tx_data = base + HX_RING_HEADER_BYTES + (creator ? 0 : capacity);
    r->rx_data = base + HX_RING_HEADER_BYTES + (creator ? capacity : 0);
    r->rx_spin_ns = r->tx_spin_ns = HX_RING_SPIN_MAX_NS;
    r->rx_probe_every = HX_RING_PROBE_MIN;
    if (creator) {
        memcpy(base, "HRNG", 4);
        *HX_U32(base, 4) = HX_RING_VERSION;
        *HX_U64(base, 8) = capacity;
    }
}

/* Whether the peer on `sock` may run while we spin: we may use two CPUs or more, or the
 * peer (SO_PEERCRED) may use a CPU we may not. 0 when we may use one CPU only and the peer
 * that CPU only (the two take turns on it: a spin only keeps the peer from running);
 * `unknown` when either cannot be looked at (another PID namespace, a TCP peer). */
static inline int hx_peer_may_run_beside(int sock, int unknown) {
    cpu_set_t ours, theirs, elsewhere;
    struct ucred peer;
    socklen_t length = sizeof(peer);
    if (sched_getaffinity(0, sizeof(ours), &ours) != 0)
        return unknown;
    if (CPU_COUNT(&ours) >= 2)
        return 1;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &peer, &length) != 0 || peer.pid <= 0
            || sched_getaffinity(peer.pid, sizeof(theirs), &theirs) != 0)
        return unknown;
    CPU_XOR(&elsewhere, &theirs, &ours);
    CPU_AND(&elsewhere, &elsewhere, &theirs);
    return CPU_COUNT(&elsewhere) > 0;
}

/* The ring's: a peer it cannot look at is taken to share our CPU. Read once, when the ring
 * is mapped. */
static inline int hx_ring_peer_may_run_beside(int sock) {
    return hx_peer_may_run_beside(sock, 0);
}

/* -1: the peer's tail is out of range (more than a ring ahead of our head, or behind it). */
static inline int64_t hx_ring_readable(hx_ring *r) {
    uint64_t tail = __atomic_load_n(HX_U64(r->rx_block, HX__TAIL), __ATOMIC_ACQUIRE);
    uint64_t ahead = tail - r->rx_head;
    if (ahead > r->capacity || tail - r->rx_tail_seen > r->capacity)
        return -1;
    r->rx_tail_seen = tail;
    return (int64_t)ahead;
}

static inline int hx_ring_peer_closed(hx_ring *r) {
    return __atomic_load_n(HX_U32(r->rx_block, HX__CLOSED), __ATOMIC_ACQUIRE) == 1;
}

/* Nothing more will be read from the ring once it is empty: the peer closed, or we stopped. */
static inline int hx_ring_rx_ended(hx_ring *r) {
    return hx_ring_peer_closed(r) || __atomic_load_n(&r->rx_stopped, __ATOMIC_ACQUIRE);
}

/* Read what is published, then see the end (a server draining before it closes); our
 * waiting reader wakes. The peer is not told: its writes go on until the close. */
static inline void hx_ring_stop_reading(hx_ring *r) {
    __atomic_store_n(&r->rx_stopped, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(HX_U32(r->rx_block, HX__CSLEEP), 0, __ATOMIC_SEQ_CST);
    hx_futex_wake(HX_U32(r->rx_block, HX__CSLEEP));
}

static inline uint64_t hx_ring_carriers(hx_ring *r) {
    return __atomic_load_n(HX_U64(r->rx_block, HX__CARRIERS), __ATOMIC_ACQUIRE);
}

/* -1: the peer's head is out of range (it moved back, or past what we published). */
static inline int64_t hx_ring_writable(hx_ring *r) {
    uint64_t head = __atomic_load_n(HX_U64(r->tx_block, HX__HEAD), __ATOMIC_ACQUIRE);
    if (head - r->tx_head_seen > r->tx_tail - r->tx_head_seen)
        return -1;
    if (head != r->tx_head_seen) {
        r->tx_head_seen = head;
        r->peer_seen_ns = hx_ring_now_ns();
    }
    return (int64_t)(r->capacity - (r->tx_tail - head));
}

/* Copy up to `n` readable bytes out into iov (which may hold less); returns the count and
 * hands the room back to the producer. The caller checked hx_ring_readable() >= n. */
static inline size_t hx_ring_take(hx_ring *r, const struct iovec *iov, int iovcnt, size_t n) {
    size_t done = 0, mask = (size_t)r->capacity - 1;
    for (int i = 0; i < iovcnt && done < n; i++) {
        size_t want = iov[i].iov_len < n - done ? iov[i].iov_len : n - done;
        size_t at = (size_t)((r->rx_head + done) & mask);
        size_t first = want < r->capacity - at ? want : (size_t)r->capacity - at;
        memcpy(iov[i].iov_base, r->rx_data + at, first);
        if (want > first)
            memcpy((unsigned char *)iov[i].iov_base + first, r->rx_data, want - first);
        done += want;
    }
    r->rx_head += done;
    r->peer_seen_ns = hx_ring_now_ns();
    __atomic_store_n(HX_U64(r->rx_block, HX__HEAD), r->rx_head, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    hx_ring_wake_word(r, HX_U32(r->rx_block, HX__PSLEEP));
    return done;
}

static inline void hx_ring_wake_consumer(hx_ring *r) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    hx_ring_wake_word(r, HX_U32(r->tx_block, HX__CSLEEP));
}

/* Copy up to `room` bytes of iov (from byte `skip` on) into the ring and publish them;
 * returns the count. The caller checked hx_ring_writable() >= room. */
static inline size_t hx_ring_put(hx_ring *r, const struct iovec *iov, int iovcnt, size_t room) {
    size_t done = 0, mask = (size_t)r->capacity - 1;
    for (int i = 0; i < iovcnt && done < room; i++) {
        size_t want = iov[i].iov_len < room - done ? iov[i].iov_len : room - done;
        size_t at = (size_t)((r->tx_tail + done) & mask);
        size_t first = want < r->capacity - at ? want : (size_t)r->capacity - at;
        memcpy(r->tx_data + at, iov[i].iov_base, first);
        if (want > first)
            memcpy(r->tx_data, (const unsigned char *)iov[i].iov_base + first, want - first);
        done += want;
    }
    r->tx_tail += done;
    __atomic_store_n(HX_U64(r->tx_block, HX__TAIL), r->tx_tail, __ATOMIC_RELEASE);
    hx_ring_wake_consumer(r);
    return done;
}

/* A reader or writer that waits on the socket (an event loop's) instead of a futex: announce
 * it, then look again. Nonzero (as hx_ring_readable/hx_ring_writable): go on now; 0: the peer
 * sends a wake record on the socket once it publishes bytes (or takes some). */
static inline int64_t hx_ring_arm_rx_socket(hx_ring *r) {
    hx_ring_announce(HX_U32(r->rx_block, HX__CSLEEP), HX_WAKE_SOCKET);
    return hx_ring_readable(r);
}

static inline int64_t hx_ring_arm_tx_socket(hx_ring *r) {
    hx_ring_announce(HX_U32(r->tx_block, HX__PSLEEP), HX_WAKE_SOCKET);
    return hx_ring_writable(r);
}

/* A carrier went out on the socket: count it before the frame it serves is published. */
static inline void hx_ring_count_carrier(hx_ring *r) {
    __atomic_add_fetch(HX_U64(r->tx_block, HX__CARRIERS), 1, __ATOMIC_RELEASE);
}

/* We write no more: the consumer reads what is left, then sees the end. */
static inline void hx_ring_close_tx(hx_ring *r) {
    if (__atomic_exchange_n(HX_U32(r->tx_block, HX__CLOSED), 1, __ATOMIC_SEQ_CST) == 1)
        return;   /* once: the wake-up that follows may send a record on the socket */
    hx_ring_wake_consumer(r);
}

/* Closed here: our own waiters leave at once, and the peer's see the end. */
static inline void hx_ring_shut(hx_ring *r) {
    __atomic_store_n(&r->shut, 1, __ATOMIC_SEQ_CST);
    hx_ring_close_tx(r);
    /* Our waiters sleep on our consumer word and on our producer word. */
    __atomic_store_n(HX_U32(r->rx_block, HX__CSLEEP), 0, __ATOMIC_SEQ_CST);
    hx_futex_wake(HX_U32(r->rx_block, HX__CSLEEP));
    __atomic_store_n(HX_U32(r->tx_block, HX__PSLEEP), 0, __ATOMIC_SEQ_CST);
    hx_futex_wake(HX_U32(r->tx_block, HX__PSLEEP));
}

/* The socket says the peer is gone: hung up (closed, or shut both ways) or reset. Not
 * POLLRDHUP: our own shutdown(SHUT_RD) (stop_reading) raises it too. */
static inline int hx_ring_socket_ended(hx_ring *r) {
    struct pollfd p;
    p.fd = r->sock;
    p.events = POLLIN;
    p.revents = 0;
    if (poll(&p, 1, 0) <= 0)
        return 0;
    return (p.revents & (POLLHUP | POLLERR | POLLNVAL)) != 0;
}

/* Before a write: a peer whose indices have not moved for a millisecond may be dead (a
 * SIGKILL wakes nobody), and what we write would go to nobody while the caller takes it as
 * sent. One poll of the socket then tells; a busy pair never pays it. */
#define HX_RING_QUIET_NS 1000000LL
static inline int hx_ring_peer_ended_quietly(hx_ring *r) {
    long long now = hx_ring_now_ns();
    if (now - r->peer_seen_ns < HX_RING_QUIET_NS)
        return 0;
    if (hx_ring_socket_ended(r))
        return 1;
    r->peer_seen_ns = now;
    return 0;
}

/* The kernel timeout the caller keeps on a socket (SO_RCVTIMEO or SO_SNDTIMEO) as a
 * deadline from now; -1 for none. Looked up only when a wait is about to sleep: a wait that a
 * spin ends costs no system call. */
static inline long long hx_socket_deadline(int sock, int option) {
    struct timeval tv;
    socklen_t length = sizeof(tv);
    tv.tv_sec = 0;
    tv.tv_usec = 0;
    if (getsockopt(sock, SOL_SOCKET, option, &tv, &length) != 0
            || (tv.tv_sec == 0 && tv.tv_usec == 0))
        return -1;
    return hx_ring_now_ns() + (long long)tv.tv_sec * 1000000000LL + (long long)tv.tv_usec * 1000LL;
}

static inline long long hx_ring_socket_deadline(hx_ring *r, int option) {
    return hx_socket_deadline(r->sock, option);
}

/* One sleep of a waiter that announced itself on `sleeps`: until woken, the liveness slice,
 * or `deadline_ns` (< 0: none). Returns 0 when woken (or the word moved), ETIMEDOUT after a
 * slice (look at the socket), HX__DEADLINE past the deadline, EINTR for a signal. */
#define HX__DEADLINE -1
static inline int hx_ring_sleep(hx_ring *r, uint32_t *sleeps, uint32_t expected,
                                long long deadline_ns) {
    long long now = hx_ring_now_ns(), slice = HX_RING_LIVENESS_NS;
    if (deadline_ns >= 0) {
        if (now >= deadline_ns)
            return HX__DEADLINE;
        if (deadline_ns - now < slice)
            slice = deadline_ns - now;
    }
    r->futex_waits++;
    int rc = hx_futex_wait(sleeps, expected, slice), error = rc < 0 ? errno : 0;
    return error == ETIMEDOUT || error == EINTR ? error : 0;
}

/* One sleep of an idle reader on the socket (it announced HX_WAKE_SOCKET): until the socket
 * is readable (a record, or its end), HX_RING_IDLE_POLL_NS, or `deadline_ns`. Returns as
 * hx_ring_sleep: 0 when the socket woke it. */
static inline int hx_ring_poll_socket(hx_ring *r, long long deadline_ns) {
    long long now = hx_ring_now_ns(), slice = HX_RING_IDLE_POLL_NS;
    struct pollfd p;
    if (deadline_ns >= 0) {
        if (now >= deadline_ns)
            return HX__DEADLINE;
        if (deadline_ns - now < slice)
            slice = deadline_ns - now;
    }
    p.fd = r->sock;
    p.events = POLLIN;
    p.revents = 0;
    r->socket_waits++;
    int found = poll(&p, 1, (int)((slice + 999999) / 1000000));
    if (found < 0)
        return errno == EINTR ? EINTR : 0;
    return found == 0 ? ETIMEDOUT : 0;
}

enum { HX_WAIT_READY = 0, HX_WAIT_TIMEOUT = 1, HX_WAIT_ENDED = 2, HX_WAIT_SHUT = 3,
       HX_WAIT_CORRUPT = 4, HX_WAIT_SOCKET = 5 };

/* Bytes wait on the socket (and no hang-up): a carrier in flight, or bytes the peer must not
 * send after its HRNG. The caller tells which. */
static inline int hx_ring_socket_readable(hx_ring *r) {
    struct pollfd p;
    p.fd = r->sock;
    p.events = POLLIN;
    p.revents = 0;
    return poll(&p, 1, 0) > 0 && (p.revents & POLLIN)
        && !(p.revents & (POLLHUP | POLLERR | POLLNVAL));
}

/* Wait, without the GIL, until the ring has bytes to read (READY), the peer closed its side
 * or its socket ended (ENDED: read what is left, then it is the end), we closed (SHUT), the
 * peer's index is out of range (CORRUPT), or `deadline_ns` (CLOCK_MONOTONIC; < 0: none)
 * passed (TIMEOUT). Spins first, for a budget that grows while spinning pays and shrinks
 * while it does not, and only while fewer than hx_ring_max_spinners threads of this process
 * spin; then sleeps on the futex word, looking at the socket every HX_RING_LIVENESS_NS. */
/* deadline_ns: CLOCK_MONOTONIC nanoseconds, < 0 for none; or, with timeout_option set
 * (SO_RCVTIMEO/SO_SNDTIMEO), taken from the socket once the spin is over. */
static inline int hx_ring_wait_readable(hx_ring *r, long long deadline_ns, int timeout_option,
                                        int may_spin) {
    uint32_t *sleeps = HX_U32(r->rx_block, HX__CSLEEP);
    long long start = hx_ring_now_ns(), now = start;
    long long budget = r->rx_spin_ns;
    int64_t ready;
    int probing = 0;
    may_spin = may_spin && r->spin_ok;
    if (may_spin && budget == 0 && ++r->rx_unspun >= r->rx_probe_every) {
        r->rx_unspun = 0;
        budget = HX_RING_SPIN_MAX_NS;
        probing = 1;
    }
    if (!may_spin) {
        /* A waiter that only watches (an event pump) leaves the spinning to the reader. */
    } else if (budget > 0
            && __atomic_add_fetch(&hx_ring_spinners, 1, __ATOMIC_RELAXED) <= hx_ring_max_spinners) {
        long long until = start + budget;
        if (!timeout_option && deadline_ns >= 0 && until > deadline_ns)
            until = deadline_ns;
        for (unsigned k = 0;; k++) {
            ready = hx_ring_readable(r);
            if (ready != 0 || hx_ring_rx_ended(r) || __atomic_load_n(&r->shut, __ATOMIC_RELAXED))
                break;
            hx_cpu_relax();
            if ((k & 15) == 15 && (now = hx_ring_now_ns()) >= until)
                break;
        }
        __atomic_sub_fetch(&hx_ring_spinners, 1, __ATOMIC_RELAXED);
        if (ready != 0) {
            r->spins_won++;
            r->rx_spin_ns = HX_RING_SPIN_MAX_NS;
            r->rx_probe_every = HX_RING_PROBE_MIN;
            return ready < 0 ? HX_WAIT_CORRUPT : HX_WAIT_READY;
        }
    } else if (budget > 0) {
        __atomic_sub_fetch(&hx_ring_spinners, 1, __ATOMIC_RELAXED);
    }
    if (probing && r->rx_probe_every < HX_RING_PROBE_MAX)
        r->rx_probe_every *= 2;
    if (timeout_option)
        deadline_ns = hx_ring_socket_deadline(r, timeout_option);
    for (int idle = 0;;) {
        if (__atomic_load_n(&r->shut, __ATOMIC_RELAXED))
            return HX_WAIT_SHUT;
        int on_socket = idle >= HX_RING_IDLE_SLICES;
        uint32_t expected = hx_ring_announce(sleeps, on_socket ? HX_WAKE_SOCKET : HX_WAKE_FUTEX);
        ready = hx_ring_readable(r);
        if (ready != 0 || hx_ring_rx_ended(r) || __atomic_load_n(&r->shut, __ATOMIC_RELAXED)) {
            if (ready < 0)
                return HX_WAIT_CORRUPT;
            if (ready > 0)
                break;
            return r->shut ? HX_WAIT_SHUT : HX_WAIT_ENDED;
        }
        int slept = on_socket ? hx_ring_poll_socket(r, deadline_ns)
                              : hx_ring_sleep(r, sleeps, expected, deadline_ns);
        if (slept == HX__DEADLINE)
            return HX_WAIT_TIMEOUT;
        if (slept == EINTR)
            return -EINTR;
        if (slept == ETIMEDOUT)
            idle++;
        if ((slept == ETIMEDOUT || on_socket) && hx_ring_readable(r) == 0) {
            if (hx_ring_socket_ended(r))
                return HX_WAIT_ENDED;
            if (hx_ring_socket_readable(r))
                return HX_WAIT_SOCKET;   /* the caller takes the records, then waits again */
        }
    }
    /* Spinning would have paid if the bytes came within its budget: spin next time. */
    if (!may_spin)
        return HX_WAIT_READY;
    now = hx_ring_now_ns();
    if (now - start <= HX_RING_SPIN_MAX_NS) {
        r->rx_spin_ns = HX_RING_SPIN_MAX_NS;
        r->rx_probe_every = HX_RING_PROBE_MIN;
    } else {
        r->rx_spin_ns /= 2;
    }
    return HX_WAIT_READY;
}

/* As hx_ring_wait_readable, for room to write: READY (some room), ENDED (the peer closed
 * its side or its socket ended: nothing will read what we write), SHUT, CORRUPT, TIMEOUT. */
static inline int hx_ring_wait_writable(hx_ring *r, long long deadline_ns, int timeout_option) {
    uint32_t *sleeps = HX_U32(r->tx_block, HX__PSLEEP);
    int64_t room;
    for (unsigned k = 0; k < 2048; k++) {   /* a short spin: the consumer may be copying */
        room = hx_ring_writable(r);
        if (room != 0 || __atomic_load_n(&r->shut, __ATOMIC_RELAXED))
            break;
        hx_cpu_relax();
    }
    if (timeout_option)
        deadline_ns = hx_ring_socket_deadline(r, timeout_option);
    for (;;) {
        if (__atomic_load_n(&r->shut, __ATOMIC_RELAXED))
            return HX_WAIT_SHUT;
        uint32_t expected = hx_ring_announce(sleeps, HX_WAKE_FUTEX);
        room = hx_ring_writable(r);
        if (room != 0)
            return room < 0 ? HX_WAIT_CORRUPT : HX_WAIT_READY;
        if (hx_ring_peer_closed(r))
            return HX_WAIT_ENDED;
        int slept = hx_ring_sleep(r, sleeps, expected, deadline_ns);
        if (slept == HX__DEADLINE)
            return HX_WAIT_TIMEOUT;
        if (slept == EINTR)
            return -EINTR;
        if (slept == ETIMEDOUT && hx_ring_writable(r) == 0 && hx_ring_socket_ended(r))
            return HX_WAIT_ENDED;
    }
}

/* ---- Spinning on a socket ------------------------------------------------------------------
 * A client that has sent a request and waits for its reply on the socket (not the ring) may
 * spin a moment before it blocks: it tries recvmsg with MSG_DONTWAIT, yielding the CPU between
 * tries (so a peer on this same CPU runs at once), for up to its budget. When the peer runs on
 * another CPU, this spares the wake-up of a sleeping thread, which on a VM costs tens of
 * microseconds. The budget adapts as the ring's does: full while the reply comes within
 * HX_SOCKET_SPIN_MAX_NS, halved after each wait that lasted longer, and probed again now and
 * then once it is spent; the spinners of this process (ring and socket alike) stay within
 * hx_ring_max_spinners. Not wire-visible. */
#define HX_SOCKET_SPIN_MAX_NS 100000LL
#define HX_SPIN_NOTHING (-2)

typedef struct {
    long long spin_ns;            /* the budget */
    unsigned probe_every, unspun;
    int peer_beside;              /* -1: not looked yet; 0: the peer shares our one CPU */
    uint64_t spins, spins_won;    /* counters for stats and tests */
} hx_spin;

static inline void hx_spin_init(hx_spin *s) {
    s->spin_ns = HX_SOCKET_SPIN_MAX_NS;
    s->probe_every = HX_RING_PROBE_MIN;
    s->unspun = 0;
    s->peer_beside = -1;
    s->spins = s->spins_won = 0;
}

/* Whether a spin on `sock` may see the peer move: as hx_ring_peer_may_run_beside, except
 * that a peer we cannot look at (TCP has no SO_PEERCRED pid) may: our tries yield the CPU,
 * so a spin beside a peer on the same CPU costs a few system calls, not its turn. Only two
 * processes both pinned to one same CPU never spin (each try would only hand the CPU over). */
static inline int hx_spin_peer_beside(int sock) {
    return hx_peer_may_run_beside(sock, 1);
}

/* The budget of the wait about to start on `sock` (0: block at once), with a spinner's slot
 * taken when it is not 0; hx_spin_end gives the slot back. *start: now, for hx_spin_after. */
static inline long long hx_spin_begin(hx_spin *s, int sock, long long *start, int *probing) {
    long long budget = s->spin_ns;
    *start = hx_ring_now_ns();
    *probing = 0;
    if (hx_ring_max_spinners <= 0)
        return 0;
    if (s->peer_beside < 0)
        s->peer_beside = hx_spin_peer_beside(sock);
    if (!s->peer_beside)
        return 0;
    if (budget == 0 && ++s->unspun >= s->probe_every) {
        s->unspun = 0;
        budget = HX_SOCKET_SPIN_MAX_NS;
        *probing = 1;
    }
    if (budget == 0)
        return 0;
    if (__atomic_add_fetch(&hx_ring_spinners, 1, __ATOMIC_RELAXED) > hx_ring_max_spinners) {
        __atomic_sub_fetch(&hx_ring_spinners, 1, __ATOMIC_RELAXED);
        return 0;   /* others spin: a probe refused so is not counted */
    }
    s->spins++;
    return budget;
}

/* Ends a spin hx_spin_begin allowed: won, bytes came (the budget is full again); otherwise a
 * probe that did not pay makes the next one wait twice as long. Leaves errno as it was. */
static inline void hx_spin_end(hx_spin *s, int won, int probing) {
    int saved = errno;
    __atomic_sub_fetch(&hx_ring_spinners, 1, __ATOMIC_RELAXED);
    if (won) {
        s->spins_won++;
        s->spin_ns = HX_SOCKET_SPIN_MAX_NS;
        s->probe_every = HX_RING_PROBE_MIN;
    } else if (probing && s->probe_every < HX_RING_PROBE_MAX) {
        s->probe_every *= 2;
    }
    errno = saved;
}

/* Tries `m` on `fd` until bytes come or the budget is spent. Returns recvmsg's result when a
 * try took bytes or failed other than with EAGAIN (errno as recvmsg left it), or
 * HX_SPIN_NOTHING: block now (msg_controllen and msg_flags are as the caller set them), then
 * call hx_spin_after with *start once that read has returned bytes or timed out. */
static inline ssize_t hx_spin_recvmsg(hx_spin *s, int fd, struct msghdr *m, int flags,
                                      long long *start) {
    size_t controllen = m->msg_controllen;
    int probing;
    ssize_t n = HX_SPIN_NOTHING;
    long long budget = hx_spin_begin(s, fd, start, &probing);
    if (budget == 0)
        return HX_SPIN_NOTHING;
    for (;;) {
        n = recvmsg(fd, m, flags | MSG_DONTWAIT);
        if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
            break;
        m->msg_controllen = controllen;
        m->msg_flags = 0;
        sched_yield();
        if (hx_ring_now_ns() - *start >= budget) {
            n = HX_SPIN_NOTHING;
            break;
        }
    }
    hx_spin_end(s, n >= 0, probing && n == HX_SPIN_NOTHING);
    return n;
}

/* As hx_spin_recvmsg, for a reader that cannot take the bytes here (OpenSSL reads them):
 * 1 when `fd` became readable (or failed: the read that follows says how) within the
 * budget, 0 when the caller should block, then call hx_spin_after with *start. */
static inline int hx_spin_poll(hx_spin *s, int fd, long long *start) {
    struct pollfd p;
    int probing, found = 0;
    long long budget = hx_spin_begin(s, fd, start, &probing);
    if (budget == 0)
        return 0;
    for (;;) {
        p.fd = fd;
        p.events = POLLIN;
        p.revents = 0;
        found = poll(&p, 1, 0);
        if (found != 0)
            break;
        sched_yield();
        if (hx_ring_now_ns() - *start >= budget)
            break;
    }
    hx_spin_end(s, found != 0, probing && found == 0);
    return found != 0;
}

/* After the blocking read that followed HX_SPIN_NOTHING (it returned bytes, or the receive
 * timeout expired): spinning would have paid if the bytes came within the longest budget.
 * Leaves errno as it was. */
static inline void hx_spin_after(hx_spin *s, long long start) {
    int saved = errno;
    if (hx_ring_now_ns() - start <= HX_SOCKET_SPIN_MAX_NS) {
        s->spin_ns = HX_SOCKET_SPIN_MAX_NS;
        s->probe_every = HX_RING_PROBE_MIN;
    } else {
        s->spin_ns /= 2;
    }
    errno = saved;
}

#endif
