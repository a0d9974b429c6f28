/*
 * Bad arguments return tprunInvalidArgument (or tprunInvalidUsage for calls out of order) with a
 * message, never crash, and leave the communicator usable. Run under `tprun -n 2`. The last case,
 * counts that differ between ranks, leaves the communicator failed, as NCCL would.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tprun.h"

static int me, n, failures, cases;
static tprunComm_t comm;

/* `call` must return `want` and leave a message naming `needle` (on comm, or the thread). */
#define BAD(want, needle, call)                                                              \
  do {                                                                                       \
    tprunResult_t r_ = (call);                                                               \
    const char* m_ = tprunGetLastError(NULL);                                                \
    cases++;                                                                                 \
    if (r_ != (want) || strstr(m_, (needle)) == NULL) {                                      \
      failures++;                                                                            \
      fprintf(stderr, "rank %d: line %d: %s returned %s (%d) with \"%s\", want %d and \"%s\"\n", \
              me, __LINE__, #call, tprunGetErrorString(r_), (int)r_, m_, (int)(want),         \
              (needle));                                                                     \
    } else if (me == 0) {                                                                    \
      printf("refused: %s\n", m_);                                                           \
    }                                                                                        \
  } while (0)

#define OK(call)                                                                       \
  do {                                                                                 \
    tprunResult_t r_ = (call);                                                         \
    if (r_ != tprunSuccess) {                                                          \
      fprintf(stderr, "rank %d: line %d: %s failed: %s\n", me, __LINE__, #call,        \
              tprunGetLastError(NULL));                                                \
      exit(1);                                                                         \
    }                                                                                  \
  } while (0)

