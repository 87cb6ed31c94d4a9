/* A stand-in for libcuda.so with just the driver calls tensorizer-rs uses, for testing the GPU
 * pipeline on machines without a GPU. "Device memory" is host memory: a device pointer is a
 * host address. Streams are real asynchronous queues (one thread each) with random delays
 * (MOCK_CUDA_DELAY_US), so a staging buffer reused before its copy ran shows up as wrong
 * bytes, and freeing or unregistering host memory that a queued copy still reads aborts.
 *
 * Build: cc -shared -fPIC -O1 -pthread -Wl,-soname,libcuda.so.1 -o libcuda.so libcuda.c
 * Env: MOCK_CUDA_DEVICES (default 1), MOCK_CUDA_INIT_ERROR (cuInit fails), MOCK_CUDA_DELAY_US.
 * Device N's PCI bus id is "0000:1B:0N.0" (upper case, as the real driver writes it), for
 * tests that find its NUMA node in a fake sysfs tree.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct mock_open_args;

typedef int CUresult;
enum {
    OK = 0,
    ERR_INVALID_VALUE = 1,
    ERR_NO_DEVICE = 100,
    ERR_INVALID_DEVICE = 101,
    ERR_NOT_READY = 600,
    ERR_ALREADY_REGISTERED = 712,
    ERR_NOT_REGISTERED = 713,
};

enum { OP_COPY, OP_SET, OP_RECORD, OP_WAIT, OP_LAUNCH };

struct event {
    unsigned long target, completed;
};

struct op {
    int kind;
    void *owned; /* a private copy of a pageable source, freed after the copy */
    void *dst;
    const void *src;
    size_t n;
    unsigned char value;
    struct event *ev;
    unsigned long seq;
    struct op *next;
};

struct stream {
    struct op *head, *tail, *current;
    unsigned long queued, done;
    int stop;
    unsigned seed;
    pthread_t th;
    struct stream *next_all;
};

