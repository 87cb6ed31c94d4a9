// A minimal parallel HTTP/1.1 range client: how fast this host moves an object from a server on
// 127.0.0.1 into memory, with nothing of ours in the way. T threads, each on its own kept-alive
// connection (dialled again where the server ends one, e.g. an HTTP/1.0 server after each
// response), fetch consecutive ranges of PIECE MiB (0: one range per thread) and `recv` the
// bodies into
//   null   one 1 MiB scratch buffer per thread, rewritten (what `curl -o /dev/null` does),
//   fresh  one region the size of the object, mapped at the start and never touched before
//          (the kernel faults in and zeroes each page on the first write: a load into new
//          tensors),
//   reused the same region after a first pass (pages already in: a load into existing tensors).
// Prints one JSON line per pass: GB/s, CPU-seconds, context switches, page faults. Given the
// served file, each pass's bytes are compared with it after the clock stops (fresh, reused).
// Build: cc -O2 -pthread -static -o range_client bench/range_client.c
// Run:   range_client PORT PATH SIZE THREADS PIECE_MIB MODE [PASSES [FILE]]
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int port;
static const char *path;
static uint64_t size, piece;
static int threads;
static char *region, *mapped; // fresh / reused destination, within its mapping
static int mode;     // 0 null, 1 fresh, 2 reused
static uint64_t next_off;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void die(const char *what) {
  perror(what);
  exit(1);
}

static int dial(void) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
  int one = 1;
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return s;
}

