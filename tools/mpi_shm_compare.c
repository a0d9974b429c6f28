/* Open MPI's side of tools/mpi_shm_compare.sh: times the MPI call that matches each `tprun perf`
 * op, float32 and MPI_SUM, the way perf times its own (nccl-tests' way): per size, --warmup
 * untimed calls, a barrier, --iters timed calls; a row's time is the mean per call on each rank,
 * then the maximum over ranks. Sizes double from --min-bytes to --max-bytes and are counted as
 * perf counts them (programs/src/perf.rs):
 *   all_reduce, broadcast, reduce, send_recv  the buffer (send_recv: the bytes one rank sends)
 *   all_gather, reduce_scatter, gather, scatter  the whole gathered/scattered buffer
 *   all_to_all  one rank's whole input
 * rounded down to a multiple of ranks x 4 bytes where a buffer is split per rank; a size that
 * rounds to the previous one is skipped. Like perf: all-reduce is in place (MPI_IN_PLACE),
 * reduce in place at the root, root 0, send_recv a ring (rank r sends to r+1, receives from
 * r-1, one MPI_Sendrecv).
 *
 * Rank 0 prints one line per row: `op<TAB>bytes<TAB>time_us`.
 *
 *   mpicc -O2 -o mpi_shm_compare tools/mpi_shm_compare.c
 *   mpirun -np 2 ./mpi_shm_compare [--ops all_reduce,gather,...] [--min-bytes 8]
 *       [--max-bytes 67108864] [--iters 20] [--warmup 5]
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *ALL_OPS = "all_reduce,all_gather,reduce_scatter,broadcast,reduce,gather,"
                             "scatter,all_to_all,send_recv";

/* Whether `op` splits its buffer per rank (its size is rounded to ranks x 4 bytes). */
static int per_rank(const char *op) {
    return !strcmp(op, "all_gather") || !strcmp(op, "reduce_scatter") || !strcmp(op, "gather") ||
           !strcmp(op, "scatter") || !strcmp(op, "all_to_all");
}

static int known(const char *op) {
    char list[256];
    snprintf(list, sizeof list, "%s", ALL_OPS);
    for (char *t = strtok(list, ","); t; t = strtok(NULL, ","))
        if (!strcmp(t, op)) return 1;
    return 0;
}

/* One call of `op` on `count` floats (per-rank ops: `count` per rank). */
static void call(const char *op, float *a, float *b, int count, int rank, int n) {
    if (!strcmp(op, "all_reduce")) {
        MPI_Allreduce(MPI_IN_PLACE, a, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    } else if (!strcmp(op, "broadcast")) {
        MPI_Bcast(a, count, MPI_FLOAT, 0, MPI_COMM_WORLD);
    } else if (!strcmp(op, "reduce")) {
        MPI_Reduce(rank == 0 ? MPI_IN_PLACE : a, a, count, MPI_FLOAT, MPI_SUM, 0, MPI_COMM_WORLD);
    } else if (!strcmp(op, "all_gather")) {
        MPI_Allgather(a, count, MPI_FLOAT, b, count, MPI_FLOAT, MPI_COMM_WORLD);
    } else if (!strcmp(op, "reduce_scatter")) {
        MPI_Reduce_scatter_block(a, b, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    } else if (!strcmp(op, "gather")) {
        MPI_Gather(a, count, MPI_FLOAT, b, count, MPI_FLOAT, 0, MPI_COMM_WORLD);
    } else if (!strcmp(op, "scatter")) {
        MPI_Scatter(a, count, MPI_FLOAT, b, count, MPI_FLOAT, 0, MPI_COMM_WORLD);
    } else if (!strcmp(op, "all_to_all")) {
        MPI_Alltoall(a, count, MPI_FLOAT, b, count, MPI_FLOAT, MPI_COMM_WORLD);
    } else { /* send_recv */
        MPI_Sendrecv(a, count, MPI_FLOAT, (rank + 1) % n, 0, b, count, MPI_FLOAT,
                     (rank + n - 1) % n, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    }
}

static long long arg_ll(const char *flag, const char *v) {
    char *end;
    long long x = strtoll(v, &end, 10);
    if (*v == '\0' || *end != '\0' || x < 0) {
        fprintf(stderr, "mpi_shm_compare: %s %s: expected a whole number of bytes or calls\n",
                flag, v);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    return x;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, n;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    const char *ops = ALL_OPS;
    long long min_bytes = 8, max_bytes = 64LL << 20, iters = 20, warmup = 5;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "mpi_shm_compare: %s needs a value\n", f);
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
        if (!strcmp(f, "--ops")) ops = v;
        else if (!strcmp(f, "--min-bytes")) min_bytes = arg_ll(f, v);
        else if (!strcmp(f, "--max-bytes")) max_bytes = arg_ll(f, v);
        else if (!strcmp(f, "--iters")) iters = arg_ll(f, v);
        else if (!strcmp(f, "--warmup")) warmup = arg_ll(f, v);
        else {
            fprintf(stderr, "mpi_shm_compare: unknown option %s\n", f);
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
        i++;
    }
    if (min_bytes < 1 || min_bytes > max_bytes || iters < 1) {
        fprintf(stderr, "mpi_shm_compare: need 1 <= --min-bytes <= --max-bytes and --iters >= 1\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    /* Buffers for the largest size: per-rank ops use at most n x max_bytes / n per side. */
    size_t cap = (size_t)max_bytes / sizeof(float) + 1;
    float *a = malloc(cap * sizeof(float)), *b = malloc(cap * sizeof(float));
    if (!a || !b) {
        fprintf(stderr, "mpi_shm_compare: cannot allocate 2 x %lld bytes\n", max_bytes);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    for (size_t i = 0; i < cap; i++) a[i] = b[i] = 1.0f;

    char list[1024];
    snprintf(list, sizeof list, "%s", ops);
    char *save = NULL;
    for (char *op = strtok_r(list, ",", &save); op; op = strtok_r(NULL, ",", &save)) {
        if (!known(op)) {
            if (rank == 0) fprintf(stderr, "mpi_shm_compare: unknown op %s (one of %s)\n", op, ALL_OPS);
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
        long long last = -1;
        for (long long size = min_bytes; size <= max_bytes; size *= 2) {
            int split = per_rank(op);
            long long count = split ? size / (4LL * n) : size / 4; /* floats per call */
            long long bytes = split ? count * 4 * n : count * 4;
            if (count == 0 || bytes == last) continue;
            last = bytes;
            for (long long i = 0; i < warmup; i++) call(op, a, b, (int)count, rank, n);
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            for (long long i = 0; i < iters; i++) call(op, a, b, (int)count, rank, n);
            double local = (MPI_Wtime() - t0) / (double)iters, slowest = 0;
            MPI_Reduce(&local, &slowest, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
            if (rank == 0) printf("%s\t%lld\t%.3f\n", op, bytes, slowest * 1e6);
            /* all-reduce in place grows its values; start each size from ones again. */
            for (long long i = 0; i < count * (split ? n : 1) && i < (long long)cap; i++) a[i] = 1.0f;
        }
    }
    fflush(stdout);
    free(a);
    free(b);
    MPI_Finalize();
    return 0;
}
