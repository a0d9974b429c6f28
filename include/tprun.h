/*
 * tprun.h: tprun's collectives from C and C++, in NCCL's shape.
 *
 * Every NCCL name has a tprun one (ncclAllReduce -> tprunAllReduce, ncclComm_t -> tprunComm_t,
 * ncclFloat32 -> tprunFloat32, ...) with NCCL's argument order and enum values, on host buffers
 * and without the stream argument: a call returns when its result is in the receive buffer
 * (group calls: at the outermost tprunGroupEnd). Reductions run in rank order, so every rank gets
 * the same bits. Link with libtprun (pkg-config --cflags --libs tprun, or find_package(tprun) and
 * the target tprun::tprun); README.md, "From C and C++".
 *
 * Errors: every call returns a tprunResult_t; tprunGetLastError(comm) is the message of the last
 * call that failed on comm (naming the operation, the rank and the peer), tprunGetLastError(NULL)
 * the last failure on the calling thread. Bad arguments return tprunInvalidArgument before any
 * data moves and leave the communicator usable; a peer that died, hung past the communicator
 * timeout (TPRUN_COMM_TIMEOUT_S) or a job aborted by the launcher return tprunRemoteError, after
 * which the communicator only returns errors (destroy it).
 *
 * Threads: a communicator may be used from any thread, one call at a time (a second thread's call
 * waits). Groups (tprunGroupStart/End) belong to the calling thread.
 */
#ifndef TPRUN_H_
#define TPRUN_H_

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TPRUN_MAJOR 0
#define TPRUN_MINOR 1
#define TPRUN_PATCH 0
#define TPRUN_VERSION(X, Y, Z) ((X) * 10000 + (Y) * 100 + (Z))
#define TPRUN_VERSION_CODE TPRUN_VERSION(TPRUN_MAJOR, TPRUN_MINOR, TPRUN_PATCH)

/* tprunCommSplit's color for a rank that joins no new communicator (it gets NULL). */
#define TPRUN_SPLIT_NOCOLOR (-1)

/* One rank's handle on a group of ranks (opaque). */
typedef struct tprunComm* tprunComm_t;

/* NCCL's values (1, ncclUnhandledCudaError, has no host counterpart). */
typedef enum {
  tprunSuccess = 0,
  tprunSystemError = 2,     /* the operating system refused (shared memory, files) */
  tprunInternalError = 3,   /* a bug in tprun (its message says where); please report it */
  tprunInvalidArgument = 4, /* a bad pointer, count, type, operator, root, peer or color */
  tprunInvalidUsage = 5,    /* a call out of order, a misconfigured environment */
  tprunRemoteError = 6,     /* a peer died, timed out, or the job was aborted */
  tprunNumResults = 7
} tprunResult_t;

/* NCCL's values and aliases. */
typedef enum {
  tprunInt8 = 0,
  tprunChar = 0,
  tprunUint8 = 1,
  tprunInt32 = 2,
  tprunInt = 2,
  tprunUint32 = 3,
  tprunInt64 = 4,
  tprunUint64 = 5,
  tprunFloat16 = 6,
  tprunHalf = 6,
  tprunFloat32 = 7,
  tprunFloat = 7,
  tprunFloat64 = 8,
  tprunDouble = 8,
  tprunBfloat16 = 9,
  tprunNumTypes = 10
} tprunDataType_t;

/*
 * NCCL's operators, then tprun's bitwise ones (integer types only). Float types accumulate in
 * float (double for tprunFloat64), integers in their own type with wrap-around; tprunAvg divides
 * the sum once at the end (integers truncate toward zero). tprunRedOpCreatePreMulSum makes more.
 */
typedef enum {
  tprunSum = 0,
  tprunProd = 1,
  tprunMax = 2,
  tprunMin = 3,
  tprunAvg = 4,
  tprunBand = 5,
  tprunBor = 6,
  tprunBxor = 7,
  tprunNumOps = 8,
  tprunMaxRedOp = 0x7fffffff
} tprunRedOp_t;

/*
 * Where tprunRedOpCreatePreMulSum's scalar lives. Host memory either way: tprunScalarHostImmediate
 * reads it once, at creation; tprunScalarDevice reads it each time the operator runs (as NCCL
 * reads a device scalar when the kernel runs), so the pointer must stay valid until destroy.
 */
typedef enum {
  tprunScalarDevice = 0,
  tprunScalarHostImmediate = 1
} tprunScalarResidence_t;

/* Version: TPRUN_VERSION_CODE of the library (which may be newer than this header). */
tprunResult_t tprunGetVersion(int* version);

/* A constant string naming a result code. */
const char* tprunGetErrorString(tprunResult_t result);

/*
 * The message of the last failed call on comm (comm NULL: on this thread); "" when none. Valid
 * until the next failed call on comm (or thread) or tprunCommDestroy.
 */
const char* tprunGetLastError(tprunComm_t comm);

/*
 * This rank's communicator from its launcher's environment: tprun, torchrun, Open MPI, PMI or
 * Slurm (a world of one without any). One per process at a time.
 */
tprunResult_t tprunCommInitFromEnv(tprunComm_t* comm);