// send() all of `n` bytes, through short writes and signals.
static int send_all(int s, const char *p, size_t n) {
  while (n) {
    ssize_t w = send(s, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

// recv() once, retrying when a signal interrupts it: >0 bytes, 0 at the peer's close, <0 error.
static ssize_t recv_some(int s, char *p, size_t n) {
  for (;;) {
    ssize_t r = recv(s, p, n, 0);
    if (r >= 0 || errno != EINTR) return r;
  }
}

// One ranged GET on the connection `*s` (dialled when -1): the head is read byte-wise up to its
// blank line (a few hundred bytes: simple, and no body bytes are taken with it), then the body
// goes to `dst` (or the scratch). A kept-alive connection the server has closed meanwhile (EOF
// before any byte of the head) is dialled again once; a response that ends its connection
// (HTTP/1.0 without keep-alive, or "Connection: close") leaves `*s` at -1 for the next request.
static void get(int *s, uint64_t off, uint64_t len, char *dst, char *scratch) {
  char req[512];
  int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: bytes=%llu-%llu\r\n\r\n", path,
                   (unsigned long long)off, (unsigned long long)(off + len - 1));
  char head[8192];
  size_t h = 0;
  for (int attempt = 0;; attempt++) {
    int fresh = *s < 0;
    if (fresh) *s = dial();
    if (send_all(*s, req, n) == 0) {
      ssize_t r = recv_some(*s, head, 1);
      if (r == 1) {
        h = 1;
        break;
      }
      if (r < 0 && fresh) die("recv head");
    } else if (fresh) {
      die("send");
    }
    // The server closed a connection we were reusing: dial again, once.
    close(*s);
    *s = -1;
    if (fresh || attempt) {
      fprintf(stderr, "head: the server closed the connection before answering\n");
      exit(1);
    }
  }
  while (h < 4 || memcmp(head + h - 4, "\r\n\r\n", 4) != 0) {
    if (h == sizeof head - 1) {
      fprintf(stderr, "head: longer than %zu bytes\n", sizeof head - 1);
      exit(1);
    }
    ssize_t r = recv_some(*s, head + h, 1);
    if (r < 0) die("recv head");
    if (r == 0) {
      fprintf(stderr, "head: the server closed the connection after %zu bytes of it\n", h);
      exit(1);
    }
    h++;
  }
  head[h] = 0;
  if (h < 12 || memcmp(head + 9, "206", 3) != 0) {
    fprintf(stderr, "not a 206: %.*s\n", (int)h, head);
    exit(1);
  }
  int closes = strcasestr(head, "\r\nconnection: close") != NULL ||
               (memcmp(head, "HTTP/1.0", 8) == 0 && strcasestr(head, "\r\nconnection: keep-alive") == NULL);
  uint64_t got = 0;
  while (got < len) {
    size_t want = len - got;
    char *p;
    if (dst) {
      p = dst + got;
    } else {
      p = scratch;
      if (want > (1 << 20)) want = 1 << 20;
    }
    ssize_t r = recv_some(*s, p, want);
    if (r < 0) die("recv body");
    if (r == 0) {
      fprintf(stderr, "body: the server closed the connection after %llu of %llu bytes\n",
              (unsigned long long)got, (unsigned long long)len);
      exit(1);
    }
    got += r;
  }
  if (closes) {
    close(*s);
    *s = -1;
  }
}

static void *worker(void *arg) {
  (void)arg;
  char *scratch = mode == 0 ? malloc(1 << 20) : NULL;
  int s = -1;
  for (;;) {
    pthread_mutex_lock(&mu);
    uint64_t off = next_off, len = piece ? piece : (size + threads - 1) / threads;
    if (off < size) next_off += len;
    pthread_mutex_unlock(&mu);
    if (off >= size) break;
    if (len > size - off) len = size - off;
    get(&s, off, len, mode == 0 ? NULL : region + off, scratch);
  }
  if (s >= 0) close(s);
  free(scratch);
  return NULL;
}

// The destination against the served file, read in 8 MiB blocks; exits 1 on the first difference.
static void verify(const char *file) {
  int fd = open(file, O_RDONLY);
  if (fd < 0) die(file);
  char *buf = malloc(8 << 20);
  for (uint64_t off = 0; off < size;) {
    ssize_t n = pread(fd, buf, 8 << 20, off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) die("pread");
    if ((uint64_t)n > size - off) n = size - off;
    if (memcmp(buf, region + off, n) != 0) {
      fprintf(stderr, "bytes differ from %s in the 8 MiB at %llu\n", file, (unsigned long long)off);
      exit(1);
    }
    off += n;
  }
  free(buf);
  close(fd);
}

int main(int argc, char **argv) {
  if (argc < 7) {
    fprintf(stderr, "usage: range_client PORT PATH SIZE THREADS PIECE_MIB null|fresh|reused [PASSES [FILE]]\n");
    return 2;
  }
  port = atoi(argv[1]);
  path = argv[2];
  size = strtoull(argv[3], NULL, 10);
  threads = atoi(argv[4]);
  piece = strtoull(argv[5], NULL, 10) << 20;
  mode = !strcmp(argv[6], "fresh") ? 1 : !strcmp(argv[6], "reused") ? 2 : 0;
  int passes = argc > 7 ? atoi(argv[7]) : 1;
  const char *check = argc > 8 ? argv[8] : NULL;
  if (mode == 2) passes++; // the first pass faults the region in and is not the figure
  pthread_t *t = calloc(threads, sizeof *t);
  for (int pass = 0; pass < passes; pass++) {
    struct rusage r0, r1;
    getrusage(RUSAGE_SELF, &r0);
    double t0 = now();
    // Mapped inside the clock, as a load maps its tensors; 2 MiB aligned, huge pages asked for.
    if (mode && (pass == 0 || mode == 1)) {
      if (mapped) munmap(mapped, size + (2 << 20));
      mapped = mmap(NULL, size + (2 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (mapped == MAP_FAILED) die("mmap");
      region = (char *)(((uintptr_t)mapped + (2 << 20) - 1) & ~(uintptr_t)((2 << 20) - 1));
      madvise(region, size, MADV_HUGEPAGE);
    }
    next_off = 0;
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, worker, NULL);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    double dt = now() - t0;
    getrusage(RUSAGE_SELF, &r1);
    double cpu = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) + (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec) * 1e-6 +
                 (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) + (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec) * 1e-6;
    if (check && mode) verify(check);
    if (mode == 2 && pass == 0) continue;
    printf("{\"mode\": \"%s\", \"threads\": %d, \"piece_mib\": %llu, \"pass\": %d, \"gbps\": %.3f, "
           "\"seconds\": %.4f, \"cpu_seconds\": %.3f, \"switches\": %ld, \"faults\": %ld}\n",
           argv[6], threads, (unsigned long long)(piece >> 20), pass, size / dt / 1e9, dt, cpu,
           (r1.ru_nvcsw - r0.ru_nvcsw) + (r1.ru_nivcsw - r0.ru_nivcsw), r1.ru_minflt - r0.ru_minflt);
    fflush(stdout);
  }
  return 0;
}
