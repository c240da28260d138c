/*
 * _crc16_threads.h -- the CRC of one large buffer on several CPUs at once.
 *
 *   static uint16_t hx_crc16_zeros(uint16_t crc, size_t n);
 *       The register after n zero bytes: hx_crc16(crc, "\0" * n, n), in O(log n).
 *   static uint16_t hx_crc16_threaded(uint16_t crc, const unsigned char *p, size_t len);
 *       hx_crc16(crc, p, len), computed by up to HX_CRC16_MAX_THREADS threads
 *       when len >= HX_CRC16_THREADED_MIN and this thread may run on more than
 *       one CPU (sched_getaffinity); on one thread otherwise.
 *   static int hx_crc16_threads(size_t len);
 *       How many threads hx_crc16_threaded would use for len bytes.  It reads the
 *       environment: call it where nothing can change that meanwhile (with the GIL held),
 *       then hx_crc16_threaded_on(crc, p, len, threads) without the GIL.
 *
 * Combining.  The CRC is linear over GF(2) and has no final XOR, so for a
 * buffer A followed by B (|B| = n bytes):
 *     crc(c, A||B) = crc(crc(c, A), B) = crc(c', 0^n) ^ crc(0, B),  c' = crc(c, A)
 * and crc(c', 0^n) = c' * x^(8n) mod P (each zero bit multiplies the
 * register by x).  So pieces can be checksummed apart, each from 0 (the
 * first from c), and folded together in order.
 *
 * Scheduling.  The buffer is cut into at most HX__CRC16_MAX_BLOCKS blocks of
 * at least HX__CRC16_BLOCK_MIN bytes.  The calling thread and its helpers
 * take blocks from a shared counter, so a helper that the scheduler leaves
 * waiting costs at most the blocks it took, never a whole half.  A helper
 * that cannot be started is simply not there: the others take its blocks.
 * The process runs at most HX_CRC16_MAX_THREADS - 1 helpers at a time, however
 * many threads take large CRCs at once; a call that finds them all busy takes
 * fewer, or none.
 * HINTENS_CRC_THREADS=N (read on every call) caps the threads, 1 (or 0)
 * turning this off; the default, and what a value that is not a whole number
 * gives, is the CPUs this thread may run on (fewer if the process's cgroup has
 * a CPU quota of fewer, read once), at most HX_CRC16_MAX_THREADS.
 *
 * Nothing here touches Python state: call it without the GIL.
 */
#ifndef HX_CRC16_THREADS_H
#define HX_CRC16_THREADS_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#endif
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "_crc16.h"

#ifndef HX_CRC16_THREADED_MIN
#define HX_CRC16_THREADED_MIN ((size_t)16 << 20) /* below this a thread costs more than it saves */
#endif
#ifndef HX__CRC16_BLOCK_MIN
#define HX__CRC16_BLOCK_MIN ((size_t)2 << 20)
#endif
#define HX_CRC16_MAX_THREADS 4
#define HX__CRC16_MAX_BLOCKS 64

/* a * b mod P, both of degree < 16 (Horner over b's bits, highest first). */
static uint16_t hx__crc16_mulmod(uint16_t a, uint16_t b)
{
    uint16_t r = 0;
    for (int i = 15; i >= 0; i--) {
        r = (uint16_t)((r << 1) ^ ((r & 0x8000) ? 0x1021 : 0));
        if ((b >> i) & 1)
            r ^= a;
    }
    return r;
}

/* x^(8n) mod P, by squaring x^8. */
static uint16_t hx__crc16_xpow8n(size_t n)
{
    uint16_t result = 1, square = 0x0100;
    while (n) {
        if (n & 1)
            result = hx__crc16_mulmod(result, square);
        square = hx__crc16_mulmod(square, square);
        n >>= 1;
    }
    return result;
}

static uint16_t hx_crc16_zeros(uint16_t crc, size_t n)
{
    return hx__crc16_mulmod(crc, hx__crc16_xpow8n(n));
}

typedef struct {
    const unsigned char *p;
    size_t len, block;
    int blocks;
    int next;                          /* the next block to take (atomic) */
    uint16_t crcs[HX__CRC16_MAX_BLOCKS]; /* each block's CRC from 0 */
} hx__crc16_job;

