/* Correctness harness for _crc16.h: every path vs. a bitwise reference.
 * Build: gcc -O2 -Wall -Wextra -Werror -pthread test_crc16.c -o test_crc16 */
#ifdef HX_TEST_SMALL_BLOCKS /* the threaded CRC's every path on small buffers (make crc-check) */
#define HX_CRC16_THREADED_MIN ((size_t)8192)
#define HX__CRC16_BLOCK_MIN ((size_t)4096)
#endif
#include "_crc16_threads.h" /* first: it defines _GNU_SOURCE; it includes _crc16.h */

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint16_t ref_crc16(uint16_t crc, const unsigned char *p, size_t len)
{
    while (len--) {
        crc ^= (uint16_t)(*p++ << 8);
        for (int i = 0; i < 8; i++)
            crc = (uint16_t)((crc & 0x8000) ? (crc << 1) ^ 0x1021 : crc << 1);
    }
    return crc;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

typedef struct {
    const char *name;
    hx__crc16_fn fn;
} path_t;

static path_t paths[8];
static int npaths;
static long failures, checks;

static void check(const path_t *pt, uint16_t crc, const unsigned char *p, size_t len, uint16_t want,
                  const char *what)
{
    uint16_t got = pt->fn(crc, p, len);
    checks++;
    if (got != want) {
        if (failures < 20)
            fprintf(stderr, "FAIL %s [%s] len=%zu crc0=%04x addr%%64=%u: got %04x want %04x\n", pt->name,
                    what, len, crc, (unsigned)((uintptr_t)p & 63), got, want);
        failures++;
    }
}


static uint16_t dispatched(uint16_t crc, const unsigned char *p, size_t len) { return hx_crc16(crc, p, len); }

static uint64_t xpow_mod(unsigned k)
{
    uint32_t r = 1;
    while (k--) {
        r <<= 1;
        if (r & 0x10000)
            r ^= 0x11021;
    }
    return r;
}

static void test_constants(void)
{
    /* Constants in the header must equal x^k mod P computed independently. */
#if HX_CRC16_X86
    for (unsigned n = 1; n <= 16; n++) {
        if (hx__kfold[n][0] != xpow_mod(128 * n + 64) || hx__kfold[n][1] != xpow_mod(128 * n)) {
            fprintf(stderr, "FAIL kfold[%u]\n", n);
            failures++;
        }
    }
#ifdef __SIZEOF_INT128__
    {
        /* floor(x^80 / P) by long division, x^64 term dropped */
        unsigned __int128 rem = (unsigned __int128)1 << 80, quo = 0;
        for (int b = 64; b >= 0; b--)
            if ((rem >> (b + 16)) & 1) {
                rem ^= (unsigned __int128)0x11021 << b;
                quo |= (unsigned __int128)1 << b;
            }
        if (HX__X80 != xpow_mod(80) || (uint64_t)quo != HX__MU80 || (quo >> 64) != 1) {
            fprintf(stderr, "FAIL reduction constants\n");
            failures++;
        }
    }
#endif
#endif
    /* table rows: a single set bit j of a byte followed by k bytes is x^(8k+16+j) */
    for (unsigned k = 0; k < 16; k++)
        for (unsigned j = 0; j < 8; j++)
            if (hx__crc16_tab[k][1u << j] != xpow_mod(8 * k + 16 + j)) {
                fprintf(stderr, "FAIL table bit [%u][%u]\n", k, j);
                failures++;
            }
    for (unsigned k = 0; k < 16; k++)
        for (unsigned b = 0; b < 256; b++) {
            unsigned char buf[16] = {0};
            buf[15 - k] = (unsigned char)b;
            if (hx__crc16_tab[k][b] != ref_crc16(0, buf + 15 - k, k + 1)) {
                fprintf(stderr, "FAIL table[%u][%u]\n", k, b);
                failures++;
            }
        }
}

static void run_all(const unsigned char *data, size_t big)
{
    /* 1. check value */
    for (int i = 0; i < npaths; i++)
        check(&paths[i], 0xFFFF, (const unsigned char *)"123456789", 9, 0x29B1, "check");

    /* 2. every length 0..2048, exact-size heap buffer, random start crc */
    for (size_t len = 0; len <= 2048; len++) {
        unsigned char *b = malloc(len ? len : 1);
        memcpy(b, data + (rnd() % 4096), len);
        uint16_t c0 = (len & 1) ? 0xFFFF : (uint16_t)rnd();
        uint16_t want = ref_crc16(c0, b, len);
        for (int i = 0; i < npaths; i++)
            check(&paths[i], c0, b, len, want, "len");
        free(b);
    }

    /* 3. every misalignment 0..63 for a spread of lengths, data ends at the
     * allocation end */
    static const size_t mlens[] = {1, 15, 16, 17, 31, 63, 64, 127, 128, 129, 255, 256, 257, 300, 511,
                                   512, 1000, 1023, 1024, 1025, 2047, 4096, 4111, 65536 + 77};
    for (unsigned mis = 0; mis < 64; mis++)
        for (size_t j = 0; j < sizeof mlens / sizeof mlens[0]; j++) {
            size_t len = mlens[j];
            unsigned char *raw = malloc(len + mis);
            unsigned char *b = raw + mis;
            memcpy(b, data + (rnd() % 4096), len);
            uint16_t c0 = (uint16_t)rnd();
            uint16_t want = ref_crc16(c0, b, len);
            for (int i = 0; i < npaths; i++)
                check(&paths[i], c0, b, len, want, "misalign");
            free(raw);
        }

    /* 3b. every misalignment 0..63 x every length 0..800: all tail shapes of
     * the SIMD kernels at every offset, for none, one and two steps of the
     * widest main loop (256 bytes) */
    for (unsigned mis = 0; mis < 64; mis++)
        for (size_t len = 0; len <= 800; len++) {
            unsigned char *raw = malloc(len + mis ? len + mis : 1); /* ends exactly at the data */
            unsigned char *b = raw + mis;
            memcpy(b, data + (rnd() % 4096), len);
            uint16_t c0 = (uint16_t)rnd();
            uint16_t want = ref_crc16(c0, b, len);
            for (int i = 0; i < npaths; i++)
                check(&paths[i], c0, b, len, want, "misalign-all");
            free(raw);
        }

    /* 4. random lengths up to `big` bytes at random offsets */
    for (int t = 0; t < 24; t++) {
        size_t len = (t < 8) ? rnd() % 65536 : rnd() % (big - 64);
        size_t off = rnd() % 64;
        uint16_t c0 = (uint16_t)rnd();
        uint16_t want = ref_crc16(c0, data + off, len);
        for (int i = 0; i < npaths; i++)
            check(&paths[i], c0, data + off, len, want, "random");
    }

    /* 5. incremental: every split point of a 3000-byte buffer, plus random
     * splits of a large one, mixing paths for the two halves */
    {
        size_t n = 3000;
        uint16_t want = ref_crc16(0xFFFF, data + 5, n);
        for (size_t s = 0; s <= n; s++)
            for (int i = 0; i < npaths; i++) {
                const path_t *pa = &paths[i], *pb = &paths[(i + s) % npaths];
                uint16_t mid = pa->fn(0xFFFF, data + 5, s);
                check(pb, mid, data + 5 + s, n - s, want, "split");
            }
        n = big / 2 + 333;
        want = ref_crc16(0x1234, data + 3, n);
        for (int t = 0; t < 16; t++) {
            size_t s = rnd() % n;
            for (int i = 0; i < npaths; i++) {
                uint16_t mid = paths[i].fn(0x1234, data + 3, s);
                check(&paths[i], mid, data + 3 + s, n - s, want, "split-big");
            }
        }
    }
}

static void *race_thread(void *arg)
{
    const unsigned char *d = arg;
    uint16_t want = ref_crc16(0xFFFF, d, 5000);
    for (int i = 0; i < 200; i++)
        if (hx_crc16(0xFFFF, d, 5000) != want)
            __atomic_fetch_add(&failures, 1, __ATOMIC_RELAXED);
    return NULL;
}

static const char *set_impl(const char *env)
{
    if (env)
        setenv("HINTENS_CRC_IMPL", env, 1);
    else
        unsetenv("HINTENS_CRC_IMPL");
    hx__crc16_chosen = NULL; /* forget the cached choice */
    return hx_crc16_impl();
}

static void test_dispatch(const unsigned char *data, size_t big, int has_pcl, int has_vpcl, int has_zmm)
{
    const char *native = set_impl(NULL);
    const struct {
        const char *env, *want;
    } cases[] = {{"table", "table"},
                 {"pclmul", has_pcl ? "pclmulqdq" : "table"},
                 {"vpclmul", has_vpcl ? "vpclmulqdq-avx2" : "table"},
                 {"vpclmul512", has_zmm ? "vpclmulqdq-avx512" : "table"},
                 {"bogus", native},
                 {NULL, has_zmm    ? "vpclmulqdq-avx512"
                        : has_vpcl ? "vpclmulqdq-avx2"
                        : has_pcl  ? "pclmulqdq"
                                   : "table"}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const char *impl = set_impl(cases[c].env);
        printf("  HINTENS_CRC_IMPL=%-10s -> %s\n", cases[c].env ? cases[c].env : "(unset)", impl);
        if (strcmp(impl, cases[c].want) != 0) {
            fprintf(stderr, "FAIL env %s chose %s, want %s\n", cases[c].env, impl, cases[c].want);
            failures++;
        }
        paths[0] = (path_t){"dispatched", dispatched};
        npaths = 1;
        run_all(data, big);
    }
    /* racing first calls from several threads */
    set_impl(NULL);
    hx__crc16_chosen = NULL;
    pthread_t th[4];
    for (int i = 0; i < 4; i++)
        pthread_create(&th[i], NULL, race_thread, (void *)data);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
}

typedef struct {
    const unsigned char *p;
    size_t len;
    uint16_t want;
    int bad;
} crowd_t;

static void *crowd_thread(void *arg)
{
    crowd_t *c = arg;
    for (int i = 0; i < 3; i++)
        c->bad += hx_crc16_threaded_on(0xFFFF, c->p, c->len, 4) != c->want;
    return NULL;
}

/* Six threads taking threaded CRCs at once: each right, and the process-wide count of
 * helpers back to 0 afterwards (it bounds them to HX_CRC16_MAX_THREADS - 1 meanwhile). */
static void test_crowd(const unsigned char *data, size_t len)
{
    pthread_t th[6];
    crowd_t c[6];
    for (int i = 0; i < 6; i++) {
        c[i] = (crowd_t){data + i, len - i, hx_crc16(0xFFFF, data + i, len - i), 0};
        pthread_create(&th[i], NULL, crowd_thread, &c[i]);
    }
    for (int i = 0; i < 6; i++) {
        pthread_join(th[i], NULL);
        checks += 3;
        failures += c[i].bad;
    }
    checks++;
    if (__atomic_load_n(&hx__crc16_helpers_running, __ATOMIC_RELAXED) != 0) {
        fprintf(stderr, "FAIL %d CRC helpers counted as running after all were joined\n",
                hx__crc16_helpers_running);
        failures++;
    }
}

/* hx_crc16_zeros against the bitwise reference over zero bytes, and hx_crc16_threaded against
 * the (already checked) one-thread kernel across its thresholds, block edges and thread caps. */
static void test_threaded(void)
{
    static const unsigned char zeros[5000];
    /* 64 blocks at most: (128 MiB + 1) / 64 rounded down is a whole 2 MiB, which once cut
     * such a length into 65 blocks. The small-block build scales it down. */
    size_t edge = HX__CRC16_BLOCK_MIN * 64 + 1;
    size_t big = HX_CRC16_THREADED_MIN * 2 + 3 * 4096 + 17;
    size_t room = edge + 63 > big ? edge + 63 : big;
    unsigned char *data = malloc(room);
    const char *caps[] = {NULL, "1", "2", "3", "4", "9", "0", "x"};
    long before = failures;

    for (size_t n = 0; n <= sizeof zeros; n += (n < 64 ? 1 : 97)) {
        uint16_t c0 = (uint16_t)rnd();
        checks++;
        if (hx_crc16_zeros(c0, n) != ref_crc16(c0, zeros, n)) {
            fprintf(stderr, "FAIL zeros n=%zu crc0=%04x\n", n, c0);
            failures++;
        }
    }
    for (size_t i = 0; i < room; i++)
        data[i] = (unsigned char)(rnd() >> 56);
    setenv("HINTENS_CRC_THREADS", "2", 1);
    {
        cpu_set_t set;
        int cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
        int quota = hx__crc16_quota_cpus(), at = cpus < 2 ? cpus : 2;
        if (quota > 0 && quota < at)
            at = quota;
        checks++;
        if (hx_crc16_threads(HX_CRC16_THREADED_MIN - 1) != 1 || hx_crc16_threads(HX_CRC16_THREADED_MIN) != at) {
            fprintf(stderr, "FAIL hx_crc16_threads below/at the threshold (want 1 and %d)\n", at);
            failures++;
        }
    }
    for (size_t c = 0; c < sizeof caps / sizeof caps[0]; c++) {
        const size_t sizes[] = {HX_CRC16_THREADED_MIN - 1, HX_CRC16_THREADED_MIN, HX_CRC16_THREADED_MIN + 1,
                                HX_CRC16_THREADED_MIN + 4095, big / 2 + 1, big - 5, big};
        if (caps[c])
            setenv("HINTENS_CRC_THREADS", caps[c], 1);
        else
            unsetenv("HINTENS_CRC_THREADS");
        printf("  HINTENS_CRC_THREADS=%-7s -> %d threads for %zu bytes\n", caps[c] ? caps[c] : "(unset)",
               hx_crc16_threads(big), big);
        for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
            size_t off = k % 3, n = sizes[k] - off;
            uint16_t c0 = (uint16_t)rnd(), want = hx_crc16(c0, data + off, n);
            checks++;
            if (hx_crc16_threaded(c0, data + off, n) != want) {
                fprintf(stderr, "FAIL threaded cap=%s n=%zu off=%zu crc0=%04x\n", caps[c] ? caps[c] : "-", n, off, c0);
                failures++;
            }
        }
    }
    test_crowd(data, big);
    /* Past the old 64-block edge, once. */
    for (size_t n = edge; n <= edge + 62; n += 61) {
        uint16_t c0 = (uint16_t)rnd(), want = hx_crc16(c0, data, n);
        checks++;
        if (hx_crc16_threaded_on(c0, data, n, 2) != want) {
            fprintf(stderr, "FAIL threaded at the block edge n=%zu\n", n);
            failures++;
        }
    }
#ifdef HX_TEST_SMALL_BLOCKS
    /* Every 37th length over a range, on 2 and 4 threads, many blocks each. */
    for (size_t n = HX_CRC16_THREADED_MIN; n < HX_CRC16_THREADED_MIN + 40000 && n <= big; n += 37) {
        uint16_t c0 = (uint16_t)rnd(), want = hx_crc16(c0, data, n);
        checks += 2;
        if (hx_crc16_threaded_on(c0, data, n, 2) != want || hx_crc16_threaded_on(c0, data, n, 4) != want) {
            fprintf(stderr, "FAIL threaded_on n=%zu crc0=%04x\n", n, c0);
            failures++;
        }
    }
#endif
    unsetenv("HINTENS_CRC_THREADS");
    if (hx_crc16_threads(big) < 2)
        printf("note: this thread may run on one CPU only, so the threaded CRC ran on one thread\n");
    printf("  threaded: %s\n", failures == before ? "ok" : "FAILED");
    free(data);
}