int main(void) {
  float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[16];
  tprunComm_t none = NULL, other = NULL;
  const tprunResult_t ARG = tprunInvalidArgument;

  BAD(ARG, "comm is NULL", tprunCommInitFromEnv(NULL));
  OK(tprunCommInitFromEnv(&comm));
  OK(tprunCommCount(comm, &n));
  OK(tprunCommUserRank(comm, &me));
  BAD(tprunInvalidUsage, "already called", tprunCommInitFromEnv(&other));

  BAD(ARG, "version is NULL", tprunGetVersion(NULL));
  BAD(ARG, "count is NULL", tprunCommCount(comm, NULL));
  BAD(ARG, "rank is NULL", tprunCommUserRank(comm, NULL));
  BAD(ARG, "comm is NULL", tprunCommCount(NULL, &n));
  BAD(ARG, "comm is NULL", tprunAllReduce(x, x, 8, tprunFloat32, tprunSum, NULL));
  BAD(ARG, "sendbuff is NULL but holds 32 bytes",
      tprunAllReduce(NULL, y, 8, tprunFloat32, tprunSum, comm));
  BAD(ARG, "recvbuff is NULL", tprunAllReduce(x, NULL, 8, tprunFloat32, tprunSum, comm));
  BAD(ARG, "overflows", tprunAllReduce(x, y, SIZE_MAX, tprunFloat32, tprunSum, comm));
  BAD(ARG, "overflows", tprunAllGather(x, y, SIZE_MAX / 2, tprunInt8, comm));
  BAD(ARG, "datatype 10 is not a tprunDataType_t",
      tprunAllReduce(x, y, 8, (tprunDataType_t)10, tprunSum, comm));
  BAD(ARG, "datatype -1", tprunBroadcast(x, y, 8, (tprunDataType_t)-1, 0, comm));
  BAD(ARG, "op 99 is not a tprunRedOp_t",
      tprunAllReduce(x, y, 8, tprunFloat32, (tprunRedOp_t)99, comm));
  BAD(ARG, "op -3", tprunReduce(x, y, 8, tprunFloat32, (tprunRedOp_t)-3, 0, comm));
  BAD(ARG, "bitwise", tprunAllReduce(x, y, 8, tprunFloat32, tprunBxor, comm));
  BAD(ARG, "root 2 out of range for a communicator of 2 ranks",
      tprunBroadcast(x, y, 8, tprunFloat32, 2, comm));
  BAD(ARG, "root -1", tprunReduce(x, y, 8, tprunFloat32, tprunSum, -1, comm));
  BAD(ARG, "root 5", tprunGather(x, y, 8, tprunFloat32, 5, comm));
  BAD(ARG, "root 2", tprunScatter(y, x, 4, tprunFloat32, 2, comm));
  BAD(ARG, "peer 7", tprunSend(x, 8, tprunFloat32, 7, comm));
  BAD(ARG, "peer -1", tprunRecv(y, 8, tprunFloat32, -1, comm));
  BAD(ARG, "overlap", tprunAllReduce(x, x + 1, 4, tprunFloat32, tprunSum, comm));
  BAD(ARG, "sendbuff == recvbuff + rank * sendcount", tprunAllGather(y + 1, y, 4, tprunFloat32, comm));
  BAD(ARG, "recvbuff == sendbuff + rank * recvcount",
      tprunReduceScatter(y, y + 1, 4, tprunFloat32, tprunSum, comm));

  /* Pre-multiplied sums. */
  tprunRedOp_t op;
  double s = 2;
  int32_t i32 = 2;
  BAD(ARG, "op is NULL", tprunRedOpCreatePreMulSum(NULL, &s, tprunFloat64, tprunScalarHostImmediate, comm));
  BAD(ARG, "scalar is NULL", tprunRedOpCreatePreMulSum(&op, NULL, tprunFloat64, tprunScalarHostImmediate, comm));
  BAD(ARG, "float types", tprunRedOpCreatePreMulSum(&op, &i32, tprunInt32, tprunScalarHostImmediate, comm));
  BAD(ARG, "residence 9", tprunRedOpCreatePreMulSum(&op, &s, tprunFloat64, (tprunScalarResidence_t)9, comm));
  s = HUGE_VAL;
  BAD(ARG, "not finite", tprunRedOpCreatePreMulSum(&op, &s, tprunFloat64, tprunScalarHostImmediate, comm));
  BAD(ARG, "op 3", tprunRedOpDestroy(tprunMin, comm));
  BAD(ARG, "op 12", tprunRedOpDestroy((tprunRedOp_t)12, comm));

  /* Communicators. */
  BAD(ARG, "newcomm is NULL", tprunCommSplit(comm, 0, 0, NULL, NULL));
  BAD(ARG, "color -5 is negative", tprunCommSplit(comm, -5, 0, &other, NULL));
  BAD(ARG, "job_key is NULL", tprunCommInitRank(&other, 2, NULL, 0));
  BAD(ARG, "rank 2 out of range for world size 2", tprunCommInitRank(&other, 2, "k", 2));
  BAD(ARG, "must be 0 <= rank < nranks", tprunCommInitRank(&other, -1, "k", 0));
  BAD(ARG, "job key is empty", tprunCommInitRank(&other, 2, "", 0));
  BAD(ARG, "comm is NULL", tprunCommInitRank(NULL, 2, "k", 0));
  BAD(ARG, "comm is NULL", tprunBarrier(none));

  /* Groups: a refused call inside one makes its end run nothing. */
  BAD(tprunInvalidUsage, "no tprunGroupStart", tprunGroupEnd());
  OK(tprunGroupStart());
  OK(tprunSend(x, 8, tprunFloat32, (me + 1) % n, comm));
  BAD(ARG, "peer 9", tprunRecv(y, 8, tprunFloat32, 9, comm));
  BAD(tprunInvalidUsage, "holds operations", tprunCommDestroy(comm));
  BAD(ARG, "ran none of the group's 1 queued operations", tprunGroupEnd());
  OK(tprunGroupStart());
  OK(tprunRecv(y, 8, tprunFloat32, 0, comm));
  OK(tprunRecv(y + 4, 8, tprunFloat32, 0, comm));
  BAD(ARG, "overlaps", tprunGroupEnd());

  /* The message is also the communicator's. */
  OK(tprunAllReduce(x, y, 8, tprunFloat32, tprunSum, comm));
  BAD(ARG, "bitwise", tprunAllReduce(x, y, 8, tprunFloat32, tprunBand, comm));
  if (strstr(tprunGetLastError(comm), "bitwise") == NULL) {
    failures++;
    fprintf(stderr, "rank %d: tprunGetLastError(comm) is \"%s\"\n", me, tprunGetLastError(comm));
  }

  /* Still usable after all that. */
  OK(tprunAllReduce(x, y, 8, tprunFloat32, tprunSum, comm));
  if (y[7] != 8.0f * n) {
    failures++;
    fprintf(stderr, "rank %d: all-reduce after the refusals got %g\n", me, y[7]);
  }

  /* Counts that differ between ranks: detected by the transport. */
  BAD(ARG, "disagree", tprunAllReduce(x, y, me == 0 ? 4 : 8, tprunFloat32, tprunSum, comm));
  BAD(ARG, "failed earlier", tprunAllReduce(x, y, 8, tprunFloat32, tprunSum, comm));

  OK(tprunCommDestroy(comm));
  if (failures) {
    fprintf(stderr, "rank %d: %d of %d cases failed\n", me, failures, cases);
    return 1;
  }
  printf("rank %d: %d refusals ok\n", me, cases);
  return 0;
}
