/* A stand-in for libcuda.so with just the driver calls tensorizer-rs uses, for testing the GPU
 * pipeline on machines without a GPU. "Device memory" is host memory: a device pointer is a
 * host address. Streams are real asynchronous queues (one thread each) with random delays
 * (MOCK_CUDA_DELAY_US), so a staging buffer reused before its copy ran shows up as wrong
 * bytes, and freeing or unregistering host memory that a queued copy still reads aborts.
 *
 * Build: cc -shared -fPIC -O1 -pthread -Wl,-soname,libcuda.so.1 -o libcuda.so libcuda.c
 * Env: MOCK_CUDA_DEVICES (default 1), MOCK_CUDA_INIT_ERROR (cuInit fails), MOCK_CUDA_DELAY_US.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

enum { OP_COPY, OP_SET, OP_RECORD, OP_WAIT };

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

static void execute(struct op *o, unsigned *seed) {
    if (o->kind == OP_COPY || o->kind == OP_SET) {
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