struct range {
    uintptr_t start, len;
    int pinned; /* 1: cuMemHostAlloc, 0: cuMemHostRegister */
    struct range *next;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static struct stream *all_streams;
static struct range *ranges;
static int initialised;
static unsigned delay_us;
static __thread void *current_ctx;

static int is_null_stream(struct stream *s) { return (uintptr_t)s <= 2; }

static void run_kernel(int fn, const struct mock_open_args *a);

static void execute(struct op *o, unsigned *seed) {
    if (o->kind == OP_LAUNCH) {
        if (delay_us) usleep(rand_r(seed) % (delay_us + 1));
        run_kernel(o->value, o->owned);
    } else if (o->kind == OP_COPY || o->kind == OP_SET) {
        if (delay_us) usleep(rand_r(seed) % (delay_us + 1));
        if (o->kind == OP_COPY)
            memcpy(o->dst, o->src, o->n);
        else
            memset(o->dst, o->value, o->n);
    } else if (o->kind == OP_RECORD) {
        pthread_mutex_lock(&mu);
        if (o->ev->completed < o->seq) o->ev->completed = o->seq;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    } else if (o->kind == OP_WAIT) {
        pthread_mutex_lock(&mu);
        while (o->ev->completed < o->seq) pthread_cond_wait(&cv, &mu);
        pthread_mutex_unlock(&mu);
    }
}

static void *stream_main(void *arg) {
    struct stream *s = arg;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (!s->head && !s->stop) pthread_cond_wait(&cv, &mu);
        if (!s->head && s->stop) break;
        struct op *o = s->head;
        s->head = o->next;
        if (!s->head) s->tail = NULL;
        s->current = o;
        pthread_mutex_unlock(&mu);
        execute(o, &s->seed);
        pthread_mutex_lock(&mu);
        s->current = NULL;
        s->done++;
        free(o->owned);
        free(o);
        pthread_cond_broadcast(&cv);
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}

static CUresult submit(struct stream *s, struct op o) {
    if (!initialised) return 3; /* CUDA_ERROR_NOT_INITIALIZED */
    if (is_null_stream(s)) {
        unsigned seed = 1;
        execute(&o, &seed);
        free(o.owned);
        return OK;
    }
    struct op *p = malloc(sizeof *p);
    *p = o;
    p->next = NULL;
    pthread_mutex_lock(&mu);
    if (s->tail)
        s->tail->next = p;
    else
        s->head = p;
    s->tail = p;
    s->queued++;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    return OK;
}

static void check_op(struct op *o, uintptr_t start, uintptr_t len, const char *what) {
    if (o && o->kind == OP_COPY && (uintptr_t)o->src < start + len && (uintptr_t)o->src + o->n > start) {
        fprintf(stderr, "mock libcuda: %s of %p while a queued copy still reads it\n", what, (void *)start);
        abort();
    }
}

/* Abort if a queued or running copy reads [start, start+len). Called with mu held. */
static void check_unused(uintptr_t start, uintptr_t len, const char *what) {
    for (struct stream *s = all_streams; s; s = s->next_all) {
        check_op(s->current, start, len, what);
        for (struct op *o = s->head; o; o = o->next) check_op(o, start, len, what);
    }
}

/* Whether [p, p+n) lies in pinned or registered memory. */
static int page_locked(const void *p, size_t n) {
    int found = 0;
    pthread_mutex_lock(&mu);
    for (struct range *r = ranges; r; r = r->next)
        if (r->start <= (uintptr_t)p && (uintptr_t)p + n <= r->start + r->len) found = 1;
    pthread_mutex_unlock(&mu);
    return found;
}

CUresult cuGetErrorString(CUresult e, const char **s) {
    switch (e) {
    case OK: *s = "no error"; break;
    case ERR_NO_DEVICE: *s = "no CUDA-capable device is detected (mock)"; break;
    case ERR_INVALID_DEVICE: *s = "invalid device ordinal (mock)"; break;
    case ERR_ALREADY_REGISTERED: *s = "part or all of the requested memory range is already mapped (mock)"; break;
    case ERR_NOT_REGISTERED: *s = "pointer does not correspond to a registered memory region (mock)"; break;
    default: *s = "mock error"; break;
    }
    return OK;
}

CUresult cuGetErrorName(CUresult e, const char **s) { return cuGetErrorString(e, s); }

CUresult cuInit(unsigned flags) {
    (void)flags;
    if (getenv("MOCK_CUDA_INIT_ERROR")) return ERR_NO_DEVICE;
    const char *d = getenv("MOCK_CUDA_DELAY_US");
    delay_us = d ? (unsigned)atoi(d) : 0;
    initialised = 1;
    return OK;
}

CUresult cuDriverGetVersion(int *v) { *v = 12080; return OK; }

static int device_count(void) {
    const char *n = getenv("MOCK_CUDA_DEVICES");
    return n ? atoi(n) : 1;
}

CUresult cuDeviceGetCount(int *n) { *n = device_count(); return OK; }

CUresult cuDeviceGet(int *dev, int ordinal) {
    if (ordinal < 0 || ordinal >= device_count()) return ERR_INVALID_DEVICE;
    *dev = ordinal;
    return OK;
}

CUresult cuDeviceGetPCIBusId(char *out, int len, int dev) {
    if (dev < 0 || dev >= device_count() || len < 13) return ERR_INVALID_DEVICE;
    snprintf(out, (size_t)len, "0000:1B:%02X.0", dev);
    return OK;
}

CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) {
    *ctx = (void *)(uintptr_t)(0x1000 + dev);
    return OK;
}

CUresult cuCtxSetCurrent(void *ctx) { current_ctx = ctx; return OK; }
CUresult cuCtxGetCurrent(void **ctx) { *ctx = current_ctx; return OK; }

CUresult cuStreamCreate(struct stream **out, unsigned flags) {
    (void)flags;
    if (!current_ctx) return 201; /* CUDA_ERROR_INVALID_CONTEXT */
    struct stream *s = calloc(1, sizeof *s);
    s->seed = (unsigned)(uintptr_t)s;
    pthread_create(&s->th, NULL, stream_main, s);
    pthread_mutex_lock(&mu);
    s->next_all = all_streams;
    all_streams = s;
    pthread_mutex_unlock(&mu);
    *out = s;
    return OK;
}