static void *hx__crc16_work(void *arg)
{
    hx__crc16_job *job = (hx__crc16_job *)arg;
    int i;
    while ((i = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED)) < job->blocks) {
        size_t start = (size_t)i * job->block;
        size_t n = (i == job->blocks - 1) ? job->len - start : job->block;
        job->crcs[i] = hx_crc16(0, job->p + start, n);
    }
    return NULL;
}

/* A whole number of CPUs from a cgroup quota file: v2's cpu.max ("max 100000" or "quota
 * period"), or v1's cpu.cfs_quota_us (-1: none) with cpu.cfs_period_us beside it.  0: no
 * quota there (or no such file); else quota / period rounded down, at least 1. */
static int hx__crc16_quota_file(const char *dir, int v2)
{
    char path[4200], text[64];
    long long quota = -1, period = 0;
    FILE *f;

    snprintf(path, sizeof path, "%s/%s", dir, v2 ? "cpu.max" : "cpu.cfs_quota_us");
    if (!(f = fopen(path, "re")))
        return 0;
    if (!fgets(text, sizeof text, f))
        text[0] = 0;
    fclose(f);
    if (v2) {
        if (sscanf(text, "%lld %lld", &quota, &period) != 2) /* "max ..." fails here: none */
            return 0;
    } else {
        if (sscanf(text, "%lld", &quota) != 1 || quota <= 0)
            return 0;
        snprintf(path, sizeof path, "%s/cpu.cfs_period_us", dir);
        if (!(f = fopen(path, "re")))
            return 0;
        if (!fgets(text, sizeof text, f) || sscanf(text, "%lld", &period) != 1)
            period = 0;
        fclose(f);
    }
    if (quota <= 0 || period <= 0)
        return 0;
    return quota / period >= 1 ? (int)(quota / period < 1024 ? quota / period : 1024) : 1;
}

/* The CPUs this process's cgroup may use, by its CPU quota: 0 when it has none.  Its own
 * cgroup only (as /proc/self/cgroup names it, then the mount's root, as inside a container),
 * not its ancestors'.  Read once per process. */
static int hx__crc16_quota_cpus_read(void)
{
    char line[4096], dir[4200];
    FILE *f = fopen("/proc/self/cgroup", "re");
    int cpus = 0;

    while (f && !cpus && fgets(line, sizeof line, f)) {
        char *controllers = strchr(line, ':'), *where;
        if (!controllers || !(where = strchr(controllers + 1, ':')))
            continue;
        *where++ = 0;
        where[strcspn(where, "\n")] = 0;
        controllers++;
        if (strcmp(line, "0") == 0 && *controllers == 0) { /* v2: "0::/path" */
            snprintf(dir, sizeof dir, "/sys/fs/cgroup%s", where);
            cpus = hx__crc16_quota_file(dir, 1);
        } else {
            /* v1: a controller list naming "cpu" ("cpu", "cpu,cpuacct", ...) */
            char list[256], *save = NULL, *name;
            int has_cpu = 0;
            snprintf(list, sizeof list, "%s", controllers);
            for (name = strtok_r(list, ",", &save); name; name = strtok_r(NULL, ",", &save))
                has_cpu |= strcmp(name, "cpu") == 0;
            if (!has_cpu)
                continue;
            snprintf(dir, sizeof dir, "/sys/fs/cgroup/%s%s", controllers, where);
            cpus = hx__crc16_quota_file(dir, 0);
            if (!cpus) {
                snprintf(dir, sizeof dir, "/sys/fs/cgroup/cpu%s", where);
                cpus = hx__crc16_quota_file(dir, 0);
            }
        }
    }
    if (f)
        fclose(f);
    if (!cpus)
        cpus = hx__crc16_quota_file("/sys/fs/cgroup", 1);
    if (!cpus)
        cpus = hx__crc16_quota_file("/sys/fs/cgroup/cpu", 0);
    return cpus;
}

static int hx__crc16_quota_cpus(void)
{
    static int known = -1; /* -1: not read yet; racing first reads compute the same value */
    int cpus = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (cpus < 0) {
        cpus = hx__crc16_quota_cpus_read();
        __atomic_store_n(&known, cpus, __ATOMIC_RELAXED);
    }
    return cpus;
}

/* Helper threads running now, in the whole process: at most HX_CRC16_MAX_THREADS - 1, so
 * that several threads taking large CRCs at once do not each start their own. */
static int hx__crc16_helpers_running;

