/*
 * tprunAllReduce timed through the C API over doubling sizes, in nccl-tests' columns (out of
 * place, then in place), so it can run beside `tprun perf --op all-reduce` to show what the C layer
 * costs. Build and run:
 *   cc -O2 allreduce_perf.c -o allreduce_perf $(pkg-config --cflags --libs tprun)
 *   tprun -n 4 -- ./allreduce_perf [MIN_BYTES [MAX_BYTES [ITERS [WARMUP]]]]
 * Defaults: 1 KiB to 64 MiB, 20 iterations after 5 warm-up calls, float sums. A row's time is the
 * mean per call on each rank, then the maximum over ranks (as `tprun perf`); #wrong counts the
 * elements of one more call on fresh inputs that differ from the exact sum, over all ranks.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "tprun.h"

#define CHECK(call)                                                                     \
  do {                                                                                  \
    tprunResult_t r_ = (call);                                                          \
    if (r_ != tprunSuccess) {                                                           \
      fprintf(stderr, "%s: %s: %s\n", #call, tprunGetErrorString(r_), tprunGetLastError(NULL)); \
      exit(1);                                                                          \
    }                                                                                   \
  } while (0)

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static tprunComm_t comm;
static int me, n;

static void fill(float* buf, size_t count) {
  for (size_t i = 0; i < count; i++) buf[i] = (float)((me + i) % 8);
}

/* Mean seconds per call over `iters` (after `warmup`), maximum over ranks; then one more call on
 * fresh inputs whose wrong elements (against the exact sum) are counted over all ranks. */
static double run(float* send, float* recv, size_t count, int iters, int warmup, double* wrong) {
  fill(send, count);
  for (int i = 0; i < warmup; i++)
    CHECK(tprunAllReduce(send, recv, count, tprunFloat32, tprunSum, comm));
  CHECK(tprunBarrier(comm));
  double t0 = now();
  for (int i = 0; i < iters; i++)
    CHECK(tprunAllReduce(send, recv, count, tprunFloat32, tprunSum, comm));
  double secs = (now() - t0) / iters;
  fill(send, count);
  CHECK(tprunAllReduce(send, recv, count, tprunFloat32, tprunSum, comm));
  double bad = 0;
  for (size_t i = 0; i < count; i++) {
    float want = 0;
    for (int r = 0; r < n; r++) want += (float)((r + i) % 8);
    bad += recv[i] != want;
  }
  CHECK(tprunAllReduce(&secs, &secs, 1, tprunFloat64, tprunMax, comm));
  CHECK(tprunAllReduce(&bad, &bad, 1, tprunFloat64, tprunSum, comm));
  *wrong = bad;
  return secs;
}

int main(int argc, char** argv) {
  size_t min = argc > 1 ? strtoull(argv[1], NULL, 0) : 1024;
  size_t max = argc > 2 ? strtoull(argv[2], NULL, 0) : (size_t)64 << 20;
  int iters = argc > 3 ? atoi(argv[3]) : 20;
  int warmup = argc > 4 ? atoi(argv[4]) : 5;
  if (min < 4 || max < min || iters < 1 || warmup < 0) {
    fprintf(stderr, "usage: allreduce_perf [MIN_BYTES>=4 [MAX_BYTES [ITERS>=1 [WARMUP]]]]\n");
    return 2;
  }
  CHECK(tprunCommInitFromEnv(&comm));
  CHECK(tprunCommUserRank(comm, &me));
  CHECK(tprunCommCount(comm, &n));
  float* send = malloc(max);
  float* recv = malloc(max);
  if (!send || !recv) {
    fprintf(stderr, "cannot allocate 2 x %zu bytes\n", max);
    return 1;
  }
  double bus = n > 1 ? 2.0 * (n - 1) / n : 1.0;
  if (me == 0) {
    printf("# tprunAllReduce through the C API: %d ranks, float, sum, %d iterations, %d warm-up\n",
           n, iters, warmup);
    printf("#\n# %55s out-of-place %30s in-place\n", "", "");
    printf("# %10s  %12s  %8s  %6s  %4s  %10s  %8s  %8s  %6s  %10s  %8s  %8s  %6s\n", "size",
           "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "time", "algbw",
           "busbw", "#wrong");
    printf("# %10s  %12s  %8s  %6s  %4s  %10s  %8s  %8s  %6s  %10s  %8s  %8s  %6s\n", "(B)",
           "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)",
           "");
  }
  for (size_t bytes = min; bytes <= max; bytes *= 2) {
    size_t count = bytes / sizeof(float);
    double w_out, w_in;
    double t_out = run(send, recv, count, iters, warmup, &w_out);
    double t_in = run(recv, recv, count, iters, warmup, &w_in);
    double b = (double)(count * sizeof(float));
    if (me == 0)
      printf("  %10zu  %12zu  %8s  %6s  %4d  %10.2f  %8.2f  %8.2f  %6.0f  %10.2f  %8.2f  %8.2f  %6.0f\n",
             count * sizeof(float), count, "float", "sum", -1, t_out * 1e6, b / t_out / 1e9,
             b / t_out / 1e9 * bus, w_out, t_in * 1e6, b / t_in / 1e9, b / t_in / 1e9 * bus,
             w_in);
    if (bytes > max / 2) break;
  }
  CHECK(tprunCommDestroy(comm));
  free(send);
  free(recv);
  return 0;
}
