/*
 * allreduce_mpi.c ported to tprun's C API: MPI_Init becomes tprunCommInitFromEnv (which also
 * reads mpirun's and srun's environment), MPI_Allreduce becomes tprunAllReduce with NCCL's
 * argument order, MPI_Finalize becomes tprunCommDestroy. Build and run:
 *   cc allreduce.c -o allreduce $(pkg-config --cflags --libs tprun) && tprun -n 4 -- ./allreduce
 */
#include <stdio.h>

#include "tprun.h"

#define N 1000000

#define TPRUN_CHECK(call)                                                               \
  do {                                                                                  \
    tprunResult_t r_ = (call);                                                          \
    if (r_ != tprunSuccess) {                                                           \
      fprintf(stderr, "%s: %s: %s\n", #call, tprunGetErrorString(r_), tprunGetLastError(NULL)); \
      return 1;                                                                         \
    }                                                                                   \
  } while (0)

int main(void) {
  int rank, size;
  tprunComm_t comm;
  TPRUN_CHECK(tprunCommInitFromEnv(&comm));
  TPRUN_CHECK(tprunCommUserRank(comm, &rank));
  TPRUN_CHECK(tprunCommCount(comm, &size));

  long lo = (long)N * rank / size + 1, hi = (long)N * (rank + 1) / size;
  double local[2] = {0, 0}; /* sum, max */
  for (long i = lo; i <= hi; i++) local[0] += (double)i;
  local[1] = (double)hi;

  double sum, max;
  TPRUN_CHECK(tprunAllReduce(&local[0], &sum, 1, tprunDouble, tprunSum, comm));
  TPRUN_CHECK(tprunAllReduce(&local[1], &max, 1, tprunDouble, tprunMax, comm));
  if (rank == 0) printf("sum of 1..%d = %.0f, max = %.0f, on %d ranks\n", N, sum, max, size);

  TPRUN_CHECK(tprunCommDestroy(comm));
  return 0;
}