static int hx_crc16_threads(size_t len)
{
    cpu_set_t set;
    const char *env;
    int threads = HX_CRC16_MAX_THREADS, cpus, quota;

    if (len < HX_CRC16_THREADED_MIN)
        return 1;
    env = getenv("HINTENS_CRC_THREADS");
    if (env && *env) { /* a whole number, spaces around it allowed; else the default */
        char *end;
        long wanted = strtol(env, &end, 10);
        int converted = end != env;
        while (*end == ' ' || *end == '\t' || *end == '\n')
            end++;
        if (converted && *end == '\0') {
            if (wanted < 1)
                return 1;
            if (wanted < threads)
                threads = (int)wanted;
        }
    }
    if (sched_getaffinity(0, sizeof set, &set) != 0)
        return 1;
    cpus = CPU_COUNT(&set);
    quota = hx__crc16_quota_cpus(); /* a container limited to fewer CPUs than it sees */
    if (quota > 0 && quota < cpus)
        cpus = quota;
    return cpus < threads ? cpus : threads;
}

/* hx_crc16(crc, p, len) on up to `threads` threads (hx_crc16_threads(len) gives the usual
 * number; the caller may take it while it holds a lock that keeps the environment still). */
static uint16_t hx_crc16_threaded_on(uint16_t crc, const unsigned char *p, size_t len, int threads)
{
    hx__crc16_job job;
    pthread_t helpers[HX_CRC16_MAX_THREADS - 1];
    pthread_attr_t attr;
    int started = 0;
    uint16_t step;

    if (threads > HX_CRC16_MAX_THREADS)
        threads = HX_CRC16_MAX_THREADS;
    if (threads < 2 || len < 2 * HX__CRC16_BLOCK_MIN)
        return hx_crc16(crc, p, len);
    job.p = p;
    job.len = len;
    /* Rounded up, both times, so that blocks * block >= len with at most MAX_BLOCKS blocks
     * (a multiple of 4096 keeps the blocks' starts at one alignment). */
    job.block = len / HX__CRC16_MAX_BLOCKS + (len % HX__CRC16_MAX_BLOCKS != 0);
    if (job.block < HX__CRC16_BLOCK_MIN)
        job.block = HX__CRC16_BLOCK_MIN;
    job.block = (job.block + 4095) & ~(size_t)4095;
    job.blocks = (int)((len + job.block - 1) / job.block);
    if (job.blocks > HX__CRC16_MAX_BLOCKS) /* cannot happen (above); never write past crcs */
        return hx_crc16(crc, p, len);
    job.next = 0;
    if (pthread_attr_init(&attr) == 0) {
        sigset_t all, old;
        /* The helpers take no signal (they inherit this mask): each stays the caller's. */
        sigfillset(&all);
        int masked = pthread_sigmask(SIG_SETMASK, &all, &old) == 0;
        pthread_attr_setstacksize(&attr, 64 * 1024); /* a CRC needs no more */
        for (int t = 0; t < threads - 1; t++) {
            if (__atomic_add_fetch(&hx__crc16_helpers_running, 1, __ATOMIC_RELAXED) > HX_CRC16_MAX_THREADS - 1 ||
                pthread_create(&helpers[started], &attr, hx__crc16_work, &job) != 0) {
                __atomic_sub_fetch(&hx__crc16_helpers_running, 1, __ATOMIC_RELAXED);
                break;
            }
            started++;
        }
        if (masked)
            pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&attr);
    }
    hx__crc16_work(&job);
    for (int t = 0; t < started; t++)
        pthread_join(helpers[t], NULL);
    __atomic_sub_fetch(&hx__crc16_helpers_running, started, __ATOMIC_RELAXED);
    /* Fold the blocks in order; all but the last are job.block bytes. */
    step = hx__crc16_xpow8n(job.block);
    for (int i = 0; i < job.blocks - 1; i++)
        crc = (uint16_t)(hx__crc16_mulmod(crc, step) ^ job.crcs[i]);
    return (uint16_t)(hx_crc16_zeros(crc, len - (size_t)(job.blocks - 1) * job.block) ^
                      job.crcs[job.blocks - 1]);
}

static inline uint16_t hx_crc16_threaded(uint16_t crc, const unsigned char *p, size_t len)
{
    return hx_crc16_threaded_on(crc, p, len, hx_crc16_threads(len));
}

#endif /* HX_CRC16_THREADS_H */
