/*
 * The MPI original of allreduce.c (for comparison; needs an MPI installation):
 *   mpicc allreduce_mpi.c -o allreduce_mpi && mpirun -n 4 ./allreduce_mpi
 * Each rank owns a slice of 1..N, sums it, and an all-reduce gives every rank the total and the
 * largest element.
 */
#include <mpi.h>
#include <stdio.h>

#define N 1000000

int main(int argc, char** argv) {
  int rank, size;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);

  long lo = (long)N * rank / size + 1, hi = (long)N * (rank + 1) / size;
  double local[2] = {0, 0}; /* sum, max */
  for (long i = lo; i <= hi; i++) local[0] += (double)i;
  local[1] = (double)hi;

  double sum, max;
  MPI_Allreduce(&local[0], &sum, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(&local[1], &max, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) printf("sum of 1..%d = %.0f, max = %.0f, on %d ranks\n", N, sum, max, size);

  MPI_Finalize();
  return 0;
}
