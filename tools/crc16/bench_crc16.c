/* Benchmark for _crc16.h.  GB/s = 1e9 bytes/s; best of several timed runs;
 * each call's crc is fed to the next so calls cannot be elided or overlapped.
 * Build: gcc -O2 bench_crc16.c -o bench_crc16
 * Usage: ./bench_crc16          (summary table)
 *        ./bench_crc16 sweep    (ns/call by size, used to pick thresholds) */
#include "_crc16.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint16_t dispatched(uint16_t crc, const unsigned char *p, size_t len) { return hx_crc16(crc, p, len); }

static volatile uint16_t sink;

/* ns per call for `len` bytes; walks `span` bytes of buf so the working set
 * can exceed the caches (64 MiB case) */
static double bench(hx__crc16_fn fn, const unsigned char *buf, size_t len, size_t span)
{
    size_t nblk = span / len;
    size_t iters = (size_t)(4e7 / (len + 40)) + 1; /* ~10-20 ms per run */
    if (iters < nblk)
        iters = nblk;
    double best = 1e30;
    for (int rep = 0; rep < 21; rep++) {
        uint16_t crc = 0xFFFF;
        size_t b = 0;
        double t0 = now();
        for (size_t i = 0; i < iters; i++) {
            crc = fn(crc, buf + b * len, len);
            if (++b == nblk)
                b = 0;
        }
        double t = (now() - t0) / iters;
        sink = crc;
        if (t < best)
            best = t;
    }
    return best * 1e9;
}

int main(int argc, char **argv)
{
    size_t big = (size_t)64 << 20;
    unsigned char *buf = aligned_alloc(64, big);
    for (size_t i = 0; i < big; i++)
        buf[i] = (unsigned char)(i * 2654435761u >> 13);

    struct {
        const char *name;
        hx__crc16_fn fn;
    } paths[5];
    int n = 0;
    paths[n].name = "table";
    paths[n++].fn = hx_crc16_table;
#if HX_CRC16_X86
    /* Only the paths this CPU can run (the others would die of SIGILL). */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1")) {
        paths[n].name = "pclmul";
        paths[n++].fn = hx_crc16_pclmul;
        if (__builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("avx2")) {
            paths[n].name = "vpclmul";
            paths[n++].fn = hx_crc16_vpclmul;
            if (hx__cpu_has_zmm()) {
                paths[n].name = "vpclmul512";
                paths[n++].fn = hx_crc16_vpclmul512;
            }
        }
    }
#endif
    paths[n].name = "dispatched";
    paths[n++].fn = dispatched;
    printf("dispatcher picked: %s (PCLMUL_MIN=%d VPCLMUL_MIN=%d VPCLMUL512_MIN=%d)\n", hx_crc16_impl(),
           HX_CRC16_PCLMUL_MIN, HX_CRC16_VPCLMUL_MIN, HX_CRC16_VPCLMUL512_MIN);

    if (argc > 1 && strcmp(argv[1], "sweep") == 0) {
        static const size_t sz[] = {16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 288, 320,
                                    384, 448, 512, 640, 768, 1024, 1536, 2048, 4096, 8192, 65536};
        printf("%8s", "bytes");
        for (int i = 0; i < n; i++)
            printf(" %12s", paths[i].name);
        printf("   (ns/call)\n");
        for (size_t j = 0; j < sizeof sz / sizeof sz[0]; j++) {
            printf("%8zu", sz[j]);
            for (int i = 0; i < n; i++)
                printf(" %12.2f", bench(paths[i].fn, buf, sz[j], sz[j] > 16384 ? sz[j] : 16384));
            printf("\n");
        }
        return 0;
    }

    printf("%-11s %10s %10s %10s %10s\n", "path", "16B ns", "4KiB GB/s", "1MiB GB/s", "64MiB GB/s");
    for (int i = 0; i < n; i++) {
        double t16 = bench(paths[i].fn, buf, 16, 4096);
        double t4k = bench(paths[i].fn, buf, 4096, 4096);
        double t1m = bench(paths[i].fn, buf, (size_t)1 << 20, (size_t)1 << 20);
        double t64 = bench(paths[i].fn, buf, big, big);
        printf("%-11s %10.2f %10.2f %10.2f %10.2f\n", paths[i].name, t16, 4096 / t4k, (1 << 20) / t1m,
               big / t64);
    }
    free(buf);
    return 0;
}