CUresult cuStreamSynchronize(struct stream *s) {
    if (is_null_stream(s)) return OK;
    pthread_mutex_lock(&mu);
    unsigned long target = s->queued;
    while (s->done < target) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuStreamDestroy_v2(struct stream *s) {
    if (is_null_stream(s)) return ERR_INVALID_VALUE;
    pthread_mutex_lock(&mu);
    s->stop = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    pthread_join(s->th, NULL);
    pthread_mutex_lock(&mu);
    for (struct stream **p = &all_streams; *p; p = &(*p)->next_all)
        if (*p == s) { *p = s->next_all; break; }
    pthread_mutex_unlock(&mu);
    free(s);
    return OK;
}

CUresult cuEventCreate(struct event **out, unsigned flags) {
    (void)flags;
    *out = calloc(1, sizeof **out);
    return OK;
}

CUresult cuEventDestroy_v2(struct event *e) {
    /* Leaked on purpose: queued waits may still read it (real CUDA keeps their state). */
    (void)e;
    return OK;
}

CUresult cuEventRecord(struct event *e, struct stream *s) {
    pthread_mutex_lock(&mu);
    unsigned long seq = ++e->target;
    pthread_mutex_unlock(&mu);
    struct op o = {.kind = OP_RECORD, .ev = e, .seq = seq};
    return submit(s, o);
}

CUresult cuEventSynchronize(struct event *e) {
    pthread_mutex_lock(&mu);
    unsigned long target = e->target;
    while (e->completed < target) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuEventQuery(struct event *e) {
    pthread_mutex_lock(&mu);
    int done = e->completed >= e->target;
    pthread_mutex_unlock(&mu);
    return done ? OK : ERR_NOT_READY;
}

CUresult cuStreamWaitEvent(struct stream *s, struct event *e, unsigned flags) {
    (void)flags;
    pthread_mutex_lock(&mu);
    unsigned long seq = e->target;
    pthread_mutex_unlock(&mu);
    if (!seq) return OK;
    struct op o = {.kind = OP_WAIT, .ev = e, .seq = seq};
    return submit(s, o);
}

CUresult cuMemHostAlloc(void **p, size_t n, unsigned flags) {
    (void)flags;
    if (!current_ctx) return 201;
    if (posix_memalign(p, 4096, n ? n : 1)) return 2; /* CUDA_ERROR_OUT_OF_MEMORY */
    struct range *r = calloc(1, sizeof *r);
    r->start = (uintptr_t)*p;
    r->len = n;
    r->pinned = 1;
    pthread_mutex_lock(&mu);
    r->next = ranges;
    ranges = r;
    pthread_mutex_unlock(&mu);
    return OK;
}

static CUresult drop_range(void *p, int pinned, const char *what) {
    pthread_mutex_lock(&mu);
    for (struct range **r = &ranges; *r; r = &(*r)->next) {
        if ((*r)->start == (uintptr_t)p && (*r)->pinned == pinned) {
            struct range *dead = *r;
            check_unused(dead->start, dead->len, what);
            *r = dead->next;
            pthread_mutex_unlock(&mu);
            free(dead);
            return OK;
        }
    }
    pthread_mutex_unlock(&mu);
    return pinned ? ERR_INVALID_VALUE : ERR_NOT_REGISTERED;
}

CUresult cuMemFreeHost(void *p) {
    CUresult r = drop_range(p, 1, "cuMemFreeHost");
    if (r == OK) free(p);
    return r;
}

CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned flags) {
    (void)flags;
    if (((uintptr_t)p & 4095) || (n & 4095)) return ERR_INVALID_VALUE;
    pthread_mutex_lock(&mu);
    for (struct range *r = ranges; r; r = r->next) {
        if (!r->pinned && r->start < (uintptr_t)p + n && r->start + r->len > (uintptr_t)p) {
            pthread_mutex_unlock(&mu);
            return ERR_ALREADY_REGISTERED;
        }
    }
    struct range *r = calloc(1, sizeof *r);
    r->start = (uintptr_t)p;
    r->len = n;
    r->next = ranges;
    ranges = r;
    pthread_mutex_unlock(&mu);
    /* Touch the pages, as pinning does. */
    volatile const char *c = p;
    for (size_t i = 0; i < n; i += 4096) (void)c[i];
    return OK;
}

CUresult cuMemHostUnregister(void *p) { return drop_range(p, 0, "cuMemHostUnregister"); }

CUresult cuMemcpyHtoDAsync_v2(uintptr_t dst, const void *src, size_t n, struct stream *s) {
    struct op o = {.kind = OP_COPY, .dst = (void *)dst, .src = src, .n = n};
    if (!page_locked(src, n)) {
        /* Like the driver: a pageable source is staged before the call returns. */
        o.owned = malloc(n ? n : 1);
        memcpy(o.owned, src, n);
        o.src = o.owned;
    }
    return submit(s, o);
}

CUresult cuMemsetD8Async(uintptr_t dst, unsigned char value, size_t n, struct stream *s) {
    struct op o = {.kind = OP_SET, .dst = (void *)dst, .n = n, .value = value};
    return submit(s, o);
}

/* CUDA 12.8 ABI: copies queued in order on one stream. MOCK_CUDA_NO_BATCH=1 reports it
 * unsupported, as an older driver's missing symbol would. */
CUresult cuMemcpyBatchAsync(uintptr_t *dsts, uintptr_t *srcs, size_t *sizes, size_t count, void *attrs,
                            size_t *attrs_idxs, size_t num_attrs, size_t *fail_idx, struct stream *s) {
    (void)attrs;
    (void)attrs_idxs;
    (void)num_attrs;
    if (getenv("MOCK_CUDA_NO_BATCH")) return 801; /* CUDA_ERROR_NOT_SUPPORTED */
    for (size_t i = 0; i < count; i++) {
        CUresult r = cuMemcpyHtoDAsync_v2(dsts[i], (const void *)srcs[i], sizes[i], s);
        if (r != OK) {
            *fail_idx = i;
            return r;
        }
    }
    return OK;
}

/* ------------------------------------------------------------------ modules and kernels
 * Enough for the decryption kernels of src/cuda/kernels/secretbox.cu: the module must be a real
 * NVRTC product (an ELF cubin, or PTX naming the kernels), and a launch of either kernel does its
 * work with libsodium on the argument it was given, read with the layout below (a copy of
 * tz_open_args / tz_slot, checked here independently of the Rust and CUDA definitions).
 * Device memory is host memory, so cuMemAlloc is malloc. MOCK_CUDA_CC sets the compute
 * capability (default 90). */
#include <dlfcn.h>

struct mock_chunk {
    uint64_t data, len;
    unsigned char nonce[24], mac[16];
    uint32_t slot, reserved;
};
struct mock_open_args {
    unsigned char key[32];
    uint64_t slots;
    uint32_t nslots, nchunks;
    struct mock_chunk chunks[32];
};
struct mock_slot {
    uint64_t acc[5];
    uint32_t arrived, verdict;
};
_Static_assert(sizeof(struct mock_chunk) == 64, "tz_chunk");
_Static_assert(sizeof(struct mock_open_args) == 2096, "tz_open_args");
_Static_assert(sizeof(struct mock_slot) == 48, "tz_slot");

enum { FN_VERIFY = 1, FN_DECRYPT = 2 };
static unsigned long launches[3];

CUresult cuDeviceGetAttribute(int *v, int attr, int dev) {
    (void)dev;
    const char *cc = getenv("MOCK_CUDA_CC");
    int c = cc ? atoi(cc) : 90;
    if (attr == 75) *v = c / 10;      /* CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR */
    else if (attr == 76) *v = c % 10; /* ..._MINOR */
    else *v = 0;
    return OK;
}

CUresult cuModuleLoadData(void **module, const void *image) {
    const char *p = image;
    if (!current_ctx) return 201;
    if (!(p[0] == 0x7f && p[1] == 'E' && p[2] == 'L' && p[3] == 'F') && !strstr(p, ".entry tz_secretbox_verify"))
        return 200; /* CUDA_ERROR_INVALID_IMAGE */
    *module = (void *)(uintptr_t)0x5000;
    return OK;
}

CUresult cuModuleGetFunction(void **f, void *module, const char *name) {
    (void)module;
    if (!strcmp(name, "tz_secretbox_verify")) *f = (void *)(uintptr_t)FN_VERIFY;
    else if (!strcmp(name, "tz_secretbox_decrypt")) *f = (void *)(uintptr_t)FN_DECRYPT;
    else return 500; /* CUDA_ERROR_NOT_FOUND */
    return OK;
}

typedef int (*open_detached_fn)(unsigned char *, const unsigned char *, const unsigned char *, unsigned long long,
                                const unsigned char *, const unsigned char *);
static open_detached_fn sodium_open;

static int load_sodium(void) {
    if (sodium_open) return 1;
    void *h = dlopen("libsodium.so.23", RTLD_NOW);
    if (!h) h = dlopen("libsodium.so", RTLD_NOW);
    if (!h) return 0;
    int (*init)(void) = (int (*)(void))dlsym(h, "sodium_init");
    sodium_open = (open_detached_fn)dlsym(h, "crypto_secretbox_open_detached");
    return init && sodium_open && init() >= 0;
}

/* Run one launch (on its stream's thread). */
static void run_kernel(int fn, const struct mock_open_args *a) {
    struct mock_slot *slots = (struct mock_slot *)(uintptr_t)a->slots;
    for (uint32_t i = 0; i < a->nchunks && i < 32; i++) {
        const struct mock_chunk *c = &a->chunks[i];
        if (c->slot >= a->nslots) continue;
        unsigned char *data = (unsigned char *)(uintptr_t)c->data;
        if (fn == FN_VERIFY) {
            unsigned char *tmp = malloc(c->len ? c->len : 1);
            int r = sodium_open(tmp, data, c->mac, c->len, c->nonce, a->key);
            free(tmp);
            slots[c->slot].verdict = r == 0 ? 1 : 2;
        } else if (slots[c->slot].verdict == 1) {
            sodium_open(data, data, c->mac, c->len, c->nonce, a->key);
        }
    }
}

CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                        unsigned shared, struct stream *s, void **params, void **extra) {
    int fn = (int)(uintptr_t)f;
    if ((fn != FN_VERIFY && fn != FN_DECRYPT) || !params || extra || !gx || gy != 1 || gz != 1 || bx != 256 ||
        by != 1 || bz != 1 || shared)
        return ERR_INVALID_VALUE;
    if (!load_sodium()) {
        fprintf(stderr, "mock libcuda: libsodium (libsodium.so.23) is needed to run the decryption kernels\n");
        return 999;
    }
    const struct mock_open_args *a = params[0];
    if (a->nchunks == 0 || a->nchunks > 32) return ERR_INVALID_VALUE;
    /* The driver copies kernel arguments at launch: so do we (the caller may reuse them). */
    struct op o = {.kind = OP_LAUNCH, .owned = malloc(sizeof *a), .value = (unsigned char)fn};
    memcpy(o.owned, a, sizeof *a);
    pthread_mutex_lock(&mu);
    launches[fn]++;
    pthread_mutex_unlock(&mu);
    return submit(s, o);
}