/*
 * Rank `rank` of `nranks` processes or threads on this host that meet by themselves: each passes
 * the same job_key (ncclCommInitRank with a name every rank knows instead of an ncclUniqueId).
 * Returns once rank 0 has made the job's shared memory; waits up to the communicator timeout.
 */
tprunResult_t tprunCommInitRank(tprunComm_t* comm, int nranks, const char* job_key, int rank);

/*
 * ncclCommSplit / MPI_Comm_split: every rank of comm calls it; ranks passing the same color form
 * *newcomm, numbered by key, then by their rank in comm. TPRUN_SPLIT_NOCOLOR sets *newcomm to
 * NULL. config is reserved (tprun has no per-communicator settings): pass NULL; it is not read.
 */
tprunResult_t tprunCommSplit(tprunComm_t comm, int color, int key, tprunComm_t* newcomm,
                             void* config);

/* Frees comm (NULL: nothing). Not while a group on this thread holds operations on it. */
tprunResult_t tprunCommDestroy(tprunComm_t comm);

tprunResult_t tprunCommCount(const tprunComm_t comm, int* count);
tprunResult_t tprunCommUserRank(const tprunComm_t comm, int* rank);

/*
 * An operator that multiplies each rank's input by that rank's *scalar (of type datatype, a float
 * type) before summing; valid on comm with datatype only, until tprunRedOpDestroy.
 */
tprunResult_t tprunRedOpCreatePreMulSum(tprunRedOp_t* op, void* scalar, tprunDataType_t datatype,
                                        tprunScalarResidence_t residence, tprunComm_t comm);
tprunResult_t tprunRedOpDestroy(tprunRedOp_t op, tprunComm_t comm);

/*
 * Collectives. Counts are elements. In place (NCCL's rules): AllReduce, Broadcast, Reduce and
 * AllToAll with sendbuff == recvbuff; AllGather with sendbuff == recvbuff + rank * sendcount;
 * ReduceScatter with recvbuff == sendbuff + rank * recvcount; Gather at the root with sendbuff ==
 * recvbuff + root * count; Scatter at the root with recvbuff == sendbuff + root * count. Other
 * overlaps are refused. Buffers a rank does not use may be NULL there: Broadcast's sendbuff and
 * Reduce's recvbuff off the root, Gather's recvbuff and Scatter's sendbuff off the root.
 */
tprunResult_t tprunAllReduce(const void* sendbuff, void* recvbuff, size_t count,
                             tprunDataType_t datatype, tprunRedOp_t op, tprunComm_t comm);
tprunResult_t tprunAllGather(const void* sendbuff, void* recvbuff, size_t sendcount,
                             tprunDataType_t datatype, tprunComm_t comm);
tprunResult_t tprunReduceScatter(const void* sendbuff, void* recvbuff, size_t recvcount,
                                 tprunDataType_t datatype, tprunRedOp_t op, tprunComm_t comm);
tprunResult_t tprunBroadcast(const void* sendbuff, void* recvbuff, size_t count,
                             tprunDataType_t datatype, int root, tprunComm_t comm);
tprunResult_t tprunReduce(const void* sendbuff, void* recvbuff, size_t count,
                          tprunDataType_t datatype, tprunRedOp_t op, int root, tprunComm_t comm);
/* MPI_Alltoall: count elements to and from every rank (buffers of nranks * count). */
tprunResult_t tprunAllToAll(const void* sendbuff, void* recvbuff, size_t count,
                            tprunDataType_t datatype, tprunComm_t comm);
/* MPI_Gather / MPI_Scatter: count elements per rank, root's buffer holds nranks * count. */
tprunResult_t tprunGather(const void* sendbuff, void* recvbuff, size_t count,
                          tprunDataType_t datatype, int root, tprunComm_t comm);
tprunResult_t tprunScatter(const void* sendbuff, void* recvbuff, size_t count,
                           tprunDataType_t datatype, int root, tprunComm_t comm);
/* Returns once every rank of comm has entered it. */
tprunResult_t tprunBarrier(tprunComm_t comm);

/*
 * Point to point. Transfers between two ranks match in the order both issue them; a receive must
 * expect exactly the bytes sent. Put a rank's sends and receives that depend on each other (a
 * ring, a pairwise exchange) in one group so they progress together.
 */
tprunResult_t tprunSend(const void* sendbuff, size_t count, tprunDataType_t datatype, int peer,
                        tprunComm_t comm);
tprunResult_t tprunRecv(void* recvbuff, size_t count, tprunDataType_t datatype, int peer,
                        tprunComm_t comm);

/*
 * Groups (per thread, nestable). Between the outermost tprunGroupStart and its tprunGroupEnd the
 * operations above are checked and queued, not run; buffers must stay valid and unread until
 * tprunGroupEnd, which runs, per communicator, its collectives in the order issued and then all
 * its sends and receives together as one exchange (NCCL's order), each communicator on its own
 * thread when there are several (one thread may drive several ranks). A call refused inside the
 * group returns its error at once and tprunGroupEnd then runs nothing and returns that error.
 * Init, split and destroy are not queued.
 */
tprunResult_t tprunGroupStart(void);
tprunResult_t tprunGroupEnd(void);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* TPRUN_H_ */