int main(int argc, char **argv)
{
    size_t big = (argc > 1) ? (size_t)atol(argv[1]) : (size_t)6 << 20; /* "several MiB" */
    unsigned char *data = malloc(big + 128);
    for (size_t i = 0; i < big + 128; i++)
        data[i] = (unsigned char)(rnd() >> 56);

    test_constants();

    int has_pcl = 0, has_vpcl = 0, has_zmm = 0;
    npaths = 0;
    paths[npaths++] = (path_t){"table", hx_crc16_table};
#if HX_CRC16_X86
    __builtin_cpu_init();
    has_pcl = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
    has_vpcl = has_pcl && __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("avx2");
    if (has_pcl)
        paths[npaths++] = (path_t){"pclmul", hx_crc16_pclmul};
    else
        printf("note: no pclmul on this CPU, pclmul path not tested\n");
    if (has_vpcl)
        paths[npaths++] = (path_t){"vpclmul", hx_crc16_vpclmul};
    else
        printf("note: no vpclmulqdq/avx2 on this CPU, vpclmul path not tested\n");
    has_zmm = has_vpcl && hx__cpu_has_zmm();
    if (has_zmm)
        paths[npaths++] = (path_t){"vpclmul512", hx_crc16_vpclmul512};
    else
        printf("note: no avx512f/bw/vl+vpclmulqdq with zmm state enabled by the OS on this CPU, "
               "vpclmul512 path not tested\n");
#endif
    paths[npaths++] = (path_t){"dispatched", dispatched};
    printf("raw paths:");
    for (int i = 0; i < npaths; i++)
        printf(" %s", paths[i].name);
    printf("\n");
    run_all(data, big);

    printf("dispatcher / env override:\n");
    test_dispatch(data, big, has_pcl, has_vpcl, has_zmm);

    printf("threaded CRC:\n");
    set_impl(NULL);
    test_threaded();

    free(data);
    printf("%ld passed, %ld failed\n", checks - failures, failures);
    return failures ? 1 : 0;
}
