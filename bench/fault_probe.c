// What fresh host memory costs on this machine: each of T threads maps its own region, asks
// for huge pages (or not), and writes every byte of it (the kernel faults in and zeroes each
// page first), then writes it again (the pages are in: plain store bandwidth). A second round
// maps fresh regions again, showing whether the first touch of the VM's memory cost extra.
// Build: cc -O2 -pthread -static -o fault_probe bench/fault_probe.c
// Run:   fault_probe [MiB per thread] [threads...]
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>

static size_t len;
static int huge;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static double cpu(void) {
  struct rusage r;
  getrusage(RUSAGE_SELF, &r);
  return r.ru_utime.tv_sec + r.ru_utime.tv_usec * 1e-6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec * 1e-6;
}

typedef struct {
  char *raw, *p; // the mapping, and the 2 MiB-aligned region inside it
  pthread_barrier_t *b;
} arg_t;

static void *fresh(void *a_) {
  arg_t *a = a_;
  pthread_barrier_wait(a->b);
  memset(a->p, 1, len);
  return NULL;
}

static void *again(void *a_) {
  arg_t *a = a_;
  pthread_barrier_wait(a->b);
  memset(a->p, 2, len);
  return NULL;
}

static void run(int t, void *(*fn)(void *), arg_t *args, const char *what, int round) {
  pthread_t th[256];
  pthread_barrier_t b;
  pthread_barrier_init(&b, NULL, t + 1);
  for (int i = 0; i < t; i++) {
    args[i].b = &b;
    pthread_create(&th[i], NULL, fn, &args[i]);
  }
  double c0 = cpu(), w0 = now();
  pthread_barrier_wait(&b);
  for (int i = 0; i < t; i++) pthread_join(th[i], NULL);
  double w = now() - w0, c = cpu() - c0;
  double gib = (double)len * t / (1 << 30);
  printf("{\"pages\": \"%s\", \"threads\": %d, \"round\": %d, \"what\": \"%s\", \"gib\": %.2f, "
         "\"seconds\": %.4f, \"gbps\": %.2f, \"cpu_s_per_gib\": %.3f}\n",
         huge ? "2M" : "4K", t, round, what, gib, w, gib * 1.073741824 / w, c / gib);
  fflush(stdout);
}

int main(int argc, char **argv) {
  size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 256;
  len = mib << 20;
  for (int k = 2; k < argc || k == 2; k++) {
    int t = argc > k ? atoi(argv[k]) : 1;
    if (t < 1 || t > 256) continue;
    for (huge = 1; huge >= 0; huge--) {
      for (int round = 0; round < 2; round++) {
        arg_t args[256];
        for (int i = 0; i < t; i++) {
          // 2 MiB-aligned so every page of the region can be a huge page.
          char *raw = mmap(NULL, len + (2 << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
          if (raw == MAP_FAILED) return perror("mmap"), 1;
          args[i].raw = raw;
          args[i].p = (char *)(((unsigned long)raw + (2 << 20) - 1) & ~((2UL << 20) - 1));
          madvise(args[i].p, len, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
        }
        run(t, fresh, args, "fresh", round);
        run(t, again, args, "faulted", round);
        for (int i = 0; i < t; i++) munmap(args[i].raw, len + (2 << 20));
      }
    }
  }
  return 0;
}
