/*
 * Every call of tprun.h, every datatype, checked against a scalar reference computed here.
 * Run under `tprun -n 3 -- ./api_test` (capi/tests/c_api.rs). Prints "rank R: N checks ok" and
 * exits 0, or prints each mismatch and exits 1.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tprun.h"

static int me, n, failures, checks;
static tprunComm_t world;

#define CHECK(call)                                                                       \
  do {                                                                                    \
    tprunResult_t r_ = (call);                                                            \
    if (r_ != tprunSuccess) {                                                             \
      fprintf(stderr, "rank %d: line %d: %s returned %s: %s\n", me, __LINE__, #call,      \
              tprunGetErrorString(r_), tprunGetLastError(NULL));                          \
      exit(1);                                                                            \
    }                                                                                     \
  } while (0)

#define EXPECT(cond, ...)                                   \
  do {                                                      \
    checks++;                                               \
    if (!(cond)) {                                          \
      failures++;                                           \
      if (failures < 20) {                                  \
        fprintf(stderr, "rank %d: line %d: ", me, __LINE__); \
        fprintf(stderr, __VA_ARGS__);                       \
        fprintf(stderr, "\n");                              \
      }                                                     \
    }                                                       \
  } while (0)

static const tprunDataType_t TYPES[10] = {tprunInt8,    tprunUint8,   tprunInt32,   tprunUint32,
                                          tprunInt64,   tprunUint64,  tprunFloat16, tprunFloat32,
                                          tprunFloat64, tprunBfloat16};
static const char* NAMES[10] = {"int8",    "uint8",  "int32", "uint32", "int64",
                                "uint64",  "half",   "float", "double", "bfloat16"};

static size_t size_of(tprunDataType_t t) {
  switch (t) {
    case tprunInt8: case tprunUint8: return 1;
    case tprunFloat16: case tprunBfloat16: return 2;
    case tprunInt32: case tprunUint32: case tprunFloat32: return 4;
    default: return 8;
  }
}

static int is_float(tprunDataType_t t) {
  return t == tprunFloat16 || t == tprunFloat32 || t == tprunFloat64 || t == tprunBfloat16;
}

/* Half and bfloat16 by hand: exact for the small values used here. */
static float half_to_float(uint16_t h) {
  int e = (h >> 10) & 31, m = h & 1023;
  float v = e == 0 ? ldexpf((float)m, -24) : ldexpf((float)(m | 1024), e - 25);
  return (h & 0x8000) ? -v : v;
}
static uint16_t float_to_half(float f) {
  uint16_t s = f < 0 ? 0x8000 : 0;
  int e;
  float a = fabsf(f);
  if (a == 0) return s;
  float m = frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1) */
  int he = e + 14;         /* biased exponent of 1.x * 2^(e-1) */
  uint16_t hm = (uint16_t)lrintf((m * 2 - 1) * 1024);
  return (uint16_t)(s | (he << 10) | hm);
}
static float bf16_to_float(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* Element i of a buffer of type t, as double (floats) or as the integer's value. */
static double getf(tprunDataType_t t, const void* p, size_t i) {
  switch (t) {
    case tprunFloat16: return half_to_float(((const uint16_t*)p)[i]);
    case tprunBfloat16: return bf16_to_float(((const uint16_t*)p)[i]);
    case tprunFloat32: return ((const float*)p)[i];
    default: return ((const double*)p)[i];
  }
}
static void setf(tprunDataType_t t, void* p, size_t i, double v) {
  switch (t) {
    case tprunFloat16: ((uint16_t*)p)[i] = float_to_half((float)v); break;
    case tprunBfloat16: ((uint16_t*)p)[i] = float_to_bf16((float)v); break;
    case tprunFloat32: ((float*)p)[i] = (float)v; break;
    default: ((double*)p)[i] = v; break;
  }
}
/* Integers: read sign- or zero-extended; write truncated to the type (two's complement). */
static int64_t geti(tprunDataType_t t, const void* p, size_t i) {
  switch (t) {
    case tprunInt8: return ((const int8_t*)p)[i];
    case tprunUint8: return ((const uint8_t*)p)[i];
    case tprunInt32: return ((const int32_t*)p)[i];
    case tprunUint32: return ((const uint32_t*)p)[i];
    case tprunInt64: return ((const int64_t*)p)[i];
    default: return (int64_t)((const uint64_t*)p)[i];
  }
}
static void seti(tprunDataType_t t, void* p, size_t i, uint64_t v) {
  switch (t) {
    case tprunInt8: case tprunUint8: ((uint8_t*)p)[i] = (uint8_t)v; break;
    case tprunInt32: case tprunUint32: ((uint32_t*)p)[i] = (uint32_t)v; break;
    default: ((uint64_t*)p)[i] = v; break;
  }
}
/* The integer v as type t would hold it (wrapped), read back. */
static int64_t wrap(tprunDataType_t t, uint64_t v) {
  uint64_t tmp = 0;
  seti(t, &tmp, 0, v);
  return geti(t, &tmp, 0);
}

/* Rank r's element i: small integers (floats), values that wrap when summed or multiplied
 * (8-bit types), negatives for signed types. */
static double valf(int r, size_t i) { return (double)((int)((i * 5 + (size_t)r * 3) % 7) - 3); }
static int64_t vali(tprunDataType_t t, int r, size_t i) {
  int64_t b = (int64_t)((i * 7 + (size_t)r * 13) % 11);
  switch (t) {
    case tprunInt8: return b * 12 - 60;
    case tprunUint8: return b * 23;
    case tprunInt32: case tprunInt64: return b * 1000 - 5000;
    default: return b * 100003;
  }
}
static void fill(tprunDataType_t t, void* p, size_t count, int r, size_t from) {
  for (size_t i = 0; i < count; i++) {
    if (is_float(t)) setf(t, p, i, valf(r, from + i));
    else seti(t, p, i, (uint64_t)vali(t, r, from + i));
  }
}

static double tol(tprunDataType_t t) {
  switch (t) {
    case tprunFloat16: return 2e-3;
    case tprunBfloat16: return 1e-2;
    case tprunFloat32: return 1e-6;
    default: return 1e-12;
  }
}

/* The reference reduction of element `from + i` over ranks 0..nr-1 (members[] maps group rank
 * to value rank), factors[] for premulsum. */
static int check_reduced(tprunDataType_t t, int op, const void* got, size_t count, size_t from,
                         int nr, const int* members, const double* factors, const char* what) {
  int bad = 0;
  for (size_t i = 0; i < count; i++) {
    if (is_float(t)) {
      double acc = 0;
      for (int r = 0; r < nr; r++) {
        double x = valf(members[r], from + i);
        if (factors) x *= factors[r];
        if (r == 0) acc = x;
        else if (op == tprunProd) acc *= x;
        else if (op == tprunMax) acc = x > acc ? x : acc;
        else if (op == tprunMin) acc = x < acc ? x : acc;
        else acc += x;
      }
      if (op == tprunAvg) acc /= nr;
      double g = getf(t, got, i);
      double m = fabs(acc) > 1 ? fabs(acc) : 1;
      if (fabs(g - acc) > tol(t) * m) {
        if (!bad) EXPECT(0, "%s %s op %d element %zu: got %g want %g", what, NAMES[t], op, i, g, acc);
        bad++;
      }
    } else {
      uint64_t acc = 0;
      int64_t mx = 0;
      for (int r = 0; r < nr; r++) {
        int64_t x = vali(t, members[r], from + i);
        uint64_t u = (uint64_t)x;
        if (r == 0) { acc = u; mx = x; continue; }
        switch (op) {
          case tprunProd: acc *= u; break;
          case tprunMax: mx = x > mx ? x : mx; break;
          case tprunMin: mx = x < mx ? x : mx; break;
          case tprunBand: acc &= u; break;
          case tprunBor: acc |= u; break;
          case tprunBxor: acc ^= u; break;
          default: acc += u; break;
        }
      }
      int64_t want;
      if (op == tprunMax || op == tprunMin) want = mx;
      else if (op == tprunAvg) want = wrap(t, wrap(t, acc) / nr);
      else want = wrap(t, acc);
      if (op == tprunAvg && (t == tprunUint64)) want = (int64_t)((uint64_t)wrap(t, acc) / (uint64_t)nr);
      int64_t g = geti(t, got, i);
      if (g != want) {
        if (!bad) EXPECT(0, "%s %s op %d element %zu: got %lld want %lld", what, NAMES[t], op, i,
                         (long long)g, (long long)want);
        bad++;
      }
    }
  }
  checks++;
  return bad;
}

/* Buffers element i holds rank r's value of element from + i. */
static void check_values(tprunDataType_t t, const void* got, size_t count, int r, size_t from,
                         const char* what) {
  for (size_t i = 0; i < count; i++) {
    int ok = is_float(t) ? getf(t, got, i) == valf(r, from + i)
                         : geti(t, got, i) == vali(t, r, from + i);
    if (!ok) {
      EXPECT(0, "%s %s element %zu is not rank %d's element %zu", what, NAMES[t], i, r, from + i);
      return;
    }
  }
  checks++;
}

static int all[64];

static void test_dtype(tprunDataType_t t) {
  const size_t count = 257; /* odd, so no path is a whole number of vectors */
  size_t es = size_of(t);
  unsigned char* a = calloc((size_t)n * count + 8, es);
  unsigned char* b = calloc((size_t)n * count + 8, es);
  unsigned char* c = calloc((size_t)n * count + 8, es);

  /* AllReduce, every operator of the type, out of place and in place. */
  int ops[8] = {tprunSum, tprunProd, tprunMax, tprunMin, tprunAvg, tprunBand, tprunBor, tprunBxor};
  int nops = is_float(t) ? 5 : 8;
  for (int k = 0; k < nops; k++) {
    fill(t, a, count, me, 0);
    memset(b, 0x5a, count * es);
    CHECK(tprunAllReduce(a, b, count, t, ops[k], world));
    check_reduced(t, ops[k], b, count, 0, n, all, NULL, "AllReduce");
    check_values(t, a, count, me, 0, "AllReduce leaves sendbuff");
    CHECK(tprunAllReduce(a, a, count, t, ops[k], world));
    check_reduced(t, ops[k], a, count, 0, n, all, NULL, "AllReduce in place");
  }
  if (is_float(t)) {
    /* Pre-multiplied sum: each rank its own factor, read at creation or when it runs. */
    double factors[3] = {0.5, 2.0, 0.25};
    unsigned char scalar[8];
    tprunRedOp_t op;
    setf(t, scalar, 0, 8.0);
    CHECK(tprunRedOpCreatePreMulSum(&op, scalar, t, tprunScalarHostImmediate, world));
    setf(t, scalar, 0, factors[me]); /* not read: immediate */
    fill(t, a, count, me, 0);
    CHECK(tprunAllReduce(a, b, count, t, op, world));
    double eights[3] = {8, 8, 8};
    check_reduced(t, tprunSum, b, count, 0, n, all, eights, "PreMulSum immediate");
    CHECK(tprunRedOpDestroy(op, world));
    CHECK(tprunRedOpCreatePreMulSum(&op, scalar, t, tprunScalarDevice, world));
    CHECK(tprunAllReduce(a, b, count, t, op, world));
    check_reduced(t, tprunSum, b, count, 0, n, all, factors, "PreMulSum device");
    CHECK(tprunReduceScatter(a, b, count / n, t, op, world));
    CHECK(tprunRedOpDestroy(op, world));
  }

  /* AllGather out of place and in place. */
  fill(t, a, count, me, 0);
  CHECK(tprunAllGather(a, b, count, t, world));
  for (int r = 0; r < n; r++) check_values(t, b + (size_t)r * count * es, count, r, 0, "AllGather");
  memset(b, 0, (size_t)n * count * es);
  fill(t, b + (size_t)me * count * es, count, me, 0);
  CHECK(tprunAllGather(b + (size_t)me * count * es, b, count, t, world));
  for (int r = 0; r < n; r++)
    check_values(t, b + (size_t)r * count * es, count, r, 0, "AllGather in place");

  /* ReduceScatter: rank r gets elements r*count.. of the sum; out of place and in place. */
  fill(t, a, (size_t)n * count, me, 0);
  CHECK(tprunReduceScatter(a, b, count, t, tprunSum, world));
  check_reduced(t, tprunSum, b, count, (size_t)me * count, n, all, NULL, "ReduceScatter");
  CHECK(tprunReduceScatter(a, a + (size_t)me * count * es, count, t, tprunMax, world));
  check_reduced(t, tprunMax, a + (size_t)me * count * es, count, (size_t)me * count, n, all, NULL,
                "ReduceScatter in place");

  /* Broadcast from rank 1: out of place (sendbuff NULL off the root) and in place. */
  fill(t, a, count, me, 0);
  memset(b, 0, count * es);
  CHECK(tprunBroadcast(me == 1 ? a : NULL, b, count, t, 1, world));
  check_values(t, b, count, 1, 0, "Broadcast");
  CHECK(tprunBroadcast(a, a, count, t, n - 1, world));
  check_values(t, a, count, n - 1, 0, "Broadcast in place");

  /* Reduce to rank 2 (recvbuff NULL elsewhere), then in place to rank 0. */
  fill(t, a, count, me, 0);
  memset(b, 0, count * es);
  CHECK(tprunReduce(a, me == 2 ? b : NULL, count, t, tprunMin, 2, world));
  if (me == 2) check_reduced(t, tprunMin, b, count, 0, n, all, NULL, "Reduce");
  check_values(t, a, count, me, 0, "Reduce leaves sendbuff");
  CHECK(tprunReduce(a, a, count, t, tprunSum, 0, world));
  if (me == 0) check_reduced(t, tprunSum, a, count, 0, n, all, NULL, "Reduce in place");
  else check_values(t, a, count, me, 0, "Reduce in place off the root");

  /* AllToAll: chunk p of rank r's input is element range p*count.. of rank r's values. */
  fill(t, a, (size_t)n * count, me, 0);
  CHECK(tprunAllToAll(a, b, count, t, world));
  for (int r = 0; r < n; r++)
    check_values(t, b + (size_t)r * count * es, count, r, (size_t)me * count, "AllToAll");
  CHECK(tprunAllToAll(a, a, count, t, world));
  for (int r = 0; r < n; r++)
    check_values(t, a + (size_t)r * count * es, count, r, (size_t)me * count, "AllToAll in place");

  /* Gather to rank 0, in place at rank 1. */
  fill(t, a, count, me, 0);
  CHECK(tprunGather(a, me == 0 ? b : NULL, count, t, 0, world));
  if (me == 0)
    for (int r = 0; r < n; r++) check_values(t, b + (size_t)r * count * es, count, r, 0, "Gather");
  fill(t, c + (size_t)me * count * es, count, me, 0);
  CHECK(tprunGather(c + (size_t)me * count * es, c, count, t, 1, world));
  if (me == 1)
    for (int r = 0; r < n; r++)
      check_values(t, c + (size_t)r * count * es, count, r, 0, "Gather in place");

  /* Scatter from rank 2, in place at rank 0. */
  fill(t, a, (size_t)n * count, 2, 0);
  CHECK(tprunScatter(me == 2 ? a : NULL, b, count, t, 2, world));
  check_values(t, b, count, 2, (size_t)me * count, "Scatter");
  fill(t, a, (size_t)n * count, 0, 0);
  CHECK(tprunScatter(a, a + (size_t)me * count * es, count, t, 0, world));
  check_values(t, a + (size_t)me * count * es, count, 0, (size_t)me * count, "Scatter in place");

  /* A grouped ring: send to the right, receive from the left. */
  fill(t, a, count, me, 0);
  memset(b, 0, count * es);
  CHECK(tprunGroupStart());
  CHECK(tprunSend(a, count, t, (me + 1) % n, world));
  CHECK(tprunRecv(b, count, t, (me + n - 1) % n, world));
  CHECK(tprunGroupEnd());
  check_values(t, b, count, (me + n - 1) % n, 0, "ring");

  free(a);
  free(b);
  free(c);
}

int main(void) {
  int version = 0;
  CHECK(tprunGetVersion(&version));
  EXPECT(version == TPRUN_VERSION_CODE, "version %d, header %d", version, TPRUN_VERSION_CODE);
  for (int r = tprunSuccess; r < tprunNumResults; r++)
    EXPECT(tprunGetErrorString((tprunResult_t)r)[0] != 0, "no string for %d", r);

  CHECK(tprunCommInitFromEnv(&world));
  CHECK(tprunCommCount(world, &n));
  CHECK(tprunCommUserRank(world, &me));
  EXPECT(n == atoi(getenv("WORLD_SIZE")) && me == atoi(getenv("RANK")), "rank %d of %d", me, n);
  EXPECT(n == 3, "run me with tprun -n 3 (world %d)", n);
  if (n != 3) return 1;
  EXPECT(tprunGetLastError(world)[0] == 0, "a new communicator has no error");
  for (int r = 0; r < n; r++) all[r] = r;

  for (int k = 0; k < 10; k++) test_dtype(TYPES[k]);

  /* One all-reduce larger than the transport's chunk. */
  {
    size_t big = (size_t)3 << 18;
    float* x = malloc(big * sizeof(float));
    for (size_t i = 0; i < big; i++) x[i] = (float)valf(me, i);
    CHECK(tprunAllReduce(x, x, big, tprunFloat32, tprunSum, world));
    check_reduced(tprunFloat32, tprunSum, x, big, 0, n, all, NULL, "big AllReduce");
    free(x);
  }

  /* Split by parity, numbered in reverse: {0, 2} -> ranks {1, 0}; {1} alone. */
  tprunComm_t half = NULL, pair = NULL;
  CHECK(tprunCommSplit(world, me % 2, -me, &half, NULL));
  int hn, hme;
  CHECK(tprunCommCount(half, &hn));
  CHECK(tprunCommUserRank(half, &hme));
  EXPECT(hn == (me % 2 ? 1 : 2), "split group of %d", hn);
  EXPECT(hme == (me == 0 ? 1 : 0), "split rank %d", hme);
  {
    int members[2] = {me % 2 ? 1 : 2, 0}; /* world ranks by split rank */
    double v[8];
    for (int i = 0; i < 8; i++) v[i] = valf(me, (size_t)i);
    CHECK(tprunAllReduce(v, v, 8, tprunFloat64, tprunSum, half));
    check_reduced(tprunFloat64, tprunSum, v, 8, 0, hn, members, NULL, "split AllReduce");
    /* A grouped ring on the split communicator and a collective on the world in one group:
     * one thread drives both. */
    int32_t s = me * 10, r = -1, w = 1;
    CHECK(tprunGroupStart());
    CHECK(tprunSend(&s, 1, tprunInt32, (hme + 1) % hn, half));
    CHECK(tprunRecv(&r, 1, tprunInt32, (hme + hn - 1) % hn, half));
    CHECK(tprunAllReduce(&w, &w, 1, tprunInt32, tprunSum, world));
    CHECK(tprunGroupEnd());
    EXPECT(r == (hn == 1 ? me * 10 : members[(hme + hn - 1) % hn] * 10), "split ring got %d", r);
    EXPECT(w == n, "grouped all-reduce got %d", w);
  }
  /* Rank 1 opts out of a second split. */
  CHECK(tprunCommSplit(world, me == 1 ? TPRUN_SPLIT_NOCOLOR : 7, me, &pair, NULL));
  if (me == 1) {
    EXPECT(pair == NULL, "TPRUN_SPLIT_NOCOLOR gave a communicator");
  } else {
    int pn, pme;
    CHECK(tprunCommCount(pair, &pn));
    CHECK(tprunCommUserRank(pair, &pme));
    EXPECT(pn == 2 && pme == me / 2, "pair rank %d of %d", pme, pn);
    int64_t x = me + 1;
    CHECK(tprunAllReduce(&x, &x, 1, tprunInt64, tprunProd, pair));
    EXPECT(x == 3, "pair product %lld", (long long)x);
  }

  /* Nested group of collectives: run at the outermost end, in order. */
  {
    float x[4] = {1, 2, 3, 4}, y[4] = {0};
    CHECK(tprunGroupStart());
    CHECK(tprunGroupStart());
    CHECK(tprunAllReduce(x, x, 4, tprunFloat32, tprunSum, world));
    CHECK(tprunGroupEnd());
    EXPECT(x[0] == 1, "a collective ran before the outermost tprunGroupEnd");
    CHECK(tprunBroadcast(x, y, 4, tprunFloat32, 0, world));
    CHECK(tprunGroupEnd());
    EXPECT(y[0] == 3 && y[3] == 12, "grouped broadcast of the grouped sum got %g %g", y[0], y[3]);
  }

  CHECK(tprunBarrier(world));
  CHECK(tprunCommDestroy(pair));
  CHECK(tprunCommDestroy(half));
  CHECK(tprunCommDestroy(world));
  if (failures) {
    fprintf(stderr, "rank %d: %d of %d checks failed\n", me, failures, checks);
    return 1;
  }
  printf("rank %d: %d checks ok\n", me, checks);
  return 0;
}
