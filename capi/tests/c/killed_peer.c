/*
 * A peer that dies returns tprunRemoteError, with a message naming it. Two processes meet by
 * themselves (tprunCommInitRank): `killed_peer KEY RANK`. After one all-reduce, rank 1 kills
 * itself; rank 0's next all-reduce must fail with tprunRemoteError, and so must its next call.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tprun.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: killed_peer KEY RANK\n");
    return 2;
  }
  int rank = atoi(argv[2]);
  tprunComm_t comm;
  tprunResult_t r = tprunCommInitRank(&comm, 2, argv[1], rank);
  if (r != tprunSuccess) {
    fprintf(stderr, "rank %d: init: %s\n", rank, tprunGetLastError(NULL));
    return 1;
  }
  int x = rank + 1;
  r = tprunAllReduce(&x, &x, 1, tprunInt32, tprunSum, comm);
  if (r != tprunSuccess || x != 3) {
    fprintf(stderr, "rank %d: first all-reduce: %s (x=%d)\n", rank, tprunGetLastError(comm), x);
    return 1;
  }
  if (rank == 1) raise(SIGKILL);
  r = tprunAllReduce(&x, &x, 1, tprunInt32, tprunSum, comm);
  printf("rank 0: %s: %s\n", tprunGetErrorString(r), tprunGetLastError(comm));
  if (r != tprunRemoteError || strstr(tprunGetLastError(comm), "rank 1") == NULL) return 1;
  r = tprunBarrier(comm);
  printf("rank 0 then: %s: %s\n", tprunGetErrorString(r), tprunGetLastError(comm));
  if (r != tprunRemoteError) return 1;
  tprunCommDestroy(comm);
  return 0;
}
