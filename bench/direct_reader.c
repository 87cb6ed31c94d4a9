// The cold disk's speed with nothing of Python's in the way: T threads read a file with O_DIRECT,
// each taking the next CHUNK bytes (one shared offset, as fastsafetensors' nogds reader and our
// readers do), into its own page-aligned buffer, touched before the clock. Python threads
// reading the same pattern fell behind fastsafetensors' own at 512 KiB (docs/benchmarks.md).
// PAGES (4k or huge) asks for the buffers on 4 KiB or transparent huge pages (madvise): our
// staging is on huge pages, and an O_DIRECT request's segments follow the pages it lands in
// (on the GPU machine's disk 512 KiB requests read faster into huge pages). Without it the
// system's default applies.
// Prints one JSON line: bytes, seconds, GB/s, and how many buffer bytes were on huge pages.
// Build: cc -O2 -pthread -static -o direct_reader bench/direct_reader.c
// Run:   direct_reader PATH THREADS CHUNK_BYTES [LIMIT_BYTES [PAGES]]
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int fd;
static size_t chunk;
static uint64_t limit;
static _Atomic uint64_t next_offset, total;
static _Atomic int failed;

// AnonHugePages of this process (kB), from /proc/self/smaps_rollup; -1 if unreadable.
static long long anon_huge_kb(void) {
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    if (!f) return -1;
    char line[256];
    long long kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "AnonHugePages: %lld kB", &kb) == 1) break;
    fclose(f);
    return kb;
}

static void *work(void *buf) {
    for (;;) {
        uint64_t off = atomic_fetch_add(&next_offset, chunk);
        if (off >= limit || atomic_load(&failed)) return NULL;
        ssize_t n;
        do {
            n = pread(fd, buf, chunk, (off_t)off);  // whole chunks: O_DIRECT wants them
        } while (n < 0 && errno == EINTR);
        if (n < 0) {
            fprintf(stderr, "pread at %llu: %s\n", (unsigned long long)off, strerror(errno));
            atomic_store(&failed, 1);
            return NULL;
        }
        uint64_t want = limit - off < chunk ? limit - off : chunk;
        atomic_fetch_add(&total, (uint64_t)n < want ? (uint64_t)n : want);
        if ((size_t)n < chunk && off + (uint64_t)n < limit) {  // short read before the limit: EOF
            atomic_store(&failed, 1);
            fprintf(stderr, "short read at %llu\n", (unsigned long long)off);
            return NULL;
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s PATH THREADS CHUNK_BYTES [LIMIT_BYTES [4k|huge]]\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[2]);
    chunk = strtoull(argv[3], NULL, 10);
    if (threads < 1 || threads > 1024 || chunk < 4096 || chunk % 4096 || chunk > (1ULL << 30)) {
        fprintf(stderr, "threads 1..1024, chunk a multiple of 4096 up to 1 GiB\n");
        return 2;
    }
    fd = open(argv[1], O_RDONLY | O_DIRECT);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        fprintf(stderr, "%s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    limit = (uint64_t)st.st_size;
    if (argc > 4 && strtoull(argv[4], NULL, 10) > 0 && strtoull(argv[4], NULL, 10) < limit)
        limit = strtoull(argv[4], NULL, 10);
    const char *pages = argc > 5 ? argv[5] : "";
    int huge = strcmp(pages, "huge") == 0;
    if (*pages && !huge && strcmp(pages, "4k") != 0) {
        fprintf(stderr, "PAGES is 4k or huge\n");
        return 2;
    }
    size_t align = huge ? (2u << 20) : 4096;
    size_t span = (chunk + align - 1) / align * align;  // madvise whole pages of the kind
    pthread_t *tid = calloc((size_t)threads, sizeof *tid);
    void **bufs = calloc((size_t)threads, sizeof *bufs);
    for (int i = 0; i < threads; i++) {
        if (posix_memalign(&bufs[i], align, span) != 0) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        if (*pages && madvise(bufs[i], span, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0) {
            fprintf(stderr, "madvise: %s\n", strerror(errno));
            return 1;
        }
        memset(bufs[i], 0, span);
    }
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < threads; i++) pthread_create(&tid[i], NULL, work, bufs[i]);
    for (int i = 0; i < threads; i++) pthread_join(tid[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    if (atomic_load(&failed)) return 1;
    double secs = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) / 1e9;
    uint64_t n = atomic_load(&total);
    printf("{\"bytes\": %llu, \"seconds\": %.6f, \"gbps\": %.4f, \"huge_kb\": %lld}\n",
           (unsigned long long)n, secs, (double)n / secs / 1e9, anon_huge_kb());
    return 0;
}