/* For the tests: how many launches of each kernel (verify, decrypt) were queued. */
void mock_cuda_launches(unsigned long *verify, unsigned long *decrypt) {
    pthread_mutex_lock(&mu);
    *verify = launches[FN_VERIFY];
    *decrypt = launches[FN_DECRYPT];
    pthread_mutex_unlock(&mu);
}

CUresult cuMemAlloc_v2(uintptr_t *p, size_t n) {
    if (!current_ctx) return 201;
    void *m = malloc(n ? n : 1);
    if (!m) return 2;
    *p = (uintptr_t)m;
    return OK;
}

CUresult cuMemFree_v2(uintptr_t p) {
    free((void *)p);
    return OK;
}

CUresult cuMemsetD8_v2(uintptr_t dst, unsigned char value, size_t n) {
    memset((void *)dst, value, n);
    return OK;
}

CUresult cuMemcpyDtoH_v2(void *dst, uintptr_t src, size_t n) {
    memcpy(dst, (const void *)src, n);
    return OK;
}

/* NVRTC (13.x) looks this up in a libcuda already loaded and crashes when it is missing; the
 * driver's private tables are none of our business: report "not supported". */
CUresult cuGetExportTable(const void **table, const void *id) {
    (void)id;
    *table = NULL;
    return 801; /* CUDA_ERROR_NOT_SUPPORTED */
}
